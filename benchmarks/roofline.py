"""Where a UNet step's time goes, against what the machine's kernels can do at best.

Each operator type's share of a profiled step, the arithmetic it does (from the shapes onnxruntime's
profiler records and the weights of the optimized graph), its throughput, and its floor: that arithmetic at
the peak the same process measures for a large GEMM of the same kind (fp32 MatMul for float operators, u8s8
MatMulInteger and QLinearConv for integer ones). The sum of the floors bounds how fast the graph can get
with these kernels however its glue (casts, adds, layouts) is trimmed; divided by a baseline step (Optimum's
fp32 graph, timed interleaved with ours) it bounds the ratio any recipe that keeps those operators can reach.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from .components import interleaved, model_sizes, open_graph, unet_feeds

FLOAT_OPS = {"MultiHeadAttention", "Attention", "MatMul", "Gemm", "FusedMatMul", "Conv", "FusedConv"}
MATMUL_OPS = {"MatMul", "FusedMatMul", "Gemm", "MatMulInteger", "MatMulIntegerToFloat", "QGemm", "QLinearMatMul"}
CONV_OPS = {"Conv", "FusedConv", "QLinearConv", "NhwcFusedConv"}


def _single_node_model(node: onnx.NodeProto, inputs: list, output: Any, inits: list | None = None) -> bytes:
    graph = helper.make_graph([node], "peak", inputs, [output], initializer=inits or [])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def _throughput(model: bytes, feeds: dict[str, np.ndarray], ops: float, threads: int, repeats: int = 5) -> float:
    """Best of `repeats` runs: a peak is what the kernel reaches when the (shared, noisy) machine lets it."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    session.run(None, feeds)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feeds)
        best = min(best, time.perf_counter() - start)
    return ops / best / 1e9


def kernel_peaks(threads: int, n: int = 2048) -> dict[str, float]:
    """GOP/s of a large fp32 MatMul, u8s8 MatMulInteger and u8s8 QLinearConv (3x3, 320 channels, 64x64,
    batch 2: SD's busiest convolution) on this machine, `threads` threads."""
    rng = np.random.default_rng(0)
    info = helper.make_tensor_value_info
    fp32 = _single_node_model(
        helper.make_node("MatMul", ["a", "b"], ["y"]),
        [info("a", TensorProto.FLOAT, [n, n]), info("b", TensorProto.FLOAT, [n, n])],
        info("y", TensorProto.FLOAT, [n, n]),
    )
    int8 = _single_node_model(
        helper.make_node("MatMulInteger", ["a", "b"], ["y"]),
        [info("a", TensorProto.UINT8, [n, n]), info("b", TensorProto.INT8, [n, n])],
        info("y", TensorProto.INT32, [n, n]),
    )
    channels, side = 320, 64
    weight = helper.make_tensor(
        "w", TensorProto.INT8, [channels, channels, 3, 3], rng.integers(-127, 127, channels * channels * 9).tolist()
    )
    scalars = [
        helper.make_tensor("s", TensorProto.FLOAT, [], [0.02]),
        helper.make_tensor("z", TensorProto.UINT8, [], [128]),
        helper.make_tensor("wz", TensorProto.INT8, [], [0]),
    ]
    conv = _single_node_model(
        helper.make_node("QLinearConv", ["x", "s", "z", "w", "s", "wz", "s", "z"], ["y"], pads=[1, 1, 1, 1]),
        [info("x", TensorProto.UINT8, [2, channels, side, side])],
        info("y", TensorProto.UINT8, [2, channels, side, side]),
        [weight, *scalars],
    )
    square = 2.0 * n**3
    return {
        "fp32_matmul": _throughput(
            fp32,
            {"a": rng.standard_normal((n, n), np.float32), "b": rng.standard_normal((n, n), np.float32)},
            square,
            threads,
        ),
        "u8s8_matmul": _throughput(
            int8,
            {"a": rng.integers(0, 255, (n, n), np.uint8), "b": rng.integers(-127, 127, (n, n), np.int8)},
            square,
            threads,
        ),
        "u8s8_conv": _throughput(
            conv,
            {"x": rng.integers(0, 255, (2, channels, side, side), np.uint8)},
            2.0 * 2 * side * side * channels * channels * 9,
            threads,
        ),
    }


def node_work(op: str, inputs: list[list[int]], output: list[int], weight: list[int] | None) -> float:
    """Multiply-adds x 2 of one profiled node; 0 for operators that are not a GEMM, convolution or attention."""
    if op in ("MultiHeadAttention", "Attention") and len(inputs) >= 3 and len(inputs[1]) == 3:
        (batch, queries, width), keys, values = inputs[0], inputs[1][1], inputs[2][-1]
        return 2.0 * batch * queries * keys * (width + values)
    if op in MATMUL_OPS:
        return 2.0 * float(np.prod(output)) * inputs[0][-1]
    if op in CONV_OPS and weight:
        return 2.0 * float(np.prod(output)) * float(np.prod(weight[1:]))
    return 0.0


