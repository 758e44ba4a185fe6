"""Build diffusers Stable Diffusion pipelines with seeded random weights, entirely offline.

`tiny`, `tiny-sdxl`, `tiny-sdxl-refiner` and the transformer pipelines `tiny-sd3`, `tiny-sd35`, `tiny-flux` and
`tiny-flux-dev` are small enough for unit tests (seconds to build, export and run); `sd15`, `sd21` and `sdxl`
have those models' exact architectures (UNets of 860M, 866M and 2.6B parameters) for speed and memory
measurements. All use the real CLIP tokenizer (SD3's and FLUX's T5 a small offline one, see t5_vocab.py).

    python -m sd_onnx.models.build tiny <out>/tiny-sd
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

from .build_transformers import TRANSFORMER_PIPELINES
from .clip_vocab import write_clip_tokenizer_files

SD15_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}

TINY = {
    "text_encoder": {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2},
    "unet": {
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "sample_size": 16,
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "cross_attention_dim": 32,
        "attention_head_dim": 4,
        "norm_num_groups": 8,
    },
    "vae": {
        "block_out_channels": (16, 32),
        "down_block_types": ("DownEncoderBlock2D", "DownEncoderBlock2D"),
        "up_block_types": ("UpDecoderBlock2D", "UpDecoderBlock2D"),
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "sample_size": 32,
    },
}

SD15 = {
    "text_encoder": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12},
    "unet": {
        "block_out_channels": (320, 640, 1280, 1280),
        "layers_per_block": 2,
        "sample_size": 64,
        "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
        "norm_num_groups": 32,
    },
    "vae": {
        "block_out_channels": (128, 256, 512, 512),
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "sample_size": 512,
    },
}

# SDXL's layout at test size: two CLIP text encoders (the second with a projection, whose pooled output and
# the six size/crop "time ids" condition the UNet), per-block transformer depths, linear projections.
TINY_SDXL = {
    "text_encoder": {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 3},
    "text_encoder_2": {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 3,
                       "projection_dim": 32},
    "unet": {
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "sample_size": 16,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "cross_attention_dim": 64,
        "attention_head_dim": (2, 4),
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 8,
        "transformer_layers_per_block": (1, 2),
        "projection_class_embeddings_input_dim": 6 * 8 + 32,
        "norm_num_groups": 8,
    },
    "vae": {**TINY["vae"], "scaling_factor": 0.13025},
}  # fmt: skip

# CLIP's vocabulary and special ids unless a recipe names its own.
CLIP_TEXT_DEFAULTS = {
    "vocab_size": 49408,
    "max_position_embeddings": 77,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 1,
    "hidden_act": "quick_gelu",
}

# An SDXL refiner at test size: the second text encoder only, and an aesthetic score among 5 time ids.
TINY_SDXL_REFINER = {
    "text_encoder_2": TINY_SDXL["text_encoder_2"],
    "unet": {**TINY_SDXL["unet"], "cross_attention_dim": 32, "projection_class_embeddings_input_dim": 5 * 8 + 32},
    "vae": TINY_SDXL["vae"],
}

# SDXL base 1.0's published architecture (UNet 2.6B parameters, OpenCLIP bigG as the second encoder), for
# speed and memory measurements at 1024x1024.
SDXL = {
    "text_encoder": {**SD15["text_encoder"], "projection_dim": 768},
    "text_encoder_2": {"hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20,
                       "num_hidden_layers": 32, "projection_dim": 1280, "hidden_act": "gelu"},
    "unet": {
        "block_out_channels": (320, 640, 1280),
        "layers_per_block": 2,
        "sample_size": 128,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "cross_attention_dim": 2048,
        "attention_head_dim": (5, 10, 20),
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256,
        "transformer_layers_per_block": (1, 2, 10),
        "projection_class_embeddings_input_dim": 2816,
        "norm_num_groups": 32,
    },
    "vae": {**SD15["vae"], "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True},
}  # fmt: skip

# SD 2.1-base's architecture (OpenCLIP ViT-H text encoder padding with "!", linear projections, per-block
# head counts) at 512x512: what SD-Turbo distils, for the few-step rows of the benchmark.
SD21 = {
    "text_encoder": {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
                     "num_hidden_layers": 23, "hidden_act": "gelu"},
    "tokenizer": {"pad_token": "!"},
    "unet": {**SD15["unet"], "cross_attention_dim": 1024, "attention_head_dim": (5, 10, 20, 20),
             "use_linear_projection": True},
    "vae": SD15["vae"],
}  # fmt: skip

# SD 1.x and SDXL inpainting at test size: the UNet also takes the mask and the masked image's latents (4 + 1 + 4).
TINY_INPAINT = {**TINY, "unet": {**TINY["unet"], "in_channels": 9}, "pipeline": "StableDiffusionInpaintPipeline"}
TINY_SDXL_INPAINT = {
    **TINY_SDXL,
    "unet": {**TINY_SDXL["unet"], "in_channels": 9},
    "pipeline": "StableDiffusionXLInpaintPipeline",
}

# Transformer pipelines at test size (built by build_transformers.py). SD3: CLIP-L and CLIP-G with projections
# (their penultimate states side by side, padded to T5's width; their pooled projections concatenated), T5, an
# MMDiT over 2x2 patches of 16-channel latents; widths differ per encoder so that a mixed-up one shows.
TINY_T5 = {"d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4, "relative_attention_num_buckets": 8,
           "relative_attention_max_distance": 16, "feed_forward_proj": "gated-gelu"}  # fmt: skip
TINY_SD3 = {
    "pipeline": "StableDiffusion3Pipeline",
    "text_encoder": {**TINY["text_encoder"], "projection_dim": 32},
    "text_encoder_2": {"hidden_size": 48, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 3,
                       "projection_dim": 48},
    "text_encoder_3": {**TINY_T5, "d_model": 96},
    "transformer": {"sample_size": 32, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 2,
                    "attention_head_dim": 8, "num_attention_heads": 2, "joint_attention_dim": 96,
                    "caption_projection_dim": 16, "pooled_projection_dim": 32 + 48, "pos_embed_max_size": 64},
    "vae": {**TINY["vae"], "latent_channels": 16, "scaling_factor": 1.5305, "shift_factor": 0.0609,
            "use_quant_conv": False, "use_post_quant_conv": False},
    "scheduler": {"num_train_timesteps": 1000, "shift": 3.0},
}  # fmt: skip
# SD3.5's MMDiT: RMS-normed queries and keys, and a second (self-)attention in the first blocks (Medium).
TINY_SD35 = {**TINY_SD3, "transformer": {**TINY_SD3["transformer"], "qk_norm": "rms_norm",
                                         "dual_attention_layers": (0,)}}  # fmt: skip
# FLUX.1 schnell: CLIP-L's pooled output and T5's states condition a transformer over 2x2-packed 16-channel
# latents (64 features per token) with rotary positions from the token ids (axes_dims_rope sums to a head's
# width); its scheduler config is schnell's (fixed shift 1). Dev adds the distilled guidance embedding and
# resolution-dependent shifting.
TINY_FLUX = {
    "pipeline": "FluxPipeline",
    "text_encoder": TINY["text_encoder"],
    "text_encoder_2": {**TINY_T5, "d_model": 48},
    "transformer": {"patch_size": 1, "in_channels": 64, "num_layers": 1, "num_single_layers": 1,
                    "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 48,
                    "pooled_projection_dim": 32, "guidance_embeds": False, "axes_dims_rope": (4, 6, 6)},
    "vae": {**TINY["vae"], "latent_channels": 16, "scaling_factor": 0.3611, "shift_factor": 0.1159,
            "use_quant_conv": False, "use_post_quant_conv": False},
    "scheduler": {"num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False, "base_shift": 0.5,
                  "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096},
}  # fmt: skip
TINY_FLUX_DEV = {
    **TINY_FLUX,
    "transformer": {**TINY_FLUX["transformer"], "guidance_embeds": True},
    "scheduler": {**TINY_FLUX["scheduler"], "shift": 3.0, "use_dynamic_shifting": True},
}  # fmt: skip
# FLUX.1 Fill [dev]: dev whose transformer also takes the masked image's latents (16 channels) and the mask's
# factor x factor pixels per latent pixel (4 with this 2x VAE; 64 with FLUX's 8x), packed 2x2 like the latents.
TINY_FLUX_FILL = {
    **TINY_FLUX_DEV,
    "pipeline": "FluxFillPipeline",
    "transformer": {**TINY_FLUX_DEV["transformer"], "in_channels": (16 + 16 + 2 * 2) * 4, "out_channels": 64},
}  # fmt: skip

# Z-Image (Turbo) at test size: a Qwen3 text encoder (Z-Image conditions on its penultimate hidden states, the
# valid tokens of each prompt only), a single-stream DiT over 2x2 patches of 16-channel latents with 3-axis rotary
# positions (a head's width is the sum of axes_dims), FLUX.1's VAE layout and Z-Image-Turbo's published scheduler
# (fixed shift 3, no dynamic shifting).
TINY_QWEN3 = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 1024, "rope_theta": 1000000.0,
              "tie_word_embeddings": True}  # fmt: skip
TINY_Z_IMAGE = {
    "pipeline": "ZImagePipeline",
    "text_encoder": TINY_QWEN3,
    "transformer": {"all_patch_size": (2,), "all_f_patch_size": (1,), "in_channels": 16, "dim": 64, "n_layers": 2,
                    "n_refiner_layers": 1, "n_heads": 2, "n_kv_heads": 2, "cap_feat_dim": 32,
                    "axes_dims": (8, 12, 12), "axes_lens": (1024, 512, 512)},
    "vae": TINY_FLUX["vae"],
    "scheduler": {"num_train_timesteps": 1000, "use_dynamic_shifting": False, "shift": 3.0},
}  # fmt: skip
# FLUX.2 [klein] at test size: a Qwen3 causal LM deep enough for the three layers the pipeline stacks (9, 18, 27), a
# FLUX.2 transformer over 2x2-patchified 32-channel latents (128 features per token, 4-axis rotary positions
# summing to a head's width), AutoencoderKLFlux2 (its batch-norm statistics randomized in the builder, so that
# un-normalizing the latents shows) and FLUX.2's dynamically shifted scheduler. The base model (not distilled):
# classifier-free guidance above 1.
TINY_FLUX2_KLEIN = {
    "pipeline": "Flux2KleinPipeline",
    "is_distilled": False,
    "text_encoder": {**TINY_QWEN3, "num_hidden_layers": 27},
    "transformer": {"patch_size": 1, "in_channels": 128, "num_layers": 1, "num_single_layers": 1,
                    "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 3 * 32,
                    "axes_dims_rope": (4, 4, 4, 4), "guidance_embeds": False},
    "vae": {"block_out_channels": (16, 32), "down_block_types": ("DownEncoderBlock2D",) * 2,
            "up_block_types": ("UpDecoderBlock2D",) * 2, "layers_per_block": 1, "latent_channels": 32,
            "norm_num_groups": 8, "sample_size": 32},
    "scheduler": {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5,
                  "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096},
}  # fmt: skip

# SANA and SANA-Sprint at test size (built by build_transformers.py): a tiny Gemma-2 (Gemma's layout: grouped
# key/value heads, soft-capped attention; a small offline tokenizer, see gemma_vocab.py) whose states condition a
# linear-attention DiT on 32-channel DC-AE latents (3 levels: 4x down-sampling, the last one attention), sampled
# by SANA's published scheduler, DPM-Solver in flow mode (flow_shift 3). Sprint adds the guidance embedding and
# RMS-normed queries and keys, and samples with sCM (TrigFlow).
TINY_GEMMA2 = {"vocab_size": 1024, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
               "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
               "query_pre_attn_scalar": 16}  # fmt: skip
TINY_DC_AE = {"latent_channels": 32, "attention_head_dim": 8, "scaling_factor": 0.41407,
              "encoder_block_types": ("ResBlock", "ResBlock", "EfficientViTBlock"),
              "decoder_block_types": ("ResBlock", "ResBlock", "EfficientViTBlock"),
              "encoder_block_out_channels": (16, 32, 32), "decoder_block_out_channels": (16, 32, 32),
              "encoder_layers_per_block": (1, 1, 1), "decoder_layers_per_block": (1, 1, 1),
              "encoder_qkv_multiscales": ((), (), (5,)), "decoder_qkv_multiscales": ((), (), (5,)),
              "downsample_block_type": "conv", "upsample_block_type": "interpolate"}  # fmt: skip
TINY_SANA = {
    "pipeline": "SanaPipeline",
    "text_encoder": TINY_GEMMA2,
    "transformer": {"in_channels": 32, "out_channels": 32, "num_attention_heads": 2, "attention_head_dim": 8,
                    "num_layers": 2, "num_cross_attention_heads": 2, "cross_attention_head_dim": 8,
                    "cross_attention_dim": 16, "caption_channels": 32, "sample_size": 8, "patch_size": 1},
    "vae": TINY_DC_AE,
    "scheduler": {"_class_name": "DPMSolverMultistepScheduler", "num_train_timesteps": 1000, "use_flow_sigmas": True,
                  "flow_shift": 3.0, "prediction_type": "flow_prediction", "algorithm_type": "dpmsolver++",
                  "solver_order": 2},
}  # fmt: skip
TINY_SANA_SPRINT = {
    **TINY_SANA,
    "pipeline": "SanaSprintPipeline",
    "transformer": {**TINY_SANA["transformer"], "guidance_embeds": True, "qk_norm": "rms_norm_across_heads"},
    "scheduler": {"_class_name": "SCMScheduler", "num_train_timesteps": 1000, "prediction_type": "trigflow",
                  "sigma_data": 0.5},
}  # fmt: skip

RECIPES = {
    "tiny": TINY,
    "sd15": SD15,
    "sd21": SD21,
    "sdxl": SDXL,
    "tiny-sdxl": TINY_SDXL,
    "tiny-sdxl-refiner": TINY_SDXL_REFINER,
    "tiny-inpaint": TINY_INPAINT,
    "tiny-sdxl-inpaint": TINY_SDXL_INPAINT,
    "tiny-sd3": TINY_SD3,
    "tiny-sd35": TINY_SD35,
    "tiny-flux": TINY_FLUX,
    "tiny-flux-dev": TINY_FLUX_DEV,
    "tiny-flux-fill": TINY_FLUX_FILL,
    "tiny-z-image": TINY_Z_IMAGE,
    "tiny-flux2-klein": TINY_FLUX2_KLEIN,
    "tiny-sana": TINY_SANA,
    "tiny-sana-sprint": TINY_SANA_SPRINT,
}


def build_pipeline(recipe: dict[str, dict[str, Any]], out: Path, seed: int = 0) -> Path:
    """Write a diffusers pipeline folder (SDXL when the recipe has a second text encoder) with the recipe's
    sizes and seeded random weights."""
    import torch

    torch.manual_seed(seed)
    if recipe.get("pipeline") in TRANSFORMER_PIPELINES:  # SD3 and FLUX: a transformer instead of a UNet
        from .build_transformers import save_transformer_pipeline

        return save_transformer_pipeline(recipe, Path(out))
    if "text_encoder_2" in recipe:  # SDXL: a base with both encoders, a refiner with the second only
        return save_sdxl_pipeline(recipe, Path(out))
    return save_pipeline(
        *create_modules(recipe),
        Path(out),
        tokenizer_options=recipe.get("tokenizer", {}),
        pipeline_class=recipe.get("pipeline", "StableDiffusionPipeline"),
    )


def save_sdxl_pipeline(recipe: dict[str, dict[str, Any]], out: Path) -> Path:
    """A diffusers SDXL pipeline folder from the recipe, initialised from torch's random state: a
    StableDiffusionXLPipeline, or a StableDiffusionXLImg2ImgPipeline refiner when the recipe has no first
    text encoder."""
    import diffusers
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    refiner = "text_encoder" not in recipe
    first = None if refiner else CLIPTextModel(_clip_config(recipe["text_encoder"]))
    second = CLIPTextModelWithProjection(_clip_config(recipe["text_encoder_2"]))
    unet = UNet2DConditionModel(**{"in_channels": 4, "out_channels": 4, **recipe["unet"]})
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, **recipe["vae"])
    scheduler = EulerDiscreteScheduler.from_config({**SD15_SCHEDULER, "timestep_spacing": "leading"})
    tokenizer = clip_tokenizer(out / "_tokenizer_src")
    tokenizer_2 = type(tokenizer).from_pretrained(out / "_tokenizer_src", pad_token="!")  # SDXL's second pads with !
    modules = {"vae": vae, "text_encoder_2": second, "tokenizer_2": tokenizer_2, "unet": unet, "scheduler": scheduler}
    if refiner:
        pipe = StableDiffusionXLImg2ImgPipeline(
            **modules, text_encoder=None, tokenizer=None, requires_aesthetics_score=True,
            force_zeros_for_empty_prompt=False,
        )  # fmt: skip
    else:
        pipeline_class = getattr(diffusers, recipe.get("pipeline", "StableDiffusionXLPipeline"))
        pipe = pipeline_class(**modules, text_encoder=first, tokenizer=tokenizer)
    pipe.save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer", "tokenizer_2"):  # slow-tokenizer files for transformers 4.x (Optimum's pin)
        if (out / name).is_dir():
            for file in ("vocab.json", "merges.txt"):
                shutil.copy2(out / "_tokenizer_src" / file, out / name / file)
    shutil.rmtree(out / "_tokenizer_src")
    for name in ("text_encoder", "text_encoder_2"):
        for weights in sorted((out / name).glob("*.safetensors")) if (out / name).is_dir() else ():
            _nest_clip_weights(weights)
    return out


def _clip_config(text_encoder: dict[str, Any]) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(**{**CLIP_TEXT_DEFAULTS, "projection_dim": text_encoder["hidden_size"], **text_encoder})


def create_modules(recipe: dict[str, dict[str, Any]]) -> tuple[Any, Any, Any]:
    """(text_encoder, unet, vae) with the recipe's sizes, initialised from torch's current random state."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    text_encoder = CLIPTextModel(_clip_config(recipe["text_encoder"]))
    unet = UNet2DConditionModel(**{"in_channels": 4, "out_channels": 4, **recipe["unet"]})
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, **recipe["vae"])
    return text_encoder, unet, vae


