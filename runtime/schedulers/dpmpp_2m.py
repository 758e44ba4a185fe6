"""DPM-Solver++(2M) (Lu et al. 2022), with optional Karras sigmas; mirrors diffusers'
DPMSolverMultistepScheduler with algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint".
"""

from __future__ import annotations

import numpy as np

from .base import NoiseSource, Scheduler, karras_sigmas, predict_x0_and_eps, sigma_to_t, spaced_timesteps, train_sigmas


def _alpha_sigma(sigma: float) -> tuple[float, float]:
    alpha = 1 / (sigma**2 + 1) ** 0.5
    return alpha, sigma * alpha


def _lambda(sigma: float) -> float:
    """Half log-SNR; +inf at sigma 0 (the final, noise-free step)."""
    alpha, sigma_t = _alpha_sigma(sigma)
    with np.errstate(divide="ignore"):
        return float(np.log(alpha) - np.log(sigma_t))


class DPMSolverMultistepScheduler(Scheduler):
    name = "DPMSolverMultistepScheduler"
    defaults = {
        "timestep_spacing": "linspace",
        "use_karras_sigmas": False,
        "lower_order_final": True,
        "euler_at_final": False,
        "final_sigmas_type": "zero",
        "algorithm_type": "dpmsolver++",
        "solver_order": 2,
        "rescale_betas_zero_snr": False,
    }
    uses_sigmas = True

    def __init__(self, **config: object) -> None:
        super().__init__(**config)
        if self.config["algorithm_type"] != "dpmsolver++" or self.config["solver_order"] != 2:
            raise ValueError("only DPM-Solver++ of order 2 (DPM++ 2M) is implemented")

    def set_timesteps(self, num_inference_steps: int) -> None:
        timesteps = spaced_timesteps(self.config, num_inference_steps, solver_spacing=True)
        all_sigmas = train_sigmas(self.alphas_cumprod)
        if self.config["use_karras_sigmas"]:
            sigmas = karras_sigmas(all_sigmas[0], all_sigmas[-1], num_inference_steps)
            timesteps = sigma_to_t(sigmas, np.log(all_sigmas)).round()
        else:
            sigmas = np.interp(timesteps, np.arange(len(all_sigmas)), all_sigmas)
        last = 0.0 if self.config["final_sigmas_type"] == "zero" else all_sigmas[0]
        self.sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
        self.timesteps = timesteps.astype(np.int64)
        self.num_inference_steps = len(self.timesteps)
        self.model_outputs: list[np.ndarray] = []
        self.step_index = 0

    def add_noise(self, original: np.ndarray, noise: np.ndarray, timestep: float) -> np.ndarray:
        """Noise to the current (start) sigma, in this solver's alpha/sigma parameterisation."""
        alpha_t, sigma_t = _alpha_sigma(float(self.sigmas[self.step_index]))
        return (alpha_t * original + sigma_t * noise).astype(np.float32)

    def step(
        self, model_output: np.ndarray, timestep: float, sample: np.ndarray, noise: NoiseSource | None = None
    ) -> np.ndarray:
        i = self.step_index
        n = len(self.timesteps)
        sigma = float(self.sigmas[i])
        x0 = self._data_prediction(model_output, sample, sigma)
        self.model_outputs = [*self.model_outputs[-1:], x0]
        final = i == n - 1 and (
            self.config["euler_at_final"]
            or (self.config["lower_order_final"] and n < 15)
            or self.config["final_sigmas_type"] == "zero"
        )
        prev = self._first_order(sample, i) if len(self.model_outputs) < 2 or final else self._second_order(sample, i)
        self.step_index += 1
        return prev.astype(np.float32)

    def _data_prediction(self, model_output: np.ndarray, sample: np.ndarray, sigma: float) -> np.ndarray:
        alpha_t, _ = _alpha_sigma(sigma)
        return predict_x0_and_eps(model_output, sample, alpha_t**2, self.config["prediction_type"])[0]

    def _first_order(self, sample: np.ndarray, i: int) -> np.ndarray:
        s, t = float(self.sigmas[i]), float(self.sigmas[i + 1])
        h = _lambda(t) - _lambda(s)
        alpha_t, sigma_t = _alpha_sigma(t)
        return (sigma_t / _alpha_sigma(s)[1]) * sample - alpha_t * (np.exp(-h) - 1.0) * self.model_outputs[-1]

    def _second_order(self, sample: np.ndarray, i: int) -> np.ndarray:
        s1, s0, t = float(self.sigmas[i - 1]), float(self.sigmas[i]), float(self.sigmas[i + 1])
        m1, m0 = self.model_outputs
        h = _lambda(t) - _lambda(s0)
        r0 = (_lambda(s0) - _lambda(s1)) / h
        d1 = (m0 - m1) / r0
        alpha_t, sigma_t = _alpha_sigma(t)
        factor = alpha_t * (np.exp(-h) - 1.0)
        return (sigma_t / _alpha_sigma(s0)[1]) * sample - factor * m0 - 0.5 * factor * d1
