"""`sd-export`: the exporter's command line."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from sd_onnx.runtime.manifest import COMPONENTS

from .errors import ExportError


@click.group()
def main() -> None:
    """Export Stable Diffusion pipelines to validated ONNX model folders."""


@main.command()
@click.argument("source")
@click.argument("output", type=click.Path(path_type=Path))
@click.option("--opset", default=17, show_default=True, type=click.IntRange(17, 23), help="ONNX opset.")
@click.option("--atol", default=1e-3, show_default=True, help="Max abs difference allowed between ONNX and PyTorch.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option(
    "--components",
    default=",".join(COMPONENTS),
    show_default=True,
    help="Comma-separated components to export.",
)
@click.option(
    "--config", default=None, help="For a single-file checkpoint: diffusers folder or hub id of its architecture."
)
def convert(
    source: str, output: Path, opset: int, atol: float, overwrite: bool, components: str, config: str | None
) -> None:
    """Export SOURCE (diffusers folder, hub id, or .safetensors/.ckpt file) to the ONNX folder OUTPUT."""
    from .convert import convert as run_convert

    started = time.perf_counter()
    try:
        run_convert(
            source,
            output,
            components=tuple(c.strip() for c in components.split(",") if c.strip()),
            opset=opset,
            atol=atol,
            overwrite=overwrite,
            config=config,
            log=lambda line: click.echo(line, err=True),
        )
    except ExportError as exc:
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:
        click.echo("interrupted; nothing was written", err=True)
        sys.exit(130)
    click.echo(f"done in {time.perf_counter() - started:.1f} s", err=True)


if __name__ == "__main__":
    main()
