"""`sd-export`: the exporter's command line."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import click

from sd_onnx.runtime.manifest import COMPONENTS

from .errors import ExportError


@click.group()
def main() -> None:
    """Export Stable Diffusion pipelines to validated ONNX model folders."""


def disk_error(exc: OSError, output: Path) -> click.ClickException:
    """A full disk or a folder that cannot be written, in one line; the output was never published."""
    return click.ClickException(f"{exc.strerror or exc} ({exc.filename or output}); nothing was written")


@main.command()
@click.argument("source")
@click.argument("output", type=click.Path(path_type=Path))
@click.option("--opset", default=17, show_default=True, type=click.IntRange(17, 23), help="ONNX opset.")
@click.option("--atol", default=1e-3, show_default=True, help="Max abs difference allowed between ONNX and PyTorch.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option(
    "--components",
    default=None,
    help=f"Comma-separated components to export [default: all the pipeline has, of {', '.join(COMPONENTS)}].",
)
@click.option(
    "--precision",
    type=click.Choice(["fp32", "fp16", "int8", "int4"]),
    default="fp32",
    show_default=True,
    help="fp16: half-precision graphs for GPU providers; int8: static QDQ quantization of UNet and VAE, "
    "calibrated on real trajectories (for CPUs); for transformer models (SD3, FLUX, ...) int8 and int4 quantize "
    "the weights of the transformer and T5/LLM text encoders, no calibration (int8: dynamic per-channel, the "
    "faster; int4: MatMulNBits, the smaller).",
)
@click.option(
    "--optimize/--no-optimize",
    default=True,
    show_default=True,
    help="Fuse attention into onnxruntime's MultiHeadAttention and split GEGLU projections (faster on CPU; "
    "--no-optimize keeps the graph as traced).",
)
@click.option(
    "--config", default=None, help="For a single-file checkpoint: diffusers folder or hub id of its architecture."
)
@click.option(
    "--guidance-scale",
    default=None,
    type=click.FloatRange(min=0.0),
    help="Guidance the model was made for, recorded as the runtime's default (else 7.5).",
)
@click.option(
    "--default-steps",
    "--steps",
    default=None,
    type=click.IntRange(min=1),
    help="Steps the model was made for, recorded as the runtime's default (else 20; LCM pipelines 4).",
)
@click.option("--name", default=None, help="Model name in the manifest and PNGs [default: SOURCE's last part].")
@click.option(
    "--vocabulary",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    default=None,
    help="File of the words the text encoder knows (one per line); the runtime warns about others.",
)
@click.option(
    "--lora",
    "loras",
    multiple=True,
    help="FILE[:SCALE] LoRA (.safetensors, diffusers/PEFT or kohya/A1111) fused before export; repeatable.",
)
@click.option("--scheduler", default=None, help="Sampler recorded as the model's default (e.g. lcm for LCM-LoRA).")
@click.option(
    "--vae",
    "tiny_vae",
    default=None,
    help="A tiny autoencoder (diffusers AutoencoderTiny folder, e.g. TAESD) to export beside the VAE.",
)
@click.option(
    "--deepcache-branch",
    default=None,
    type=click.IntRange(min=0),
    help="Also export DeepCache's graphs, caching at this branch (0: the outermost layer, the fastest); "
    "sd-run --deepcache N then uses them.",
)
@click.option(
    "--tome",
    is_flag=True,
    help="Also give the UNet a token-merging variant (ToMe for SD, ratio an input); sd-run --tome R uses it.",
)
@click.option(
    "--unet-stages",
    is_flag=True,
    help="Also cut the UNet into stage graphs that --low-memory runs one at a time (weights stored once).",
)
@click.option(
    "--trace-dtype",
    type=click.Choice(["fp32", "bf16", "fp16"]),
    default="fp32",
    show_default=True,
    help="Load and trace the transformer and T5 in this dtype: bf16 halves the memory for full-size models "
    "(SD3.5, FLUX, T5-XXL); the graphs still compute in fp32, validated against an fp32 computation, their weights "
    "stored as bf16 (half the disk; exact for the bf16/fp16 checkpoints these models ship as).",
)
@click.option(
    "--blockwise/--no-blockwise",
    default=None,
    help="Trace the transformer one block at a time and stitch the graphs (memory: the model plus one block; "
    "needed for 4B+ transformers on 24 GB). Default: on with --trace-dtype bf16/fp16.",
)
@click.option(
    "--skip-layers",
    default=None,
    metavar="N,N,...",
    help="SD3: also export the transformer with these blocks skipped, for skip-layer guidance (SD3.5 Medium's "
    "card: 7,8,9); it shares the transformer's weights.",
)
@click.option(
    "--controlnet",
    "controlnets",
    multiple=True,
    metavar="SOURCE[:NAME]",
    help="Also export this ControlNet (diffusers folder, hub id or .safetensors; repeatable) and the UNet that "
    "takes its residuals; NAME defaults to SOURCE's last part.",
)
def convert(
    source: str,
    output: Path,
    opset: int,
    atol: float,
    overwrite: bool,
    components: str | None,
    precision: str,
    optimize: bool,
    config: str | None,
    guidance_scale: float | None,
    default_steps: int | None,
    name: str | None,
    vocabulary: Path | None,
    loras: tuple[str, ...],
    scheduler: str | None,
    tiny_vae: str | None,
    deepcache_branch: int | None,
    tome: bool,
    unet_stages: bool,
    trace_dtype: str,
    blockwise: bool | None,
    skip_layers: str | None,
    controlnets: tuple[str, ...],
) -> None:
    """Export SOURCE (diffusers folder, hub id, or .safetensors/.ckpt file) to the ONNX folder OUTPUT."""
    from .controlnet import ControlNetSource
    from .lora import parse_lora

    try:
        parsed_loras = [parse_lora(text) for text in loras]  # checked before the heavy imports
        parsed_controlnets = [ControlNetSource.parse(text) for text in controlnets]
    except ExportError as exc:
        raise click.ClickException(str(exc)) from None
    from .convert import convert as run_convert
    from .skip_layers import parse_layers

    started = time.perf_counter()
    try:
        run_convert(
            source,
            output,
            components=tuple(c.strip() for c in (components or "").split(",") if c.strip()) or None,
            opset=opset,
            atol=atol,
            overwrite=overwrite,
            config=config,
            precision=precision,
            optimize=optimize,
            guidance_scale=guidance_scale,
            default_steps=default_steps,
            name=name,
            vocabulary=vocabulary.read_text().split() if vocabulary else None,
            vae=tiny_vae,
            loras=parsed_loras,
            scheduler=scheduler,
            deepcache_branch=deepcache_branch,
            tome=tome,
            unet_stages=unet_stages,
            trace_dtype=trace_dtype,
            blockwise=blockwise,
            skip_layers=parse_layers(skip_layers) if skip_layers is not None else None,
            controlnets=parsed_controlnets,
            log=lambda line: click.echo(line, err=True),
        )
    except ExportError as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise disk_error(exc, output) from None
    except KeyboardInterrupt:
        click.echo("interrupted; nothing was written", err=True)
        sys.exit(130)
    click.echo(f"done in {time.perf_counter() - started:.1f} s", err=True)


@main.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.argument("output", type=click.Path(path_type=Path))
@click.option(
    "--components",
    default=None,
    help="Components to quantize [default: unet, vae_decoder, vae_encoder; transformer models: the transformer "
    "and T5/LLM text encoders].",
)
@click.option("--calibration-steps", default=10, show_default=True, type=click.IntRange(1), help="Steps per prompt.")
@click.option(
    "--calibration-size", default=None, type=int, help="Image side for calibration runs (default min(native, 256))."
)
@click.option("--prompts", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="Calibration prompts, one per line (default: a built-in varied set of 8).")  # fmt: skip
@click.option(
    "--precision",
    type=click.Choice(["int8", "int4"]),
    default="int8",
    show_default=True,
    help="int4: transformer models only (weight-only MatMulNBits; their int8 is weight-only too).",
)
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
def quantize(
    source: Path,
    output: Path,
    components: str | None,
    calibration_steps: int,
    calibration_size: int | None,
    prompts: Path | None,
    precision: str,
    overwrite: bool,
) -> None:
    """Quantize the fp32 export SOURCE into OUTPUT: a UNet model to int8 (static QDQ, calibrated on real
    trajectories), a transformer model's transformer and T5 encoder to weight-only int8 or int4 (no calibration)."""
    from sd_onnx.runtime.manifest import ManifestError

    from .quantize_folder import quantize_folder

    options = {
        "components": tuple(c.strip() for c in (components or "").split(",") if c.strip()) or None,
        "steps": calibration_steps,
        "size": calibration_size,
    }
    if prompts is not None:
        options["prompts"] = tuple(line.strip() for line in prompts.read_text().splitlines() if line.strip())
    try:
        quantize_folder(source, output, overwrite=overwrite, precision=precision, log=echo, **options)
    except (ExportError, ManifestError) as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise disk_error(exc, output) from None
    except KeyboardInterrupt:
        click.echo("interrupted; nothing was written", err=True)
        sys.exit(130)


