"""fp16 graphs for GPU providers (CUDA, DirectML, CoreML): weights and arithmetic in half precision, inputs and
outputs kept float32 so the runtime feeds every precision the same way.

The conversion is onnxruntime's own (`onnxruntime.transformers.float16`, the one its Stable Diffusion
tooling uses), run on the fused fp32 graph. On the CPU provider such a graph still loads: onnxruntime
inserts casts around operators that have no fp16 kernel there, which is how the exporter validates it
without a GPU, and why fp16 is slower than fp32 on CPU (use int8 there).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

from .trace import EXTERNAL_DATA_SUFFIX, pack_graph

# fp16 carries about 3 significant digits: the exporter accepts an fp16 graph whose outputs stay within this
# fraction of the PyTorch fp32 output's largest magnitude (or --atol, whichever is larger).
FP16_RELATIVE_TOLERANCE = 1e-2
# Graphs whose weights pass this size keep them in one external data file, as the fp32 export does.
PROTOBUF_LIMIT = 2**31 - 2**24


def convert_to_fp16(model_file: Path) -> dict[str, Any]:
    """Rewrite `model_file` (and its external data) as fp16 in place; return what the manifest records."""
    # Given a path, the converter infers types file to file, which also works beyond protobuf's 2 GB limit;
    # without those types it would turn float-only inputs (Resize's scales) into fp16.
    half = convert_float_to_float16(str(model_file), keep_io_types=True)
    scratch = model_file.parent / "_fp16"
    scratch.mkdir()
    large = sum(t.ByteSize() for t in half.graph.initializer) > PROTOBUF_LIMIT
    onnx.save_model(
        half,
        str(scratch / model_file.name),
        save_as_external_data=large,
        all_tensors_to_one_file=True,
        location=model_file.name + EXTERNAL_DATA_SUFFIX,
    )
    (model_file.parent / (model_file.name + EXTERNAL_DATA_SUFFIX)).unlink(missing_ok=True)
    model_file.unlink()
    pack_graph(scratch / model_file.name, model_file)  # one file, or graph + one data file; removes scratch
    float_ops = sorted({n.op_type for n in half.graph.node} & set(DEFAULT_OP_BLOCK_LIST))
    return {
        "method": "fp16 cast (onnxruntime.transformers.float16)",
        "keep_io_types": True,
        "ops_kept_float": float_ops,
    }


def fp16_atol(reference: list[np.ndarray], atol: float) -> float:
    """The largest difference from PyTorch's fp32 output an fp16 graph may show."""
    scale = max(float(np.max(np.abs(r))) for r in reference)
    return max(atol, FP16_RELATIVE_TOLERANCE * scale)
