"""int8 for upscaler graphs, kept only when it holds fidelity.

Static QDQ quantization of the convolutions with the project's recipe machinery (quantize.py: u8 activations,
s8 per-channel weights), the first and last convolution left in float as for the VAE. Calibration and the
fidelity check run on seeded synthetic images (smooth colour fields with hard-edged shapes and some noise: the
flat areas, edges and texture an upscaler meets); the int8 graph is kept when its worst PSNR against the fp32
graph on held-out images is at least `MIN_PSNR_DB`, otherwise the fp32 graph stays and the manifest says why.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from PIL import Image, ImageDraw

from .quantize import Recipe, cpu_has_vnni, quantize_graph
from .validate import open_session

MIN_PSNR_DB = 35.0  # below this, int8 artefacts show on flat areas and edges
CALIBRATION_IMAGES, HELD_OUT_IMAGES, SIDE = 8, 4, 64


def quantize_upscaler(graph: Path, channels: int, multiple: int, log: Callable[[str], None]) -> dict[str, Any]:
    """Quantize `graph` in place when int8 keeps `MIN_PSNR_DB`; returns the manifest's `quantization` record
    (with `kept`)."""
    work = graph.parent / "_int8"
    work.mkdir()
    fp32 = work / graph.name
    shutil.move(graph, fp32)
    side = SIDE // multiple * multiple
    calibration = [{"image": image} for image in synthetic_images(CALIBRATION_IMAGES, side, 0, channels)]
    held_out = synthetic_images(HELD_OUT_IMAGES, side, 1000, channels)
    recipe = Recipe(op_types=("Conv",), keep_float=_outer_convs(fp32))
    report = quantize_graph(fp32, graph, recipe, calibration, not cpu_has_vnni(), work / "ranges.json")
    psnr = psnr_db(fp32, graph, held_out)
    kept = psnr["psnr_min_db"] >= MIN_PSNR_DB
    if kept:
        log(f"int8: kept, PSNR against fp32 {psnr['psnr_min_db']:.1f} dB (min over {HELD_OUT_IMAGES} images)")
    else:
        log(f"int8: skipped, PSNR against fp32 {psnr['psnr_min_db']:.1f} dB is under {MIN_PSNR_DB:g} dB; "
            "the fp32 graph is kept")  # fmt: skip
        shutil.move(fp32, graph)
    shutil.rmtree(work)
    return {**report, **psnr, "min_psnr_db": MIN_PSNR_DB, "kept": kept, "calibration_images": CALIBRATION_IMAGES}


def _outer_convs(model_file: Path) -> tuple[str, ...]:
    """Names of the first and last Conv nodes (graph order is topological): they touch pixels directly."""
    model = onnx.load(str(model_file), load_external_data=False)
    convs = [node.name for node in model.graph.node if node.op_type == "Conv"]
    return (convs[0], convs[-1]) if convs else ()


def synthetic_images(count: int, side: int, seed: int, channels: int = 3) -> list[np.ndarray]:
    """`count` (1, channels, side, side) float32 images in [0, 1]: a smooth colour field, a few filled shapes
    with hard edges, and mild noise (grey for one channel, opaque for four)."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        coarse = (rng.random((4, 4, 3)) * 255).astype(np.uint8)
        image = Image.fromarray(coarse).resize((side, side), Image.Resampling.BICUBIC)
        draw = ImageDraw.Draw(image)
        for _ in range(3):
            x0, y0 = (int(v) for v in rng.integers(0, side - 8, 2))
            x1, y1 = x0 + int(rng.integers(6, side // 2)), y0 + int(rng.integers(6, side // 2))
            fill = tuple(int(v) for v in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=fill)
        pixels = np.asarray(image, np.float32) / 255 + rng.normal(0, 0.02, (side, side, 3)).astype(np.float32)
        pixels = np.clip(pixels, 0, 1).transpose(2, 0, 1)
        if channels == 1:
            pixels = pixels.mean(axis=0, keepdims=True)
        elif channels == 4:
            pixels = np.concatenate([pixels, np.ones_like(pixels[:1])])
        images.append(pixels[None].astype(np.float32))
    return images


def psnr_db(fp32_file: Path, int8_file: Path, images: list[np.ndarray]) -> dict[str, float]:
    """PSNR of the int8 graph's output against the fp32 graph's (both clipped to [0, 1], peak 1) per image."""
    reference, quantized = open_session(fp32_file), open_session(int8_file)
    values = []
    for image in images:
        a = np.clip(reference.run(None, {"image": image})[0], 0, 1).astype(np.float64)
        b = np.clip(quantized.run(None, {"image": image})[0], 0, 1).astype(np.float64)
        mse = float(np.mean((a - b) ** 2))
        values.append(99.0 if mse == 0 else float(10 * np.log10(1 / mse)))
    return {"psnr_min_db": min(values), "psnr_mean_db": float(np.mean(values)), "held_out_images": len(images)}
