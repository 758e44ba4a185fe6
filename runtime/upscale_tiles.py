"""Running an upscaler graph tile by tile, so that its memory follows the tile, not the image.

The image is cut into tiles of `tile` input pixels (all the same size, so onnxruntime reuses one set of buffers),
neighbours sharing at least `overlap` pixels. Where two tiles share pixels, each tile's weight ramps linearly
across the middle half of the shared band and is zero in its outer quarter: a tile's border pixels, which saw
zero padding instead of their neighbours, never reach the result, and the seams are cross-faded. Results are
accumulated one row of tiles at a time; rows that no later tile touches are written out as 8-bit pixels, so
besides the uint8 output only one row of tiles is held in float.

Beyond the model's receptive field the tiled result equals the untiled one (up to float rounding): with an
overlap of at least four times that radius, every weighted pixel is computed exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

Run = Callable[[np.ndarray], np.ndarray]  # (1, C, h, w) float32 in [0, 1] -> (1, C, h*s, w*s)


class UpscaleCancelled(Exception):
    """The caller asked to stop (a request that timed out or whose client left); raised between tiles."""


def spans(length: int, tile: int, overlap: int, multiple: int = 1) -> list[tuple[int, int]]:
    """[start, end) of each tile along an axis of `length` pixels: one span when the axis fits in a tile,
    otherwise spans of exactly `tile` pixels, evenly spread, starting at multiples of `multiple`, neighbours
    sharing at least about `overlap` pixels (`length` and `tile` multiples of `multiple`)."""
    if length <= tile:
        return [(0, length)]
    count = math.ceil((length - overlap) / (tile - overlap))
    starts = sorted({round(i * (length - tile) / (count - 1) / multiple) * multiple for i in range(count)})
    return [(start, start + tile) for start in starts]


def weights(axis: list[tuple[int, int]], index: int, scale: int) -> np.ndarray:
    """Blend weight of tile `index` along one axis, per output pixel of that tile."""
    start, end = axis[index]
    centres = (np.arange(start * scale, end * scale) + 0.5) / scale  # output pixel centres in input pixels
    weight = np.ones(len(centres), np.float32)
    if index > 0:
        weight = np.minimum(weight, _rise(centres, start, axis[index - 1][1]))
    if index + 1 < len(axis):
        weight = np.minimum(weight, 1 - _rise(centres, axis[index + 1][0], end))
    return weight


def _rise(x: np.ndarray, start: float, end: float) -> np.ndarray:
    """0 in the first quarter of the shared band [start, end), 1 in the last, linear across the middle half."""
    if end <= start:  # tiles that touch without sharing pixels: a hard edge
        return (x >= start).astype(np.float32)
    quarter = (end - start) / 4
    return np.clip((x - start - quarter) / (2 * quarter), 0, 1).astype(np.float32)


def upscale_tiled(
    run: Run,
    pixels: np.ndarray,
    scale: int,
    tile: int,
    overlap: int,
    multiple: int = 1,
    cancelled: Callable[[], bool] | None = None,
) -> np.ndarray:
    """(H, W, C) uint8 -> (H*scale, W*scale, C) uint8 through `run`, tile by tile. H and W must be multiples of
    `multiple` (pad first); UpscaleCancelled when `cancelled()` turns true between tiles."""
    height, width, channels = pixels.shape
    rows, cols = spans(height, tile, overlap, multiple), spans(width, tile, overlap, multiple)
    col_weights = [weights(cols, j, scale) for j in range(len(cols))]
    out = np.empty((height * scale, width * scale, channels), np.uint8)
    acc = np.zeros((0, width * scale, channels), np.float32)
    total = np.zeros((0, width * scale), np.float32)
    top = 0  # output row of acc[0]
    for i, (y0, y1) in enumerate(rows):
        grow = y1 * scale - top - len(acc)
        acc = np.concatenate([acc, np.zeros((grow, width * scale, channels), np.float32)])
        total = np.concatenate([total, np.zeros((grow, width * scale), np.float32)])
        row_weight = weights(rows, i, scale)
        for (x0, x1), col_weight in zip(cols, col_weights, strict=True):
            if cancelled is not None and cancelled():
                raise UpscaleCancelled("upscaling was cancelled")
            tile_in = pixels[y0:y1, x0:x1].transpose(2, 0, 1)[None].astype(np.float32) / 255
            result = run(np.ascontiguousarray(tile_in))[0].transpose(1, 2, 0)
            weight = row_weight[:, None] * col_weight[None, :]
            region = (slice(y0 * scale - top, y1 * scale - top), slice(x0 * scale, x1 * scale))
            acc[region] += result * weight[..., None]
            total[region] += weight
        done = (rows[i + 1][0] if i + 1 < len(rows) else height) * scale  # no later tile reaches above this
        count = done - top
        out[top:done] = _to_uint8(acc[:count] / np.maximum(total[:count, :, None], 1e-12))
        acc, total, top = acc[count:], total[count:], done
    return out


def _to_uint8(values: np.ndarray) -> np.ndarray:
    """[0, 1] floats to 8-bit pixels, rounded as Real-ESRGAN does."""
    return (np.clip(values, 0, 1) * 255).round().astype(np.uint8)
