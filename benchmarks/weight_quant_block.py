"""Weight-only quantization choices, measured on one SD3.5 Medium transformer block at 1024x1024's sequence length.

    .venv/bin/python -m sd_onnx.benchmarks.weight_quant_block [--out benchmarks/results/weight_quant_block.json]

The block is diffusers' JointTransformerBlock with SD3.5 Medium's sizes (width 1536, 24 heads of 64, RMS-normed
queries and keys, the second self-attention of its first 13 blocks), seeded random weights, 4,096 image tokens
(128x128 latents in 2x2 patches) and 333 prompt tokens (77 CLIP + 256 T5). Each variant is quantized from the
same fp32 graph. Speed is timed on the block's projections (attention returning its values: the float part that
is the same in every variant, and the noisiest, left out): each round runs every variant in a fresh onnxruntime
session (2 threads, two warm-up runs, then one timed run), rounds interleaved so that the load of a shared CPU
falls on all alike; best and median are reported. Fidelity is the cosine of the whole block's outputs against
the fp32 block's on the same seeded input.

Variants: onnxruntime's MatMulNBits (exporter/quantize_weights.py) at 8 and 4 bits, block sizes 32-256,
symmetric or not, accuracy_level 4 (int8 activations, integer dot products) or 0 (float compute); and
`quantize_dynamic`'s per-channel int8 MatMulInteger (DynamicQuantizeMatMul once onnxruntime fuses it), on the
whole graph and as exporter/quantize_weights.py applies it, one node at a time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from sd_onnx.benchmarks.machine import machine_info, versions
from sd_onnx.exporter.quantize_weights import SCHEMES, WeightScheme, quantize_weights

IMAGE_TOKENS, TEXT_TOKENS, WIDTH = 4096, 333, 1536
NBITS = [
    ("int8 b128 asym acc4", WeightScheme("nbits", 8, 128, False, 4)),
    ("int8 b256 asym acc4", WeightScheme("nbits", 8, 256, False, 4)),
    ("int8 b32 asym acc4", WeightScheme("nbits", 8, 32, False, 4)),
    ("int8 b128 sym acc4", WeightScheme("nbits", 8, 128, True, 4)),
    ("int8 b128 asym acc0", WeightScheme("nbits", 8, 128, False, 0)),
    ("int4 b32 asym acc4", WeightScheme("nbits", 4, 32, False, 4)),
    ("int4 b64 asym acc4", WeightScheme("nbits", 4, 64, False, 4)),
    ("int4 b128 asym acc4", WeightScheme("nbits", 4, 128, False, 4)),
    ("int4 b32 sym acc4", WeightScheme("nbits", 4, 32, True, 4)),
    ("int4 b32 asym acc0", WeightScheme("nbits", 4, 32, False, 0)),
    ("int8 dynamic per-channel, per node (sd-onnx int8)", SCHEMES["int8"]),
]
DYNAMIC = "int8 dynamic per-channel (MatMulInteger), quantize_dynamic on the whole graph"


def export_block(folder: Path, attention: bool = True) -> tuple[Path, dict[str, np.ndarray]]:
    """SD3.5 Medium's first (dual-attention) block as an ONNX graph, and a seeded input at 1024x1024's size.
    Without `attention`, scaled-dot-product attention returns its values as they are: the block's projections,
    norms and feed-forwards, which is all that weight-only quantization changes."""
    import torch
    import torch.nn.functional as F
    from diffusers.models.attention import JointTransformerBlock

    torch.manual_seed(0)
    block = JointTransformerBlock(WIDTH, 24, 64, qk_norm="rms_norm", use_dual_attention=True).eval()

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = block

        def forward(self, hidden: torch.Tensor, context: torch.Tensor, temb: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return self.block(hidden, context, temb)

    gen = torch.Generator().manual_seed(1)
    inputs = (
        torch.randn(1, IMAGE_TOKENS, WIDTH, generator=gen),
        torch.randn(1, TEXT_TOKENS, WIDTH, generator=gen),
        torch.randn(1, WIDTH, generator=gen),
    )
    path = folder / ("fp32" if attention else "fp32_projections") / "model.onnx"
    path.parent.mkdir()
    sdpa = F.scaled_dot_product_attention
    if not attention:
        F.scaled_dot_product_attention = lambda query, key, value, *args, **kwargs: value
    try:
        with torch.no_grad():
            names = {"input_names": ["hidden", "context", "temb"], "output_names": ["context_out", "hidden_out"]}
            torch.onnx.export(Block().eval(), inputs, str(path), dynamo=False, opset_version=17, **names)
    finally:
        F.scaled_dot_product_attention = sdpa
    return path, dict(zip(("hidden", "context", "temb"), (t.numpy() for t in inputs), strict=True))


def run_once(model: Path, feed: dict[str, np.ndarray]) -> tuple[list[np.ndarray], float, float]:
    """A fresh session (2 threads): (outputs, load seconds, seconds of the third run). Two runs warm up: the first
    two runs of a MatMulNBits graph at this size took 2-3x the steady time (workspace allocation)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    started = time.perf_counter()
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    load = time.perf_counter() - started
    outputs = session.run(None, feed)
    session.run(None, feed)
    started = time.perf_counter()
    session.run(None, feed)
    return outputs, load, time.perf_counter() - started


