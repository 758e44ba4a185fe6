"""Images in and out: NumPy <-> Pillow, decoding untrusted image bytes within a pixel limit, and PNG files
carrying their generation parameters (one writer for the CLI and the server)."""

from __future__ import annotations

import base64
import binascii
import io
import json
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, PngImagePlugin, UnidentifiedImageError


class ImageError(ValueError):
    """Image bytes that cannot be used: not an image, too large, truncated."""


def to_pil(images: np.ndarray) -> list[Image.Image]:
    """(N, H, W, 3) floats in [0, 1] -> PIL images, rounded as diffusers does."""
    return [Image.fromarray((img * 255).round().astype(np.uint8)) for img in images]


def from_pil(image: Image.Image, width: int, height: int) -> np.ndarray:
    """PIL image -> (1, 3, H, W) float32 in [-1, 1], resized to the requested size (img2img input)."""
    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    array = np.asarray(image, dtype=np.float32) / 255.0
    return (array.transpose(2, 0, 1)[None] * 2.0 - 1.0).astype(np.float32)


def decode_image(data: bytes | Path, max_pixels: int, mode: str = "RGB") -> Image.Image:
    """Decode image bytes (or a regular file, read lazily) to `mode` (RGB; RGBA keeps transparency), refusing
    more than `max_pixels` from the header, before any pixel is decoded (a PNG can declare 100000x100000 in a
    few bytes)."""
    if isinstance(data, Path) and not data.is_file():
        raise ImageError(f"{data}: not a regular file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(data if isinstance(data, Path) else io.BytesIO(data)) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise ImageError(f"image is {width}x{height}, over the limit of {max_pixels} pixels")
                return image.convert(mode)
    except Image.DecompressionBombError:
        raise ImageError(f"image is over the limit of {max_pixels} pixels") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        if isinstance(exc, ImageError):
            raise
        raise ImageError("not a readable image (PNG, JPEG, WebP, ...)") from None


def decode_base64_image(text: str, max_pixels: int) -> Image.Image:
    """A base64 image, optionally as a `data:image/...;base64,` URL, decoded within `max_pixels`."""
    return decode_image(base64_bytes(text), max_pixels)


def base64_bytes(text: str) -> bytes:
    """The bytes of base64 text, optionally a `data:image/...;base64,` URL (ImageError otherwise)."""
    if text.startswith("data:"):
        header, comma, text = text.partition(",")
        if not comma or ";base64" not in header:
            raise ImageError("a data URL must look like data:image/png;base64,<data>")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("not valid base64") from None


def a1111_parameters(prompt: str, negative_prompt: str | None, settings: dict[str, Any]) -> str:
    """The text A1111 writes into a PNG's "parameters" chunk, which many tools read back (infotext.py)."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{k}: {quote(v)}" for k, v in settings.items()))
    return "\n".join(lines)


def quote(value: Any) -> str:
    """A setting's value as infotext readers split it back (infotext.py, A1111's parser): JSON-quoted when it
    holds a comma or newline, which would split it ("interval 3, branch 0", a model named "a, b"), or starts
    with a quote; else as is. (A1111 quotes colons too; its parser reads a value to the next comma, so a value
    such as "style:0.8" reads back whole unquoted.)"""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if "," in text or "\n" in text or text.startswith('"') else text


def parameters_text(request: Any, parameters: dict[str, Any], index: int) -> str:
    """The "parameters" text of image `index` of a resolved GenerationRequest: its prompt, negative prompt and
    seed (see `GenerationRequest.image_parameters`), so the PNG says how to make that very image again."""
    prompt = request.prompts[index // request.batch]
    negatives = request.negative_prompts
    negative = negatives[index // request.batch] if negatives else None
    return a1111_parameters(prompt, negative, request.image_parameters(parameters, index))


def png_bytes(image: Image.Image, parameters: str | None = None) -> bytes:
    """The image as PNG, with `parameters` in a tEXt "parameters" chunk when given."""
    info = PngImagePlugin.PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def check_writable(path: Path) -> None:
    """Fail before any work if a PNG cannot be written at `path`: not a .png name, an existing directory or
    other non-regular file (a device, a FIFO), a folder that is a file, or a folder that cannot be written.
    Creates nothing: the probe file goes into the nearest folder that exists."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise OSError(f"{path}: sd-run writes PNG files; give a name ending in .png")
    if path.exists() and not path.is_file():
        raise OSError(f"{path}: exists and is not a regular file")
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise OSError(f"{path}: {folder} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise OSError(f"{path}: cannot write in {folder} ({exc.strerror or exc})") from None


def save_png(image: Image.Image, path: Path, parameters: str) -> None:
    """Write a PNG with its parameters under a temporary name beside `path`, then rename: an interrupted or
    failed save leaves neither a truncated PNG nor the temporary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = _partial(path)
    try:
        partial.write_bytes(png_bytes(image, parameters))
        partial.replace(path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def _partial(path: Path) -> Path:
    return path.with_name(f".{path.name}.partial")
