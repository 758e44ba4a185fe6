"""`sd-export quantize` and `convert --precision int8`: calibrate on real trajectories, quantize each
component by its recipe, measure fidelity against fp32, and record every decision in the manifest. Transformer
models (SD3, FLUX) take weight-only int8/int4 instead (quantize_weights_folder.py)."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import onnx

from sd_onnx.runtime.manifest import FLOAT_DECODER, TRANSFORMER_FAMILIES, Manifest, controlnet_component

from .atomic import publish, staging_folder
from .calibrate import CALIBRATION_PROMPTS, HELD_OUT_PROMPTS, record
from .controlnet import add_control_unet, calibration_feeds
from .deepcache import add_deepcache
from .errors import ExportError
from .optimize import unchunk_group_norms
from .quantize import RECIPES, component_info, cpu_has_vnni, fidelity, quantize_graph
from .stages import refresh_stages
from .tome import add_token_merging

Log = Callable[[str], None]


def quantize_in_place(
    folder: Path,
    components: tuple[str, ...] | None = None,
    prompts: tuple[str, ...] = CALIBRATION_PROMPTS,
    steps: int = 10,
    size: int | None = None,
    reduce_range: bool | None = None,
    log: Log = print,
) -> Manifest:
    """Replace the fp32 graphs of `components` (default: every one with a recipe) in `folder` by int8 ones and
    update its manifest."""
    manifest = Manifest.load(folder)
    components = components or tuple(c for c in RECIPES if c in manifest.components)
    unknown = [c for c in components if c not in RECIPES]
    if unknown:
        raise ExportError(f"no int8 recipe for {', '.join(unknown)} (recipes exist for {', '.join(RECIPES)})")
    missing = [c for c in components if c not in manifest.components]
    if missing:
        raise ExportError(f"{folder}: has no {', '.join(missing)} to quantize")
    size = size or min(manifest.config.default_resolution, 256)
    reduce_range = not cpu_has_vnni() if reduce_range is None else reduce_range
    started = time.perf_counter()
    calibration = record(folder, prompts, steps, size)
    held_out = record(folder, HELD_OUT_PROMPTS, steps, size, seed=1000)
    log(f"calibration: {calibration.settings['samples']} inputs recorded in {time.perf_counter() - started:.1f} s")
    (folder / "quantization").mkdir(exist_ok=True)
    jobs = [(name, RECIPES[name], calibration.feeds[name], held_out.feeds[name]) for name in components]
    if "unet" in components:  # each ControlNet with the UNet it pairs with, on its recorded inputs
        for controlnet in manifest.config.controlnets:
            component = controlnet_component(controlnet)
            sets = [calibration_feeds(manifest, component, s.feeds["unet"], seed) for seed, s in
                    enumerate((calibration, held_out))]  # fmt: skip
            jobs.append((component, RECIPES["unet"], *sets))
    for i, (name, recipe, feeds, held_out_feeds) in enumerate(jobs, 1):
        started = time.perf_counter()
        if name == "vae_decoder":  # before its fp32 graph goes
            fp32_file = folder / manifest.components[name].file
            manifest = keep_float_decoder(folder, manifest, fp32_file, held_out_feeds, log)
        report = _quantize_component(folder, manifest, name, recipe, feeds, held_out_feeds, reduce_range)
        report["calibration"] = {**calibration.settings, "ranges_file": f"quantization/{name}_ranges.json"}
        manifest.components[name] = component_info(folder, name, manifest.components[name], "int8", report)
        v = manifest.components[name].validation
        log(
            f"[{i}/{len(jobs)}] {name}: int8, {report['quantized_nodes']} nodes quantized, "
            f"{report['float_nodes']} kept float, cosine vs fp32 {v['cosine_min']:.4f}, "
            f"{time.perf_counter() - started:.1f} s"
        )
    manifest.save(folder)
    if "unet" in components:  # the UNet's derived graphs, made again from the int8 UNet
        if manifest.config.deepcache_branch is not None:
            manifest = add_deepcache(folder, manifest, manifest.config.deepcache_branch, log)
        if manifest.config.token_merging:
            manifest = add_token_merging(folder, manifest, log)
        manifest = refresh_stages(folder, manifest, log)
        if manifest.config.controlnets:
            first, entry = next(iter(manifest.config.controlnets.items()))
            manifest = add_control_unet(folder, manifest, entry["residuals"], first, 0.0, None, log)
    return manifest


def _quantize_component(
    folder: Path, manifest: Manifest, name: str, recipe: Any, feeds: list, held_out: list, reduce_range: bool
) -> dict[str, Any]:
    """Quantize component `name`'s graph in place (its fp32 files moved aside, then removed) and measure it
    against them on the held-out feeds; the quantization report."""
    fp32_file = folder / manifest.components[name].file
    fp32_copy = folder / "quantization" / f"_{name}_fp32"
    shutil.move(fp32_file.parent, fp32_copy)
    fp32_file.parent.mkdir()
    if (fp32_copy / "config.json").is_file():
        shutil.copy2(fp32_copy / "config.json", fp32_file.parent / "config.json")
    ranges = folder / "quantization" / f"{name}_ranges.json"
    report = quantize_graph(fp32_copy / fp32_file.name, fp32_file, recipe, feeds, reduce_range, ranges)
    report["validation"] = fidelity(fp32_copy / fp32_file.name, fp32_file, held_out)
    shutil.rmtree(fp32_copy)
    return report


def keep_float_decoder(folder: Path, manifest: Manifest, fp32_file: Path, held_out: list, log: Log = print) -> Manifest:
    """Add `fp32_file`'s VAE decoder (the fp32 graph beside it, which int8 replaces) to `folder` as the component
    FLOAT_DECODER, its group norms whole again (optimize.unchunk_group_norms), checked against it on `held_out`.

    On OpenVINO the float decoder, run in bf16, beats the int8 one (docs/performance.md: on a Xeon with AMX, SD 1.5
    at 512x512, interleaved in one process, 1.84 s against 3.98 s for int8 on onnxruntime), so the runtime takes
    it where OpenVINO runs the decoder (vae.choose_decoder); elsewhere, and in low-memory mode, the int8 decoder
    stays."""
    out = folder / FLOAT_DECODER
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(fp32_file.parent, out)
    model = onnx.load(str(out / fp32_file.name), load_external_data=False)
    whole = unchunk_group_norms(model)
    onnx.save_model(model, str(out / fp32_file.name))
    validation = fidelity(fp32_file, out / fp32_file.name, held_out[:2])
    base = manifest.components["vae_decoder"]
    report = {"validation": {**validation, "reference": "the fp32 decoder with chunked group norms"}}
    info = component_info(folder, FLOAT_DECODER, base, "fp32", report)
    optimizations = {**base.optimizations, "group_norms_whole": whole}
    optimizations.pop("group_norms_chunked", None)
    manifest.components[FLOAT_DECODER] = replace(
        info, file=f"{FLOAT_DECODER}/{fp32_file.name}", quantization={}, optimizations=optimizations
    )
    log(f"{FLOAT_DECODER}: the fp32 decoder kept for OpenVINO, {whole} group norms whole, max |diff| "
        f"{validation['max_abs_diff']:.2e}")  # fmt: skip
    return manifest


def quantize_folder(
    source: Path,
    output: Path,
    *,
    overwrite: bool = False,
    precision: str = "int8",
    log: Log = print,
    **options: object,
) -> Manifest:
    """Quantize an existing fp32 export into a new folder, atomically: a UNet model's UNet and VAE to static int8
    (calibrated, `options` as quantize_in_place takes them), a transformer model's transformer and T5/LLM encoders
    weight-only to `precision` int8 or int4 (quantize_weights_folder.py; `components` is the one option it takes)."""
    source, output = Path(source).expanduser().resolve(), Path(output).expanduser().resolve()
    weight_only = Manifest.load(source).config.family in TRANSFORMER_FAMILIES
    if precision not in ("int8", "int4") or (precision == "int4" and not weight_only):
        raise ExportError(f"{precision}: UNet models quantize to int8; transformer models (SD3, FLUX) to int8 or int4")
    if output.exists() and not overwrite:
        raise ExportError(f"{output} already exists (use --overwrite to replace it)")
    with staging_folder(output) as staging:
        # A copy, not hard links: onnx refuses external weights with several links (a hard-link attack guard).
        shutil.copytree(source, staging, dirs_exist_ok=True)
        if weight_only:
            from .quantize_weights_folder import quantize_weights_in_place

            components = options.get("components")
            manifest = quantize_weights_in_place(staging, precision, components, log)  # type: ignore[arg-type]
        else:
            manifest = quantize_in_place(staging, log=log, **options)
        publish(staging, output)
    log(f"wrote {output}")
    return manifest
