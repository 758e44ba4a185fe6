"""ControlNet at run time, as diffusers' StableDiffusion(XL)ControlNet pipelines compute it, torch-free.

A request's `controls` are units: a control image, the ControlNet (by its name in the model folder), a weight
and the fraction of the steps it acts in. At each step every active unit's graph (`controlnet_<name>`) reads the
UNet's inputs and its image, its residuals are scaled and summed over the units, and the UNet graph that takes
them (`unet_control`) runs instead of the plain one; a step with no active unit runs the plain UNet (residuals
of zero would add nothing). With guess mode (and classifier-free guidance) the ControlNets see the conditional
half only, their residuals scaled from 0.1 (the first) to 1 (the middle block's) and added to that half alone.

Not with DeepCache, token merging or the hires fix: their UNet graphs take no residuals (refused by the request).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from .manifest import controlnet_component
from .request import RequestError

if TYPE_CHECKING:
    from .families.base import Conditioning
    from .manifest import ModelConfig

MAX_CONTROLS = 4  # units per request; each runs its ControlNet at every step it is active in
MAX_CONTROL_SCALE = 10.0  # diffusers sets no bound; A1111's slider stops at 2
# diffusers' (stretched to the output's size), and A1111's others: scaled to cover the output and cropped about
# the centre, or scaled to fit inside it with the rest black.
RESIZE_MODES = {
    "just_resize": "Just Resize",
    "crop_and_resize": "Crop and Resize",
    "resize_and_fill": "Resize and Fill",
}


@dataclass(frozen=True)
class ControlUnit:
    """One ControlNet's say in a generation (diffusers' names: controlnet_conditioning_scale,
    control_guidance_start, control_guidance_end)."""

    image: Image.Image | np.ndarray  # a PIL image (resized to the output), or (1, 3, H, W) floats in [0, 1]
    model: str | None = None  # the ControlNet's name in the model folder; None: the folder's only one
    scale: float = 1.0
    start: float = 0.0  # the fraction of the steps before it acts
    end: float = 1.0  # the fraction of the steps after which it stops
    resize_mode: str = "just_resize"  # how the image meets the output's size: RESIZE_MODES
    module: str = "none"  # the preprocessor that made the image (annotators.MODULES), for the PNG parameters


def resolve_controls(units: Any, config: ModelConfig, size: tuple[int, int], exclusive: dict[str, Any]) -> tuple:
    """The request's `controls` checked against the model (RequestError naming `controls`): each a ControlUnit
    naming one of the folder's ControlNets, its numbers in range and its image of the output's size if it is an
    array. `exclusive`: the request's fields that cannot run with a ControlNet, by name (set ones refuse)."""
    units = tuple(units or ())
    if not units:
        return ()
    if not config.controlnets:
        raise RequestError("controls", "this model has no ControlNet (export one: sd-export convert --controlnet)")
    if len(units) > MAX_CONTROLS:
        raise RequestError("controls", f"{len(units)} units exceeds the limit of {MAX_CONTROLS}")
    for name, value in exclusive.items():
        if value and name == "hires":
            raise RequestError(name, "the hires fix's second pass does not run ControlNets yet; leave one of them out")
        if value:
            raise RequestError(name, "cannot be combined with a ControlNet (its UNet graph takes no residuals)")
    return tuple(_resolve_unit(unit, config, size) for unit in default_names(units, config))


