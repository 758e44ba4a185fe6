"""What upscaling costs with a full-size Real-ESRGAN x4plus architecture (RRDBNet, 23 blocks, 64 features, seeded
random weights): export time, then one 512x512 -> 2048x2048 upscale per precision (fp32, and int8 when the
exporter keeps it), each in its own process so that its peak RSS is its own, and a smaller image at the same tile
to show that memory follows the tile. Peak RSS is the child's VmHWM (getrusage's ru_maxrss would also count the
parent's memory at the fork: its exporter, with torch). The seam error of tiling is measured against an untiled
run of the same graph on a 256x256 image.

    python -m sd_onnx.benchmarks.upscale benchmarks/results/upscale_x4plus.json

Random weights make the int8 PSNR a statement about this network's arithmetic, not about a trained model's
pictures: measure a real checkpoint with `sd-export upscaler --int8` before relying on it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from .machine import machine_info, versions

SIZES = (512, 256)  # input sides; x4 gives 2048 and 1024
SEAM_SIDE, SEAM_TILE = 256, 128
CHILD = """
import json, re, sys, time
import numpy as np
from PIL import Image
from sd_onnx.runtime.upscale import Upscaler
folder, side, tile = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(0)
coarse = Image.fromarray((rng.random((8, 8, 3)) * 255).astype(np.uint8)).resize((side, side), Image.BICUBIC)
picture = Image.fromarray(np.clip(np.asarray(coarse) + rng.normal(0, 8, (side, side, 3)), 0, 255).astype(np.uint8))
started = time.perf_counter()
upscaler = Upscaler(folder)
upscaler.session()
load = time.perf_counter() - started
started = time.perf_counter()
out = upscaler.run(picture, tile=tile)
seconds = time.perf_counter() - started
np.save(sys.argv[4], np.asarray(out))
print(json.dumps({"load_s": load, "upscale_s": seconds, "output": list(out.size),
                  "peak_rss_mb": int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read())[1]) / 1024}))
"""


def x4plus_checkpoint(path: Path) -> None:
    """Real-ESRGAN x4plus's architecture with seeded random weights, its last layer set so the output varies
    around mid-grey (random weights alone give a black picture)."""
    import torch

    from sd_onnx.exporter.upscaler_arch import RRDBConfig, RRDBNet

    torch.manual_seed(0)
    model = RRDBNet(RRDBConfig())
    with torch.no_grad():
        model.conv_last.weight.mul_(8)
        model.conv_last.bias.fill_(0.5)
    torch.save({"params_ema": model.state_dict()}, path)


def run_child(folder: Path, side: int, tile: int, out: Path) -> dict[str, Any]:
    """One upscale in a fresh process: its load and upscale times and its peak RSS, with the machine's load
    average before it (other work on the cores slows every figure)."""
    load_before = os.getloadavg()[0]
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(folder), str(side), str(tile), str(out)],
        check=True,
        capture_output=True,
        text=True,
    )
    return {**json.loads(result.stdout.strip().splitlines()[-1]), "load_average_1min_before": load_before}


def measure(work: Path, log: Any = print) -> dict[str, Any]:
    from sd_onnx.exporter.upscaler import DEFAULT_TILE, export_upscaler

    checkpoint = work / "RealESRGAN_x4plus_random.pth"
    x4plus_checkpoint(checkpoint)
    exports: dict[str, Any] = {}
    for precision in ("fp32", "int8"):
        started = time.perf_counter()
        manifest = export_upscaler(checkpoint, work / precision, int8=precision == "int8", log=log)
        exports[precision] = {"export_s": time.perf_counter() - started, "precision": manifest.precision,
                              "graph_mb": (work / precision / manifest.graph).stat().st_size / 1e6,
                              "validation": manifest.validation, "quantization": manifest.quantization}  # fmt: skip
    runs = []
    for precision in ("fp32", "int8") if exports["int8"]["precision"] == "int8" else ("fp32",):
        for side in SIZES:
            entry = run_child(work / precision, side, DEFAULT_TILE, work / f"{precision}-{side}.npy")
            runs.append({"precision": precision, "input": [side, side], "tile": DEFAULT_TILE, **entry})
            log(json.dumps(runs[-1]))
    untiled = run_child(work / "fp32", SEAM_SIDE, SEAM_SIDE, work / "untiled.npy")
    tiled = run_child(work / "fp32", SEAM_SIDE, SEAM_TILE, work / "tiled.npy")
    diff = np.abs(np.load(work / "untiled.npy").astype(np.int16) - np.load(work / "tiled.npy").astype(np.int16))
    seam = {"input": [SEAM_SIDE, SEAM_SIDE], "tile": SEAM_TILE, "overlap": 16, "max_abs_diff_of_255": int(diff.max()),
            "mean_abs_diff_of_255": float(diff.mean()), "untiled": untiled, "tiled": tiled}  # fmt: skip
    return {"exports": exports, "runs": runs, "tiling_vs_untiled": seam}


def avx_flags() -> list[str]:
    """Every AVX-family flag of the CPU (/proc/cpuinfo), as `grep flags` shows them."""
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []:
        if line.startswith("flags") and ":" in line:
            return sorted(f for f in line.split(":", 1)[1].split() if f.startswith(("avx", "amx", "fma")))
    return []


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("upscale_x4plus.json")
    with tempfile.TemporaryDirectory() as tmp:
        results = measure(Path(tmp))
    report = {
        "what": "Real-ESRGAN x4plus architecture (RRDBNet, 23 blocks, 64 features), seeded random weights, x4",
        "machine": {**machine_info(), "avx_flags": avx_flags(), "threads": os.cpu_count()},
        "versions": versions(("onnxruntime", "numpy", "pillow", "torch", "onnx")),
        **results,
    }
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
