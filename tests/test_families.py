"""Other SD-architecture families against diffusers on the same weights: SD 2.x (v-prediction, linear
projections, per-block head counts, a tokenizer that pads with "!"), LCM (a UNet distilled with a guidance
embedding) and Turbo-style one-step, guidance-free sampling."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sd_onnx.runtime import StableDiffusionPipeline

from .test_pipeline import DIFFUSERS_NAMES

PROMPT, NEGATIVE = "a photo of an astronaut riding a horse", "blurry"


def build(out: Path, recipe_changes: dict, scheduler, pad_token: str | None = None, pipeline_class: str | None = None):
    from transformers import CLIPTokenizer

    from sd_onnx.models.build import TINY, create_modules, save_pipeline
    from sd_onnx.models.clip_vocab import write_clip_tokenizer_files

    recipe = {part: {**TINY[part], **recipe_changes.get(part, {})} for part in TINY}
    tokenizer = None
    if pad_token:
        write_clip_tokenizer_files(out.parent / "tokenizer-src")
        tokenizer = CLIPTokenizer.from_pretrained(out.parent / "tokenizer-src", pad_token=pad_token)
    torch.manual_seed(0)
    save_pipeline(*create_modules(recipe), out, scheduler=scheduler, tokenizer=tokenizer)
    if pipeline_class:
        index = json.loads((out / "model_index.json").read_text())
        (out / "model_index.json").write_text(json.dumps({**index, "_class_name": pipeline_class}))
    return out


def export(source: Path, out: Path, **options) -> StableDiffusionPipeline:
    from sd_onnx.exporter.convert import convert

    convert(str(source), out, log=lambda line: None, **options)
    return StableDiffusionPipeline.from_pretrained(out, provider="cpu")


def reference(folder: Path, cls_name: str = "StableDiffusionPipeline"):
    import diffusers

    pipe = getattr(diffusers, cls_name).from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, StableDiffusionPipeline]:
    from diffusers import EulerDiscreteScheduler

    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type="v_prediction",
        timestep_spacing="leading", steps_offset=1,
    )  # fmt: skip
    changes = {"text_encoder": {"hidden_act": "gelu"},
               "unet": {"use_linear_projection": True, "attention_head_dim": (2, 4)}}  # fmt: skip
    root = tmp_path_factory.mktemp("sd2")
    source = build(root / "pipeline", changes, scheduler, pad_token="!")
    return source, export(source, root / "onnx")


@pytest.mark.parametrize("scheduler", ["euler", "euler_a", "dpmpp_2m", "ddim"])
def test_sd2_v_prediction_matches_diffusers(sd2, scheduler: str) -> None:
    import diffusers

    source, ours = sd2
    assert ours.config.prediction_type == "v_prediction"
    assert ours.tokenizer(["a cat"])[0, -1] == ours.tokenizer.pad_id == ours.tokenizer.tokenizer.token_to_id("!")
    pipe = reference(source)
    pipe.scheduler = getattr(diffusers, DIFFUSERS_NAMES[scheduler]).from_config(pipe.scheduler.config)
    settings = {"num_inference_steps": 6, "guidance_scale": 7.5}
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    generator = torch.Generator().manual_seed(8)  # Euler a's step noise; the latents are given
    expected = pipe(PROMPT, negative_prompt=NEGATIVE, latents=latents.clone(), generator=generator,
                    output_type="np", **settings).images  # fmt: skip
    got = ours(PROMPT, negative_prompt=NEGATIVE, latents=latents.numpy(), seed=8, scheduler=scheduler,
               output_type="np", **settings).images  # fmt: skip
    assert np.abs(got - expected).mean() <= 1 / 255
    seeded = pipe(PROMPT, generator=torch.Generator().manual_seed(21), output_type="np", **settings).images
    assert (
        np.abs(ours(PROMPT, seed=21, scheduler=scheduler, output_type="np", **settings).images - seeded).mean()
        <= 1 / 255
    )


@pytest.fixture(scope="module")
def lcm(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, StableDiffusionPipeline]:
    from diffusers import LCMScheduler

    scheduler = LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    root = tmp_path_factory.mktemp("lcm")
    source = build(root / "pipeline", {"unet": {"time_cond_proj_dim": 16}}, scheduler,
                   pipeline_class="LatentConsistencyModelPipeline")  # fmt: skip
    return source, export(source, root / "onnx")


def test_lcm_feeds_the_guidance_embedding_and_matches_diffusers(lcm) -> None:
    source, ours = lcm
    unet = ours.manifest.components["unet"]
    assert [t.name for t in unet.inputs][-1] == "timestep_cond" and unet.inputs[-1].shape == ["batch", 16]
    assert ours.config.default_steps == 4 and ours.config.guidance_scale == 8.5  # diffusers' LCM defaults
    pipe = reference(source, "LatentConsistencyModelPipeline")
    expected = pipe(PROMPT, generator=torch.Generator().manual_seed(4), output_type="np").images
    got = ours(PROMPT, seed=4, output_type="np")
    assert got.request.steps == 4 and np.abs(got.images - expected).mean() <= 1 / 255
    other = pipe(PROMPT, generator=torch.Generator().manual_seed(4), guidance_scale=3.0, num_inference_steps=2,
                 output_type="np").images  # fmt: skip
    got = ours(PROMPT, seed=4, guidance_scale=3.0, num_inference_steps=2, output_type="np").images
    assert np.abs(got - other).mean() <= 1 / 255
    assert np.abs(other - expected).mean() > 1 / 255  # the embedding and the steps matter


def test_turbo_style_one_step_without_guidance(tiny_pipeline: Path, tmp_path: Path) -> None:
    """SD-Turbo's recipe: Euler a on trailing timesteps, one step, guidance 0, recorded as the model's
    defaults so a plain call needs no settings."""
    from diffusers import EulerAncestralDiscreteScheduler

    scheduler = EulerAncestralDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                timestep_spacing="trailing")  # fmt: skip
    source = build(tmp_path / "pipeline", {}, scheduler)
    ours = export(source, tmp_path / "onnx", default_steps=1, guidance_scale=0.0)
    pipe = reference(source)
    expected = pipe(PROMPT, num_inference_steps=1, guidance_scale=0.0, generator=torch.Generator().manual_seed(6),
                    output_type="np").images  # fmt: skip
    got = ours(PROMPT, seed=6, output_type="np")
    assert got.request.steps == 1 and got.request.guidance_scale == 0.0
    assert np.abs(got.images - expected).mean() <= 1 / 255
