"""The manifest's schema (see schema.py) and the rules beyond types: a manifest of the wrong shape fails on
load with one line naming the field, never later as a traceback."""

from __future__ import annotations

import math
import posixpath
import re
from typing import Any

from .echo import echo
from .manifest import (
    ALL_COMPONENTS,
    CONTROL_UNET,
    FAMILIES,
    STAGE_COMPONENTS,
    TRANSFORMER_FAMILIES,
    ManifestError,
    ModelConfig,
    controlnet_component,
)
from .schema import Obj, Opt, SchemaError, check

DIM = (int, str)
TENSOR = Obj({"name": str, "shape": [DIM], "dtype": str})
COMPONENT = Obj(
    {"file": str, "files": {str: str}, "inputs": [TENSOR], "outputs": [TENSOR]},
    {"precision": str, "opset": int, "validation": dict, "quantization": dict, "optimizations": dict},
)
CONFIG = Obj(
    {
        "embedding_dim": int,
        "latent_channels": int,
        "vae_scale_factor": int,
        "scaling_factor": float,
        "sample_size": int,
        "max_token_length": int,
    },
    {
        "prediction_type": str,
        "shift_factor": Opt(float),
        "guidance_scale": float,
        "size_multiple": int,
        "default_resolution": int,
        "time_cond_proj_dim": Opt(int),
        "default_steps": Opt(int),
        "pooled_dim": Opt(int),
        "time_ids_count": Opt(int),
        "force_zeros_for_empty_prompt": bool,
        "unet_in_channels": Opt(int),
        "vae_kind": str,
        "tiny_vae_scaling_factor": Opt(float),
        "tiny_vae_shift_factor": Opt(float),
        "deepcache_branch": Opt(int),
        "token_merging": bool,
        "unet_stages": int,
        "skip_guidance_layers": Opt([int]),
        "controlnets": Opt({str: Obj({"residuals": int}, {"conditioning": Opt(str), "source": Opt(str)})}),
        "clip_skip_layers": int,
        "family": str,
        "max_sequence_length": Opt(int),
        "patch_size": Opt(int),
        "guidance_embeds": bool,
        "timestep_scale": float,
        "guidance_embeds_scale": float,
    },
)
MANIFEST = Obj(
    {
        "format_version": int,
        "source": str,
        "model_family": str,
        "pipeline_class": str,
        "config": CONFIG,
        "components": {str: COMPONENT},
    },
    {
        "tools": Opt({str: str}),
        "name": Opt(str),
        "vocabulary": Opt([str]),
        "loras": Opt([Obj({"file": str, "sha256": str, "scale": float}, {})]),
    },
)
# Sizes: positive and below what any model uses by far (an absurd value would fail later, deep in a library).
SIZES = (
    "embedding_dim", "latent_channels", "vae_scale_factor", "sample_size", "max_token_length", "size_multiple",
    "time_cond_proj_dim", "default_steps", "pooled_dim", "time_ids_count", "unet_in_channels", "max_sequence_length",
    "patch_size",
)  # fmt: skip
MAX_SIZE = 1 << 16
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")  # flow: flow matching's velocity (SD3, FLUX)
MAX_PATCH = 16  # SD3's patches and FLUX's packing are 2x2
VAE_KINDS = ("full", "tiny", "dc")  # KL (a posterior), TAESD, SANA's DC-AE (both return latents)
# Families whose transformer takes the guidance scale as an input (FLUX.1-dev, SANA-Sprint).
GUIDANCE_EMBEDDING_FAMILIES = ("flux", "sana_sprint")
MAX_TIMESTEP_SCALE = 1e4  # SANA's transformers take the timestep x 1 (x 1000 at most, were it in 0..1)
CONTROLNET_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
MAX_RESIDUALS = 64  # SD 1.5's ControlNets return 12, SDXL's 9


