"""A transformer-family pipeline at full size, end to end: build (seeded random weights of the real
architecture), export, and the first image at the model card's size, each phase in its own process.

    .venv/bin/python -m sd_onnx.benchmarks.transformer_pipeline_fullsize sana-sprint-0.6b
    .venv/bin/python -m sd_onnx.benchmarks.transformer_pipeline_fullsize flux2-klein-4b --precision int8 --low-memory
    .venv/bin/python -m sd_onnx.benchmarks.transformer_pipeline_fullsize sd35-medium --steps 2

Models are models/build_fullsize.py's. Phases: 1. build: the diffusers folder, one component at a time in bf16;
2. export: `sd-export convert --trace-dtype bf16 [--precision P]` of what txt2img needs (text encoders, the
transformer, the VAE decoder), each graph validated against PyTorch as always; 3. run: a fresh process loads
the folder with the runtime API and makes one image at the card's size, steps and guidance (`--steps` runs
fewer, when the card's would take hours on this machine: the report then gives the measured steps and the card's
extrapolated from the median step). Each phase's wall time and peak RSS (its own process's high-water mark) go
to benchmarks/results/fullsize_<model>[_<precision>][_low_memory].json with the machine and the command.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sd_onnx.benchmarks.machine import machine_info, versions

RESULTS = Path(__file__).resolve().parent / "results"
PROMPT = "a lighthouse on a cliff at sunset, oil painting"


def child(command: list[str]) -> dict[str, Any]:
    """Run `command`; its wall time, its own peak RSS (wait4's rusage is this child's alone) and, when it prints
    one, the JSON record on its last line."""
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(command, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(process.pid, 0)  # reaps the child: its rusage, not its siblings'
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    result: dict[str, Any] = {"wall_s": round(wall, 1)}
    result["peak_rss_gb"] = round(usage.ru_maxrss / 2**20, 2)
    if returncode:
        result["error"] = (stderr.strip().splitlines() or [f"exit {returncode}"])[-1]
        result["stderr_tail"] = stderr[-3000:]
        return result
    lines = [line for line in stdout.strip().splitlines() if line.startswith("{")]
    return {**result, **(json.loads(lines[-1]) if lines else {}), "log_tail": (stdout + stderr)[-1500:]}


def phase_run(folder: Path, card: dict[str, Any], steps: int, low_memory: bool) -> dict[str, Any]:
    """In this (fresh) process: load, then one image; times of loading, conditioning, each step and decoding."""
    import numpy as np

    from sd_onnx.benchmarks.engines import peak_rss_mb
    from sd_onnx.benchmarks.transformer_fullsize import RssSampler
    from sd_onnx.runtime import DiffusionPipeline

    sampler = RssSampler()
    sampler.mark("load")
    started = time.perf_counter()
    pipe = DiffusionPipeline.from_pretrained(folder, low_memory=low_memory)
    load_s = time.perf_counter() - started
    spans: dict[str, float] = {}
    for method, after in (("conditioning", "denoise"), ("decode_latents", "done")):
        original = getattr(pipe, method)

        def timed(*args: Any, _original: Any = original, _name: str = method, _after: str = after, **kw: Any) -> Any:
            sampler.mark(_name)
            began = time.perf_counter()
            try:
                return _original(*args, **kw)
            finally:
                spans[_name] = spans.get(_name, 0.0) + time.perf_counter() - began
                sampler.mark(_after)

        setattr(pipe, method, timed)
    stamps: list[float] = []
    began = time.perf_counter()
    image = pipe(
        prompt=PROMPT, num_inference_steps=steps, guidance_scale=card["guidance"], height=card["size"],
        width=card["size"], output_type="np", seed=0, callback=lambda i, n, x: stamps.append(time.perf_counter()),
    )  # fmt: skip
    image_s = time.perf_counter() - began
    denoise_start = began + spans["conditioning"]
    step_s = np.diff([denoise_start, *stamps]).tolist()
    pixels = np.asarray(image.images if hasattr(image, "images") else image)
    return {
        "load_s": round(load_s, 2),
        "conditioning_s": round(spans["conditioning"], 2),
        "step_s": [round(s, 2) for s in step_s],
        "decode_s": round(spans["decode_latents"], 2),
        "image_s": round(image_s, 2),
        "first_image_s": round(load_s + image_s, 2),
        "image_shape": list(pixels.shape),
        "image_std": round(float(pixels.std()), 4),
        "peak_rss_gb_vmhwm": round(peak_rss_mb() / 1024, 2),
        "peak_rss_gb_by_phase": sampler.stop()["peak_rss_gb_by_step"],
    }


def card_estimate(run: dict[str, Any], card_steps: int) -> dict[str, Any]:
    """The card's step count from the measured run: load, conditioning and decoding as measured, the steps at
    the median measured step (the first step's extra allocations counted once)."""
    steps = run["step_s"]
    median = statistics.median(steps[1:] or steps)
    denoise = steps[0] + median * (card_steps - 1)
    total = run["load_s"] + run["conditioning_s"] + denoise + run["decode_s"]
    return {"steps": card_steps, "median_step_s": round(median, 2), "first_image_s": round(total, 1)}


def measure(args: argparse.Namespace, phases: dict[str, Any], save: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Build (unless --work has the folder), export (unless --run-only) and run; `phases` holds earlier ones, and
    `save` writes them after each phase (a run stopped midway keeps what it measured)."""
    from sd_onnx.models.build_fullsize import MODELS

    model = MODELS[args.model]
    card = model["card"]
    steps = args.steps or card["steps"]
    source, onnx = args.work / "source", args.work / "onnx"
    python = sys.executable
    layers = ["--layers", str(args.layers)] if args.layers else []
    if not args.run_only:
        if not (source / "model_index.json").is_file():
            shutil.rmtree(source, ignore_errors=True)
            print(f"{time.strftime('%H:%M:%S')} build", flush=True)
            phases["build"] = child([python, "-m", "sd_onnx.models.build_fullsize", args.model, str(source), *layers])
            save(phases)
        components = [c for c in model["components"] if c.startswith("text_encoder") or c == "transformer"]
        export = [python, "-m", "sd_onnx.exporter.cli", "convert", str(source), str(onnx), "--overwrite",
                  "--trace-dtype", "bf16", "--precision", args.precision, "--atol", "1e-2",
                  "--components", ",".join([*components, "vae_decoder"]),
                  "--steps", str(card["steps"]), "--guidance-scale", str(card["guidance"])]  # fmt: skip
        print(f"{time.strftime('%H:%M:%S')} export", flush=True)
        phases["export"] = child(export)
        save(phases)
        if "error" in phases["export"]:
            return phases
        phases["export"]["graphs_gb"] = round(sum(p.stat().st_size for p in onnx.rglob("*") if p.is_file()) / 1e9, 2)
    print(f"{time.strftime('%H:%M:%S')} run", flush=True)
    key = "run_low_memory" if args.low_memory else "run"
    run = [python, "-m", "sd_onnx.benchmarks.transformer_pipeline_fullsize", args.model, "--phase-run",
           str(onnx), "--steps", str(steps), *(["--low-memory"] if args.low_memory else [])]  # fmt: skip
    phases[key] = {"steps": steps, **child(run)}
    if "error" not in phases[key] and steps < card["steps"]:
        phases[key]["card_estimate"] = card_estimate(phases[key], card["steps"])
    save(phases)
    return phases


def main() -> None:
    from sd_onnx.models.build_fullsize import MODELS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=sorted(MODELS))
    parser.add_argument("--precision", choices=("fp32", "int8", "int4"), default="fp32")
    parser.add_argument("--low-memory", action="store_true", help="Run one graph at a time (sd-run --low-memory).")
    parser.add_argument("--steps", type=int, default=None, help="Steps to run (default: the model card's).")
    parser.add_argument("--layers", type=int, default=None, help="Blocks per stack (a quick trial of the path).")
    parser.add_argument("--work", type=Path, default=None, help="Scratch folder (tens of GB) [default: temporary].")
    parser.add_argument("--keep", action="store_true", help="Keep the built folder and the graphs in --work.")
    parser.add_argument(
        "--run-only", action="store_true", help="Only run, on the graphs a --keep run left in --work (e.g. again "
        "with --low-memory); the result joins that run's report."
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--phase-run", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase_run:  # a child: the run phase, its record as the last line
        print(json.dumps(phase_run(args.phase_run, MODELS[args.model]["card"], args.steps, args.low_memory)))
        return
    args.work = args.work or Path(tempfile.gettempdir()) / "sd-onnx-fullsize" / args.model
    name = "_".join([f"fullsize_{args.model.replace('-', '_').replace('.', '')}",
                     *([args.precision] if args.precision != "fp32" else []),
                     *([f"{args.layers}layers"] if args.layers else [])])  # fmt: skip
    out = args.out or RESULTS / f"{name}.json"
    report = json.loads(out.read_text()) if args.run_only and out.is_file() else {"commands": []}
    options = [
        *(["--precision", args.precision] if args.precision != "fp32" else []),
        *(["--low-memory"] if args.low_memory else []),
        *(["--steps", str(args.steps)] if args.steps else []),
        *(["--layers", str(args.layers)] if args.layers else []),
        *(["--run-only"] if args.run_only else []),
    ]
    command = " ".join(["python -m sd_onnx.benchmarks.transformer_pipeline_fullsize", args.model, *options])
    report.update({
        "date": time.strftime("%Y-%m-%d"),
        "model": args.model,
        "card": MODELS[args.model]["card"],
        "precision": args.precision,
        "layers": args.layers or "full",
        "commands": [*report["commands"], command],
        "machine": machine_info(),
        "versions": versions(("torch", "onnx", "onnxruntime", "diffusers", "transformers")),
    })  # fmt: skip

    def save(phases: dict[str, Any]) -> None:
        out.write_text(json.dumps({**report, "phases": phases}, indent=2) + "\n")

    measure(args, report.get("phases", {}), save)
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
