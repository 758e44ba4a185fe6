"""What every engine's session of one graph shares: the manifest's feed checks, the observers, the inputs' types.

`OnnxModel` (onnxruntime, session.py) and `OpenVinoModel` (openvino_engine.py) both derive from `GraphModel`, so
the pipeline, calibration and benchmarks drive either the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .manifest import TensorSpec

# ONNX type strings (as onnxruntime's NodeArg.type gives them) -> the NumPy type a feed must have.
FEED_TYPES = {"tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(float)": np.float32}


class GraphModel:
    """Base of one component's session: subclasses set `name`, `input_specs` (the manifest's, by name; may be
    empty), `graph_inputs` (name -> object with `.type` and `.shape`) and `output_names`."""

    name: str
    input_specs: dict[str, TensorSpec]
    graph_inputs: dict[str, Any]
    output_names: list[str]

    def __init__(self) -> None:
        # Called with each run's feeds before it runs (calibration records them, benchmarks time them).
        self.observers: list[Callable[[dict[str, np.ndarray]], None]] = []

    def checked(self, feeds: dict[str, np.ndarray]) -> None:
        """ValueError for a feed that does not fit the manifest's signature; then the observers see the feeds."""
        for name, value in feeds.items():
            if name in self.input_specs:
                check_input(self.name, self.input_specs[name], value)
        for observe in self.observers:
            observe(feeds)

    def input_dtype(self, name: str, default: type = np.float32) -> type:
        """NumPy dtype the graph wants for input `name` (graphs from other exporters differ: int32/int64)."""
        arg = self.graph_inputs.get(name)
        return FEED_TYPES.get(arg.type if arg else "", default)

    def input_rank(self, name: str) -> int:
        return len(self.graph_inputs[name].shape)


def check_input(component: str, spec: TensorSpec, value: np.ndarray) -> None:
    """ValueError unless `value` has the dtype and the fixed dimensions of the manifest's `spec`."""
    if str(value.dtype) != spec.dtype:
        raise ValueError(f"{component}: input {spec.name} must be {spec.dtype}, got {value.dtype}")
    if value.ndim != len(spec.shape) or any(
        isinstance(d, int) and d != s for d, s in zip(spec.shape, value.shape, strict=True)
    ):
        raise ValueError(f"{component}: input {spec.name} must have shape {spec.shape}, got {list(value.shape)}")
