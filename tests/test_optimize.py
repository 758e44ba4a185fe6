"""Graph rewrites made at export (optimize.py): what they find in a real export, and what they leave alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from sd_onnx.exporter.optimize import split_geglu
from sd_onnx.runtime import Manifest


def test_export_fuses_every_attention_and_splits_every_geglu(tiny_export: Path, tiny_pipeline: Path) -> None:
    from diffusers import UNet2DConditionModel
    from diffusers.models.activations import GEGLU
    from diffusers.models.attention_processor import Attention

    unet = UNet2DConditionModel.from_pretrained(tiny_pipeline / "unet")
    attentions = sum(isinstance(m, Attention) for m in unet.modules())
    geglus = sum(isinstance(m, GEGLU) for m in unet.modules())
    assert geglus > 0
    info = Manifest.load(tiny_export).components["unet"]
    assert info.optimizations == {"attention_fused": attentions, "geglu_split": geglus}
    graph = onnx.load(str(tiny_export / "unet" / "model.onnx")).graph
    halves = [n for n in graph.node if n.op_type == "MatMul" and n.name.endswith(("_half0", "_half1"))]
    assert len(halves) == 2 * geglus
    produced_by = {out: n for n in graph.node for out in n.output}
    # No activation Slice is left behind a projection (the graph's parity with PyTorch is test_export's).
    sliced = [produced_by.get(n.input[0]) for n in graph.node if n.op_type == "Slice"]
    assert not any(p is not None and p.op_type == "Add" for p in sliced)


def _projection_then_slices(axis: int, width: int, cut: int | None = None) -> onnx.ModelProto:
    """x @ W + b, then two Slices at `axis` splitting at `cut` (default: the middle), multiplied."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((8, width)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal(width).astype(np.float32), "b"),
        *(
            numpy_helper.from_array(np.array([v], np.int64), n)
            for n, v in [("zero", 0), ("mid", width // 2 if cut is None else cut), ("end", width), ("axis", axis)]
        ),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["m"]),
        helper.make_node("Add", ["b", "m"], ["p"]),
        helper.make_node("Slice", ["p", "zero", "mid", "axis"], ["lo"]),
        helper.make_node("Slice", ["p", "mid", "end", "axis"], ["hi"]),
        helper.make_node("Mul", ["lo", "hi"], ["y"]),
    ]
    info = helper.make_tensor_value_info
    graph = helper.make_graph(
        nodes, "g", [info("x", TensorProto.FLOAT, [2, 3, 8])], [info("y", TensorProto.FLOAT, None)], inits
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_split_is_exact_and_only_for_last_axis_halves() -> None:
    x = np.random.default_rng(1).standard_normal((2, 3, 8)).astype(np.float32)

    def run(model: onnx.ModelProto) -> np.ndarray:
        return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[
            0
        ]

    model = _projection_then_slices(axis=-1, width=6)
    expected = run(model)
    assert split_geglu(model) == 1
    assert [n.op_type for n in model.graph.node].count("MatMul") == 2
    np.testing.assert_array_equal(run(model), expected)
    for axis, width, cut in ((1, 6, None), (-1, 7, None), (-1, 6, 2)):  # not GEGLU's chunk(2, dim=-1)
        untouched = _projection_then_slices(axis, width, cut)
        assert split_geglu(untouched) == 0 and len(untouched.graph.node) == 5
