"""Trace one torch module to an ONNX file.

Engine: torch.onnx's TorchScript tracer (`dynamo=False`), as Optimum uses. Measured on the tiny UNet
(torch 2.13): 0.6 s against 20 s for the dynamo exporter, with the same parity (1e-6) and working
batch/height/width axes. The dynamo graph has fewer nodes (576 vs 1,256, mostly shape arithmetic), but
onnxruntime constant-folds that arithmetic at load, so the runtime graphs end up alike; the tracer's
speed and lower peak memory on the 860M-parameter UNet decide it.
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import onnx
import torch
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

from .components import ComponentSpec, Inputs
from .errors import ExportError

EXTERNAL_DATA_SUFFIX = "_data"
TWO_GB = 2**31
ALIGNMENT = 4096  # page-aligned tensors let onnxruntime memory-map them


def trace_component(
    module: torch.nn.Module, spec: ComponentSpec, inputs: Inputs, scratch: Path, opset: int, fold_constants: bool = True
) -> Path:
    """Export `module` into the empty folder `scratch`; returns the traced file (weights may lie beside it).
    `fold_constants` False leaves weight casts and transposes as nodes (the memory-lean path folds them itself,
    lean.widen_graph: torch's folding would hold an fp32 copy of every weight)."""
    scratch.mkdir(parents=True, exist_ok=True)
    torch.onnx.register_custom_op_symbolic("aten::rms_norm", _rms_norm, 9)
    traced = scratch / "model.onnx"
    with torch.no_grad(), warnings.catch_warnings(), _as_export_error(spec.name):
        warnings.simplefilter("ignore")  # tracer warnings about python control flow on shapes are expected
        torch.onnx.export(
            module,
            inputs,
            str(traced),
            dynamo=False,
            opset_version=opset,
            input_names=list(spec.input_names),
            output_names=list(spec.output_names),
            dynamic_axes=spec.dynamic_axes,
            do_constant_folding=fold_constants,
        )
    _positive_perms(traced)
    return traced


def _positive_perms(model_file: Path) -> None:
    """Count each Transpose's negative axes from the end: the tracer writes `movedim(-1, 1)` (DC-AE's norms and
    attention) as perm [0, -1, 1, 2], which ONNX does not allow."""
    model = onnx.load(str(model_file), load_external_data=False)
    changed = False
    for node in model.graph.node:
        for attribute in node.attribute:
            if node.op_type == "Transpose" and attribute.name == "perm" and min(attribute.ints, default=0) < 0:
                rank = len(attribute.ints)
                attribute.ints[:] = [axis % rank for axis in attribute.ints]
                changed = True
    if changed:
        onnx.save_model(model, str(model_file))


def _rms_norm(g: Any, x: Any, normalized_shape: Any, weight: Any, eps: Any) -> Any:
    """aten::rms_norm (torch.nn.RMSNorm, FLUX's query/key norms), which the TorchScript exporter has no symbolic for
    (ONNX has RMSNormalization from opset 23 only): x / sqrt(mean(x^2 over the normalized dims) + eps) x weight."""
    from torch.onnx._internal.torchscript_exporter import symbolic_helper as helper

    axes = [-1 - i for i in range(len(helper._get_const(normalized_shape, "is", "normalized_shape")))]
    epsilon = None if helper._is_none(eps) else helper._get_const(eps, "f", "eps")
    epsilon = torch.finfo(torch.float32).eps if epsilon is None else epsilon  # torch's default: the dtype's eps
    square = g.op("Mul", x, x)
    if g.opset >= 18:  # ReduceMean's axes became an input
        mean = g.op("ReduceMean", square, g.op("Constant", value_t=torch.tensor(axes)), keepdims_i=1)
    else:
        mean = g.op("ReduceMean", square, axes_i=axes, keepdims_i=1)
    scale = g.op("Sqrt", g.op("Add", mean, g.op("Constant", value_t=torch.tensor(epsilon, dtype=torch.float32))))
    normed = g.op("Div", x, scale)
    return normed if helper._is_none(weight) else g.op("Mul", normed, weight)


@contextmanager
def _as_export_error(name: str) -> Iterator[None]:
    """torch.onnx reports a full disk or an unwritable folder as a RuntimeError: one line, naming the graph."""
    try:
        yield
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"{name}: torch.onnx could not export it: {reason}") from exc


def pack_graph(traced: Path, out_file: Path) -> None:
    """Move the traced graph to `out_file`; scattered external weights (graphs over 2 GB) are streamed,
    one tensor at a time, into a single `<name>_data` file so that peak memory stays one tensor."""
    scratch = traced.parent
    if len(list(scratch.iterdir())) == 1:
        traced.replace(out_file)
    else:
        model = onnx.load(str(traced), load_external_data=False)
        data_name = out_file.name + EXTERNAL_DATA_SUFFIX
        with open(out_file.parent / data_name, "wb") as data:
            for tensor in _external_tensors(model):
                append_external(tensor, scratch, data, data_name)
        onnx.save_model(model, str(out_file))
    shutil.rmtree(scratch)


def append_external(tensor: onnx.TensorProto, folder: Path, data: BinaryIO, location: str) -> None:
    """Move an external tensor's bytes (in a file in `folder`) to the end of `data`, page-aligned, and point the
    tensor at them in `location`."""
    info = ExternalDataInfo(tensor)
    with open(folder / info.location, "rb") as source:
        source.seek(info.offset or 0)
        payload = source.read(info.length) if info.length else source.read()
    data.write(b"\0" * (-data.tell() % ALIGNMENT))
    offset = data.tell()
    data.write(payload)
    point_to(tensor, location, offset, len(payload))


def fix_static_dims(model_file: Path, spec: ComponentSpec, shapes: list[tuple[int, ...]]) -> None:
    """Give every output dimension that is not one of the spec's dynamic axes its size (from the reference run's
    `shapes`, one per output) where the tracer left it a made-up name: SD3's transformer returns its channels
    through diffusers' unpatchify einsum, which shape inference cannot follow."""
    model = onnx.load(str(model_file), load_external_data=False)
    changed = False
    for output, shape in zip(model.graph.output, shapes, strict=True):
        dynamic = spec.dynamic_axes.get(output.name, {})
        for axis, dim in enumerate(output.type.tensor_type.shape.dim):
            if axis not in dynamic and dim.WhichOneof("value") != "dim_value":
                dim.dim_value, changed = shape[axis], True
    if changed:
        onnx.save_model(model, str(model_file))


def point_to(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    """Make `tensor` read its bytes from `location` (relative to the graph file) at `offset`."""
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def _external_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    tensors = list(model.graph.initializer)
    tensors += [a.t for node in model.graph.node for a in node.attribute if a.HasField("t")]
    return [t for t in tensors if uses_external_data(t)]
