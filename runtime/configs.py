"""Read a model folder's own component configs into `ModelConfig`: the one reader, for the exporter (diffusers
folders: `vae/`) and the runtime (ONNX folders without a manifest: `vae_decoder/`). JSON only, no torch.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .echo import echo
from .files import inside
from .manifest import LLM_FAMILIES, ManifestError, ModelConfig, read_json
from .manifest_schema import check_model_config

__all__ = ["read_json", "read_model_config", "size_multiple"]

# SD3/FLUX: the family of a pipeline class (model_index.json) or, where that is missing, of its transformer class.
PIPELINE_FAMILIES = {
    "StableDiffusion3Pipeline": "sd3",
    "StableDiffusion3Img2ImgPipeline": "sd3",
    "FluxPipeline": "flux",
    "FluxFillPipeline": "flux",  # FLUX.1 Fill: the transformer also takes the masked image's latents and the mask
    "SanaPipeline": "sana",
    "SanaSprintPipeline": "sana_sprint",
    "SanaSprintImg2ImgPipeline": "sana_sprint",
    **{name: "z_image" for name in ("ZImagePipeline", "ZImageImg2ImgPipeline")},
    "Flux2KleinPipeline": "flux2",  # not Flux2Pipeline (FLUX.2 [dev]: a Mistral encoder), though the same transformer
}
TRANSFORMER_FAMILIES = {
    "SD3Transformer2DModel": "sd3",
    "FluxTransformer2DModel": "flux",
    "SanaTransformer2DModel": "sana",  # SANA-Sprint's when it embeds the guidance
    "ZImageTransformer2DModel": "z_image",
}
# diffusers' call defaults: SD3 28 steps at CFG 7; FLUX.1-dev 28 steps with an embedded guidance of 3.5, FLUX.1
# schnell (no guidance embedding) 4 steps and no CFG; T5 prompt lengths SD3 256, FLUX 512.
SD3_STEPS, SD3_GUIDANCE, SD3_SEQUENCE = 28, 7.0, 256
FLUX_DEV_STEPS, FLUX_DEV_GUIDANCE, FLUX_SCHNELL_STEPS, FLUX_SEQUENCE = 28, 3.5, 4, 512
FLUX_FILL_STEPS, FLUX_FILL_GUIDANCE = 50, 30.0  # FluxFillPipeline's call defaults (FLUX.1 Fill [dev]'s card)
FLUX_SAMPLE_SIZE = 128  # FluxPipeline.default_sample_size: 1024 px with FLUX's 8x VAE
FLUX_PACKING = 2  # FluxPipeline packs 2x2 latent patches into one token (its transformer's patch_size is 1)
# diffusers' SanaPipeline: 20 steps at CFG 4.5; SanaSprintPipeline: 2 steps with the guidance scale 4.5 embedded;
# both read 300 Gemma tokens and take sides that are multiples of 32 (check_inputs).
SANA_STEPS, SANA_SPRINT_STEPS, SANA_GUIDANCE, SANA_SEQUENCE, SANA_SIDES = 20, 2, 4.5, 300, 32
SANA_FAMILIES = ("sana", "sana_sprint")


def size_multiple(vae_scale_factor: int, unet: dict[str, Any]) -> int:
    """Pixel sides the model can run: the VAE factor times 2 per UNet down-sampling level (each level but the
    last halves the latent, and the up path must meet the skip connections at the same size)."""
    levels = len(unet.get("block_out_channels") or unet.get("down_block_types") or ())
    if levels < 1:
        raise ManifestError("unet config has no block_out_channels: cannot tell its size multiple")
    return vae_scale_factor * 2 ** (levels - 1)


def read_model_config(
    folder: Path, vae: str = "vae", text_width: int | None = None, guidance_scale: float | None = None
) -> ModelConfig:
    """Sizes, token length and prediction type from `text_encoder/`, `unet/`, `<vae>/` and `scheduler/` configs
    (SD3 and FLUX folders, which have a `transformer/` instead of a `unet/`: see _transformer_model_config).

    `text_width` stands in for the text encoder's hidden size where its config is missing (some ONNX
    folders); the UNet's `cross_attention_dim` is the next fallback."""
    folder = Path(folder)
    if not os.path.lexists(folder / "unet") and os.path.lexists(folder / "transformer"):
        config = _transformer_model_config(folder, vae)
        if guidance_scale is not None:
            config.guidance_scale = guidance_scale
        return config
    unet = read_json(inside(folder, "unet/config.json", folder))
    vae_config = read_json(inside(folder, f"{vae}/config.json", folder))
    text_path = folder / "text_encoder" / "config.json"
    if not text_path.is_file():  # an SDXL refiner: the second encoder sets the token length
        text_path = folder / "text_encoder_2" / "config.json"
    text = read_json(inside(folder, str(text_path.relative_to(folder)), folder)) if text_path.is_file() else {}
    scheduler_path = folder / "scheduler" / "scheduler_config.json"
    scheduler = read_json(inside(folder, "scheduler/scheduler_config.json", folder)) if scheduler_path.is_file() else {}
    second_path = folder / "text_encoder_2" / "config.json"
    second = read_json(inside(folder, "text_encoder_2/config.json", folder)) if second_path.is_file() else None
    index_path = folder / "model_index.json"
    index = read_json(inside(folder, "model_index.json", folder)) if index_path.is_file() else {}
    try:
        width = text.get("hidden_size") or text_width or unet.get("cross_attention_dim")
        pooled_dim = time_ids = None
        if second is not None:  # SDXL: both encoders' states side by side, the second's pooled projection
            pooled_dim = int(second["projection_dim"])
            width = unet["cross_attention_dim"]
            time_ids = (unet["projection_class_embeddings_input_dim"] - pooled_dim) // unet["addition_time_embed_dim"]
        factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
        config = ModelConfig(
            embedding_dim=int(width),
            latent_channels=int(vae_config.get("latent_channels", unet.get("in_channels", 4))),
            vae_scale_factor=factor,
            scaling_factor=float(vae_config.get("scaling_factor", 0.18215)),
            sample_size=int(unet["sample_size"]),
            max_token_length=int(text.get("max_position_embeddings", 77)),
            prediction_type=str(scheduler.get("prediction_type", "epsilon")),
            shift_factor=vae_config.get("shift_factor"),
            size_multiple=size_multiple(factor, unet),
            time_cond_proj_dim=unet.get("time_cond_proj_dim") or None,
            pooled_dim=pooled_dim,
            time_ids_count=time_ids,
            force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", False)),
            unet_in_channels=_inpainting_channels(unet, vae_config),
            vae_kind="tiny" if vae_config.get("_class_name") == "AutoencoderTiny" else "full",
            family="sdxl" if second is not None else "sd",
        )
        check_model_config(config)
    except ManifestError as exc:
        raise ManifestError(f"{folder}: {exc}") from None
    except (KeyError, TypeError, ValueError, ZeroDivisionError, OverflowError) as exc:
        raise ManifestError(f"{folder}: cannot read the model's sizes from its configs ({echo(exc)})") from None
    if guidance_scale is not None:
        config.guidance_scale = guidance_scale
    return config


