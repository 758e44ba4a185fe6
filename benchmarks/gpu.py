"""fp16 on a CUDA GPU: sd-onnx's fp16 export on onnxruntime's CUDA provider against diffusers on PyTorch CUDA
(fp16 and fp32), on the same weights, seed and settings, in one process.

    python -m sd_onnx.benchmarks.gpu WORKDIR RESULT.json [--steps 20]

Needs onnxruntime-gpu, torch with CUDA and the exporter's libraries. Builds everything it measures in WORKDIR:
the tiny test model (does the fp16 export run on CUDA and draw what fp32 draws on CPU?) and SD 1.5's
architecture with seeded random weights (how fast, against the tools users would otherwise pick).
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from .engines import timed
from .int8_fidelity import psnr

PROMPT = "a photograph of an astronaut riding a horse"


def compare(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    return {
        "max_abs_diff": float(np.max(np.abs(a - b))),
        "mean_abs_diff": float(np.mean(np.abs(a - b))),
        "psnr_db": psnr(a, b, peak=1.0),
    }


def export(source: Path, out: Path, precision: str, components: tuple[str, ...]) -> float:
    from sd_onnx.exporter.convert import convert

    seconds, _ = timed(lambda: convert(str(source), out, components=components, precision=precision, overwrite=True))
    return seconds


def run_sd_onnx(folder: Path, provider: str, steps: int, size: int) -> dict[str, Any]:
    """Load, warm up with one generation, then time a second one step by step."""
    from sd_onnx.runtime import StableDiffusionPipeline

    load_s, pipe = timed(lambda: StableDiffusionPipeline.from_pretrained(folder, provider=provider, low_memory=False))
    args = {
        "prompt": PROMPT,
        "num_inference_steps": steps,
        "height": size,
        "width": size,
        "seed": 0,
        "output_type": "np",
    }
    pipe(**args)
    stamps: list[float] = []
    e2e_s, out = timed(lambda: pipe(**args, callback=lambda i, n, x: stamps.append(time.perf_counter())))
    providers = {name: pipe.component(name).provider for name in pipe.loaded_components}
    return {
        "load_s": load_s,
        "end_to_end_s": e2e_s,
        "unet_step_median_s": statistics.median(np.diff(stamps)),
        "providers": providers,
        "image": out.images[0],
    }


def run_diffusers(folder: Path, dtype: str, steps: int, size: int) -> dict[str, Any]:
    """diffusers' own pipeline on CUDA; the initial noise comes from a CPU generator, as sd-onnx's does."""
    import torch
    from diffusers import StableDiffusionPipeline

    torch_dtype = {"fp16": torch.float16, "fp32": torch.float32}[dtype]
    load_s, pipe = timed(
        lambda: StableDiffusionPipeline.from_pretrained(
            folder, torch_dtype=torch_dtype, safety_checker=None, requires_safety_checker=False
        ).to("cuda")
    )
    pipe.set_progress_bar_config(disable=True)
    stamps: list[float] = []

    def on_step(pipeline: Any, i: int, t: Any, kwargs: dict) -> dict:
        torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        return kwargs

    def generate() -> np.ndarray:
        with torch.no_grad():
            gen = torch.Generator("cpu").manual_seed(0)
            out = pipe(
                PROMPT,
                num_inference_steps=steps,
                height=size,
                width=size,
                generator=gen,
                output_type="np",
                callback_on_step_end=on_step,
            )
        torch.cuda.synchronize()
        return out.images[0]

    generate()
    stamps.clear()
    torch.cuda.reset_peak_memory_stats()
    e2e_s, image = timed(generate)
    return {
        "load_s": load_s,
        "end_to_end_s": e2e_s,
        "unet_step_median_s": statistics.median(np.diff(stamps)),
        "peak_gpu_memory_mb": torch.cuda.max_memory_allocated() / 2**20,
        "image": image,
    }


def tiny_check(work: Path) -> dict[str, Any]:
    """The tiny model's fp16 export on CUDA against its fp32 export on CPU: same picture, every graph on CUDA."""
    from sd_onnx.models.build import build_tiny_pipeline

    source = build_tiny_pipeline(work / "tiny")
    components = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
    export_s = {p: export(source, work / f"tiny-{p}", p, components) for p in ("fp32", "fp16")}
    cuda = run_sd_onnx(work / "tiny-fp16", "cuda", 10, 64)
    cpu = run_sd_onnx(work / "tiny-fp32", "cpu", 10, 64)
    return {
        "export_s": export_s,
        "providers": cuda["providers"],
        "fp16_cuda_vs_fp32_cpu": compare(cuda["image"], cpu["image"]),
    }


def sd15(work: Path, steps: int, size: int) -> dict[str, Any]:
    """SD 1.5 architecture: sd-onnx fp16 and fp32 on CUDA against diffusers fp16 and fp32 on CUDA."""
    import torch

    from sd_onnx.models.build import build_sd15_pipeline

    build_s, source = timed(lambda: build_sd15_pipeline(work / "sd15"))
    components = ("text_encoder", "unet", "vae_decoder")
    export_s = {p: export(source, work / f"sd15-{p}", p, components) for p in ("fp16", "fp32")}
    print(f"sd15: built in {build_s:.0f} s, exported in {export_s} s", flush=True)
    engines = {f"sd-onnx-{p}-cuda": run_sd_onnx(work / f"sd15-{p}", "cuda", steps, size) for p in ("fp16", "fp32")}
    for dtype in ("fp16", "fp32"):
        engines[f"diffusers-{dtype}-cuda"] = run_diffusers(source, dtype, steps, size)
        torch.cuda.empty_cache()
    reference = engines["diffusers-fp32-cuda"]["image"]
    for name, result in engines.items():
        result["vs_diffusers_fp32"] = compare(result.pop("image"), reference)
        print(name, result, flush=True)
    return {"build_s": build_s, "export_s": export_s, "steps": steps, "size": size, "engines": engines}


def environment() -> dict[str, Any]:
    import onnxruntime as ort
    import torch

    return {
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpu": platform.processor() or platform.machine(),
        "onnxruntime": ort.__version__,
        "ort_providers": ort.get_available_providers(),
        "torch": torch.__version__,
    }


def measure(work: Path, result: Path, steps: int = 20, size: int = 512, skip_sd15: bool = False) -> dict[str, Any]:
    """The tiny model's CUDA check, then SD 1.5 timings (`sd-bench gpu`); `result` is rewritten after each part,
    so a run cut short keeps what it measured."""
    work.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"environment": environment()}
    print(report, flush=True)
    report["tiny"] = tiny_check(work)
    print("tiny:", report["tiny"], flush=True)
    result.write_text(json.dumps(report, indent=2, default=str))
    if set(report["tiny"]["providers"].values()) != {"CUDAExecutionProvider"}:
        raise SystemExit("the CUDA provider did not run every graph; not timing SD 1.5")
    if not skip_sd15:
        report["sd15"] = sd15(work, steps, size)
        result.write_text(json.dumps(report, indent=2, default=str))
    return report
