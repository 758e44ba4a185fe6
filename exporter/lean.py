"""Memory-lean export of full-size models (`sd-export convert --trace-dtype bf16`): the torch module is loaded and
traced in bf16 (or fp16), half the memory of fp32, and the graph that comes out is the fp32 graph all the same.

- Loading: component loaders that read `load_dtype()` (the dtype `load_in` sets; every transformer and T5)
  ask diffusers/transformers for it, so a 4.7B-parameter T5-XXL is 9.5 GB in memory instead of 19 GB and
  never held in fp32 whole. The others (CLIP, VAE: small) load and trace in fp32 as before.
- Reference outputs: computed in fp32 inside `float32_compute`, where every bf16 weight is read through a
  parametrization that widens it at its use, so validation compares the fp32 graph with an fp32 computation at the
  usual tolerance while memory holds the bf16 weights and one fp32 weight at a time.
- Trace: torch.onnx records that same fp32 computation (every operation and constant in fp32; tracing the bf16
  module instead left bf16-rounded constants such as GELU's, 1e-4 off), the stored bf16 weights each followed by a
  Cast. torch's constant folding is off: it would fold every Cast and Transpose of a weight into a new fp32 tensor,
  all held at once (measured: 3x the bf16 module). `widen_graph` folds them instead, one tensor at a time, as it
  moves the weights into the output's `_data` file (each scratch file deleted once its last use is written);
  onnxruntime folds the shape arithmetic left at load.
- Storage: the weights stay the bf16 tensors they are, each widened by one Cast to float placed before its first
  use: the fp32 graph in half the disk (T5-XXL 9.5 GB instead of 19). onnxruntime folds the Casts at load (an fp32
  graph's memory); validate.open_session runs large graphs without folding, each Cast just before its use, so a
  full-size graph validates in about its bf16 size. Weight-only quantization reads the weights through the Casts.

Real SD3/FLUX/T5 checkpoints are published in bf16 or fp16, so their weights are exactly what the fp32 graph
holds. Random weights built in bf16 are bf16 values too.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx
import onnx.numpy_helper
import torch
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

from .trace import ALIGNMENT, EXTERNAL_DATA_SUFFIX, point_to

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


class _Widen(torch.nn.Module):
    """A parametrization: the stored bf16/fp16 tensor, read as fp32."""

    def forward(self, stored: torch.Tensor) -> torch.Tensor:
        return stored.float()


@contextmanager
def float32_compute(module: torch.nn.Module) -> Iterator[None]:
    """Run (and trace) `module` in fp32 although its weights are stored narrower: every narrow parameter and
    buffer is read through a parametrization that widens it where it is used, so each exists in fp32 only while an
    operation needs it, the code sees fp32 weights (T5 casts activations to its Linears' dtype), and a trace
    records the stored bf16 tensor and a Cast. Nothing to do for an fp32 module."""
    from torch.nn.utils import parametrize

    narrow = [(m, name) for m in module.modules() for name, t in _own_tensors(m) if _is_narrow(t)]
    for owner, name in narrow:
        parametrize.register_parametrization(owner, name, _Widen(), unsafe=True)
    try:
        yield
    finally:
        for owner, name in narrow:
            parametrize.remove_parametrizations(owner, name, leave_parametrized=False)


def _own_tensors(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    buffers = [(name, b) for name, b in module.named_buffers(recurse=False) if b is not None]
    return [*module.named_parameters(recurse=False), *buffers]


def _is_narrow(tensor: torch.Tensor) -> bool:
    return tensor.dtype in (torch.bfloat16, torch.float16)


def widen_graph(traced: Path, out_file: Path, keep_narrow: bool = True) -> None:
    """Move the graph traced from a bf16/fp16 module (without constant folding) to `out_file` as an fp32 graph, one
    tensor at a time into `<name>_data` (each scratch file deleted once its last use is written): the Cast and
    Transpose nodes between each weight and its use are folded into the weight, which is stored widened, or with
    `keep_narrow` as the bf16/fp16 tensor it is (transposed as used) followed by one Cast to float placed just
    before its first use (half the disk; onnxruntime folds the Casts at load, or with the session options of
    validate.open_session runs each where it is needed). Every other narrow float type is made float; the scratch
    folder is removed."""
    scratch = traced.parent
    model = onnx.load(str(traced), load_external_data=False)
    graph = model.graph
    _widen_types(graph)
    folded = _fold_weight_chains(graph)
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    sources = {t.name: t for t in graph.initializer}
    written = [(name, source, perm) for name, (source, perm) in folded.items() if name in used]
    written += [(t.name, t.name, None) for t in graph.initializer if t.name in used]
    uses = Counter(source for _, source, _ in written)
    constants = [a.t for n in graph.node for a in n.attribute if a.HasField("t")]
    data_name = out_file.name + EXTERNAL_DATA_SUFFIX
    initializers, casts = [], {}
    with open(out_file.parent / data_name, "wb") as data:
        for name, source, perm in written:
            tensor = sources[source]
            narrow = keep_narrow and tensor.data_type in NARROW and len(tensor.dims) > 1
            array = _read(tensor, scratch, widen=not narrow)
            uses[source] -= 1
            if not uses[source] and uses_external_data(tensor):
                _release(tensor, scratch)
            array = np.ascontiguousarray(array.transpose(perm or None)) if perm is not None else array
            stored = onnx.TensorProto(name=name + "_stored" if narrow else name, dims=array.shape)
            stored.data_type = tensor.data_type if narrow else onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
            if array.nbytes >= 1024:
                _append(data, stored, array, data_name)
            else:
                stored.raw_data = array.tobytes()
            initializers.append(stored)
            if narrow:
                casts[name] = onnx.helper.make_node("Cast", [stored.name], [name], name=f"{name}_widen",
                                                    to=onnx.TensorProto.FLOAT)  # fmt: skip
        for tensor in constants:  # torch also writes large Constant values outside the graph
            if uses_external_data(tensor):
                array = _read(tensor, scratch)
                _release(tensor, scratch)
                if tensor.data_type in NARROW:
                    tensor.data_type = onnx.TensorProto.FLOAT
                _append(data, tensor, array, data_name)
    nodes = []
    for node in graph.node:  # each Cast just before the first node that reads its weight
        nodes += [casts.pop(name) for name in node.input if name in casts]
        nodes.append(node)
    graph.ClearField("node")
    graph.node.extend(nodes + list(casts.values()))
    graph.ClearField("initializer")
    graph.initializer.extend(initializers)
    onnx.save_model(model, str(out_file))
    if not (out_file.parent / data_name).stat().st_size:
        (out_file.parent / data_name).unlink()
    for leftover in scratch.iterdir():
        leftover.unlink()
    scratch.rmdir()


def _fold_weight_chains(graph: onnx.GraphProto) -> dict[str, tuple[str, tuple[int, ...] | None]]:
    """Remove the nodes that only cast an initializer to float, transpose it or pass it on (what tracing a widened
    weight without constant folding leaves: Cast, then Transpose for a MatMul); returns each removed output as
    (the initializer it comes from, the permutation to apply)."""
    initializers = {t.name for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    folded: dict[str, tuple[str, tuple[int, ...] | None]] = {}
    kept = []
    for node in graph.node:
        source = node.input[0] if len(node.input) == 1 else None
        foldable = node.op_type in ("Cast", "Transpose", "Identity") and node.output[0] not in outputs
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Cast" and attributes.get("to") != onnx.TensorProto.FLOAT:
            foldable = False
        if not foldable or (source not in initializers and source not in folded):
            kept.append(node)
            continue
        base, perm = folded.get(source, (source, None))
        if node.op_type == "Transpose":  # () stands for the default, all axes reversed
            step = tuple(attributes.get("perm", ()))
            perm = step if perm is None else (tuple(perm[axis] for axis in step) if step else tuple(reversed(perm)))
        folded[node.output[0]] = (base, perm)
    graph.ClearField("node")
    graph.node.extend(kept)
    return folded


def _read(tensor: onnx.TensorProto, scratch: Path, widen: bool = True) -> np.ndarray:
    """A tensor's values from the scratch folder or the graph: narrow floats widened to float32, or with `widen`
    False as their 16 bits (uint16)."""
    if uses_external_data(tensor):
        info = ExternalDataInfo(tensor)
        with open(scratch / info.location, "rb") as f:
            f.seek(info.offset or 0)
            payload = f.read(info.length) if info.length else f.read()
    elif tensor.raw_data:
        payload = tensor.raw_data
    elif tensor.data_type in NARROW:  # onnx keeps bf16/fp16 values as their 16 bits in int32_data
        payload = np.asarray(tensor.int32_data, dtype=np.uint16).tobytes()
    else:
        return onnx.numpy_helper.to_array(tensor)
    if tensor.data_type in NARROW:
        bits = np.frombuffer(payload, np.uint16).reshape(tuple(tensor.dims))
        return widen_array(bits, tensor.data_type) if widen else bits
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    return np.frombuffer(payload, dtype).reshape(tuple(tensor.dims))


def _release(tensor: onnx.TensorProto, scratch: Path) -> None:
    """Delete a tensor's scratch file once read, if it holds that tensor alone (torch writes one per tensor)."""
    info = ExternalDataInfo(tensor)
    path = scratch / info.location
    if path.exists() and not info.offset and info.length in (None, 0, os.path.getsize(path)):
        path.unlink()


def _append(data: BinaryIO, tensor: onnx.TensorProto, array: np.ndarray, location: str) -> None:
    """Write `array` at the end of the data file (page-aligned) as `tensor`'s bytes."""
    data.write(b"\0" * (-data.tell() % ALIGNMENT))
    offset = data.tell()
    data.write(memoryview(np.ascontiguousarray(array)).cast("B"))
    point_to(tensor, location, offset, array.nbytes)


def widen_array(bits: np.ndarray, data_type: int) -> np.ndarray:
    """bf16/fp16 values given as their 16 bits (uint16), as float32: bf16 is the upper half of a float32."""
    if data_type == onnx.TensorProto.BFLOAT16:
        return (bits.astype(np.uint32) << 16).view(np.float32)
    return bits.view(np.float16).astype(np.float32)


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
        bits = np.frombuffer(tensor.raw_data, np.uint16)
    else:  # onnx keeps bf16/fp16 values as their 16 bits in int32_data
        bits = np.asarray(tensor.int32_data, dtype=np.uint16)
        tensor.ClearField("int32_data")
    tensor.raw_data = widen_array(bits, tensor.data_type).tobytes()
    tensor.data_type = onnx.TensorProto.FLOAT
