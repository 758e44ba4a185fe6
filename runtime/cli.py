"""`sd-run`: generate images from an exported model folder (`prompt`) and describe one (`info`)."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import click

from .manifest import MANIFEST_NAME

DEFAULT_MODEL_ENV = "SD_ONNX_MODEL"
USER_ERRORS = (ValueError, OSError)


def default_model() -> Path:
    """The model used when `-m` is not given: $SD_ONNX_MODEL, else the demo export made by the README."""
    import os

    return Path(os.environ.get(DEFAULT_MODEL_ENV, "out/tiny-onnx"))


@click.group()
def main() -> None:
    """Run Stable Diffusion ONNX models exported by sd-export."""


@main.command()
@click.argument("text")
@click.option("-m", "--model", type=click.Path(path_type=Path), default=None, help="Exported model folder.")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=Path("out.png"), show_default=True)
@click.option("--negative", default=None, help="Negative prompt.")
@click.option("--steps", default=20, show_default=True, type=int)
@click.option("--guidance", default=7.5, show_default=True, type=float)
@click.option("--seed", default=None, type=int, help="Seed (reproduces diffusers' torch CPU generator).")
@click.option("--scheduler", default=None, help="pndm, ddim, euler, euler_a, dpmpp_2m, dpmpp_2m_karras, lms, lcm, ddpm")
@click.option("--width", default=None, type=int)
@click.option("--height", default=None, type=int)
@click.option("--batch", default=1, show_default=True, type=int, help="Images for this prompt.")
@click.option("--provider", default="auto", show_default=True, help="cpu, cuda, dml, coreml, auto, or an ORT name.")
@click.option("--threads", default=None, type=int, help="onnxruntime intra-op threads.")
@click.option("--low-memory", is_flag=True, help="Load one component at a time and free it after use.")
def prompt(
    text: str,
    model: Path | None,
    output: Path,
    negative: str | None,
    steps: int,
    guidance: float,
    seed: int | None,
    scheduler: str | None,
    width: int | None,
    height: int | None,
    batch: int,
    provider: str,
    threads: int | None,
    low_memory: bool,
) -> None:
    """Generate an image for TEXT and write it as PNG with its generation parameters."""
    from .image import a1111_parameters, save_png
    from .pipeline import StableDiffusionPipeline

    warnings.simplefilter("default")
    warnings.showwarning = lambda msg, *args, **kwargs: click.echo(f"warning: {msg}", err=True)
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            model or default_model(), provider=provider, scheduler=scheduler, threads=threads, low_memory=low_memory
        )
        with click.progressbar(length=steps, label="denoising", file=sys.stderr) as bar:
            out = pipe(
                text,
                negative_prompt=negative,
                num_inference_steps=steps,
                guidance_scale=guidance,
                height=height,
                width=width,
                seed=seed,
                num_images_per_prompt=batch,
                callback=lambda i, n, _: bar.update(1) if i < steps else None,
            )
    except USER_ERRORS as exc:
        raise click.ClickException(str(exc)) from None
    for i, image in enumerate(out.images):
        path = output if len(out.images) == 1 else output.with_name(f"{output.stem}-{i}{output.suffix}")
        path.parent.mkdir(parents=True, exist_ok=True)
        save_png(image, path, a1111_parameters(text, negative, out.parameters))
        click.echo(str(path))


@main.command()
@click.argument("model", type=click.Path(path_type=Path), required=False)
def info(model: Path | None) -> None:
    """Print MODEL's manifest (sizes, components, validation figures) and the providers available here."""
    import onnxruntime as ort

    from .manifest import Manifest

    folder = model or default_model()
    try:
        manifest = Manifest.load(folder)
    except USER_ERRORS as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"model: {folder} ({MANIFEST_NAME} format {manifest.format_version})")
    click.echo(f"source: {manifest.source}  family: {manifest.model_family}  pipeline: {manifest.pipeline_class}")
    click.echo("config: " + json.dumps(manifest.to_dict()["config"]))
    for name, comp in manifest.components.items():
        val = comp.validation
        click.echo(
            f"  {name}: {comp.file} {comp.precision} opset {comp.opset}, "
            f"max |onnx - torch| {val.get('max_abs_diff', float('nan')):.2e} (atol {val.get('atol')})"
        )
    click.echo("providers available: " + ", ".join(ort.get_available_providers()))


if __name__ == "__main__":
    main()
