"""Guidance policies: classifier-free guidance (two halves of one batch, combined), limited to an interval
of noise levels, or a model distilled with guidance as an input (LCM's embedding, FLUX-dev's scalar); SD3's
skip-layer guidance on top of classifier-free guidance at some steps."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .families.base import Conditioning

if TYPE_CHECKING:
    from .request import GenerationRequest


@dataclass
class Guidance:
    """How each step is guided. `batched`: the denoiser runs on [unconditional; conditional] and the halves
    are combined with `scale`; `guided[i]` False: step i runs the conditional half alone (a guidance interval)."""

    scale: float
    batched: bool
    guided: np.ndarray | None = None

    @classmethod
    def plan(cls, scale: float, batched: bool, interval: tuple[float, float] | None, sigmas: np.ndarray) -> Guidance:
        """Guidance for a run whose steps are at noise levels `sigmas`; with `interval` = (lo, hi), CFG only at
        steps whose sigma lies in (lo, hi] (Kynkäänniemi et al., 2024)."""
        if not batched or interval is None:
            return cls(scale, batched)
        return cls(scale, batched, (interval[0] < sigmas) & (sigmas <= interval[1]))

    def conditioning_at(self, step: int, cond: Conditioning, unguided: Conditioning | None) -> Conditioning:
        """The conditioning step `step` runs with: the guided batch, or outside the interval its conditional half."""
        return unguided if self.guided is not None and not self.guided[step] else cond

    def unguided(self, cond: Conditioning) -> Conditioning | None:
        """The conditional half, when some step runs without guidance."""
        return cond.conditional_half() if self.guided is not None else None

    def combine(self, prediction: np.ndarray, rows: int) -> np.ndarray:
        """One prediction per latent from a denoiser output of `rows` rows per latent (2: guided halves)."""
        if rows == 1:
            return prediction
        uncond, cond = np.split(prediction, 2)
        return uncond + np.float32(self.scale) * (cond - uncond)


def guidance_embedding(w: np.ndarray, dim: int) -> np.ndarray:
    """Sinusoidal embedding of guidance values `w` (guidance - 1) for UNets distilled with one (LCM), as
    diffusers' LatentConsistencyModelPipeline.get_guidance_scale_embedding computes it, in float32."""
    half = dim // 2
    scale = np.float32(np.log(np.float32(10000.0)) / np.float32(half - 1))
    frequencies = np.exp(np.arange(half, dtype=np.float32) * -scale)
    angles = (w.astype(np.float32) * np.float32(1000.0))[:, None] * frequencies[None, :]
    embedding = np.concatenate([np.sin(angles), np.cos(angles)], axis=1)
    if dim % 2:
        embedding = np.pad(embedding, ((0, 0), (0, 1)))
    return embedding.astype(np.float32)


SKIP_LAYERS = "transformer_skip"  # SD3's transformer with the skip-layer blocks skipped (exporter/skip_layers.py)


def skip_layer_scale(request: GenerationRequest, i: int, steps: int) -> float | None:
    """Skip-layer guidance's weight at step `i` of `steps` (None: not this step), as diffusers' SD3 pipeline
    applies it: at steps strictly between start x steps and stop x steps."""
    if not request.skip_guidance_layers:
        return None
    if steps * request.skip_layer_guidance_start < i < steps * request.skip_layer_guidance_stop:
        return request.skip_layer_guidance_scale
    return None