def check_manifest(data: Any) -> None:
    """ManifestError naming the first field that does not match the schema or its rules."""
    try:
        check(data, MANIFEST, "", "manifest")
    except SchemaError as exc:
        raise ManifestError(str(exc)) from None
    config = data["config"]
    if not 0 <= config.get("guidance_scale", 0) <= 100:
        raise ManifestError(f"config.guidance_scale: must be in 0..100, got {config['guidance_scale']}")
    name = data.get("name") or ""
    if len(name) > 200 or not name.isprintable():
        raise ManifestError("name: must be one printable line of at most 200 characters")
    if config.get("vae_kind", "full") not in VAE_KINDS:
        raise ManifestError(f"config.vae_kind: must be one of {', '.join(VAE_KINDS)}, got {echo(config['vae_kind'])}")
    if not 0 <= (config.get("deepcache_branch") or 0) <= MAX_SIZE:
        raise ManifestError(f"config.deepcache_branch: must be in 0..{MAX_SIZE}, got {config['deepcache_branch']}")
    if config.get("prediction_type", "epsilon") not in PREDICTION_TYPES:
        raise ManifestError(f"config.prediction_type: must be one of {', '.join(PREDICTION_TYPES)}")
    family = config.get("family", "")
    _check_family(family)
    denoiser = "transformer" if family in TRANSFORMER_FAMILIES else "unet"
    if denoiser not in data["components"]:
        raise ManifestError(f"components: no {denoiser}")
    if ("unet_shallow" in data["components"]) != (config.get("deepcache_branch") is not None):
        raise ManifestError("components.unet_shallow: present exactly when config.deepcache_branch is set")
    if ("unet_tome" in data["components"]) != bool(config.get("token_merging")):
        raise ManifestError("components.unet_tome: present exactly when config.token_merging is true")
    if ("transformer_skip" in data["components"]) != (config.get("skip_guidance_layers") is not None):
        raise ManifestError("components.transformer_skip: present exactly when config.skip_guidance_layers is set")
    if not all(0 <= layer <= MAX_SIZE for layer in config.get("skip_guidance_layers") or ()):
        raise ManifestError(f"config.skip_guidance_layers: block indices in 0..{MAX_SIZE}")
    stages = config.get("unet_stages", 0)
    if stages not in (0, len(STAGE_COMPONENTS)):
        raise ManifestError(f"config.unet_stages: must be 0 or {len(STAGE_COMPONENTS)}, got {stages}")
    if any((name in data["components"]) != bool(stages) for name in STAGE_COMPONENTS):
        raise ManifestError("components.unet_stage_*: all present exactly when config.unet_stages is set")
    controlnets = config.get("controlnets") or {}
    _check_controlnets(controlnets, data["components"])
    for name, component in data["components"].items():
        if name not in ALL_COMPONENTS and name not in {controlnet_component(c) for c in controlnets}:
            raise ManifestError(f"components.{name}: unknown component (known: {', '.join(ALL_COMPONENTS)})")
        if component["file"] not in component["files"]:
            raise ManifestError(f"components.{name}.file: {component['file']!r} is not listed in its files")
        for rel in component["files"]:
            if not _inside(rel):
                raise ManifestError(f"components.{name}.files: {rel!r} is not a path inside the model folder")


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ManifestError(f"config.family: must be one of {', '.join(repr(f) for f in FAMILIES)}, got {echo(family)}")


def _inside(rel: str) -> bool:
    norm = posixpath.normpath(rel.replace("\\", "/"))
    return bool(rel) and not norm.startswith(("/", "../")) and norm != ".." and ":" not in norm.split("/")[0]


# What a model's defaults imply must be arrays a machine can hold: every array a default request makes (the
# image, the latents, the prompt's embeddings) at most MAX_ELEMENTS values (256 MiB in float32). SD 1.5's
# largest, its 512x512 RGB image, is 0.8 M; SDXL's 3.1 M.
MAX_ELEMENTS = 1 << 26
MAX_TOKENS = 4096  # CLIP reads 77, T5 512, Gemma 300
# Latent scaling: SD 0.18215, SDXL 0.13025, SD3 1.5305, FLUX 0.3611; beyond these bounds latents overflow float32.
MAX_SCALING, MAX_SHIFT = 100.0, 10.0


