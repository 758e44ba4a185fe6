"""Tiled VAE against diffusers' `enable_tiling()` on the same weights: decode and encode of inputs several tiles
wide, whole generations with `vae_tiling=True`, and how far tiles move the pixels from an untiled decode."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from sd_onnx.runtime import StableDiffusionPipeline
from sd_onnx.runtime.request import GenerationRequest
from sd_onnx.runtime.vae_tiling import Tiling


@pytest.fixture(scope="module")
def vae(tiny_pipeline: Path):
    from diffusers import AutoencoderKL

    model = AutoencoderKL.from_pretrained(tiny_pipeline / "vae").eval()
    model.enable_tiling()
    return model


@pytest.fixture(scope="module")
def ours(tiny_export: Path) -> StableDiffusionPipeline:
    return StableDiffusionPipeline.from_pretrained(tiny_export, provider="cpu")


def test_tile_sizes_come_from_the_vae_config(tiny_export: Path, vae) -> None:
    tiling = Tiling.from_vae_config(json.loads((tiny_export / "vae_decoder" / "config.json").read_text()))
    assert (tiling.sample, tiling.latent) == (vae.tile_sample_min_size, vae.tile_latent_min_size)


@pytest.mark.parametrize("shape", [(1, 4, 40, 40), (2, 4, 16, 44), (1, 4, 16, 16)])
def test_tiled_decode_matches_diffusers(ours, vae, shape) -> None:
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = vae.decode(latents).sample.numpy()
    decoder = ours.component("vae_decoder")
    got = ours.tiling.decode(lambda tile: decoder(latent_sample=tile)[0], latents.numpy())
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_tiled_encode_matches_diffusers(ours, vae) -> None:
    pixels = torch.rand((1, 3, 80, 72), generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        expected = vae._encode(pixels).numpy()  # the moments, before the posterior is sampled
    encoder = ours.component("vae_encoder")
    got = ours.tiling.encode(lambda tile: encoder(sample=tile)[0], pixels.numpy())
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-4)


@pytest.fixture(scope="module")
def reference_pipe(tiny_pipeline: Path):
    from diffusers import StableDiffusionPipeline as DiffusersPipeline

    pipe = DiffusersPipeline.from_pretrained(tiny_pipeline, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.vae.enable_tiling()
    return pipe


SETTINGS = {"num_inference_steps": 4, "guidance_scale": 7.5, "width": 64, "height": 96, "output_type": "np"}


def test_tiled_generation_matches_diffusers_with_tiling(reference_pipe, ours) -> None:
    expected = reference_pipe("a red circle", generator=torch.Generator().manual_seed(6), **SETTINGS).images
    got = ours("a red circle", seed=6, vae_tiling=True, **SETTINGS)
    assert got.images.shape == expected.shape == (1, 96, 64, 3)
    assert np.abs(got.images - expected).mean() <= 1 / 255
    untiled = ours("a red circle", seed=6, vae_tiling=False, **SETTINGS)
    assert np.abs(untiled.images - got.images).max() > 0  # tiles do change pixels a little: the check bites


def test_tiled_img2img_matches_diffusers_with_tiling(tiny_pipeline: Path, ours) -> None:
    from diffusers import StableDiffusionImg2ImgPipeline
    from PIL import Image

    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(
        tiny_pipeline, safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.vae.enable_tiling()
    init = Image.fromarray((np.random.default_rng(0).random((80, 72, 3)) * 255).astype(np.uint8))
    settings = {"num_inference_steps": 6, "strength": 0.6, "guidance_scale": 7.5, "output_type": "np"}
    expected = pipe("a cat", image=init, generator=torch.Generator().manual_seed(2), **settings).images
    got = ours("a cat", image=init, seed=2, vae_tiling=True, width=72, height=80, **settings)
    assert got.images.shape == expected.shape == (1, 80, 72, 3)
    assert np.abs(got.images - expected).mean() <= 1 / 255


def test_low_memory_tiles_above_one_tile_only(tiny_export: Path, ours) -> None:
    low = StableDiffusionPipeline.from_pretrained(tiny_export, provider="cpu", low_memory=True)
    big, small = ours.prepare(GenerationRequest("x", width=64, height=64)), ours.prepare(GenerationRequest("x"))
    assert low.uses_tiling(big) and not low.uses_tiling(small) and not ours.uses_tiling(big)
    assert not low.uses_tiling(replace(big, vae_tiling=False)) and ours.uses_tiling(replace(small, vae_tiling=True))
    settings = {**SETTINGS, "height": 64}
    tiled = ours("x", seed=1, vae_tiling=True, **settings).images
    np.testing.assert_array_equal(low("x", seed=1, **settings).images, tiled)


@pytest.mark.parametrize("value, message", [("yes", "vae_tiling: must be true or false"), (1, "must be true or false")])
def test_bad_vae_tiling_is_a_value_error(ours, value, message) -> None:
    with pytest.raises(ValueError, match=message):
        ours("x", vae_tiling=value, num_inference_steps=1)
