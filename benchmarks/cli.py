"""`sd-bench`: run every engine on the same model and settings, each in its own process, and report."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

from sd_onnx.runtime.session import CACHE_ENV

from .machine import folder_mb, machine_info
from .report import write_report

ENGINES = ("diffusers-pytorch", "optimum-ort", "sd-onnx-fp32", "sd-onnx-int8")
KIND = {
    "diffusers-pytorch": "diffusers-pytorch",
    "optimum-ort": "optimum-ort",
    "sd-onnx-fp32": "sd-onnx",
    "sd-onnx-int8": "sd-onnx",
}
PROMPT = "a photo of an astronaut riding a horse on mars"


def prepare_models(source: Path, work: Path, engines: tuple[str, ...], optimum_python: str) -> dict[str, Path]:
    """Each engine's model folder: the diffusers source, our export, Optimum's export (made once, reused)."""
    folders = {"diffusers-pytorch": source}
    (work / "failed.json").unlink(missing_ok=True)  # failures are found again on every run
    log = lambda line: click.echo(f"  {line}", err=True)  # noqa: E731
    if {"sd-onnx-fp32", "sd-onnx-int8"} & set(engines):
        folders["sd-onnx-fp32"] = work / "sd-onnx-fp32"
        if not folders["sd-onnx-fp32"].is_dir():
            from sd_onnx.exporter.convert import convert

            started = time.perf_counter()
            convert(str(source), folders["sd-onnx-fp32"], log=log)
            _record_step(work, "export_fp32", started)
    if "sd-onnx-int8" in engines:
        folders["sd-onnx-int8"] = work / "sd-onnx-int8"
        if not folders["sd-onnx-int8"].is_dir():
            from sd_onnx.exporter.quantize_folder import quantize_folder

            started = time.perf_counter()
            quantize_folder(folders["sd-onnx-fp32"], folders["sd-onnx-int8"], log=log)
            _record_step(work, "quantize_int8", started)
    # A fresh optimized-graph cache for this run (child processes inherit it), so the first load is a real one.
    shutil.rmtree(work / "ort-cache", ignore_errors=True)
    os.environ[CACHE_ENV] = str(work / "ort-cache")
    if "optimum-ort" in engines:
        folders["optimum-ort"] = work / "optimum-ort"
        if not folders["optimum-ort"].is_dir():
            _export_optimum(source, folders["optimum-ort"], work, optimum_python)
    return folders


def _export_optimum(source: Path, out: Path, work: Path, optimum_python: str) -> None:
    """Optimum's own export of `source` (in its environment), timed with its peak RSS; a failure (out of memory
    above all) is written to work/failed.json, so the report shows it as that engine's result."""
    import resource

    cmd = [optimum_python, "-m", "optimum.commands.optimum_cli", "export", "onnx"]
    cmd += ["--model", str(source), "--task", "text-to-image", str(out)]
    started = time.perf_counter()
    result = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak_mb = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
    step = {"seconds": round(time.perf_counter() - started, 1), "process_peak_rss_mb": peak_mb}
    if result.returncode == 0:
        _record(work, "steps.json", "export_optimum", step)
        return
    shutil.rmtree(out, ignore_errors=True)
    killed = result.returncode in (-9, 137)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    reason = "killed by the system (out of memory)" if killed else (lines[-1] if lines else f"exit {result.returncode}")
    _record(work, "failed.json", "optimum-ort", {**step, "error": f"optimum export failed: {reason}"})


# Options whose values are this machine's paths: reports show placeholders, so they read the same anywhere.
PATH_OPTIONS = {"--work": "<work>", "--out": "<out>", "--model": "<model>", "--optimum-python": "<python>"}


def invocation(ctx: click.Context) -> str:
    """The command as given (options that differ from their defaults), with placeholders for path values."""
    parts = ["sd-bench", ctx.info_name or "run"]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if not isinstance(param, click.Option) or value is None or value is False or value == param.default:
            continue
        flag = max(param.opts, key=len)
        parts += [flag] if param.is_flag else [flag, PATH_OPTIONS.get(flag) or shlex.quote(str(value))]
    return " ".join(parts)


def _record_step(work: Path, name: str, started: float) -> None:
    """Append how long a preparation step took, and this process's peak RSS so far, to work/steps.json."""
    import resource

    peak_mb = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    _record(
        work, "steps.json", name, {"seconds": round(time.perf_counter() - started, 1), "process_peak_rss_mb": peak_mb}
    )


def _record(work: Path, file: str, name: str, entry: dict) -> None:
    path = work / file
    records = json.loads(path.read_text()) if path.is_file() else {}
    records[name] = entry
    path.write_text(json.dumps(records, indent=2) + "\n")


