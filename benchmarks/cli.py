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
from dataclasses import dataclass
from pathlib import Path

import click

from sd_onnx.runtime.manifest import Manifest
from sd_onnx.runtime.session import CACHE_ENV

from .machine import folder_mb, machine_info
from .report import write_report


@dataclass(frozen=True)
class Engine:
    """One row of the report: the runner in engines.py (`kind`), the peer environment it runs in (None: this
    one), the model folder or file it loads (a key of `prepare_models`) and runner options."""

    kind: str
    peer: str | None
    model: str
    options: tuple[tuple[str, object], ...] = ()


# Report order: ours, then the peers, stable-diffusion.cpp last (its steps are the slowest here).
ENGINES: dict[str, Engine] = {
    # sd-onnx rows run on what `--provider auto` picks on the machine; -ort-cpu and -openvino name the engine.
    "sd-onnx-int8": Engine("sd-onnx", None, "sd-onnx-int8"),
    "sd-onnx-int8-ort-cpu": Engine("sd-onnx", None, "sd-onnx-int8", (("provider", "cpu"),)),
    "sd-onnx-int8-openvino": Engine("sd-onnx", None, "sd-onnx-int8", (("provider", "openvino"),)),
    "sd-onnx-fp32": Engine("sd-onnx", None, "sd-onnx-fp32"),
    "sd-onnx-fp32-openvino": Engine("sd-onnx", None, "sd-onnx-fp32", (("provider", "openvino"),)),
    "sd-onnx-int8-low-memory": Engine("sd-onnx", None, "sd-onnx-int8", (("low_memory", True),)),
    "diffusers-pytorch": Engine("diffusers-pytorch", None, "source"),
    "optimum-ort": Engine("optimum-ort", "optimum", "optimum-ort"),
    "openvino-fp32": Engine("openvino", "openvino", "openvino-fp32"),
    "openvino-int8": Engine("openvino", "openvino", "openvino-int8"),
    "openvino-hybrid-int8": Engine("openvino", "openvino", "openvino-hybrid-int8"),
    "openvino-onnx-fp32": Engine("openvino-onnx", "openvino", "sd-onnx-fp32"),
    "openvino-onnx-int8": Engine("openvino-onnx", "openvino", "sd-onnx-int8"),
    "sdcpp-q8_0": Engine("sdcpp", "sdcpp", "sdcpp-q8_0"),
    "sdcpp-q4_0": Engine("sdcpp", "sdcpp", "sdcpp-q4_0"),
    "sdcpp-f16": Engine("sdcpp", "sdcpp", "sdcpp-f16"),
}
# Engines that can decode with a tiny autoencoder (TAESD) in place of the VAE.
TINY_VAE_KINDS = ("diffusers-pytorch", "sd-onnx", "sdcpp")
# stable-diffusion.cpp builds its networks from the known architectures' sizes: it cannot load a tiny model.
QUICK_ENGINES = tuple(name for name, engine in ENGINES.items() if engine.kind != "sdcpp")
PROMPT = "a photo of an astronaut riding a horse on mars"


