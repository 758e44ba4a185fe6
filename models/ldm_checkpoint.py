"""Write a diffusers pipeline as an original (LDM / A1111-style) single-file checkpoint: the layout the
single-file loader reads and stable-diffusion.cpp loads, so `sd-bench` feeds it the same weights as the
other engines. The inverse of diffusers' `convert_ldm_*_checkpoint` key mapping, for any number of UNet
levels and layers per block."""

from __future__ import annotations

from pathlib import Path


def unet_key(key: str, levels: int, layers: int, up_attention: list[bool]) -> str:
    p = key.split(".")
    stride = layers + 1
    if p[0] == "time_embedding":
        return ".".join(["time_embed", {"linear_1": "0", "linear_2": "2"}[p[1]], *p[2:]])
    if p[0] == "add_embedding":  # SDXL's pooled-text and size embedding
        return ".".join(["label_emb.0", {"linear_1": "0", "linear_2": "2"}[p[1]], *p[2:]])
    if p[0] in ("conv_in",):
        return ".".join(["input_blocks.0.0", *p[1:]])
    if p[0] in ("conv_norm_out", "conv_out"):
        return ".".join(["out", {"conv_norm_out": "0", "conv_out": "2"}[p[0]], *p[1:]])
    if p[0] == "down_blocks":
        i, kind = int(p[1]), p[2]
        if kind == "downsamplers":
            return ".".join([f"input_blocks.{stride * (i + 1)}.0.op", *p[5:]])
        j = int(p[3])
        return ".".join([f"input_blocks.{stride * i + j + 1}.{0 if kind == 'resnets' else 1}", *_resnet(p[4:], kind)])
    if p[0] == "up_blocks":
        i, kind = int(p[1]), p[2]
        if kind == "upsamplers":
            return ".".join([f"output_blocks.{stride * i + layers}.{2 if up_attention[i] else 1}", *p[4:]])
        j = int(p[3])
        return ".".join([f"output_blocks.{stride * i + j}.{0 if kind == 'resnets' else 1}", *_resnet(p[4:], kind)])
    if p[0] == "mid_block":
        kind, j = p[1], int(p[2])
        return ".".join([f"middle_block.{1 if kind == 'attentions' else 2 * j}", *_resnet(p[3:], kind)])
    raise KeyError(key)


def _resnet(rest: list[str], kind: str) -> list[str]:
    if kind != "resnets":
        return rest
    names = {
        "norm1": "in_layers.0",
        "conv1": "in_layers.2",
        "norm2": "out_layers.0",
        "conv2": "out_layers.3",
        "time_emb_proj": "emb_layers.1",
        "conv_shortcut": "skip_connection",
    }
    return [names[rest[0]], *rest[1:]]


def vae_key(key: str, levels: int) -> str:
    p = key.split(".")
    names = {"conv_norm_out": "norm_out", "conv_shortcut": "nin_shortcut", "group_norm": "norm"}
    names.update({"to_q": "q", "to_k": "k", "to_v": "v"})
    if p[1] == "down_blocks":
        i, kind = p[2], p[3]
        head = [p[0], "down", i, "downsample" if kind == "downsamplers" else f"block.{p[4]}"]
        p = head + p[5:]
    elif p[1] == "up_blocks":
        i, kind = levels - 1 - int(p[2]), p[3]
        head = [p[0], "up", str(i), "upsample" if kind == "upsamplers" else f"block.{p[4]}"]
        p = head + p[5:]
    elif p[1] == "mid_block":
        head = [p[0], "mid", "attn_1" if p[2] == "attentions" else f"block_{int(p[3]) + 1}"]
        p = head + p[4:]
    joined = ".".join(names.get(x, x) for x in p)
    return joined.replace("to_out.0", "proj_out")


