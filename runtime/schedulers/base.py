"""What every NumPy scheduler shares: configuration as data, noise schedules, timestep spacing, sigmas.

Each algorithm lives in its own module and mirrors the diffusers scheduler of the same name, so that a
`scheduler_config.json` written by diffusers configures it the same way (keys the algorithm does not know
are ignored, missing keys take diffusers' defaults for that class).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Protocol

import numpy as np

from ..echo import echo

COMMON_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "steps_offset": 0,
}
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


class NoiseSource(Protocol):
    """Anything that draws standard normal arrays (the runtime's torch-compatible generator does)."""

    def randn(self, shape: tuple[int, ...]) -> np.ndarray: ...


class Scheduler:
    """Shared interface: `set_timesteps`, `scale_model_input`, `step`, `init_noise_sigma`, `add_noise`."""

    name: ClassVar[str]
    defaults: ClassVar[dict[str, Any]] = {}
    order: ClassVar[int] = 1
    # Samplers in sigma space need a finite first sigma on a zero-terminal-SNR schedule.
    uses_sigmas: ClassVar[bool] = False
    # The kind of model it samples: "ddpm" (a beta schedule), "flow" (rectified flow), "trigflow" (sCM).
    family: ClassVar[str] = "ddpm"

    def __init__(self, **config: Any) -> None:
        self.config = {**COMMON_DEFAULTS, **self.defaults}
        self.config.update({k: v for k, v in config.items() if k in self.config})
        if self.config["prediction_type"] not in PREDICTION_TYPES:
            raise ValueError(
                f"unknown prediction_type {echo(self.config['prediction_type'])} (known: {PREDICTION_TYPES})"
            )
        zero_snr = bool(self.config.get("rescale_betas_zero_snr"))
        if zero_snr and self.config.get("use_karras_sigmas"):
            raise ValueError("Karras sigmas are not supported on a zero-terminal-SNR schedule (rescale_betas_zero_snr)")
        self.betas = make_betas(self.config)
        if zero_snr:
            self.betas = rescale_zero_terminal_snr(self.betas)
        self.alphas_cumprod = np.cumprod(1.0 - self.betas, dtype=np.float32)
        if zero_snr and self.uses_sigmas:
            self.alphas_cumprod[-1] = 2.0**-24  # close to 0 but not 0, as diffusers does
        self.timesteps = np.zeros(0, dtype=np.float32)
        self.num_inference_steps = 0
        self.step_index = 0  # position in `timesteps`; `step` advances it, img2img starts it part-way

    def set_begin_index(self, index: int) -> None:
        """Start from `timesteps[index]` (img2img skips the noisiest steps)."""
        self.step_index = index

    @property
    def init_noise_sigma(self) -> float:
        return 1.0

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Integer timesteps by the config's spacing (the DDIM family); sigma samplers override this."""
        self.num_inference_steps = num_inference_steps
        self.timesteps = spaced_timesteps(self.config, num_inference_steps).round().astype(np.int64)
        self.step_index = 0

    @property
    def final_alpha_cumprod(self) -> float:
        """alpha_cumprod "before" the first training step, used by the last denoising step."""
        return 1.0 if self.config.get("set_alpha_to_one") else float(self.alphas_cumprod[0])

    def clip_x0(self, x0: np.ndarray) -> np.ndarray:
        """Clamp the denoised estimate when the config asks for it (`clip_sample`)."""
        if not self.config.get("clip_sample"):
            return x0
        limit = self.config["clip_sample_range"]
        return np.clip(x0, -limit, limit)

    def scale_model_input(self, sample: np.ndarray, timestep: float) -> np.ndarray:
        return sample

    def sigma_at(self, timesteps: np.ndarray) -> np.ndarray:
        """The training schedule's noise level sqrt((1 - alpha_bar) / alpha_bar) at each of `timesteps`,
        interpolated linearly between integer timesteps (infinite at a zero-terminal-SNR end); what guidance
        intervals use."""
        with np.errstate(divide="ignore"):
            sigmas = train_sigmas(self.alphas_cumprod)
        return np.interp(np.asarray(timesteps, np.float64), np.arange(len(sigmas)), sigmas)

    def step(
        self, model_output: np.ndarray, timestep: float, sample: np.ndarray, noise: NoiseSource | None = None
    ) -> np.ndarray:
        raise NotImplementedError

    def add_noise(self, original: np.ndarray, noise: np.ndarray, timestep: float) -> np.ndarray:
        """Forward diffusion to `timestep` (img2img): sqrt(a) x0 + sqrt(1 - a) noise."""
        alpha = self.alphas_cumprod[int(timestep)]
        return (np.sqrt(alpha) * original + np.sqrt(1 - alpha) * noise).astype(np.float32)

    def _require_noise(self, noise: NoiseSource | None) -> NoiseSource:
        if noise is None:
            raise ValueError(f"{self.name} draws fresh noise at each step: pass a noise source (generator)")
        return noise


def make_betas(config: dict[str, Any]) -> np.ndarray:
    """The training noise schedule, in float32 as diffusers keeps it."""
    n = config["num_train_timesteps"]
    if config.get("trained_betas") is not None:
        return np.asarray(config["trained_betas"], dtype=np.float32)
    schedule = config["beta_schedule"]
    if schedule == "linear":
        return np.linspace(config["beta_start"], config["beta_end"], n, dtype=np.float32)
    if schedule == "scaled_linear":
        return np.linspace(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5, n, dtype=np.float32) ** 2
    if schedule == "squaredcos_cap_v2":

        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)]
        return np.asarray(betas, dtype=np.float32)
    raise ValueError(f"unknown beta_schedule {echo(schedule)}")


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Betas whose last timestep is pure noise (Lin et al. 2023, algorithm 1), as diffusers rescales them:
    sqrt(alpha_cumprod) shifted to end at 0 and scaled to keep its first value. Offered by the schedulers whose
    diffusers counterpart offers it (`rescale_betas_zero_snr` in their defaults); needs v-prediction."""
    root = np.sqrt(np.cumprod(1.0 - betas, dtype=np.float32))
    first, last = root[0], root[-1]
    root = (root - last) * (first / (first - last))
    alphas_bar = root**2
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return (1 - alphas).astype(np.float32)


def spaced_timesteps(config: dict[str, Any], num_steps: int, solver_spacing: bool = False) -> np.ndarray:
    """Descending timesteps by the config's spacing ("linspace", "leading", "trailing"), as float64.

    `solver_spacing`: DPM-Solver's variant, which spaces num_steps + 1 points and drops the last (rounded)."""
    n_train = config["num_train_timesteps"]
    spacing = config["timestep_spacing"]
    points = num_steps + 1 if solver_spacing else num_steps
    if spacing == "linspace":
        steps = np.linspace(0, n_train - 1, points)
        steps = steps.round() if solver_spacing else steps
    elif spacing == "leading":
        steps = (np.arange(0, points) * (n_train // points)).round().astype(np.float64) + config["steps_offset"]
    elif spacing == "trailing":
        return np.arange(n_train, 0, -n_train / num_steps).round() - 1
    else:
        raise ValueError(f"unknown timestep_spacing {echo(spacing)} (known: linspace, leading, trailing)")
    steps = steps[::-1]
    return (steps[:-1] if solver_spacing else steps).copy()


def train_sigmas(alphas_cumprod: np.ndarray) -> np.ndarray:
    """k-diffusion sigmas of the training schedule: sqrt((1 - a) / a)."""
    return ((1 - alphas_cumprod) / alphas_cumprod).astype(np.float64) ** 0.5


def karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) schedule: evenly spaced in sigma^(1/rho)."""
    ramp = np.linspace(0, 1, num_steps)
    min_inv, max_inv = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv + ramp * (min_inv - max_inv)) ** rho


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep of each sigma, interpolating linearly in log-sigma."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma - log_sigmas[:, None]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high = low + 1
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[high]), 0, 1)
    return (1 - w) * low + w * high


def predict_x0_from_sigma(model_output: np.ndarray, sample: np.ndarray, sigma: float, prediction_type: str):
    """Denoised estimate for k-diffusion style (sigma-parameterised) samplers."""
    if prediction_type == "epsilon":
        return sample - sigma * model_output
    if prediction_type == "v_prediction":
        return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)
    return model_output


def predict_x0_and_eps(model_output: np.ndarray, sample: np.ndarray, alpha_prod: float, prediction_type: str):
    """(x0, epsilon) estimates for alpha-parameterised (DDIM-family) samplers."""
    beta_prod = 1 - alpha_prod
    if prediction_type == "epsilon":
        x0 = (sample - beta_prod**0.5 * model_output) / alpha_prod**0.5
        return x0, model_output
    if prediction_type == "v_prediction":
        x0 = alpha_prod**0.5 * sample - beta_prod**0.5 * model_output
        return x0, alpha_prod**0.5 * model_output + beta_prod**0.5 * sample
    eps = (sample - alpha_prod**0.5 * model_output) / beta_prod**0.5
    return model_output, eps


class SigmaScheduler(Scheduler):
    """Base of the samplers that work in sigma space (Euler, Euler a, LMS): inputs scaled by 1/sqrt(sigma^2+1)."""

    sigmas: np.ndarray
    uses_sigmas = True

    def set_timesteps(self, num_inference_steps: int) -> None:
        self.num_inference_steps = num_inference_steps
        timesteps = spaced_timesteps(self.config, num_inference_steps).astype(np.float32)
        all_sigmas = train_sigmas(self.alphas_cumprod)
        sigmas = np.interp(timesteps, np.arange(len(all_sigmas)), all_sigmas)
        if self.config.get("use_karras_sigmas"):
            sigmas = karras_sigmas(sigmas[-1], sigmas[0], num_inference_steps)
            timesteps = sigma_to_t(sigmas, np.log(all_sigmas))
        self.sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        self.timesteps = np.asarray(timesteps, dtype=np.float32)
        self.step_index = 0

    @property
    def init_noise_sigma(self) -> float:
        sigma_max = float(self.sigmas.max())
        if self.config["timestep_spacing"] in ("linspace", "trailing"):
            return sigma_max
        return (sigma_max**2 + 1) ** 0.5

    def scale_model_input(self, sample: np.ndarray, timestep: float) -> np.ndarray:
        sigma = self.sigmas[self.step_index]
        return (sample / ((sigma**2 + 1) ** 0.5)).astype(np.float32)

    def add_noise(self, original: np.ndarray, noise: np.ndarray, timestep: float) -> np.ndarray:
        """Noise to the current (start) sigma: x0 + sigma * noise, unscaled as these samplers keep it."""
        return (original + noise * self.sigmas[self.step_index]).astype(np.float32)
