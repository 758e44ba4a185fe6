"""What a LoRA applied at load time costs (runtime/lora.py): the time to build the overridden weights, and
the UNet step of a session that had to stop at optimization level "extended" against the usual "all", all
in one process with the steps interleaved (the ratios are what to quote).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from sd_onnx.runtime.lora import Lora, weight_overrides
from sd_onnx.runtime.manifest import Manifest
from sd_onnx.runtime.session import OnnxModel, SessionConfig

from .components import model_sizes, unet_feeds


def compare_lora_load(folder: Path, lora_file: Path, scale: float, size: int, threads: int, rounds: int) -> dict:
    """UNet sessions: plain at "all" (the default), plain at "extended", and with the LoRA (at "extended");
    each round runs one step of each in turn."""
    manifest = Manifest.load(folder)
    info, unet_dir = manifest.components["unet"], folder / "unet"
    started = time.perf_counter()
    lora = Lora.read(lora_file, scale)
    overrides = weight_overrides(unet_dir, [lora])
    build_s = time.perf_counter() - started
    sessions: dict[str, Any] = {}
    load_s: dict[str, float] = {}
    for name, level, weights in (("all", "all", None), ("extended", "extended", None), ("lora", "all", overrides)):
        config = SessionConfig(threads=threads, optimization=level, cache=False)
        started = time.perf_counter()
        sessions[name] = OnnxModel(unet_dir / "model.onnx", info, config, weights)
        load_s[name] = time.perf_counter() - started
    feeds = unet_feeds(sessions["all"], model_sizes(folder), size, seed=0)
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(rounds + 1):  # the first round warms up and is dropped
        for name, session in sessions.items():
            started = time.perf_counter()
            session(**feeds)
            times[name].append(time.perf_counter() - started)
    median = {name: statistics.median(values[1:]) for name, values in times.items()}
    return {
        "lora": {"file": lora_file.name, "scale": scale, "modules": len(lora.modules.get("unet", {}))},
        "overridden_initializers": len(overrides),
        "overridden_mb": round(sum(w.nbytes for w in overrides.values()) / 1e6, 1),
        "build_overrides_s": build_s,
        "session_load_s": load_s,
        "unet_step_median_s": median,
        "ratio_vs_all": {name: value / median["all"] for name, value in median.items()},
        "settings": {"size": size, "threads": threads, "rounds": rounds},
    }
