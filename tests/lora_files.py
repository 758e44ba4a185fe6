"""Write LoRA files for the tiny pipeline, as training scripts save them: diffusers/PEFT layout (diffusers'
`save_lora_weights`) or kohya/A1111 layout (`lora_unet_*`/`lora_te_*` with lora_down/lora_up/alpha)."""

from __future__ import annotations

from pathlib import Path

import torch

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
# kohya files also train convolutions (1x1 proj_in, 3x3 resnet conv1) and the GEGLU projection (which the export
# slices in two). diffusers' loader mishandles a PEFT-layout file mixing Linear and Conv targets with peft 0.21
# (it injects the convs only), so the diffusers layout stays attention-only.
KOHYA_UNET_TARGETS = [*UNET_TARGETS, "proj_in", "conv1", "ff.net.0.proj"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def lora_state(
    pipeline_folder: Path, seed: int, rank: int = 4, unet_targets: list[str] = UNET_TARGETS
) -> tuple[dict, dict]:
    """PEFT state dicts of a random (non-zero) LoRA for the pipeline's UNet and text encoder."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    pipe = StableDiffusionPipeline.from_pretrained(pipeline_folder, safety_checker=None)
    torch.manual_seed(seed)
    states = []
    for model, targets in ((pipe.unet, unet_targets), (pipe.text_encoder, TEXT_TARGETS)):
        config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False, target_modules=targets)
        model = inject_adapter_in_model(config, model)  # peft itself: transformers' mixin wants a newer peft
        states.append(get_peft_model_state_dict(model))
    return states[0], states[1]


def write_diffusers_lora(pipeline_folder: Path, out: Path, seed: int) -> Path:
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    unet, text = lora_state(pipeline_folder, seed)
    StableDiffusionPipeline.save_lora_weights(
        out.parent,
        unet_lora_layers=convert_state_dict_to_diffusers(unet),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(text),
        weight_name=out.name,
    )
    return out


def write_kohya_lora(pipeline_folder: Path, out: Path, seed: int, rank: int = 4) -> Path:
    from safetensors.torch import save_file

    unet, text = lora_state(pipeline_folder, seed, rank, KOHYA_UNET_TARGETS)
    state = {}
    for prefix, part in (("lora_unet_", unet), ("lora_te_", text)):
        for key, value in part.items():
            module, _, kind = key.rpartition(".lora_")
            name = prefix + module.replace(".", "_")
            state[f"{name}.{'lora_down' if kind.startswith('A') else 'lora_up'}.weight"] = value.contiguous()
            state[f"{name}.alpha"] = torch.tensor(float(rank))
    save_file(state, str(out))
    return out


def write_sdxl_lora(pipeline_folder: Path, out: Path, seed: int, rank: int = 4) -> Path:
    """A diffusers-layout LoRA for an SDXL pipeline's UNet and both text encoders."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    pipe = StableDiffusionXLPipeline.from_pretrained(pipeline_folder)
    torch.manual_seed(seed)
    layers = {}
    for name, targets in (("unet", UNET_TARGETS), ("text_encoder", TEXT_TARGETS), ("text_encoder_2", TEXT_TARGETS)):
        config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False, target_modules=targets)
        model = inject_adapter_in_model(config, getattr(pipe, name))
        layers[f"{name}_lora_layers"] = convert_state_dict_to_diffusers(get_peft_model_state_dict(model))
    StableDiffusionXLPipeline.save_lora_weights(out.parent, weight_name=out.name, **layers)
    return out
