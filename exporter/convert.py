"""`convert`: diffusers pipeline -> validated ONNX model folder, built atomically.

Passes per component, one component in memory at a time: load -> reference run -> trace -> free torch
-> validate with onnxruntime -> hash. The folder is assembled under a temporary name beside OUTPUT and
renamed only once complete, so an interrupted export never leaves a half folder at OUTPUT.
"""

from __future__ import annotations

import gc
import json
import shutil
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import torch

from sd_onnx.runtime.manifest import (
    COMPONENTS,
    TINY_VAE_COMPONENTS,
    TRANSFORMER_FAMILIES,
    ComponentInfo,
    Manifest,
    read_json,
    sha256_file,
)

from .atomic import publish, staging_folder
from .blockwise import trace_by_blocks
from .components import ComponentSpec, Inputs, component_spec
from .controlnet import ControlNetSource, export_controlnets, torch_unet_reference
from .deepcache import add_deepcache, check_branch
from .errors import ExportError
from .half import convert_to_fp16, fp16_atol
from .lean import TRACE_DTYPES, float32_compute, load_in, widen_graph
from .lora_targets import map_weights, weight_candidates, write_targets
from .optimize import optimize_file
from .package import copy_component_configs, copy_scheduler, copy_tokenizer, write_model_index
from .quantize import RECIPES
from .skip_layers import add_skip_layers, check_layers, torch_reference
from .source import PipelineSource, inspect_folder, resolve_source
from .stages import add_stages
from .tome import add_token_merging
from .trace import fix_static_dims, pack_graph, trace_component
from .validate import compare_outputs, open_session, signature

DEFAULT_OPSET = 17
DEFAULT_ATOL = 1e-3
PRECISIONS = ("fp32", "fp16", "int8", "int4")
TRACE_SEED, VALIDATION_SEED = 0, 1
LORA_COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "transformer")  # what LoRAs change
TOKENIZERS = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2", "text_encoder_3": "tokenizer_3"}
Log = Callable[[str], None]


