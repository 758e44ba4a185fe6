"""Image conversions between NumPy and Pillow, and the A1111 "parameters" PNG text chunk."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, PngImagePlugin


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


def a1111_parameters(prompt: str, negative_prompt: str | None, settings: dict[str, Any]) -> str:
    """The text A1111 writes into a PNG's "parameters" chunk, which many tools read back."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{k}: {v}" for k, v in settings.items()))
    return "\n".join(lines)


def save_png(image: Image.Image, path: Path, parameters: str) -> None:
    """Save with the generation parameters in a tEXt "parameters" chunk (folders made as needed; written
    under a temporary name and renamed, so an interrupted save leaves no truncated PNG)."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    image.save(partial, format="PNG", pnginfo=info)
    partial.replace(path)
