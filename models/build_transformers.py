"""Build diffusers' transformer pipelines (Stable Diffusion 3/3.5, FLUX.1, SANA and SANA-Sprint) with seeded random
weights, offline.

Like build.py's UNet pipelines: the recipe gives each component's constructor arguments (recipes live in
build.py's RECIPES); CLIP tokenizers use the real CLIP vocabulary, the T5 tokenizer is t5_vocab.py's small
Unigram one and SANA's Gemma tokenizer gemma_vocab.py's small BPE one, each sized to its encoder's vocabulary.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

TRANSFORMER_PIPELINES = (
    "StableDiffusion3Pipeline",
    "FluxPipeline",
    "FluxFillPipeline",
    "ZImagePipeline",
    "Flux2KleinPipeline",
)
# Pipelines conditioned on an LLM (Qwen3) alone: one text encoder, its tokenizer a Qwen2 one (qwen_vocab.py).
LLM_PIPELINES = ("ZImagePipeline", "Flux2KleinPipeline")
# SANA and SANA-Sprint: Gemma-2, a linear-attention DiT and a DC-AE (save_sana_pipeline).
SANA_PIPELINES = ("SanaPipeline", "SanaSprintPipeline")
TRANSFORMER_PIPELINES = (*TRANSFORMER_PIPELINES, *SANA_PIPELINES)


def save_transformer_pipeline(recipe: dict[str, Any], out: Path) -> Path:
    """A StableDiffusion3Pipeline (CLIP-L and CLIP-G with projections, T5, SD3Transformer2DModel) or FluxPipeline
    (CLIP-L, T5, FluxTransformer2DModel) folder from the recipe, initialised from torch's random state."""
    if recipe["pipeline"] in LLM_PIPELINES:
        return save_llm_pipeline(recipe, out)
    if recipe["pipeline"] in SANA_PIPELINES:
        return save_sana_pipeline(recipe, out)
    import diffusers
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from .build import _clip_config, _nest_clip_weights, clip_tokenizer
    from .t5_vocab import t5_tokenizer

    sd3 = recipe["pipeline"] == "StableDiffusion3Pipeline"
    t5_name, t5_tokenizer_name = ("text_encoder_3", "tokenizer_3") if sd3 else ("text_encoder_2", "tokenizer_2")
    clip_names = ("text_encoder", "text_encoder_2") if sd3 else ("text_encoder",)
    t5_config = T5Config(**{"vocab_size": 1024, "is_encoder_decoder": False, **recipe[t5_name]})
    modules: dict[str, Any] = {
        "vae": AutoencoderKL(in_channels=3, out_channels=3, **recipe["vae"]),
        "scheduler": FlowMatchEulerDiscreteScheduler(**recipe["scheduler"]),
        t5_name: T5EncoderModel(t5_config),
        t5_tokenizer_name: t5_tokenizer(size=t5_config.vocab_size),
        "tokenizer": clip_tokenizer(out / "_tokenizer_src"),
    }
    if sd3:
        modules["transformer"] = diffusers.SD3Transformer2DModel(**recipe["transformer"])
        modules["text_encoder"] = CLIPTextModelWithProjection(_clip_config(recipe["text_encoder"]))
        modules["text_encoder_2"] = CLIPTextModelWithProjection(_clip_config(recipe["text_encoder_2"]))
        modules["tokenizer_2"] = clip_tokenizer(out / "_tokenizer_src", pad_token="!")  # CLIP-G pads with "!"
    else:
        modules["transformer"] = diffusers.FluxTransformer2DModel(**recipe["transformer"])
        modules["text_encoder"] = CLIPTextModel(_clip_config(recipe["text_encoder"]))
    pipe = getattr(diffusers, recipe["pipeline"])(**modules)
    pipe.save_pretrained(out, safe_serialization=True)
    # transformers 5's T5Tokenizer is the fast one; the published SD3/FLUX folders name it T5TokenizerFast, which
    # both transformers 4.x (whose T5Tokenizer needs a SentencePiece model) and 5.x load from tokenizer.json.
    index = json.loads((out / "model_index.json").read_text())
    index[t5_tokenizer_name] = ["transformers", "T5TokenizerFast"]
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    for name in clip_names:
        tokenizer = name.replace("text_encoder", "tokenizer")
        for file in ("vocab.json", "merges.txt"):  # slow-tokenizer files for transformers 4.x (Optimum's pin)
            shutil.copy2(out / "_tokenizer_src" / file, out / tokenizer / file)
        for weights in sorted((out / name).glob("*.safetensors")):
            _nest_clip_weights(weights)
    shutil.rmtree(out / "_tokenizer_src")
    return out


def save_llm_pipeline(recipe: dict[str, Any], out: Path) -> Path:
    """A ZImagePipeline (Qwen3Model, ZImageTransformer2DModel, the FLUX.1 AutoencoderKL) or Flux2KleinPipeline
    (Qwen3ForCausalLM, Flux2Transformer2DModel, AutoencoderKLFlux2) folder from the recipe, initialised from torch's
    random state; the tokenizer is qwen_vocab.py's, the Qwen3 config's vocabulary sized to it."""
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model

    from .qwen_vocab import qwen_tokenizer

    tokenizer = qwen_tokenizer()
    text_config = Qwen3Config(**{"vocab_size": len(tokenizer), **recipe["text_encoder"]})
    z_image = recipe["pipeline"] == "ZImagePipeline"
    modules: dict[str, Any] = {
        "scheduler": FlowMatchEulerDiscreteScheduler(**recipe["scheduler"]),
        "tokenizer": tokenizer,
        "text_encoder": (Qwen3Model if z_image else Qwen3ForCausalLM)(text_config),
    }
    if z_image:
        modules["transformer"] = diffusers.ZImageTransformer2DModel(**recipe["transformer"])
        modules["vae"] = diffusers.AutoencoderKL(in_channels=3, out_channels=3, **recipe["vae"])
    else:
        modules["transformer"] = diffusers.Flux2Transformer2DModel(**recipe["transformer"])
        modules["vae"] = vae = diffusers.AutoencoderKLFlux2(**recipe["vae"])
        vae.bn.running_mean.normal_(0.0, 0.5)  # trained statistics, not the identity a new BatchNorm starts as
        vae.bn.running_var.uniform_(0.5, 2.0)
    options = {"is_distilled": recipe.get("is_distilled", False)} if not z_image else {}
    pipe = getattr(diffusers, recipe["pipeline"])(**modules, **options)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def save_sana_pipeline(recipe: dict[str, Any], out: Path) -> Path:
    """A SanaPipeline (FlowMatchEuler) or SanaSprintPipeline (SCMScheduler) folder from the recipe: a Gemma-2
    text encoder (`Gemma2Model`, as diffusers' SANA pipelines take it) with gemma_vocab.py's tokenizer, a
    SanaTransformer2DModel and an AutoencoderDC, initialised from torch's random state."""
    import diffusers
    from diffusers import AutoencoderDC, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    from .gemma_vocab import gemma_tokenizer

    config = Gemma2Config(**recipe["text_encoder"])
    options = dict(recipe["scheduler"])
    scheduler = getattr(diffusers, options.pop("_class_name"))(**options)
    pipe = getattr(diffusers, recipe["pipeline"])(
        tokenizer=gemma_tokenizer(size=config.vocab_size),
        text_encoder=Gemma2Model(config),
        vae=AutoencoderDC(in_channels=3, **recipe["vae"]),
        transformer=SanaTransformer2DModel(**recipe["transformer"]),
        scheduler=scheduler,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    return out