def convert(
    source: str | Path,
    output: Path,
    *,
    components: tuple[str, ...] | None = None,
    opset: int = DEFAULT_OPSET,
    atol: float = DEFAULT_ATOL,
    overwrite: bool = False,
    config: str | None = None,
    precision: str = "fp32",
    optimize: bool = True,
    guidance_scale: float | None = None,
    default_steps: int | None = None,
    name: str | None = None,
    vocabulary: list[str] | None = None,
    vae: str | None = None,
    loras: list[tuple[Path, float]] | None = None,
    scheduler: str | None = None,
    deepcache_branch: int | None = None,
    tome: bool = False,
    unet_stages: bool = False,
    trace_dtype: str = "fp32",
    blockwise: bool | None = None,
    skip_layers: tuple[int, ...] | None = None,
    controlnets: list[ControlNetSource] | None = None,
    log: Log = print,
) -> Manifest:
    """Export `source` to an ONNX model folder at `output` and return its manifest.

    precision "fp16" converts every graph to half precision for GPU providers (see half.py); "int8" quantizes
    the UNet and VAE after export (see quantize.py for the recipes), or for transformer models (SD3, FLUX) the
    weights of the transformer and T5/LLM text encoders, as "int4" does (see quantize_weights.py); `optimize`
    fuses attention into onnxruntime's MultiHeadAttention and splits GEGLU projections (see optimize.py)
    before the graphs are validated;
    `guidance_scale` and `default_steps` record the guidance and steps the model was made for (the runtime's
    defaults; Turbo models: 0 and 1, LCM: 8.5 and 4, which LCM pipelines get by themselves); `name` and
    `vocabulary` (the words the text encoder knows) go into the manifest as they are; `vae`, a diffusers
    AutoencoderTiny folder (TAESD), is exported beside the model's VAE as tiny_vae_decoder/tiny_vae_encoder;
    `loras` ((file, scale) pairs) are fused into the weights first (see lora.py); `scheduler` becomes the
    model's default sampler (LCM-LoRA models: "lcm"); `deepcache_branch` adds DeepCache's full and shallow UNet
    graphs, caching at that branch (see deepcache.py); `tome` the UNet graph that merges tokens before
    self-attention, its ratio an input (see tome.py); `unet_stages` the UNet cut into the stage graphs that
    low-memory mode runs one at a time (see stages.py). All are cut or grown from the final UNet graph, so they
    follow its precision and share its weights. `trace_dtype` "bf16" (or "fp16") loads and traces each module in
    that dtype, half the memory of fp32, for full-size models; the graphs are fp32 all the same (see lean.py).
    `blockwise` traces a transformer one block at a time (see blockwise.py); None: when `trace_dtype` is narrow.
    `skip_layers` (SD3) adds the transformer graph with those blocks skipped, for skip-layer guidance (see
    skip_layers.py), checked against PyTorch's skip_layers forward. `controlnets` are exported beside the UNet
    (UNet models), with the UNet graph that takes their residuals (see controlnet.py)."""
    _quiet_libraries()
    output = Path(output).expanduser().resolve()
    if output.exists() and not overwrite:
        raise ExportError(f"{output} already exists (use --overwrite to replace it)")
    if precision not in PRECISIONS:
        raise ExportError(f"unknown precision {precision!r} (known: {', '.join(PRECISIONS)})")
    if trace_dtype not in TRACE_DTYPES:
        raise ExportError(f"unknown trace dtype {trace_dtype!r} (known: {', '.join(TRACE_DTYPES)})")
    exportable = COMPONENTS + TINY_VAE_COMPONENTS
    unknown = set(components or ()) - set(exportable)
    if unknown:
        raise ExportError(f"unknown component(s) {', '.join(sorted(unknown))} (known: {', '.join(exportable)})")
    with staging_folder(output) as staging:
        src = resolve_source(str(source), config=config, work_dir=staging)
        lora_records = None
        if loras:
            from .lora import fuse_loras

            log(f"fusing {len(loras)} LoRA(s) into {src.name}")
            lora_records = fuse_loras(src.folder, loras, staging / "_lora_fused")
            src = inspect_folder(staging / "_lora_fused", name=src.name)
        if scheduler is not None:
            src.scheduler = _scheduler_class(scheduler)
        if vae is not None:
            src.add_tiny_vae(vae)
        components = components or src.components
        if "tiny_vae_decoder" not in components:  # the manifest offers a tiny VAE only when it has its decoder
            src.config.tiny_vae_scaling_factor = src.config.tiny_vae_shift_factor = None
        absent = set(components) - set(src.components)
        if absent:
            raise ExportError(f"{src.name} has no {', '.join(sorted(absent))} (it has {', '.join(src.components)})")
        unet_only = {
            "--deepcache-branch": deepcache_branch is not None,
            "--tome": tome,
            "--unet-stages": unet_stages,
        }
        weight_only = src.config.family in TRANSFORMER_FAMILIES  # int8/int4 without calibration (transformers)
        if weight_only and any(unet_only.values()):
            given = ", ".join(option for option, used in unet_only.items() if used)
            raise ExportError(f"{given}: for UNet models; {src.name} is {src.config.family} (a transformer)")
        if skip_layers:
            check_layers(src.config.family, src.folder, skip_layers)
        if controlnets and (weight_only or precision == "fp16"):
            raise ExportError(f"--controlnet: for UNet models in fp32 or int8; {src.name} is {src.config.family}, "
                              f"{precision}")  # fmt: skip
        if blockwise and not weight_only:
            raise ExportError(f"--blockwise: for transformer models (SD3, FLUX, SANA, Z-Image); {src.name} has a UNet")
        if blockwise is None:  # full-size transformers: traced narrow, and one block at a time
            blockwise = weight_only and trace_dtype != "fp32" and precision != "fp16"
        if precision == "int4" and not weight_only:
            raise ExportError(f"--precision int4: for transformer models (SD3, FLUX); {src.name} has a UNet")
        if deepcache_branch is not None:
            check_branch(read_json(src.folder / "unet" / "config.json"), deepcache_branch)
        if guidance_scale is not None:
            src.config.guidance_scale = guidance_scale
        if default_steps is not None:
            src.config.default_steps = default_steps
        log(f"exporting {src.name} ({src.pipeline_class}, family {src.model_family}) to {output}")
        infos = {}
        for i, component in enumerate(components, 1):
            started = time.perf_counter()
            infos[component] = export_component(
                src,
                component,
                staging,
                opset,
                atol,
                optimize,
                half=precision == "fp16" and _halves(src, component),
                trace_dtype=trace_dtype,
                blockwise=component == "transformer" and blockwise,
            )
            size_mb = sum((staging / f).stat().st_size for f in infos[component].files) / 1e6
            max_diff = infos[component].validation["max_abs_diff"]
            elapsed = time.perf_counter() - started
            blocks = infos[component].validation.get("blocks")
            by_blocks = f", block by block ({blocks['count']} blocks)" if blocks else ""
            log(
                f"[{i}/{len(components)}] {component}: {size_mb:.1f} MB, "
                f"max |onnx - torch| {max_diff:.2e}, {elapsed:.1f} s{by_blocks}"
            )
        manifest = _package(src, staging, infos, name, vocabulary, lora_records)
        for scratch in ("_single_file_pipeline", "_lora_fused"):
            shutil.rmtree(staging / scratch, ignore_errors=True)
        if controlnets:  # before int8: checked against PyTorch's UNet on the fp32 graph, derived again after
            reference = torch_unet_reference(src.folder, src.config.sdxl)
            manifest = export_controlnets(controlnets, staging, manifest, opset, atol, reference, log)
        # Before int8, which derives both again from the int8 UNet.
        if deepcache_branch is not None:
            manifest = add_deepcache(staging, manifest, deepcache_branch, log)
        if tome:
            manifest = add_token_merging(staging, manifest, log)
        if precision in ("int8", "int4") and weight_only:
            from .quantize_weights_folder import quantize_weights_in_place

            manifest = quantize_weights_in_place(staging, precision, log=log)
        elif precision == "int8":
            from .quantize_folder import quantize_in_place

            quantizable = tuple(c for c in components if c in RECIPES)
            manifest = quantize_in_place(staging, components=quantizable, log=log)
        if unet_stages:  # after int8, whose UNet they cut
            manifest = add_stages(staging, manifest, log)
        if skip_layers:  # after int8 too: derived from the transformer graph as shipped
            reference = torch_reference(src.folder, skip_layers, trace_dtype)
            manifest = add_skip_layers(staging, manifest, skip_layers, reference, log)
        publish(staging, output)
    log(f"wrote {output}")
    return manifest


