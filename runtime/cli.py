"""`sd-run`: generate images from an exported model folder (`prompt`), describe one (`info`), serve it (`serve`).

Every user error ends in one line (`Error: --guidance: must be a finite number, got nan`) and a non-zero exit,
before any work where it can be known up front (settings, output path, model folder).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from .annotator_models import MODEL_MODULES
from .annotators import MODULES as ANNOTATORS
from .hires import HiresFix
from .hires_upscalers import upscaler_names
from .lora import check_loras, parse_lora_option, read_loras
from .manifest import MANIFEST_NAME
from .prompt_syntax import SYNTAXES
from .request import DEFAULT_STEPS, DEFAULT_STRENGTH, GenerationRequest, Limits, RequestError
from .schedulers import scheduler_names
from .session import GraphRunError

DEFAULT_MODEL_ENV = "SD_ONNX_MODEL"
# GraphRunError: a graph that fails while running (out of memory at a large size), said in one line too.
USER_ERRORS = (ValueError, OSError, GraphRunError)
# GenerationRequest field -> the option that sets it, so errors name what the user typed.
OPTION_NAMES = {
    "prompt": "TEXT",
    "module": "--control-preprocess",  # annotators.annotate's field
    "negative_prompt": "--negative",
    "steps": "--steps",
    "guidance_scale": "--guidance",
    "width": "--width",
    "height": "--height",
    "seed": "--seed",
    "batch": "--batch",
    "scheduler": "--scheduler",
    "strength": "--strength",
    "eta": "--eta",
    "guidance_interval": "--guidance-interval",
    "prompt_syntax": "--prompt-syntax",
    "clip_skip": "--clip-skip",
    "max_sequence_length": "--max-sequence-length",
    "skip_guidance_layers": "--skip-layers",
    "skip_layer_guidance_scale": "--skip-layer-scale",
    "embeddings": "--embeddings",
    "vae_tiling": "--tile-vae",
    "deepcache_interval": "--deepcache",
    "tome_ratio": "--tome",
    "image": "--image",
    "mask_image": "--mask",
    "masked_content": "--masked-content",
    "mask_blur": "--mask-blur",
    "padding_mask_crop": "--padding-mask-crop",
    "paste_back": "--no-paste-back",
    "controls": "--control",
    "guess_mode": "--guess-mode",
    "hires": "--hires-scale",
    "hires_scale": "--hires-scale",
    "hires_upscaler": "--hires-upscaler",
    "hires_steps": "--hires-steps",
    "hires_denoising_strength": "--hires-denoise",
    "loras": "--lora",
    "lora_dir": "--lora-dir",
}
DEFAULT_LIMITS = Limits()


PROMPT_SYNTAX_OPTION = click.option(
    "--prompt-syntax",
    type=click.Choice(SYNTAXES),
    default="a1111",
    show_default=True,
    help="a1111: (emphasis:1.2), [less], BREAK and prompts of any length in 75-token chunks; plain: diffusers' "
    "reading (brackets are text, 77 tokens).",
)
CLIP_SKIP_OPTION = click.option(
    "--clip-skip",
    default=None,
    type=click.IntRange(1),
    metavar="N",
    help="Condition on the text encoder's Nth layer from the end, as A1111 counts (1: the last) [default: 1].",
)
LORA_DIR_OPTION = click.option(
    "--lora-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Folder of LoRA files that prompts pick with <lora:NAME:WEIGHT> (A1111's syntax).",
)
EMBEDDINGS_OPTION = click.option(
    "--embeddings",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Folder of textual-inversion embeddings (.safetensors); each file's name is its trigger word.",
)
LORA_OPTION = click.option(
    "--lora",
    "loras",
    multiple=True,
    metavar="FILE[:SCALE]",
    help="LoRA .safetensors added to the weights at load time (fp32/fp16 models; repeatable; scale default 1).",
)


def with_syntax(items: list[Any], syntax: str) -> list[Any]:
    """Batch items with `--prompt-syntax` where a line does not say its own `prompt_syntax`."""
    from dataclasses import replace

    return [replace(i, fields={"prompt_syntax": syntax, **i.fields}) if i.fields is not None else i for i in items]


def hires_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """--hires-scale/--hires-upscaler/--hires-steps/--hires-denoise: A1111's hires fix (see hires.py)."""
    options = [
        ("--hires-scale", float, "S", "Hires fix: upscale the picture S times, then denoise it again at that size "
         "(any --hires-* option turns it on) [default: 2]."),
        ("--hires-upscaler", str, "NAME", "Hires fix upscaler [default: Latent]: " + ", ".join(upscaler_names())),
        ("--hires-steps", int, "N", "Steps of the hires second pass [default: --steps]."),
        ("--hires-denoise", float, "D", f"Denoising strength of the hires second pass [default: {DEFAULT_STRENGTH}]."),
    ]  # fmt: skip
    for name, kind, metavar, help_text in reversed(options):
        command = click.option(name, default=None, type=kind, metavar=metavar, help=help_text)(command)
    return command


