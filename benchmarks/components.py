"""UNet step and VAE decode of several model folders, timed in one process with the runs interleaved.

`sd-bench run` gives each engine its own process (so that peak RSS belongs to one engine), one after the
other; on a noisy machine the ratios between engines then move by 10-30 %. Here every graph is loaded once,
and round after round each one runs once in turn, so that a slow spell of the machine hits all of them:
the ratios against the baseline (the first folder) are what to quote.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from sd_onnx.runtime import StableDiffusionPipeline
from sd_onnx.runtime.manifest import FLOAT_DECODER
from sd_onnx.runtime.session import SessionConfig, open_model, resolve_providers, split_provider

TIMESTEP = 500
Graph = Any  # OnnxModel or OpenVinoModel: called with feeds, returns the outputs


def open_graph(file: Path, threads: int, provider: str = "cpu") -> Graph:
    """`file` on the engine `provider` names ("cpu", "openvino", "openvino:f32", ...), as the runtime opens it."""
    precision = split_provider(provider)[1] or "auto"
    config = SessionConfig(tuple(resolve_providers(provider)), threads, cache=False, precision=precision)
    return open_model(file, None, config)


def model_sizes(folder: Path) -> dict[str, int]:
    """Latent channels, text width, VAE scale factor and default resolution, read as the runtime reads them
    (our manifest, or an Optimum folder's configs); no session is opened."""
    config = StableDiffusionPipeline.from_pretrained(folder, low_memory=True, verify=False).config
    return {
        "channels": config.latent_channels,
        "width": config.embedding_dim,
        "factor": config.vae_scale_factor,
        "resolution": config.default_resolution,
    }


def unet_feeds(graph: Graph, sizes: dict[str, int], size: int, seed: int) -> dict[str, np.ndarray]:
    """A classifier-free-guidance batch of 2 in the input types the graph declares (Optimum: 0-d timestep)."""
    rng = np.random.default_rng(seed)
    side = size // sizes["factor"]
    dtype = graph.input_dtype("timestep")
    return {
        "sample": rng.standard_normal((2, sizes["channels"], side, side), np.float32),
        "timestep": np.array(TIMESTEP, dtype) if not graph.input_rank("timestep") else np.full(2, TIMESTEP, dtype),
        "encoder_hidden_states": rng.standard_normal((2, 77, sizes["width"]), np.float32),
    }


def vae_feeds(sizes: dict[str, int], size: int, seed: int) -> dict[str, np.ndarray]:
    side = size // sizes["factor"]
    return {
        "latent_sample": np.random.default_rng(seed).standard_normal((1, sizes["channels"], side, side), np.float32)
    }


def interleaved(runs: dict[str, tuple[Graph, dict[str, np.ndarray]]], rounds: int) -> dict[str, Any]:
    """Two warm-up runs each, then `rounds` rounds in which every graph runs once; medians and ratios
    against the first graph."""
    for graph, feeds in runs.values():
        for _ in range(2):
            graph(**feeds)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, (graph, feeds) in runs.items():
            start = time.perf_counter()
            graph(**feeds)
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    baseline = medians[next(iter(runs))]
    return {"seconds": times, "median_s": medians, "ratio": {n: m / baseline for n, m in medians.items()}}


def compare_components(
    folders: dict[str, Path],
    size: int = 512,
    threads: int = 2,
    rounds: int = 4,
    seed: int = 0,
    providers: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Interleaved UNet-step and VAE-decode timings of `folders` (name -> model folder; the first is the
    baseline), each on its engine in `providers` (name -> "cpu", "openvino", "openvino:f32"...; default cpu).
    Components a folder lacks are skipped."""
    report: dict[str, Any] = {"size": size, "threads": threads, "rounds": rounds, "onnxruntime": ort.__version__}
    sizes = {name: model_sizes(folder) for name, folder in folders.items()}
    # A tiny autoencoder exported beside the VAE (sd-export convert --vae) is timed with the decoders, as NAME-tiny,
    # and the fp32 decoder an int8 export keeps for OpenVINO (quantize_folder.keep_float_decoder) as NAME-float.
    decoders = {"": "vae_decoder", "-float": FLOAT_DECODER, "-tiny": "tiny_vae_decoder"}
    graphs = {"unet": {"": "unet"}, "vae_decoder": decoders}
    for component, variants in graphs.items():
        runs = {}
        for name, folder in folders.items():
            for suffix, graph in variants.items():
                file = folder / graph / "model.onnx"
                if file.is_file():
                    graph = open_graph(file, threads, (providers or {}).get(name, "cpu"))
                    shape = sizes[name]
                    unet = component == "unet"
                    runs[name + suffix] = (
                        graph,
                        unet_feeds(graph, shape, size, seed) if unet else vae_feeds(shape, size, seed),
                    )
        if runs:
            report[component] = interleaved(runs, rounds)
        del runs
    return report
