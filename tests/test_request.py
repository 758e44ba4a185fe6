"""GenerationRequest: defaults from the model, every field checked once, errors naming the field."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from PIL import Image

from sd_onnx.runtime.manifest import ModelConfig
from sd_onnx.runtime.request import DEFAULT_STEPS, GenerationRequest, Limits, RequestError

CONFIG = ModelConfig(
    embedding_dim=32, latent_channels=4, vae_scale_factor=4, scaling_factor=0.5, sample_size=16,
    max_token_length=77, guidance_scale=2.0, size_multiple=16,
)  # fmt: skip
ZERO_SNR = {"_class_name": "DDIMScheduler", "rescale_betas_zero_snr": True, "prediction_type": "v_prediction",
            "timestep_spacing": "trailing"}  # fmt: skip
LIMITS = Limits(max_steps=30, max_pixels=128 * 128, max_batch=4, max_prompt_chars=100)
IMAGE = Image.new("RGB", (8, 8))


def resolve(limits: Limits = LIMITS, **fields: object) -> GenerationRequest:
    return GenerationRequest(**{"prompt": "a red circle", **fields}).resolve(CONFIG, ZERO_SNR, "ddim", limits)


def test_defaults_come_from_the_model_and_one_constant() -> None:
    request = resolve()
    assert request.steps == DEFAULT_STEPS and request.guidance_scale == 2.0
    assert (request.width, request.height) == (64, 64) and request.scheduler == "ddim"
    assert 0 <= request.seed < 2**32 and request.strength is None
    assert resolve(limits=Limits(max_steps=5)).steps == 5  # the default never exceeds the limit
    assert request.resolve(CONFIG, ZERO_SNR, "ddim", LIMITS) == request  # idempotent: the seed stays


def test_random_seed_is_drawn_and_recorded() -> None:
    seeds = {resolve(seed=-1).seed for _ in range(5)}
    assert len(seeds) > 1
    assert resolve(seed=2**64 - 1).seed == 2**64 - 1 and resolve(seed=0).seed == 0


@pytest.mark.parametrize(
    ("fields", "field", "message"),
    [
        ({"steps": 0}, "steps", "must be >= 1"),
        ({"steps": 31}, "steps", "exceeds the limit max_steps=30"),
        ({"steps": 2.5}, "steps", "must be an integer"),
        ({"steps": math.nan}, "steps", "must be an integer"),
        ({"steps": True}, "steps", "must be an integer"),
        ({"guidance_scale": math.nan}, "guidance_scale", "must be a finite number"),
        ({"guidance_scale": math.inf}, "guidance_scale", "must be a finite number"),
        ({"guidance_scale": -1.0}, "guidance_scale", "must be >= 0"),
        ({"width": 72}, "width", "must be a positive multiple of 16 for this model"),
        ({"height": 0}, "height", "must be a positive multiple of 16"),
        ({"width": 256, "height": 256}, "width", "256x256 exceeds the limit max_pixels=16384"),
        ({"seed": -2}, "seed", "must be in [0, 18446744073709551615] or -1"),
        ({"seed": 2**64}, "seed", "must be in [0, 18446744073709551615]"),
        ({"seed": math.nan}, "seed", "must be an integer"),
        ({"batch": 0}, "batch", "must be >= 1"),
        ({"batch": 5}, "batch", "5 images exceeds the limit max_batch=4"),
        ({"prompt": ("a", "b", "c"), "batch": 2}, "batch", "6 images exceeds the limit max_batch=4"),
        ({"prompt": "bad \ud800 text"}, "prompt", "is not valid Unicode text"),
        ({"prompt": 5}, "prompt", "must be a string or a non-empty list of strings"),
        ({"prompt": ()}, "prompt", "must be a string or a non-empty list of strings"),
        ({"negative_prompt": "\udcff"}, "negative_prompt", "is not valid Unicode text"),
        ({"prompt": ("a", "b"), "negative_prompt": ("x",)}, "negative_prompt", "has 1 entries for 2 prompts"),
        ({"scheduler": "heun"}, "scheduler", "unknown scheduler 'heun'"),
        ({"scheduler": "LMS Karras"}, "scheduler", "cannot follow this model's zero-terminal-SNR"),
        ({"scheduler": "DPM++ 2M Karras"}, "scheduler", "Karras sigmas are numerically unstable"),
        ({"scheduler": 3}, "scheduler", "must be a string"),
        ({"eta": math.nan}, "eta", "must be a finite number"),
        ({"eta": 2.0}, "eta", "must be <= 1, got 2"),
        ({"guidance_scale": 1e39}, "guidance_scale", "must be <= 100, got 1e+39"),
        ({"prompt": "x" * 101}, "prompt", "101 characters exceeds the limit max_prompt_chars=100"),
        ({"negative_prompt": ("x" * 101,)}, "negative_prompt", "exceeds the limit max_prompt_chars=100"),
        ({"strength": 0.5}, "strength", "applies to img2img only: give an init image too"),
        (
            {"image": "init.png"},
            "image",
            "must be a PIL image, a (1, 3, H, W) pixel array or an (N, 4, h, w) latent array, got str",
        ),
        ({"image": np.zeros((8, 8, 3), np.uint8)}, "image", "got ndarray of shape [8, 8, 3]"),
        ({"image": [IMAGE, IMAGE]}, "image", "takes one image (a list is references, for families that edit"),
        ({"image": IMAGE, "strength": 0.0}, "strength", "must be in (0, 1]"),
        ({"image": IMAGE, "strength": math.nan}, "strength", "must be a finite number"),
        ({"image": IMAGE, "steps": 4, "strength": 0.2}, "strength", "0.2 x 4 steps leaves no denoising step"),
    ],
)
def test_each_bad_field_is_a_request_error_naming_it(fields: dict, field: str, message: str) -> None:
    with pytest.raises(RequestError) as caught:
        resolve(**fields)
    assert caught.value.field == field and message in caught.value.reason
    assert isinstance(caught.value, ValueError) and "\n" not in str(caught.value)


def test_img2img_strength_default_and_parameters() -> None:
    request = resolve(image=IMAGE, seed=7, steps=10)
    assert request.strength == 0.75
    params = request.parameters("shapes")
    assert params == {"Steps": 10, "Sampler": "ddim", "CFG scale": 2.0, "Seed": 7, "Size": "64x64",
                      "Model": "shapes", "Denoising strength": 0.75}  # fmt: skip
    with pytest.raises(ValueError, match="resolved"):
        GenerationRequest("x").parameters("m")


def test_default_pixel_limit_is_four_times_the_models_native_image() -> None:
    assert Limits().pixels(CONFIG) == 4 * 64 * 64 and Limits(max_pixels=100).pixels(CONFIG) == 100
    assert resolve(limits=Limits(), width=128, height=128).width == 128
    with pytest.raises(RequestError, match="128x144 exceeds the limit max_pixels=16384"):
        resolve(limits=Limits(), width=128, height=144)


def test_more_steps_than_the_model_was_trained_on_are_refused() -> None:
    """Beyond num_train_timesteps the samplers divide by zero or allocate gigabytes of timesteps."""
    with pytest.raises(RequestError, match="must be <= 1000, the timesteps the model was trained on, got 1001"):
        resolve(limits=Limits(max_steps=10**9), steps=1001)


def test_steps_whose_timesteps_leave_the_schedule_are_refused() -> None:
    """SD 1.5's PNDM config (leading spacing, offset 1) at 1000 steps would ask for timestep 1000 of 0..999."""
    sd15 = {"_class_name": "PNDMScheduler", "steps_offset": 1, "skip_prk_steps": True}
    request = GenerationRequest("x", steps=1000)
    with pytest.raises(RequestError, match="1000 steps reach past the model's 1000 timesteps with pndm"):
        request.resolve(CONFIG, sd15, "pndm", Limits(max_steps=10**9))
    assert GenerationRequest("x", steps=500).resolve(CONFIG, sd15, "pndm", Limits(max_steps=10**9)).steps == 500


def test_sdxl_fields_are_checked() -> None:
    sdxl = ModelConfig(**{**CONFIG.__dict__, "pooled_dim": 32, "time_ids_count": 6})
    resolved = GenerationRequest("x", original_size=[64, 96], aesthetic_score=6).resolve(sdxl, ZERO_SNR, "ddim", LIMITS)
    assert resolved.original_size == (64, 96) and resolved.aesthetic_score == 6.0
    for fields, message in (
        ({"original_size": (0, 64)}, "original_size: must be integers in 1..65536"),
        ({"crops_coords_top_left": (1,)}, "crops_coords_top_left: must be a (height, width) pair"),
        ({"aesthetic_score": math.nan}, "aesthetic_score: must be a finite number"),
        ({"prompt_2": ("a", "b", "c")}, "prompt_2: has 3 entries"),
    ):
        with pytest.raises(RequestError, match=re.escape(message)):
            GenerationRequest("x", **fields).resolve(sdxl, ZERO_SNR, "ddim", LIMITS)
