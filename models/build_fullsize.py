"""Full-size transformer pipelines (the real architectures' configs) with seeded random weights, built one
component at a time in bf16, for speed and memory measurements.

build_transformers.py builds a whole pipeline object and saves it; at full size that holds every component at
once (SD3.5 Medium's are 8 B parameters, 16 GB in bf16), so here each component is created, saved with
`save_pretrained` and freed before the next, and `model_index.json` is written from what was saved. Tokenizers
are the small offline ones of the tiny recipes (their ids are a subset of the real vocabularies, which the
encoders keep at full size: the embedding tables weigh what the real ones do).

    python -m sd_onnx.models.build_fullsize sana-sprint-0.6b OUT [--layers N]
"""

from __future__ import annotations

import argparse
import gc
import json
from pathlib import Path
from typing import Any

# Gemma-2 2B (SANA's text encoder): transformers' Gemma2Config defaults are that model.
GEMMA2_2B: dict[str, Any] = {}
# Qwen3-4B (the text encoder of FLUX.2 [klein] 4B and of Z-Image).
QWEN3_4B = {"vocab_size": 151936, "hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36,
            "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 40960,
            "rope_theta": 1000000.0, "tie_word_embeddings": True}  # fmt: skip
T5_XXL = {"d_model": 4096, "d_ff": 10240, "num_layers": 24, "num_heads": 64, "d_kv": 64, "vocab_size": 32128,
          "feed_forward_proj": "gated-gelu", "is_encoder_decoder": False}  # fmt: skip
CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
          "projection_dim": 768, "hidden_act": "quick_gelu"}  # fmt: skip
CLIP_G = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
          "projection_dim": 1280, "hidden_act": "gelu"}  # fmt: skip
FLOW_VAE = {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "latent_channels": 16,
            "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
            "use_quant_conv": False, "use_post_quant_conv": False, "sample_size": 1024}  # fmt: skip
DYNAMIC_SHIFT = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5,
                 "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}  # fmt: skip

