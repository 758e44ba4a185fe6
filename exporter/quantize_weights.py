"""Weight-only int8/int4 quantization of transformer denoisers and T5/LLM text encoders with onnxruntime's
quantization tools: no calibration pipeline, so it applies to any model family.

What: every MatMul whose second input is a 2-D float weight, and every Gemm of one (torch's Linear on 2-D inputs:
timestep, pooled and adaLN modulation projections, a quarter of SD3's and FLUX's weights), is quantized; a Gemm
becomes MatMul + Add first. int8 transformer: onnxruntime's `quantize_dynamic`, int8 weights per output channel and
the activations quantized to uint8 on each call (MatMulInteger, fused by onnxruntime into DynamicQuantizeMatMul at
load). int8 text encoders: `MatMulNBits` (com.microsoft) with 8-bit weights, a scale and zero point per block of 128
input channels. int4: `MatMulNBits`, 4-bit weights per block of 32. Both MatMulNBits round to nearest
(onnxruntime's DefaultWeightOnlyQuantizer) and compute in int8 (`accuracy_level` 4: activations quantized per
block inside the kernel).
Attention's activation x activation MatMuls, norms, embedding tables (Gather), the patch-embedding Conv, and the
CLIP and VAE graphs stay float.

Why (benchmarks/results/weight_quant_block.json: one SD3.5 Medium block at 1024x1024's sequence length, 4,096
image + 333 text tokens, AVX-512 VNNI, 2 threads, medians of 7 interleaved rounds on a shared CPU): on the block's
projections fp32 took 1.41 s, dynamic int8 0.58 s (0.41x; applied per node as here or to the whole graph alike),
MatMulNBits int8 0.83-1.08 s (0.59-0.77x for blocks 256-32; 1.27x with float compute); every int8 variant keeps
the block's cosine at 0.999998. int4 MatMulNBits: block 32 1.16 s (0.82x), block 128 0.88 s (0.63x), cosine
0.99993 for both on random weights, but on the tiny T5 block 32 kept 0.993 where 128 fell to 0.991: block 32 is
kept for trained weights, whose outlier channels small blocks contain (the usual choice for 4-bit LLM weights),
at 20 % more file than block 128. So int8 is the fast one, int4 the small one (weights a quarter of fp32's).
T5 is the exception (TEXT_SCHEMES): one activation scale per tensor costs it 7x the error of MatMulNBits int8 on
T5-XXL's widths, and it runs once per prompt, so its int8 is MatMulNBits. int4 T5 loses most (cosine 0.987 on 4
random T5-XXL layers, the same with float compute: the 4-bit weights; blocks of 16 0.990, 64 0.983).

Memory: the graph is rewritten node by node with the weights left on disk: each weight is read, quantized (on a
graph of that one node) and written to the new graph's data file before the next is read, so peak memory is one
weight matrix (a 19 GB fp32 T5-XXL quantizes in well under 1 GB), and the fp32 graph is never loaded whole.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

from .errors import ExportError
from .lean import widen_array
from .trace import ALIGNMENT, EXTERNAL_DATA_SUFFIX, point_to

MS_DOMAIN = "com.microsoft"
FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT16)


@dataclass(frozen=True)
class WeightScheme:
    """How weights are stored. `method` "dynamic": onnxruntime's quantize_dynamic, int8 per output channel
    (MatMulInteger, activations quantized to uint8 per call; onnxruntime fuses it into DynamicQuantizeMatMul at
    load); "nbits": MatMulNBits, `bits` per value with a scale (and zero point unless `symmetric`) per
    `block_size` input channels, `accuracy_level` its compute type on CPU (4: int8 activations, 0: float)."""

    method: str
    bits: int
    block_size: int = 0
    symmetric: bool = True
    accuracy_level: int = 0


SCHEMES = {
    "int8": WeightScheme(method="dynamic", bits=8),
    "int4": WeightScheme(method="nbits", bits=4, block_size=32, symmetric=False, accuracy_level=4),
}
# Text encoders (T5, LLMs) run once per prompt, and T5's activations defeat dynamic int8's one scale per tensor
# (T5-XXL's width, 4 random layers: cosine 0.9984 dynamic, 0.99977 MatMulNBits int8): their int8 is MatMulNBits.
TEXT_SCHEMES = {
    **SCHEMES,
    "int8": WeightScheme(method="nbits", bits=8, block_size=128, symmetric=False, accuracy_level=4),
}


def scheme_for(component: str, precision: str) -> WeightScheme:
    """The scheme a component is quantized with at `precision` ("int8" or "int4")."""
    return (TEXT_SCHEMES if component.startswith("text_encoder") else SCHEMES)[precision]


def quantize_weights(src: Path, dst: Path, scheme: WeightScheme) -> dict[str, Any]:
    """Write `src` with its weight MatMuls/Gemms quantized by `scheme` to `dst` (a new file in an existing folder);
    weights go to `<dst name>_data` beside it when `src` keeps its own outside the graph. Returns what was done,
    for the manifest's `quantization` entry."""
    from .quantize import cpu_has_vnni

    model = onnx.load(str(src), load_external_data=False)
    graph = model.graph
    source = _Weights(Path(src).parent, graph)
    reduce_range = scheme.method == "dynamic" and not cpu_has_vnni()  # u8s8 saturates without VNNI: 7-bit weights
    node_quantizer = _NodeQuantizer(scheme, reduce_range)
    external = any(uses_external_data(t) for t in graph.initializer)
    counts = {"MatMul": 0, "Gemm": 0}
    parameters = {"quantized": 0, "float": 0}
    written: set[str] = set()
    nodes: list[onnx.NodeProto] = []
    with quiet_quantizer(), _sink(Path(dst), external) as sink, tempfile.TemporaryDirectory() as scratch_folder:
        node_quantizer.scratch = Path(scratch_folder)
        for node in graph.node:
            target = _weight_matmul(node, source)
            if target is None:
                nodes.append(node)
                continue
            matmul, weight, transpose, bias = target
            array = source.array(weight)
            replaced, tensors = node_quantizer.quantize(matmul, np.ascontiguousarray(array.T) if transpose else array)
            if not replaced:
                nodes.append(node)
                continue
            for tensor in tensors:  # the quantized weight, scales, zero points
                if tensor.name not in written:
                    written.add(tensor.name)
                    graph.initializer.append(sink.put(tensor))
            nodes.extend(replaced + ([bias] if bias is not None else []))
            counts[node.op_type] += 1
            parameters["quantized"] += array.size
        graph.ClearField("node")
        graph.node.extend(_without_unused_casts(nodes, graph))
        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        kept = [t for t in graph.initializer if t.name in used]
        graph.ClearField("initializer")
        for tensor in kept:
            if tensor.name not in written:
                if tensor.data_type in FLOATS and len(tensor.dims) >= 2:
                    parameters["float"] += int(np.prod(tensor.dims, dtype=np.int64))
                tensor = sink.put(tensor, source) if uses_external_data(tensor) else tensor
            graph.initializer.append(tensor)
        for node in graph.node:  # Constant values torch wrote outside the graph move with the weights
            for attribute in node.attribute:
                if attribute.HasField("t") and uses_external_data(attribute.t):
                    attribute.t.CopyFrom(sink.put(attribute.t, source))
        if not any(o.domain == MS_DOMAIN for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
        onnx.save_model(model, str(dst))
    operator = "MatMulNBits" if scheme.method == "nbits" else "MatMulInteger (DynamicQuantizeMatMul once fused)"
    return {
        **asdict(scheme),
        "method": f"weight-only, {scheme.method}",
        "operator": operator,
        "tool": "onnxruntime.quantization: " + ("MatMulNBitsQuantizer's DefaultWeightOnlyQuantizer (round to nearest)"
                                                 if scheme.method == "nbits" else "quantize_dynamic, per node"),
        "per_channel": scheme.method == "dynamic",
        "reduce_range": reduce_range,
        "quantized_ops": counts,
        "float_ops": "attention (activation x activation MatMul), Softmax, norms, Gather embeddings, Conv",
        "parameters_quantized": parameters["quantized"],
        "parameters_float": parameters["float"],
    }  # fmt: skip


class _NodeQuantizer:
    """One MatMul of a weight at a time through onnxruntime's quantization tools, on a graph of that node alone:
    returns the nodes that replace it and the tensors they read (empty when the tool left it float)."""

    def __init__(self, scheme: WeightScheme, reduce_range: bool) -> None:
        self.scheme, self.reduce_range, self.scratch = scheme, reduce_range, Path(".")
        if scheme.method == "nbits":
            from onnxruntime.quantization.matmul_nbits_quantizer import (
                DefaultWeightOnlyQuantConfig,
                DefaultWeightOnlyQuantizer,
            )

            config = DefaultWeightOnlyQuantConfig(block_size=scheme.block_size, is_symmetric=scheme.symmetric,
                                                  accuracy_level=scheme.accuracy_level, bits=scheme.bits)  # fmt: skip
            self.nbits = DefaultWeightOnlyQuantizer(config)
        elif scheme.method != "dynamic" or scheme.bits != 8:
            raise ExportError(f"unknown weight-only scheme {scheme}")

    def quantize(
        self, matmul: onnx.NodeProto, weight: np.ndarray
    ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
        if self.scheme.method == "nbits":
            graph = onnx.GraphProto()  # the quantizer reads the weight from, and adds its tensors to, this graph
            graph.initializer.append(numpy_helper.from_array(weight, matmul.input[1]))
            nodes = self.nbits.quantize(matmul, [graph])
            done = any(n.op_type == "MatMulNBits" for n in nodes)
            return (nodes, list(graph.initializer[1:])) if done else ([], [])
        return self._dynamic(matmul, weight)

    def _dynamic(
        self, matmul: onnx.NodeProto, weight: np.ndarray
    ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        x, w, y = matmul.input[0], matmul.input[1], matmul.output[0]
        graph = helper.make_graph(
            [helper.make_node("MatMul", [x, w], [y], name=matmul.name)],
            "node",
            [helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, None)],
            [helper.make_tensor_value_info(y, onnx.TensorProto.FLOAT, None)],
            [numpy_helper.from_array(weight, w)],
        )
        out = self.scratch / "node.onnx"
        quantize_dynamic(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), out,
                         per_channel=True, reduce_range=self.reduce_range, weight_type=QuantType.QInt8,
                         op_types_to_quantize=["MatMul"])  # fmt: skip
        quantized = onnx.load(str(out)).graph
        if not any(n.op_type == "MatMulInteger" for n in quantized.node):
            return [], []
        tensors = list(quantized.initializer)
        keep = {x, y} | {t.name for t in tensors}  # weights are named after theirs: shared weights stored once
        rename = lambda name: name if name in keep or not name else f"{y}/{name}"  # noqa: E731
        for i, node in enumerate(quantized.node):
            node.input[:] = [rename(n) for n in node.input]
            node.output[:] = [rename(n) for n in node.output]
            node.name = f"{y}/{node.op_type}_{i}"
        return list(quantized.node), tensors


def _weight_matmul(
    node: onnx.NodeProto, source: _Weights
) -> tuple[onnx.NodeProto, str, bool, onnx.NodeProto | None] | None:
    """(MatMul to quantize, its weight, whether the weight is used transposed, the bias Add after it) for a MatMul
    or plain Gemm (alpha = beta = 1, A not transposed) of a 2-D float weight; None for any other node."""
    if node.op_type == "MatMul" and len(node.input) == 2:
        weight = source.resolve(node.input[1])
        return (node, weight, False, None) if weight is not None else None
    if node.op_type != "Gemm":
        return None
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if attributes.get("alpha", 1.0) != 1.0 or attributes.get("beta", 1.0) != 1.0 or attributes.get("transA", 0):
        return None
    weight = source.resolve(node.input[1])
    if weight is None:
        return None
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    transpose = bool(attributes.get("transB", 0))
    product = node.output[0] + "_matmul" if bias else node.output[0]
    inputs = [node.input[0], weight + ("_T" if transpose else "")]
    matmul = helper.make_node("MatMul", inputs, [product], name=node.name + "_matmul")
    add = helper.make_node("Add", [product, bias], [node.output[0]], name=node.name + "_bias") if bias else None
    return matmul, weight, transpose, add


def _attribute(node: onnx.NodeProto, name: str) -> Any:
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), None)


