"""LoRAs on SD3 and FLUX.1, as diffusers/PEFT trainers save them (`transformer.<module>.lora_A.weight`): applied
at load time without PyTorch and fused at export, both in parity with diffusers' `load_lora_weights` on the
same weights, seed and settings; kohya files named after the original checkpoint are refused at load time."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sd_onnx.runtime import DiffusionPipeline, RequestError

from .test_transformer_families import PROMPT, TOLERANCE, diffusers_images, mean_abs, reference

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
CASES = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}


def write_transformer_lora(pipeline_folder: Path, cls_name: str, out: Path, seed: int = 0, rank: int = 4) -> Path:
    """A random (non-zero) PEFT LoRA of the transformer's attention projections, saved by the pipeline class."""
    import diffusers
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    pipe = getattr(diffusers, cls_name).from_pretrained(pipeline_folder)
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False, target_modules=TARGETS)
    model = inject_adapter_in_model(config, pipe.transformer)
    state = {k: v * 4 for k, v in get_peft_model_state_dict(model).items()}  # large enough to change the image
    getattr(diffusers, cls_name).save_lora_weights(out.parent, transformer_lora_layers=state, weight_name=out.name)
    return out


@pytest.fixture(scope="module", params=list(CASES))
def family(request, tmp_path_factory: pytest.TempPathFactory):
    """(diffusers folder, export, LoRA file, diffusers pipeline with the LoRA loaded, its class name)."""
    name = request.param
    source = request.getfixturevalue(f"tiny_{name}_pipeline")
    export = request.getfixturevalue(f"tiny_{name}_export")
    lora = write_transformer_lora(source, CASES[name], tmp_path_factory.mktemp(f"{name}-lora") / "lora.safetensors")
    theirs = reference(source, CASES[name])
    theirs.load_lora_weights(str(lora))
    return source, export, lora, theirs


def settings(export: Path) -> dict:
    return {"num_inference_steps": 2, "guidance_scale": 3.0} if "sd3" in export.name else {"num_inference_steps": 2}


def test_load_time_lora_matches_diffusers(family) -> None:
    _, export, lora, theirs = family
    assert (export / "transformer" / "lora_targets.json").is_file()
    ours = DiffusionPipeline.from_pretrained(export, provider="cpu", loras=[lora])
    plain = DiffusionPipeline.from_pretrained(export, provider="cpu")
    got = ours(PROMPT, seed=2, output_type="np", **settings(export)).images
    want = diffusers_images(theirs, 2, prompt=PROMPT, **settings(export))
    assert mean_abs(got, want) <= TOLERANCE
    without = plain(PROMPT, seed=2, output_type="np", **settings(export)).images
    assert mean_abs(got, without) > 4 * TOLERANCE  # the LoRA changed the picture


def test_export_time_fusion_matches_diffusers(tiny_flux_pipeline: Path, tmp_path: Path) -> None:
    """Fused by diffusers before export (FLUX; SD3 takes the same path: the fusion is diffusers' own)."""
    from sd_onnx.exporter.convert import convert

    lora = write_transformer_lora(tiny_flux_pipeline, "FluxPipeline", tmp_path / "lora.safetensors")
    theirs = reference(tiny_flux_pipeline, "FluxPipeline")
    theirs.load_lora_weights(str(lora))
    convert(str(tiny_flux_pipeline), tmp_path / "fused", loras=[(lora, 1.0)], log=lambda line: None)
    ours = DiffusionPipeline.from_pretrained(tmp_path / "fused", provider="cpu")
    got = ours(PROMPT, seed=2, output_type="np", num_inference_steps=2).images
    want = diffusers_images(theirs, 2, prompt=PROMPT, num_inference_steps=2)
    assert mean_abs(got, want) <= TOLERANCE


def test_kohya_dit_lora_is_refused_at_load_time(family, tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    _, export, _, _ = family
    kohya = tmp_path / "kohya.safetensors"
    down, up = np.ones((4, 8), np.float32), np.ones((8, 4), np.float32)
    save_file({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": down,
               "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": up}, str(kohya))  # fmt: skip
    with pytest.raises(RequestError, match="fuse it with sd-export convert --lora"):
        DiffusionPipeline.from_pretrained(export, provider="cpu", loras=[kohya])
