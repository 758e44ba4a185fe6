"""Reading generation parameters back: A1111's "infotext" (the text of a PNG's `parameters` chunk, which this
runtime writes too, see image.a1111_parameters) parsed as A1111's `parse_generation_parameters` does, and a
PNG's text chunks read within a pixel limit. Used by POST /sdapi/v1/png-info.

The infotext is the prompt, an optional "Negative prompt: ..." part, and a last line of `Key: value` pairs
separated by commas (a value holding a comma or newline is a JSON string). Values stay strings, as A1111
leaves them; `Size: 64x48` also gives `Size-1` and `Size-2`; keys A1111 fills in when absent (Clip skip 1,
RNG GPU, ...) are filled the same way, so a client sees what A1111 would show.
"""

from __future__ import annotations

import io
import json
import re
import warnings
from typing import Any

from PIL import Image, UnidentifiedImageError

from .image import ImageError

# A1111's expressions (modules/infotext_utils.py), so the same text splits the same way.
PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
IMAGE_SIZE = re.compile(r"^(\d+)x(\d+)$")
# What A1111 assumes for a key an infotext leaves out.
DEFAULTS: dict[str, Any] = {
    "Clip skip": "1",
    "Hires resize-1": 0,
    "Hires resize-2": 0,
    "Hires sampler": "Use same sampler",
    "Hires schedule type": "Use same scheduler",
    "Hires checkpoint": "Use same checkpoint",
    "Hires prompt": "",
    "Hires negative prompt": "",
    "Mask mode": "Inpaint masked",
    "Masked content": "original",
    "Inpaint area": "Whole picture",
    "Masked area padding": 32,
    "RNG": "GPU",
    "Schedule type": "Automatic",
    "Schedule max sigma": 0,
    "Schedule min sigma": 0,
    "Schedule rho": 0,
    "VAE Encoder": "Full",
    "VAE Decoder": "Full",
    "FP8 weight": "Disable",
    "Refiner switch by sampling steps": False,
}
# Image info that is not text about the generation (A1111's IGNORED_INFO_KEYS).
NOT_TEXT = {"jfif", "jfif_version", "jfif_unit", "jfif_density", "dpi", "exif", "loop", "background", "timestamp",
            "duration", "progressive", "progression", "icc_profile", "chromaticity", "photoshop"}  # fmt: skip


def parse_infotext(text: str) -> dict[str, Any]:
    """An infotext as A1111 parses it: "Prompt", "Negative prompt" and each `Key: value` of the last line."""
    *lines, last = text.strip().split("\n")
    if len(PARAM.findall(last)) < 3:  # A1111: a last line with fewer pairs is part of the prompt
        lines.append(last)
        last = ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:") :].strip()
        (negative if in_negative else prompt).append(line)
    result: dict[str, Any] = {}
    for key, value in PARAM.findall(last):
        if len(value) > 1 and value[0] == value[-1] == '"':
            value = _unquote(value)
        size = IMAGE_SIZE.match(value)
        if size:
            result[f"{key}-1"], result[f"{key}-2"] = size.group(1), size.group(2)
        else:
            result[key] = value
    result["Prompt"], result["Negative prompt"] = "\n".join(prompt), "\n".join(negative)
    return {**result, **{k: v for k, v in DEFAULTS.items() if k not in result}}


def read_info(data: bytes, max_pixels: int) -> tuple[str | None, dict[str, str]]:
    """An image's `parameters` text and its other text entries. Text before the pixel data (where A1111 and
    this runtime write it) is read from the header alone; an image of at most `max_pixels` is decoded too, for
    text after its pixels. ImageError when the bytes are no readable image."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                if image.width * image.height <= max_pixels:
                    image.load()
                info = dict(image.info)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        raise ImageError("not a readable image (PNG, JPEG, WebP, ...)") from None
    items = {k: v for k, v in info.items() if isinstance(k, str) and isinstance(v, str) and k not in NOT_TEXT}
    return items.pop("parameters", None), items


def _unquote(text: str) -> str:
    try:
        return json.loads(text)
    except ValueError:
        return text
