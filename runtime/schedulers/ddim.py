"""DDIM (Song et al. 2020); mirrors diffusers' DDIMScheduler. `eta` > 0 adds DDPM-like noise."""

from __future__ import annotations

import numpy as np

from .base import NoiseSource, Scheduler, predict_x0_and_eps


class DDIMScheduler(Scheduler):
    name = "DDIMScheduler"
    defaults = {
        "clip_sample": True,
        "clip_sample_range": 1.0,
        "set_alpha_to_one": True,
        "rescale_betas_zero_snr": False,
    }

    def __init__(self, eta: float = 0.0, **config: object) -> None:
        super().__init__(**config)
        self.eta = eta

    def step(
        self, model_output: np.ndarray, timestep: float, sample: np.ndarray, noise: NoiseSource | None = None
    ) -> np.ndarray:
        t = int(timestep)
        prev_t = t - self.config["num_train_timesteps"] // self.num_inference_steps
        alpha = float(self.alphas_cumprod[t])
        alpha_prev = float(self.alphas_cumprod[prev_t]) if prev_t >= 0 else self.final_alpha_cumprod
        x0, eps = predict_x0_and_eps(model_output, sample, alpha, self.config["prediction_type"])
        x0 = self.clip_x0(x0)
        variance = (1 - alpha_prev) / (1 - alpha) * (1 - alpha / alpha_prev)
        std = self.eta * variance**0.5
        prev = alpha_prev**0.5 * x0 + (1 - alpha_prev - std**2) ** 0.5 * eps
        if self.eta > 0:
            prev = prev + std * self._require_noise(noise).randn(model_output.shape)
        self.step_index += 1
        return prev.astype(np.float32)