def prepare_models(
    source: Path, work: Path, engines: tuple[str, ...], pythons: dict[str, str], tiny_vae: Path | None = None
) -> dict[str, Path]:
    """Each engine's model: the diffusers source, our exports (with `tiny_vae` beside the VAE when given), the
    peers' own exports (each made once, reused from `work`). A peer's export that fails is written to
    work/failed.json as its engines' result."""
    needed = {ENGINES[e].model for e in engines}
    folders = {"source": source}
    (work / "failed.json").unlink(missing_ok=True)  # failures are found again on every run
    log = lambda line: click.echo(f"  {line}", err=True)  # noqa: E731
    if needed & {"sd-onnx-fp32", "sd-onnx-int8"}:
        folders["sd-onnx-fp32"] = work / "sd-onnx-fp32"
        if not folders["sd-onnx-fp32"].is_dir():
            from sd_onnx.exporter.convert import convert

            started = time.perf_counter()
            # Transformer models (SANA, FLUX, ...) traced in bf16 as their checkpoints ship, to fit full size in
            # memory; full-size random weights give outputs in the tens, hence their looser validation bound.
            transformer = (source / "transformer").is_dir()
            options = {"trace_dtype": "bf16", "atol": 1e-2} if transformer else {}
            convert(str(source), folders["sd-onnx-fp32"], vae=str(tiny_vae) if tiny_vae else None, log=log, **options)
            _record_step(work, "export_fp32", started)
        if tiny_vae and "tiny_vae_decoder" not in Manifest.load(folders["sd-onnx-fp32"]).components:
            raise click.ClickException(f"{folders['sd-onnx-fp32']} has no tiny autoencoder: use another --work")
    if "sd-onnx-int8" in needed:
        folders["sd-onnx-int8"] = work / "sd-onnx-int8"
        if not folders["sd-onnx-int8"].is_dir():
            from sd_onnx.exporter.quantize_folder import quantize_folder

            started = time.perf_counter()
            quantize_folder(folders["sd-onnx-fp32"], folders["sd-onnx-int8"], log=log)
            _record_step(work, "quantize_int8", started)
    if any(name.startswith("sdcpp-") and not (work / f"{name}.gguf").is_file() for name in needed):
        folders["ldm-single-file"] = work / "ldm-single-file.safetensors"
        if not folders["ldm-single-file"].is_file():
            from sd_onnx.models.ldm_checkpoint import write_single_file

            started = time.perf_counter()
            partial = work / "ldm-single-file.partial.safetensors"
            write_single_file(source, partial)
            partial.rename(folders["ldm-single-file"])
            _record_step(work, "write_ldm_single_file", started)
    # A fresh optimized-graph cache for this run (child processes inherit it), so the first load is a real one.
    shutil.rmtree(work / "ort-cache", ignore_errors=True)
    os.environ[CACHE_ENV] = str(work / "ort-cache")
    for name in sorted(needed & set(PEER_EXPORTS)):
        suffix = PEER_EXPORTS[name]
        folders[name] = work / f"{name}{suffix}"
        if not folders[name].exists():
            partial = work / f"{name}.partial{suffix}"  # renamed when complete: an interrupted one is not reused
            _remove(partial)
            users = [e for e in engines if ENGINES[e].model == name]
            if _export_peer(name, _peer_export_command(name, folders, partial, pythons), work, users):
                partial.rename(folders[name])
            _remove(partial)
    return folders


# Each peer's own model (its export of the same weights) and the suffix of its file, "" for a folder.
PEER_EXPORTS = {
    "optimum-ort": "",
    "openvino-fp32": "",
    "openvino-int8": "",
    "openvino-hybrid-int8": "",
    "sdcpp-f16": ".gguf",
    "sdcpp-q8_0": ".gguf",
    "sdcpp-q4_0": ".gguf",
}


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _peer_export_command(name: str, folders: dict[str, Path], out: Path, pythons: dict[str, str]) -> list[str]:
    """The command that makes peer export `name` (into `out`) in the peer's own environment."""
    source = str(folders["source"])
    peer, mode = name.split("-", 1)
    script = [pythons[peer], "-m", "sd_onnx.benchmarks.peer_exports", peer, mode]
    if peer == "sdcpp":
        return [*script, str(folders["ldm-single-file"]), str(out)]
    from sd_onnx.exporter.calibrate import CALIBRATION_PROMPTS

    return [*script, source, str(out), *(CALIBRATION_PROMPTS if mode == "hybrid-int8" else ())]


