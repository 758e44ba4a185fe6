"""ControlNet preprocessors, torch-free, named as A1111's ControlNet extension names its modules: those that need
no model (`none`, `canny`, `invert`, `threshold`, `blur_gaussian`, `tile_resample`) and those that run an exported
network (`softedge_hed`, `softedge_hedsafe`: annotator_models.py), given the networks loaded.

Each takes a PIL image and returns the control image, after scaling the picture so that its short side is
`resolution` pixels (A1111's `processor_res`; None keeps its size). `canny` is OpenCV's Canny (which the
extension and controlnet-aux call) reimplemented in NumPy: 3x3 Sobel gradients with replicated borders, the L1
magnitude of the channel with the largest one, non-maximum suppression along the gradient's direction quantized
as OpenCV does (fixed-point tan 22.5 degrees), and hysteresis between `low` and `high` over 8-connected pixels
(tests compare it pixel for pixel with cv2.Canny). The resizing is PIL's (bicubic up, box down), not OpenCV's.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image, ImageFilter

from .annotator_models import MODEL_MODULES, AnnotatorNetwork
from .request import RequestError

TG22 = int(0.4142135623730950488016887242097 * (1 << 15) + 0.5)  # tan(22.5 degrees), OpenCV's 15-bit fixed point
MAX_RESOLUTION = 4096
# The largest image a preprocessor makes: the short side is `resolution`, and a narrow picture's long side follows
# (a 64x1 picture at 512 would be 32768 wide). HED at 2048x2048 holds about 4 GB.
MAX_ANNOTATED_PIXELS = 2048 * 2048
# module -> (its function, the defaults of A1111's threshold_a and threshold_b sliders; None: unused)
Annotator = Callable[[np.ndarray, float, float], np.ndarray]


def canny(pixels: np.ndarray, low: float, high: float) -> np.ndarray:
    """cv2.Canny(pixels, low, high) for (H, W) or (H, W, C) uint8 pixels: 255 on edges, 0 elsewhere."""
    image = pixels.astype(np.int32)
    image = image[..., None] if image.ndim == 2 else image
    padded = np.pad(image, ((1, 1), (1, 1), (0, 0)), mode="edge")
    rows = padded[:-2] + 2 * padded[1:-1] + padded[2:]
    columns = padded[:, :-2] + 2 * padded[:, 1:-1] + padded[:, 2:]
    dx, dy = rows[:, 2:] - rows[:, :-2], columns[2:] - columns[:-2]
    magnitudes = np.abs(dx) + np.abs(dy)
    channel = np.argmax(magnitudes, axis=2)[..., None]  # the first channel with the largest magnitude
    dx, dy = (np.take_along_axis(d, channel, axis=2)[..., 0] for d in (dx, dy))
    magnitude = np.take_along_axis(magnitudes, channel, axis=2)[..., 0]
    low, high = int(np.floor(min(low, high))), int(np.floor(max(low, high)))
    peak = _local_maxima(magnitude, dx, dy) & (magnitude > low)
    return np.where(_hysteresis(peak & (magnitude > high), peak), 255, 0).astype(np.uint8)


def _local_maxima(magnitude: np.ndarray, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Pixels whose magnitude beats both neighbours along the gradient (0 outside the image), ties broken as
    OpenCV breaks them (> before, >= after, except on diagonals)."""
    m = np.pad(magnitude, 1)
    centre = m[1:-1, 1:-1]
    left, right, up, down = m[1:-1, :-2], m[1:-1, 2:], m[:-2, 1:-1], m[2:, 1:-1]
    x, y = np.abs(dx).astype(np.int64), np.abs(dy).astype(np.int64) << 15
    tg22x = x * TG22
    horizontal = y < tg22x
    vertical = ~horizontal & (y > tg22x + (x << 16))
    same_sign = (dx ^ dy) >= 0  # s = 1: up-left and down-right; s = -1: up-right and down-left
    before = np.where(same_sign, m[:-2, :-2], m[:-2, 2:])
    after = np.where(same_sign, m[2:, 2:], m[2:, :-2])
    return np.where(
        horizontal,
        (centre > left) & (centre >= right),
        np.where(vertical, (centre > up) & (centre >= down), (centre > before) & (centre > after)),
    )


