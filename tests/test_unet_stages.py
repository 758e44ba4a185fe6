"""UNet stages: the UNet cut into consecutive graphs over its own weights, which low-memory mode loads one at a
time. Checked here: chained they are the UNet (at export and through the pipeline, fp32 and int8, with
DeepCache), a run never holds two stage sessions (weak references, not RSS), the weights are stored once, and
the export paths and their errors. Peak RSS on SD 1.5 is `sd-bench memory`'s."""

from __future__ import annotations

import gc
import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest

from sd_onnx.exporter.deepcache import deepcache_folder
from sd_onnx.exporter.errors import ExportError
from sd_onnx.exporter.stages import stages_folder
from sd_onnx.models.shapes import shipped_model
from sd_onnx.runtime import StableDiffusionPipeline
from sd_onnx.runtime.manifest import STAGE_COMPONENTS, Manifest

SETTINGS = {"seed": 3, "num_inference_steps": 3, "output_type": "np"}


@pytest.fixture(scope="module")
def staged(tiny_export: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny export with DeepCache's graphs (branch 1) and the UNet stages."""
    root = tmp_path_factory.mktemp("stages")
    deepcache_folder(tiny_export, root / "dc", 1, log=lambda line: None)
    stages_folder(root / "dc", root / "staged", log=lambda line: None)
    return root / "staged"


class StageWatcher:
    """Records every stage session the pipeline opens and fails if an earlier one is still alive then."""

    def __init__(self, pipe: StableDiffusionPipeline, monkeypatch: pytest.MonkeyPatch) -> None:
        self.opened: list[str] = []
        self.alive: list[weakref.ref] = []
        open_graph = pipe.open_graph

        def watched(name: str):
            gc.collect()
            if name in STAGE_COMPONENTS:
                living = [ref() for ref in self.alive if ref() is not None]
                assert not living, f"{name} opened while {[m.name for m in living]} still held"
            model = open_graph(name)
            if name in STAGE_COMPONENTS:
                self.opened.append(name)
                self.alive.append(weakref.ref(model))
            return model

        monkeypatch.setattr(pipe, "open_graph", watched)


def test_export_checks_the_chain_and_stores_weights_once(staged: Path) -> None:
    manifest = Manifest.load(staged)
    assert manifest.config.unet_stages == len(STAGE_COMPONENTS)
    data = staged / "unet" / "model.onnx_data"
    for name in STAGE_COMPONENTS:
        stage = manifest.components[name]
        assert stage.validation["max_abs_diff"] <= 1e-5
        assert set(stage.files) == {stage.file, "unet/model.onnx_data"}
        assert (staged / stage.file).stat().st_size < data.stat().st_size / 5
    crossing = {i.name for name in STAGE_COMPONENTS[1:] for i in manifest.components[name].inputs}
    assert "encoder_hidden_states" in crossing and len(crossing) > 3  # skip connections and the time embedding


def test_low_memory_runs_the_stages_one_at_a_time_with_the_same_pixels(staged, monkeypatch) -> None:
    """With DeepCache (interval 2), so that full calls (the stages) and shallow ones alternate."""
    deepcache = 2
    low = StableDiffusionPipeline.from_pretrained(staged, provider="cpu", low_memory=True)
    watcher = StageWatcher(low, monkeypatch)
    calls: list[int] = []
    got = low("a cat", deepcache_interval=deepcache, callback=lambda i, n, x: calls.append(i), **SETTINGS)
    full_calls = -(-len(calls) // deepcache)  # interval N: calls 0, N, 2N, ... are full
    assert watcher.opened == list(STAGE_COMPONENTS) * full_calls
    assert low.loaded_components == ()
    default = StableDiffusionPipeline.from_pretrained(staged, provider="cpu")
    expected = default("a cat", deepcache_interval=deepcache, **SETTINGS)
    np.testing.assert_allclose(got.images, expected.images, atol=1e-5)


def test_int8_export_with_stages(tiny_pipeline: Path, tmp_path: Path) -> None:
    from sd_onnx.exporter.convert import convert

    convert(tiny_pipeline, tmp_path / "int8", precision="int8", unet_stages=True, log=lambda line: None)
    manifest = Manifest.load(tmp_path / "int8")
    assert all(manifest.components[n].precision == "int8" for n in STAGE_COMPONENTS)
    assert max(manifest.components[n].validation["max_abs_diff"] for n in STAGE_COMPONENTS) <= 1e-4
    low = StableDiffusionPipeline.from_pretrained(tmp_path / "int8", provider="cpu", low_memory=True)
    default = StableDiffusionPipeline.from_pretrained(tmp_path / "int8", provider="cpu")
    np.testing.assert_allclose(low("a cat", **SETTINGS).images, default("a cat", **SETTINGS).images, atol=1e-4)


def test_the_shipped_model_has_stages() -> None:
    assert Manifest.load(shipped_model()).config.unet_stages == len(STAGE_COMPONENTS)


def test_stages_cli_and_its_errors(staged: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="already has UNet stages"):
        stages_folder(staged, tmp_path / "again", log=lambda line: None)
    result = subprocess.run(
        [sys.executable, "-m", "sd_onnx.exporter.cli", "stages", str(tmp_path / "missing"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
