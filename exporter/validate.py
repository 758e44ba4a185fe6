"""Check an exported graph against PyTorch: same seeded inputs, onnxruntime vs torch outputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from sd_onnx.runtime.manifest import TensorSpec
from sd_onnx.runtime.session import lean_options

from .errors import ExportError

ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(int8)": "int8",  # activations crossing a cut between UNet stages (stages.py)
    "tensor(uint8)": "uint8",
}


LARGE_GRAPH = 4 * 2**30


def open_session(model_file: Path) -> ort.InferenceSession:
    """A CPU session; above LARGE_GRAPH one that holds little beyond the memory-mapped weights (slower: see
    runtime.session.lean_options), so that a full-size graph validates in about its bf16 size (lean.py)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if sum(p.stat().st_size for p in Path(model_file).parent.iterdir() if p.is_file()) > LARGE_GRAPH:
        lean_options(options)
    return ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])


def signature(session: ort.InferenceSession) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The graph's inputs and outputs as manifest specs (symbolic dims as names)."""

    def spec(arg: Any) -> TensorSpec:
        shape = [d if isinstance(d, int) else str(d) for d in arg.shape]
        return TensorSpec(arg.name, shape, ORT_TYPES.get(arg.type, arg.type))

    return [spec(a) for a in session.get_inputs()], [spec(a) for a in session.get_outputs()]


def compare_outputs(
    name: str, session: ort.InferenceSession, feeds: dict[str, np.ndarray], reference: list[np.ndarray], atol: float
) -> dict[str, Any]:
    """Run the graph and compare with the torch reference; raise ExportError above `atol`."""
    outputs = session.run(None, feeds)
    max_abs = max(float(np.max(np.abs(o - r))) for o, r in zip(outputs, reference, strict=True))
    mean_abs = float(np.mean([np.mean(np.abs(o - r)) for o, r in zip(outputs, reference, strict=True)]))
    report = {
        "max_abs_diff": max_abs,
        "mean_abs_diff": mean_abs,
        "atol": atol,
        "input_shapes": {k: list(v.shape) for k, v in feeds.items()},
        "reference": "torch",
    }
    if not np.isfinite(max_abs) or max_abs > atol:
        raise ExportError(f"{name}: ONNX output differs from PyTorch by {max_abs:.3g} (> --atol {atol:g})")
    return report
