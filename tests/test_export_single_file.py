"""A single-file (.safetensors, LDM layout) checkpoint converts to the same graphs as its diffusers folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from sd_onnx.exporter.convert import convert
from sd_onnx.exporter.errors import ExportError
from sd_onnx.runtime.manifest import Manifest

from .ldm_checkpoint import write_single_file


@pytest.fixture(scope="module")
def checkpoint(tiny_pipeline: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_single_file(tiny_pipeline, tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


def test_single_file_round_trip(checkpoint: Path, tiny_pipeline: Path, tiny_export: Path, tmp_path: Path) -> None:
    out = tmp_path / "from-ckpt"
    manifest = convert(str(checkpoint), out, config=str(tiny_pipeline), log=lambda line: None)
    assert manifest.source == str(checkpoint)
    assert not (out / "_single_file_pipeline").exists()
    Manifest.load(out).verify(out)
    rng = np.random.default_rng(0)
    feeds = {
        "sample": rng.standard_normal((2, 4, 16, 16), dtype=np.float32),
        "timestep": np.array([500.0], dtype=np.float32),
        "encoder_hidden_states": rng.standard_normal((2, 77, 32), dtype=np.float32),
    }
    outputs = [
        ort.InferenceSession(str(folder / "unet" / "model.onnx")).run(None, feeds)[0] for folder in (out, tiny_export)
    ]
    np.testing.assert_allclose(outputs[0], outputs[1], atol=1e-6)
    assert (out / "tokenizer" / "tokenizer.json").is_file()


def test_single_file_without_config_offline_is_a_clear_error(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ExportError, match="cannot load single-file checkpoint"):
        convert(str(checkpoint), tmp_path / "out", log=lambda line: None)
    assert not (tmp_path / "out").exists()


def test_other_file_types_are_refused(tmp_path: Path) -> None:
    weird = tmp_path / "model.bin"
    weird.write_bytes(b"x")
    with pytest.raises(ExportError, match="not a diffusers folder nor a .safetensors/.ckpt checkpoint"):
        convert(str(weird), tmp_path / "out", log=lambda line: None)
