"""How far each engine's UNet output lies from the fp32 graph on onnxruntime, on held-out pipeline inputs.

`sd-bench engine-fidelity FP32_DIR INT8_DIR` records the UNet's inputs along real denoising trajectories of the
fp32 export (the held-out prompts quantization never saw), then runs every (folder, engine) pair on them: the fp32
graph on onnxruntime is the reference, onnxruntime's int8 is what int8 costs today, and the OpenVINO rows say what
the new engine and its precision add. Cosine similarity (worst and mean) and mean abs difference per row.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from sd_onnx.exporter.calibrate import HELD_OUT_PROMPTS, record
from sd_onnx.runtime import Manifest

from .components import open_graph

ROWS = (("int8", "cpu"), ("int8", "openvino"), ("int8", "openvino:f32"), ("fp32", "openvino"))


def unet_fidelity(fp32: Path, int8: Path, size: int = 256, steps: int = 10, threads: int = 2) -> dict[str, Any]:
    """Worst and mean cosine and mean abs difference of each ROWS entry's UNet output against fp32 onnxruntime."""
    feeds = record(fp32, HELD_OUT_PROMPTS, steps, size, seed=1000).feeds["unet"]
    folders = {"fp32": fp32, "int8": int8}
    unet = Manifest.load(fp32).components["unet"].file

    def outputs(folder: str, provider: str) -> list[np.ndarray]:
        graph = open_graph(folders[folder] / unet, threads, provider)
        return [graph(**feed)[0].astype(np.float64).ravel() for feed in feeds]

    reference = outputs("fp32", "cpu")
    rows = {}
    for folder, provider in ROWS:
        cosines, diffs = [], []
        for a, b in zip(reference, outputs(folder, provider), strict=True):
            cosines.append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30)))
            diffs.append(float(np.abs(a - b).mean()))
        rows[f"{folder}@{provider}"] = {
            "cosine_min": min(cosines),
            "cosine_mean": float(np.mean(cosines)),
            "mean_abs_diff": float(np.mean(diffs)),
        }
    return {"reference": "fp32@cpu", "held_out_inputs": len(feeds), "size": size, "steps": steps, "rows": rows}