def run_engine(engine: str, spec: dict, python: str, work: Path) -> dict:
    """One engine in a fresh process; its last stdout line is the JSON record. A failure (an engine that
    crashes or runs out of memory) is that engine's result: {"error": ...}."""
    cmd = [python, "-m", "sd_onnx.benchmarks.engines", engine, json.dumps(spec)]
    env = dict(os.environ)
    if python != sys.executable:  # a peer's environment has no sd-onnx: lend it the engine modules alone
        env["PYTHONPATH"] = str(_engine_modules(work))
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        tail = result.stderr.strip().splitlines()[-1:] or ["no output"]
        killed = result.returncode in (-9, 137)
        return {"error": "killed by the system (out of memory)" if killed else tail[0]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def _engine_modules(work: Path) -> Path:
    """A folder holding `sd_onnx.benchmarks.engines` and what it imports (the standard library and NumPy
    only), for peers' environments."""
    root = work / "_engine_modules"
    package = root / "sd_onnx" / "benchmarks"
    package.mkdir(parents=True, exist_ok=True)
    (root / "sd_onnx" / "__init__.py").touch()
    for name in ("__init__.py", "engines.py", "machine.py"):
        shutil.copy2(Path(__file__).with_name(name), package / name)
    return root


def benchmark(
    source: Path,
    work: Path,
    engines: tuple[str, ...],
    steps: int,
    size: int,
    threads: int,
    optimum_python: str,
    model_label: str,
    command: str,
    guidance: float = 7.5,
    low_memory: bool = False,
) -> dict:
    folders = prepare_models(source, work, engines, optimum_python)
    settings = {"steps": steps, "size": size, "guidance": guidance, "threads": threads, "prompt": PROMPT}
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "command": command,
        "machine": machine_info(),
        "settings": {**settings, "model_label": model_label, "scheduler": "the model's default"},
        "engines": {},
    }
    if (work / "steps.json").is_file():
        report["preparation"] = json.loads((work / "steps.json").read_text())
    for i, engine in enumerate(engines, 1):
        click.echo(f"[{i}/{len(engines)}] {engine}: running", err=True)
        spec = {**settings, "kind": KIND[engine], "model": str(folders[engine]), "vae_repeats": 2}
        spec["low_memory"] = low_memory and KIND[engine] == "sd-onnx"
        python = optimum_python if engine == "optimum-ort" else sys.executable
        failed = json.loads((work / "failed.json").read_text()) if (work / "failed.json").is_file() else {}
        record = failed.get(engine) or run_engine(engine, spec, python, work)
        report["engines"][engine] = record
        if "error" in record:
            click.echo(f"[{i}/{len(engines)}] {engine}: failed: {record['error']}", err=True)
            continue
        record["model_mb"] = folder_mb(folders[engine])
        click.echo(
            f"[{i}/{len(engines)}] {engine}: UNet step {record['unet_step_median_s']:.2f} s, "
            f"end to end {record['end_to_end_s']:.1f} s, peak RSS {record['peak_rss_mb']:.0f} MB",
            err=True,
        )
    return report


