"""A1111's ControlNet extension API: the units of `alwayson_scripts: {"ControlNet": {"args": [unit, ...]}}` on
txt2img and img2img, and GET /controlnet/version, /controlnet/model_list, /controlnet/module_list and POST
/controlnet/detect (the preprocessors alone).

A unit's fields as the extension and its clients (webuiapi's ControlNetUnit) send them: `enabled`, `image` (base64,
or {"image": ..., "mask": ...}) or `input_image` (without one, img2img's init image, as the extension does),
`module`, `model` ("name" or "name [hash]"; "None": the model's only ControlNet), `weight`, `resize_mode`,
`processor_res`, `threshold_a`/`threshold_b` (-1: the module's defaults), `guidance_start`/`guidance_end`,
`control_mode` ("ControlNet is more important" is diffusers' guess mode for every unit) and `pixel_perfect` (the
preprocessor's resolution from the output's size). A unit's `mask` and "My prompt is more important" are listed
under `ignored` (a 422 under --strict). A bad field is a 422 naming it, as alwayson_scripts.ControlNet.args[i].field.
"""

from __future__ import annotations

import asyncio
import base64
from typing import Any

from fastapi import APIRouter, HTTPException
from PIL import Image
from pydantic import BaseModel, Field

from ..annotator_models import AnnotatorNetwork
from ..annotators import annotate, module_names
from ..controlnet import MAX_CONTROL_SCALE, MAX_CONTROLS, ControlUnit
from ..echo import echo
from ..image import ImageError, decode_base64_image, png_bytes
from ..request import RequestError
from .state import ServerState

RESIZE_MODES = {
    0: "just_resize", "Just Resize": "just_resize",
    1: "crop_and_resize", "Crop and Resize": "crop_and_resize", "Inner Fit (Scale to Fit)": "crop_and_resize",
    2: "resize_and_fill", "Resize and Fill": "resize_and_fill", "Outer Fit (Shrink to Fit)": "resize_and_fill",
}  # fmt: skip
CONTROL_MODES = {0: 0, "Balanced": 0, 1: 1, "My prompt is more important": 1, 2: 2, "ControlNet is more important": 2}
DEFAULT_RESOLUTION = 512  # the extension's processor_res
MAX_DETECT_IMAGES = 8


def find_script(extra: dict[str, Any]) -> tuple[str, list[Any]] | None:
    """The ControlNet entry of a body's `alwayson_scripts` (its key as sent, its args), or None."""
    scripts = extra.get("alwayson_scripts")
    if not isinstance(scripts, dict):
        return None
    for key, entry in scripts.items():
        if str(key).lower() != "controlnet":
            continue
        if not isinstance(entry, dict) or "args" not in entry:
            raise HTTPException(422, f"alwayson_scripts.{key}: must be an object with args: [unit, ...]")
        return key, entry["args"] if entry["args"] is not None else []
    return None


async def control_units(
    extra: dict[str, Any],
    init_image: Image.Image | None,
    size: tuple[int, int],
    limit: int,
    models: list[str],
    networks: dict[str, AnnotatorNetwork],
) -> tuple[tuple[ControlUnit, ...], bool, list[str]]:
    """The enabled units of a body's ControlNet script, their images read and preprocessed (with the exported
    preprocessor `networks`); whether any asks for guess mode; the fields listed as ignored. `models`: the
    ControlNets a unit's `model` may name."""
    found = find_script(extra)
    if found is None:
        return (), False, []
    key, args = found
    where = f"alwayson_scripts.{key}.args"
    if not isinstance(args, list):
        raise HTTPException(422, f"{where}: must be a list of units")
    enabled = [(i, u) for i, u in enumerate(args) if not (isinstance(u, dict) and u.get("enabled", True) is False)]
    if len(enabled) > MAX_CONTROLS:
        raise HTTPException(422, f"{where}: {len(enabled)} enabled units exceeds the limit of {MAX_CONTROLS}")
    units, modes, ignored = [], set(), []
    for i, unit in enabled:
        if not isinstance(unit, dict):
            raise HTTPException(422, f"{where}[{i}]: must be an object, got {type(unit).__name__}")
        prefix = f"{where}[{i}]."  # a field's name follows
        image, mask = await _image(unit, prefix, init_image, limit)
        if mask:
            ignored.append(f"{prefix}mask")
        mode = _choice(unit.get("control_mode", 0), CONTROL_MODES, f"{prefix}control_mode")
        if mode == 1:
            ignored.append(f"{prefix}control_mode")
        modes.add(mode)
        units.append(await asyncio.to_thread(_unit, unit, prefix, image, size, models, networks))
    return tuple(units), 2 in modes, ignored


async def _image(unit: dict, prefix: str, init: Image.Image | None, limit: int) -> tuple[Image.Image, bool]:
    """The unit's control image (decoded off the event loop, within `limit` pixels) and whether it has a mask."""
    data = unit.get("image") if unit.get("image") not in (None, "") else unit.get("input_image")
    field = "image" if unit.get("image") not in (None, "") else "input_image"
    mask = unit.get("mask")
    if isinstance(data, dict):
        data, mask = data.get("image"), data.get("mask") or mask
    if data in (None, ""):
        if init is None:
            raise HTTPException(422, f"{prefix}image: required (a base64 image) on txt2img")
        return init, bool(mask)
    if not isinstance(data, str):
        raise HTTPException(422, f"{prefix}{field}: must be a base64 image, got {type(data).__name__}")
    try:
        return await asyncio.to_thread(decode_base64_image, data, limit), bool(mask)
    except ImageError as exc:
        raise HTTPException(422, f"{prefix}{field}: {exc}") from None


