"""One engine's measurements, run in its own process (`python -m sd_onnx.benchmarks.engines ENGINE SPEC`)
so that peak RSS and imports belong to that engine alone. Prints one JSON record on its last line.

Every engine runs the same work: load, one full generation with a per-step callback (first step,
steady-state steps, end to end; from the parent's spawn to this image is the cold first-image latency), then
a second load (caches warm), the text encoder alone and the VAE decode alone. Engines that expose no such
seams (stable-diffusion.cpp) report them from their own log.
"""

from __future__ import annotations

import gc
import inspect
import json
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

PACKAGES = {
    "diffusers-pytorch": ("torch", "diffusers", "transformers", "accelerate"),
    "optimum-ort": ("optimum-onnx", "optimum", "onnxruntime", "diffusers", "transformers", "torch"),
    "sd-onnx": ("sd-onnx", "onnxruntime", "numpy", "tokenizers", "pillow", "click"),
    "openvino": ("optimum-intel", "openvino", "nncf", "diffusers", "transformers", "torch"),
    "openvino-onnx": ("openvino", "numpy"),
    "sdcpp": ("stable-diffusion-cpp-python", "numpy", "pillow"),
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


def _measure(
    spec: dict,
    load: Callable[[], Any],
    generate: Callable[[Any], tuple[float, list[float]]],
    text: Callable[[Any], Any] | None,
    decode: Callable[[Any], Any] | None,
) -> dict:
    """The shared sequence: first load, a generation (`generate` returns its end-to-end time and step times),
    the cold first-image latency, then the first pipeline freed (peak RSS never counts two) and a second load
    that the text encoder and VAE decode are timed on."""
    first_load, pipe = timed(load)
    e2e_s, steps = generate(pipe)
    cold_s = time.time() - spec["spawned_at"] if "spawned_at" in spec else None
    del pipe
    gc.collect()
    second_load, pipe = timed(load)
    steady = steps[1:] or steps
    return {
        "load_first_s": first_load,
        "load_second_s": second_load,
        "cold_first_image_s": cold_s,
        "text_encoder_s": _median_time(lambda: text(pipe), 3) if text else None,
        "first_step_s": steps[0],
        "unet_step_median_s": statistics.median(steady),
        "unet_step_min_s": min(steady),
        "unet_step_max_s": max(steady),
        "unet_steps": len(steps),
        "vae_decode_s": _median_time(lambda: decode(pipe), spec["vae_repeats"]) if decode else None,
        "end_to_end_s": e2e_s,
        "peak_rss_mb": peak_rss_mb(),
    }


def peak_rss_mb() -> float:
    """This process's peak resident memory. Linux's VmHWM starts afresh at exec; ru_maxrss does not (a child
    of a parent holding 10 GB reports at least the parent's RSS at fork), so it is only the fallback."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _stamp_calls(obj: Any, method: str, sink: list[float]) -> None:
    """Record when each call of `obj.method` starts (the UNet's, to time the first denoising step)."""
    original = getattr(obj, method)

    def stamped(*args: Any, **kwargs: Any) -> Any:
        sink.append(time.perf_counter())
        return original(*args, **kwargs)

    setattr(obj, method, stamped)


def _step_times(unet_starts: list[float], stamps: list[float]) -> list[float]:
    """Per-step seconds: the first from the first UNet call to the first step's end (it pays for first-run
    allocations, so it is reported apart from the steady-state median), the rest between step ends."""
    return np.diff([unet_starts[0], *stamps]).tolist()


def run_sd_onnx(spec: dict) -> dict:
    from sd_onnx.runtime import DiffusionPipeline, GenerationRequest

    engines: list[str] = []

    def load() -> Any:
        vae = "tiny" if spec.get("tiny_vae") else "auto"  # the export carries the tiny autoencoder beside the VAE
        low_memory = spec.get("low_memory", False)
        provider = spec.get("provider", "auto")
        pipe = DiffusionPipeline.from_pretrained(
            spec["model"], provider=provider, threads=spec["threads"], low_memory=low_memory, vae=vae
        )
        engines.append(pipe.engine)
        return pipe

    def generate(pipe: Any) -> tuple[float, list[float]]:
        stamps: list[float] = []
        unet_starts: list[float] = []
        denoiser = pipe.component(pipe.config.denoiser)  # the UNet, or a transformer family's transformer
        denoiser.observers.append(lambda feeds: unet_starts.append(time.perf_counter()))
        step_end = lambda i, n, x: stamps.append(time.perf_counter())  # noqa: E731
        e2e_s, _ = timed(lambda: pipe(**_generation(spec), seed=0, callback=step_end))
        return e2e_s, _step_times(unet_starts, stamps)

    def text(pipe: Any) -> Any:
        request = pipe.prepare(GenerationRequest(spec["prompt"], guidance_scale=spec["guidance"]))
        return pipe.conditioning(request, request.guidance_scale > 1)

    def decode(pipe: Any) -> Any:
        side = spec["size"] // pipe.config.vae_scale_factor
        return pipe.decode_latents(np.zeros((1, pipe.config.latent_channels, side, side), np.float32))

    record = _measure(spec, load, generate, text, decode)
    record["engine"] = engines[-1]  # the engine and precision that ran, e.g. "OpenVINO 2026.4.1 bf16"
    return record


def _run_diffusers_like(spec: dict, load: Callable[[], Any]) -> dict:
    """diffusers' pipeline API, shared by the PyTorch, Optimum and OpenVINO engines."""
    import torch

    torch.set_num_threads(spec["threads"])

    def generate(pipe: Any) -> tuple[float, list[float]]:
        stamps: list[float] = []
        unet_starts: list[float] = []
        _stamp_calls(_denoiser(pipe), "forward", unet_starts)

        def step_end(pipeline: Any, i: int, t: Any, kwargs: dict) -> dict:
            stamps.append(time.perf_counter())
            return kwargs

        seeded = torch.Generator().manual_seed(0)
        e2e_s, _ = timed(lambda: pipe(**_generation(spec), generator=seeded, callback_on_step_end=step_end))
        return e2e_s, _step_times(unet_starts, stamps)

    def text(pipe: Any) -> Any:
        options = {"prompt": spec["prompt"], "device": "cpu", "num_images_per_prompt": 1}
        if "do_classifier_free_guidance" in inspect.signature(pipe.encode_prompt).parameters:  # not distilled ones
            options["do_classifier_free_guidance"] = spec["guidance"] > 1
        return pipe.encode_prompt(**options)

    def decode(pipe: Any) -> Any:
        side = spec["size"] // pipe.vae_scale_factor
        return pipe.vae.decode(torch.zeros(1, pipe.vae.config.latent_channels, side, side))

    with torch.no_grad():
        return _measure(spec, load, generate, text, decode)


def _denoiser(pipe: Any) -> Any:
    """A diffusers-like pipeline's UNet, or its transformer (SD3, FLUX, SANA, ...)."""
    return pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer


def run_diffusers(spec: dict) -> dict:
    from diffusers import DiffusionPipeline

    def load() -> Any:
        pipe = DiffusionPipeline.from_pretrained(spec["model"], safety_checker=None, requires_safety_checker=False)
        if spec.get("tiny_vae"):
            from diffusers import AutoencoderTiny

            pipe.vae = AutoencoderTiny.from_pretrained(spec["tiny_vae"])
        pipe.set_progress_bar_config(disable=True)
        return pipe

    return _run_diffusers_like(spec, load)


def run_optimum(spec: dict) -> dict:
    from optimum.onnxruntime import ORTDiffusionPipeline  # the folder's own pipeline class (SD, SDXL, ...)

    def load() -> Any:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = spec["threads"]
        pipe = ORTDiffusionPipeline.from_pretrained(spec["model"], session_options=options)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    return _run_diffusers_like(spec, load)


def run_openvino(spec: dict) -> dict:
    """optimum-intel's pipeline as FastSD CPU runs it: reshaped to a static size and batch, compiled once,
    OpenVINO's default precision hint (bf16 where the CPU has AMX or AVX-512 bf16, else f32)."""
    from optimum.intel import OVDiffusionPipeline

    def load() -> Any:
        config = {"INFERENCE_NUM_THREADS": str(spec["threads"]), "CACHE_DIR": ""}
        pipe = OVDiffusionPipeline.from_pretrained(spec["model"], compile=False, ov_config=config)
        # optimum-intel's static UNet batch assumes guidance (it doubles the batch); unguided, or guided through
        # an embedding (SANA-Sprint: no negative prompt), the batch stays free
        cfg = spec["guidance"] > 1 and "negative_prompt" in inspect.signature(pipe.__call__).parameters
        batch = 1 if cfg else -1
        pipe.reshape(batch_size=batch, height=spec["size"], width=spec["size"], num_images_per_prompt=batch)
        pipe.compile()
        pipe.set_progress_bar_config(disable=True)
        return pipe

    record = _run_diffusers_like(spec, load)
    record["inference_precision"] = _openvino_precision()
    return record


def _openvino_precision() -> str:
    import openvino as ov

    return ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT").to_string()


def run_openvino_onnx(spec: dict) -> dict:
    """OpenVINO reading this project's own ONNX graphs (`Core.read_model`): UNet step and VAE decode only,
    which tells a better runtime apart from better graphs. Shapes come from the folder's manifest."""
    import openvino as ov

    manifest = json.loads((Path(spec["model"]) / "sd_onnx.json").read_text())
    config = manifest["config"]
    side = spec["size"] // config["vae_scale_factor"]
    sizes = {"batch": 2 if spec["guidance"] > 1 else 1, "height": side, "width": side, "steps": 1}
    sizes["sequence"] = config["max_token_length"]
    core = ov.Core()

    def compiled(name: str, options: dict | None = None) -> tuple[Any, list[np.ndarray]]:
        component = manifest["components"][name]
        model = core.read_model(str(Path(spec["model"]) / component["file"]))
        shapes = {
            i["name"]: [sizes.get(d, d) if isinstance(d, str) else d for d in i["shape"]] for i in component["inputs"]
        }
        if name == "vae_decoder":
            shapes = {k: [1, *v[1:]] for k, v in shapes.items()}
        model.reshape(shapes)
        feeds = [np.random.default_rng(0).standard_normal(s).astype(np.float32) for s in shapes.values()]
        config = {"INFERENCE_NUM_THREADS": str(spec["threads"]), **(options or {})}
        return core.compile_model(model, "CPU", config), feeds

    def load() -> Any:
        return {name: compiled(name) for name in ("unet", "vae_decoder")}

    def generate(models: Any) -> tuple[float, list[float]]:
        unet, feeds = models["unet"]
        started = time.perf_counter()
        steps = [timed(lambda: unet(feeds))[0] for _ in range(spec["steps"])]
        return time.perf_counter() - started, steps

    def decode(models: Any) -> Any:
        vae, feeds = models["vae_decoder"]
        return vae(feeds)

    record = _measure(spec, load, generate, None, decode)
    record["end_to_end_s"] = None  # UNet steps alone: no text encoder, scheduler or decode in that time
    record["cold_first_image_s"] = None
    record["inference_precision"] = _openvino_precision()
    record["unet_profile"] = _openvino_profile(*compiled("unet", {"PERF_COUNT": "YES"}))  # after the peak RSS
    return record


def _openvino_profile(model: Any, feeds: list[np.ndarray]) -> list[dict]:
    """Where one UNet step goes in OpenVINO by operation type, with the kernels it chose (AMX, VNNI, bf16...),
    from its performance counters: the evidence for why its step is faster or slower than ours."""
    request = model.create_infer_request()
    for _ in range(2):  # the second run is the one read
        request.infer(feeds)
    totals: dict[str, dict] = {}
    for info in request.get_profiling_info():
        if info.status != info.Status.EXECUTED:
            continue
        entry = totals.setdefault(info.node_type, {"op": info.node_type, "seconds": 0.0, "kernels": set()})
        entry["seconds"] += info.real_time.total_seconds()
        entry["kernels"].add(info.exec_type)
    rows = sorted(totals.values(), key=lambda row: -row["seconds"])[:12]
    return [{**row, "seconds": round(row["seconds"], 4), "kernels": sorted(row["kernels"])[:4]} for row in rows]


def run_sdcpp(spec: dict) -> dict:
    """stable-diffusion.cpp through its Python binding, on the GGUF file its converter wrote (the weight type
    is the file's): same prompt, steps, guidance, size and threads; Euler, one UNet evaluation per step like
    the others' default schedulers. It has no text-encoder or decoder seam: those times come from its log of
    the generation, step times from its progress callback."""
    import contextlib
    import io

    import stable_diffusion_cpp as sd_cpp
    from stable_diffusion_cpp import StableDiffusion

    log = io.StringIO()

    def load() -> Any:
        tiny = str(Path(spec["tiny_vae"]) / "diffusion_pytorch_model.safetensors") if spec.get("tiny_vae") else ""
        with contextlib.redirect_stderr(log):  # the binding prints the library's log to sys.stderr
            return StableDiffusion(
                model_path=spec["model"], taesd_path=tiny, n_threads=spec["threads"], vae_decode_only=True
            )

    def generate(model: Any) -> tuple[float, list[float]]:
        ends: list[float] = []
        first_step: list[float] = []  # the library's own time for step 1 (its start is not observable)

        def progress(step: int, steps: int, seconds: float) -> None:
            if steps == spec["steps"] and step > len(ends):
                ends.append(time.perf_counter())
                if not first_step:
                    first_step.append(seconds)

        options = {"cfg_scale": spec["guidance"], "sample_method": "euler", "sample_steps": spec["steps"]}
        with contextlib.redirect_stderr(log):
            e2e_s, _ = timed(
                lambda: model.generate_image(
                    spec["prompt"],
                    width=spec["size"],
                    height=spec["size"],
                    seed=0,
                    progress_callback=progress,
                    **options,
                )
            )
        sd_cpp.sd_set_progress_callback(None, None)  # the binding's callback object dies with generate_image
        return e2e_s, [first_step[0], *np.diff(ends).tolist()]

    record = _measure(spec, load, generate, None, None)
    record["text_encoder_s"] = _logged_seconds(log.getvalue(), "get_learned_condition completed")
    record["vae_decode_s"] = _logged_seconds(log.getvalue(), "decode_first_stage completed")
    record["weight_type"] = Path(spec["model"]).stem.rsplit("-", 1)[-1]
    return record


def _logged_seconds(log: str, event: str) -> float | None:
    """The first "EVENT, taking N.NNs" figure in stable-diffusion.cpp's log."""
    import re

    found = re.search(re.escape(event) + r", taking ([0-9.]+)s", log)
    return float(found.group(1)) if found else None


RUNNERS = {
    "diffusers-pytorch": run_diffusers,
    "optimum-ort": run_optimum,
    "sd-onnx": run_sd_onnx,
    "openvino": run_openvino,
    "openvino-onnx": run_openvino_onnx,
    "sdcpp": run_sdcpp,
}


def main() -> None:
    from .machine import install_footprint_mb, versions

    spec = json.loads(sys.argv[2])  # argv[1], the engine's name, only labels the process
    kind = spec["kind"]
    record = RUNNERS[kind](spec)
    packages = PACKAGES[kind] + (("openvino",) if record.get("engine", "").startswith("OpenVINO") else ())
    record["install_mb"] = install_footprint_mb(packages)
    record["versions"] = versions(packages)
    print(json.dumps(record))


if __name__ == "__main__":
    main()