def clip_tokenizer(folder: Path, **options: Any) -> Any:
    """transformers' CLIPTokenizer on the real CLIP vocabulary, its files written to `folder` (`options` such as
    OpenCLIP's `pad_token="!"` go to from_pretrained)."""
    from transformers import CLIPTokenizer

    write_clip_tokenizer_files(folder)
    return CLIPTokenizer.from_pretrained(folder, **options)


def save_pipeline(
    text_encoder: Any,
    unet: Any,
    vae: Any,
    out: Path,
    scheduler: Any = None,
    tokenizer: Any = None,
    tokenizer_options: dict[str, Any] | None = None,
    pipeline_class: str = "StableDiffusionPipeline",
) -> Path:
    """Save the modules as a diffusers pipeline folder (`pipeline_class`) that transformers 4.x and 5.x both read;
    the scheduler is SD 1.5's PNDM unless the model was trained for another, the tokenizer CLIP's unless given."""
    import diffusers

    own_tokenizer = tokenizer is not None
    tokenizer = tokenizer if own_tokenizer else clip_tokenizer(out / "_tokenizer_src", **(tokenizer_options or {}))
    pipe = getattr(diffusers, pipeline_class)(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler or diffusers.PNDMScheduler(**SD15_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    if not own_tokenizer:
        # Keep the slow-tokenizer files too: transformers 4.x (which Optimum pins) cannot read tokenizer.json alone.
        for name in ("vocab.json", "merges.txt"):
            (out / "_tokenizer_src" / name).replace(out / "tokenizer" / name)
        shutil.rmtree(out / "_tokenizer_src")
    _nest_clip_weights(out / "text_encoder" / "model.safetensors")
    return out


def _nest_clip_weights(path: Path) -> None:
    """Store CLIP's weights under `text_model.`, the layout every transformers version reads
    (transformers >= 5.6 writes them flat, which 4.x, and so Optimum, silently fails to load)."""
    from safetensors.torch import load_file, save_file

    state = load_file(path)
    nested = {
        k if k.startswith(("text_model.", "text_projection.")) else f"text_model.{k}": v for k, v in state.items()
    }
    save_file(nested, path, metadata={"format": "pt"})
    index = path.parent / "model.safetensors.index.json"
    if index.is_file():  # a sharded checkpoint names every weight's shard
        content = json.loads(index.read_text())
        content["weight_map"] = {
            k if k.startswith(("text_model.", "text_projection.")) else f"text_model.{k}": v
            for k, v in content["weight_map"].items()
        }
        index.write_text(json.dumps(content, indent=2))


def build_tiny_pipeline(out: Path, seed: int = 0) -> Path:
    """Tiny SD-architecture pipeline for tests: 2 UNet levels, 32-wide CLIP, seconds to build."""
    return build_pipeline(TINY, out, seed)


def build_sd15_pipeline(out: Path, seed: int = 0) -> Path:
    """Full-size SD 1.5 architecture (UNet 860M parameters) with random weights, for benchmarks."""
    return build_pipeline(SD15, out, seed)


def build_tiny_autoencoder(out: Path, seed: int = 0) -> Path:
    """TAESD's architecture (diffusers' AutoencoderTiny defaults: 4 latent channels at 1/8 scale, for SD 1.x
    and 2.x) with seeded random weights, for the tiny-autoencoder benchmark rows."""
    import torch
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    AutoencoderTiny().save_pretrained(out)
    return out


def build_controlnet(pipeline: Path, out: Path, seed: int = 0, conditioning_channels: int = 3) -> Path:
    """A ControlNet for the UNet of the diffusers folder `pipeline` (diffusers' ControlNetModel.from_unet: its
    sizes), every weight seeded random, the zero convolutions too: a trained ControlNet's residuals are not zero,
    and parity tests must see them."""
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(pipeline / "unet")
    vae_levels = len(json.loads((pipeline / "vae" / "config.json").read_text())["block_out_channels"])
    embedding = (16, 32, 96, 256)[:vae_levels]  # one stride-2 step per VAE level but the first: pixels -> latents
    controlnet = ControlNetModel.from_unet(
        unet, conditioning_channels=conditioning_channels, conditioning_embedding_out_channels=embedding
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in controlnet.named_parameters():  # the zero convolutions' outputs made to count
            zero_conv = name.startswith(("controlnet_down_blocks", "controlnet_mid_block")) and parameter.dim() == 4
            std = 2 / parameter.shape[1] ** 0.5 if zero_conv else 0.05  # residuals of about the features' size
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    controlnet.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    """`python -m sd_onnx.models.build RECIPE OUT [SEED]` (RECIPE: one of RECIPES)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2 or args[0] not in RECIPES:
        raise SystemExit(f"usage: python -m sd_onnx.models.build {{{'|'.join(RECIPES)}}} OUT [SEED]")
    seed = int(args[2]) if len(args) > 2 else 0
    print(build_pipeline(RECIPES[args[0]], Path(args[1]), seed))


if __name__ == "__main__":
    main()
