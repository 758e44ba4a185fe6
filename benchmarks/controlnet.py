"""ControlNet's cost on the SD 1.5 architecture (random weights): `python -m sd_onnx.benchmarks.controlnet WORK`.

Builds SD 1.5 and a ControlNet of its size (diffusers' ControlNetModel.from_unet, seeded random weights, the zero
convolutions too), exports both with `--precision int8` (the UNet, VAE and ControlNet int8), then in one
process, interleaved over rounds: one guided step's UNet call (batch 2 at 512x512) without and with the
ControlNet (its graph, then the UNet that takes residuals), and the ControlNet alone; then peak RSS of a whole
generation with one ControlNet, default and low-memory, each in a fresh process. Writes JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from .machine import machine_info, versions

CHILD = """
import json, sys, time
import numpy as np
from PIL import Image
from sd_onnx.benchmarks.engines import peak_rss_mb
from sd_onnx.runtime import StableDiffusionPipeline
from sd_onnx.runtime.controlnet import ControlUnit
model, low, steps = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3])
started = time.perf_counter()
pipe = StableDiffusionPipeline.from_pretrained(model, provider="cpu", low_memory=low, threads=2)
control = Image.fromarray(np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8))
pipe("a photo of an astronaut", num_inference_steps=steps, height=512, width=512, seed=1, control_image=control)
print(json.dumps({"peak_rss_gb": round(peak_rss_mb() / 1024, 3), "seconds": round(time.perf_counter() - started, 1)}))
"""


def build_and_export(work: Path, log: Any = print) -> Path:
    """The SD 1.5 architecture and its ControlNet, exported int8 with the ControlNet (skipped if already there)."""
    from sd_onnx.exporter.controlnet import ControlNetSource
    from sd_onnx.exporter.convert import convert
    from sd_onnx.models.build import build_controlnet, build_sd15_pipeline

    out = work / "export-int8"
    if (out / "sd_onnx.json").is_file():
        return out
    pipeline = work / "sd15"
    if not (pipeline / "model_index.json").is_file():
        build_sd15_pipeline(pipeline, seed=0)
    if not (work / "controlnet" / "config.json").is_file():
        build_controlnet(pipeline, work / "controlnet", seed=1)
    started = time.perf_counter()
    convert(str(pipeline), out, precision="int8", controlnets=[ControlNetSource.parse(f"{work / 'controlnet'}:cn")],
            overwrite=True, log=log)  # fmt: skip
    log(f"export with --precision int8 and one ControlNet: {time.perf_counter() - started:.0f} s")
    return out


def step_times(model: Path, rounds: int, provider: str, threads: int = 2) -> dict[str, Any]:
    """Median seconds of one guided step's denoiser calls at 512x512 (batch 2): plain UNet, ControlNet + control
    UNet, and the ControlNet alone, interleaved over `rounds`, on `provider` ("auto": the UNet's graphs on
    OpenVINO where the CPU has bf16 or AMX)."""
    from sd_onnx.runtime import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model, provider=provider, threads=threads)
    rng = np.random.default_rng(0)
    config = pipe.config
    side = 512 // config.vae_scale_factor
    feeds = {
        "sample": rng.standard_normal((2, config.latent_channels, side, side)).astype(np.float32),
        "timestep": np.array([500.0, 500.0], np.float32),
        "encoder_hidden_states": rng.standard_normal((2, config.max_token_length, config.embedding_dim)).astype(
            np.float32
        ),
    }
    image = rng.uniform(0, 1, (2, 3, 512, 512)).astype(np.float32)
    unet, control, controlnet = pipe.component("unet"), pipe.component("unet_control"), pipe.component("controlnet_cn")
    times: dict[str, list[float]] = {"unet": [], "controlnet": [], "controlnet+unet_control": []}
    for _ in range(rounds + 1):  # the first round warms up and is dropped
        started = time.perf_counter()
        unet(**feeds)
        plain = time.perf_counter() - started
        started = time.perf_counter()
        residuals = controlnet(**feeds, controlnet_cond=image)
        alone = time.perf_counter() - started
        control(**feeds, **dict(zip(controlnet.output_names, residuals, strict=True)))
        both = time.perf_counter() - started
        for name, value in (("unet", plain), ("controlnet", alone), ("controlnet+unet_control", both)):
            times[name].append(value)
    medians = {name: round(statistics.median(values[1:]), 3) for name, values in times.items()}
    return {
        "engine": pipe.engine,
        "median_s": medians,
        "rounds_s": {name: [round(v, 3) for v in values[1:]] for name, values in times.items()},
        "ratio_to_plain_step": round(medians["controlnet+unet_control"] / medians["unet"], 3),
    }


def model_info(model: Path) -> dict[str, Any]:
    """The ControlNet graph's precision and its int8 fidelity as the export measured it."""
    from sd_onnx.runtime.manifest import Manifest

    info = Manifest.load(model).components["controlnet_cn"]
    return {"precision": info.precision, "validation": info.validation}


def peak_memory(model: Path, steps: int) -> dict[str, Any]:
    """Peak RSS of a whole 512x512 generation with one ControlNet, default and low-memory, each in a fresh process."""
    report = {}
    for name, low in (("default", "0"), ("low-memory", "1")):
        out = subprocess.run([sys.executable, "-c", CHILD, str(model), low, str(steps)], capture_output=True,
                             text=True, check=True)  # fmt: skip
        report[name] = json.loads(out.stdout.strip().splitlines()[-1])
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("work", type=Path, help="Folder for the built models and the export.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2, help="Steps of the peak-memory generations.")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "controlnet_sd15_int8.json")
    args = parser.parse_args(argv)
    model = build_and_export(args.work)
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "command": "python -m sd_onnx.benchmarks.controlnet WORK",
        "machine": machine_info(),
        "versions": versions(("onnxruntime", "numpy", "torch", "diffusers")),
        "model": "SD 1.5 architecture, random weights; UNet and ControlNet int8; 512x512, batch 2 (CFG)",
        "step": {provider: step_times(model, args.rounds, provider) for provider in ("auto", "cpu")},
        "controlnet_int8": model_info(model),
        "peak_memory": peak_memory(model, args.steps),
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