def hires_settings(
    scale: float | None, upscaler: str | None, steps: int | None, denoise: float | None
) -> HiresFix | None:
    """The HiresFix the --hires-* options ask for (checked with the rest of the request), or None."""
    if scale is None and upscaler is None and steps is None and denoise is None:
        return None
    given = {"scale": scale, "upscaler": upscaler, "steps": steps, "denoising_strength": denoise}
    return HiresFix(**{name: value for name, value in given.items() if value is not None})


def default_model() -> Path:
    """The model used when `-m` is not given: $SD_ONNX_MODEL, else the shapes model shipped in the package."""
    from .shipped import shipped_model

    return Path(os.environ.get(DEFAULT_MODEL_ENV) or shipped_model())


MODEL_HELP = "Exported model folder, or a Hugging Face Hub id: org/name[@revision]."
PROVIDER_HELP = (
    "cpu, cuda, dml, coreml, openvino (openvino:f32 for exact float layers, openvino:bf16), auto, or an ORT name."
)


def model_folder(model: Path | None) -> Path:
    """The folder `-m` names: the default model, a folder, or a Hub id fetched into the Hub's cache."""
    from .hub import locate_model

    try:
        return locate_model(model or default_model())
    except USER_ERRORS as exc:
        raise user_error(exc) from None


def limit_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """--max-steps/--max-pixels/--max-batch with the one set of defaults (request.Limits), for prompt and serve."""
    for name, help_text in reversed(
        [("max-steps", "Most denoising steps."), ("max-pixels", "Most pixels per image (width x height)."),
         ("max-batch", "Most images per request.")]
    ):  # fmt: skip
        default = getattr(DEFAULT_LIMITS, name.replace("-", "_"))
        command = click.option(f"--{name}", default=default, show_default=True, type=click.IntRange(1), help=help_text)(
            command
        )
    return command


def user_error(exc: Exception) -> click.ClickException:
    """One line for the user; request errors name the option rather than the API field."""
    if isinstance(exc, RequestError):
        return click.ClickException(f"{OPTION_NAMES.get(exc.field, exc.field)}: {exc.reason}")
    return click.ClickException(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)


def log_to_stderr() -> None:
    """Library warnings (long prompts, unknown words, provider fallback) as `warning: ...` lines."""
    import warnings

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LevelPrefix())
    logger = logging.getLogger("sd_onnx")
    logger.handlers[:] = [handler]
    logger.propagate = False
    warnings.simplefilter("default")
    warnings.showwarning = lambda msg, *args, **kwargs: click.echo(f"warning: {msg}", err=True)


class _LevelPrefix(logging.Formatter):
    """`warning: ...` / `error: ...`, as click prints its own messages."""

    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {record.getMessage()}"


@click.group()
def main() -> None:
    """Run Stable Diffusion ONNX models exported by sd-export."""