def _peak_for(op: str, peaks: dict[str, float]) -> float | None:
    if op in FLOAT_OPS:
        return peaks["fp32_matmul"]
    if op == "QLinearConv":
        return max(peaks["u8s8_conv"], peaks["u8s8_matmul"])
    if op in MATMUL_OPS:
        return peaks["u8s8_matmul"]
    return None


def _conv_weights(optimized: Path) -> dict[str, list[int]]:
    graph = onnx.load(str(optimized), load_external_data=False).graph
    dims = {init.name: list(init.dims) for init in graph.initializer}
    weights = {}
    for node in graph.node:
        if node.op_type in CONV_OPS:
            weight = node.input[3] if node.op_type == "QLinearConv" else node.input[1]
            weights[node.name] = dims.get(weight)
    return weights


def profile_step(file: Path, feeds: dict[str, np.ndarray], threads: int, runs: int) -> dict[str, Any]:
    """Per operator type: seconds and GOP per step, from onnxruntime's profiler over `runs` runs after one
    warm-up run (the profiler records the warm-up too: it is dropped by its position)."""
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", "optimized.data")
        session = ort.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
        session.run(None, feeds)
        start = time.perf_counter()
        for _ in range(runs):
            session.run(None, feeds)
        wall = (time.perf_counter() - start) / runs
        events = json.loads(Path(session.end_profiling()).read_text())
        weights = _conv_weights(Path(tmp) / "optimized.onnx")
    seconds: dict[str, float] = defaultdict(float)
    work: dict[str, float] = defaultdict(float)
    runs_seen = [e for e in events if e.get("name") == "model_run"]
    skip_until = runs_seen[0]["ts"] + runs_seen[0]["dur"] if runs_seen else 0
    for event in events:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time") or event["ts"] < skip_until:
            continue
        args = event["args"]
        shapes = [next(iter(s.values())) for s in args["input_type_shape"]]
        output = next(iter(args["output_type_shape"][0].values()))
        name = event["name"].removesuffix("_kernel_time")
        seconds[args["op_name"]] += event["dur"] / 1e6 / runs
        work[args["op_name"]] += node_work(args["op_name"], shapes, output, weights.get(name)) / 1e9 / runs
    return {"wall_s": wall, "seconds": dict(seconds), "gop": dict(work)}


def roofline(
    folder: Path,
    baseline: Path | None = None,
    size: int | None = None,
    threads: int = 2,
    runs: int = 3,
    rounds: int = 3,
) -> dict[str, Any]:
    """Profile `folder`'s UNet step (at `size`, by default the model's own resolution) by operator type
    against this machine's kernel peaks; with `baseline`, time both steps interleaved and express the step and
    its floor as ratios of the baseline's step."""
    sizes = model_sizes(folder)
    size = size or sizes["resolution"]
    file = folder / "unet" / "model.onnx"
    session = open_graph(file, threads)  # for the feeds' types, and later the interleaved timing
    feeds = unet_feeds(session, sizes, size, seed=0)
    before = kernel_peaks(threads)
    profile = profile_step(file, feeds, threads, runs)
    after = kernel_peaks(threads)  # measured on both sides of the profile, the better of the two kept
    peaks = {kind: max(before[kind], after[kind]) for kind in before}
    rows = []
    for op, spent in sorted(profile["seconds"].items(), key=lambda item: -item[1]):
        gop, peak = profile["gop"].get(op, 0.0), _peak_for(op, peaks)
        floor = gop / peak if gop and peak else 0.0
        rows.append(
            {"op": op, "seconds": spent, "gop": gop, "gop_per_s": gop / spent if gop else None, "floor_s": floor}
        )
    kernel_s = sum(r["seconds"] for r in rows)
    report: dict[str, Any] = {
        "size": size,
        "threads": threads,
        "onnxruntime": ort.__version__,
        "peaks_gop_per_s": peaks,
        "step_wall_s": profile["wall_s"],
        "kernel_s": kernel_s,
        "floor_s": sum(r["floor_s"] for r in rows),
        "ops": rows,
    }
    if baseline is not None:
        base_file = baseline / "unet" / "model.onnx"
        base_session = open_graph(base_file, threads)
        timing = interleaved(
            {
                "baseline": (base_session, unet_feeds(base_session, model_sizes(baseline), size, seed=0)),
                "model": (session, feeds),
            },
            rounds,
        )
        base_step = timing["median_s"]["baseline"]
        report["interleaved"] = timing
        # The machine's pace drifts (10-30 %): scale the floors by how much slower or faster the same graph
        # ran interleaved than while profiled.
        pace = timing["median_s"]["model"] / profile["wall_s"]
        report["ratio"] = timing["ratio"]["model"]
        report["floor_ratio"] = report["floor_s"] * pace / base_step
    return report
