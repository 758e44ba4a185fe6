"""Sizes and defaults of the transformer families conditioned on an LLM (Qwen3) alone: Z-Image (Turbo) and
FLUX.2 [klein], from a folder's `transformer/`, VAE, `text_encoder/` and tokenizer configs (JSON only, no torch).
configs.py's reader hands these families here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .echo import echo
from .files import inside
from .manifest import ManifestError, ModelConfig, read_json
from .manifest_schema import check_model_config

# ZImagePipeline: 1024x1024 unless told (no default_sample_size), 512 Qwen tokens. Its call defaults (50 steps, CFG
# 5) are the base model's; the published Z-Image-Turbo is run at 9 steps without guidance (its model card), and
# nothing in its configs tells it from the base model: the Turbo's are recorded (sd-export convert
# --default-steps/--guidance-scale record others).
Z_IMAGE_SIDE, Z_IMAGE_SEQUENCE, Z_IMAGE_STEPS, Z_IMAGE_GUIDANCE = 1024, 512, 9, 0.0


def llm_model_config(folder: Path, family: str, transformer: dict[str, Any], vae: dict[str, Any]) -> ModelConfig:
    """The ModelConfig of a Z-Image or FLUX.2 [klein] folder."""
    tokenizer = _optional_json(folder, "tokenizer/tokenizer_config.json")
    try:
        latent = int(vae.get("latent_channels", 16))
        factor = 2 ** (len(vae["block_out_channels"]) - 1)
        patch = int(transformer.get("all_patch_size", (2,))[0])
        if transformer.get("in_channels") != latent:
            raise ManifestError(
                f"the transformer takes {echo(transformer.get('in_channels'))} channels, the VAE makes {latent}"
            )
        sequence = Z_IMAGE_SEQUENCE
        limit = tokenizer.get("model_max_length")
        if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
            sequence = min(sequence, limit)
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
        check_model_config(config)
    except ManifestError as exc:
        raise ManifestError(f"{folder}: {exc}") from None
    except (KeyError, TypeError, ValueError, IndexError, ZeroDivisionError, OverflowError) as exc:
        raise ManifestError(f"{folder}: cannot read the model's sizes from its configs ({echo(exc)})") from None
    return config


def _optional_json(folder: Path, rel: str) -> dict[str, Any]:
    path = Path(folder) / rel
    return read_json(inside(folder, rel, folder)) if path.exists() else {}