def _export_peer(name: str, cmd: list[str], work: Path, engines: list[str]) -> bool:
    """A peer's own export (in its environment), timed, with the peak RSS it prints last (JSON). A failure
    (out of memory above all) is written to work/failed.json for each engine that loads the export."""
    env = {**os.environ, "PYTHONPATH": str(_engine_modules(work))}
    started = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    step: dict = {"seconds": round(time.perf_counter() - started, 1)}
    last = (result.stdout.strip().splitlines() or [""])[-1]
    if last.startswith("{"):
        step["process_peak_rss_mb"] = json.loads(last)["peak_rss_mb"]
    if result.returncode == 0:
        _record(work, "steps.json", f"export_{name}", step)
        return True
    killed = result.returncode in (-9, 137)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    reason = "killed by the system (out of memory)" if killed else (lines[-1] if lines else f"exit {result.returncode}")
    for engine in engines:
        _record(work, "failed.json", engine, {**step, "error": f"{name} export failed: {reason}"})
    return False


# Options whose values are this machine's paths: reports show placeholders, so they read the same anywhere.
PATH_OPTIONS = {"--work": "<work>", "--out": "<out>", "--model": "<model>", "--tiny-vae": "<tiny-vae>"}
PATH_OPTIONS.update({f"--{peer}-python": "<python>" for peer in ("optimum", "openvino", "sdcpp")})


