"""An automatic judge for shapes images: what background, what object, where, how big, which shape.

Independent of the training code: it only reads pixels. Background = median of the border ring; object =
the largest connected region that differs from it; its color = median of its interior; its outline = where
pixels are more than halfway from the background to that color (the true edge of a blurred object); position = the
anchor nearest to its centroid; size = side of its bounding box; shape = how much of the bounding box it
fills (square 1.0, circle pi/4, triangle 0.5).
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from .data import ANCHORS, COLORS, SIDE, Scene

OBJECT_DISTANCE = 50.0  # RGB distance from the background that counts as object (colors are >= 100 apart)
BORDER = 2


@dataclass(frozen=True)
class Verdict:
    """What the judge sees in an image (None: no object found)."""

    background: str
    color: str | None
    shape: str | None
    position: str | None
    size: str | None


def nearest_color(rgb: np.ndarray) -> str:
    names = list(COLORS)
    table = np.array([COLORS[n] for n in names], dtype=np.float32)
    return names[int(np.argmin(np.linalg.norm(table - rgb, axis=1)))]


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a boolean mask."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    best, best_size, label = 0, 0, 0
    h, w = mask.shape
    for start in zip(*np.nonzero(mask), strict=True):
        if labels[start]:
            continue
        label += 1
        labels[start] = label
        queue, size = deque([start]), 0
        while queue:
            y, x = queue.popleft()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = label
                    queue.append((ny, nx))
        if size > best_size:
            best, best_size = label, size
    return labels == best if best else np.zeros_like(mask)


def _interior(region: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """Pixels of the region whose four neighbours are in it too (all of it if that leaves too few)."""
    interior = region.copy()
    interior[1:-1, 1:-1] &= region[:-2, 1:-1] & region[2:, 1:-1] & region[1:-1, :-2] & region[1:-1, 2:]
    return pixels[interior] if interior.sum() >= 4 else pixels[region]


def _classify_shape(fill: float) -> str:
    if fill > 0.89:
        return "square"
    return "circle" if fill > 0.64 else "triangle"


def judge(image: Image.Image) -> Verdict:
    """Read an image (any square size) and say what it shows."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    side = pixels.shape[0]
    ring = np.concatenate(
        [pixels[:BORDER].reshape(-1, 3), pixels[-BORDER:].reshape(-1, 3)]
        + [pixels[:, :BORDER].reshape(-1, 3), pixels[:, -BORDER:].reshape(-1, 3)]
    )
    background_rgb = np.median(ring, axis=0)
    background = nearest_color(background_rgb)
    distance = np.linalg.norm(pixels - background_rgb, axis=2)
    region = _largest_component(distance > OBJECT_DISTANCE)
    if region.sum() < 4:
        return Verdict(background, None, None, None, None)
    object_rgb = np.median(_interior(region, pixels), axis=0)
    # The edge of a soft-edged object is where it is halfway between background and object color.
    halfway = 0.5 * float(np.linalg.norm(object_rgb - background_rgb))
    region = _largest_component(distance > max(halfway, OBJECT_DISTANCE))
    ys, xs = np.nonzero(region)
    height, width = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    centroid = np.array([xs.mean() + 0.5, ys.mean() + 0.5]) / side
    position = min(ANCHORS, key=lambda name: float(np.linalg.norm(centroid - np.array(ANCHORS[name]))))
    box_side = np.sqrt(height * width) / side
    size = min(SIDE, key=lambda name: abs(SIDE[name] - box_side))
    return Verdict(
        background=background,
        color=nearest_color(object_rgb),
        shape=_classify_shape(region.sum() / (height * width)),
        position=position,
        size=size,
    )


def score(scene: Scene, verdict: Verdict) -> dict[str, bool]:
    """Per attribute the caption names: did the image get it right?"""
    said = {k: v for k, v in asdict(scene).items() if v is not None}
    seen = asdict(verdict)
    return {attr: seen[attr] == value for attr, value in said.items()}
