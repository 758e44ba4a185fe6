"""End-to-end int8 vs fp32 fidelity: the same prompts and seeds through both exports, compared as images.

    python benchmarks/int8_fidelity.py FP32_DIR INT8_DIR [--size 256] [--steps 20] [--out FILE.json]

Reports, per prompt, PSNR (dB) and mean abs difference (0-255 scale) of the int8 image against the fp32 one,
plus the per-component figures the quantizer stored in the int8 manifest.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sd_onnx.exporter.calibrate import HELD_OUT_PROMPTS
from sd_onnx.runtime import Manifest, StableDiffusionPipeline

PROMPTS = (*HELD_OUT_PROMPTS, "a photo of an astronaut riding a horse on mars", "a red circle on a blue background")


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    """PSNR in dB of two images whose values reach `peak` (255 for 8-bit, 1 for floats in [0, 1])."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(peak**2 / mse)


def measure(fp32: Path, int8: Path, size: int | None = None, steps: int = 20) -> dict:
    """Images of the fp32 and int8 exports for the same prompts and seeds, and their PSNR (`sd-bench fidelity`)."""
    pipes = {name: StableDiffusionPipeline.from_pretrained(folder, provider="cpu", cache=False)
             for name, folder in (("fp32", fp32), ("int8", int8))}  # fmt: skip
    rows = []
    for seed, prompt in enumerate(PROMPTS):
        images = {
            name: np.asarray(pipe(prompt, seed=seed, num_inference_steps=steps, height=size, width=size).images[0])
            for name, pipe in pipes.items()
        }
        rows.append({
            "prompt": prompt,
            "seed": seed,
            "psnr_db": psnr(images["int8"], images["fp32"]),
            "mean_abs_diff_255": float(np.abs(images["int8"].astype(float) - images["fp32"]).mean()),
        })  # fmt: skip
        print(rows[-1], flush=True)
    manifest = Manifest.load(int8)
    return {
        "fp32": Path(fp32).name,
        "int8": Path(int8).name,
        "steps": steps,
        "size": size or manifest.config.default_resolution,
        "images": rows,
        "mean_psnr_db": float(np.mean([r["psnr_db"] for r in rows])),
        "components": {k: v.validation for k, v in manifest.components.items() if v.precision == "int8"},
    }
