"""Calibration data from real pipeline runs: each component's inputs recorded along denoising trajectories.

The fp32 export runs through the runtime's own pipeline (classifier-free guidance, both CFG halves in
each UNet batch, every timestep), so int8 ranges come from the inputs the graphs will actually see.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sd_onnx.runtime import StableDiffusionPipeline

CALIBRATION_PROMPTS = (
    "a photo of an astronaut riding a horse on mars",
    "a red circle on a blue background",
    "portrait of an old man, oil painting, dramatic light",
    "a bowl of fruit on a wooden table, studio photo",
    "a city street at night in the rain, neon signs",
    "a watercolor landscape with mountains and a lake",
    "a cute cat sleeping on a sofa",
    "an isometric illustration of a small house, pastel colors",
)
HELD_OUT_PROMPTS = ("a green triangle at the top on a white background", "a sailing ship in a storm")


@dataclass
class CalibrationSet:
    """Recorded feeds per component, plus how they were made (for the manifest)."""

    feeds: dict[str, list[dict[str, np.ndarray]]]
    settings: dict[str, Any]


def record(
    model_dir: Path,
    prompts: tuple[str, ...],
    steps: int,
    size: int,
    seed: int = 0,
    guidance: float | None = None,
) -> CalibrationSet:
    """Run the fp32 pipeline on `prompts` and record what each component was fed.

    `guidance` defaults to the model's own (the manifest's): the UNet's inputs along the trajectory, and so
    the ranges calibration measures, depend on it, and users sample at that guidance."""
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, provider="cpu", cache=False)
    guidance = pipe.config.guidance_scale if guidance is None else guidance
    feeds: dict[str, list[dict[str, np.ndarray]]] = {
        "text_encoder": [],
        "unet": [],
        "vae_decoder": [],
        "vae_encoder": [],
    }
    for name in ("text_encoder", "unet", "vae_decoder"):
        sink = feeds[name]
        pipe.component(name).observers.append(lambda run, sink=sink: sink.append({k: v.copy() for k, v in run.items()}))
    images = []
    for i, prompt in enumerate(prompts):
        out = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, height=size, width=size, seed=seed + i,
                   output_type="np")  # fmt: skip
        images.append(out.images[0])
    feeds["vae_encoder"] = [{"sample": (img.transpose(2, 0, 1)[None] * 2 - 1).astype(np.float32)} for img in images]
    settings = {"prompts": len(prompts), "steps": steps, "size": size, "seed": seed, "guidance": guidance}
    settings["samples"] = {name: len(v) for name, v in feeds.items()}
    return CalibrationSet(feeds, settings)


class FeedReader:
    """onnxruntime's CalibrationDataReader protocol over recorded feeds."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self.feeds = feeds
        self._iter: Iterator[dict[str, np.ndarray]] = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._iter, None)

    def rewind(self) -> None:
        self._iter = iter(self.feeds)