@main.command()
@click.argument("text")
@click.option("-m", "--model", type=click.Path(path_type=Path), default=None, help=MODEL_HELP)
@click.option("-o", "--output", default="out.png", show_default=True, help="PNG to write (several: NAME-0.png, ...).")
@click.option("--negative", default=None, help="Negative prompt.")
@click.option("--steps", default=None, type=int, help=f"Denoising steps [default: {DEFAULT_STEPS}].")
@click.option("--guidance", default=None, type=float, help="Guidance scale [default: the model's].")
@click.option("--seed", default=-1, show_default=True, type=int, help="Seed; -1 draws one (recorded in the PNG).")
@click.option("--scheduler", default=None, help="Sampler [default: the model's]: " + ", ".join(scheduler_names()))
@click.option("--width", default=None, type=int, help="[default: the model's resolution]")
@click.option("--height", default=None, type=int, help="[default: the model's resolution]")
@click.option("--batch", default=1, show_default=True, type=int, help="Images for this prompt.")
@click.option(
    "--image",
    type=click.Path(path_type=Path, dir_okay=False),
    multiple=True,
    help="Init image (img2img); on FLUX.2 [klein] a reference to edit from, repeatable for several.",
)
@click.option(
    "--mask",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Inpainting mask for --image: white is repainted.",
)
@click.option(
    "--masked-content",
    type=click.Choice(["original", "fill", "latent_noise", "latent_nothing"]),
    default="original",
    show_default=True,
    help="What the masked part starts from when --strength < 1 (A1111's masked content).",
)
@click.option("--mask-blur", default=0, show_default=True, type=int, help="Blur radius of the mask's edge, pixels.")
@click.option(
    "--padding-mask-crop",
    default=None,
    type=int,
    metavar="PIXELS",
    help="Inpaint only a box around the mask (with this much context) at full size, pasted back (only masked).",
)
@click.option(
    "--control",
    "controls",
    multiple=True,
    metavar="IMAGE[:NAME[:WEIGHT]]",
    help="ControlNet: a control image for the model's ControlNet NAME (default: its only one) at WEIGHT "
    "(default 1); repeatable for several.",
)
@click.option(
    "--control-preprocess",
    default="none",
    show_default=True,
    type=click.Choice([*ANNOTATORS, *MODEL_MODULES]),
    help="Make each control image from the picture first (A1111's module names; canny: OpenCV's, torch-free; "
    "softedge_hed*: the network exported with sd-export annotator, in --annotators-dir).",
)
@click.option(
    "--annotators-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Folder of preprocessor networks exported with sd-export annotator (one sub-folder per network).",
)
@click.option("--control-start", default=0.0, show_default=True, type=float, help="ControlNet: first step fraction.")
@click.option("--control-end", default=1.0, show_default=True, type=float, help="ControlNet: last step fraction.")
@click.option("--guess-mode", is_flag=True, help="ControlNet: on the conditional half only, residuals ramped.")
@click.option(
    "--no-paste-back",
    is_flag=True,
    help="Inpainting: keep the decoded pixels outside the mask (diffusers' way) instead of the original's (A1111's).",
)
@click.option(
    "--strength", default=None, type=float, help="img2img denoising strength in (0, 1] [default: 0.75; inpainting 1]."
)
@PROMPT_SYNTAX_OPTION
@CLIP_SKIP_OPTION
@click.option(
    "--max-sequence-length",
    default=None,
    type=int,
    metavar="N",
    help="SD3, FLUX.1, FLUX.2, Z-Image: the T5/LLM text tokens read (at most 512) [default: the model's].",
)
@click.option(
    "--skip-layers",
    default=None,
    metavar="N,N,...",
    help="SD3: skip-layer guidance over these transformer blocks (the ones the export skips: sd-export convert "
    "--skip-layers), at steps 1-20%% of the schedule as diffusers.",
)
@click.option(
    "--skip-layer-scale", default=None, type=float, help="SD3: the skip-layer guidance weight [default: 2.8]."
)
@EMBEDDINGS_OPTION
@LORA_DIR_OPTION
@LORA_OPTION
@click.option("--eta", default=0.0, show_default=True, type=float, help="DDIM eta.")
@click.option("--provider", default="auto", show_default=True, help=PROVIDER_HELP)
@click.option("--threads", default=None, type=click.IntRange(1, 256), help="onnxruntime intra-op threads.")
@click.option("--low-memory", is_flag=True, help="Load one component at a time and free it after use.")
@click.option(
    "--vae",
    type=click.Choice(["auto", "full", "tiny"]),
    default="auto",
    show_default=True,
    help="tiny: decode with the tiny autoencoder exported beside the VAE (sd-export convert --vae).",
)
@click.option(
    "--preview",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="PNG rewritten during denoising with a preview through the model's tiny autoencoder.",
)
@click.option("--preview-every", default=5, show_default=True, type=click.IntRange(1), help="Steps between previews.")
@click.option(
    "--guidance-interval",
    default=None,
    metavar="LO,HI",
    help="Guidance only at steps whose sigma is in (LO, HI] (HI may be inf); the others skip the negative half.",
)
@click.option(
    "--tile-vae/--no-tile-vae",
    "tile_vae",
    default=None,
    help="Decode/encode in overlapping tiles (memory follows the tile) [default: on with --low-memory above a tile].",
)
@click.option(
    "--deepcache",
    "deepcache",
    default=None,
    type=int,
    metavar="N",
    help="DeepCache: the full UNet every N steps, the shallow one on its cached features between (1: off).",
)
@click.option(
    "--tome",
    "tome",
    default=None,
    type=float,
    metavar="R",
    help="Token merging: merge this fraction (0-0.75) of the outermost tokens before self-attention (0: off).",
)
@hires_options
@limit_options
def prompt(
    text: str,
    model: Path | None,
    output: str,
    negative: str | None,
    steps: int | None,
    guidance: float | None,
    seed: int,
    scheduler: str | None,
    width: int | None,
    height: int | None,
    batch: int,
    image: tuple[Path, ...],
    mask: Path | None,
    masked_content: str,
    mask_blur: int,
    padding_mask_crop: int | None,
    no_paste_back: bool,
    controls: tuple[str, ...],
    control_preprocess: str,
    annotators_dir: Path | None,
    control_start: float,
    control_end: float,
    guess_mode: bool,
    strength: float | None,
    prompt_syntax: str,
    clip_skip: int | None,
    max_sequence_length: int | None,
    skip_layers: str | None,
    skip_layer_scale: float | None,
    embeddings: Path | None,
    lora_dir: Path | None,
    loras: tuple[str, ...],
    eta: float,
    provider: str,
    threads: int | None,
    low_memory: bool,
    vae: str,
    preview: Path | None,
    preview_every: int,
    guidance_interval: str | None,
    tile_vae: bool | None,
    deepcache: int | None,
    tome: float | None,
    hires_scale: float | None,
    hires_upscaler: str | None,
    hires_steps: int | None,
    hires_denoise: float | None,
    max_steps: int,
    max_pixels: int | None,
    max_batch: int,
) -> None:
    """Generate an image for TEXT and write it as PNG with its generation parameters."""
    from .image import check_writable, parameters_text, save_png
    from .pipeline import StableDiffusionPipeline

    log_to_stderr()
    limits = Limits(max_steps, max_pixels, max_batch)
    try:
        paths = output_paths(output, batch)
        for path in paths:
            try:
                check_writable(path)
            except OSError as exc:
                raise click.BadParameter(str(exc), param_hint="-o") from None
        applied = [parse_lora_option(text) for text in loras]
        pipe = StableDiffusionPipeline.from_pretrained(
            model or default_model(),
            provider=provider,
            threads=threads,
            low_memory=low_memory,
            vae=vae,
            loras=applied,
            embeddings=embeddings,
            lora_dir=lora_dir,
        )
        if preview is not None and not pipe.has_tiny_vae:
            raise click.BadParameter("this model has no tiny autoencoder to preview with", param_hint="--preview")
        inits = [read_init_image(path, limits.input_pixels(pipe.config)) for path in image]
        init = inits[0] if len(inits) == 1 else inits or None
        mask_image = read_init_image(mask, limits.input_pixels(pipe.config), "--mask") if mask else None
        request = GenerationRequest(
            text, negative, steps, guidance, width, height, seed, batch, scheduler, eta, init, strength, mask_image,
            masked_content, mask_blur, padding_mask_crop, guidance_interval=parse_interval(guidance_interval),
            vae_tiling=tile_vae, deepcache_interval=deepcache, tome_ratio=tome, prompt_syntax=prompt_syntax,
            clip_skip=None if clip_skip is None else clip_skip - 1, max_sequence_length=max_sequence_length,
            paste_back=False if no_paste_back else True if mask_image else None,
            hires=hires_settings(hires_scale, hires_upscaler, hires_steps, hires_denoise),
            skip_guidance_layers=parse_layers(skip_layers), skip_layer_guidance_scale=skip_layer_scale,
            controls=read_controls(controls, control_preprocess, control_start, control_end, guess_mode,
                                   limits.input_pixels(pipe.config), annotators_dir, threads),
            guess_mode=guess_mode,
        )  # fmt: skip
        request = pipe.prepare(request, limits)
        with click.progressbar(length=request.steps, label="denoising", file=sys.stderr) as bar:
            out = pipe.generate(request, callback=progress(bar, pipe, preview, preview_every))
        for i, (path, picture) in enumerate(zip(paths, out.images, strict=True)):
            save_png(picture, path, parameters_text(request, out.parameters, i))
            click.echo(str(path))
    except USER_ERRORS as exc:
        raise user_error(exc) from None


