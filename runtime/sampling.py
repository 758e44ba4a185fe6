"""The sampler loop every family shares: scale the latents for the sampler, ask the denoiser (with guidance)
for a prediction, step the sampler, let a mask put back what is kept, check for cancellation."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .schedulers import NoiseSource, Scheduler

Predict = Callable[[np.ndarray, int, float], np.ndarray]
"""(scaled latents, step index, timestep) -> the denoiser's guided prediction."""
StopCheck = Callable[[int, int, np.ndarray], bool]


class GenerationCancelled(Exception):
    """The step callback (or the `cancelled` check) asked to stop."""


def sample(
    predict: Predict,
    sched: Scheduler,
    latents: np.ndarray,
    timesteps: np.ndarray,
    noise: NoiseSource,
    after_step: Callable[[np.ndarray, int], np.ndarray] | None = None,
    should_stop: StopCheck | None = None,
) -> np.ndarray:
    """Denoise `latents` over `timesteps`; `after_step(latents, i)` may change them after each step (an
    inpainting mask), `should_stop(i, total, latents)` True raises GenerationCancelled."""
    for i, t in enumerate(timesteps):
        prediction = predict(sched.scale_model_input(latents, t), i, t)
        latents = sched.step(prediction, t, latents, noise=noise)
        if after_step is not None:
            latents = after_step(latents, i)
        if should_stop is not None and should_stop(i, len(timesteps), latents):
            raise GenerationCancelled(f"cancelled after step {i + 1} of {len(timesteps)}")
    return latents
