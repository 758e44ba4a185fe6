"""LoRAs fused at export against diffusers running the same LoRAs unfused: diffusers/PEFT and kohya layouts,
UNet and text encoder, several at their scales; LCM-LoRA's recipe recorded as the model's defaults."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sd_onnx.exporter.convert import convert
from sd_onnx.exporter.errors import ExportError
from sd_onnx.runtime import DiffusionPipeline, Manifest
from sd_onnx.runtime.manifest import sha256_file

from .lora_files import write_diffusers_lora, write_kohya_lora

PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def loras(tiny_pipeline: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("loras")
    return (
        write_diffusers_lora(tiny_pipeline, root / "style.safetensors", seed=1),
        write_kohya_lora(tiny_pipeline, root / "kohya.safetensors", seed=2),
    )


def reference(folder: Path, loras: list[tuple[Path, float]]):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    names = []
    for i, (file, _) in enumerate(loras):
        pipe.load_lora_weights(str(file), adapter_name=f"ref_{i}")
        names.append(f"ref_{i}")
    if names:
        pipe.set_adapters(names, adapter_weights=[scale for _, scale in loras])
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("which", ["diffusers", "kohya", "both"])
def test_fused_loras_match_diffusers(which: str, loras, tiny_pipeline: Path, tmp_path: Path) -> None:
    chosen = {"diffusers": [(loras[0], 0.8)], "kohya": [(loras[1], 1.0)], "both": [(loras[0], 0.5), (loras[1], 0.7)]}
    applied = chosen[which]
    manifest = convert(str(tiny_pipeline), tmp_path / "onnx", loras=applied, log=lambda line: None)
    assert manifest.loras == [{"file": f.name, "sha256": sha256_file(f), "scale": s} for f, s in applied]
    assert Manifest.load(tmp_path / "onnx").loras == manifest.loras and not (tmp_path / "onnx" / "_lora_fused").exists()
    ours = DiffusionPipeline.from_pretrained(tmp_path / "onnx", provider="cpu")
    settings = {"num_inference_steps": 4, "guidance_scale": 6.0, "output_type": "np"}
    expected = reference(tiny_pipeline, applied)(PROMPT, generator=torch.Generator().manual_seed(1), **settings).images
    got = ours(PROMPT, seed=1, **settings).images
    assert np.abs(got - expected).mean() <= 1 / 255
    plain = reference(tiny_pipeline, [])(PROMPT, generator=torch.Generator().manual_seed(1), **settings).images
    assert np.abs(plain - expected).mean() > 1 / 255  # the LoRA changes the picture


def test_lcm_lora_recipe_becomes_the_models_defaults(loras, tiny_pipeline: Path, tmp_path: Path) -> None:
    """`convert --lora LCM_LORA --scheduler lcm --steps 4 --guidance-scale 1`: a plain `sd-run prompt` then runs
    4 LCM steps without guidance, as diffusers does with LCMScheduler and the fused LoRA."""
    from click.testing import CliRunner
    from diffusers import LCMScheduler
    from PIL import Image

    from sd_onnx.exporter.cli import main as export_cli
    from sd_onnx.runtime.cli import main as run_cli

    args = ["convert", str(tiny_pipeline), str(tmp_path / "lcm"), "--lora", f"{loras[0]}:0.9", "--scheduler", "lcm",
            "--steps", "4", "--guidance-scale", "1"]  # fmt: skip
    result = CliRunner().invoke(export_cli, args)
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "lcm" / "scheduler" / "scheduler_config.json").read_text())
    assert config["_class_name"] == "LCMScheduler"
    result = CliRunner().invoke(run_cli, ["prompt", PROMPT, "-m", str(tmp_path / "lcm"), "--seed", "3",
                                          "-o", str(tmp_path / "x.png")])  # fmt: skip
    assert result.exit_code == 0, result.output
    made = Image.open(tmp_path / "x.png")
    assert "Steps: 4, Sampler: lcm, CFG scale: 1.0" in made.text["parameters"]
    pipe = reference(tiny_pipeline, [(loras[0], 0.9)])
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    expected = pipe(PROMPT, num_inference_steps=4, guidance_scale=1.0, generator=torch.Generator().manual_seed(3),
                    output_type="np").images[0]  # fmt: skip
    assert np.abs(np.asarray(made, np.float32) / 255 - expected).mean() <= 1 / 255


def test_lora_errors(tiny_pipeline: Path, tmp_path: Path) -> None:
    from sd_onnx.exporter.lora import parse_lora

    (tmp_path / "a.safetensors").write_bytes(b"")
    (tmp_path / "c:d.safetensors").write_bytes(b"")  # a colon in the name is not a scale
    assert parse_lora(f"{tmp_path}/a.safetensors:0.5") == (tmp_path / "a.safetensors", 0.5)
    assert parse_lora(f"{tmp_path}/a.safetensors") == (tmp_path / "a.safetensors", 1.0)
    assert parse_lora(f"{tmp_path}/c:d.safetensors") == (tmp_path / "c:d.safetensors", 1.0)
    with pytest.raises(ExportError, match="'abc' is not a scale"):
        parse_lora(f"{tmp_path}/a.safetensors:abc")
    with pytest.raises(ExportError, match="scale 11 is outside -10..10"):
        parse_lora(f"{tmp_path}/a.safetensors:11")
    with pytest.raises(ExportError, match="none.safetensors: no such file"):
        convert(str(tiny_pipeline), tmp_path / "a", loras=[(tmp_path / "none.safetensors", 1.0)], log=print)
    (tmp_path / "junk.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(ExportError, match="junk.safetensors: cannot apply it to this model"):
        convert(str(tiny_pipeline), tmp_path / "b", loras=[(tmp_path / "junk.safetensors", 1.0)], log=print)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
