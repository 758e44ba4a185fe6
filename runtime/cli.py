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
    """The model used when `-m` is not given: $SD_ONNX_MODEL, else the shapes model shipped in the package."""
    import os

    from ..models.shapes import shipped_model

    return Path(os.environ.get(DEFAULT_MODEL_ENV) or shipped_model())


@click.group()
def main() -> None:
    """Run Stable Diffusion ONNX models exported by sd-export."""


@main.command()
@click.argument("text")
@click.option("-m", "--model", type=click.Path(path_type=Path), default=None, help="Exported model folder.")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=Path("out.png"), show_default=True)
@click.option("--negative", default=None, help="Negative prompt.")
@click.option("--steps", default=20, show_default=True, type=int)
@click.option("--guidance", default=None, type=float, help="Guidance scale [default: the model's, else 7.5].")
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
    guidance: float | None,
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


@main.command()
@click.option("-m", "--model", type=click.Path(path_type=Path), default=None, help="Exported model folder.")
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Use 0.0.0.0 explicitly to listen on all interfaces."
)
@click.option("--port", default=7860, show_default=True, type=int)
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1), help="Generation worker threads.")
@click.option("--queue-size", default=8, show_default=True, type=click.IntRange(1), help="Jobs that may wait.")
@click.option("--api-key", envvar="SD_ONNX_API_KEY", default=None, help="Required key (or $SD_ONNX_API_KEY).")
@click.option("--provider", default="auto", show_default=True)
@click.option("--threads", default=None, type=int, help="onnxruntime intra-op threads.")
@click.option("--max-steps", default=50, show_default=True, type=click.IntRange(1))
@click.option("--max-pixels", default=1024 * 1024, show_default=True, type=click.IntRange(64))
@click.option("--max-batch", default=4, show_default=True, type=click.IntRange(1))
@click.option("--timeout", default=600.0, show_default=True, type=float, help="Seconds a request may take.")
@click.option("--max-body-bytes", default=10 * 1024 * 1024, show_default=True, type=click.IntRange(1024))
def serve(
    model: Path | None,
    host: str,
    port: int,
    workers: int,
    queue_size: int,
    api_key: str | None,
    provider: str,
    threads: int | None,
    max_steps: int,
    max_pixels: int,
    max_batch: int,
    timeout: float,
    max_body_bytes: int,
) -> None:
    """Serve the A1111 (/sdapi/v1/...) and OpenAI (/v1/images/generations) image APIs over HTTP."""
    try:
        import uvicorn

        from .server.app import ServeConfig, ServerState, create_app
    except ImportError:
        raise click.ClickException("sd-run serve needs the [serve] extra: pip install 'sd-onnx[serve]'") from None
    from .pipeline import StableDiffusionPipeline
    from .session import resolve_providers

    folder = model or default_model()
    if not folder.is_dir():
        raise click.ClickException(f"{folder}: no such model folder")
    try:
        resolve_providers(provider)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    config = ServeConfig(max_steps, max_pixels, max_batch, timeout, max_body_bytes, api_key, workers, queue_size)
    state = ServerState(config)

    def loader() -> StableDiffusionPipeline:
        return StableDiffusionPipeline.from_pretrained(folder, provider=provider, threads=threads)

    if host not in ("127.0.0.1", "localhost", "::1"):
        click.echo(f"warning: listening on {host}, reachable from other machines", err=True)
    uvicorn.run(create_app(state, loader), host=host, port=port, log_level="warning", timeout_graceful_shutdown=30)


if __name__ == "__main__":
    main()