def check_model_config(config: ModelConfig) -> None:
    """ManifestError naming the first field whose value the model cannot run with: sizes whose default request
    implies arrays beyond MAX_ELEMENTS, a default size that is not a size the denoiser takes, a family's
    fields out of place."""
    for key in SIZES:
        value = getattr(config, key)
        if value is not None and not (isinstance(value, int) and 0 < value <= MAX_SIZE):
            raise ManifestError(f"config.{key}: must be in 1..{MAX_SIZE}, got {echo(value)}")
    for key in ("scaling_factor", "shift_factor"):
        value = getattr(config, key)
        if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)):
            raise ManifestError(f"config.{key}: must be a finite number, got {echo(value)}")
    if not 0 < config.scaling_factor <= MAX_SCALING:
        raise ManifestError(f"config.scaling_factor: must be in (0, {MAX_SCALING:g}], got {config.scaling_factor}")
    if config.shift_factor is not None and abs(config.shift_factor) > MAX_SHIFT:
        raise ManifestError(f"config.shift_factor: must be in -{MAX_SHIFT:g}..{MAX_SHIFT:g}, got {config.shift_factor}")
    _check_family(config.family)
    side = config.sample_size * config.vae_scale_factor
    prompt_tokens = config.max_token_length + (config.max_sequence_length or 0)  # SD3: CLIP's and T5's in a row
    implied = {
        "sample_size": (side * side * 3, f"a default image of {side}x{side} pixels"),
        "latent_channels": (
            config.latent_channels * config.sample_size**2,
            f"default latents of {config.latent_channels}x{config.sample_size}x{config.sample_size}",
        ),
        "embedding_dim": (
            prompt_tokens * config.embedding_dim,
            f"prompt embeddings of {prompt_tokens}x{config.embedding_dim}",
        ),
    }
    for name, (elements, what) in implied.items():
        if elements > MAX_ELEMENTS:
            raise ManifestError(f"config.{name}: {what} ({elements:,} values), more than {MAX_ELEMENTS:,} per array")
    for key in ("max_token_length", "max_sequence_length"):
        tokens = getattr(config, key)
        if tokens is not None and tokens > MAX_TOKENS:
            raise ManifestError(f"config.{key}: {tokens} tokens, at most {MAX_TOKENS}")
    if config.patch_size is not None and config.patch_size > MAX_PATCH:
        raise ManifestError(f"config.patch_size: must be in 1..{MAX_PATCH}, got {config.patch_size}")
    for key in ("patch_size", "max_sequence_length"):
        if config.family in TRANSFORMER_FAMILIES and getattr(config, key) is None:
            raise ManifestError(f"config.{key}: a {config.family} model needs one")
    if config.patch_size and config.size_multiple % (config.vae_scale_factor * config.patch_size):
        raise ManifestError(
            f"config.size_multiple: {config.size_multiple} is no multiple of vae_scale_factor x patch_size "
            f"({config.vae_scale_factor} x {config.patch_size})"
        )
    if config.guidance_embeds and config.family not in GUIDANCE_EMBEDDING_FAMILIES:
        raise ManifestError("config.guidance_embeds: only FLUX and SANA-Sprint transformers take a guidance input")
    for key in ("timestep_scale", "guidance_embeds_scale"):
        value = getattr(config, key)
        if not (isinstance(value, (int, float)) and math.isfinite(value) and 0 < value <= MAX_TIMESTEP_SCALE):
            raise ManifestError(f"config.{key}: must be in (0, {MAX_TIMESTEP_SCALE:g}], got {echo(value)}")
    if config.size_multiple and side % config.size_multiple:
        raise ManifestError(
            f"config.sample_size: the default size {side} (sample_size x vae_scale_factor) is no multiple of "
            f"{config.size_multiple}, the sizes the UNet takes"
        )


def _check_controlnets(controlnets: dict[str, Any], components: dict[str, Any]) -> None:
    """Each listed ControlNet has a plain name and its graph; the control UNet is there exactly when one is."""
    for name, entry in controlnets.items():
        if not CONTROLNET_NAME.match(name):
            raise ManifestError(f"config.controlnets: {echo(name)} is not a name (1-64 of a-z, 0-9, _ and -)")
        if controlnet_component(name) not in components:
            raise ManifestError(f"config.controlnets.{name}: no component {controlnet_component(name)}")
        if not 1 <= entry["residuals"] <= MAX_RESIDUALS:
            raise ManifestError(f"config.controlnets.{name}.residuals: must be in 1..{MAX_RESIDUALS}")
    if (CONTROL_UNET in components) != bool(controlnets):
        raise ManifestError(f"components.{CONTROL_UNET}: present exactly when config.controlnets lists one")
