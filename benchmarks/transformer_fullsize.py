"""Full-size export and weight-only quantization of one transformer-family component, seeded random weights.

    .venv/bin/python -m sd_onnx.benchmarks.transformer_fullsize sd35_medium_transformer [--work DIR] [--layers N]

Components (diffusers/transformers configs of the real models): `sd35_medium_transformer` (SD3.5 Medium's
SD3Transformer2DModel, 2.5 B parameters), `t5_xxl` (SD3's and FLUX's T5 v1.1 XXL encoder, 4.7 B),
`flux_schnell_transformer` (FluxTransformer2DModel's defaults, FLUX.1's 11.9 B). `--layers N` builds the same
widths with N blocks, to try the path quickly.

Phases, each in its own process so that each has its own peak RSS (its process tree's high-water mark:
getrusage of itself and its children):
1. export: the module built in bf16 from a fixed seed (never in fp32: `--trace-dtype bf16`'s path), reference
   outputs in fp32 (lean.float32_compute), traced, freed, written as the fp32 graph with bf16-stored weights,
   validated by onnxruntime (convert.export_module, as `sd-export convert --trace-dtype bf16` runs it);
2. int8 and 3. int4: quantize_weights on the fp32 graph, then fidelity against it on held-out inputs (the
   manifest's measure), each graph in its own session, one after the other.
Results go to benchmarks/results/transformer_fullsize_<component>.json with per-step times and RSS peaks of the
export (sampled every 0.2 s), the machine, and the command.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from sd_onnx.benchmarks.machine import machine_info, versions

RESULTS = Path(__file__).resolve().parent / "results"
COMPONENTS = ("sd35_medium_transformer", "t5_xxl", "flux_schnell_transformer")
SD35_MEDIUM = {"num_layers": 24, "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096,
               "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "out_channels": 16,
               "pos_embed_max_size": 384, "dual_attention_layers": tuple(range(13)), "qk_norm": "rms_norm",
               "sample_size": 128, "patch_size": 2, "in_channels": 16}  # fmt: skip
T5_XXL = {"d_model": 4096, "d_ff": 10240, "num_layers": 24, "num_heads": 64, "d_kv": 64, "vocab_size": 32128,
          "feed_forward_proj": "gated-gelu", "is_encoder_decoder": False}  # fmt: skip
ATOL = 1e-2  # full-size random outputs reach tens; the measured difference is recorded either way


def build(component: str, layers: int | None) -> Any:
    """The component with seeded random weights, created directly in bf16."""
    import torch

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        if component == "t5_xxl":
            from transformers import T5Config, T5EncoderModel

            from sd_onnx.exporter.components_transformers import T5Encoder

            config = T5Config(**{**T5_XXL, **({"num_layers": layers} if layers else {})})
            return T5Encoder(T5EncoderModel(config).to(torch.bfloat16))
        if component == "sd35_medium_transformer":
            from diffusers import SD3Transformer2DModel

            from sd_onnx.exporter.components_transformers import SD3Transformer

            overrides = {"num_layers": layers, "dual_attention_layers": tuple(range(min(13, layers)))} if layers else {}
            return SD3Transformer(SD3Transformer2DModel(**{**SD35_MEDIUM, **overrides}).to(torch.bfloat16))
        from diffusers import FluxTransformer2DModel

        from sd_onnx.exporter.components_transformers import FluxTransformer

        overrides = {"num_layers": layers, "num_single_layers": 2 * layers} if layers else {}
        return FluxTransformer(FluxTransformer2DModel(**overrides).to(torch.bfloat16))
    finally:
        torch.set_default_dtype(previous)


def spec_and_source(component: str) -> tuple[Any, Any]:
    """The exporter's ComponentSpec and a stand-in for the pipeline source its sample inputs read: SD3.5's and
    FLUX.1-schnell's configs (1024x1024 models; inputs at the exporter's validation size, 32x32 latents, and
    the pipelines' T5 lengths, SD3 256, schnell 256)."""
    from sd_onnx.exporter.components_transformers import FLUX_TRANSFORMER, SD3_TRANSFORMER, _t5_spec
    from sd_onnx.runtime.manifest import ModelConfig

    family = "flux" if component.startswith("flux") else "sd3"
    config = ModelConfig(embedding_dim=4096, latent_channels=16, vae_scale_factor=8, scaling_factor=1.5305,
                         sample_size=128, max_token_length=77, family=family, max_sequence_length=256,
                         pooled_dim=768 if family == "flux" else 2048, size_multiple=16, patch_size=2)  # fmt: skip
    source = SimpleNamespace(config=config, t5_tokens=SimpleNamespace(pad_id=0, eos_id=1, vocab_size=32128))
    if component == "t5_xxl":
        return _t5_spec("text_encoder_3"), source
    return (FLUX_TRANSFORMER if family == "flux" else SD3_TRANSFORMER), source


