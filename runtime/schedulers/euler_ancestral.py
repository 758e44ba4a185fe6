"""Euler ancestral ("Euler a"); mirrors diffusers' EulerAncestralDiscreteScheduler."""

from __future__ import annotations

import numpy as np

from .base import NoiseSource, SigmaScheduler, predict_x0_from_sigma


class EulerAncestralScheduler(SigmaScheduler):
    name = "EulerAncestralDiscreteScheduler"
    defaults = {"timestep_spacing": "linspace", "rescale_betas_zero_snr": False}

    def step(
        self, model_output: np.ndarray, timestep: float, sample: np.ndarray, noise: NoiseSource | None = None
    ) -> np.ndarray:
        sigma, sigma_next = self.sigmas[self.step_index], self.sigmas[self.step_index + 1]
        x0 = predict_x0_from_sigma(model_output, sample, sigma, self.config["prediction_type"])
        sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        prev = sample + (sample - x0) / sigma * (sigma_down - sigma)
        prev = prev + self._require_noise(noise).randn(model_output.shape) * sigma_up
        self.step_index += 1
        return prev.astype(np.float32)
