"""End-to-end int8 vs fp32 fidelity: the same prompts and seeds through both exports, compared as images.

    python benchmarks/int8_fidelity.py FP32_DIR INT8_DIR [--size 256] [--steps 20] [--out FILE.json]

Reports, per prompt, PSNR (dB) and mean abs difference (0-255 scale) of the int8 image against the fp32 one,
plus the per-component figures the quantizer stored in the int8 manifest.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from sd_onnx.exporter.calibrate import HELD_OUT_PROMPTS
from sd_onnx.runtime import Manifest, StableDiffusionPipeline

PROMPTS = (*HELD_OUT_PROMPTS, "a photo of an astronaut riding a horse on mars", "a red circle on a blue background")


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    """PSNR in dB of two images whose values reach `peak` (255 for 8-bit, 1 for floats in [0, 1])."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(peak**2 / mse)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("fp32", type=Path)
    parser.add_argument("int8", type=Path)
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/int8_fidelity.json"))
    args = parser.parse_args()
    pipes = {
        p: StableDiffusionPipeline.from_pretrained(getattr(args, p), provider="cpu", cache=False)
        for p in ("fp32", "int8")
    }
    rows = []
    for seed, prompt in enumerate(PROMPTS):
        images = {
            name: np.asarray(
                pipe(prompt, seed=seed, num_inference_steps=args.steps, height=args.size, width=args.size).images[0]
            )
            for name, pipe in pipes.items()
        }
        rows.append({
            "prompt": prompt,
            "seed": seed,
            "psnr_db": psnr(images["int8"], images["fp32"]),
            "mean_abs_diff_255": float(np.abs(images["int8"].astype(float) - images["fp32"]).mean()),
        })  # fmt: skip
        print(rows[-1], flush=True)
    manifest = Manifest.load(args.int8)
    report = {
        "fp32": str(args.fp32),
        "int8": str(args.int8),
        "steps": args.steps,
        "size": args.size or manifest.config.default_resolution,
        "images": rows,
        "mean_psnr_db": float(np.mean([r["psnr_db"] for r in rows])),
        "components": {k: v.validation for k, v in manifest.components.items() if v.precision == "int8"},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("mean_psnr_db", "components")}, indent=2))


if __name__ == "__main__":
    main()
