"""Euler for rectified-flow models (SD3, FLUX, Z-Image, ...); mirrors diffusers' FlowMatchEulerDiscreteScheduler.

The model predicts the velocity v = noise - x0 of the straight path x_sigma = (1 - sigma) x0 + sigma noise, so a
step is x + (sigma_next - sigma) v. The schedule is built in the same dtypes and order of operations as diffusers
(float64 spacing, float32 sigmas, timesteps = sigmas * num_train_timesteps in float32), so both agree to the ulp.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..echo import echo
from .base import NoiseSource, Scheduler

FLOW_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": False,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "invert_sigmas": False,
    "shift_terminal": None,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "time_shift_type": "exponential",
    "stochastic_sampling": False,
}


def calculate_shift(image_seq_len: int, config: dict[str, Any]) -> float:
    """`mu` of a dynamically shifted schedule (FLUX): linear in the image's token count between
    (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift), the config's or diffusers' defaults."""
    base_len = config.get("base_image_seq_len", FLOW_DEFAULTS["base_image_seq_len"])
    max_len = config.get("max_image_seq_len", FLOW_DEFAULTS["max_image_seq_len"])
    base_shift = config.get("base_shift", FLOW_DEFAULTS["base_shift"])
    max_shift = config.get("max_shift", FLOW_DEFAULTS["max_shift"])
    m = (max_shift - base_shift) / (max_len - base_len)
    b = base_shift - m * base_len
    return image_seq_len * m + b


class FlowMatchEulerScheduler(Scheduler):
    """Configured from a FlowMatchEulerDiscreteScheduler config; a config of another flow scheduler that names
    its shift `flow_shift` (SANA's DPM-Solver with `use_flow_sigmas`) keeps that shift. No beta schedule:
    the base class's DDPM state is not built."""

    name = "FlowMatchEulerDiscreteScheduler"
    family = "flow"
    defaults = FLOW_DEFAULTS

    def __init__(self, **config: Any) -> None:
        self.config = dict(self.defaults)
        self.config.update({k: v for k, v in config.items() if k in self.config})
        if "shift" not in config and config.get("flow_shift") is not None:
            self.config["shift"] = config["flow_shift"]
        cfg = self.config
        if cfg["time_shift_type"] not in ("exponential", "linear"):
            raise ValueError(f"unknown time_shift_type {echo(cfg['time_shift_type'])} (known: exponential, linear)")
        if cfg["use_karras_sigmas"] + cfg["use_exponential_sigmas"] + cfg["use_beta_sigmas"] > 1:
            raise ValueError("only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas can be set")
        if cfg["use_beta_sigmas"]:
            # diffusers draws them from scipy.stats.beta.ppf; the runtime stays free of scipy.
            raise ValueError("use_beta_sigmas is not supported by flow_euler (needs scipy); use Karras or exponential")
        if cfg["invert_sigmas"]:
            raise ValueError("invert_sigmas (Mochi's inverted schedule) is not supported by flow_euler")
        n_train = cfg["num_train_timesteps"]
        # diffusers' training schedule, whose ends bound the inference spacing (shifted once here unless dynamic).
        sigmas = np.linspace(1, n_train, n_train, dtype=np.float32)[::-1] / np.float32(n_train)
        if not cfg["use_dynamic_shifting"]:
            sigmas = self._shifted(sigmas, cfg["shift"])
        self.sigma_max, self.sigma_min = float(sigmas[0]), float(sigmas[-1])
        self.sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        self.timesteps = sigmas * np.float32(n_train)
        self.num_inference_steps = 0
        self.step_index = 0

    @staticmethod
    def _shifted(sigmas: np.ndarray, shift: float) -> np.ndarray:
        """SD3's static shift, in the input's dtype (Python-float shift, as diffusers writes it)."""
        return shift * sigmas / (1 + (shift - 1) * sigmas)

    def _time_shift(self, mu: float, sigmas: np.ndarray) -> np.ndarray:
        """Resolution-dependent shift by `mu` (exponential: e^mu, linear: mu), as diffusers' time_shift."""
        exponential = self.config["time_shift_type"] == "exponential"
        if not math.isfinite(mu) or (exponential and mu > math.log(np.finfo(np.float32).max)):
            raise ValueError(f"this model's scheduler config shifts the schedule by e^{echo(mu)}, past a float32")
        scale = math.exp(mu) if exponential else mu
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            return scale / (scale + (1 / sigmas - 1) ** 1.0)

    def set_timesteps(
        self, num_inference_steps: int | None = None, sigmas: Sequence[float] | None = None, mu: float | None = None
    ) -> None:
        """diffusers' set_timesteps: `sigmas` replaces the linear spacing (FLUX passes linspace(1, 1/N, N)),
        `mu` is required with `use_dynamic_shifting` (see `calculate_shift`) and ignored without it."""
        cfg = self.config
        if cfg["use_dynamic_shifting"] and mu is None:
            raise ValueError("this model's schedule shifts with the image size (use_dynamic_shifting): pass mu")
        if sigmas is None and num_inference_steps is None:
            raise ValueError("pass num_inference_steps or sigmas")
        if sigmas is not None and num_inference_steps is not None and len(sigmas) != num_inference_steps:
            raise ValueError(f"{len(sigmas)} sigmas given for {num_inference_steps} steps")
        n_train = cfg["num_train_timesteps"]
        if sigmas is None:
            assert num_inference_steps is not None
            spaced = np.linspace(self.sigma_max * n_train, self.sigma_min * n_train, num_inference_steps)
            schedule = spaced / n_train
        else:
            schedule = np.array(sigmas).astype(np.float32)
        num_inference_steps = len(schedule)
        if cfg["use_dynamic_shifting"]:
            assert mu is not None
            schedule = self._time_shift(mu, schedule)
        else:
            schedule = self._shifted(schedule, cfg["shift"])
        if cfg["shift_terminal"]:
            # Stretch so that the last sigma is shift_terminal (LTX-Video).
            one_minus = 1 - schedule
            if one_minus[-1] == 0:  # diffusers divides by zero here: a schedule of NaN
                raise ValueError("shift_terminal cannot stretch a schedule that ends at sigma 1 (one step)")
            schedule = 1 - one_minus / (one_minus[-1] / (1 - cfg["shift_terminal"]))
        if cfg["use_karras_sigmas"] or cfg["use_exponential_sigmas"]:
            lo, hi = float(schedule[-1]), float(schedule[0])
            if cfg["use_karras_sigmas"]:
                ramp = np.linspace(0, 1, num_inference_steps)
                schedule = (hi ** (1 / 7.0) + ramp * (lo ** (1 / 7.0) - hi ** (1 / 7.0))) ** 7.0
            else:
                schedule = np.exp(np.linspace(math.log(hi), math.log(lo), num_inference_steps))
        with np.errstate(over="ignore", invalid="ignore"):
            sigmas32 = np.asarray(schedule).astype(np.float32)
        if not np.isfinite(sigmas32).all():
            raise ValueError("this model's scheduler config makes a schedule that is not finite")
        self.timesteps = sigmas32 * np.float32(n_train)
        self.sigmas = np.concatenate([sigmas32, np.zeros(1, np.float32)])
        self.num_inference_steps = num_inference_steps
        self.step_index = 0

    def sigma_at(self, timesteps: np.ndarray) -> np.ndarray:
        """The flow sigma of each timestep (t / num_train_timesteps: the shift is already in the timesteps), in
        [0, 1]; what guidance intervals use for this model."""
        return np.asarray(timesteps, np.float64) / self.config["num_train_timesteps"]

    def step(
        self, model_output: np.ndarray, timestep: float, sample: np.ndarray, noise: NoiseSource | None = None
    ) -> np.ndarray:
        """One Euler step along the velocity; with `stochastic_sampling`, x0 re-noised to the next sigma with
        fresh noise instead."""
        sigma, sigma_next = self.sigmas[self.step_index], self.sigmas[self.step_index + 1]
        sample = np.asarray(sample, dtype=np.float32)  # diffusers upcasts too
        if self.config["stochastic_sampling"]:
            x0 = sample - sigma * model_output
            fresh = self._require_noise(noise).randn(sample.shape)
            prev = (1 - sigma_next) * x0 + sigma_next * fresh
        else:
            prev = sample + (sigma_next - sigma) * model_output
        self.step_index += 1
        return prev.astype(np.float32)

    def add_noise(self, original: np.ndarray, noise: np.ndarray, timestep: float) -> np.ndarray:
        """The flow's forward process to `timestep` (img2img, inpainting): sigma noise + (1 - sigma) x0, at the
        sigma of that timestep in the schedule (diffusers' scale_noise)."""
        sigma = self._sigma_of(timestep)
        return (sigma * noise + (1 - sigma) * original).astype(np.float32)

    def _sigma_of(self, timestep: float) -> np.float32:
        """The schedule's sigma at `timestep` (its first occurrence), else timestep / num_train_timesteps."""
        matches = np.flatnonzero(self.timesteps == np.float32(timestep))
        if len(matches):
            return self.sigmas[matches[0]]
        return np.float32(timestep) / np.float32(self.config["num_train_timesteps"])