@main.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.argument("output", type=click.Path(path_type=Path))
@click.option(
    "--branch",
    default=0,
    show_default=True,
    type=click.IntRange(min=0),
    help="The branch whose feature is cached (0: the outermost layer, the fastest shallow path).",
)
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
def deepcache(source: Path, output: Path, branch: int, overwrite: bool) -> None:
    """Copy the export SOURCE to OUTPUT with DeepCache's graphs added (any precision; weights stored once)."""
    from .deepcache import deepcache_folder

    derive(lambda: deepcache_folder(source, output, branch, overwrite=overwrite, log=echo), output)


@main.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.argument("output", type=click.Path(path_type=Path))
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
def tome(source: Path, output: Path, overwrite: bool) -> None:
    """Copy the export SOURCE to OUTPUT with the token-merging UNet added (any precision; weights stored once)."""
    from .tome import token_merging_folder

    derive(lambda: token_merging_folder(source, output, overwrite=overwrite, log=echo), output)


@main.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.argument("output", type=click.Path(path_type=Path))
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
def stages(source: Path, output: Path, overwrite: bool) -> None:
    """Copy the export SOURCE to OUTPUT with the UNet also cut into the stage graphs that low-memory mode runs one
    at a time (any precision; weights stored once)."""
    from .stages import stages_folder

    derive(lambda: stages_folder(source, output, overwrite=overwrite, log=echo), output)


