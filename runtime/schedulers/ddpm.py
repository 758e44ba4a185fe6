"""DDPM ancestral sampling (Ho et al. 2020); mirrors diffusers' DDPMScheduler with "fixed_small" variance."""

from __future__ import annotations

import numpy as np

from .base import NoiseSource, Scheduler, predict_x0_and_eps


class DDPMScheduler(Scheduler):
    name = "DDPMScheduler"
    defaults = {
        "clip_sample": True,
        "clip_sample_range": 1.0,
        "variance_type": "fixed_small",
        "rescale_betas_zero_snr": False,
    }

    def step(
        self, model_output: np.ndarray, timestep: float, sample: np.ndarray, noise: NoiseSource | None = None
    ) -> np.ndarray:
        t = int(timestep)
        following = self.step_index + 1
        prev_t = int(self.timesteps[following]) if following < len(self.timesteps) else -1
        alpha = float(self.alphas_cumprod[t])
        alpha_prev = float(self.alphas_cumprod[prev_t]) if prev_t >= 0 else 1.0
        current_alpha = alpha / alpha_prev
        current_beta = 1 - current_alpha
        x0, _ = predict_x0_and_eps(model_output, sample, alpha, self.config["prediction_type"])
        x0 = self.clip_x0(x0)
        prev = (alpha_prev**0.5 * current_beta / (1 - alpha)) * x0
        prev = prev + (current_alpha**0.5 * (1 - alpha_prev) / (1 - alpha)) * sample
        if t > 0:
            variance = max((1 - alpha_prev) / (1 - alpha) * current_beta, 1e-20)
            prev = prev + variance**0.5 * self._require_noise(noise).randn(model_output.shape)
        self.step_index += 1
        return prev.astype(np.float32)
