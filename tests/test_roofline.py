"""`sd-bench roofline`: the arithmetic it counts per operator, and its report on the shipped model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from click.testing import CliRunner
from onnx import TensorProto, helper

from sd_onnx.benchmarks.cli import main
from sd_onnx.benchmarks.roofline import node_work, profile_step

SHAPES = Path(__file__).parent.parent / "models" / "shapes"


def test_node_work_counts_multiply_adds_twice() -> None:
    # Attention: Q K^T (2 x 4096 queries x 77 keys x 320) and probabilities x V (same again).
    assert node_work("MultiHeadAttention", [[2, 4096, 320], [2, 77, 320], [2, 77, 320]], [2, 4096, 320], None) == (
        2 * 2 * 4096 * 77 * 640
    )
    assert (
        node_work("MatMulIntegerToFloat", [[2, 4096, 320], [], [1280]], [2, 4096, 1280], None)
        == 2 * 2 * 4096 * 1280 * 320
    )
    assert (
        node_work("QLinearConv", [[2, 64, 64, 320]], [2, 64, 64, 640], [640, 320, 3, 3]) == 2 * 2 * 64 * 64 * 640 * 2880
    )
    assert node_work("Add", [[2, 3], [2, 3]], [2, 3], None) == 0.0


def _known_graph(path: Path) -> None:
    """A float MatMul ([2, 64, 32] x [32, 48]) and a u8s8 QLinearConv (8 -> 16 channels, 3x3, 10x10)."""
    rng = np.random.default_rng(0)
    weights = [
        onnx.numpy_helper.from_array(rng.standard_normal((32, 48)).astype(np.float32), "w"),
        onnx.numpy_helper.from_array(rng.integers(-100, 100, (16, 8, 3, 3)).astype(np.int8), "cw"),
        onnx.numpy_helper.from_array(np.array(0.05, np.float32), "s"),
        onnx.numpy_helper.from_array(np.array(128, np.uint8), "z"),
        onnx.numpy_helper.from_array(np.array(0, np.int8), "wz"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["m"]),
        helper.make_node("Relu", ["m"], ["y"]),
        helper.make_node("QLinearConv", ["c", "s", "z", "cw", "s", "wz", "s", "z"], ["q"], pads=[1, 1, 1, 1]),
    ]
    info = helper.make_tensor_value_info
    graph = helper.make_graph(
        nodes,
        "known",
        [info("x", TensorProto.FLOAT, [2, 64, 32]), info("c", TensorProto.UINT8, [1, 8, 10, 10])],
        [info("y", TensorProto.FLOAT, [2, 64, 48]), info("q", TensorProto.UINT8, [1, 16, 10, 10])],
        initializer=weights,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_profile_counts_each_run_once_and_the_arithmetic_of_each_operator(tmp_path: Path) -> None:
    _known_graph(tmp_path / "known.onnx")
    feeds = {
        "x": np.ones((2, 64, 32), np.float32),
        "c": np.full((1, 8, 10, 10), 130, np.uint8),
    }
    profile = profile_step(tmp_path / "known.onnx", feeds, threads=1, runs=3)
    # Per run, warm-up excluded: exactly one MatMul's and one convolution's arithmetic.
    assert np.isclose(profile["gop"]["MatMul"], 2 * 2 * 64 * 48 * 32 / 1e9)
    assert np.isclose(profile["gop"]["QLinearConv"], 2 * 16 * 10 * 10 * 8 * 9 / 1e9)
    assert {"MatMul", "Relu", "QLinearConv"} <= set(profile["seconds"])
    assert sum(profile["seconds"].values()) <= profile["wall_s"]
    assert list(tmp_path.iterdir()) == [tmp_path / "known.onnx"]  # profile and optimized graph stayed in a temp folder


def test_roofline_cli_reports_floors_and_ratios(tmp_path: Path) -> None:
    out = tmp_path / "roofline.json"
    args = ["roofline", str(SHAPES / "onnx-int8"), "--baseline", str(SHAPES / "onnx"), "--runs", "2", "--rounds", "2"]
    result = CliRunner().invoke(main, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["size"] == 64  # the shipped model's own resolution
    assert set(report["peaks_gop_per_s"]) == {"fp32_matmul", "u8s8_matmul", "u8s8_conv"}
    ops = {row["op"]: row for row in report["ops"]}
    assert {"QLinearConv", "MatMulIntegerToFloat", "MultiHeadAttention"} <= set(ops)
    assert [r["seconds"] for r in report["ops"]] == sorted((r["seconds"] for r in report["ops"]), reverse=True)
    conv = ops["QLinearConv"]
    assert conv["floor_s"] == conv["gop"] / max(
        report["peaks_gop_per_s"]["u8s8_conv"], report["peaks_gop_per_s"]["u8s8_matmul"]
    )
    assert report["floor_s"] == sum(r["floor_s"] for r in report["ops"]) > 0
    assert (
        report["interleaved"]["ratio"]["baseline"] == 1.0 and report["ratio"] == report["interleaved"]["ratio"]["model"]
    )
    assert report["floor_ratio"] > 0 and "floor" in result.output