@click.group(invoke_without_command=True)
@click.option("--quick", is_flag=True, help="Smoke run: tiny model, sd-onnx and diffusers, under a minute.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="Where --quick writes JSON.")
@click.pass_context
def main(ctx: click.Context, quick: bool, json_path: Path | None) -> None:
    """Benchmark sd-onnx against diffusers (PyTorch) and Optimum (onnxruntime)."""
    if ctx.invoked_subcommand is not None:
        return
    if not quick:
        click.echo(ctx.get_help())
        return
    from sd_onnx.models.build import build_tiny_pipeline

    with tempfile.TemporaryDirectory() as tmp:
        source = build_tiny_pipeline(Path(tmp) / "tiny-sd")
        engines = ("sd-onnx-fp32", "diffusers-pytorch")
        report = benchmark(
            source, Path(tmp), engines, 4, 32, 2, sys.executable, "tiny (seeded random)", "sd-bench --quick"
        )
    path = json_path or Path("sd-bench-quick.json")
    path.write_text(json.dumps(report, indent=2) + "\n")
    click.echo(str(path))


RANDOM_ARCHITECTURES = {"sd15": "SD 1.5", "sd21": "SD 2.1-base", "sdxl": "SDXL base 1.0"}


@main.command()
@click.option("--model", type=click.Path(path_type=Path, exists=True), default=None, help="Local diffusers folder.")
@click.option(
    "--random",
    "architecture",
    type=click.Choice(list(RANDOM_ARCHITECTURES)),
    default=None,
    help="Build this architecture with seeded random weights (python -m sd_onnx.models.build).",
)
@click.option("--sd15-random", is_flag=True, help="Same as --random sd15.")
@click.option("--engines", default=",".join(ENGINES), show_default=True)
@click.option("--steps", default=4, show_default=True, type=click.IntRange(1))
@click.option("--guidance", default=7.5, show_default=True, type=click.FloatRange(0, 100), help="0: no CFG batch.")
@click.option("--size", default=512, show_default=True, type=int)
@click.option("--threads", default=2, show_default=True, type=int)
@click.option("--low-memory", is_flag=True, help="sd-onnx engines load one component at a time.")
@click.option("--name", default="benchmark", show_default=True, help="Report file names: NAME.json, NAME.md.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("benchmarks/results"), show_default=True)
@click.option("--work", type=click.Path(path_type=Path), default=Path("out/bench"), show_default=True)
@click.option("--optimum-python", default=sys.executable, help="Python of an environment with optimum-onnx.")
def run(
    model: Path | None,
    architecture: str | None,
    sd15_random: bool,
    engines: str,
    steps: int,
    guidance: float,
    size: int,
    threads: int,
    low_memory: bool,
    name: str,
    out: Path,
    work: Path,
    optimum_python: str,
) -> None:
    """Full benchmark: JSON, Markdown with ratios, and plots into --out."""
    chosen = tuple(e.strip() for e in engines.split(",") if e.strip())
    unknown = set(chosen) - set(ENGINES)
    if unknown:
        raise click.ClickException(f"unknown engine(s) {', '.join(sorted(unknown))} (known: {', '.join(ENGINES)})")
    architecture = "sd15" if sd15_random else architecture
    if (model is None) == (architecture is None):
        raise click.ClickException("give exactly one of --model PATH or --random ARCHITECTURE")
    work.mkdir(parents=True, exist_ok=True)
    if architecture:
        from sd_onnx.models.build import RECIPES, build_pipeline

        model = work / f"{architecture}-random"
        if not model.is_dir():
            started = time.perf_counter()
            build_pipeline(RECIPES[architecture], model)
            _record_step(work, "build", started)
    label = f"{RANDOM_ARCHITECTURES[architecture]} architecture, seeded random weights" if architecture else str(model)
    command = invocation(click.get_current_context())
    report = benchmark(model, work, chosen, steps, size, threads, optimum_python, label, command, guidance, low_memory)
    for path in write_report(report, out, name=name):
        click.echo(str(path))


@main.command()
@click.argument("folders", nargs=-1, required=True)
@click.option("--size", default=512, show_default=True, type=int)
@click.option("--threads", default=2, show_default=True, type=int)
@click.option("--rounds", default=4, show_default=True, type=click.IntRange(1))
@click.option("--out", type=click.Path(path_type=Path), default=None, help="JSON file for the report.")
def components(folders: tuple[str, ...], size: int, threads: int, rounds: int, out: Path | None) -> None:
    """UNet step and VAE decode of NAME=FOLDER model folders (sd-onnx or Optimum exports), interleaved in one
    process; ratios against the first."""
    from .components import compare_components

    named = {}
    for item in folders:
        name, sep, path = item.partition("=")
        if not sep or not Path(path).is_dir():
            raise click.ClickException(f"expected NAME=FOLDER with an existing folder, got {item!r}")
        named[name] = Path(path)
    report = {"machine": machine_info(), **compare_components(named, size, threads, rounds)}
    text = json.dumps(report, indent=2) + "\n"
    if out:
        out.write_text(text)
    for component in ("unet", "vae_decoder"):
        for name, ratio in report.get(component, {}).get("ratio", {}).items():
            median = report[component]["median_s"][name]
            click.echo(f"{component:12s} {name:20s} {median:7.3f} s  {ratio:.3f}x")


@main.command()
@click.argument("folder", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option(
    "--baseline",
    type=click.Path(path_type=Path, exists=True, file_okay=False),
    default=None,
    help="Folder whose UNet step the ratios divide by (Optimum's fp32 export).",
)
@click.option("--size", default=None, type=int, help="Image side in pixels [default: the model's own].")
@click.option("--threads", default=2, show_default=True, type=int)
@click.option("--runs", default=3, show_default=True, type=click.IntRange(1), help="Profiled runs.")
@click.option("--rounds", default=3, show_default=True, type=click.IntRange(1), help="Interleaved rounds.")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="JSON file for the report.")
def roofline(
    folder: Path, baseline: Path | None, size: int | None, threads: int, runs: int, rounds: int, out: Path | None
) -> None:
    """Where FOLDER's UNet step goes by operator type, against this machine's GEMM peaks; the floor that
    leaves for any recipe keeping the same operators."""
    from .roofline import roofline as measure

    report = {"machine": machine_info(), **measure(folder, baseline, size, threads, runs, rounds)}
    if out:
        out.write_text(json.dumps(report, indent=2) + "\n")
    peaks = ", ".join(f"{k} {v:.0f}" for k, v in report["peaks_gop_per_s"].items())
    click.echo(f"peaks (GOP/s): {peaks}")
    for row in report["ops"][:12]:
        rate = f"{row['gop_per_s']:6.0f} GOP/s" if row["gop_per_s"] else " " * 11
        click.echo(f"{row['op']:22s} {row['seconds']:6.3f} s  {rate}  floor {row['floor_s']:.3f} s")
    click.echo(f"step {report['step_wall_s']:.3f} s, floor {report['floor_s']:.3f} s")
    if "ratio" in report:
        click.echo(f"ratio to baseline {report['ratio']:.3f}x, floor {report['floor_ratio']:.3f}x")


@main.command()
@click.argument("fp32", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.argument("int8", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--size", default=None, type=int, help="Image side in pixels [default: the model's own].")
@click.option("--steps", default=20, show_default=True, type=click.IntRange(1))
@click.option("--out", type=click.Path(path_type=Path), default=Path("benchmarks/results/int8_fidelity.json"))
def fidelity(fp32: Path, int8: Path, size: int | None, steps: int, out: Path) -> None:
    """PSNR of int8 against fp32 images for the same prompts and seeds."""
    from .int8_fidelity import measure

    write_json(out, measure(fp32, int8, size, steps))


@main.command("load-memory")
@click.argument("model", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--size", default=512, show_default=True, type=int)
@click.option("--steps", default=2, show_default=True, type=click.IntRange(1))
@click.option("--out", type=click.Path(path_type=Path), default=Path("benchmarks/results/runtime_load_memory.json"))
def load_memory(model: Path, size: int, steps: int, out: Path) -> None:
    """Load time and peak RSS: cold, cached and low-memory loads, each in a fresh process."""
    from .runtime_load_memory import measure

    write_json(out, measure(model, size, steps))


@main.command()
@click.argument("model", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.argument("lora", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--scale", default=1.0, show_default=True, type=float)
@click.option("--size", default=512, show_default=True, type=int)
@click.option("--threads", default=2, show_default=True, type=int)
@click.option("--rounds", default=4, show_default=True, type=click.IntRange(1))
@click.option("--out", type=click.Path(path_type=Path), default=Path("benchmarks/results/lora_load.json"))
def lora(model: Path, lora: Path, scale: float, size: int, threads: int, rounds: int, out: Path) -> None:
    """What a LoRA applied at load time costs: building the weights, and the UNet step at the optimization
    level such sessions use, against the default, interleaved in one process."""
    from .lora_load import compare_lora_load

    report = {"machine": machine_info(), **compare_lora_load(model, lora, scale, size, threads, rounds)}
    write_json(out, report)
    for name, ratio in report["ratio_vs_all"].items():
        click.echo(f"unet step {name:9s} {report['unet_step_median_s'][name]:7.3f} s  {ratio:.3f}x")
    click.echo(f"overrides built in {report['build_overrides_s']:.2f} s ({report['overridden_mb']} MB)")


@main.command()
@click.argument("work", type=click.Path(path_type=Path, file_okay=False))
@click.argument("result", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--steps", default=20, show_default=True, type=click.IntRange(1))
@click.option("--size", default=512, show_default=True, type=int)
@click.option("--skip-sd15", is_flag=True, help="Only the tiny model's CUDA check.")
def gpu(work: Path, result: Path, steps: int, size: int, skip_sd15: bool) -> None:
    """fp16 export on onnxruntime CUDA against diffusers on CUDA (needs a GPU and onnxruntime-gpu)."""
    from .gpu import measure

    measure(work, result, steps, size, skip_sd15)


@main.group()
def peers() -> None:
    """Virtual environments of the engines compared against (their pins conflict with ours)."""


@peers.command("setup")
@click.option("--only", default=None, help="One peer (default: all of them).")
def peers_setup(only: str | None) -> None:
    """Create each peer's environment (pip, by package name) and print its Python."""
    from .peers import PEERS, PeerSetupError, setup_peer

    names = [only] if only else list(PEERS)
    for name in names:
        try:
            click.echo(f"{name}: {setup_peer(name, log=lambda line: click.echo(line, err=True))}")
        except PeerSetupError as exc:
            raise click.ClickException(str(exc)) from None


def write_json(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    click.echo(str(path))


if __name__ == "__main__":
    main()