def _unit(
    unit: dict,
    prefix: str,
    image: Image.Image,
    size: tuple[int, int],
    models: list[str] | None,
    networks: dict[str, AnnotatorNetwork],
) -> ControlUnit:
    """The unit as a ControlUnit, its image preprocessed; a 422 names a field as `prefix` + the unit's name."""
    module = str(unit.get("module") or "none").lower()
    resize = _choice(unit.get("resize_mode", "Crop and Resize"), RESIZE_MODES, f"{prefix}resize_mode")
    resolution = unit.get("processor_res", DEFAULT_RESOLUTION)
    if unit.get("pixel_perfect"):
        resolution = pixel_perfect_resolution(image, size, resize)
    elif resolution in (None, -1):
        resolution = DEFAULT_RESOLUTION
    thresholds = [None if unit.get(n) in (None, -1) else unit.get(n) for n in ("threshold_a", "threshold_b")]
    try:
        control = annotate(image, module, resolution if module != "none" else None, *thresholds, networks=networks)
    except RequestError as exc:
        field = "processor_res" if exc.field == "resolution" else exc.field
        raise HTTPException(422, f"{prefix}{field}: {exc.reason}") from None
    model = unit.get("model")
    if model is not None and not isinstance(model, str):
        raise HTTPException(422, f"{prefix}model: must be a ControlNet's name, got {type(model).__name__}")
    model = None if model in (None, "", "None", "none") else model.split(" [")[0]  # "name [hash]"
    if models is not None and model is not None and model not in models:
        raise HTTPException(422, f"{prefix}model: no ControlNet named {echo(model)}; this model has "
                                 f"{', '.join(models) or 'none'}")  # fmt: skip
    numbers = {}
    for name, field, default, high in (("scale", "weight", 1.0, MAX_CONTROL_SCALE), ("start", "guidance_start", 0.0,
                                       1.0), ("end", "guidance_end", 1.0, 1.0)):  # fmt: skip
        value = unit.get(field, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= high:
            raise HTTPException(422, f"{prefix}{field}: must be a number in [0, {high:g}], got {echo(value)}")
        numbers[name] = float(value)
    if numbers["start"] >= numbers["end"]:
        raise HTTPException(422, f"{prefix}guidance_start: {numbers['start']:g} must be below guidance_end "
                                 f"{numbers['end']:g}")  # fmt: skip
    return ControlUnit(control, model, resize_mode=resize, module=module, **numbers)


def pixel_perfect_resolution(image: Image.Image, size: tuple[int, int], resize_mode: str) -> int:
    """The preprocessor resolution at which the control image comes out at the output's scale (the extension's
    pixel_perfect: fit inside for resize-and-fill, cover otherwise)."""
    scales = (size[1] / image.height, size[0] / image.width)
    scale = min(scales) if resize_mode == "resize_and_fill" else max(scales)
    return max(64, min(4096, round(scale * min(image.size))))


def _choice(value: Any, choices: dict, field: str) -> Any:
    try:
        return choices[value]
    except (KeyError, TypeError):
        names = ", ".join(str(k) for k in choices if isinstance(k, str))
        raise HTTPException(422, f"{field}: must be one of {names} (or 0, 1, 2), got {echo(value)}") from None


class DetectRequest(BaseModel):
    """POST /controlnet/detect, as the extension takes it (webuiapi sends `controlnet_images`)."""

    controlnet_module: str = "none"
    controlnet_input_images: list[str] = Field(default_factory=list, max_length=MAX_DETECT_IMAGES)
    controlnet_images: list[str] = Field(default_factory=list, max_length=MAX_DETECT_IMAGES)
    controlnet_processor_res: int = DEFAULT_RESOLUTION
    controlnet_threshold_a: float = -1
    controlnet_threshold_b: float = -1


def add_routes(api: APIRouter, state: ServerState) -> None:
    @api.get("/controlnet/version")
    def version() -> dict[str, Any]:
        return {"version": 2}

    @api.get("/controlnet/model_list")
    def model_list() -> dict[str, Any]:
        """The current model's ControlNets, by the names units give as `model`."""
        return {"model_list": list(state.current_model().config.controlnets)}

    @api.get("/controlnet/module_list")
    def module_list() -> dict[str, Any]:
        return {"module_list": module_names(state.annotators)}

    @api.post("/controlnet/detect")
    async def detect(body: DetectRequest) -> dict[str, Any]:
        pipe, _ = state.ready()
        limit = state.config.limits.input_pixels(pipe.config)
        images, name = body.controlnet_input_images or body.controlnet_images, "controlnet_input_images"
        if not images:
            raise HTTPException(422, f"{name}: give at least one base64 image")
        out = []
        for i, data in enumerate(images):
            unit = {"image": data, "module": body.controlnet_module, "processor_res": body.controlnet_processor_res,
                    "threshold_a": body.controlnet_threshold_a, "threshold_b": body.controlnet_threshold_b}  # fmt: skip
            try:
                image = await asyncio.to_thread(decode_base64_image, data, limit)
            except ImageError as exc:
                raise HTTPException(422, f"{name}[{i}]: {exc}") from None
            control = await asyncio.to_thread(_unit, unit, "controlnet_", image, image.size, None, state.annotators)
            out.append(base64.b64encode(png_bytes(control.image)).decode())
        return {"images": out, "info": "Success"}
