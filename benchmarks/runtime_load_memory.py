"""Measure the runtime's session load time (first load vs. optimized-graph cache) and peak RSS with and
without --low-memory, each in its own subprocess, on one model folder, in one invocation.

    python benchmarks/runtime_load_memory.py MODEL_DIR [--size 512] [--steps 2] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sd_onnx.runtime.session import CACHE_ENV

CHILD = """
import json, resource, sys, time
t0 = time.perf_counter()
from sd_onnx.runtime import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained(sys.argv[1], provider="cpu", low_memory=sys.argv[2] == "1", threads=2)
load = time.perf_counter() - t0
t1 = time.perf_counter()
size, steps = int(sys.argv[3]), int(sys.argv[4])
pipe("a photo", num_inference_steps=steps, height=size, width=size, seed=0, scheduler="euler")
gen = time.perf_counter() - t1
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"load_s": load, "generate_s": gen, "peak_rss_mb": peak}))
"""


def isa() -> str:
    flags = Path("/proc/cpuinfo").read_text().split()
    return ",".join(sorted({f for f in flags if f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")}))


def run(model: Path, low_memory: bool, size: int, steps: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(model), "1" if low_memory else "0", str(size), str(steps)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", type=Path)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/runtime_load_memory.json"))
    args = parser.parse_args()
    cache = Path(tempfile.mkdtemp(prefix="sd-onnx-cache-"))
    os.environ[CACHE_ENV] = str(cache)  # a fresh optimized-graph cache, inherited by each measured process
    started = time.time()
    results = {
        "first_load (no cache)": run(args.model, False, args.size, args.steps),
        "second_load (cached optimized graphs)": run(args.model, False, args.size, args.steps),
        "low_memory (cached)": run(args.model, True, args.size, args.steps),
    }
    report = {
        "date": time.strftime("%Y-%m-%d", time.gmtime(started)),
        "machine": {"cpu": platform.processor() or platform.machine(), "isa": isa(), "threads": 2},
        "model": str(args.model),
        "size": args.size,
        "steps": args.steps,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
