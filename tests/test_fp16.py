"""fp16 export of the tiny pipeline: half-precision weights, float32 inputs/outputs, validated against PyTorch,
recorded in the manifest, and loadable by the runtime unchanged (on CPU through onnxruntime's inserted casts)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from sd_onnx.exporter.cli import main as export_cli
from sd_onnx.exporter.half import FP16_RELATIVE_TOLERANCE
from sd_onnx.runtime import Manifest, StableDiffusionPipeline

FLOAT, HALF = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16


@pytest.fixture(scope="module")
def fp16_export(tiny_pipeline: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fp16") / "tiny-fp16"
    result = CliRunner().invoke(export_cli, ["convert", str(tiny_pipeline), str(out), "--precision", "fp16"])
    assert result.exit_code == 0, result.output
    return out


def test_weights_are_half_and_io_stays_float(fp16_export: Path) -> None:
    manifest = Manifest.load(fp16_export)
    for name, info in manifest.components.items():
        model = onnx.load(str(fp16_export / info.file))
        float_weights = [t.name for t in model.graph.initializer if t.data_type == FLOAT and len(t.dims) > 1]
        assert not float_weights, f"{name}: fp32 weight matrices left: {float_weights[:3]}"
        assert any(t.data_type == HALF for t in model.graph.initializer), name
        io = [*model.graph.input, *model.graph.output]
        assert all(v.type.tensor_type.elem_type != HALF for v in io), name


def test_manifest_records_fp16_and_its_validation(fp16_export: Path) -> None:
    manifest = Manifest.load(fp16_export)
    for name, info in manifest.components.items():
        assert info.precision == "fp16", name
        assert info.optimizations["fp16"]["keep_io_types"] is True
        assert info.validation["reference"] == "torch"
        assert info.validation["max_abs_diff"] <= info.validation["atol"], name


def test_fp16_images_match_fp32(fp16_export: Path, tiny_export: Path) -> None:
    settings = {"prompt": "a red circle", "seed": 4, "num_inference_steps": 6, "output_type": "np"}
    fp32 = StableDiffusionPipeline.from_pretrained(tiny_export, provider="cpu")(**settings).images
    with pytest.warns(UserWarning, match="fp16, which the CPU provider runs through casts"):
        fp16 = StableDiffusionPipeline.from_pretrained(fp16_export, provider="cpu")(**settings).images
    assert fp16.shape == fp32.shape
    assert np.abs(fp16 - fp32).max() < FP16_RELATIVE_TOLERANCE  # measured 7e-4 on the tiny model


def test_unknown_precision_is_refused(tiny_pipeline: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(export_cli, ["convert", str(tiny_pipeline), str(tmp_path / "x"), "--precision", "bf8"])
    assert result.exit_code != 0 and "bf8" in result.output
    assert not (tmp_path / "x").exists()


def test_load_time_lora_on_fp16_matches_export_time_fusion(
    fp16_export: Path, tiny_pipeline: Path, tmp_path: Path
) -> None:
    """An fp16 folder maps its half weights too: a LoRA added at load time draws what the fp16 export that
    fused it draws (updates summed in float32, cast to half once, as fusing then converting does)."""
    from sd_onnx.exporter.convert import convert

    from .lora_files import write_kohya_lora

    lora = write_kohya_lora(tiny_pipeline, tmp_path / "kohya.safetensors", seed=5)
    fused = convert(str(tiny_pipeline), tmp_path / "fused", precision="fp16", loras=[(lora, 0.8)], log=lambda _: None)
    assert fused.loras[0]["scale"] == 0.8
    settings = {"prompt": "a red circle", "seed": 4, "num_inference_steps": 6, "output_type": "np"}
    with pytest.warns(UserWarning, match="fp16"):
        expected = StableDiffusionPipeline.from_pretrained(tmp_path / "fused", provider="cpu")(**settings).images
        plain = StableDiffusionPipeline.from_pretrained(fp16_export, provider="cpu")(**settings).images
        got = StableDiffusionPipeline.from_pretrained(fp16_export, provider="cpu", loras=[(lora, 0.8)])(**settings)
    assert np.abs(got.images - expected).mean() <= 1 / 255
    assert np.abs(expected - plain).mean() > 1 / 255
