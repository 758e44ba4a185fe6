"""Euler (Karras et al. 2022, Algorithm 2 without churn); mirrors diffusers' EulerDiscreteScheduler."""

from __future__ import annotations

import numpy as np

from .base import NoiseSource, SigmaScheduler, predict_x0_from_sigma


class EulerScheduler(SigmaScheduler):
    name = "EulerDiscreteScheduler"
    defaults = {"timestep_spacing": "linspace", "use_karras_sigmas": False, "rescale_betas_zero_snr": False}

    def step(
        self, model_output: np.ndarray, timestep: float, sample: np.ndarray, noise: NoiseSource | None = None
    ) -> np.ndarray:
        sigma, sigma_next = self.sigmas[self.step_index], self.sigmas[self.step_index + 1]
        x0 = predict_x0_from_sigma(model_output, sample, sigma, self.config["prediction_type"])
        derivative = (sample - x0) / sigma
        self.step_index += 1
        return (sample + derivative * (sigma_next - sigma)).astype(np.float32)
