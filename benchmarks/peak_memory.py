"""`sd-bench memory`: peak RSS of whole generations in the memory modes, each in a fresh process.

Modes: default, low-memory, low-memory with the tiled VAE, at 512 and 1024 pixels; and the tiled VAE decode
alone at 2048 pixels in low-memory mode (a UNet at 2048 would take hours on a CPU, the decode is what tiling
bounds). Peak RSS is the process's own high-water mark (VmHWM), weights, arenas and Python included.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

CHILD = """
import json, sys, time
import numpy as np
from sd_onnx.benchmarks.engines import peak_rss_mb
from sd_onnx.runtime import StableDiffusionPipeline
model, low, tiling = sys.argv[1], sys.argv[2] == "1", json.loads(sys.argv[3])
size, steps = int(sys.argv[4]), int(sys.argv[5])
started = time.perf_counter()
pipe = StableDiffusionPipeline.from_pretrained(model, provider="cpu", low_memory=low, threads=2)
if steps == 0:  # the VAE decode alone, of seeded latents
    side = size // pipe.config.vae_scale_factor
    latents = np.random.default_rng(0).standard_normal((1, pipe.config.latent_channels, side, side))
    latents = (latents * pipe.config.scaling_factor).astype(np.float32)
    pipe.decode_latents(latents, tiled=bool(tiling))
else:
    pipe("a photo of an astronaut", num_inference_steps=steps, height=size, width=size, seed=1, vae_tiling=tiling)
print(json.dumps({"peak_rss_gb": round(peak_rss_mb() / 1024, 3), "seconds": round(time.perf_counter() - started, 1)}))
"""

# name -> (low_memory, vae_tiling (None: the pipeline's choice), size, steps (0: decode only))
WARM_UP_SIZE = 128
RUNS: dict[str, tuple[bool, bool | None, int, int]] = {
    "default, 512": (False, False, 512, 4),
    "low-memory, 512": (True, False, 512, 4),
    "low-memory + tiled VAE, 512": (True, True, 512, 4),
    "default, 1024": (False, False, 1024, 4),
    "low-memory, 1024": (True, False, 1024, 4),
    "low-memory + tiled VAE, 1024": (True, True, 1024, 4),
    "low-memory + tiled VAE, decode only, 2048": (True, True, 2048, 0),
}


def measure(model: Path, only: tuple[str, ...] = (), log: Any = print) -> dict[str, Any]:
    """Peak RSS and wall time of every run in RUNS (or those named in `only`), each in its own process, after
    one small run per mode has filled the optimized-graph cache (a run that writes it holds more memory, once)."""
    for low in (False, True):
        _run(model, low, False, WARM_UP_SIZE, 1)
    results = {}
    for name, (low, tiling, size, steps) in RUNS.items():
        if only and name not in only:
            continue
        results[name] = _run(model, low, tiling, size, steps)
        log(f"{name}: {results[name]}")
    return {
        "date": time.strftime("%Y-%m-%d"),
        "model": model.name,
        "settings": "4 steps (PNDM), guidance 7.5, 2 threads, each run a fresh process after the optimized-graph "
        "cache was filled; the decode-only run decodes seeded latents",
        "runs": results,
    }


def _run(model: Path, low: bool, tiling: bool | None, size: int, steps: int) -> dict[str, Any]:
    args = [str(model), "1" if low else "0", json.dumps(tiling), str(size), str(steps)]
    out = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True)
    if out.returncode:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])
