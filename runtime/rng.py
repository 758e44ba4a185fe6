"""torch's CPU `randn`, reproduced in NumPy so `seed=` gives the latents diffusers gets from
`torch.Generator("cpu").manual_seed(seed)`, without importing torch.

Source: standard MT19937 seeded with the seed's low 32 bits. float32 arrays of 16 or more elements use
torch's vectorised Box-Muller over blocks of 16 uniforms (24-bit); smaller ones a double-precision
Box-Muller per element whose second value is cached in the generator, as torch does. The block path
reproduces torch's AVX2 kernel (Cephes log/sincos polynomials of `avx_mathfun.h`, including where the
compiler fuses multiply-adds), so the values are bit-identical to torch on x86-64 CPUs.

`ImageGenerators` gives each image of a batch its own generator (diffusers' list of generators).
"""

from __future__ import annotations

import math

import numpy as np

BLOCK = 16
F32 = np.float32


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


class ImageGenerators:
    """One `TorchGenerator` per image of a batch, seeded `seeds[i]` for image i: `randn((N, ...))` draws image
    i's slice from its own generator, as diffusers does with a list of generators. So every image of a batch
    is the image a batch of one gives with its seed (A1111's batches: image i from seed + i)."""

    def __init__(self, seeds: list[int] | tuple[int, ...]) -> None:
        self.generators = [TorchGenerator(seed) for seed in seeds]

    def __len__(self) -> int:
        return len(self.generators)

    def randn(self, shape: tuple[int, ...] | list[int]) -> np.ndarray:
        """Standard normal float32 array of `shape` (N images first), row i drawn by generator i."""
        shape = tuple(int(s) for s in shape)
        if not shape or shape[0] != len(self.generators):
            raise ValueError(f"randn{shape}: the first dimension must be the batch's {len(self.generators)} images")
        return np.concatenate([generator.randn((1, *shape[1:])) for generator in self.generators])


Generator = TorchGenerator | ImageGenerators  # what the pipeline draws its noise from


def _box_muller_blocks(blocks: np.ndarray) -> np.ndarray:
    """torch's normal_fill_16 (AVX2 kernel): uniforms (u1 from the first 8, u2 from the last 8) -> 16 normals."""
    u1 = F32(1.0) - blocks[:, :8]
    u2 = blocks[:, 8:]
    radius = np.sqrt(F32(-2.0) * _log_ps(u1))
    sin, cos = _sincos_ps(F32(2.0 * math.pi) * u2)
    return np.concatenate([radius * cos, radius * sin], axis=1)


def _fma(a: np.ndarray, b: np.ndarray | np.float32, c: np.ndarray | np.float32) -> np.ndarray:
    """Correctly rounded float32 fused multiply-add.

    The float32 product is exact in float64; the float64 sum is made round-to-odd (TwoSum tells whether
    it was inexact), which makes the final rounding to float32 correct instead of double-rounded."""
    product = np.asarray(a, np.float64) * np.asarray(b, np.float64)
    addend = np.broadcast_to(np.asarray(c, np.float64), product.shape)
    total = product + addend
    partial = total - product
    error = (product - (total - partial)) + (addend - partial)
    inexact_even = (error != 0) & ((total.view(np.uint64) & 1) == 0)
    total = np.where(inexact_even, np.nextafter(total, total + error), total)
    return total.astype(F32)


LOG_P = (7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1, 1.4249322787e-1)
LOG_P += (-1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1)


def _log_ps(x: np.ndarray) -> np.ndarray:
    """Cephes float32 log as in torch's avx_mathfun.h `log256_ps`, with the FMAs its compiler emits."""
    bits = x.view(np.uint32)
    e = ((bits >> 23).astype(np.int32) - 127).astype(F32) + F32(1)
    x = ((bits & np.uint32(0x807FFFFF)) | F32(0.5).view(np.uint32)).view(F32)  # mantissa in [0.5, 1)
    small = x < F32(0.707106781186547524)
    x = (x - F32(1)) + np.where(small, x, F32(0))
    e = e - np.where(small, F32(1), F32(0))
    z = x * x
    y = np.full_like(x, F32(LOG_P[0]))
    for p in LOG_P[1:]:
        y = _fma(y, x, F32(p))
    y = _fma(y * x, z, e * F32(-2.12194440e-4))
    y = _fma(z, F32(-0.5), y)
    return _fma(e, F32(0.693359375), x + y)


def _sincos_ps(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cephes float32 sin and cos of x >= 0 as in torch's `sincos256_ps` (same FMA placement)."""
    j = (x * F32(1.27323954473516)).astype(np.int32)
    j = (j + 1) & ~1
    y = j.astype(F32)
    for dp in (-0.78515625, -2.4187564849853515625e-4, -3.77489497744594108e-8):
        x = _fma(y, F32(dp), x)
    z = x * x
    cos = _fma(_fma(F32(2.443315711809948e-5), z, F32(-1.388731625493765e-3)), z, F32(4.166664568298827e-2))
    cos = _fma(cos * z, z, -(z * F32(0.5))) + F32(1)
    sin = _fma(_fma(F32(-1.9515295891e-4), z, F32(8.3321608736e-3)), z, F32(-1.6666654611e-1))
    sin = _fma(sin * z, x, x)
    use_sin_poly = (j & 2) == 0
    sin, cos = np.where(use_sin_poly, sin, cos), np.where(use_sin_poly, cos, sin)
    return np.where((j & 4) != 0, -sin, sin), np.where((~(j - 2) & 4) != 0, -cos, cos)


def _init_genrand(seed: int) -> np.ndarray:
    """MT19937's standard 32-bit seeding (init_genrand), which torch's generator uses."""
    state = [seed & 0xFFFFFFFF]
    for i in range(1, 624):
        prev = state[-1]
        state.append((1812433253 * (prev ^ (prev >> 30)) + i) & 0xFFFFFFFF)
    return np.array(state, dtype=np.uint32)