def read_controls(
    texts: tuple[str, ...], module: str, start: float, end: float, guess_mode: bool, max_pixels: int,
    annotators_dir: Path | None = None, threads: int | None = None,
) -> tuple:  # fmt: skip
    """--control IMAGE[:NAME[:WEIGHT]] options as ControlNet units, each image read (and preprocessed, with the
    networks in `annotators_dir` for the modules that run one)."""
    from .annotator_models import load_annotators
    from .annotators import annotate
    from .controlnet import ControlUnit

    if not texts and (module != "none" or guess_mode):
        given = "--control-preprocess" if module != "none" else "--guess-mode"
        raise click.BadParameter("applies to control images: give one with --control IMAGE", param_hint=given)
    networks = load_annotators(annotators_dir, threads)
    units = []
    for text in texts:
        path, name, weight = text, None, 1.0
        if not Path(text).is_file():
            parts = text.rsplit(":", 2)
            if len(parts) == 3:
                try:
                    weight = float(parts[2])
                except ValueError:
                    message = f"WEIGHT {parts[2]!r} is not a number (IMAGE[:NAME[:WEIGHT]])"
                    raise click.BadParameter(message, param_hint="--control") from None
            path, name = parts[0], (parts[1] if len(parts) > 1 else "") or None
        image = read_init_image(Path(path), max_pixels, "--control")
        units.append(ControlUnit(annotate(image, module, networks=networks), name, weight, start, end, module=module))
    return tuple(units)


def parse_layers(text: str | None) -> tuple[int, ...] | None:
    """--skip-layers 7,8,9 as block indices (checked against the export with the rest of the request)."""
    if text is None:
        return None
    try:
        layers = tuple(int(part) for part in text.split(",") if part.strip())
        if not layers:
            raise ValueError(text)
        return layers
    except ValueError:
        message = f"a comma-separated list of block indices, got {text!r}"
        raise click.BadParameter(message, param_hint="--skip-layers") from None


def parse_interval(text: str | None) -> tuple[float, float] | None:
    """--guidance-interval LO,HI as two numbers (checked with the rest of the request)."""
    if text is None:
        return None
    parts = text.split(",")
    try:
        if len(parts) != 2:
            raise ValueError
        return float(parts[0]), float(parts[1])
    except ValueError:
        raise click.BadParameter(
            f"give two numbers LO,HI such as 0.28,5.42, got {text!r}", param_hint="--guidance-interval"
        ) from None


