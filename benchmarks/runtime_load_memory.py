"""Measure the runtime's session load time (first load vs. optimized-graph cache) and peak RSS with and
without --low-memory, each in its own subprocess, on one model folder, in one invocation.

    python benchmarks/runtime_load_memory.py MODEL_DIR [--size 512] [--steps 2] [--out FILE.json]
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sd_onnx.runtime.session import CACHE_ENV

CHILD = """
import json, sys, time
from sd_onnx.benchmarks.engines import peak_rss_mb
t0 = time.perf_counter()
from sd_onnx.runtime import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained(sys.argv[1], provider="cpu", low_memory=sys.argv[2] == "1", threads=2)
load = time.perf_counter() - t0
t1 = time.perf_counter()
size, steps = int(sys.argv[3]), int(sys.argv[4])
pipe("a photo", num_inference_steps=steps, height=size, width=size, seed=0, scheduler="euler")
gen = time.perf_counter() - t1
print(json.dumps({"load_s": load, "generate_s": gen, "peak_rss_mb": peak_rss_mb()}))
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


def measure(model: Path, size: int = 512, steps: int = 2) -> dict:
    """Load time, generation time and peak RSS of a cold load, a cached load and low-memory mode, each in its own
    process with a fresh optimized-graph cache (`sd-bench load-memory`)."""
    cache = Path(tempfile.mkdtemp(prefix="sd-onnx-cache-"))
    os.environ[CACHE_ENV] = str(cache)  # inherited by each measured process
    started = time.time()
    results = {
        "first_load (no cache)": run(model, False, size, steps),
        "second_load (cached optimized graphs)": run(model, False, size, steps),
        "low_memory (cached)": run(model, True, size, steps),
    }
    shutil.rmtree(cache, ignore_errors=True)
    return {
        "date": time.strftime("%Y-%m-%d", time.gmtime(started)),
        "machine": {"cpu": platform.processor() or platform.machine(), "isa": isa(), "threads": 2},
        "model": Path(model).name,
        "size": size,
        "steps": steps,
        "results": results,
    }