def _transformer_model_config(folder: Path, vae: str) -> ModelConfig:
    """A transformer model's sizes and defaults, the family from model_index.json's pipeline class (else the
    transformer's class); each family's builder reads its own configs, checked here in one place."""
    transformer = read_json(inside(folder, "transformer/config.json", folder))
    vae_config = read_json(inside(folder, f"{vae}/config.json", folder))
    index = optional_json(folder, "model_index.json")
    family = PIPELINE_FAMILIES.get(index.get("_class_name")) or TRANSFORMER_FAMILIES.get(transformer.get("_class_name"))
    if family is None:
        raise ManifestError(f"{folder}: unsupported transformer {echo(transformer.get('_class_name'))}")
    from .configs_llm import llm_model_config  # Z-Image, FLUX.2 [klein]; imported here: it imports this module

    build = _sana_model_config if family in SANA_FAMILIES else _sd3_flux_model_config
    build = llm_model_config if family in LLM_FAMILIES else build
    try:
        config = build(folder, family, transformer, vae_config)
        check_model_config(config)
    except ManifestError as exc:
        raise ManifestError(f"{folder}: {exc}") from None
    except (KeyError, TypeError, ValueError, IndexError, ZeroDivisionError, OverflowError) as exc:
        raise ManifestError(f"{folder}: cannot read the model's sizes from its configs ({echo(exc)})") from None
    return config