@main.command()
@click.argument("file", type=click.Path(path_type=Path))
@click.argument("output", type=click.Path(path_type=Path))
@click.option(
    "--int8",
    is_flag=True,
    help="Quantize the graph (static QDQ) if its PSNR against fp32 stays >= 35 dB; else keep fp32 and say so.",
)
@click.option("--tile", default=192, show_default=True, type=int, help="Runtime tile side in input pixels (64-8192).")
@click.option("--name", default=None, help="Upscaler name in its manifest [default: FILE's stem].")
@click.option("--opset", default=17, show_default=True, type=click.IntRange(17, 23), help="ONNX opset.")
@click.option("--atol", default=1e-3, show_default=True, help="Max abs difference allowed between ONNX and PyTorch.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
def upscaler(
    file: Path, output: Path, int8: bool, tile: int, name: str | None, opset: int, atol: float, overwrite: bool
) -> None:
    """Export an ESRGAN-class upscaler FILE (RRDBNet or Real-ESRGAN's SRVGGNetCompact; .pth, read weights-only, or
    .safetensors) to the ONNX folder OUTPUT, validated against PyTorch, for `sd-run upscale` and the server."""
    from .upscaler import export_upscaler

    derive(lambda: export_upscaler(file, output, int8=int8, tile=tile, name=name, opset=opset, atol=atol,
                                   overwrite=overwrite, log=echo), output)  # fmt: skip


@main.command()
@click.argument("network", metavar="NETWORK", type=click.Choice(["hed"], case_sensitive=False))
@click.argument("file", type=click.Path(path_type=Path))
@click.argument("output", type=click.Path(path_type=Path))
@click.option("--opset", default=17, show_default=True, type=click.IntRange(17, 23), help="ONNX opset.")
@click.option(
    "--atol",
    default=1e-4,
    show_default=True,
    type=click.FloatRange(0, min_open=True),
    help="Max abs difference allowed between ONNX and PyTorch.",
)
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
def annotator(network: str, file: Path, output: Path, opset: int, atol: float, overwrite: bool) -> None:
    """Export a ControlNet preprocessor NETWORK's checkpoint FILE (hed: ControlNetHED.pth, read weights-only) to
    the ONNX folder OUTPUT, validated against controlnet-aux's PyTorch module; the runtime finds it as
    DIR/NETWORK under --annotators-dir DIR (A1111 modules softedge_hed, softedge_hedsafe). Needs controlnet-aux:
    pip install --no-deps controlnet-aux==0.0.10 einops."""
    from .annotator import export_annotator

    derive(lambda: export_annotator(network.lower(), file, output, opset=opset, atol=atol, overwrite=overwrite,
                                    log=echo),
           output)  # fmt: skip


@main.command()
@click.argument("controlnet", metavar="SOURCE[:NAME]")
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("output", type=click.Path(path_type=Path))
@click.option("--opset", default=17, show_default=True, type=click.IntRange(17, 23), help="ONNX opset.")
@click.option("--atol", default=1e-3, show_default=True, help="Max abs difference allowed between ONNX and PyTorch.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists (OUTPUT may be MODEL itself).")
def controlnet(controlnet: str, model: Path, output: Path, opset: int, atol: float, overwrite: bool) -> None:
    """Copy the export MODEL to OUTPUT with the ControlNet SOURCE (diffusers folder, hub id or .safetensors) added,
    validated against PyTorch, and the UNet that takes its residuals (any precision; weights stored once)."""
    from .controlnet import ControlNetSource, controlnet_folder

    derive(lambda: controlnet_folder(ControlNetSource.parse(controlnet), model, output, opset, atol,
                                     overwrite=overwrite, log=echo), output)  # fmt: skip


def echo(line: str) -> None:
    click.echo(line, err=True)


def derive(step: Callable[[], object], output: Path) -> None:
    """Run an `sd-export` step that adds graphs to a copy of an export, its errors as one line."""
    from sd_onnx.runtime.manifest import ManifestError

    try:
        step()
    except (ExportError, ManifestError) as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise disk_error(exc, output) from None


if __name__ == "__main__":
    main()
