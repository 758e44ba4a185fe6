"""Memory-lean export of full-size models (`sd-export convert --trace-dtype bf16`): the torch module is loaded and
traced in bf16 (or fp16), half the memory of fp32, and the graph that comes out is the fp32 graph all the same.

- Loading: component loaders that read `load_dtype()` (the dtype `load_in` sets; SD3's and FLUX's transformer
  and T5) ask diffusers/transformers for it, so a 4.7B-parameter T5-XXL is 9.5 GB in memory instead of 19 GB and
  never held in fp32 whole. The others (CLIP, VAE: small) load and trace in fp32 as before.
- Reference outputs: computed in fp32 by `float32_compute`, which widens each module's own weights for its forward
  only and narrows them back after (lossless: they were bf16 values), so validation compares the fp32 graph with
  an fp32 computation at the usual tolerance, while memory holds one module's fp32 weights at a time.
- Trace: torch.onnx records that same fp32 computation (inside `float32_compute`: every operation, constant and
  folded scale in fp32; tracing the bf16 module instead left bf16-rounded constants such as attention scales, 1e-4
  off); only the weights it writes are the stored bf16 ones. `widen_graph` then makes them fp32 as it moves them
  into the output's `_data` file, one tensor at a time (each bf16 scratch file deleted once copied, so disk
  holds the fp32 graph and one tensor more), and any bf16 type left in the graph float.

Real SD3/FLUX/T5 checkpoints are published in bf16 or fp16, so their weights are exactly what the fp32 graph
holds. Random weights built in bf16 are bf16 values too.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import torch
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

from .trace import ALIGNMENT, EXTERNAL_DATA_SUFFIX, TWO_GB, point_to

TRACE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NARROW = (onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT16)
_load_dtype: list[torch.dtype] = [torch.float32]


@contextmanager
def load_in(dtype: torch.dtype) -> Iterator[None]:
    """Component loaders called inside this block load their weights in `dtype` (see `load_dtype`)."""
    _load_dtype.append(dtype)
    try:
        yield
    finally:
        _load_dtype.pop()


def load_dtype() -> torch.dtype:
    """The dtype a component loader asks diffusers/transformers for: fp32 unless `load_in` says otherwise."""
    return _load_dtype[-1]


@contextmanager
def float32_compute(module: torch.nn.Module) -> Iterator[None]:
    """Run `module` in fp32 although its weights are stored narrower: the weights of each block (a child of a
    ModuleList: a transformer or T5 layer) are widened before its forward and narrowed back after, and so are the
    own weights of any module outside the blocks. A block is widened whole because layers look at their children's
    dtype (T5's feed-forward casts its input to its output Linear's). Nothing to do for an fp32 module."""
    blocks = [child for m in module.modules() if isinstance(m, torch.nn.ModuleList) for child in m]
    inside = {id(m) for block in blocks for m in block.modules()}
    units = [(b, [t for m in b.modules() for t in _own_tensors(m)]) for b in blocks]
    units += [(m, _own_tensors(m)) for m in module.modules() if id(m) not in inside and _own_tensors(m)]
    units = [(m, tensors) for m, tensors in units if any(_is_narrow(t) for t in tensors)]
    dtypes: dict[int, torch.dtype] = {}
    handles = []
    for unit, tensors in units:

        def widen(m: torch.nn.Module, args: object, tensors: list[torch.Tensor] = tensors) -> None:
            for tensor in tensors:
                if _is_narrow(tensor):
                    dtypes[id(tensor)] = tensor.dtype
                    tensor.data = tensor.data.float()

        def narrow_back(
            m: torch.nn.Module, args: object, output: object, tensors: list[torch.Tensor] = tensors
        ) -> None:
            for tensor in tensors:
                if id(tensor) in dtypes:
                    tensor.data = tensor.data.to(dtypes.pop(id(tensor)))

        handles += [unit.register_forward_pre_hook(widen), unit.register_forward_hook(narrow_back)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _own_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(recurse=False), *(b for b in module.buffers(recurse=False) if b is not None)]


def _is_narrow(tensor: torch.Tensor) -> bool:
    return tensor.dtype in (torch.bfloat16, torch.float16)


def widen_graph(traced: Path, out_file: Path) -> None:
    """Move the graph traced from a bf16/fp16 module to `out_file` as an fp32 graph: every narrow float type made
    float, weights widened one tensor at a time into `<name>_data` (scratch files deleted as they are copied);
    the scratch folder is removed."""
    scratch = traced.parent
    model = onnx.load(str(traced), load_external_data=False)
    _widen_types(model.graph)
    data_name = out_file.name + EXTERNAL_DATA_SUFFIX
    widened = sum(_size(t) * (2 if t.data_type in NARROW else 1) for t in model.graph.initializer)
    external = widened > TWO_GB // 2 or any(uses_external_data(t) for t in model.graph.initializer)
    with open(out_file.parent / data_name, "wb") if external else contextlib.nullcontext() as data:
        for tensor in model.graph.initializer:
            if not uses_external_data(tensor):
                _widen_tensor(tensor)
                if data is None or _size(tensor) < 1 << 20:
                    continue
                payload = tensor.raw_data or onnx.numpy_helper.to_array(tensor).tobytes()
                tensor.ClearField("raw_data")
            else:
                info = ExternalDataInfo(tensor)
                source = scratch / info.location
                with open(source, "rb") as f:
                    f.seek(info.offset or 0)
                    payload = _widen_bytes(f.read(info.length) if info.length else f.read(), tensor.data_type)
                if not info.offset and info.length in (None, 0, os.path.getsize(source)):
                    source.unlink()  # torch writes one file per tensor: gone once copied
                if tensor.data_type in NARROW:
                    tensor.data_type = onnx.TensorProto.FLOAT
            data.write(b"\0" * (-data.tell() % ALIGNMENT))
            offset = data.tell()
            data.write(payload)
            point_to(tensor, data_name, offset, len(payload))
    onnx.save_model(model, str(out_file))
    for leftover in scratch.iterdir():
        leftover.unlink()
    scratch.rmdir()


def _size(tensor: onnx.TensorProto) -> int:
    """Bytes of a tensor's values."""
    count = int(np.prod(tensor.dims, dtype=np.int64))
    return count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def _widen_types(graph: onnx.GraphProto) -> None:
    """Every narrow float in the graph's types, attributes and constants made float32 (subgraphs included)."""
    for value in (*graph.input, *graph.output, *graph.value_info):
        if value.type.tensor_type.elem_type in NARROW:
            value.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    for node in graph.node:
        for attribute in node.attribute:
            if (
                attribute.name in ("to", "dtype")
                and attribute.type == onnx.AttributeProto.INT
                and attribute.i in NARROW
            ):
                attribute.i = onnx.TensorProto.FLOAT
            if attribute.type == onnx.AttributeProto.TENSOR:
                _widen_tensor(attribute.t)
            if attribute.type == onnx.AttributeProto.GRAPH:
                _widen_types(attribute.g)
            for subgraph in attribute.graphs:
                _widen_types(subgraph)


def _widen_tensor(tensor: onnx.TensorProto) -> None:
    """An inline narrow tensor made float32 in place."""
    if tensor.data_type not in NARROW or uses_external_data(tensor):
        return
    if tensor.raw_data:
        tensor.raw_data = _widen_bytes(tensor.raw_data, tensor.data_type)
    else:  # onnx keeps bf16/fp16 values as their 16 bits in int32_data
        bits = np.asarray(tensor.int32_data, dtype=np.uint16).tobytes()
        tensor.ClearField("int32_data")
        tensor.raw_data = _widen_bytes(bits, tensor.data_type)
    tensor.data_type = onnx.TensorProto.FLOAT


def _widen_bytes(payload: bytes, data_type: int) -> bytes:
    if data_type == onnx.TensorProto.BFLOAT16:  # bf16 is the upper half of a float32
        return (np.frombuffer(payload, np.uint16).astype(np.uint32) << 16).tobytes()
    if data_type == onnx.TensorProto.FLOAT16:
        return np.frombuffer(payload, np.float16).astype(np.float32).tobytes()
    return payload
