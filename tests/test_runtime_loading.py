"""Loading: plain Optimum/diffusers ONNX folders, low-memory mode, optimization levels, the optimized-graph cache."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from sd_onnx.runtime import StableDiffusionPipeline

PROMPT = "a photo of an astronaut riding a horse"


def generate(pipe: StableDiffusionPipeline) -> np.ndarray:
    return pipe(PROMPT, seed=3, num_inference_steps=3, scheduler="euler", output_type="np").images


@pytest.fixture(scope="module")
def reference(tiny_export: Path) -> np.ndarray:
    return generate(StableDiffusionPipeline.from_pretrained(tiny_export, provider="cpu", cache=False))


def test_plain_onnx_folder_without_manifest_or_tokenizer_json(tiny_export: Path, tmp_path: Path, reference) -> None:
    """The layout Optimum writes: no sd_onnx.json, slow-tokenizer files only."""
    plain = tmp_path / "plain"
    shutil.copytree(tiny_export, plain)
    (plain / "sd_onnx.json").unlink()
    (plain / "tokenizer" / "tokenizer.json").unlink()
    assert (plain / "tokenizer" / "vocab.json").is_file()
    pipe = StableDiffusionPipeline.from_pretrained(plain, provider="cpu")
    assert pipe.manifest is None and pipe.config.vae_scale_factor == 2 and pipe.config.embedding_dim == 32
    np.testing.assert_array_equal(generate(pipe), reference)


def test_low_memory_loads_on_demand_and_gives_the_same_image(tiny_export: Path, reference) -> None:
    pipe = StableDiffusionPipeline.from_pretrained(tiny_export, provider="cpu", low_memory=True)
    assert pipe.loaded_components == ()
    np.testing.assert_array_equal(generate(pipe), reference)
    assert pipe.loaded_components == ()


@pytest.mark.parametrize("level", ["disabled", "basic", "extended"])
def test_optimization_levels_agree(tiny_export: Path, reference, level: str) -> None:
    pipe = StableDiffusionPipeline.from_pretrained(tiny_export, provider="cpu", optimization=level, cache=False)
    np.testing.assert_allclose(generate(pipe), reference, atol=1e-4)


def test_unknown_optimization_level(tiny_export: Path) -> None:
    with pytest.raises(ValueError, match="unknown optimization level 'max'"):
        StableDiffusionPipeline.from_pretrained(tiny_export, provider="cpu", optimization="max")


def test_optimized_graph_cache_is_written_then_used(tiny_export: Path, tmp_path: Path, reference) -> None:
    """The cache goes to `cache_dir` (default: the user cache directory), never into the model folder, which
    may be read-only or inside site-packages."""
    folder, cache = tmp_path / "model", tmp_path / "cache"
    shutil.copytree(tiny_export, folder)
    before = sorted(p.relative_to(folder) for p in folder.rglob("*"))
    first = StableDiffusionPipeline.from_pretrained(folder, provider="cpu", cache_dir=cache)
    cached = sorted((cache / "optimized").glob("*.onnx"))
    assert len(cached) == 3 and not any("partial" in p.name for p in cached)
    assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == before
    second = StableDiffusionPipeline.from_pretrained(folder, provider="cpu", cache_dir=cache)
    assert Path(second.component("unet").session._model_path) in cached
    np.testing.assert_allclose(generate(second), generate(first), atol=1e-6)
    np.testing.assert_allclose(generate(second), reference, atol=1e-5)


def test_cache_defaults_to_the_user_cache_directory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from sd_onnx.runtime.session import CACHE_ENV, cache_root

    monkeypatch.delenv(CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "sd-onnx"
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine"


def test_read_only_model_folder_loads_and_caches_elsewhere(tiny_export: Path, tmp_path: Path, reference) -> None:
    folder = tmp_path / "ro"
    shutil.copytree(tiny_export, folder)
    for path in [folder, *folder.rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    try:
        pipe = StableDiffusionPipeline.from_pretrained(folder, provider="cpu", cache_dir=tmp_path / "c")
        np.testing.assert_allclose(generate(pipe), reference, atol=1e-5)
        assert list((tmp_path / "c" / "optimized").glob("*.onnx"))
    finally:
        for path in [folder, *folder.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
