"""What A1111's hires fix costs on an exported model: a 512x512 first pass upscaled to 1024x1024 in latent space
and denoised again there (runtime/hires.py, the function the A1111 route, the CLI and the API run), in a child
process so that its peak RSS (VmHWM) is its own; the plain 512 and 1024 generations beside it, same process
kind, as the yardsticks a user would compare with.

    python -m sd_onnx.benchmarks.hires MODEL_FOLDER benchmarks/results/hires_sd15_int8.json
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from .machine import machine_info, versions

STEPS, HIRES_STEPS, DENOISE = 20, 10, 0.5
CHILD = """
import json, re, sys, time
from sd_onnx.runtime import GenerationRequest, HiresFix, StableDiffusionPipeline
folder, kind = sys.argv[1], sys.argv[2]
steps, hires_steps, denoise = int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
started = time.perf_counter()
pipe = StableDiffusionPipeline.from_pretrained(folder)
load = time.perf_counter() - started
side = 1024 if kind == "plain_1024" else 512
hires = HiresFix(scale=2, upscaler="Latent", steps=hires_steps, denoising_strength=denoise) if kind == "hires" else None
request = GenerationRequest("a photo of a cat on a sofa", width=side, height=side, steps=steps, seed=1, hires=hires)
started = time.perf_counter()
out = pipe.generate(request)
seconds = time.perf_counter() - started
print(json.dumps({"load_s": load, "generate_s": seconds, "output": list(out.images[0].size), "engine": pipe.engine,
                  "peak_rss_mb": int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read())[1]) / 1024}))
"""


def run(folder: Path, kind: str) -> dict[str, Any]:
    """One generation of `kind` (plain_512, hires, plain_1024) in a fresh process."""
    args = [sys.executable, "-c", CHILD, str(folder), kind, str(STEPS), str(HIRES_STEPS), str(DENOISE)]
    done = subprocess.run(args, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    folder, out = Path(sys.argv[1]), Path(sys.argv[2])
    report: dict[str, Any] = {
        "machine": machine_info(),
        "versions": versions(("onnxruntime", "openvino", "numpy")),
        "model": str(folder.name),
        "settings": {
            "steps": STEPS,
            "hires_steps": HIRES_STEPS,
            "denoising_strength": DENOISE,
            "upscaler": "Latent",
            "first_pass": "512x512",
            "final": "1024x1024",
        },  # fmt: skip
    }
    for kind in ("plain_512", "hires", "plain_1024"):
        report[kind] = run(folder, kind)
        print(kind, report[kind], flush=True)
    report["hires_vs_plain_1024"] = report["hires"]["generate_s"] / report["plain_1024"]["generate_s"]
    out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