def write_single_file(folder: Path, out: Path) -> Path:
    """Save the diffusers pipeline in `folder` (SD, or SDXL base or refiner) as one LDM-format .safetensors file."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    vae = AutoencoderKL.from_pretrained(folder / "vae")
    levels, layers = len(unet.config.block_out_channels), unet.config.layers_per_block
    up_attention = [t.startswith("CrossAttn") for t in unet.config.up_block_types]
    state = {}
    for k, v in unet.state_dict().items():
        state["model.diffusion_model." + unet_key(k, levels, layers, up_attention)] = v
    for k, v in vae.state_dict().items():
        is_attn_linear = ".attentions." in k and k.rsplit(".", 2)[-2] in ("to_q", "to_k", "to_v", "0") and v.ndim == 2
        state["first_stage_model." + vae_key(k, len(vae.config.block_out_channels))] = (
            v[:, :, None, None] if is_attn_linear else v
        )
    sdxl = (folder / "text_encoder_2").is_dir()
    embedders = 0
    if (folder / "text_encoder").is_dir():
        text = CLIPTextModel.from_pretrained(folder / "text_encoder")
        embedders += 1
        if not sdxl and text.config.hidden_act == "gelu":  # SD 2.x: OpenCLIP ViT-H (OpenAI's CLIP: quick_gelu)
            state.update(sd2_text_state(text.state_dict()))
        else:
            prefix = "conditioner.embedders.0.transformer." if sdxl else "cond_stage_model.transformer."
            for (
                k,
                v,
            ) in text.state_dict().items():  # LDM nests CLIP's weights under text_model (transformers >= 5.6 not)
                state[prefix + (k if k.startswith("text_model.") else "text_model." + k)] = v
    if sdxl:
        text_2 = CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2")
        for k, v in open_clip_state(text_2.state_dict()).items():
            state[f"conditioner.embedders.{embedders}.model." + k] = v
    save_file({k: v.contiguous() for k, v in state.items()}, str(out))
    return out


def sd2_text_state(state: dict) -> dict:
    """SD 2.x's text encoder in the original layout: OpenCLIP under cond_stage_model.model, with one block more
    than diffusers keeps (SD 2 reads the penultimate block's output; diffusers drops the last block, and
    stable-diffusion.cpp skips it): the last block is repeated there, a placeholder neither computes."""
    out = {"cond_stage_model.model." + k: v for k, v in open_clip_state(state).items()}
    blocks = [k for k in out if ".transformer.resblocks." in k]
    last = max(int(k.split(".transformer.resblocks.")[1].split(".")[0]) for k in blocks)
    for k in blocks:
        if f".resblocks.{last}." in k:
            out[k.replace(f".resblocks.{last}.", f".resblocks.{last + 1}.")] = out[k].clone()
    return out


def open_clip_state(state: dict) -> dict:
    """transformers' CLIP text weights in OpenCLIP's layout (SDXL's second encoder): the inverse of diffusers'
    DIFFUSERS_TO_LDM_MAPPING["openclip"], with q/k/v stacked into in_proj."""
    import torch
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    mapping = DIFFUSERS_TO_LDM_MAPPING["openclip"]
    state = {k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v for k, v in state.items()}
    layers = {ours: ldm for ours, ldm in mapping["layers"].items() if ours in state}  # SD 2's has no projection
    out = {ldm: state[ours].T if ldm == "text_projection" else state[ours] for ours, ldm in layers.items()}
    stacked: dict[str, dict] = {}
    for k, v in state.items():
        if not k.startswith("text_model.encoder.layers."):
            continue
        for ours, ldm in list(mapping["transformer"].items())[:6]:  # the per-layer renames
            k = k.replace(ours, ldm)
        projection = next((p for p in ("q_proj", "k_proj", "v_proj") if f".{p}." in k), None)
        if projection:
            stacked.setdefault(k.replace(f".{projection}.", ".in_proj_"), {})[projection] = v
        else:
            out["transformer." + k] = v
    for k, parts in stacked.items():
        out["transformer." + k] = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]])
    return out


if __name__ == "__main__":
    import sys

    write_single_file(Path(sys.argv[1]), Path(sys.argv[2]))
