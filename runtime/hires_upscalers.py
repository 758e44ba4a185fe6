"""The hires fix's upscalers, looked up by name in one place (`find_upscaler`): A1111's latent modes, which resize
the denoised latents as `torch.nn.functional.interpolate` does (here in NumPy), and its image upscalers None,
Lanczos and Nearest, which resize the decoded picture as A1111's `images.resize_image` does.

Names are A1111's (`shared.latent_upscale_modes`, `modules/upscaler.py`) and match in any case. Model upscalers
(runtime/upscale.py, when a deployment has them) join here as more image upscalers, so every front end and the
checks see the same list.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
from PIL import Image

ImageResize = Callable[[Image.Image, int, int], Image.Image]
"""(picture, width, height) -> the picture at that size."""

# A1111's shared.latent_upscale_modes: name -> (torch interpolate mode, antialias).
LATENT_MODES = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
DEFAULT_UPSCALER = "Latent"  # A1111's latent_upscale_default_mode, used when a request names none
CUBIC_A = -0.75  # torch's bicubic (Keys' a); its antialiased bicubic uses PIL's -0.5
CUBIC_A_ANTIALIAS = -0.5


@dataclass(frozen=True)
class Upscaler:
    """One named upscaler: a latent mode (`mode`, `antialias`) or an image resize (`resize`)."""

    name: str
    mode: str | None = None
    antialias: bool = False
    resize: ImageResize | None = None

    @property
    def latent(self) -> bool:
        return self.mode is not None

    def upscale_latents(self, latents: np.ndarray, height: int, width: int) -> np.ndarray:
        """(N, C, h, w) latents at (height, width), as `torch.nn.functional.interpolate` with this mode."""
        return interpolate(latents, (height, width), self.mode, self.antialias)


def resize_with(resample: Image.Resampling | None) -> ImageResize:
    """A1111's `images.resize_image(0, picture, width, height, upscaler)` for its built-in upscalers: None resizes
    with Lanczos at once; Lanczos and Nearest first scale by the larger ratio with their filter, to a size rounded
    down to a multiple of 8 (`Upscaler.upscale`), and Lanczos takes that to the exact size."""

    def resize(image: Image.Image, width: int, height: int) -> Image.Image:
        scale = max(width / image.width, height / image.height)
        if resample is not None and scale > 1.0:
            goal = (int((image.width * scale) // 8 * 8), int((image.height * scale) // 8 * 8))
            image = image.resize((int(image.width * scale), int(image.height * scale)), resample=resample)
            if image.size != goal:
                image = image.resize(goal, resample=Image.Resampling.LANCZOS)
        if image.size != (width, height):
            image = image.resize((width, height), resample=Image.Resampling.LANCZOS)
        return image

    return resize


IMAGE_UPSCALERS: dict[str, ImageResize] = {
    "None": resize_with(None),
    "Lanczos": resize_with(Image.Resampling.LANCZOS),
    "Nearest": resize_with(Image.Resampling.NEAREST),
}


def upscaler_names() -> list[str]:
    """Every name `find_upscaler` knows, latent modes first (A1111's order)."""
    return [*LATENT_MODES, *IMAGE_UPSCALERS]


def find_upscaler(name: str | None, more: Mapping[str, ImageResize] | None = None) -> Upscaler | None:
    """The upscaler called `name` (any case; None: A1111's default, "Latent"), or None when there is none: a
    latent mode, a built-in image upscaler, or one of `more` (a deployment's model upscalers)."""
    wanted = (DEFAULT_UPSCALER if name is None else name).casefold()
    for known, (mode, antialias) in LATENT_MODES.items():
        if known.casefold() == wanted:
            return Upscaler(known, mode=mode, antialias=antialias)
    for known, resize in {**IMAGE_UPSCALERS, **(more or {})}.items():
        if known.casefold() == wanted:
            return Upscaler(known, resize=resize)
    return None


# Interpolation ----------------------------------------------------------------------------------------------


def interpolate(latents: np.ndarray, size: tuple[int, int], mode: str, antialias: bool = False) -> np.ndarray:
    """`torch.nn.functional.interpolate(latents, size=size, mode=mode, antialias=antialias)` (align_corners
    False) for (N, C, H, W) float32 arrays: "nearest", "nearest-exact", "bilinear", "bicubic". Each axis is a
    matrix of torch's source indices and weights (in float32 where torch computes them in float32), applied to
    the width first, then the height, in float32 as torch's CPU kernels do."""
    array = np.asarray(latents, np.float32)
    rows = _axis_weights(array.shape[2], size[0], mode, antialias)
    columns = _axis_weights(array.shape[3], size[1], mode, antialias)
    wide = np.einsum("ncyx,ox->ncyo", array, columns, dtype=np.float32, optimize=False)
    return np.einsum("ncyo,py->ncpo", wide, rows, dtype=np.float32, optimize=False)


def _axis_weights(size_in: int, size_out: int, mode: str, antialias: bool) -> np.ndarray:
    """(size_out, size_in) float32: output index i is the weighted sum of input row j with weight [i, j]."""
    if mode in ("nearest", "nearest-exact"):
        weights = np.zeros((size_out, size_in), np.float32)
        weights[np.arange(size_out), _nearest(size_in, size_out, exact=mode == "nearest-exact")] = 1.0
        return weights
    if mode not in ("bilinear", "bicubic"):
        raise ValueError(f"interpolation mode must be nearest, nearest-exact, bilinear or bicubic, got {mode!r}")
    if size_in == size_out:  # torch copies an axis whose size does not change
        return np.eye(size_out, dtype=np.float32)
    if antialias:
        return _antialiased(size_in, size_out, cubic=mode == "bicubic")
    return _linear(size_in, size_out) if mode == "bilinear" else _cubic(size_in, size_out)


def _nearest(size_in: int, size_out: int, exact: bool) -> np.ndarray:
    """torch's nearest_idx / nearest_exact_idx: floor(i * scale) or floor((i + 0.5) * scale) in float32."""
    index = np.arange(size_out)
    if not exact and size_out == size_in:
        return index
    if not exact and size_out == 2 * size_in:
        return index >> 1
    scale = np.float32(size_in) / np.float32(size_out)
    offset = np.float32(0.5 if exact else 0.0)
    source = np.floor((index.astype(np.float32) + offset) * scale).astype(np.int64)
    return np.minimum(source, size_in - 1)


def _source(size_in: int, size_out: int, cubic: bool) -> tuple[np.ndarray, np.ndarray]:
    """torch's area_pixel_compute_source_index and guard_index_and_lambda in float32: each output's first
    source index and its fraction past it (linear modes clamp the source position at 0, cubic does not)."""
    scale = np.float32(size_in) / np.float32(size_out)
    # scale * (i + 0.5) - 0.5 with one rounding, as the compiler fuses it into a multiply-add
    real = (np.float64(scale) * (np.arange(size_out) + 0.5) - 0.5).astype(np.float32)
    if not cubic:
        real = np.maximum(real, np.float32(0.0))
    index = np.minimum(np.floor(real).astype(np.int64), size_in - 1)
    fraction = np.clip(real - index.astype(np.float32), np.float32(0.0), np.float32(1.0))
    return index, fraction.astype(np.float32)


def _linear(size_in: int, size_out: int) -> np.ndarray:
    index, fraction = _source(size_in, size_out, cubic=False)
    weights = np.zeros((size_out, size_in), np.float32)
    rows = np.arange(size_out)
    np.add.at(weights, (rows, index), np.float32(1.0) - fraction)
    np.add.at(weights, (rows, np.minimum(index + 1, size_in - 1)), fraction)
    return weights


def _cubic(size_in: int, size_out: int) -> np.ndarray:
    """Keys' cubic convolution (a = -0.75) on the four neighbours, indices clamped to the edge."""
    index, t = _source(size_in, size_out, cubic=True)
    one = np.float32(1.0)
    coefficients = (_cubic_far(t + one), _cubic_near(t), _cubic_near(one - t), _cubic_far(one - t + one))
    weights = np.zeros((size_out, size_in), np.float32)
    rows = np.arange(size_out)
    for k, coefficient in enumerate(coefficients):
        np.add.at(weights, (rows, np.clip(index - 1 + k, 0, size_in - 1)), coefficient)
    return weights


def _cubic_near(x: np.ndarray, a: float = CUBIC_A) -> np.ndarray:
    a = np.float32(a)
    return ((a + np.float32(2)) * x - (a + np.float32(3))) * x * x + np.float32(1)


def _cubic_far(x: np.ndarray, a: float = CUBIC_A) -> np.ndarray:
    a = np.float32(a)
    return ((a * x - np.float32(5) * a) * x + np.float32(8) * a) * x - np.float32(4) * a


def _antialiased(size_in: int, size_out: int, cubic: bool) -> np.ndarray:
    """torch's antialiased resampling (PIL's): a triangle or cubic (a = -0.5) filter widened by the scale when
    shrinking, over the inputs it covers, its weights normalized to sum to 1."""
    scale = size_in / size_out
    support = (2.0 if cubic else 1.0) * max(scale, 1.0)
    inverse = 1.0 / scale if scale >= 1.0 else 1.0
    weights = np.zeros((size_out, size_in), np.float32)
    for i in range(size_out):
        center = np.float32(scale) * np.float32(i + 0.5)
        low = max(int(center - support + 0.5), 0)
        high = min(int(center + support + 0.5), size_in)
        taps = (np.arange(low, high) - float(center) + 0.5) * inverse
        values = (_aa_cubic(taps) if cubic else np.maximum(0.0, 1.0 - np.abs(taps))).astype(np.float32)
        total = values.sum(dtype=np.float32)
        weights[i, low:high] = values / total if total != 0 else values
    return weights


def _aa_cubic(x: np.ndarray) -> np.ndarray:
    x = np.abs(x).astype(np.float32)
    near, far = _cubic_near(x, CUBIC_A_ANTIALIAS), _cubic_far(x, CUBIC_A_ANTIALIAS)
    return np.where(x < 1.0, near, np.where(x < 2.0, far, np.float32(0.0)))


__all__ = ["DEFAULT_UPSCALER", "IMAGE_UPSCALERS", "LATENT_MODES", "Upscaler", "find_upscaler", "interpolate",
           "upscaler_names"]  # fmt: skip