def _hysteresis(strong: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Candidates 8-connected to a strong pixel through candidates, grown until nothing changes."""
    edges = strong.copy()
    while True:
        padded = np.pad(edges, 1)
        grown = np.zeros_like(edges)
        for dr in (0, 1, 2):
            for dc in (0, 1, 2):
                grown |= padded[dr : dr + edges.shape[0], dc : dc + edges.shape[1]]
        grown &= candidates
        grown |= edges
        if np.array_equal(grown, edges):
            return edges
        edges = grown


def _threshold(pixels: np.ndarray, level: float, _: float) -> np.ndarray:
    """White where every channel is above `level` (A1111's "threshold")."""
    return np.where(pixels.min(axis=2) > level, 255, 0).astype(np.uint8)


def _invert(pixels: np.ndarray, _: float, __: float) -> np.ndarray:
    return 255 - pixels


def _blur(pixels: np.ndarray, sigma: float, _: float) -> np.ndarray:
    return np.asarray(Image.fromarray(pixels).filter(ImageFilter.GaussianBlur(sigma)))


def _tile_resample(pixels: np.ndarray, rate: float, _: float) -> np.ndarray:
    """Down-sampled by `rate` (A1111's "tile_resample"; below 1.1 unchanged), to blur detail the tile model
    redraws."""
    if rate < 1.1:
        return pixels
    height, width = pixels.shape[:2]
    size = (max(1, int(width / rate)), max(1, int(height / rate)))
    return np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.BOX))


MODULES: dict[str, tuple[Annotator | None, float | None, float | None]] = {
    "none": (None, None, None),
    "canny": (canny, 100.0, 200.0),
    "invert": (_invert, None, None),
    "threshold": (_threshold, 127.0, None),
    "blur_gaussian": (_blur, 9.0, None),
    "tile_resample": (_tile_resample, 1.0, None),
}


def module_names(networks: dict[str, AnnotatorNetwork] | None = None) -> list[str]:
    """The preprocessors that can run: those needing no model, and those whose network is in `networks`."""
    return [*MODULES, *(m for m, (network, _) in MODEL_MODULES.items() if network in (networks or {}))]


def annotate(
    image: Image.Image,
    module: str,
    resolution: int | None = None,
    threshold_a: float | None = None,
    threshold_b: float | None = None,
    networks: dict[str, AnnotatorNetwork] | None = None,
) -> Image.Image:
    """The control image `module` makes from `image`, with the exported `networks` (annotator_models.py) for the
    modules that run one; RequestError naming `module` for one not known or whose network is not loaded, or
    `threshold_a`/`threshold_b`/`resolution` for one out of range."""
    if isinstance(module, str) and module in MODEL_MODULES:
        network, safe = MODEL_MODULES[module]
        if network not in (networks or {}):
            raise RequestError(
                "module",
                f"{module} runs the {network} network, which is not loaded (sd-export annotator {network} FILE "
                f"DIR/{network}, then --annotators-dir DIR)",
            )
        run, default_a, default_b = _network_run(networks[network], module, safe), None, None
    elif not isinstance(module, str) or module not in MODULES:
        names = ", ".join(module_names(networks))
        raise RequestError("module", f"no preprocessor {str(module)[:64]!r}; there are {names}")
    else:
        run, default_a, default_b = MODULES[module]
    if run is None:
        return image
    if resolution is not None:
        if isinstance(resolution, bool) or not isinstance(resolution, int) or not 64 <= resolution <= MAX_RESOLUTION:
            raise RequestError("resolution", f"must be an integer in 64..{MAX_RESOLUTION}, got {resolution!r}"[:200])
        size = _short_side_size(image.size, resolution)
        if size[0] * size[1] > MAX_ANNOTATED_PIXELS:
            reason = f"{resolution} makes this {image.width}x{image.height} picture {size[0]}x{size[1]}, more than "
            raise RequestError("resolution", reason + f"{MAX_ANNOTATED_PIXELS} pixels")
        image = _short_side(image.convert("RGB"), resolution)
    a = _threshold_value("threshold_a", threshold_a, default_a)
    b = _threshold_value("threshold_b", threshold_b, default_b)
    return Image.fromarray(run(np.asarray(image.convert("RGB")), a, b)).convert("RGB")  # HWC3, as A1111


def _network_run(network: AnnotatorNetwork, module: str, safe: bool) -> Annotator:
    def run(pixels: np.ndarray, _a: float, _b: float) -> np.ndarray:
        try:
            return network.edges(pixels, safe)
        except ValueError as exc:  # a graph that loaded but fails: the module cannot serve, said in one line
            raise RequestError("module", f"{module}: {exc}") from None

    return run


def _threshold_value(name: str, value: float | None, default: float | None) -> float:
    if value is None or default is None:  # unused by the module, as A1111 ignores it
        return default or 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1024:
        raise RequestError(name, f"must be a number in 0..1024, got {value!r}"[:200])
    return float(value)


def _short_side_size(size: tuple[int, int], side: int) -> tuple[int, int]:
    scale = side / min(size)
    return round(size[0] * scale), round(size[1] * scale)


def _short_side(image: Image.Image, side: int) -> Image.Image:
    scale = side / min(image.size)
    size = _short_side_size(image.size, side)
    method = Image.Resampling.BICUBIC if scale > 1 else Image.Resampling.BOX
    return image if size == image.size else image.resize(size, method)