def _resolve_unit(unit: Any, config: ModelConfig, size: tuple[int, int]) -> ControlUnit:
    if not isinstance(unit, ControlUnit):
        raise RequestError("controls", f"each unit must be a ControlUnit, got {type(unit).__name__}")
    names = sorted(config.controlnets)
    model = unit.model
    if model is not None and not isinstance(model, str):
        raise RequestError("controls", f"model must be a ControlNet's name, got {type(model).__name__}")
    if model is None and len(names) > 1:
        raise RequestError("controls", f"name the ControlNet: this model has {', '.join(names)}")
    model = names[0] if model is None else model
    if model not in config.controlnets:
        raise RequestError("controls", f"no ControlNet named {str(model)[:64]!r}; this model has {', '.join(names)}")
    numbers = {}
    for field, low, high in (("scale", 0.0, MAX_CONTROL_SCALE), ("start", 0.0, 1.0), ("end", 0.0, 1.0)):
        value = getattr(unit, field)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise RequestError("controls", f"{field} must be a finite number, got {value!r}"[:200])
        if not low <= value <= high:
            raise RequestError("controls", f"{field} must be in [{low:g}, {high:g}], got {value:g}")
        numbers[field] = float(value)
    if not isinstance(unit.resize_mode, str) or unit.resize_mode not in RESIZE_MODES:
        raise RequestError(
            "controls", f"resize_mode must be one of {', '.join(RESIZE_MODES)}, got {unit.resize_mode!r}"[:200]
        )
    if numbers["start"] >= numbers["end"]:
        raise RequestError("controls", f"start {numbers['start']:g} must be below end {numbers['end']:g}")
    _check_image(unit.image, size)
    return replace(unit, model=model, **numbers)


def _check_image(image: Any, size: tuple[int, int]) -> None:
    if isinstance(image, Image.Image):
        return
    if not isinstance(image, np.ndarray):
        raise RequestError("controls", f"image must be a PIL image or a (1, 3, H, W) array, got {type(image).__name__}")
    if image.ndim != 4 or image.shape[:2] != (1, 3) or (image.shape[3], image.shape[2]) != size:
        raise RequestError("controls", f"an image array must be (1, 3, {size[1]}, {size[0]}), got {list(image.shape)}")
    if not np.isfinite(image).all() or image.min() < 0 or image.max() > 1:
        raise RequestError("controls", "an image array's values must be finite and in [0, 1]")


def control_pixels(image: Image.Image | np.ndarray, width: int, height: int, mode: str = "just_resize") -> np.ndarray:
    """A control image as ControlNets read it (diffusers' control image processor): RGB brought to the output's
    size by `mode` (Lanczos), (1, 3, H, W) floats in [0, 1], not normalized."""
    if isinstance(image, np.ndarray):
        return image.astype(np.float32)
    image = fit(image.convert("RGB"), width, height, mode)
    return (np.asarray(image, dtype=np.float32) / 255.0).transpose(2, 0, 1)[None].copy()