def _without_unused_casts(nodes: list[onnx.NodeProto], graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Drop the Casts that widened weights now quantized (their output no longer read)."""
    read = {name for node in nodes for name in node.input} | {o.name for o in graph.output}
    return [n for n in nodes if n.op_type != "Cast" or any(o in read for o in n.output)]


class _Weights:
    """The source graph's float weights, read from disk one at a time."""

    def __init__(self, folder: Path, graph: onnx.GraphProto) -> None:
        self.folder = folder
        self.tensors = {t.name: t for t in graph.initializer}
        widening = [n for n in graph.node if n.op_type == "Cast" and _attribute(n, "to") == onnx.TensorProto.FLOAT]
        self.passes = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity"}
        self.passes |= {n.output[0]: n.input[0] for n in widening if n.input[0] in self.tensors}

    def resolve(self, name: str) -> str | None:
        """The initializer a MatMul input is (through Identity nodes, and the Cast of a weight stored bf16/fp16:
        lean.py), if it is a 2-D float weight."""
        while name in self.passes:
            name = self.passes[name]
        tensor = self.tensors.get(name)
        if tensor is None or tensor.data_type not in FLOATS or len(tensor.dims) != 2:
            return None
        return name

    def array(self, name: str) -> np.ndarray:
        """The weight's values as float32."""
        tensor = self.tensors[name]
        if not uses_external_data(tensor):
            array = numpy_helper.to_array(tensor)
            return array if array.dtype == np.float32 else array.astype(np.float32)
        narrow = tensor.data_type != onnx.TensorProto.FLOAT
        dtype = np.uint16 if narrow else np.float32
        count = int(np.prod(tensor.dims, dtype=np.int64))
        with open(self.location(tensor), "rb") as f:
            f.seek(int(ExternalDataInfo(tensor).offset or 0))
            array = np.fromfile(f, dtype=dtype, count=count).reshape(tuple(tensor.dims))
        return widen_array(array, tensor.data_type) if narrow else array

    def raw(self, tensor: onnx.TensorProto) -> bytes:
        info = ExternalDataInfo(tensor)
        with open(self.location(tensor), "rb") as f:
            f.seek(int(info.offset or 0))
            return f.read(int(info.length)) if info.length else f.read()

    def location(self, tensor: onnx.TensorProto) -> Path:
        path = (self.folder / ExternalDataInfo(tensor).location).resolve()
        if not path.is_relative_to(self.folder.resolve()):
            raise ExportError(f"{tensor.name}: external data outside {self.folder}")
        return path


class _Sink:
    """Where the new graph's tensors go: appended to its `_data` file (page-aligned, as the exporter writes them)
    when `data` is open, else inline."""

    def __init__(self, data: BinaryIO | None, location: str) -> None:
        self.data, self.location = data, location

    def put(self, tensor: onnx.TensorProto, source: _Weights | None = None) -> onnx.TensorProto:
        if self.data is None:
            return tensor
        payload = source.raw(tensor) if source is not None else tensor.raw_data
        if not payload:  # a tensor the quantizer wrote as typed fields
            payload = numpy_helper.to_array(tensor).tobytes()
        self.data.write(b"\0" * (-self.data.tell() % ALIGNMENT))
        offset = self.data.tell()
        self.data.write(payload)
        stored = onnx.TensorProto()
        stored.CopyFrom(tensor)
        stored.ClearField("raw_data")
        for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
            stored.ClearField(field)
        point_to(stored, self.location, offset, len(payload))
        return stored


@contextmanager
def _sink(dst: Path, external: bool) -> Iterator[_Sink]:
    if not external:
        yield _Sink(None, "")
        return
    location = dst.name + EXTERNAL_DATA_SUFFIX
    with open(dst.parent / location, "wb") as data:
        yield _Sink(data, location)


@contextmanager
def quiet_quantizer() -> Iterator[None]:
    """onnxruntime's quantizers log per node (MatMulNBits two INFO lines, quantize_dynamic a pre-processing
    WARNING on the root logger); a 12B transformer has a thousand nodes."""
    loggers = [logging.getLogger(), logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