def export_component(
    src: PipelineSource,
    name: str,
    folder: Path,
    opset: int,
    atol: float,
    optimize: bool = True,
    half: bool = False,
    trace_dtype: str = "fp32",
    blockwise: bool = False,
) -> ComponentInfo:
    """Trace one component, optimize it (and make it fp16 if `half`), validate it against PyTorch and describe
    it for the manifest. `trace_dtype` "bf16"/"fp16" loads and traces the module in that dtype, for half the
    memory, and still writes and validates the fp32 graph (see lean.py); `blockwise` traces it one block at a
    time (see blockwise.py)."""
    spec = component_spec(name, src)
    dtype = TRACE_DTYPES[trace_dtype]

    def load() -> torch.nn.Module:
        with load_in(dtype):
            return _load(spec.load, src.folder, name).eval()  # in `dtype` if its loader reads lean.load_dtype()

    trace_inputs = spec.sample_inputs(src, 1, torch.Generator().manual_seed(TRACE_SEED))
    check_inputs = spec.sample_inputs(src, 2, torch.Generator().manual_seed(VALIDATION_SEED))
    return export_module(load, spec, trace_inputs, check_inputs, folder, opset, atol, optimize, half,
                         lora=name in LORA_COMPONENTS, blockwise=blockwise)  # fmt: skip