# Each model: its pipeline class, components (library, class, constructor arguments), the scheduler, and what
# its card recommends (steps, guidance, size). `depth` names the arguments that --layers shrinks.
MODELS: dict[str, dict[str, Any]] = {
    "sana-sprint-0.6b": {
        "pipeline": "SanaSprintPipeline",
        "components": {
            "text_encoder": ("transformers", "Gemma2Model", GEMMA2_2B),
            "transformer": ("diffusers", "SanaTransformer2DModel", {
                "in_channels": 32, "out_channels": 32, "num_attention_heads": 36, "attention_head_dim": 32,
                "num_layers": 28, "num_cross_attention_heads": 16, "cross_attention_head_dim": 72,
                "cross_attention_dim": 1152, "caption_channels": 2304, "sample_size": 32, "patch_size": 1,
                "guidance_embeds": True, "qk_norm": "rms_norm_across_heads", "timestep_scale": 1000.0}),
            "vae": ("diffusers", "AutoencoderDC", {
                "latent_channels": 32, "scaling_factor": 0.41407, "upsample_block_type": "interpolate",
                "downsample_block_type": "Conv",
                "encoder_block_types": ("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
                "decoder_block_types": ("ResBlock",) * 3 + ("EfficientViTBlock",) * 3}),
        },
        "tokenizer": ("gemma", "tokenizer"),
        "scheduler": ("SCMScheduler", {"num_train_timesteps": 1000, "prediction_type": "trigflow", "sigma_data": 0.5}),
        "card": {"steps": 2, "guidance": 4.5, "size": 1024},
        "depth": {"text_encoder": "num_hidden_layers", "transformer": "num_layers"},
    },
    "sd35-medium": {
        "pipeline": "StableDiffusion3Pipeline",
        "components": {
            "text_encoder": ("transformers", "CLIPTextModelWithProjection", CLIP_L),
            "text_encoder_2": ("transformers", "CLIPTextModelWithProjection", CLIP_G),
            "text_encoder_3": ("transformers", "T5EncoderModel", T5_XXL),
            "transformer": ("diffusers", "SD3Transformer2DModel", {
                "num_layers": 24, "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096,
                "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "out_channels": 16,
                "pos_embed_max_size": 384, "dual_attention_layers": tuple(range(13)), "qk_norm": "rms_norm",
                "sample_size": 128, "patch_size": 2, "in_channels": 16}),
            "vae": ("diffusers", "AutoencoderKL", {**FLOW_VAE, "scaling_factor": 1.5305, "shift_factor": 0.0609}),
        },
        "tokenizer": ("clip", "tokenizer", "tokenizer_2", ("t5", "tokenizer_3")),
        "scheduler": ("FlowMatchEulerDiscreteScheduler", {"num_train_timesteps": 1000, "shift": 3.0}),
        "card": {"steps": 40, "guidance": 4.5, "size": 1024},
        "depth": {"text_encoder_2": "num_hidden_layers", "text_encoder_3": "num_layers", "transformer": "num_layers"},
    },
    "flux2-klein-4b": {
        "pipeline": "Flux2KleinPipeline",
        "options": {"is_distilled": True},
        "components": {
            "text_encoder": ("transformers", "Qwen3ForCausalLM", QWEN3_4B),
            "transformer": ("diffusers", "Flux2Transformer2DModel", {
                "patch_size": 1, "in_channels": 128, "num_layers": 5, "num_single_layers": 20,
                "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 3 * 2560,
                "guidance_embeds": False}),
            "vae": ("diffusers", "AutoencoderKLFlux2", {}),
        },
        "tokenizer": ("qwen", "tokenizer"),
        "scheduler": ("FlowMatchEulerDiscreteScheduler", DYNAMIC_SHIFT),
        "card": {"steps": 4, "guidance": 1.0, "size": 1024},
        "depth": {"text_encoder": "num_hidden_layers", "transformer": "num_single_layers"},
    },
    "z-image-turbo": {
        "pipeline": "ZImagePipeline",
        "components": {
            "text_encoder": ("transformers", "Qwen3Model", QWEN3_4B),
            "transformer": ("diffusers", "ZImageTransformer2DModel", {}),
            "vae": ("diffusers", "AutoencoderKL", {**FLOW_VAE, "scaling_factor": 0.3611, "shift_factor": 0.1159}),
        },
        "tokenizer": ("qwen", "tokenizer"),
        "scheduler": ("FlowMatchEulerDiscreteScheduler",
                      {"num_train_timesteps": 1000, "use_dynamic_shifting": False, "shift": 3.0}),
        "card": {"steps": 9, "guidance": 0.0, "size": 1024},
        "depth": {"text_encoder": "num_hidden_layers", "transformer": "n_layers"},
    },
}  # fmt: skip


def build_fullsize(name: str, out: Path, layers: int | None = None, seed: int = 0) -> Path:
    """Write model `name`'s diffusers folder to `out`, one component at a time in bf16 (the dtype the real
    checkpoints ship in). `layers` builds the same widths with that many blocks (a quick trial of the path)."""
    import torch

    model = MODELS[name]
    out.mkdir(parents=True, exist_ok=True)
    index: dict[str, Any] = {"_class_name": model["pipeline"], **model.get("options", {})}
    for component, (library, cls, arguments) in model["components"].items():
        torch.manual_seed(seed)
        depth = model["depth"].get(component)
        arguments = {**arguments, **({depth: layers} if layers and depth else {})}
        if component == "text_encoder" and model["pipeline"] == "Flux2KleinPipeline" and layers:
            arguments["num_hidden_layers"] = max(layers, 28)  # klein stacks layers 9, 18 and 27
        _save_module(_create(library, cls, arguments), out / component)
        index[component] = [library, cls]
        gc.collect()
    index.update(_save_tokenizers(model["tokenizer"], out))
    scheduler_class, scheduler_config = model["scheduler"]
    import diffusers

    getattr(diffusers, scheduler_class)(**scheduler_config).save_pretrained(out / "scheduler")
    index["scheduler"] = ["diffusers", scheduler_class]
    index["_diffusers_version"] = diffusers.__version__
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out


def _create(library: str, cls: str, arguments: dict[str, Any]) -> Any:
    """The module with random weights, created directly in bf16 (never materialized in fp32)."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        if library == "diffusers":
            import diffusers

            return getattr(diffusers, cls)(**arguments).to(torch.bfloat16)
        import transformers

        config_class = getattr(transformers, cls).config_class
        return getattr(transformers, cls)(config_class(**arguments)).to(torch.bfloat16)
    finally:
        torch.set_default_dtype(previous)


def _save_module(module: Any, folder: Path) -> None:
    module.save_pretrained(folder, safe_serialization=True)
    if module.__class__.__name__.startswith("CLIP"):  # the layout the runtime's CLIP loader reads
        from .build import _nest_clip_weights

        for weights in sorted(folder.glob("*.safetensors")):
            _nest_clip_weights(weights)


def _save_tokenizers(spec: tuple[Any, ...], out: Path) -> dict[str, list[str]]:
    """The tiny recipes' offline tokenizers under the folder names `spec` gives: ("clip", name, ...) CLIP's,
    ("t5", name) T5's, ("gemma", name) and ("qwen", name) the LLMs'."""
    index: dict[str, list[str]] = {}
    kind, *names = spec
    for name in names:
        if isinstance(name, tuple):
            index.update(_save_tokenizers(name, out))
            continue
        tokenizer = _tokenizer(kind, name, out)
        tokenizer.save_pretrained(out / name)
        cls = "T5TokenizerFast" if kind == "t5" else type(tokenizer).__name__  # as the published folders name it
        index[name] = ["transformers", cls]
    return index


def _tokenizer(kind: str, name: str, out: Path) -> Any:
    if kind == "clip":
        import shutil

        from .build import clip_tokenizer

        tokenizer = clip_tokenizer(out / "_tokenizer_src", **({"pad_token": "!"} if name == "tokenizer_2" else {}))
        (out / name).mkdir(parents=True, exist_ok=True)
        for file in ("vocab.json", "merges.txt"):
            shutil.copy2(out / "_tokenizer_src" / file, out / name / file)
        shutil.rmtree(out / "_tokenizer_src")
        return tokenizer
    if kind == "t5":
        from .t5_vocab import t5_tokenizer

        return t5_tokenizer()
    if kind == "gemma":
        from .gemma_vocab import gemma_tokenizer

        return gemma_tokenizer()
    from .qwen_vocab import qwen_tokenizer

    return qwen_tokenizer()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=sorted(MODELS))
    parser.add_argument("out", type=Path)
    parser.add_argument("--layers", type=int, default=None, help="Blocks per stack (default: the real model's).")
    args = parser.parse_args()
    print(build_fullsize(args.model, args.out, args.layers))


if __name__ == "__main__":
    main()