class RssSampler:
    """The process's RSS every `period` seconds, attributed to the step `mark` last named."""

    def __init__(self, period: float = 0.2) -> None:
        self.period, self.step, self.peaks = period, "start", {}
        self.started = time.perf_counter()
        self.steps: list[tuple[str, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def mark(self, step: str) -> None:
        self.step = step
        self.steps.append((step, round(time.perf_counter() - self.started, 1)))

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            rss = _rss_gb()
            self.peaks[self.step] = max(self.peaks.get(self.step, 0.0), rss)

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join()
        return {"steps_started_s": self.steps, "peak_rss_gb_by_step": {k: round(v, 2) for k, v in self.peaks.items()}}


def _rss_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    return 0.0


@contextmanager
def marking(sampler: RssSampler, module: Any, names: tuple[str, ...]) -> Iterator[None]:
    """Mark a step each time one of `module`'s functions `names` is called (export_module's steps)."""
    originals = {name: getattr(module, name) for name in names}

    def wrap(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def marked(*args: Any, **kwargs: Any) -> Any:
            sampler.mark(name)
            return function(*args, **kwargs)

        return marked

    for name, function in originals.items():
        setattr(module, name, wrap(name, function))
    try:
        yield
    finally:
        for name, function in originals.items():
            setattr(module, name, function)


def phase_export(component: str, work: Path, layers: int | None) -> dict[str, Any]:
    import torch

    from sd_onnx.exporter import convert
    from sd_onnx.exporter.convert import TRACE_SEED, VALIDATION_SEED, export_module

    spec, source = spec_and_source(component)
    trace_inputs = spec.sample_inputs(source, 1, torch.Generator().manual_seed(TRACE_SEED))
    check_inputs = spec.sample_inputs(source, 2, torch.Generator().manual_seed(VALIDATION_SEED))
    sampler = RssSampler()
    timings: dict[str, float] = {}

    def load() -> Any:
        sampler.mark("build")
        started = time.perf_counter()
        module = build(component, layers).eval()
        timings["build_s"] = round(time.perf_counter() - started, 1)
        timings["parameters"] = sum(p.numel() for p in module.parameters())
        sampler.mark("reference")
        return module

    steps = ("trace_component", "widen_graph", "fix_static_dims", "optimize_file", "open_session", "compare_outputs")
    started = time.perf_counter()
    with marking(sampler, convert, steps):
        info = export_module(load, spec, trace_inputs, check_inputs, work / "fp32", 17, ATOL)
    seconds = time.perf_counter() - started
    memory = sampler.stop()
    (work / "fp32" / "component.json").write_text(json.dumps(asdict(info)))
    return {
        "seconds": round(seconds, 1),
        "export_s_without_build": round(seconds - timings["build_s"], 1),
        **timings,
        "graph_gb": round(_folder_gb(work / "fp32" / spec.name), 2),
        "validation": info.validation,
        **memory,
    }


def phase_quantize(component: str, work: Path, precision: str) -> dict[str, Any]:
    from sd_onnx.exporter.quantize_weights import quantize_weights, scheme_for
    from sd_onnx.exporter.quantize_weights_folder import fidelity, held_out_feeds
    from sd_onnx.runtime.manifest import ComponentInfo

    info = ComponentInfo.from_dict(json.loads((work / "fp32" / "component.json").read_text()))
    fp32 = work / "fp32" / info.file
    out = work / precision / info.file
    out.parent.mkdir(parents=True, exist_ok=True)
    _, source = spec_and_source(component)
    feeds = held_out_feeds(info.inputs, info.validation["input_shapes"], source.config, 32128)
    started = time.perf_counter()
    report = quantize_weights(fp32, out, scheme_for(info.file.split("/")[0], precision))
    quantize_s = time.perf_counter() - started
    started = time.perf_counter()
    measured = fidelity(fp32, out, feeds)
    return {
        "quantize_s": round(quantize_s, 1),
        "fidelity_s": round(time.perf_counter() - started, 1),
        "graph_gb": round(_folder_gb(out.parent), 2),
        "quantization": report,
        "fidelity": measured,
    }


def _folder_gb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) / 1e9


def run_phase(phase: str, component: str, work: Path, layers: int | None, limit: float | None) -> dict[str, Any]:
    """One phase in a child process: its result, wall time and peak RSS (the child's own, its children's)."""
    command = [sys.executable, "-m", "sd_onnx.benchmarks.transformer_fullsize", component, "--work", str(work.parent),
               "--phase", phase, *(["--layers", str(layers)] if layers else []),
               *(["--address-limit-gb", str(limit)] if limit else [])]  # fmt: skip
    started = time.perf_counter()
    child = subprocess.run(command, capture_output=True, text=True)
    result: dict[str, Any] = {"wall_s": round(time.perf_counter() - started, 1)}
    lines = child.stdout.strip().splitlines()
    if child.returncode or not lines:
        result["error"] = (child.stderr.strip().splitlines() or [f"exit {child.returncode}"])[-1]
        result["stderr_tail"] = child.stderr[-3000:]
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # the largest child so far: this one, if it
        result["peak_rss_gb_children_so_far"] = round(peak / 2**20, 2)  # failed for memory
        return result
    return {**result, **json.loads(lines[-1])}


def measure(
    component: str, work: Path, layers: int | None, keep: bool = False, limit: float | None = None
) -> dict[str, Any]:
    """Every phase of `component` in turn; each graph folder deleted once nothing needs it, so disk holds the fp32
    graph and one quantized graph at most."""
    work.mkdir(parents=True, exist_ok=True)
    phases: dict[str, Any] = {}
    for phase in ("export", "int8", "int4"):
        print(f"{time.strftime('%H:%M:%S')} {component}: {phase}", flush=True)
        phases[phase] = run_phase(phase, component, work, layers, limit)
        print(json.dumps(phases[phase])[:2000], flush=True)
        if "error" in phases[phase]:
            break
        if phase != "export" and not keep:
            shutil.rmtree(work / phase, ignore_errors=True)
    if not keep:
        shutil.rmtree(work / "fp32", ignore_errors=True)
    return {
        "date": time.strftime("%Y-%m-%d"),
        "component": component,
        "layers": layers or "full",
        "command": " ".join(
            [
                "python -m sd_onnx.benchmarks.transformer_fullsize",
                component,
                *(["--layers", str(layers)] if layers else []),
                *(["--address-limit-gb", str(limit)] if limit else []),
            ]
        ),
        "machine": machine_info(),
        "memory_gb": round(_total_memory_gb(), 1),
        "versions": versions(("torch", "onnx", "onnxruntime", "diffusers", "transformers")),
        "phases": phases,
    }


def _total_memory_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 2**20
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("component", choices=COMPONENTS)
    parser.add_argument(
        "--work",
        type=Path,
        default=Path(tempfile.gettempdir()) / "sd-onnx-fullsize",
        help="Scratch folder for the graphs (tens of GB) [default: the system's temporary folder].",
    )
    parser.add_argument("--layers", type=int, default=None, help="Blocks to build (default: the real model's).")
    parser.add_argument("--phase", choices=("export", "int8", "int4"), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--keep", action="store_true", help="Keep the graphs in --work.")
    parser.add_argument(
        "--address-limit-gb",
        type=float,
        default=None,
        help="Cap each phase's address space (RLIMIT_AS): a model that cannot fit fails at the cap instead of "
        "waking the kernel's OOM killer on a shared machine.",
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    work = args.work / args.component
    if args.phase:  # a child: one phase, its result as the last line
        if args.address_limit_gb:
            limit = int(args.address_limit_gb * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        if args.phase == "export":
            shutil.rmtree(work / "fp32", ignore_errors=True)
            result = phase_export(args.component, work, args.layers)
        else:
            result = phase_quantize(args.component, work, args.phase)
        own, children = (resource.getrusage(r).ru_maxrss for r in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
        print(json.dumps({**result, "peak_rss_gb": round(max(own, children) / 2**20, 2)}))
        return
    result = measure(args.component, work, args.layers, args.keep, args.address_limit_gb)
    suffix = f"_{args.layers}layers" if args.layers else ""
    out = args.out or RESULTS / f"transformer_fullsize_{args.component}{suffix}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