def export_module(
    load: Callable[[], torch.nn.Module],
    spec: ComponentSpec,
    trace_inputs: Inputs,
    check_inputs: Inputs,
    folder: Path,
    opset: int,
    atol: float,
    optimize: bool = True,
    half: bool = False,
    lora: bool = False,
    blockwise: bool = False,
) -> ComponentInfo:
    """export_component's work on the module `load` returns (fp32, or bf16/fp16 for the memory-lean path):
    reference run in fp32, trace, the module freed (this function holds its only reference), then the graph
    written, optimized and validated."""
    name = spec.name
    out_file = folder / name / "model.onnx"
    out_file.parent.mkdir(parents=True)
    module = load()
    dtype = next((p.dtype for p in module.parameters()), torch.float32)
    blocks = None
    if blockwise:
        if half:
            raise ExportError(f"{name}: a block-by-block export is fp32 (bf16 weights behind Casts), not fp16")
        with float32_compute(module):
            reference, blocks = trace_by_blocks(module, spec, trace_inputs, check_inputs, folder / "_trace", out_file,
                                                opset, atol, narrow=dtype != torch.float32)  # fmt: skip
    else:
        with torch.no_grad(), float32_compute(module):
            reference = module(*check_inputs)
        reference = [t.float().numpy() for t in (reference if isinstance(reference, tuple) else (reference,))]
        with float32_compute(module):  # a bf16/fp16 module traced as the fp32 computation it stands for
            traced = trace_component(module, spec, trace_inputs, folder / "_trace", opset, dtype == torch.float32)
    weights = weight_candidates(module.model) if lora else {}
    del module
    gc.collect()
    if blocks is None and dtype == torch.float32:
        pack_graph(traced, out_file)
    elif blocks is None:  # weights stay bf16/fp16 behind a Cast (half the disk), except for fp16 graphs
        widen_graph(traced, out_file, keep_narrow=not half)
    fix_static_dims(out_file, spec, [r.shape for r in reference])
    optimizations = optimize_file(out_file, out_file, chunk_norms=name.startswith("vae")) if optimize else {}
    lora_map = map_weights(weights, out_file) if weights else {}
    if dtype != torch.float32 and not half:  # the runtime reads such graphs differently (session.py)
        optimizations["narrow_weights"] = str(dtype).removeprefix("torch.")
    if half:
        optimizations["fp16"] = convert_to_fp16(out_file)
        atol = fp16_atol(reference, atol)
    if lora_map:  # where load-time LoRAs (runtime/lora.py) find each module's weight in the final graph
        write_targets(lora_map, out_file)
    session = open_session(out_file)
    feeds = {n: t.numpy() for n, t in zip(spec.input_names, check_inputs, strict=True)}
    validation = compare_outputs(name, session, feeds, reference, atol)
    if blocks is not None:
        validation["blocks"] = blocks
    inputs, outputs = signature(session)
    del session
    files = sorted(p for p in out_file.parent.iterdir() if p.is_file())
    return ComponentInfo(
        file=f"{name}/{out_file.name}",
        files={f"{name}/{p.name}": sha256_file(p) for p in files},
        inputs=inputs,
        outputs=outputs,
        precision="fp16" if half else "fp32",
        opset=opset,
        validation=validation,
        optimizations=optimizations,
    )


def _halves(src: PipelineSource, component: str) -> bool:
    """Whether fp16 applies: an SDXL VAE whose config says `force_upcast` (it overflows in fp16) stays fp32, as
    diffusers' SDXL pipelines keep it; its manifest entry then says precision fp32 among fp16 components.
    (diffusers' SD 1.x/2.x pipelines ignore the flag, so their VAEs are halved.)"""
    if not component.startswith("vae") or not src.config.sdxl:
        return True
    config = json.loads((src.folder / "vae" / "config.json").read_text())
    return not config.get("force_upcast", False)


def _load(load: Callable[[Path], torch.nn.Module], folder: Path, name: str) -> torch.nn.Module:
    try:
        return load(folder)
    except Exception as exc:  # noqa: BLE001 - a corrupt or unreadable weights file surfaces as many types
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"{name}: cannot load weights from {folder}: {reason}") from exc


def _package(
    src: PipelineSource,
    staging: Path,
    infos: dict[str, ComponentInfo],
    name: str | None = None,
    vocabulary: list[str] | None = None,
    loras: list[dict] | None = None,
) -> Manifest:
    for encoder, tokenizer in TOKENIZERS.items():  # SD3's T5 reads tokenizer_3, FLUX's tokenizer_2
        if encoder in infos:
            copy_tokenizer(src.folder, staging, tokenizer)
    copy_scheduler(src.folder, staging, src.scheduler)
    copy_component_configs(src.folder, staging, list(infos), src.tiny_vae)
    write_model_index(src.folder, staging, list(infos))
    manifest = Manifest(
        source=src.name,
        model_family=src.model_family,
        pipeline_class=src.pipeline_class,
        config=src.config,
        components=infos,
        tools=_tool_versions(),
        name=name or "",
        vocabulary=vocabulary,
        loras=loras,
    )
    manifest.save(staging)
    return manifest


def _scheduler_class(name: str) -> str:
    """The diffusers class of a sampler name (`--scheduler lcm` -> LCMScheduler), for the scheduler config."""
    from sd_onnx.runtime.schedulers import SCHEDULERS, resolve_name

    try:
        key = resolve_name(name)
    except ValueError as exc:
        raise ExportError(str(exc)) from None
    _, overrides, aliases = SCHEDULERS[key]
    if overrides:
        raise ExportError(f"--scheduler {name}: a variant of another sampler; give its base name")
    return next(a for a in aliases if a.endswith("Scheduler"))


def _quiet_libraries() -> None:
    """diffusers and transformers print loading bars and notices that drown our per-component progress."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for logging in (diffusers_logging, transformers_logging):
        logging.set_verbosity_error()
        logging.disable_progress_bar()


def _tool_versions() -> dict[str, str]:
    versions = {}
    for package in ("sd-onnx", "torch", "onnx", "onnxruntime", "diffusers", "transformers"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "unknown"
    return versions
