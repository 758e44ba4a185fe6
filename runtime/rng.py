"""torch's CPU `randn`, reproduced in NumPy so `seed=` gives the latents diffusers gets from
`torch.Generator("cpu").manual_seed(seed)`, without importing torch.

Source: standard MT19937 seeded with the seed's low 32 bits. float32 arrays of 16 or more elements use
torch's vectorised Box-Muller over blocks of 16 uniforms (24-bit); smaller ones a double-precision
Box-Muller per element whose second value is cached in the generator, as torch does. Bit-exact except
where torch's AVX2 log/sincos approximations round differently from NumPy's float32 maths (1-2 ulp on a
small share of elements), far inside image tolerance.
"""

from __future__ import annotations

import math

import numpy as np

BLOCK = 16


class TorchGenerator:
    """Drop-in for `torch.Generator("cpu").manual_seed(seed)` as used by `torch.randn(shape, generator=g)`."""

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        self._bits = np.random.MT19937(0)
        self._bits.state = {"bit_generator": "MT19937", "state": {"key": _init_genrand(self.seed), "pos": 624}}
        self._cached_normal: float | None = None

    def _u32(self, n: int) -> np.ndarray:
        return self._bits.random_raw(n).astype(np.uint64)

    def _float_uniform(self, n: int) -> np.ndarray:
        return ((self._u32(n) & 0xFFFFFF).astype(np.float32) * np.float32(2.0**-24)).astype(np.float32)

    def _double_uniform(self) -> float:
        hi, lo = (int(v) for v in self._u32(2))
        return ((hi << 32 | lo) & ((1 << 53) - 1)) * 2.0**-53

    def randn(self, shape: tuple[int, ...] | list[int]) -> np.ndarray:
        """Standard normal float32 array of `shape`, the same draws as torch.randn."""
        shape = tuple(int(s) for s in shape)
        n = math.prod(shape)
        if n < BLOCK:
            return np.array([self._double_normal() for _ in range(n)], dtype=np.float32).reshape(shape)
        data = self._float_uniform(n)
        full = n // BLOCK * BLOCK
        data[:full] = _box_muller_blocks(data[:full].reshape(-1, BLOCK)).reshape(-1)
        if n % BLOCK:
            data[n - BLOCK :] = _box_muller_blocks(self._float_uniform(BLOCK).reshape(1, BLOCK)).reshape(-1)
        return data.reshape(shape)

    def _double_normal(self) -> float:
        if self._cached_normal is not None:
            value, self._cached_normal = self._cached_normal, None
            return value
        u1, u2 = self._double_uniform(), self._double_uniform()
        radius = math.sqrt(-2.0 * math.log1p(-u2))
        theta = 2.0 * math.pi * u1
        self._cached_normal = radius * math.sin(theta)
        return radius * math.cos(theta)


def _box_muller_blocks(blocks: np.ndarray) -> np.ndarray:
    """torch's normal_fill_16: uniforms (u1 from the first 8, u2 from the last 8) -> 16 normals, float32."""
    u1 = np.float32(1.0) - blocks[:, :8]
    u2 = blocks[:, 8:]
    radius = np.sqrt(np.float32(-2.0) * np.log(u1))
    theta = np.float32(2.0 * math.pi) * u2
    return np.concatenate([radius * np.cos(theta), radius * np.sin(theta)], axis=1).astype(np.float32)


def _init_genrand(seed: int) -> np.ndarray:
    """MT19937's standard 32-bit seeding (init_genrand), which torch's generator uses."""
    state = [seed & 0xFFFFFFFF]
    for i in range(1, 624):
        prev = state[-1]
        state.append((1812433253 * (prev ^ (prev >> 30)) + i) & 0xFFFFFFFF)
    return np.array(state, dtype=np.uint32)
