"""Inpainting against diffusers' StableDiffusionInpaintPipeline on the same weights and seed: an inpainting UNet
(9 input channels) and an ordinary one (the original re-noised outside the mask after each step)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sd_onnx.runtime import DiffusionPipeline
from sd_onnx.runtime.image import from_pil

from .test_pipeline import DIFFUSERS_NAMES

PROMPT = "a red circle on a blue background"


def picture(seed: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode == "L":  # a mask: a white rectangle (repaint) on black, with soft grey edges to binarize
        mask = np.zeros((32, 32), np.float32)
        mask[8:24, 4:20] = 1.0
        mask[8:24, 20] = 0.6
        mask[7, 4:20] = 0.4
        return Image.fromarray((mask * 255).astype(np.uint8), "L")
    return Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8))


def reference(folder: Path, scheduler: str):
    import diffusers

    pipe = diffusers.StableDiffusionInpaintPipeline.from_pretrained(
        folder, safety_checker=None, requires_safety_checker=False
    )
    pipe.scheduler = getattr(diffusers, DIFFUSERS_NAMES[scheduler]).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("unet", ["tiny_inpaint", "tiny_pipeline"])
@pytest.mark.parametrize("scheduler", ["euler", "ddim", "dpmpp_2m"])
def test_inpainting_matches_diffusers(unet: str, scheduler: str, request: pytest.FixtureRequest) -> None:
    if unet == "tiny_inpaint":
        source, folder = request.getfixturevalue("tiny_inpaint")
    else:
        source, folder = request.getfixturevalue("tiny_pipeline"), request.getfixturevalue("tiny_export")
    pipe, ours = reference(source, scheduler), DiffusionPipeline.from_pretrained(folder, provider="cpu")
    assert ours.config.inpainting == (unet == "tiny_inpaint")
    image, mask = picture(0), picture(0, "L")
    for extra in ({}, {"strength": 0.6, "negative_prompt": "blurry", "num_images_per_prompt": 2}):
        settings = {"image": image, "mask_image": mask, "num_inference_steps": 6, "guidance_scale": 6.0, **extra}
        expected = pipe(PROMPT, generator=torch.Generator().manual_seed(5), output_type="np", **settings).images
        got = ours(PROMPT, seed=5, scheduler=scheduler, output_type="np", **settings).images
        assert got.shape == expected.shape and np.abs(got - expected).mean() <= 1 / 255, extra
    if unet == "tiny_pipeline":  # outside the mask the original comes back (through the VAE), inside it does not
        kept, repainted = np.asarray(mask) < 128, np.asarray(mask) >= 128
        plain = ours.decode_latents(ours.encode_image(from_pil(image, 32, 32), _zero_noise()))[0]
        assert np.abs(got[0] - plain)[kept].mean() < np.abs(got[0] - plain)[repainted].mean()


def _zero_noise():
    class Zero:
        def randn(self, shape):
            return np.zeros(shape, np.float32)

    return Zero()


def test_inpainting_requests_are_checked(tiny_inpaint: tuple[Path, Path], tiny_export: Path) -> None:
    inpaint = DiffusionPipeline.from_pretrained(tiny_inpaint[1], provider="cpu")
    plain = DiffusionPipeline.from_pretrained(tiny_export, provider="cpu")
    with pytest.raises(ValueError, match="image: this is an inpainting model: give an image and a mask_image"):
        inpaint(PROMPT, num_inference_steps=1)
    with pytest.raises(ValueError, match="mask_image: this is an inpainting model: give a mask_image"):
        inpaint(PROMPT, image=picture(0), num_inference_steps=1)
    with pytest.raises(ValueError, match="mask_image: masks an init image: give the image to inpaint too"):
        plain(PROMPT, mask_image=picture(0, "L"), num_inference_steps=1)
    with pytest.raises(ValueError, match=r"mask_image: must be a PIL image or a \(1, 1, H, W\) array"):
        plain(PROMPT, image=picture(0), mask_image=np.ones((32, 32)), num_inference_steps=1)
    with pytest.raises(ValueError, match="mask_image: values must be finite and in"):
        plain(PROMPT, image=picture(0), mask_image=np.full((1, 1, 32, 32), np.nan), num_inference_steps=1)
    with pytest.raises(ValueError, match="mask_image: is 16x16, not the output's 32x32"):
        plain(PROMPT, image=picture(0), mask_image=np.ones((1, 1, 16, 16)), num_inference_steps=1)
    out = plain(PROMPT, image=picture(0), mask_image=picture(0, "L"), num_inference_steps=2, seed=1)
    assert out.request.strength == 1.0 and out.parameters["Inpaint"] == "mask"
