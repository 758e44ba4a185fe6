"""Loading: plain Optimum/diffusers ONNX folders, low-memory mode, optimization levels, the optimized-graph cache."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from sd_onnx.runtime import StableDiffusionPipeline
from sd_onnx.runtime.session import CACHE_DIR

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
    assert pipe._models == {}
    np.testing.assert_array_equal(generate(pipe), reference)
    assert pipe._models == {}


@pytest.mark.parametrize("level", ["disabled", "basic", "extended"])
def test_optimization_levels_agree(tiny_export: Path, reference, level: str) -> None:
    pipe = StableDiffusionPipeline.from_pretrained(tiny_export, provider="cpu", optimization=level, cache=False)
    np.testing.assert_allclose(generate(pipe), reference, atol=1e-4)


def test_unknown_optimization_level(tiny_export: Path) -> None:
    with pytest.raises(ValueError, match="unknown optimization level 'max'"):
        StableDiffusionPipeline.from_pretrained(tiny_export, provider="cpu", optimization="max")


def test_optimized_graph_cache_is_written_then_used(tiny_export: Path, tmp_path: Path, reference) -> None:
    folder = tmp_path / "cached"
    shutil.copytree(tiny_export, folder, ignore=shutil.ignore_patterns(CACHE_DIR))
    first = StableDiffusionPipeline.from_pretrained(folder, provider="cpu")
    cached = sorted((folder / "unet" / CACHE_DIR).glob("*.onnx"))
    assert len(cached) == 1 and "partial" not in cached[0].name
    second = StableDiffusionPipeline.from_pretrained(folder, provider="cpu")
    assert second._models["unet"].session._model_path == str(cached[0])
    np.testing.assert_allclose(generate(second), generate(first), atol=1e-6)
    np.testing.assert_allclose(generate(second), reference, atol=1e-5)