def output_paths(output: str, count: int) -> list[Path]:
    """The file for each image: OUTPUT itself for one, OUTPUT's stem with -0, -1, ... for several; a link is
    followed, so the image replaces the file it points to, not the link."""
    if not output.strip():
        raise click.BadParameter("give a file name such as out.png", param_hint="-o")
    if output.endswith(("/", os.sep)) or Path(output).is_dir():
        raise OSError(f"-o {output}: is a directory; give a file name such as {Path(output) / 'out.png'}")
    path = Path(output).expanduser()
    if path.is_symlink():
        path = Path(os.path.realpath(path))  # realpath: no exception on a loop, which stays a link
        if path.is_symlink():
            raise OSError(f"-o {output}: is a symbolic link in a loop")
    if count < 2:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(count)]


def read_init_image(path: Path, max_pixels: int, option: str = "--image") -> Any:
    """The --image (or --mask) file, read lazily and refused from its header when over the pixel limit."""
    from .image import ImageError, decode_image

    try:
        return decode_image(path, max_pixels)
    except ImageError as exc:
        raise click.BadParameter(str(exc), param_hint=option) from None


def progress(
    bar: Any, pipe: Any = None, preview: Path | None = None, every: int = 5
) -> Callable[[int, int, Any], None]:
    def on_step(i: int, total: int, latents: Any) -> None:
        bar.length = total  # img2img runs fewer steps than asked
        bar.update(1)
        if preview is not None and ((i + 1) % every == 0 or i + 1 == total):
            pipe.preview(latents).save(preview)

    return on_step


@main.command()
@click.argument("folder", type=click.Path(path_type=Path), required=False)
@click.option("-m", "--model", type=click.Path(path_type=Path), default=None, help=MODEL_HELP)
@click.option("--no-verify", is_flag=True, help="Skip checking each file's sha256.")
def info(folder: Path | None, model: Path | None, no_verify: bool) -> None:
    """Print a model's manifest (sizes, size multiple, components, validation) and the engines available here.

    Exits non-zero when a file is missing or fails its sha256."""
    from .manifest import Manifest
    from .session import describe_engines

    if folder and model and folder != model:
        raise click.ClickException("give the model folder once (either FOLDER or -m)")
    folder = model_folder(folder or model)
    try:
        manifest = Manifest.load(folder)
    except USER_ERRORS as exc:
        raise user_error(exc) from None
    config = manifest.to_dict()["config"]
    click.echo(f"model: {manifest.name} in {folder} ({MANIFEST_NAME} format {manifest.format_version})")
    click.echo(f"source: {manifest.source}  family: {manifest.model_family}  pipeline: {manifest.pipeline_class}")
    click.echo(
        f"size: {config['default_resolution']}px by default; width and height must be multiples of "
        f"{config['size_multiple']}"
    )
    click.echo("config: " + json.dumps(config))
    for name, comp in manifest.components.items():
        diff, atol = comp.validation.get("max_abs_diff"), comp.validation.get("atol")
        checked = f"max |onnx - torch| {diff:.2e} (atol {atol})" if isinstance(diff, (int, float)) else "not validated"
        click.echo(f"  {name}: {comp.file} {comp.precision} opset {comp.opset}, {checked}")
    for engine, line in describe_engines().items():
        click.echo(f"{engine}: {line}")
    problems = [] if no_verify else manifest.problems(folder)
    for line in problems:
        click.echo(f"damaged: {line}", err=True)
    if problems:
        raise click.ClickException(f"{len(problems)} file(s) missing or modified; re-export or re-download the model")
    if not no_verify:
        click.echo("files: all sha256 match the manifest")


