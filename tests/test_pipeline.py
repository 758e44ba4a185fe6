"""The runtime against diffusers' own StableDiffusionPipeline on the same weights, latents, seed and settings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sd_onnx.runtime import GenerationCancelled, StableDiffusionPipeline
from sd_onnx.runtime.schedulers import SCHEDULERS

PROMPT, NEGATIVE = "a photo of an astronaut riding a horse", "blurry, low quality"
DIFFUSERS_NAMES = {
    "pndm": "PNDMScheduler",
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "lcm": "LCMScheduler",
}


@pytest.fixture(scope="module")
def ours(tiny_export: Path) -> StableDiffusionPipeline:
    return StableDiffusionPipeline.from_pretrained(tiny_export, provider="cpu")


def diffusers_images(pipe, scheduler: str, **kwargs) -> np.ndarray:
    import diffusers

    original = pipe.scheduler
    pipe.scheduler = getattr(diffusers, DIFFUSERS_NAMES[scheduler]).from_config(original.config)
    try:
        return pipe(PROMPT, negative_prompt=NEGATIVE, output_type="np", **kwargs).images
    finally:
        pipe.scheduler = original


@pytest.mark.parametrize("scheduler", ["pndm", "ddim", "euler", "dpmpp_2m", "lcm"])
def test_same_latents_same_image_as_diffusers(reference_pipe, ours, scheduler: str) -> None:
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    settings = {"num_inference_steps": 6, "guidance_scale": 7.5}
    # The generator only feeds LCM's per-step noise here; the latents are given.
    generator = torch.Generator().manual_seed(8)
    expected = diffusers_images(reference_pipe, scheduler, latents=latents.clone(), generator=generator, **settings)
    got = ours(
        PROMPT,
        negative_prompt=NEGATIVE,
        latents=latents.numpy(),
        seed=8,
        scheduler=scheduler,
        output_type="np",
        **settings,
    )
    assert got.images.shape == expected.shape == (1, 32, 32, 3)
    assert np.abs(got.images - expected).mean() <= 1 / 255


@pytest.mark.parametrize("scheduler", ["pndm", "ddim", "euler", "euler_a", "dpmpp_2m", "lcm"])
def test_seed_alone_reproduces_diffusers_generator(reference_pipe, ours, scheduler: str) -> None:
    settings = {"num_inference_steps": 5, "guidance_scale": 6.0, "num_images_per_prompt": 2}
    expected = diffusers_images(reference_pipe, scheduler, generator=torch.Generator().manual_seed(1234), **settings)
    got = ours(PROMPT, negative_prompt=NEGATIVE, seed=1234, scheduler=scheduler, output_type="np", **settings)
    assert got.images.shape == expected.shape == (2, 32, 32, 3)
    assert np.abs(got.images - expected).mean() <= 1 / 255


def test_no_guidance_skips_unconditional_batch(reference_pipe, ours) -> None:
    expected = diffusers_images(
        reference_pipe, "euler", generator=torch.Generator().manual_seed(5), guidance_scale=1.0, num_inference_steps=4
    )
    got = ours(PROMPT, seed=5, scheduler="euler", guidance_scale=1.0, num_inference_steps=4, output_type="np")
    assert np.abs(got.images - expected).mean() <= 1 / 255


@pytest.mark.parametrize("scheduler", ["pndm", "euler", "dpmpp_2m"])
def test_img2img_matches_diffusers(tiny_pipeline: Path, ours, scheduler: str) -> None:
    import diffusers
    from diffusers import StableDiffusionImg2ImgPipeline
    from PIL import Image

    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(
        tiny_pipeline, safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = getattr(diffusers, DIFFUSERS_NAMES[scheduler]).from_config(pipe.scheduler.config)
    init = Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8))
    settings = {"num_inference_steps": 10, "strength": 0.6, "guidance_scale": 7.5}
    expected = pipe(PROMPT, image=init, generator=torch.Generator().manual_seed(9), output_type="np", **settings).images
    got = ours(PROMPT, image=init, seed=9, output_type="np", scheduler=scheduler, **settings)
    assert np.abs(got.images - expected).mean() <= 1 / 255


def test_callback_sees_every_step_and_can_cancel(ours) -> None:
    seen = []
    ours(
        PROMPT, seed=0, num_inference_steps=3, scheduler="euler", callback=lambda i, n, x: seen.append((i, n, x.shape))
    )
    assert seen == [(0, 3, (1, 4, 16, 16)), (1, 3, (1, 4, 16, 16)), (2, 3, (1, 4, 16, 16))]
    with pytest.raises(GenerationCancelled):
        ours(PROMPT, seed=0, num_inference_steps=3, callback=lambda i, n, x: i < 1)


def test_pil_output_and_parameters(ours) -> None:
    out = ours(PROMPT, seed=11, num_inference_steps=2, height=40, width=24)
    assert out.images[0].size == (24, 40) and out.images[0].mode == "RGB"
    assert out.parameters["Seed"] == 11 and out.parameters["Size"] == "24x40"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"height": 34}, "height: must be a positive multiple of 4 for this model"),
        ({"num_inference_steps": 0}, "num_inference_steps: must be >= 1"),
        ({"scheduler": "heun"}, "unknown scheduler 'heun'"),
        ({"prompt": 42}, "prompt: must be a string"),
        ({"guidance_scale": float("nan")}, "guidance_scale: must be a finite number"),
        ({"seed": 2**64}, r"seed: must be in \[0, 18446744073709551615\]"),
        ({"prompt": "a \ud800 cat"}, "prompt: is not valid Unicode text"),
        ({"image": Image.new("RGB", (8, 8)), "strength": 0.1}, r"strength: 0.1 x 2 steps leaves no denoising step"),
        ({"latents": np.zeros((1, 4, 8, 8), np.float32)}, "latents must have shape"),
        ({"output_type": "tensor"}, "output_type must be one of pil, np, latent"),
    ],
)
def test_bad_arguments_are_value_errors(ours, kwargs: dict, message: str) -> None:
    args = {"prompt": PROMPT, "num_inference_steps": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        ours(**args)


def test_all_schedulers_run_end_to_end(ours) -> None:
    for name in SCHEDULERS:
        out = ours(PROMPT, seed=1, num_inference_steps=4, scheduler=name, output_type="np")
        assert np.isfinite(out.images).all(), name
