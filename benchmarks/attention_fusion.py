"""What the exporter's attention fusion buys a diffusion transformer: one attention at a model's size, as torch's
exporter decomposes scaled-dot-product attention on [B, heads, S, d] tensors (scale, MatMul, Softmax, MatMul),
against the same graph after `optimize.fuse_attention` (MultiHeadAttention, one head over batch x heads).
Both graphs run in one process, interleaved, on the same inputs; outputs are compared.

    .venv/bin/python -m sd_onnx.benchmarks.attention_fusion [--heads 24 --head-dim 128 --tokens 4608]

Defaults: FLUX.2 [klein] 4B at 1024x1024 (4096 image + 512 text tokens, 24 heads of 128). Results go to
benchmarks/results/attention_fusion.json with the machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from sd_onnx.benchmarks.machine import machine_info, versions
from sd_onnx.exporter.optimize import fuse_attention

RESULTS = Path(__file__).resolve().parent / "results"


class Attention(torch.nn.Module):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def graphs(folder: Path, heads: int, head_dim: int) -> tuple[Path, Path, int]:
    """The decomposed attention as torch.onnx exports it, and that graph fused; how many attentions were fused."""
    decomposed, fused = folder / "decomposed.onnx", folder / "fused.onnx"
    example = torch.zeros(1, heads, 8, head_dim)
    axes = {name: {0: "batch", 1: "heads", 2: f"{name}_tokens"} for name in ("q", "k", "v")}
    torch.onnx.export(Attention(), (example, example, example), str(decomposed), dynamo=False, opset_version=17,
                      input_names=["q", "k", "v"], output_names=["out"], dynamic_axes=axes)  # fmt: skip
    model = onnx.load(str(decomposed))
    count = fuse_attention(model)
    onnx.save(model, str(fused))
    return decomposed, fused, count


def measure(heads: int, head_dim: int, tokens: int, repeats: int) -> dict[str, object]:
    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal((1, heads, tokens, head_dim), dtype=np.float32) for n in ("q", "k", "v")}
    options = ort.SessionOptions()
    options.intra_op_num_threads = 0
    with tempfile.TemporaryDirectory() as scratch:
        decomposed, fused, count = graphs(Path(scratch), heads, head_dim)
        sessions = {name: ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                    for name, path in (("decomposed", decomposed), ("fused", fused))}  # fmt: skip
        outputs = {name: session.run(None, feeds)[0] for name, session in sessions.items()}  # warm-up
        times: dict[str, list[float]] = {name: [] for name in sessions}
        for _ in range(repeats):
            for name, session in sessions.items():
                started = time.perf_counter()
                session.run(None, feeds)
                times[name].append(time.perf_counter() - started)
    median = {name: statistics.median(t) for name, t in times.items()}
    return {
        "shape": {"batch": 1, "heads": heads, "tokens": tokens, "head_dim": head_dim},
        "attentions_fused": count,
        "seconds": {name: [round(t, 4) for t in ts] for name, ts in times.items()},
        "median_s": {name: round(t, 4) for name, t in median.items()},
        "fused_over_decomposed": round(median["fused"] / median["decomposed"], 3),
        "max_abs_diff": float(np.max(np.abs(outputs["fused"] - outputs["decomposed"]))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", type=int, default=24)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=4608)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS / "attention_fusion.json")
    args = parser.parse_args()
    result = measure(args.heads, args.head_dim, args.tokens, args.repeats)
    report = {
        "command": "python -m sd_onnx.benchmarks.attention_fusion "
        f"--heads {args.heads} --head-dim {args.head_dim} --tokens {args.tokens} --repeats {args.repeats}",
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine_info(),
        "versions": versions(("torch", "onnx", "onnxruntime")),
        **result,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(result["median_s"]), "fused/decomposed", result["fused_over_decomposed"])


if __name__ == "__main__":
    main()
