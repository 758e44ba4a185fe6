"""Latent consistency (LCM, Luo et al. 2023); mirrors diffusers' LCMScheduler."""

from __future__ import annotations

import numpy as np

from .base import NoiseSource, Scheduler, predict_x0_and_eps

SIGMA_DATA = 0.5


class LCMScheduler(Scheduler):
    name = "LCMScheduler"
    defaults = {
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "original_inference_steps": 50,
        "clip_sample": False,
        "clip_sample_range": 1.0,
        "set_alpha_to_one": True,
        "timestep_scaling": 10.0,
        "rescale_betas_zero_snr": False,
    }

    def set_timesteps(self, num_inference_steps: int, strength: float = 1.0) -> None:
        original = self.config["original_inference_steps"]
        stride = self.config["num_train_timesteps"] // original
        origin = np.arange(1, int(original * strength) + 1) * stride - 1
        if len(origin) // num_inference_steps < 1:
            raise ValueError(f"LCM supports at most {len(origin)} steps with this config, got {num_inference_steps}")
        origin = origin[::-1].copy()
        indices = np.floor(np.linspace(0, len(origin), num=num_inference_steps, endpoint=False)).astype(np.int64)
        self.timesteps = origin[indices]
        self.num_inference_steps = num_inference_steps
        self.step_index = 0

    def step(
        self, model_output: np.ndarray, timestep: float, sample: np.ndarray, noise: NoiseSource | None = None
    ) -> np.ndarray:
        t = int(timestep)
        last = self.step_index == self.num_inference_steps - 1
        prev_t = t if last else int(self.timesteps[self.step_index + 1])
        alpha = float(self.alphas_cumprod[t])
        alpha_prev = float(self.alphas_cumprod[prev_t]) if prev_t >= 0 else self.final_alpha_cumprod
        scaled_t = t * self.config["timestep_scaling"]
        c_skip = SIGMA_DATA**2 / (scaled_t**2 + SIGMA_DATA**2)
        c_out = scaled_t / (scaled_t**2 + SIGMA_DATA**2) ** 0.5
        x0, _ = predict_x0_and_eps(model_output, sample, alpha, self.config["prediction_type"])
        x0 = self.clip_x0(x0)
        denoised = c_out * x0 + c_skip * sample
        self.step_index += 1
        if last:
            return denoised.astype(np.float32)
        fresh = self._require_noise(noise).randn(model_output.shape)
        return (alpha_prev**0.5 * denoised + (1 - alpha_prev) ** 0.5 * fresh).astype(np.float32)
