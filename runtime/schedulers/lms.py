"""Linear multistep (LMS); mirrors diffusers' LMSDiscreteScheduler.

The Lagrange basis polynomials are integrated exactly (numpy.polynomial) where diffusers calls
scipy.integrate.quad; both are exact for these low-degree polynomials, and the runtime stays free of scipy.
"""

from __future__ import annotations

import numpy as np
from numpy.polynomial import polynomial as P

from .base import NoiseSource, SigmaScheduler, predict_x0_from_sigma


class LMSScheduler(SigmaScheduler):
    name = "LMSDiscreteScheduler"
    defaults = {"timestep_spacing": "linspace", "use_karras_sigmas": False}
    max_order = 4

    def set_timesteps(self, num_inference_steps: int) -> None:
        super().set_timesteps(num_inference_steps)
        self.derivatives: list[np.ndarray] = []

    def step(
        self, model_output: np.ndarray, timestep: float, sample: np.ndarray, noise: NoiseSource | None = None
    ) -> np.ndarray:
        i = self.step_index
        sigma = self.sigmas[i]
        x0 = predict_x0_from_sigma(model_output, sample, sigma, self.config["prediction_type"])
        self.derivatives.append((sample - x0) / sigma)
        self.derivatives = self.derivatives[-self.max_order :]
        order = min(i + 1, self.max_order)
        coeffs = [self._coefficient(order, i, k) for k in range(order)]
        prev = sample + sum(c * d for c, d in zip(coeffs, reversed(self.derivatives), strict=False))
        self.step_index += 1
        return prev.astype(np.float32)

    def _coefficient(self, order: int, t: int, current: int) -> float:
        """Integral over [sigma_t, sigma_t+1] of the Lagrange basis polynomial of point t - current."""
        s = self.sigmas.astype(np.float64)
        poly = np.array([1.0])
        for k in range(order):
            if k != current:
                poly = P.polymul(poly, np.array([-s[t - k], 1.0]) / (s[t - current] - s[t - k]))
        integral = P.polyint(poly)
        return float(P.polyval(s[t + 1], integral) - P.polyval(s[t], integral))
