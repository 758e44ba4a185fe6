"""Graph rewrites made at export (optimize.py): what they find in a real export, and what they leave alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from sd_onnx.exporter.optimize import chunk_group_norms, quantize_before_concat, split_geglu
from sd_onnx.runtime import Manifest


def test_export_fuses_every_attention_and_splits_every_geglu(tiny_export: Path, tiny_pipeline: Path) -> None:
    from diffusers import UNet2DConditionModel
    from diffusers.models.activations import GEGLU
    from diffusers.models.attention_processor import Attention

    unet = UNet2DConditionModel.from_pretrained(tiny_pipeline / "unet")
    attentions = sum(isinstance(m, Attention) for m in unet.modules())
    geglus = sum(isinstance(m, GEGLU) for m in unet.modules())
    assert geglus > 0
    manifest = Manifest.load(tiny_export)
    assert manifest.components["unet"].optimizations == {"attention_fused": attentions, "geglu_split": geglus}
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


def test_export_chunks_every_vae_group_norm(tiny_export: Path, tiny_pipeline: Path) -> None:
    import torch
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_pipeline / "vae")
    manifest = Manifest.load(tiny_export)
    for name, part in (("vae_decoder", vae.decoder), ("vae_encoder", vae.encoder)):
        norms = [m for m in part.modules() if isinstance(m, torch.nn.GroupNorm)]
        assert norms and manifest.components[name].optimizations["group_norms_chunked"] == len(norms)
        graph = onnx.load(str(tiny_export / name / "model.onnx")).graph
        slices = sum(next(k for k in (4, 3, 2) if m.num_groups % k == 0) for m in norms)
        assert sum(n.op_type == "InstanceNormalization" for n in graph.node) == slices
    assert "group_norms_chunked" not in manifest.components["unet"].optimizations  # 64x64 latents: nothing to gain


def _group_norm_then_conv(channels: int, groups: int, silu: bool, quantized: bool) -> onnx.ModelProto:
    """torch's export of GroupNorm(groups, channels) [-> SiLU] [-> QuantizeLinear -> DequantizeLinear] -> Conv."""
    rng = np.random.default_rng(0)
    arrays = {
        "grouped": np.array([0, groups, -1], np.int64),
        "ones": np.ones(groups, np.float32),
        "zeros": np.zeros(groups, np.float32),
        "gamma": rng.standard_normal((channels, 1, 1)).astype(np.float32),
        "beta": rng.standard_normal((channels, 1, 1)).astype(np.float32),
        "w": rng.standard_normal((3, channels, 3, 3)).astype(np.float32),
        "scale": np.array(0.02, np.float32),
        "zero_point": np.array(128, np.uint8),
    }
    nodes = [
        helper.make_node("Reshape", ["x", "grouped"], ["r"]),
        helper.make_node("InstanceNormalization", ["r", "ones", "zeros"], ["n"], epsilon=1e-6),
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Reshape", ["n", "s"], ["b"]),
        helper.make_node("Mul", ["b", "gamma"], ["m"]),
        helper.make_node("Add", ["m", "beta"], ["h"]),
    ]
    if silu:
        nodes += [helper.make_node("Sigmoid", ["h"], ["g"]), helper.make_node("Mul", ["h", "g"], ["h2"])]
    last = nodes[-1].output[0]
    if quantized:
        nodes += [
            helper.make_node("QuantizeLinear", [last, "scale", "zero_point"], ["q"]),
            helper.make_node("DequantizeLinear", ["q", "scale", "zero_point"], ["dq"]),
        ]
        last = "dq"
    nodes.append(helper.make_node("Conv", [last, "w"], ["y"], pads=[1, 1, 1, 1]))
    info = helper.make_tensor_value_info
    graph = helper.make_graph(
        nodes,
        "g",
        [info("x", TensorProto.FLOAT, [1, channels, "h", "w"])],
        [info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v, k) for k, v in arrays.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize(
    ("channels", "groups", "silu", "parts"), [(32, 8, True, 4), (12, 6, False, 3), (8, 2, True, 2)]
)
def test_chunked_group_norm_is_bit_exact(channels: int, groups: int, silu: bool, parts: int) -> None:
    # 8 x 16 pixels: each group starts on a 64-byte boundary in both graphs, as at a VAE's sizes (multiples of
    # 8 x 8), so vectorized reductions sum in the same order.
    x = (np.random.default_rng(1).standard_normal((1, channels, 8, 16)) * 3 + 1).astype(np.float32)
    model = _group_norm_then_conv(channels, groups, silu, quantized=False)
    expected = _run(model, x)
    assert chunk_group_norms(model) == 1
    assert [n.op_type for n in model.graph.node].count("InstanceNormalization") == parts
    assert {"gamma", "beta", "grouped", "ones", "zeros"}.isdisjoint(i.name for i in model.graph.initializer)
    np.testing.assert_array_equal(_run(model, x), expected)


def test_slices_quantized_before_their_concat_give_the_same_int8() -> None:
    x = np.random.default_rng(2).standard_normal((1, 16, 8, 8)).astype(np.float32)
    plain = _group_norm_then_conv(16, 4, silu=True, quantized=True)
    expected = _run(plain, x)
    assert chunk_group_norms(plain) == 1  # its Concat feeds the QuantizeLinear that fed the Conv
    assert quantize_before_concat(plain) == 1
    made_by = {out: n for n in plain.graph.node for out in n.output}
    concat = next(n for n in plain.graph.node if n.op_type == "Concat")
    assert all(made_by[i].op_type == "QuantizeLinear" for i in concat.input)
    assert sum(n.op_type == "QuantizeLinear" for n in plain.graph.node) == 4
    np.testing.assert_array_equal(_run(plain, x), expected)


def test_group_norms_that_cannot_be_sliced_are_left_alone() -> None:
    one_group = _group_norm_then_conv(8, 1, silu=True, quantized=False)
    prime = _group_norm_then_conv(10, 5, silu=False, quantized=False)  # 5 groups: no 2..4 divides it
    assert chunk_group_norms(one_group) == 0 and chunk_group_norms(prime) == 0
    assert quantize_before_concat(_group_norm_then_conv(8, 4, True, quantized=True)) == 0  # no Concat


def test_heads_first_attention_fuses_to_one_head_over_batch_and_heads(tmp_path: Path) -> None:
    """SDPA on [B, heads, S, d] (the transformers' layout), as torch exports it, becomes MultiHeadAttention with the
    same outputs, at another batch, head count and token counts than the export's."""
    from sd_onnx.benchmarks.attention_fusion import graphs

    decomposed, fused, count = graphs(tmp_path, heads=3, head_dim=8)
    assert count == 1
    ops = [n.op_type for n in onnx.load(str(fused)).graph.node]
    assert ops.count("MultiHeadAttention") == 1 and "Softmax" not in ops
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 3, 5, 8), dtype=np.float32)
    kv = {n: rng.standard_normal((2, 3, 7, 8), dtype=np.float32) for n in ("k", "v")}
    run = {p: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"q": q, **kv})[0]
           for p in (decomposed, fused)}  # fmt: skip
    assert run[fused].shape == (2, 3, 5, 8)
    np.testing.assert_allclose(run[fused], run[decomposed], atol=1e-5)


@pytest.mark.parametrize(("family", "fused"), [("flux2_klein", 2), ("sd3", 2), ("flux", 2), ("z_image", 1)])
def test_transformer_exports_fuse_their_unmasked_attention(
    family: str, fused: int, request: pytest.FixtureRequest
) -> None:
    """Every attention of FLUX.1/FLUX.2/SD3 (one per block); Z-Image's noise refiner only: its other attentions
    take the prompt's padding mask, which stays decomposed. Parity with PyTorch is each family's export test."""
    manifest = Manifest.load(request.getfixturevalue(f"tiny_{family}_export"))
    assert manifest.components["transformer"].optimizations["attention_fused"] == fused
