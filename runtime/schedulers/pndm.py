"""PNDM (Liu et al. 2022), SD 1.x's default; mirrors diffusers' PNDMScheduler (PLMS, optional PRK warm-up)."""

from __future__ import annotations

import numpy as np

from ..echo import echo
from .base import NoiseSource, Scheduler, spaced_timesteps


class PNDMScheduler(Scheduler):
    name = "PNDMScheduler"
    defaults = {"skip_prk_steps": False, "set_alpha_to_one": False}
    pndm_order = 4

    def set_timesteps(self, num_inference_steps: int) -> None:
        self.num_inference_steps = num_inference_steps
        base = spaced_timesteps(self.config, num_inference_steps)[::-1].round().astype(np.int64)
        if self.config["skip_prk_steps"]:
            self.prk_timesteps = np.array([], dtype=np.int64)
            plms = np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1]
        else:
            half = self.config["num_train_timesteps"] // num_inference_steps // 2
            prk = base[-self.pndm_order :].repeat(2) + np.tile(np.array([0, half]), self.pndm_order)
            self.prk_timesteps = prk[:-1].repeat(2)[1:-1][::-1].copy()
            plms = base[:-3][::-1]
        self.timesteps = np.concatenate([self.prk_timesteps, plms]).astype(np.int64)
        self.ets: list[np.ndarray] = []
        self.counter = 0
        self.cur_model_output: np.ndarray | float = 0.0
        self.cur_sample: np.ndarray | None = None
        self.step_index = 0

    def step(
        self, model_output: np.ndarray, timestep: float, sample: np.ndarray, noise: NoiseSource | None = None
    ) -> np.ndarray:
        self.step_index += 1
        if self.counter < len(self.prk_timesteps) and not self.config["skip_prk_steps"]:
            return self._step_prk(model_output, int(timestep), sample)
        return self._step_plms(model_output, int(timestep), sample)

    def _step_prk(self, model_output: np.ndarray, timestep: int, sample: np.ndarray) -> np.ndarray:
        """Runge-Kutta warm-up: four model calls per step, combined with weights 1/6, 1/3, 1/3, 1/6."""
        diff_to_prev = 0 if self.counter % 2 else self.config["num_train_timesteps"] // self.num_inference_steps // 2
        prev_t = timestep - diff_to_prev
        timestep = int(self.prk_timesteps[self.counter // 4 * 4])
        stage = self.counter % 4
        if stage == 0:
            self.cur_model_output = model_output / 6
            self.ets.append(model_output)
            self.cur_sample = sample
        elif stage in (1, 2):
            self.cur_model_output = self.cur_model_output + model_output / 3
        else:
            model_output = self.cur_model_output + model_output / 6
            self.cur_model_output = 0.0
        cur_sample = self.cur_sample if self.cur_sample is not None else sample
        self.counter += 1
        return self._prev_sample(cur_sample, timestep, prev_t, model_output)

    def _step_plms(self, model_output: np.ndarray, timestep: int, sample: np.ndarray) -> np.ndarray:
        """Linear multistep on the epsilon history (Adams-Bashforth weights up to 4th order)."""
        stride = self.config["num_train_timesteps"] // self.num_inference_steps
        prev_t = timestep - stride
        if self.counter != 1:
            self.ets = self.ets[-3:]
            self.ets.append(model_output)
        else:
            prev_t, timestep = timestep, timestep + stride
        ets = self.ets
        if len(ets) == 1 and self.counter == 0:
            self.cur_sample = sample
        elif len(ets) == 1 and self.counter == 1:
            model_output = (model_output + ets[-1]) / 2
            sample, self.cur_sample = self.cur_sample, None
        elif len(ets) == 2:
            model_output = (3 * ets[-1] - ets[-2]) / 2
        elif len(ets) == 3:
            model_output = (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
        else:
            model_output = (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4]) / 24
        self.counter += 1
        return self._prev_sample(sample, timestep, prev_t, model_output)

    def _prev_sample(self, sample: np.ndarray, t: int, prev_t: int, model_output: np.ndarray) -> np.ndarray:
        """Formula (9) of the PNDM paper: x_{t-delta} from x_t and the combined epsilon."""
        alpha = float(self.alphas_cumprod[t])
        alpha_prev = float(self.alphas_cumprod[prev_t]) if prev_t >= 0 else self.final_alpha_cumprod
        if self.config["prediction_type"] == "v_prediction":
            model_output = alpha**0.5 * model_output + (1 - alpha) ** 0.5 * sample
        elif self.config["prediction_type"] != "epsilon":
            raise ValueError(f"PNDM supports epsilon and v_prediction, not {echo(self.config['prediction_type'])}")
        sample_coeff = (alpha_prev / alpha) ** 0.5
        denom = alpha * (1 - alpha_prev) ** 0.5 + (alpha * (1 - alpha) * alpha_prev) ** 0.5
        return (sample_coeff * sample - (alpha_prev - alpha) * model_output / denom).astype(np.float32)
