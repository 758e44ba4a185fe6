"""Guidance interval (Kynkäänniemi et al., 2024): classifier-free guidance only at steps whose noise level sigma
lies in (lo, hi]; elsewhere the UNet runs on the conditional half alone. Checked against a PyTorch reference
loop over diffusers' own UNet, scheduler and VAE on the same weights and seed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sd_onnx.runtime import StableDiffusionPipeline

PROMPT, NEGATIVE, GUIDANCE, STEPS, SEED = "a red circle", "blurry", 7.5, 6, 4
DIFFUSERS_NAMES = {
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
}


@pytest.fixture(scope="module")
def reference_pipe(tiny_pipeline: Path):
    from diffusers import StableDiffusionPipeline as DiffusersPipeline

    return DiffusersPipeline.from_pretrained(tiny_pipeline, safety_checker=None, requires_safety_checker=False)


@pytest.fixture(scope="module")
def ours(tiny_export: Path) -> StableDiffusionPipeline:
    return StableDiffusionPipeline.from_pretrained(tiny_export, provider="cpu")


def step_sigmas(scheduler) -> np.ndarray:
    """sigma = sqrt((1 - alpha_bar) / alpha_bar) of the training schedule, at each step's timestep."""
    alphas = scheduler.alphas_cumprod.numpy().astype(np.float64)
    train = ((1 - alphas) / alphas) ** 0.5
    return np.interp(scheduler.timesteps.numpy().astype(np.float64), np.arange(len(train)), train)


@torch.no_grad()
def reference(pipe, scheduler_name: str, interval: tuple[float, float]) -> tuple[np.ndarray, list[bool]]:
    """The method as the paper states it, written out over diffusers' components."""
    import diffusers

    scheduler = getattr(diffusers, DIFFUSERS_NAMES[scheduler_name]).from_config(pipe.scheduler.config)
    cond, uncond = pipe.encode_prompt(PROMPT, "cpu", 1, True, NEGATIVE)
    generator = torch.Generator().manual_seed(SEED)
    size = pipe.unet.config.sample_size
    latents = torch.randn((1, pipe.unet.config.in_channels, size, size), generator=generator)
    scheduler.set_timesteps(STEPS)
    latents = latents * scheduler.init_noise_sigma
    guided = []
    for t, sigma in zip(scheduler.timesteps, step_sigmas(scheduler), strict=True):
        x = scheduler.scale_model_input(latents, t)
        if interval[0] < sigma <= interval[1]:
            noise = pipe.unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
            noise_uncond, noise_cond = noise.chunk(2)
            noise = noise_uncond + GUIDANCE * (noise_cond - noise_uncond)
        else:
            noise = pipe.unet(x, t, encoder_hidden_states=cond).sample
        guided.append(bool(interval[0] < sigma <= interval[1]))
        latents = scheduler.step(noise, t, latents, generator=generator).prev_sample
    image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy(), guided


def middle_interval(pipe, scheduler_name: str) -> tuple[float, float]:
    """An interval that leaves the first step and the last two unguided: (off, on, on, on, off, off)."""
    import diffusers

    scheduler = getattr(diffusers, DIFFUSERS_NAMES[scheduler_name]).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(STEPS)
    sigmas = step_sigmas(scheduler)
    return float((sigmas[3] + sigmas[4]) / 2), float((sigmas[0] + sigmas[1]) / 2)


class UnetBatches:
    """Records the batch of every UNet call of a pipeline."""

    def __init__(self, pipe: StableDiffusionPipeline, monkeypatch: pytest.MonkeyPatch) -> None:
        self.batches: list[int] = []
        component = pipe.component

        def recording(name: str):
            model = component(name)
            if name != "unet":
                return model
            recorder = self

            class Recorder:
                def __getattr__(self, attr: str):
                    return getattr(model, attr)

                def __call__(self, **feeds):
                    recorder.batches.append(len(feeds["sample"]))
                    return model(**feeds)

            return Recorder()

        monkeypatch.setattr(pipe, "component", recording)


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "dpmpp_2m"])
def test_matches_the_reference_and_skips_the_unconditional_half(reference_pipe, ours, scheduler, monkeypatch):
    interval = middle_interval(reference_pipe, scheduler)
    expected, guided = reference(reference_pipe, scheduler, interval)
    assert guided == [False, True, True, True, False, False]
    calls = UnetBatches(ours, monkeypatch)
    got = ours(PROMPT, negative_prompt=NEGATIVE, seed=SEED, scheduler=scheduler, guidance_scale=GUIDANCE,
               num_inference_steps=STEPS, guidance_interval=interval, output_type="np")  # fmt: skip
    assert calls.batches == [2 if g else 1 for g in guided]
    assert np.abs(got.images - expected).mean() <= 1 / 255
    everywhere = ours(PROMPT, negative_prompt=NEGATIVE, seed=SEED, scheduler=scheduler, guidance_scale=GUIDANCE,
                      num_inference_steps=STEPS, output_type="np")  # fmt: skip
    error = np.abs(got.images - expected).mean()
    assert np.abs(everywhere.images - expected).mean() > 10 * error  # the interval changed the picture
    assert got.parameters["Guidance interval"] == f"{interval[0]:g}-{interval[1]:g}"


def test_an_interval_covering_every_step_is_plain_guidance(ours) -> None:
    settings = {"negative_prompt": NEGATIVE, "seed": SEED, "num_inference_steps": STEPS, "output_type": "np"}
    plain = ours(PROMPT, **settings)
    covering = ours(PROMPT, guidance_interval=(0.0, float("inf")), **settings)
    np.testing.assert_array_equal(plain.images, covering.images)


@pytest.mark.parametrize(
    "interval, message",
    [
        ((1.0,), "guidance_interval: must be two numbers"),
        ((2.0, 1.0), "guidance_interval: needs 0 <= lo < hi"),
        ((-1.0, 1.0), "guidance_interval: needs 0 <= lo < hi"),
        ((float("nan"), 1.0), "guidance_interval: needs 0 <= lo < hi"),
        (("a", "b"), "guidance_interval: must be two numbers"),
    ],
)
def test_bad_intervals_are_value_errors(ours, interval, message) -> None:
    with pytest.raises(ValueError, match=message):
        ours(PROMPT, guidance_interval=interval, num_inference_steps=2)
