"""Each NumPy scheduler against diffusers' scheduler of the same config, step by step."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

from sd_onnx.runtime.schedulers import SCHEDULERS, make_scheduler, resolve_name

SD15_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "clip_sample": False,
}
DIFFUSERS_CLASS = {
    "pndm": "PNDMScheduler",
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "dpmpp_2m_karras": "DPMSolverMultistepScheduler",
    "lms": "LMSDiscreteScheduler",
    "lms_karras": "LMSDiscreteScheduler",
    "lcm": "LCMScheduler",
    "ddpm": "DDPMScheduler",
}
VARIANTS = [
    ("leading", {}),
    ("linspace", {"timestep_spacing": "linspace", "steps_offset": 0}),
    ("trailing-linear", {"timestep_spacing": "trailing", "beta_schedule": "linear", "skip_prk_steps": False}),
    ("zero-snr", {"timestep_spacing": "trailing", "rescale_betas_zero_snr": True}),
]
# Schedulers whose diffusers counterpart offers zero terminal SNR; it needs v-prediction (epsilon is undefined
# at the pure-noise timestep).
ZERO_SNR = ("ddim", "ddpm", "euler", "euler_a", "dpmpp_2m", "lcm")


class ListNoise:
    """Hands out pre-drawn noise, so ours and diffusers' schedulers see the same draws."""

    def __init__(self, draws: list[np.ndarray]) -> None:
        self.draws = iter(draws)

    def randn(self, shape: tuple[int, ...]) -> np.ndarray:
        out = next(self.draws)
        assert out.shape == tuple(shape)
        return out


def assert_close_relative(actual: np.ndarray, expected: np.ndarray, rtol: float = 1e-5) -> None:
    """Max abs difference within `rtol` of the array's magnitude (float32 rounding of the larger entries)."""
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * scale)


def fake_model(sample: np.ndarray, t: float) -> np.ndarray:
    """A smooth, timestep-dependent stand-in for the UNet."""
    return np.tanh(sample * 0.7 + np.float32(t) / 1000.0).astype(np.float32) * 0.9


def reference(name: str, config: dict) -> object:
    import diffusers

    cls = getattr(diffusers, DIFFUSERS_CLASS[name])
    extra = {"use_karras_sigmas": True} if name.endswith("karras") else {}
    return cls.from_config({**config, **extra})


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("variant", [v[0] for v in VARIANTS])
@pytest.mark.parametrize("steps", [4, 10, 25])
@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_matches_diffusers_step_by_step(name: str, steps: int, variant: str, prediction_type: str) -> None:
    config = {**SD15_CONFIG, **dict(VARIANTS)[variant], "prediction_type": prediction_type}
    if name == "lcm" and variant == "trailing-linear":
        pytest.skip("LCM has its own timestep rule; spacing does not apply")
    if variant == "zero-snr" and (name not in ZERO_SNR or prediction_type == "epsilon"):
        pytest.skip("zero terminal SNR: only with v-prediction, in the schedulers diffusers offers it in")
    ours, theirs = make_scheduler(name, config), reference(name, config)
    ours.set_timesteps(steps)
    theirs.set_timesteps(steps)
    np.testing.assert_allclose(ours.timesteps, theirs.timesteps.numpy(), rtol=1e-5)
    assert ours.init_noise_sigma == pytest.approx(float(theirs.init_noise_sigma), rel=1e-5)

    # Sigma samplers start at sigma 4096 on a zero-SNR schedule: diffusers' float32 sigmas differ from ours
    # (float64) by 1e-6, which Euler a's noise split amplifies to ~1e-4 of the sample.
    rtol = 2e-4 if variant == "zero-snr" and ours.uses_sigmas else 1e-5
    rng = np.random.default_rng(0)
    shape = (1, 4, 8, 8)
    x_ours = rng.standard_normal(shape).astype(np.float32) * np.float32(ours.init_noise_sigma)
    x_theirs = torch.from_numpy(x_ours.copy())
    generator = torch.Generator().manual_seed(0)
    for t_ours, t_theirs in zip(ours.timesteps, theirs.timesteps, strict=True):
        model_in = ours.scale_model_input(x_ours, t_ours)
        ref_in = theirs.scale_model_input(x_theirs, t_theirs)
        assert_close_relative(model_in, ref_in.numpy(), rtol)
        eps = fake_model(ref_in.numpy(), float(t_theirs))
        # diffusers draws its step noise from `generator`; replay the same draws for ours.
        state = generator.get_state()
        draws = [torch.randn(shape, generator=generator).numpy() for _ in range(2)]
        generator.set_state(state)
        kwargs = {"generator": generator} if "generator" in inspect.signature(theirs.step).parameters else {}
        x_theirs = theirs.step(torch.from_numpy(eps), t_theirs, x_theirs, **kwargs).prev_sample
        x_ours = ours.step(eps, t_ours, x_ours, noise=ListNoise(draws))
        assert_close_relative(x_ours, x_theirs.numpy(), rtol)


@pytest.mark.parametrize(
    ("alias", "key"),
    [
        ("DPM++ 2M Karras", "dpmpp_2m_karras"),
        ("Euler a", "euler_a"),
        ("EulerDiscreteScheduler", "euler"),
        ("pndm", "pndm"),
        ("dpm++ 2m", "dpmpp_2m"),
    ],
)
def test_accepts_diffusers_and_a1111_names(alias: str, key: str) -> None:
    assert resolve_name(alias) == key


def test_zero_terminal_snr_reaches_pure_noise() -> None:
    config = {**SD15_CONFIG, "rescale_betas_zero_snr": True, "prediction_type": "v_prediction"}
    assert make_scheduler("ddim", config).alphas_cumprod[-1] == 0.0
    with pytest.raises(ValueError, match="dpmpp_2m_karras: Karras sigmas are numerically unstable"):
        make_scheduler("DPM++ 2M Karras", config)


@pytest.mark.parametrize("name", ["pndm", "lms", "LMS Karras"])
def test_samplers_that_cannot_follow_zero_snr_refuse_with_the_reason(name: str) -> None:
    """One rule for every sampler: diffusers' PNDM and LMS have no zero-SNR option; running them would
    silently use another noise schedule than the model was trained on."""
    config = {**SD15_CONFIG, "rescale_betas_zero_snr": True, "prediction_type": "v_prediction"}
    with pytest.raises(ValueError, match=r"cannot follow this model's zero-terminal-SNR .* samplers that can: ddim"):
        make_scheduler(name, config)


def test_unknown_scheduler_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown scheduler 'heun'"):
        make_scheduler("heun", SD15_CONFIG)