def fit(image: Image.Image, width: int, height: int, mode: str) -> Image.Image:
    """`image` at width x height: stretched, or (A1111's) scaled to cover and centre-cropped, or scaled to fit
    and centred on black."""
    if image.size == (width, height):
        return image
    if mode == "just_resize":
        return image.resize((width, height), Image.Resampling.LANCZOS)
    scale = (max if mode == "crop_and_resize" else min)(width / image.width, height / image.height)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    resized = image.resize(size, Image.Resampling.LANCZOS)
    canvas = Image.new("RGB", (width, height))
    canvas.paste(resized, ((width - size[0]) // 2, (height - size[1]) // 2))  # a crop where it is larger
    return canvas


def infotext(unit: ControlUnit, guess_mode: bool) -> str:
    """A unit as A1111's ControlNet extension records it in the PNG parameters (`ControlNet 0: "..."`, quoted
    there as every value with commas is)."""
    mode = "ControlNet is more important" if guess_mode else "Balanced"
    return (f"Module: {unit.module}, Model: {unit.model}, Weight: {unit.scale:g}, Resize Mode: "
            f"{RESIZE_MODES[unit.resize_mode]}, Guidance Start: {unit.start:g}, Guidance End: {unit.end:g}, "
            f"Control Mode: {mode}")  # fmt: skip


def control_units(
    images: Any, names: Any = None, scales: Any = 1.0, starts: Any = 0.0, ends: Any = 1.0
) -> tuple[ControlUnit, ...]:
    """Units from diffusers' ControlNet arguments (control_image, controlnet_conditioning_scale,
    control_guidance_start/end: one value or one per image; `names`: the ControlNets', in the images' order,
    None for the model's own order)."""
    if images is None:
        return ()
    images = list(images) if isinstance(images, (list, tuple)) else [images]

    def each(value: Any, field: str) -> list[Any]:
        values = list(value) if isinstance(value, (list, tuple)) else [value] * len(images)
        if len(values) != len(images):
            raise RequestError("controls", f"{field} has {len(values)} values for {len(images)} control images")
        return values

    fields = (each(names, "controlnet"), each(scales, "controlnet_conditioning_scale"),
              each(starts, "control_guidance_start"), each(ends, "control_guidance_end"))  # fmt: skip
    return tuple(ControlUnit(image, *values) for image, *values in zip(images, *fields, strict=True))


def default_names(units: tuple[ControlUnit, ...], config: ModelConfig) -> tuple[ControlUnit, ...]:
    """Units that name no ControlNet take the model's in its order when there is one per unit (diffusers'
    MultiControlNetModel reads image i with ControlNet i)."""
    if len(units) > 1 and len(units) == len(config.controlnets) and all(u.model is None for u in units):
        return tuple(replace(u, model=name) for u, name in zip(units, config.controlnets, strict=True))
    return units


@dataclass
class ControlPlan:
    """The request's units ready to run: each with its graph's name and its pixels."""

    units: list[tuple[ControlUnit, str, np.ndarray]]
    guess_mode: bool

    @classmethod
    def prepare(cls, units: tuple[ControlUnit, ...], width: int, height: int, guess_mode: bool) -> ControlPlan:
        prepared = [(u, controlnet_component(u.model or ""), control_pixels(u.image, width, height, u.resize_mode))
                    for u in units]  # fmt: skip
        return cls(prepared, guess_mode)

    def scales_at(self, step: int, steps: int) -> list[float]:
        """Each unit's weight at `step` of `steps`: its scale inside its window, 0 outside (diffusers'
        controlnet_keep)."""
        return [0.0 if step / steps < u.start or (step + 1) / steps > u.end else u.scale for u, _, _ in self.units]

    def residuals(self, pipe: Any, sample: np.ndarray, t: float, cond: Conditioning, step: int, steps: int) -> dict:
        """The summed, scaled residuals for the UNet at this step, by its input names; {} when no unit acts."""
        rows = len(cond.text) // len(sample)
        guess = self.guess_mode and rows == 2
        inputs = sample if guess else np.concatenate([sample] * rows)
        conditioning = cond.conditional_half() if guess else cond
        total: list[np.ndarray] | None = None
        names: list[str] = []
        for (_, component, pixels), scale in zip(self.units, self.scales_at(step, steps), strict=True):
            if scale == 0.0:
                continue
            graph = pipe.component(component)
            feeds = pipe.family.denoiser_feeds(graph, inputs, t, conditioning)
            feeds = {k: v for k, v in feeds.items() if k in graph.graph_inputs}
            feeds["controlnet_cond"] = np.repeat(pixels, len(inputs), axis=0)
            outputs, names = graph(**feeds), graph.output_names
            pipe.release(component)  # low-memory mode: one graph at a time
            weights = np.logspace(-1, 0, len(outputs), dtype=np.float32) if guess else np.ones(len(outputs), np.float32)
            scaled = [o * np.float32(w * scale) for o, w in zip(outputs, weights, strict=True)]
            total = scaled if total is None else [a + b for a, b in zip(total, scaled, strict=True)]
        if total is None:
            return {}
        if guess:  # the unconditional half gets no residual
            total = [np.concatenate([np.zeros_like(r), r]) for r in total]
        return dict(zip(names, total, strict=True))
