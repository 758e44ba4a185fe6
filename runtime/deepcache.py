"""DeepCache at run time: which UNet calls are full and which reuse the cached deep feature.

The exporter gives a DeepCache model two graphs over one set of weights (see sd_onnx.exporter.deepcache): the
UNet, which also returns `deepcache_feature`, and `unet_shallow`, which takes it in place of the deep layers.
With interval N, calls 0, N, 2N, ... of a generation are full and keep the feature; the calls between run the
shallow graph on it (the paper's uniform schedule). A call whose batch differs from the cached feature's (a
guidance interval switching between one and two halves) runs full, since the feature belongs to the other batch.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

FEATURE = "deepcache_feature"
SHALLOW = "unet_shallow"

Graph = Callable[..., list[np.ndarray]]


class DeepCache:
    """One generation's cache: the feature of the last full call and the count of calls so far."""

    def __init__(self, interval: int) -> None:
        if interval < 2:
            raise ValueError(f"DeepCache interval must be >= 2 (1 is off), got {interval}")
        self.interval = interval
        self.calls = 0
        self.feature: np.ndarray | None = None
        self.full_calls = 0

    def reuses(self, batch: int) -> bool:
        """Whether the next call, at this batch, takes the shallow path."""
        scheduled = self.calls % self.interval != 0
        return scheduled and self.feature is not None and len(self.feature) == batch

    def run(self, full: Graph, shallow: Graph, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """The UNet's output for `feeds`, by the full graph (keeping its feature) or the shallow one."""
        reuse = self.reuses(len(feeds["sample"]))
        self.calls += 1
        if reuse:
            return shallow(**feeds, **{FEATURE: self.feature})[0]
        self.full_calls += 1
        noise, self.feature = full(**feeds)[:2]
        return noise