def invocation(ctx: click.Context) -> str:
    """The command as given (options that differ from their defaults), with placeholders for path values."""
    parts = ["sd-bench", ctx.info_name or "run"]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if not isinstance(param, click.Option) or value is None or value is False or value == param.default:
            continue
        flag = max(param.opts, key=len)
        placeholder = PATH_OPTIONS.get(flag) if value != "random" else None  # --tiny-vae random is no path
        parts += [flag] if param.is_flag else [flag, placeholder or shlex.quote(str(value))]
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
    cmd = [python, "-m", "sd_onnx.benchmarks.engines", engine]
    env = dict(os.environ)
    if python != sys.executable:  # a peer's environment has no sd-onnx: lend it the engine modules alone
        env["PYTHONPATH"] = str(_engine_modules(work))
    spec = {**spec, "spawned_at": time.time()}  # the cold first-image latency counts from here
    result = subprocess.run([*cmd, json.dumps(spec)], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        tail = result.stderr.strip().splitlines()[-1:] or ["no output"]
        killed = result.returncode in (-9, 137)
        return {"error": "killed by the system (out of memory)" if killed else tail[0]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def _engine_modules(work: Path) -> Path:
    """A folder holding `sd_onnx.benchmarks.engines` and what it imports (the standard library and NumPy
    only), and the peers' export script, for peers' environments."""
    root = work / "_engine_modules"
    package = root / "sd_onnx" / "benchmarks"
    package.mkdir(parents=True, exist_ok=True)
    (root / "sd_onnx" / "__init__.py").touch()
    for name in ("__init__.py", "engines.py", "machine.py", "peer_exports.py"):
        shutil.copy2(Path(__file__).with_name(name), package / name)
    return root


def peer_pythons(given: dict[str, str | None]) -> dict[str, str]:
    """Each peer's Python: the one given on the command line, else its `sd-bench peers setup` environment
    if that is ready; peers with neither are left out (their engines are skipped)."""
    from .peers import PEERS, is_ready, peer_python

    found = {}
    for name in PEERS:
        if given.get(name):
            found[name] = str(given[name])
        elif is_ready(name):
            found[name] = str(peer_python(name))
    return found


def benchmark(
    source: Path,
    work: Path,
    engines: tuple[str, ...],
    settings: dict,
    pythons: dict[str, str],
    model_label: str,
    command: str,
    low_memory: bool = False,
    tiny_vae: Path | None = None,
) -> dict:
    """Run `engines` on `source` with `settings` (steps, size, guidance, threads), each in its own process,
    decoding with `tiny_vae` (a diffusers AutoencoderTiny folder) where given. Engines whose peer environment
    is missing, or that cannot take a tiny autoencoder, are skipped with a line saying why."""
    from .peers import setup_record

    skipped = {}
    for name in engines:
        peer = ENGINES[name].peer
        if peer and peer not in pythons:
            skipped[name] = f"no {peer} environment: sd-bench peers setup --only {peer}"
        elif tiny_vae and ENGINES[name].kind not in TINY_VAE_KINDS:
            skipped[name] = "no tiny-autoencoder option in this engine"
    for name, reason in skipped.items():
        click.echo(f"{name}: skipped ({reason})", err=True)
    engines = tuple(e for e in engines if e not in skipped)
    folders = prepare_models(source, work, engines, pythons, tiny_vae)
    settings = {**settings, "prompt": PROMPT, "vae": "tiny autoencoder" if tiny_vae else "the model's VAE"}
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "command": command,
        "machine": machine_info(),
        "settings": {**settings, "model_label": model_label, "scheduler": "the model's default"},
        "engines": {},
        "skipped": skipped,
    }
    if (work / "steps.json").is_file():
        report["preparation"] = json.loads((work / "steps.json").read_text())
    for i, name in enumerate(engines, 1):
        engine = ENGINES[name]
        click.echo(f"[{i}/{len(engines)}] {name}: running", err=True)
        spec = {**settings, "kind": engine.kind, "model": str(folders[engine.model]), "vae_repeats": 2}
        spec["low_memory"] = low_memory and engine.kind == "sd-onnx"
        spec.update(engine.options)
        if tiny_vae:
            spec["tiny_vae"] = str(tiny_vae)
        failed = json.loads((work / "failed.json").read_text()) if (work / "failed.json").is_file() else {}
        warm_up = None
        if engine.kind == "sd-onnx" and name not in failed:
            # One image first, as a user's first, into caches of this row's own (onnxruntime's optimized graphs,
            # OpenVINO's compiled ones) that every later image on the machine loads; its cold time is kept.
            shutil.rmtree(work / "ort-cache" / name, ignore_errors=True)
            os.environ[CACHE_ENV] = str(work / "ort-cache" / name)
            warm_up = run_engine(name, {**spec, "steps": 1, "vae_repeats": 1}, sys.executable, work)
        record = failed.get(name) or run_engine(name, spec, pythons.get(engine.peer, sys.executable), work)
        if warm_up and "error" not in warm_up:
            record["first_image_empty_caches_s"] = warm_up["cold_first_image_s"]
        report["engines"][name] = record
        if "error" in record:
            click.echo(f"[{i}/{len(engines)}] {name}: failed: {record['error']}", err=True)
            continue
        record["model_mb"] = folder_mb(folders[engine.model])
        if engine.peer:
            record["setup_s"] = setup_record(engine.peer).get("seconds")
        e2e = f"{record['end_to_end_s']:.1f} s" if record.get("end_to_end_s") else "-"
        click.echo(
            f"[{i}/{len(engines)}] {name}: UNet step {record['unet_step_median_s']:.2f} s, "
            f"end to end {e2e}, peak RSS {record['peak_rss_mb']:.0f} MB",
            err=True,
        )
    return report


@click.group(invoke_without_command=True)
@click.option(
    "--quick", is_flag=True, help="Smoke run on a tiny model: sd-onnx, diffusers and the peers that are set up."
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Where --quick writes JSON [default: ./sd-bench-quick.json].",
)
@click.pass_context
def main(ctx: click.Context, quick: bool, json_path: Path | None) -> None:
    """Benchmark sd-onnx against diffusers (PyTorch), Optimum (onnxruntime), OpenVINO (optimum-intel) and
    stable-diffusion.cpp, each in its own process and, for peers, its own environment."""
    if ctx.invoked_subcommand is not None:
        return
    if not quick:
        click.echo(ctx.get_help())
        return
    from sd_onnx.models.build import build_tiny_pipeline

    with tempfile.TemporaryDirectory() as tmp:
        source = build_tiny_pipeline(Path(tmp) / "tiny-sd")
        settings = {"steps": 4, "size": 32, "guidance": 7.5, "threads": 2}
        pythons = peer_pythons({})
        report = benchmark(
            source, Path(tmp), QUICK_ENGINES, settings, pythons, "tiny (seeded random)", "sd-bench --quick"
        )
    path = json_path or Path("sd-bench-quick.json")
    path.write_text(json.dumps(report, indent=2) + "\n")
    click.echo(str(path))


RANDOM_ARCHITECTURES = {
    "sd15": "SD 1.5",
    "sd21": "SD 2.1-base",
    "sdxl": "SDXL base 1.0",
    # transformer families, built one component at a time in bf16 (models/build_fullsize.py)
    "sana-sprint-0.6b": "SANA-Sprint 0.6B 1024px",
    "flux2-klein-4b": "FLUX.2 [klein] 4B",
}


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
@click.option(
    "--tiny-vae",
    default=None,
    help="Decode with this diffusers AutoencoderTiny folder, or 'random' for TAESD's architecture with random "
    "weights; engines without a tiny-autoencoder option are skipped.",
)
@click.option("--name", default="benchmark", show_default=True, help="Report file names: NAME.json, NAME.md.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("benchmarks/results"), show_default=True)
@click.option("--work", type=click.Path(path_type=Path), default=Path("out/bench"), show_default=True)
@click.option("--optimum-python", default=None, help="Python with optimum-onnx [default: its peers setup env].")
@click.option("--openvino-python", default=None, help="Python with optimum-intel [default: its peers setup env].")
@click.option("--sdcpp-python", default=None, help="Python with stable-diffusion-cpp-python [default: peers env].")
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
    tiny_vae: str | None,
    name: str,
    out: Path,
    work: Path,
    optimum_python: str | None,
    openvino_python: str | None,
    sdcpp_python: str | None,
) -> None:
    """Full benchmark: JSON, Markdown with ratios, and plots into --out. Peers run in the environments
    `sd-bench peers setup` makes unless their Python is given; engines with neither are skipped."""
    chosen = tuple(e.strip() for e in engines.split(",") if e.strip())
    unknown = set(chosen) - set(ENGINES)
    if unknown:
        raise click.ClickException(f"unknown engine(s) {', '.join(sorted(unknown))} (known: {', '.join(ENGINES)})")
    architecture = "sd15" if sd15_random else architecture
    if (model is None) == (architecture is None):
        raise click.ClickException("give exactly one of --model PATH or --random ARCHITECTURE")
    if tiny_vae and tiny_vae != "random" and not (Path(tiny_vae) / "config.json").is_file():
        raise click.ClickException(f"--tiny-vae {tiny_vae}: not a diffusers AutoencoderTiny folder (no config.json)")
    work.mkdir(parents=True, exist_ok=True)
    if architecture:
        from sd_onnx.models.build import RECIPES, build_pipeline

        model = work / f"{architecture}-random"
        if not (model / "model_index.json").is_file():
            from sd_onnx.models.build_fullsize import MODELS, build_fullsize

            started = time.perf_counter()
            shutil.rmtree(model, ignore_errors=True)
            if architecture in MODELS:
                build_fullsize(architecture, model)
            else:
                build_pipeline(RECIPES[architecture], model)
            _record_step(work, "build", started)
    label = f"{RANDOM_ARCHITECTURES[architecture]} architecture, seeded random weights" if architecture else str(model)
    tiny = _tiny_autoencoder(tiny_vae, work) if tiny_vae else None
    command = invocation(click.get_current_context())
    pythons = peer_pythons({"optimum": optimum_python, "openvino": openvino_python, "sdcpp": sdcpp_python})
    settings = {"steps": steps, "size": size, "guidance": guidance, "threads": threads}
    report = benchmark(model, work, chosen, settings, pythons, label, command, low_memory, tiny)
    for path in write_report(report, out, name=name):
        click.echo(str(path))


@main.command()
@click.argument("report_json", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option(
    "--notes",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    default=None,
    help="Markdown kept in the JSON and shown under the tables: why a peer wins a column, what would beat it.",
)
def report(report_json: Path, notes: Path | None) -> None:
    """Write REPORT_JSON's Markdown and plots again beside it (after adding --notes)."""
    try:
        data = json.loads(report_json.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise click.ClickException(f"{report_json}: not JSON ({exc})") from None
    missing = [
        k for k in ("engines", "settings", "machine", "date", "command") if not isinstance(data, dict) or k not in data
    ]
    if missing:
        raise click.ClickException(f"{report_json}: not an sd-bench report (no {', '.join(missing)})")
    if notes:
        data["notes"] = notes.read_text()
    for path in write_report(data, report_json.parent, name=report_json.stem):
        click.echo(str(path))


def _tiny_autoencoder(option: str, work: Path) -> Path:
    """The --tiny-vae folder: as given, or TAESD's architecture with random weights built into `work`."""
    if option != "random":  # checked in `run` before anything is written
        return Path(option)
    folder = work / "taesd-random"
    if not folder.is_dir():
        from sd_onnx.models.build import build_tiny_autoencoder

        build_tiny_autoencoder(folder)
    return folder


@main.command()
@click.argument("folders", nargs=-1, required=True)
@click.option("--size", default=512, show_default=True, type=int)
@click.option("--threads", default=2, show_default=True, type=int)
@click.option("--rounds", default=4, show_default=True, type=click.IntRange(1))
@click.option("--out", type=click.Path(path_type=Path), default=None, help="JSON file for the report.")
def components(folders: tuple[str, ...], size: int, threads: int, rounds: int, out: Path | None) -> None:
    """UNet step and VAE decode of NAME=FOLDER[@PROVIDER] model folders (sd-onnx or Optimum exports), interleaved
    in one process; ratios against the first. PROVIDER is the engine, as `sd-run --provider` takes it (cpu,
    openvino, openvino:f32, openvino:bf16; default cpu), so one folder can be timed on several."""
    from sd_onnx.runtime.session import resolve_providers

    from .components import compare_components

    named, providers = {}, {}
    for item in folders:
        name, sep, path = item.partition("=")
        path, _, provider = path.rpartition("@") if "@" in path else (path, "", "cpu")
        if not sep or not Path(path).is_dir():
            raise click.ClickException(f"expected NAME=FOLDER[@PROVIDER] with an existing folder, got {item!r}")
        try:
            resolve_providers(provider)
        except ValueError as exc:
            raise click.ClickException(f"{item}: {exc}") from None
        named[name], providers[name] = Path(path), provider
    report = {"machine": machine_info(), "engines": providers}
    report |= compare_components(named, size, threads, rounds, providers=providers)
    text = json.dumps(report, indent=2) + "\n"
    if out:
        out.write_text(text)
    for component in ("unet", "vae_decoder"):
        for name, ratio in report.get(component, {}).get("ratio", {}).items():
            median = report[component]["median_s"][name]
            click.echo(f"{component:12s} {name:20s} {median:7.3f} s  {ratio:.3f}x")


@main.command("engine-fidelity")
@click.argument("fp32", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.argument("int8", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--size", default=256, show_default=True, type=int, help="Image side of the recorded trajectories.")
@click.option("--steps", default=10, show_default=True, type=click.IntRange(1))
@click.option("--out", type=click.Path(path_type=Path), default=None, help="JSON file for the report.")
def engine_fidelity(fp32: Path, int8: Path, size: int, steps: int, out: Path | None) -> None:
    """UNet output of INT8 and FP32 on each engine (onnxruntime, OpenVINO and its precisions) against FP32 on
    onnxruntime, on held-out trajectory inputs: cosine and mean abs difference."""
    from .engine_fidelity import unet_fidelity

    report = {"machine": machine_info(), **unet_fidelity(fp32, int8, size, steps)}
    if out:
        out.write_text(json.dumps(report, indent=2) + "\n")
    for name, row in report["rows"].items():
        click.echo(f"{name:22s} cosine min {row['cosine_min']:.5f} mean {row['cosine_mean']:.5f}  "
                   f"mean abs {row['mean_abs_diff']:.5f}")  # fmt: skip


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
@click.option("--only", default=None, help="One peer: optimum, openvino or sdcpp (default: all of them).")
def peers_setup(only: str | None) -> None:
    """Create each peer's environment (pip, by package name) and print its Python."""
    from .peers import PEERS, PeerSetupError, setup_peer

    names = [only] if only else list(PEERS)
    for name in names:
        try:
            click.echo(f"{name}: {setup_peer(name, log=lambda line: click.echo(line, err=True))}")
        except PeerSetupError as exc:
            raise click.ClickException(str(exc)) from None


@main.command()
@click.option(
    "-m",
    "--model",
    type=click.Path(path_type=Path, exists=True, file_okay=False),
    default=None,
    help="Large model for the speed ratios (SD 1.5 int8 exported with --deepcache-branch 0); none: fidelity only.",
)
@click.option("--prompts", default=200, show_default=True, type=click.IntRange(1), help="Shapes prompts per split.")
@click.option("--size", default=512, show_default=True, type=int)
@click.option("--steps", default=20, show_default=True, type=click.IntRange(1))
@click.option("--rounds", default=2, show_default=True, type=click.IntRange(1))
@click.option("--skip-shapes", is_flag=True, help="Speed only.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("benchmarks/results/accelerators.json"))
def accelerators(
    model: Path | None, prompts: int, size: int, steps: int, rounds: int, skip_shapes: bool, out: Path
) -> None:
    """Speed of each accelerator setting on MODEL (interleaved, one process) and its judged fidelity on the
    shapes model; writes OUT and OUT with .md (the README's table)."""
    from .accelerators import markdown, shapes_fidelity, speed

    report: dict = {"machine": machine_info()}
    if model is not None:
        report["speed"] = speed(model, size, steps, rounds, log=lambda line: click.echo(line, err=True))
    if not skip_shapes:
        report["shapes"] = shapes_fidelity(prompts, log=lambda line: click.echo(line, err=True))
    write_json(out, report)
    out.with_suffix(".md").write_text(markdown(report))
    click.echo(markdown(report))


@main.command()
@click.argument("model", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--only", multiple=True, help="Run only this one (repeatable); names as in the report.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("benchmarks/results/peak_memory.json"))
def memory(model: Path, only: tuple[str, ...], out: Path) -> None:
    """Peak RSS of generations in the default, low-memory and tiled-VAE modes at 512 and 1024 pixels, and of a
    2048-pixel tiled decode, each in a fresh process."""
    from .peak_memory import measure

    write_json(out, {"machine": machine_info(), **measure(model, only, log=lambda line: click.echo(line, err=True))})


@main.command("serve-ray")
@click.option("-m", "--model", type=click.Path(path_type=Path, exists=True, file_okay=False), default=None,
              help="Exported model folder [default: the shipped shapes model].")  # fmt: skip
@click.option("--steps", default=20, show_default=True, type=click.IntRange(1))
@click.option("--requests", default=24, show_default=True, type=click.IntRange(4), help="Per server and phase.")
@click.option("--clients", default=4, show_default=True, type=click.IntRange(1), help="Concurrent clients.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("benchmarks/results/ray_serve.json"))
def serve_ray(model: Path | None, steps: int, requests: int, clients: int, out: Path) -> None:
    """Ray Serve against the single-process server: per-request latency overhead (p50/p95, same requests,
    alternating) and images/min of 1 vs 2 replicas of 1 CPU each; writes OUT and OUT with .md. Needs [ray]."""
    from .serving import markdown, measure

    report = measure(model, steps, requests, clients)
    write_json(out, report)
    out.with_suffix(".md").write_text(markdown(report))
    click.echo(markdown(report))


def write_json(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    click.echo(str(path))


if __name__ == "__main__":
    main()