def cosine(want: list[np.ndarray], got: list[np.ndarray]) -> float:
    values = []
    for a, b in zip(want, got, strict=True):
        a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
        values.append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))))
    return min(values)


def size_mb(model: Path) -> float:
    return round(sum(p.stat().st_size for p in model.parent.iterdir()) / 1e6, 1)


def quantized(fp32: Path, folder: Path) -> dict[str, Path]:
    """Every variant of the graph `fp32`, in subfolders of `folder`."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    models = {"fp32": fp32}
    for label, scheme in [*NBITS, (DYNAMIC, None)]:
        models[label] = folder / label.replace(" ", "_") / "model.onnx"
        models[label].parent.mkdir(parents=True)
        if scheme is None:
            quantize_dynamic(str(fp32), str(models[label]), per_channel=True, weight_type=QuantType.QInt8,
                             op_types_to_quantize=["MatMul", "Gemm"])  # fmt: skip
        else:
            quantize_weights(fp32, models[label], scheme)
    return models


def measure(rounds: int = 7) -> dict[str, Any]:
    """Timing on the block's projections (attention left out: float in every variant, and the largest noise),
    every variant once per round in a fresh session, rounds interleaved (the CPU is shared: noise spreads over
    all); then each variant's fidelity, and one timed run, on the whole block."""
    rows: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        projections, feed = export_block(Path(tmp), attention=False)
        models = quantized(projections, Path(tmp) / "projections")
        for round_ in range(rounds):
            for label, model in models.items():
                _, load, seconds = run_once(model, feed)
                row = rows.setdefault(label, {"projections_runs_s": [], "load_s": round(load, 3)})
                row["projections_runs_s"].append(round(seconds, 3))
                print(round_, label, row["projections_runs_s"], flush=True)
        shutil.rmtree(Path(tmp) / "projections")
        block, feed = export_block(Path(tmp))
        reference = None
        for label, model in quantized(block, Path(tmp) / "block").items():
            outputs, _, seconds = run_once(model, feed)
            reference = outputs if label == "fp32" else reference
            rows[label].update({"block_s": round(seconds, 3), "size_mb": size_mb(model)})
            rows[label]["cosine_vs_fp32"] = 1.0 if label == "fp32" else cosine(reference, outputs)
            print(label, rows[label], flush=True)
    for row in rows.values():
        row["projections_best_s"] = min(row["projections_runs_s"])
        row["projections_median_s"] = float(np.median(row["projections_runs_s"]))
    for row in rows.values():
        row["best_vs_fp32"] = round(row["projections_best_s"] / rows["fp32"]["projections_best_s"], 3)
        row["median_vs_fp32"] = round(row["projections_median_s"] / rows["fp32"]["projections_median_s"], 3)
    return {
        "date": time.strftime("%Y-%m-%d"),
        "what": "one SD3.5 Medium JointTransformerBlock (width 1536, 24x64 heads, qk RMS norm, dual attention), "
        f"seeded random weights, {IMAGE_TOKENS} image + {TEXT_TOKENS} text tokens, batch 1, onnxruntime CPU, "
        "2 threads. projections_*: the block with attention returning its values (projections, norms, "
        "feed-forwards: what quantization changes), every variant in a fresh session per round, two warm-up runs "
        f"then one timed run, {rounds} rounds interleaved (the CPU was shared with other work: best and median). "
        "block_s, cosine_vs_fp32, size_mb: the whole block, one timed run after two warm-ups.",
        "machine": machine_info(),
        "versions": versions(("onnxruntime", "onnx", "torch", "diffusers")),
        "variants": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/weight_quant_block.json"))
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    result = measure(args.rounds)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
