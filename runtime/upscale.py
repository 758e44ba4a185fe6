"""Upscaling images, torch-free: exported ESRGAN-class models (`sd-export upscaler`) and A1111's plain resamplers.

`upscale_image(image, name, scale_or_size, upscalers)` is the one entry point for the CLI, the server's extras
routes and hires fix. Names follow A1111: "None" and "Lanczos" resize with Lanczos, "Nearest" with nearest
neighbour, any other name is a loaded `Upscaler`. A model runs as A1111's `Upscaler.upscale` runs it: whole
passes at its native scale while the image is smaller than the target (at most 3; one pass when the target is
the image's own size, which applies a restoration model), then a Lanczos resize to the exact target.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

from .echo import echo
from .files import UntrustedFileError
from .image import ImageError, check_writable, decode_image
from .request import RequestError
from .session import CPU, OPENVINO, OnnxModel, SessionConfig, resolve_providers
from .upscale_tiles import UpscaleCancelled, upscale_tiled
from .upscaler_manifest import CHANNEL_MODES, UpscalerManifest

__all__ = ["RESAMPLERS", "UpscaleCancelled", "Upscaler", "image_resizers", "load_upscalers", "plan", "upscale_file",
           "upscale_image"]  # fmt: skip

# A1111's built-in upscalers that need no model.
RESAMPLERS = {
    "None": Image.Resampling.LANCZOS,
    "Lanczos": Image.Resampling.LANCZOS,
    "Nearest": Image.Resampling.NEAREST,
}
MAX_PASSES = 3  # as A1111
MAX_SCALE = 64.0
MAX_FILE_PIXELS = 8192 * 8192  # `sd-run upscale`: the input image, every pass and the result
DEFAULT_RESAMPLER_SCALE = 2.0  # A1111's upscaling_resize default
ScaleOrSize = float | tuple[int, int]


class Upscaler:
    """One exported upscaler folder: its checked manifest and, from the first image on, its session."""

    def __init__(
        self, folder: Path, name: str | None = None, provider: str = "cpu", threads: int | None = None
    ) -> None:
        """Read and check `folder` (manifest schema, graph inside the folder, graph sha256); UntrustedFileError
        naming the file otherwise. The session is made on first use, so listing upscalers costs no memory."""
        self.folder = Path(folder)
        self.manifest, self.graph = UpscalerManifest.load(self.folder)
        self.name = name or self.manifest.name or self.folder.name
        providers = tuple(p for p in resolve_providers(provider) if p != OPENVINO) or (CPU,)
        self.config = SessionConfig(providers=providers, threads=threads, cache=False)
        self._session: OnnxModel | None = None
        self._lock = threading.Lock()

    @property
    def scale(self) -> int:
        return self.manifest.scale

    def session(self) -> OnnxModel:
        """The onnxruntime session, made once (thread-safe)."""
        with self._lock:
            if self._session is None:
                self._session = OnnxModel(self.graph, None, self.config)
            return self._session

    def run(
        self,
        image: Image.Image,
        tile: int | None = None,
        overlap: int | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> Image.Image:
        """One pass at the native scale, tile by tile (upscale_tiles.py); an alpha channel the model has no
        room for is resized with Lanczos beside it."""
        tile, overlap = self._tiling(tile, overlap)
        mode = CHANNEL_MODES[self.manifest.channels]
        alpha = image.getchannel("A") if "A" in image.getbands() and mode != "RGBA" else None
        pixels = np.asarray(image.convert(mode)).reshape(image.height, image.width, -1)
        multiple = self.manifest.input_multiple
        padded = _pad_to_multiple(pixels, multiple)
        session = self.session()
        out = upscale_tiled(lambda x: session(image=x)[0], padded, self.scale, tile, overlap, multiple, cancelled)
        out = out[: image.height * self.scale, : image.width * self.scale]
        result = Image.fromarray(out[..., 0] if out.shape[-1] == 1 else out, mode)
        if alpha is not None:
            result = result.convert("RGBA")
            result.putalpha(alpha.resize(result.size, Image.Resampling.LANCZOS))
        return result

    def _tiling(self, tile: int | None, overlap: int | None) -> tuple[int, int]:
        """The tile (a multiple of the input multiple, at least 32) and overlap (at most half a tile)."""
        multiple = self.manifest.input_multiple
        tile = self.manifest.tile if tile is None else tile
        if isinstance(tile, bool) or not isinstance(tile, int) or not 32 <= tile <= 8192:
            raise ValueError(f"tile: must be an integer in 32..8192, got {echo(tile)}")
        tile = tile // multiple * multiple
        overlap = min(self.manifest.tile_overlap, tile // 4) if overlap is None else overlap
        if isinstance(overlap, bool) or not isinstance(overlap, int) or not 0 <= overlap <= tile // 2:
            raise ValueError(f"overlap: must be an integer in 0..{tile // 2} (half the tile), got {echo(overlap)}")
        return tile, overlap


def _pad_to_multiple(pixels: np.ndarray, multiple: int) -> np.ndarray:
    """Pad bottom and right to multiples of `multiple` by reflection (by repetition for a tiny image)."""
    pad = [(0, -pixels.shape[0] % multiple), (0, -pixels.shape[1] % multiple), (0, 0)]
    if not pad[0][1] and not pad[1][1]:
        return pixels
    mode = "reflect" if min(pixels.shape[:2]) > multiple else "edge"
    return np.pad(pixels, pad, mode=mode)


def load_upscalers(folder: Path | None, provider: str = "cpu", threads: int | None = None) -> dict[str, Upscaler]:
    """Every exported upscaler in the sub-folders of `folder` (hidden ones, such as an export in progress, are
    skipped), by sub-folder name; {} for None. UntrustedFileError naming the first folder that is unusable."""
    if folder is None:
        return {}
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise UntrustedFileError(f"{folder}: no such folder of upscalers")
    upscalers = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if sub.name in RESAMPLERS:
            raise UntrustedFileError(f"{sub}: {sub.name} is the name of a built-in upscaler; rename the folder")
        upscalers[sub.name] = Upscaler(sub, sub.name, provider, threads)
    return upscalers


def target_size(size: tuple[int, int], scale_or_size: ScaleOrSize) -> tuple[int, int]:
    """(width, height) to reach: round(side * scale) for a scale, or the (width, height) given; ValueError
    for anything else."""
    if isinstance(scale_or_size, tuple):
        if len(scale_or_size) == 2 and all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                           for v in scale_or_size):  # fmt: skip
            return scale_or_size
        raise ValueError(f"size: must be (width, height) in positive integers, got {echo(scale_or_size)}")
    scale = scale_or_size
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale <= MAX_SCALE:
        raise ValueError(f"scale: must be a number in (0, {MAX_SCALE:g}], got {echo(scale)}")
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def passes(size: tuple[int, int], target: tuple[int, int], scale: int) -> list[tuple[int, int]]:
    """The sizes after each model pass for an image of `size` and a model of `scale`, as A1111 loops them."""
    sizes, current = [], size
    for i in range(MAX_PASSES):
        if current[0] >= target[0] and current[1] >= target[1] and (i > 0 or target != size):
            break
        sizes.append((current[0] * scale, current[1] * scale))
        if scale == 1:
            break
        current = sizes[-1]
    return sizes


def plan(
    size: tuple[int, int],
    name: str,
    scale_or_size: ScaleOrSize,
    upscalers: dict[str, Upscaler],
    max_pixels: int | None = None,
) -> tuple[tuple[int, int], list[tuple[int, int]]]:
    """(target size, size after each model pass) of upscaling an image of `size` with `name`; ValueError for an
    unknown name, a bad scale or size, or a pass or result over `max_pixels`."""
    target = target_size(size, scale_or_size)
    upscaler = _find(name, upscalers)
    steps = passes(size, target, upscaler.scale) if upscaler else []
    if max_pixels is not None:
        for step in (*steps, target):
            if step[0] * step[1] > max_pixels:
                raise ValueError(
                    f"upscaling {size[0]}x{size[1]} to {target[0]}x{target[1]} with {name} makes a "
                    f"{step[0]}x{step[1]} image, over the limit of {max_pixels} pixels"
                )
    return target, steps


def upscale_image(
    image: Image.Image,
    name: str,
    scale_or_size: ScaleOrSize,
    upscalers: dict[str, Upscaler],
    *,
    max_pixels: int | None = None,
    tile: int | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> Image.Image:
    """`image` resized to `scale_or_size` (a scale, or an exact (width, height)) with the upscaler `name`: a
    resampler of RESAMPLERS or a key of `upscalers`. Every intermediate and the result must stay within
    `max_pixels`, checked before any work (see `plan`); ValueError naming what is wrong, UpscaleCancelled when
    `cancelled()` turns true between tiles."""
    target, steps = plan(image.size, name, scale_or_size, upscalers, max_pixels)
    if image.mode not in ("L", "RGB", "RGBA"):
        image = image.convert("RGBA" if "A" in image.getbands() or "transparency" in image.info else "RGB")
    if not steps and name in RESAMPLERS:
        return image if image.size == target else image.resize(target, RESAMPLERS[name])
    for _ in steps:
        image = upscalers[name].run(image, tile, cancelled=cancelled)
    return image if image.size == target else image.resize(target, Image.Resampling.LANCZOS)


def image_resizers(upscalers: dict[str, Upscaler]) -> dict[str, Callable[[Image.Image, int, int], Image.Image]]:
    """The model upscalers as (image, width, height) -> image functions, by name: what hires fix takes as more
    image upscalers (hires_upscalers.find_upscaler's `more`)."""
    return {name: _resizer(name, upscalers) for name in upscalers}


def _resizer(name: str, upscalers: dict[str, Upscaler]) -> Callable[[Image.Image, int, int], Image.Image]:
    return lambda image, width, height: upscale_image(image, name, (width, height), upscalers)


def _find(name: str, upscalers: dict[str, Upscaler]) -> Upscaler | None:
    if name in RESAMPLERS:
        return None
    if isinstance(name, str) and name in upscalers:
        return upscalers[name]
    known = ", ".join([*RESAMPLERS, *upscalers])
    raise ValueError(f"unknown upscaler {echo(name)} (known: {known})")


def postprocessing_text(scale_or_size: ScaleOrSize, name: str) -> str:
    """The infotext A1111's extras write for an upscale ("Postprocess upscale by: 4, Postprocess upscaler: X")."""
    if isinstance(scale_or_size, tuple):
        return f"Postprocess upscale to: {scale_or_size[0]}x{scale_or_size[1]}, Postprocess upscaler: {name}"
    shown = int(scale_or_size) if float(scale_or_size).is_integer() else scale_or_size
    return f"Postprocess upscale by: {shown}, Postprocess upscaler: {name}"


MAX_KEPT_TEXT = 64 * 1024  # a source PNG's parameters are kept up to this many characters


def postprocessed_png(image: Image.Image, postprocessing: str, source: Image.Image | None = None) -> bytes:
    """PNG bytes with A1111's extras metadata: the source's "parameters" chunk kept (when a string of sane
    length) and a "postprocessing" chunk saying what was done."""
    info = PngImagePlugin.PngInfo()
    parameters = (source.info if source is not None else {}).get("parameters")
    if isinstance(parameters, str) and len(parameters) <= MAX_KEPT_TEXT:
        info.add_text("parameters", parameters)
    if postprocessing:
        info.add_text("postprocessing", postprocessing)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def upscale_file(
    image: Path, output: Path, model: str, scale: float | None, tile: int | None, threads: int | None = None
) -> list[str]:
    """`sd-run upscale`: IMAGE upscaled with `model` (an exported folder or a resampler name) into the PNG
    `output`, written atomically; RequestError naming the option, or OSError, for anything unusable, before any
    work."""
    output = Path(output)
    check_writable(output)
    if tile is not None and not 32 <= tile <= 8192:
        raise RequestError("--tile", f"must be in 32..8192, got {tile}")
    found = None if model in RESAMPLERS and not Path(model).is_dir() else _file_model(model, threads)
    name, upscalers = (found.name, {found.name: found}) if found else (model, {})
    scale = scale if scale is not None else found.scale if found else DEFAULT_RESAMPLER_SCALE
    try:
        picture = decode_image(Path(image), MAX_FILE_PIXELS, "RGBA")
    except ImageError as exc:
        raise RequestError("IMAGE", str(exc) if str(image) in str(exc) else f"{image}: {exc}") from None
    if picture.getextrema()[3] == (255, 255):
        picture = picture.convert("RGB")  # opaque: keep no alpha channel
    try:
        plan(picture.size, name, scale, upscalers, MAX_FILE_PIXELS)
    except ValueError as exc:
        raise RequestError("--scale", str(exc).removeprefix("scale: ")) from None
    result = upscale_image(picture, name, scale, upscalers, max_pixels=MAX_FILE_PIXELS, tile=tile)
    data = postprocessed_png(result, postprocessing_text(scale, name), source=picture)
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(f".{output.name}.partial")
    try:
        partial.write_bytes(data)
        partial.replace(output)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return [str(output)]


def _file_model(model: str, threads: int | None) -> Upscaler:
    folder = Path(model).expanduser()
    if folder.is_file():
        raise RequestError("--model", f"{model}: is a file; export it first: sd-export upscaler {model} FOLDER")
    try:
        return Upscaler(folder, threads=threads)
    except UntrustedFileError as exc:
        names = ", ".join(RESAMPLERS)
        raise RequestError("--model", f"{exc} (or name a resampler: {names})") from None
