"""Sizes and defaults of the transformer families conditioned on an LLM (Qwen3) alone: Z-Image (Turbo) and
FLUX.2 [klein], from a folder's `transformer/`, VAE, `text_encoder/` and tokenizer configs (JSON only, no torch).
configs.py's reader hands these families here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .configs import optional_json, tokenizer_limited
from .echo import echo
from .manifest import ManifestError, ModelConfig

# ZImagePipeline: 1024x1024 unless told (no default_sample_size), 512 Qwen tokens. Its call defaults (50 steps, CFG
# 5) are the base model's; the published Z-Image-Turbo is run at 9 steps without guidance (its model card), and
# nothing in its configs tells it from the base model: the Turbo's are recorded (sd-export convert
# --default-steps/--guidance-scale record others).
Z_IMAGE_SIDE, Z_IMAGE_SEQUENCE, Z_IMAGE_STEPS, Z_IMAGE_GUIDANCE = 1024, 512, 9, 0.0
# Flux2KleinPipeline: default_sample_size 128 (1024 px with the 8x VAE), 512 Qwen tokens; 50 steps at CFG 4 for the
# base models, 4 steps without guidance (1.0) for the step-distilled ones (model_index.json's is_distilled, as the
# published FLUX.2 [klein] 4B/9B model cards run them).
FLUX2_SAMPLE_SIZE, FLUX2_SEQUENCE = 128, 512
FLUX2_STEPS, FLUX2_GUIDANCE, FLUX2_DISTILLED_STEPS, FLUX2_DISTILLED_GUIDANCE = 50, 4.0, 4, 1.0
FLUX2_PATCH = 2  # the pipeline patchifies 2x2 latent pixels into channels before the transformer


def llm_model_config(folder: Path, family: str, transformer: dict[str, Any], vae: dict[str, Any]) -> ModelConfig:
    """The ModelConfig of a Z-Image or FLUX.2 [klein] folder (configs.py checks it and names the folder in errors)."""
    if family == "flux2":
        return _flux2_config(folder, transformer, vae)
    tokenizer = optional_json(folder, "tokenizer/tokenizer_config.json")
    latent = int(vae.get("latent_channels", 16))
    factor = 2 ** (len(vae["block_out_channels"]) - 1)
    patch = int(transformer.get("all_patch_size", (2,))[0])
    if transformer.get("in_channels") != latent:
        raise ManifestError(
            f"the transformer takes {echo(transformer.get('in_channels'))} channels, the VAE makes {latent}"
        )
    sequence = tokenizer_limited(Z_IMAGE_SEQUENCE, tokenizer)
    config = ModelConfig(
        embedding_dim=int(transformer["cap_feat_dim"]),
        latent_channels=latent,
        vae_scale_factor=factor,
        scaling_factor=float(vae.get("scaling_factor", 1.0)),
        sample_size=Z_IMAGE_SIDE // factor,
        max_token_length=sequence,
        prediction_type="flow",
        shift_factor=vae.get("shift_factor"),
        guidance_scale=Z_IMAGE_GUIDANCE,
        size_multiple=factor * patch,
        default_steps=Z_IMAGE_STEPS,
        family=family,
        max_sequence_length=sequence,
        patch_size=patch,
    )
    return config


def _flux2_config(folder: Path, transformer: dict[str, Any], vae: dict[str, Any]) -> ModelConfig:
    """FLUX.2 [klein]: its latents are the VAE's patchified 2x2 into channels (4 x latent_channels) and
    normalized by the VAE's batch-norm statistics, so `latent_channels` and `vae_scale_factor` are those of the
    latents the sampler sees (the vae_decoder graph un-normalizes and unpatchifies them); one token per latent pixel
    (patch_size 1)."""
    tokenizer = optional_json(folder, "tokenizer/tokenizer_config.json")
    index = optional_json(folder, "model_index.json")
    distilled = bool(index.get("is_distilled", False))
    patch = tuple(vae.get("patch_size", (FLUX2_PATCH, FLUX2_PATCH)))
    if patch != (FLUX2_PATCH, FLUX2_PATCH):
        raise ManifestError(f"the VAE patchifies {echo(list(patch))}, the pipeline 2x2")
    channels = int(vae.get("latent_channels", 32)) * FLUX2_PATCH**2
    if transformer.get("in_channels") != channels or transformer.get("patch_size", 1) != 1:
        raise ManifestError(
            f"the transformer takes {echo(transformer.get('in_channels'))} channels in patches of "
            f"{echo(transformer.get('patch_size'))}, not the {channels} of the VAE's patchified latents one by one"
        )
    if transformer.get("guidance_embeds"):
        raise ManifestError("the transformer embeds a guidance scale, which Flux2KleinPipeline does not give")
    factor = 2 ** (len(vae["block_out_channels"]) - 1) * FLUX2_PATCH
    sequence = tokenizer_limited(FLUX2_SEQUENCE, tokenizer)
    config = ModelConfig(
        embedding_dim=int(transformer["joint_attention_dim"]),
        latent_channels=channels,
        vae_scale_factor=factor,
        scaling_factor=1.0,
        sample_size=FLUX2_SAMPLE_SIZE // FLUX2_PATCH,
        max_token_length=sequence,
        prediction_type="flow",
        guidance_scale=FLUX2_DISTILLED_GUIDANCE if distilled else FLUX2_GUIDANCE,
        size_multiple=factor,
        default_steps=FLUX2_DISTILLED_STEPS if distilled else FLUX2_STEPS,
        family="flux2",
        max_sequence_length=sequence,
        patch_size=1,
    )
    return config
