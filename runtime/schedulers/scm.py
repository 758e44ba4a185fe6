"""sCM, the 1-4 step sampler of TrigFlow consistency models (SANA-Sprint); mirrors diffusers' SCMScheduler.

TrigFlow noises as x_t = cos(t) x0 + sin(t) noise (sigma_data units) with t an angle from pi/2 (pure noise) down
to 0. `step` is diffusers' step, on the TrigFlow velocity; the conversions SANA-Sprint's pipeline makes around
the transformer (which takes the flow time sin t / (sin t + cos t)) are the methods `model_timestep`,
`scale_model_input` and `model_velocity`, so that a generic denoising loop runs it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..echo import echo
from .base import NoiseSource, Scheduler

MAX_TIMESTEP = 1.57080  # diffusers' default max_timesteps, ~pi/2
INTERMEDIATE_TIMESTEP = 1.3  # diffusers' (and SANA-Sprint's) default for 2 steps


def torch_linspace(start: float, end: float, count: int) -> np.ndarray:
    """torch.linspace in float32 as its scalar CPU loop computes it (each half from its own end), which rounds
    differently from numpy's float64 linspace. Measured equal up to 8 points (7 steps); from 9 points torch's
    vector loop may differ by an ulp (6e-8)."""
    first, last = np.float32(start), np.float32(end)
    if count == 1:
        return np.array([first], dtype=np.float32)
    step = (last - first) / np.float32(count - 1)
    index = np.arange(count)
    from_start = first + step * index.astype(np.float32)
    from_end = last - step * (count - 1 - index).astype(np.float32)
    return np.where(index < count // 2, from_start, from_end).astype(np.float32)


class SCMScheduler(Scheduler):
    """Configured from an SCMScheduler config; no beta schedule (the base class's DDPM state is not built)."""

    name = "SCMScheduler"
    family = "trigflow"
    defaults = {"num_train_timesteps": 1000, "prediction_type": "trigflow", "sigma_data": 0.5}

    def __init__(self, **config: object) -> None:
        self.config = dict(self.defaults)
        self.config.update({k: v for k, v in config.items() if k in self.config})
        if self.config["prediction_type"] != "trigflow":
            kind = echo(self.config["prediction_type"])
            raise ValueError(f"unknown prediction_type {kind} for scm (known: trigflow)")
        self.angles = np.zeros(0, dtype=np.float32)
        self.timesteps = np.zeros(0, dtype=np.float32)
        self.num_inference_steps = 0
        self.step_index = 0
        self.pred_original_sample: np.ndarray | None = None

    @property
    def init_noise_sigma(self) -> float:
        return float(self.config["sigma_data"])

    def set_timesteps(
        self,
        num_inference_steps: int,
        timesteps: Sequence[float] | None = None,
        max_timesteps: float | None = None,
        intermediate_timesteps: float | None = None,
    ) -> None:
        """diffusers' set_timesteps: `num_inference_steps` + 1 angles ending at 0, from `timesteps` or evenly
        from `max_timesteps` (default ~pi/2), 2 steps through `intermediate_timesteps` (default 1.3, as the
        pipeline passes it; diffusers' scheduler would refuse its own default at other step counts).
        `timesteps` holds the angles the model is evaluated at (all but the final 0, as the pipeline loops)."""
        if num_inference_steps > self.config["num_train_timesteps"]:
            raise ValueError(f"scm takes at most {self.config['num_train_timesteps']} steps, got {num_inference_steps}")
        if timesteps is not None:
            if len(timesteps) != num_inference_steps + 1:
                raise ValueError(f"custom timesteps need num_inference_steps + 1 = {num_inference_steps + 1} angles")
            if max_timesteps is not None or intermediate_timesteps is not None:
                raise ValueError("custom timesteps exclude max_timesteps and intermediate_timesteps")
            angles = np.asarray(timesteps, dtype=np.float32)
        else:
            top = MAX_TIMESTEP if max_timesteps is None else max_timesteps
            if intermediate_timesteps is not None and num_inference_steps != 2:
                raise ValueError("intermediate_timesteps applies to 2 steps only")
            if num_inference_steps == 2:
                middle = INTERMEDIATE_TIMESTEP if intermediate_timesteps is None else intermediate_timesteps
                angles = np.array([top, middle, 0], dtype=np.float32)
            else:
                angles = torch_linspace(top, 0.0, num_inference_steps + 1)
        self.angles = angles
        self.timesteps = angles[:-1]
        self.num_inference_steps = num_inference_steps
        self.step_index = 0

    @staticmethod
    def model_timestep(timestep: float | np.ndarray) -> np.ndarray:
        """The transformer's timestep input for angle t: the flow time sin t / (sin t + cos t)."""
        t = np.asarray(timestep, dtype=np.float32)
        return np.sin(t) / (np.cos(t) + np.sin(t))

    def scale_model_input(self, sample: np.ndarray, timestep: float) -> np.ndarray:
        """The transformer's input: the sample in unit scale, on the flow path (norm sqrt(s^2 + (1 - s)^2))."""
        s = self.model_timestep(timestep)
        scaled = sample / np.float32(self.config["sigma_data"])
        return (scaled * np.sqrt(s**2 + (1 - s) ** 2)).astype(np.float32)

    def model_velocity(self, model_output: np.ndarray, model_input: np.ndarray, timestep: float) -> np.ndarray:
        """The transformer's flow output turned into the TrigFlow velocity that `step` takes (SANA-Sprint's
        pipeline between the transformer and the scheduler)."""
        s = self.model_timestep(timestep)
        velocity = ((1 - 2 * s) * model_input + (1 - 2 * s + 2 * s**2) * model_output) / np.sqrt(s**2 + (1 - s) ** 2)
        return (velocity * np.float32(self.config["sigma_data"])).astype(np.float32)

    def sigma_at(self, timesteps: np.ndarray) -> np.ndarray:
        """The flow sigma sin t / (sin t + cos t) of each angle, in [0, 1] as flow_euler's."""
        t = np.asarray(timesteps, np.float64)
        return np.sin(t) / (np.sin(t) + np.cos(t))

    def step(
        self, model_output: np.ndarray, timestep: float, sample: np.ndarray, noise: NoiseSource | None = None
    ) -> np.ndarray:
        """x0 = cos(s) x - sin(s) v, re-noised to the next angle with fresh noise (the last angle is 0: x0
        itself, the noise drawn all the same, as diffusers draws it). The x0 estimate is kept in
        `pred_original_sample`; the pipeline's image is the final sample / sigma_data."""
        s, t = self.angles[self.step_index], self.angles[self.step_index + 1]
        x0 = np.cos(s) * sample - np.sin(s) * model_output
        fresh = self._require_noise(noise).randn(model_output.shape) * np.float32(self.config["sigma_data"])
        self.pred_original_sample = x0.astype(np.float32)
        self.step_index += 1
        return (np.cos(t) * x0 + np.sin(t) * fresh).astype(np.float32)

    def add_noise(self, original: np.ndarray, noise: np.ndarray, timestep: float) -> np.ndarray:
        """TrigFlow's forward process to angle `timestep` (SANA-Sprint img2img): cos(t) x0 + sin(t) noise, both
        in sigma_data units (`original` is the VAE's scaled latents, `noise` standard normal)."""
        t = np.float32(timestep)
        sigma_data = np.float32(self.config["sigma_data"])
        return (np.cos(t) * (original * sigma_data) + np.sin(t) * (noise * sigma_data)).astype(np.float32)
