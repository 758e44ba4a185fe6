"""Read a model folder's own component configs into `ModelConfig`: the one reader, for the exporter (diffusers
folders: `vae/`) and the runtime (ONNX folders without a manifest: `vae_decoder/`). JSON only, no torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .echo import echo
from .files import inside
from .manifest import ManifestError, ModelConfig, read_json
from .manifest_schema import check_model_config

__all__ = ["read_json", "read_model_config", "size_multiple"]


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
    """Sizes, token length and prediction type from `text_encoder/`, `unet/`, `<vae>/` and `scheduler/` configs.

    `text_width` stands in for the text encoder's hidden size where its config is missing (some ONNX
    folders); the UNet's `cross_attention_dim` is the next fallback."""
    folder = Path(folder)
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
        )
        check_model_config(config)
    except ManifestError as exc:
        raise ManifestError(f"{folder}: {exc}") from None
    except (KeyError, TypeError, ValueError, ZeroDivisionError, OverflowError) as exc:
        raise ManifestError(f"{folder}: cannot read the model's sizes from its configs ({echo(exc)})") from None
    if guidance_scale is not None:
        config.guidance_scale = guidance_scale
    return config


def _inpainting_channels(unet: dict[str, Any], vae: dict[str, Any]) -> int | None:
    """An inpainting UNet's input channels (latents + mask + masked image's latents); None for other UNets."""
    channels, latent = unet.get("in_channels"), vae.get("latent_channels", 4)
    return int(channels) if channels == 2 * latent + 1 else None