@main.command()
@click.option("-m", "--model", type=click.Path(path_type=Path), default=None, help=MODEL_HELP)
@click.option(
    "--upscalers-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Folder of exported upscalers (sd-export upscaler), one per sub-folder, for the A1111 extras routes.",
)
@click.option(
    "--annotators-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Folder of ControlNet preprocessor networks (sd-export annotator), one per sub-folder.",
)
@click.option(
    "--models-dir",
    type=click.Path(path_type=Path, exists=True, file_okay=False),
    default=None,
    help="Serve every exported model folder in DIR (A1111 clients switch with sd_model_checkpoint).",
)
@click.option(
    "--max-loaded-models",
    default=1,
    show_default=True,
    type=click.IntRange(1),
    metavar="K",
    help="With --models-dir: models kept loaded (least recently used unloaded); memory: K x one model.",
)
@click.option("--strict", is_flag=True, help="Refuse (422) A1111 fields and settings the server would ignore.")
@click.option(
    "--mcp", is_flag=True, help="Also serve an MCP endpoint at /mcp (streamable HTTP) for agents (--api-key too)."
)
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Use 0.0.0.0 explicitly to listen on all interfaces."
)
@click.option("--port", default=7860, show_default=True, type=click.IntRange(0, 65535))
@click.option("--public-url", default=None, help="Base URL of image links (default: http://HOST:PORT).")
@click.option(
    "--allow-origin",
    "allow_origins",
    multiple=True,
    metavar="ORIGIN",
    help="A web app's origin (https://app.example) whose pages may call the API, with CORS (repeatable).",
)
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1), help="Generation worker threads.")
@click.option("--queue-size", default=8, show_default=True, type=click.IntRange(1), help="Jobs that may wait.")
@click.option("--api-key", envvar="SD_ONNX_API_KEY", default=None, help="Required key (or $SD_ONNX_API_KEY).")
@click.option("--provider", default="auto", show_default=True, help=PROVIDER_HELP)
@click.option("--threads", default=None, type=click.IntRange(1, 256), help="onnxruntime intra-op threads.")
@limit_options
@click.option(
    "--timeout", default=600.0, show_default=True, type=click.FloatRange(1, 86400), help="Seconds per request."
)
@click.option("--max-body-bytes", default=10 * 1024 * 1024, show_default=True, type=click.IntRange(1024))
@EMBEDDINGS_OPTION
@LORA_DIR_OPTION
@LORA_OPTION
@click.option("--ray", "use_ray", is_flag=True, help="Serve on Ray Serve: model replicas behind the same API ([ray]).")
@click.option(
    "--address", default=None, help="With --ray: cluster to join ('auto': this machine's) [default: local Ray]."
)
@click.option("--replicas", default=1, show_default=True, type=click.IntRange(1), help="With --ray: model replicas.")
@click.option("--autoscale", default=None, metavar="MIN:MAX", help="With --ray: scale replicas on queue depth.")
@click.option("--cpus-per-replica", default=1.0, show_default=True, type=click.FloatRange(0, min_open=True))
@click.option("--gpus-per-replica", default=0.0, show_default=True, type=click.FloatRange(0))
def serve(
    model: Path | None,
    upscalers_dir: Path | None,
    annotators_dir: Path | None,
    models_dir: Path | None,
    max_loaded_models: int,
    strict: bool,
    mcp: bool,
    host: str,
    port: int,
    public_url: str | None,
    allow_origins: tuple[str, ...],
    workers: int,
    queue_size: int,
    api_key: str | None,
    provider: str,
    threads: int | None,
    max_steps: int,
    max_pixels: int | None,
    max_batch: int,
    timeout: float,
    max_body_bytes: int,
    embeddings: Path | None,
    lora_dir: Path | None,
    loras: tuple[str, ...],
    use_ray: bool,
    address: str | None,
    replicas: int,
    autoscale: str | None,
    cpus_per_replica: float,
    gpus_per_replica: float,
) -> None:
    """Serve the A1111 (/sdapi/v1/...) and OpenAI (/v1/images/...) image APIs and a web page (/) over HTTP.

    With --ray the model runs on Ray Serve replicas (this machine or a cluster) behind the same API."""
    try:
        from .server.app import ServeConfig, run_server
        from .server.state import normalize_origin
    except ImportError:
        raise click.ClickException("sd-run serve needs the [serve] extra: pip install '.[serve]'") from None
    check_models_dir(models_dir, model, max_loaded_models, use_ray, loras)
    ray_options = ray_serve_options(use_ray, address, replicas, autoscale, cpus_per_replica, gpus_per_replica, workers)
    from .annotator_models import load_annotators
    from .session import resolve_providers
    from .upscale import load_upscalers

    log_to_stderr()
    catalog = served_models(models_dir) if models_dir is not None else None
    folder = catalog[0].folder if catalog else model_folder(model)
    if timeout != timeout:  # NaN passes click's range check
        raise click.BadParameter("must be a number of seconds", param_hint="--timeout")
    if api_key is None and os.environ.get("SD_ONNX_API_KEY") is not None:
        api_key = os.environ["SD_ONNX_API_KEY"]  # click reads an empty variable as unset; it is a mistake here
    if api_key is not None and not api_key.strip():
        raise click.ClickException(
            "--api-key (or $SD_ONNX_API_KEY) is empty; give a key, or leave both out to serve without one"
        )
    if public_url is not None and not _is_base_url(public_url):
        raise click.ClickException(f"--public-url must be an http:// or https:// URL with a host, got {public_url!r}")
    for origin in allow_origins:
        if normalize_origin(origin) is None:
            reason = f"{origin!r} is not an origin: scheme://host[:port], like https://app.example"
            raise click.BadParameter(reason, param_hint="--allow-origin")
    try:
        resolve_providers(provider)
        applied = [parse_lora_option(text) for text in loras]
        check_loras(folder, list(read_loras(applied)))  # fails here, not in the background load
        load_upscalers(upscalers_dir)
        load_annotators(annotators_dir)
    except ValueError as exc:
        raise user_error(exc) from None
    if mcp and importlib.util.find_spec("mcp") is None:
        raise click.BadParameter("needs the mcp package: pip install 'sd-onnx[serve]'", param_hint="--mcp")
    config = ServeConfig(
        limits=Limits(max_steps, max_pixels, max_batch),
        timeout_s=timeout,
        max_body_bytes=max_body_bytes,
        api_key=api_key,
        workers=workers,
        queue_size=queue_size,
        public_url=(public_url or f"http://{_url_host(host)}:{port}").rstrip("/"),
        host=host,
        allow_origins=tuple(allow_origins),
        upscalers_dir=upscalers_dir,
        annotators_dir=annotators_dir,
        strict=strict,
        mcp=mcp,
    )
    if host not in ("127.0.0.1", "localhost", "::1"):
        click.echo(f"warning: listening on {host}, reachable from other machines", err=True)
    if ray_options is None:
        served = f"{len(catalog)} models from {models_dir}" if catalog else str(folder)
        click.echo(f"serving {served} on http://{_url_host(host)}:{port} (loading; Ctrl-C to stop)", err=True)
        run_server(
            config, folder, provider, threads, host, port, applied, catalog, max_loaded_models, embeddings, lora_dir
        )
        return
    from .server.ray_serve import run_ray_server

    if embeddings is not None or lora_dir is not None:
        raise click.UsageError("--embeddings and --lora-dir serve locally only; not with --ray yet")
    click.echo(f"deploying {folder} on Ray Serve at http://{_url_host(host)}:{port} (loading replicas)", err=True)
    try:
        run_ray_server(config, folder, ray_options, provider, threads, host, port, applied)
    except USER_ERRORS as exc:
        raise user_error(exc) from None


