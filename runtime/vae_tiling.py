"""Tiled VAE decoding and encoding, as diffusers' `AutoencoderKL.enable_tiling()` does it: the input is cut into
overlapping tiles of the VAE's own training size, each tile runs through the graph alone, and neighbours are
cross-faded over a quarter of a tile. Memory then follows the tile, not the image (a 2048x2048 decode holds
the activations of one 512x512 tile), at the price of a small difference from the untiled result.

The arithmetic (tile steps, blend widths, the in-place order of the blends) follows diffusers line for line,
so that the pixels match diffusers' tiled VAE on the same weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .echo import echo

OVERLAP = 0.25  # diffusers' tile_overlap_factor
MAX_TILE, MAX_LEVELS = 1 << 14, 16  # a VAE trained on 16384-pixel tiles; SD's has 4 levels


@dataclass(frozen=True)
class Tiling:
    """Tile sizes of one VAE: `sample` pixels on a side, `latent` latent cells on a side."""

    sample: int
    latent: int

    @classmethod
    def from_vae_config(cls, config: dict[str, Any]) -> Tiling:
        """From the VAE's diffusers config (sample_size, block_out_channels), as AutoencoderKL computes it;
        ValueError when those are not sizes a tile can have."""
        size, blocks = config.get("sample_size"), config.get("block_out_channels")
        size = size[0] if isinstance(size, list | tuple) and size else size
        if not isinstance(size, int) or isinstance(size, bool) or not 0 < size <= MAX_TILE:
            raise ValueError(f"sample_size: must be an integer in 1..{MAX_TILE}, got {echo(size)}")
        if not isinstance(blocks, list) or not 0 < len(blocks) <= MAX_LEVELS or size >> (len(blocks) - 1) < 1:
            raise ValueError(f"block_out_channels: must be a list of 1..{MAX_LEVELS} levels that halve sample_size")
        return cls(sample=size, latent=int(size / 2 ** (len(blocks) - 1)))

    def decode(self, run: Callable[[np.ndarray], np.ndarray], latents: np.ndarray) -> np.ndarray:
        """`run` (one latent tile -> pixels) over (N, C, h, w) latents; one call when they fit in a tile."""
        if max(latents.shape[-2:]) <= self.latent:
            return run(latents)
        return _tiled(run, latents, self.latent, self.sample)

    def encode(self, run: Callable[[np.ndarray], np.ndarray], pixels: np.ndarray) -> np.ndarray:
        """`run` (one pixel tile -> latent moments) over (N, 3, H, W) pixels; one call when they fit."""
        if max(pixels.shape[-2:]) <= self.sample:
            return run(pixels)
        return _tiled(run, pixels, self.sample, self.latent)


def _tiled(run: Callable[[np.ndarray], np.ndarray], x: np.ndarray, tile_in: int, tile_out: int) -> np.ndarray:
    step = int(tile_in * (1 - OVERLAP))
    blend = int(tile_out * OVERLAP)
    keep = tile_out - blend
    rows = [
        [run(np.ascontiguousarray(x[:, :, i : i + tile_in, j : j + tile_in])) for j in range(0, x.shape[3], step)]
        for i in range(0, x.shape[2], step)
    ]
    result_rows = []
    for i, row in enumerate(rows):
        kept = []
        for j, tile in enumerate(row):
            if i > 0:
                _blend_v(rows[i - 1][j], tile, blend)
            if j > 0:
                _blend_h(row[j - 1], tile, blend)
            kept.append(tile[:, :, :keep, :keep])
        result_rows.append(np.concatenate(kept, axis=3))
    return np.concatenate(result_rows, axis=2)


def _blend_v(a: np.ndarray, b: np.ndarray, extent: int) -> None:
    """Fade the top `extent` rows of `b` in from the bottom rows of `a`, in place."""
    extent = min(a.shape[2], b.shape[2], extent)
    for y in range(extent):
        b[:, :, y, :] = a[:, :, -extent + y, :] * (1 - y / extent) + b[:, :, y, :] * (y / extent)


def _blend_h(a: np.ndarray, b: np.ndarray, extent: int) -> None:
    """Fade the left `extent` columns of `b` in from the right columns of `a`, in place."""
    extent = min(a.shape[3], b.shape[3], extent)
    for x in range(extent):
        b[:, :, :, x] = a[:, :, :, -extent + x] * (1 - x / extent) + b[:, :, :, x] * (x / extent)
