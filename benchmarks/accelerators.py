"""`sd-bench accelerators`: what each opt-in accelerator buys in speed and costs in fidelity.

Fidelity: the shipped shapes model (fp32 and int8), 200 seen + 200 held-out prompts at 20 steps, scored by its
judge per attribute, every setting on the same prompts and seeds as "off". Speed: a large model (SD 1.5 int8
at 512x512, 20 steps), end-to-end generation time, every setting once per round, rounds interleaved in one
process, ratios of medians against "off". A setting is recommended when no attribute of either split loses
more than MAX_LOSS against "off" at either precision.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sd_onnx.models.shapes import shipped_model
from sd_onnx.models.shapes.evaluate import EVAL_SEED, accuracy, eval_scenes, generate
from sd_onnx.runtime.pipeline import StableDiffusionPipeline

# Name -> pipeline arguments. Guidance intervals in sigma: (0.28, 5.42] is the paper's SD-XL/EDM2 interval;
# (1, inf] keeps guidance wherever the image is still noisier than signal.
SETTINGS: dict[str, dict[str, Any]] = {
    "off": {},
    "deepcache 2": {"deepcache_interval": 2},
    "deepcache 3": {"deepcache_interval": 3},
    "deepcache 5": {"deepcache_interval": 5},
    "guidance interval (0.28, 5.42]": {"guidance_interval": (0.28, 5.42)},
    "guidance interval (1, inf]": {"guidance_interval": (1.0, float("inf"))},
    "deepcache 3 + guidance interval (1, inf]": {"deepcache_interval": 3, "guidance_interval": (1.0, float("inf"))},
    "tome 0.3": {"tome_ratio": 0.3},
    "tome 0.5": {"tome_ratio": 0.5},
}
MAX_LOSS = 0.02  # two points of judged accuracy
PROMPT = "a photo of an astronaut riding a horse on mars"
Log = Callable[[str], None]


def shapes_fidelity(prompts: int = 200, log: Log = print) -> dict[str, Any]:
    """Judged accuracy of every setting on the shapes model, fp32 and int8, with its loss against "off"."""
    report: dict[str, Any] = {"prompts_per_split": prompts, "steps": 20, "seed": EVAL_SEED, "precisions": {}}
    scenes = eval_scenes(prompts)
    for precision in ("fp32", "int8"):
        pipe = StableDiffusionPipeline.from_pretrained(shipped_model(precision), provider="cpu")
        rows: dict[str, Any] = {}
        for name, kwargs in SETTINGS.items():
            started = time.perf_counter()
            rows[name] = {
                split: accuracy(chosen, generate(pipe, [s.caption for s in chosen], EVAL_SEED, **kwargs))
                for split, chosen in scenes.items()
            }
            rows[name]["seconds"] = round(time.perf_counter() - started, 1)
            rows[name]["loss_vs_off"] = _losses(rows["off"], rows[name])
            log(f"shapes {precision} {name}: {rows[name]['loss_vs_off']} ({rows[name]['seconds']} s)")
        report["precisions"][precision] = rows
    report["recommended"] = [n for n in SETTINGS if n != "off" and _within(report, n)]
    return report


def _losses(off: dict[str, Any], row: dict[str, Any]) -> dict[str, float]:
    """The largest accuracy loss over the attributes of each split (positive: worse than off)."""
    return {
        split: round(max(off[split][attr] - row[split][attr] for attr in off[split] if attr != "all"), 4)
        for split in ("seen", "held_out")
    }


def _within(report: dict[str, Any], name: str) -> bool:
    rows = report["precisions"].values()
    return all(loss <= MAX_LOSS for row in rows for loss in row[name]["loss_vs_off"].values())


def speed(model: Path, size: int = 512, steps: int = 20, rounds: int = 2, threads: int = 2, log: Log = print) -> dict:
    """End-to-end seconds per image of every setting on `model`, interleaved, and the speedup over "off"."""
    pipe = StableDiffusionPipeline.from_pretrained(model, provider="cpu", threads=threads)
    has = {"deepcache_interval": pipe.config.deepcache_branch is not None, "tome_ratio": pipe.config.token_merging}
    settings = {n: kw for n, kw in SETTINGS.items() if all(has.get(k, True) for k in kw)}
    common = {"num_inference_steps": steps, "width": size, "height": size, "seed": 1, "output_type": "np"}
    for kwargs in settings.values():  # warm-up: every graph's session loaded and its arena grown before timing
        pipe(PROMPT, **{**common, **kwargs, "num_inference_steps": 2})
    times: dict[str, list[float]] = {name: [] for name in settings}
    for r in range(rounds):
        for name, kwargs in settings.items():
            started = time.perf_counter()
            pipe(PROMPT, **common, **kwargs)
            times[name].append(round(time.perf_counter() - started, 2))
            log(f"round {r + 1}/{rounds} {name}: {times[name][-1]} s")
    medians = {name: statistics.median(t) for name, t in times.items()}
    return {
        "model": model.name,
        "size": size,
        "steps": steps,
        "rounds": rounds,
        "threads": threads,
        "deepcache_branch": pipe.config.deepcache_branch,
        "seconds": times,
        "median_s": medians,
        "speedup_vs_off": {name: round(medians["off"] / m, 3) for name, m in medians.items()},
    }


def markdown(report: dict[str, Any]) -> str:
    """The README table: speedup on the large model beside the judged loss on the shapes model."""
    fidelity, timing = report.get("shapes"), report.get("speed")
    lines = [
        "| setting | speedup, SD 1.5 int8 512x512 20 steps | shapes fp32: worst attribute change, seen / held-out "
        "| shapes int8: worst change, seen / held-out | recommended |",
        "|---|---|---|---|---|",
    ]
    for name in SETTINGS:
        ratio = timing["speedup_vs_off"].get(name) if timing else None
        cells = [name, f"{ratio:.2f}x" if ratio else "-"]
        for precision in ("fp32", "int8"):
            row = fidelity["precisions"][precision][name] if fidelity else None
            loss = row["loss_vs_off"] if row else None
            cells.append(
                f"{0.0 - 100 * loss['seen']:+.1f} / {0.0 - 100 * loss['held_out']:+.1f} points" if loss else "-"
            )
        cells.append("yes" if fidelity and name in fidelity["recommended"] else ("" if name == "off" else "no"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