def check_models_dir(
    models_dir: Path | None, model: Path | None, max_loaded: int, use_ray: bool, loras: tuple[str, ...]
) -> None:
    """The options that go with --models-dir: not -m, --ray or --lora; --max-loaded-models needs it."""
    if models_dir is None:
        if max_loaded != 1:
            raise click.UsageError("--max-loaded-models needs --models-dir")
        return
    for given, name, why in (
        (model is not None, "-m", "give one model folder or a folder of them"),
        (use_ray, "--ray", "each Ray deployment serves one model: deploy one per -m"),
        (bool(loras), "--lora", "a LoRA is fused into one model at load: serve that model with -m"),
    ):
        if given:
            raise click.UsageError(f"--models-dir and {name} do not go together ({why})")


def served_models(models_dir: Path) -> list[Any]:
    """The models in --models-dir, each skipped folder warned about in one line; none servable: an error."""
    from .server.models import discover

    try:
        entries, warnings = discover(models_dir)
    except OSError as exc:
        raise click.ClickException(f"{models_dir}: cannot list it ({exc.strerror or exc})") from None
    for line in warnings:
        click.echo(f"warning: {models_dir}: {line}", err=True)
    if not entries:
        raise click.ClickException(f"{models_dir}: no servable model folder (sd-export's, with {MANIFEST_NAME})")
    return entries


def ray_serve_options(
    use_ray: bool,
    address: str | None,
    replicas: int,
    autoscale: str | None,
    cpus: float,
    gpus: float,
    workers: int,
) -> Any:
    """The --ray settings checked, or None without --ray (where the Ray-only options are refused)."""
    ray_only = {"--address": address is not None, "--replicas": replicas != 1, "--autoscale": autoscale is not None,
                "--cpus-per-replica": cpus != 1.0, "--gpus-per-replica": gpus != 0.0}  # fmt: skip
    if not use_ray:
        given = [name for name, set_ in ray_only.items() if set_]
        if given:
            raise click.UsageError(f"{given[0]} needs --ray")
        return None
    if workers != 1:
        raise click.UsageError("--workers is for the single-process server; with --ray use --replicas")
    if autoscale is not None and replicas != 1:
        raise click.UsageError("give either --replicas or --autoscale, not both")
    try:
        from .server.ray_serve import RayOptions, parse_min_max
    except ImportError:
        raise click.ClickException("sd-run serve --ray needs the [ray] extra: pip install 'sd-onnx[ray]'") from None
    try:
        return RayOptions(address, replicas, None if autoscale is None else parse_min_max(autoscale), cpus, gpus)
    except ValueError as exc:
        field, _, reason = str(exc).partition(": ")
        raise click.BadParameter(reason, param_hint="--" + field.replace("_", "-")) from None


