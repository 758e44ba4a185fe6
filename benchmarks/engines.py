"""One engine's measurements, run in its own process (`python -m sd_onnx.benchmarks.engines ENGINE SPEC`)
so that peak RSS and imports belong to that engine alone. Prints one JSON record on its last line.

Every engine runs the same work: load twice (first and second load), text encoder alone, one full
generation with a per-step callback (first step, steady-state steps, end to end), VAE decode alone.
"""

from __future__ import annotations

import gc
import json
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

PACKAGES = {
    "diffusers-pytorch": ("torch", "diffusers", "transformers", "accelerate"),
    "optimum-ort": ("optimum-onnx", "optimum", "onnxruntime", "diffusers", "transformers", "torch"),
    "sd-onnx": ("sd-onnx", "onnxruntime", "numpy", "tokenizers", "pillow", "click"),
}


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def _median_time(fn: Callable[[], Any], repeats: int) -> float:
    return statistics.median(timed(fn)[0] for _ in range(repeats))


def _generation(spec: dict) -> dict[str, Any]:
    """The generation arguments every engine shares (same names in diffusers and in sd-onnx)."""
    return {
        "prompt": spec["prompt"],
        "num_inference_steps": spec["steps"],
        "guidance_scale": spec["guidance"],
        "height": spec["size"],
        "width": spec["size"],
        "output_type": "np",
    }


def _load_twice(load: Callable[[], Any]) -> tuple[list[float], Any]:
    """First and second load time (the second shows caches: file system, optimized graphs). The first
    pipeline is freed before the second load, so peak RSS never counts two of them."""
    started = time.perf_counter()
    load()
    first = time.perf_counter() - started
    gc.collect()
    second, pipe = timed(load)
    return [first, second], pipe


def _stamp_calls(obj: Any, method: str, sink: list[float]) -> None:
    """Record when each call of `obj.method` starts (the UNet's, to time the first denoising step)."""
    original = getattr(obj, method)

    def stamped(*args: Any, **kwargs: Any) -> Any:
        sink.append(time.perf_counter())
        return original(*args, **kwargs)

    setattr(obj, method, stamped)


def _summarise(
    loads: list[float], text_s: float, e2e_s: float, unet_starts: list[float], stamps: list[float], vae_s: float
) -> dict:
    """Step times from the first UNet call and the per-step callbacks; the first step also pays for
    first-run allocations, so it is reported apart from the steady-state median."""
    steps = np.diff([unet_starts[0], *stamps]).tolist()
    steady = steps[1:] or steps
    return {
        "load_first_s": loads[0],
        "load_second_s": loads[1],
        "text_encoder_s": text_s,
        "first_step_s": steps[0],
        "unet_step_median_s": statistics.median(steady),
        "unet_step_min_s": min(steady),
        "unet_step_max_s": max(steady),
        "unet_steps": len(steps),
        "vae_decode_s": vae_s,
        "end_to_end_s": e2e_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def run_sd_onnx(spec: dict) -> dict:
    from sd_onnx.runtime import DiffusionPipeline, GenerationRequest

    def load() -> Any:
        return DiffusionPipeline.from_pretrained(
            spec["model"], provider="cpu", threads=spec["threads"], low_memory=spec.get("low_memory", False)
        )

    loads, pipe = _load_twice(load)
    request = pipe.prepare(GenerationRequest(spec["prompt"], guidance_scale=spec["guidance"]))
    text_s = _median_time(lambda: pipe.conditioning(request, request.guidance_scale > 1), 3)
    stamps: list[float] = []
    unet_starts: list[float] = []
    pipe.component("unet").observers.append(lambda feeds: unet_starts.append(time.perf_counter()))
    e2e_s, _ = timed(
        lambda: pipe(
            **_generation(spec),
            seed=0,
            callback=lambda i, n, x: stamps.append(time.perf_counter()),
        )
    )
    side = spec["size"] // pipe.config.vae_scale_factor
    latents = np.zeros((1, pipe.config.latent_channels, side, side), np.float32)
    vae_s = _median_time(lambda: pipe.decode_latents(latents), spec["vae_repeats"])
    return _summarise(loads, text_s, e2e_s, unet_starts, stamps, vae_s)


def _run_diffusers_like(spec: dict, load: Callable[[], Any], decode: Callable[[Any, Any], Any]) -> dict:
    """diffusers' pipeline API, shared by the PyTorch and Optimum engines."""
    import torch

    torch.set_num_threads(spec["threads"])
    loads, pipe = _load_twice(load)
    with torch.no_grad():
        do_cfg = spec["guidance"] > 1
        prompt = spec["prompt"]
        text_s = _median_time(
            lambda: pipe.encode_prompt(
                prompt=prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=do_cfg
            ),
            3,
        )
        stamps: list[float] = []
        unet_starts: list[float] = []
        _stamp_calls(pipe.unet, "forward", unet_starts)

        def on_step(pipeline: Any, i: int, t: Any, kwargs: dict) -> dict:
            stamps.append(time.perf_counter())
            return kwargs

        e2e_s, _ = timed(
            lambda: pipe(
                **_generation(spec),
                generator=torch.Generator().manual_seed(0),
                callback_on_step_end=on_step,
            )
        )
        side = spec["size"] // pipe.vae_scale_factor
        latents = torch.zeros(1, pipe.unet.config.in_channels, side, side)
        vae_s = _median_time(lambda: decode(pipe, latents), spec["vae_repeats"])
    return _summarise(loads, text_s, e2e_s, unet_starts, stamps, vae_s)


def run_diffusers(spec: dict) -> dict:
    from diffusers import DiffusionPipeline

    def load() -> Any:
        pipe = DiffusionPipeline.from_pretrained(spec["model"], safety_checker=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    return _run_diffusers_like(spec, load, lambda pipe, latents: pipe.vae.decode(latents))


def run_optimum(spec: dict) -> dict:
    from optimum.onnxruntime import ORTDiffusionPipeline  # the folder's own pipeline class (SD, SDXL, ...)

    def load() -> Any:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = spec["threads"]
        pipe = ORTDiffusionPipeline.from_pretrained(spec["model"], session_options=options)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    return _run_diffusers_like(spec, load, lambda pipe, latents: pipe.vae.decode(latents))


RUNNERS = {"diffusers-pytorch": run_diffusers, "optimum-ort": run_optimum, "sd-onnx": run_sd_onnx}


def main() -> None:
    from .machine import install_footprint_mb, versions

    spec = json.loads(sys.argv[2])  # argv[1], the engine's name, only labels the process
    kind = spec["kind"]
    record = RUNNERS[kind](spec)
    record["install_mb"] = install_footprint_mb(PACKAGES[kind])
    record["versions"] = versions(PACKAGES[kind])
    print(json.dumps(record))


if __name__ == "__main__":
    main()