def _sd3_flux_model_config(
    folder: Path, family: str, transformer: dict[str, Any], vae_config: dict[str, Any]
) -> ModelConfig:
    """SD3's and FLUX's: CLIP's token length, T5's from its tokenizer (zeros of CLIP's length without T5)."""
    clip = optional_json(folder, "text_encoder/config.json")
    t5 = "3" if family == "sd3" else "2"
    t5_tokenizer = optional_json(folder, f"tokenizer_{t5}/tokenizer_config.json")
    latent = int(vae_config.get("latent_channels", 16))
    factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    embeds = bool(transformer.get("guidance_embeds", False))
    if family == "sd3":
        patch, sample_size, channels = int(transformer["patch_size"]), int(transformer["sample_size"]), latent
        steps, guidance, sequence = SD3_STEPS, SD3_GUIDANCE, SD3_SEQUENCE
    else:
        patch, sample_size, channels = FLUX_PACKING, FLUX_SAMPLE_SIZE, latent * FLUX_PACKING**2
        steps = FLUX_DEV_STEPS if embeds else FLUX_SCHNELL_STEPS
        guidance, sequence = (FLUX_DEV_GUIDANCE if embeds else 0.0), FLUX_SEQUENCE
    # FLUX.1 Fill: each packed token also holds the masked image's latents and the mask's factor x factor pixels
    fill_channels = 2 * latent + factor**2 if family == "flux" else None
    fill = fill_channels is not None and transformer.get("in_channels") == fill_channels * FLUX_PACKING**2
    if fill:
        steps, guidance = FLUX_FILL_STEPS, FLUX_FILL_GUIDANCE
    elif transformer.get("in_channels") != channels:
        raise ManifestError(
            f"the transformer takes {echo(transformer.get('in_channels'))} channels, not the {channels} "
            f"that {latent}-channel latents make"
        )
    sequence = tokenizer_limited(sequence, t5_tokenizer)
    clip_length = int(clip.get("max_position_embeddings", 77))
    if not os.path.lexists(folder / f"text_encoder_{t5}"):  # SD3 without T5: diffusers' zeros of CLIP's length
        sequence = clip_length
    config = ModelConfig(
        embedding_dim=int(transformer["joint_attention_dim"]),
        latent_channels=latent,
        vae_scale_factor=factor,
        scaling_factor=float(vae_config.get("scaling_factor", 1.0)),
        sample_size=sample_size,
        max_token_length=clip_length,
        prediction_type="flow",
        shift_factor=vae_config.get("shift_factor"),
        guidance_scale=guidance,
        size_multiple=factor * patch,
        default_steps=steps,
        pooled_dim=int(transformer["pooled_projection_dim"]),
        family=family,
        max_sequence_length=sequence,
        patch_size=patch,
        guidance_embeds=embeds,
        unet_in_channels=fill_channels if fill else None,
    )
    return config


def _sana_model_config(folder: Path, family: str, transformer: dict[str, Any], vae: dict[str, Any]) -> ModelConfig:
    """SANA's and SANA-Sprint's sizes and defaults from `transformer/` and the DC-AE's config (its factor from the
    encoder's levels, as the pipelines compute vae_scale_factor); a transformer that embeds the guidance is
    Sprint's."""
    embeds = bool(transformer.get("guidance_embeds", False))
    family = "sana_sprint" if embeds else family
    latent = int(vae.get("latent_channels", 32))
    factor = 2 ** (len(vae["encoder_block_out_channels"]) - 1)
    patch = int(transformer.get("patch_size", 1))
    if transformer.get("in_channels") != latent:
        raise ManifestError(
            f"the transformer takes {echo(transformer.get('in_channels'))} channels, the DC-AE makes {latent}"
        )
    sprint = family == "sana_sprint"
    config = ModelConfig(
        embedding_dim=int(transformer["caption_channels"]),
        latent_channels=latent,
        vae_scale_factor=factor,
        scaling_factor=float(vae.get("scaling_factor", 1.0)),
        sample_size=int(transformer["sample_size"]),
        max_token_length=SANA_SEQUENCE,
        prediction_type="flow",
        guidance_scale=SANA_GUIDANCE,
        size_multiple=max(SANA_SIDES, factor * patch),
        default_steps=SANA_SPRINT_STEPS if sprint else SANA_STEPS,
        vae_kind="dc",
        family=family,
        max_sequence_length=SANA_SEQUENCE,
        patch_size=patch,
        guidance_embeds=embeds,
        timestep_scale=float(transformer.get("timestep_scale", 1.0)),
        guidance_embeds_scale=float(transformer.get("guidance_embeds_scale", 0.1)) if embeds else 1.0,
    )
    return config


def optional_json(folder: Path, rel: str) -> dict[str, Any]:
    """A config inside `folder` that may be absent: {} then."""
    return read_json(inside(folder, rel, folder)) if os.path.lexists(folder / rel) else {}


def tokenizer_limited(length: int, tokenizer_config: dict[str, Any]) -> int:
    """A pipeline's token length, cut to the tokenizer's `model_max_length` when that is a smaller positive int."""
    limit = tokenizer_config.get("model_max_length")
    if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
        return min(length, limit)
    return length


def _inpainting_channels(unet: dict[str, Any], vae: dict[str, Any]) -> int | None:
    """An inpainting UNet's input channels (latents + mask + masked image's latents); None for other UNets."""
    channels, latent = unet.get("in_channels"), vae.get("latent_channels", 4)
    return int(channels) if channels == 2 * latent + 1 else None