@main.command()
@click.argument("prompts", type=click.Path(path_type=Path, dir_okay=False))
@click.argument("outdir", type=click.Path(path_type=Path, file_okay=False))
@click.option("-m", "--model", type=click.Path(path_type=Path), default=None, help=MODEL_HELP)
@click.option("--resume", is_flag=True, help="Continue a run in OUTDIR: skip ids done, redo failed ones.")
@click.option("--ray", "use_ray", is_flag=True, help="Spread the work over Ray workers ([ray] extra).")
@click.option("--address", default=None, help="With --ray: cluster to join ('auto': this one) [default: local Ray].")
@click.option("--workers", default=None, type=click.IntRange(1), help="With --ray: model copies [default: CPUs].")
@click.option("--cpus-per-worker", default=1.0, show_default=True, type=click.FloatRange(0, min_open=True))
@click.option("--gpus-per-worker", default=0.0, show_default=True, type=click.FloatRange(0))
@click.option("--provider", default="auto", show_default=True, help=PROVIDER_HELP)
@click.option("--threads", default=None, type=click.IntRange(1, 256), help="onnxruntime intra-op threads (local).")
@click.option(
    "--annotators-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Folder of ControlNet preprocessor networks (sd-export annotator) for lines' controls (local only).",
)
@PROMPT_SYNTAX_OPTION
@limit_options
def batch(
    prompts: Path,
    outdir: Path,
    model: Path | None,
    resume: bool,
    use_ray: bool,
    address: str | None,
    workers: int | None,
    cpus_per_worker: float,
    gpus_per_worker: float,
    provider: str,
    threads: int | None,
    annotators_dir: Path | None,
    prompt_syntax: str,
    max_steps: int,
    max_pixels: int | None,
    max_batch: int,
) -> None:
    """Generate one PNG per line of PROMPTS (JSONL: prompt, seed, steps, ... and an optional id) into OUTDIR,
    with OUTDIR/results.jsonl recording each id's seed, timings or error.

    Exits non-zero when a line failed; its record says why."""
    from .annotator_models import load_annotators
    from .batch import BatchOutput, local_executor, read_items, run_batch
    from .session import resolve_providers

    log_to_stderr()
    if not use_ray and (address or workers or cpus_per_worker != 1.0 or gpus_per_worker):
        raise click.UsageError("--address, --workers, --cpus-per-worker and --gpus-per-worker need --ray")
    if use_ray and annotators_dir is not None:
        raise click.UsageError("--annotators-dir runs locally only (Ray workers do not load the networks)")
    limits = Limits(max_steps, max_pixels, max_batch)
    folder = model_folder(model)
    try:
        resolve_providers(provider)
        items = with_syntax(read_items(prompts), prompt_syntax)
        output = BatchOutput(outdir)
        done = output.start(resume)  # before the model loads: a folder that needs --resume fails at once
        from .pipeline import StableDiffusionPipeline

        if use_ray:
            try:
                from .batch_ray import ray_executor
            except ImportError:
                raise click.ClickException(
                    "sd-run batch --ray needs the [ray] extra: pip install 'sd-onnx[ray]'"
                ) from None
            StableDiffusionPipeline.from_pretrained(folder, provider=provider, low_memory=True)  # fails here, once
            execute = ray_executor(folder, limits, address, workers or os.cpu_count() or 1, cpus_per_worker,
                                   gpus_per_worker, provider)  # fmt: skip
        else:
            networks = load_annotators(annotators_dir, threads)
            pipe = StableDiffusionPipeline.from_pretrained(folder, provider=provider, threads=threads)
            execute = local_executor(pipe, limits, networks)
        with click.progressbar(length=len(items), label="images", file=sys.stderr) as bar:
            summary = run_batch(items, output, done, execute, on_result=lambda _: bar.update(1))
    except USER_ERRORS as exc:
        raise user_error(exc) from None
    click.echo(f"{summary.done} done, {summary.failed} failed, {summary.skipped} already done; {output.results}")
    if summary.failed:
        raise click.ClickException(f"{summary.failed} of {len(items)} failed; their errors are in {output.results}")


@main.command()
@click.argument("image", type=click.Path(path_type=Path))
@click.option("-o", "--output", default="upscaled.png", show_default=True, help="PNG to write.")
@click.option(
    "--model",
    required=True,
    help="Exported upscaler folder (sd-export upscaler), or a resampler: None, Lanczos, Nearest.",
)
@click.option("--scale", default=None, type=float, help="[default: the model's own scale; 2 for a resampler]")
@click.option("--tile", default=None, type=int, help="Input pixels per tile side [default: the export's].")
@click.option("--threads", default=None, type=click.IntRange(1, 256), help="onnxruntime intra-op threads.")
def upscale(image: Path, output: str, model: str, scale: float | None, tile: int | None, threads: int | None) -> None:
    """Upscale IMAGE with an exported ESRGAN-class model (tiled: memory follows the tile) or a plain resampler;
    another scale than the model's is reached with Lanczos, as A1111 does. The PNG keeps IMAGE's parameters
    and records the upscale as A1111's extras do."""
    from .upscale import upscale_file

    log_to_stderr()
    try:
        path = output_paths(output, 1)[0]
        for written in upscale_file(image, path, model, scale, tile, threads):
            click.echo(written)
    except USER_ERRORS as exc:
        raise user_error(exc) from None


def _is_base_url(url: str) -> bool:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return parts.scheme in ("http", "https") and bool(parts.hostname) and not any(c.isspace() for c in url)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


if __name__ == "__main__":
    main()
