"""DPM-Solver++(2M) (Lu et al. 2022), with optional Karras sigmas; mirrors diffusers'
DPMSolverMultistepScheduler with algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint", and its
flow-sigma mode (use_flow_sigmas: SANA's published sampler) as FlowDPMSolverMultistepScheduler.
"""

from __future__ import annotations

import numpy as np

from .base import NoiseSource, Scheduler, karras_sigmas, predict_x0_and_eps, sigma_to_t, spaced_timesteps, train_sigmas


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

    @staticmethod
    def _alpha_sigma(sigma: float) -> tuple[float, float]:
        """(alpha_t, sigma_t) of a noise level: the variance-preserving pair of sigma = sigma_t / alpha_t."""
        alpha = 1 / (sigma**2 + 1) ** 0.5
        return alpha, sigma * alpha

    def _lambda(self, sigma: float) -> float:
        """Half log-SNR; +inf at sigma 0 (the final, noise-free step)."""
        alpha, sigma_t = self._alpha_sigma(sigma)
        with np.errstate(divide="ignore"):
            return float(np.log(alpha) - np.log(sigma_t))

    def add_noise(self, original: np.ndarray, noise: np.ndarray, timestep: float) -> np.ndarray:
        """Noise to the current (start) sigma, in this solver's alpha/sigma parameterisation."""
        alpha_t, sigma_t = self._alpha_sigma(float(self.sigmas[self.step_index]))
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
        alpha_t, _ = self._alpha_sigma(sigma)
        return predict_x0_and_eps(model_output, sample, alpha_t**2, self.config["prediction_type"])[0]

    def _first_order(self, sample: np.ndarray, i: int) -> np.ndarray:
        s, t = float(self.sigmas[i]), float(self.sigmas[i + 1])
        h = self._lambda(t) - self._lambda(s)
        alpha_t, sigma_t = self._alpha_sigma(t)
        return (sigma_t / self._alpha_sigma(s)[1]) * sample - alpha_t * (np.exp(-h) - 1.0) * self.model_outputs[-1]

    def _second_order(self, sample: np.ndarray, i: int) -> np.ndarray:
        s1, s0, t = float(self.sigmas[i - 1]), float(self.sigmas[i]), float(self.sigmas[i + 1])
        m1, m0 = self.model_outputs
        h = self._lambda(t) - self._lambda(s0)
        r0 = (self._lambda(s0) - self._lambda(s1)) / h
        d1 = (m0 - m1) / r0
        alpha_t, sigma_t = self._alpha_sigma(t)
        factor = alpha_t * (np.exp(-h) - 1.0)
        return (sigma_t / self._alpha_sigma(s0)[1]) * sample - factor * m0 - 0.5 * factor * d1


class FlowDPMSolverMultistepScheduler(DPMSolverMultistepScheduler):
    """DPM-Solver++(2M) on a rectified-flow model, as diffusers' DPMSolverMultistepScheduler with use_flow_sigmas
    and prediction_type "flow_prediction" (SANA's published sampler): sigmas 1 -> 1/N spaced linearly and shifted by
    `flow_shift`, alpha_t = 1 - sigma and sigma_t = sigma, the model's velocity turned into the data prediction
    x0 = x - sigma v; timesteps are sigma x num_train_timesteps cut to integers, as diffusers casts them."""

    family = "flow"
    defaults = {**DPMSolverMultistepScheduler.defaults, "flow_shift": 1.0}

    def __init__(self, **config: object) -> None:
        if config.get("prediction_type", "flow_prediction") != "flow_prediction":
            raise ValueError(f"DPM-Solver on flow sigmas predicts flow, not {config['prediction_type']!r}")
        super().__init__(**{**config, "prediction_type": "epsilon"})  # the base checks the DDPM-style types
        self.config["prediction_type"] = "flow_prediction"

    def set_timesteps(self, num_inference_steps: int) -> None:
        trained = self.config["num_train_timesteps"]
        shift = self.config["flow_shift"]
        sigmas = 1.0 - np.linspace(1, 1 / trained, num_inference_steps + 1)
        sigmas = np.flip(shift * sigmas / (1 + (shift - 1) * sigmas))[:-1].copy()
        timesteps = (sigmas * trained).astype(np.int64)
        if self.config["final_sigmas_type"] != "zero":
            raise ValueError("DPM-Solver on flow sigmas ends at sigma 0 here (final_sigmas_type 'zero')")
        self.sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        self.timesteps = timesteps
        self.num_inference_steps = len(timesteps)
        self.model_outputs = []
        self.step_index = 0

    @staticmethod
    def _alpha_sigma(sigma: float) -> tuple[float, float]:
        return 1.0 - sigma, sigma

    def _data_prediction(self, model_output: np.ndarray, sample: np.ndarray, sigma: float) -> np.ndarray:
        return sample - np.float32(sigma) * model_output

    def sigma_at(self, timesteps: np.ndarray) -> np.ndarray:
        """The flow sigma of each timestep (t / num_train_timesteps), what guidance intervals compare."""
        return np.asarray(timesteps, np.float64) / self.config["num_train_timesteps"]
