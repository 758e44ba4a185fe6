"""What each exported graph is: the torch module it wraps, its ONNX signature and its seeded sample inputs.

Names and layouts follow Optimum's Stable Diffusion export, so Optimum's and diffusers' ONNX pipelines
can read our folders: int32 `input_ids`; UNet (`sample`, `timestep`, `encoder_hidden_states`) ->
`out_sample`; VAE decoder `latent_sample` -> `sample`; VAE encoder `sample` -> `latent_parameters`
(mean and log-variance, so the runtime draws the latent sample with its own seeded RNG).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from sd_onnx.runtime.manifest import TRANSFORMER_FAMILIES, ModelConfig

from .source import PipelineSource

Inputs = tuple[torch.Tensor, ...]


class TextEncoder(torch.nn.Module):
    """CLIP text encoder: last hidden state and pooled output; with `hidden_states`, every layer's hidden
    states too (SDXL conditions on the penultimate one), as Optimum's SDXL export lays them out; with `skips`,
    `clip_skip.K` for K = 1..skips: the final layer norm on the state K layers before the last, which is what
    diffusers' (and A1111's) clip skip conditions SD 1.x/2.x on."""

    def __init__(self, model: torch.nn.Module, hidden_states: bool = False, skips: int = 0) -> None:
        super().__init__()
        self.model, self.hidden_states, self.skips = model, hidden_states, skips

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        every = self.hidden_states or self.skips > 0
        out = self.model(input_ids.long(), output_hidden_states=every, return_dict=True)
        if hasattr(out, "text_embeds"):  # with a projection (SDXL's second encoder): Optimum's output order
            head = (out.text_embeds, out.last_hidden_state)
        else:
            head = (out.last_hidden_state, out.pooler_output)
        if self.hidden_states:
            return (*head, *out.hidden_states)
        norm = getattr(self.model, "text_model", self.model).final_layer_norm  # transformers 5 has no text_model
        return (*head, *(norm(out.hidden_states[-(k + 1)]) for k in range(1, self.skips + 1)))


class UNet(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        *conditions: torch.Tensor,
    ) -> torch.Tensor:
        # diffusers expands a 1-element timestep to the batch itself, so both (1,) and (batch,) work.
        # `conditions`: the guidance embedding of UNets distilled with it (LCM's `time_cond_proj_dim`), or
        # SDXL's pooled text embedding and size/crop time ids.
        if len(conditions) == 2:
            added = {"text_embeds": conditions[0], "time_ids": conditions[1]}
            return self.model(sample, timestep, encoder_hidden_states, added_cond_kwargs=added, return_dict=False)[0]
        cond = conditions[0] if conditions else None
        return self.model(sample, timestep, encoder_hidden_states, timestep_cond=cond, return_dict=False)[0]


class VaeDecoder(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, latent_sample: torch.Tensor) -> torch.Tensor:
        return self.model.decode(latent_sample, return_dict=False)[0]


class VaeEncoder(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        return self.model.encode(sample).latent_dist.parameters


class TinyVaeEncoder(VaeEncoder):
    """A tiny autoencoder's encoder: the latents themselves (TAESD has no posterior to sample)."""

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        return self.model.encode(sample, return_dict=False)[0]


def _load_text_encoder(folder: Path) -> torch.nn.Module:
    from transformers import CLIPTextModel

    model = CLIPTextModel.from_pretrained(folder / "text_encoder")
    if _is_sdxl(folder):
        return TextEncoder(model, hidden_states=True)
    return TextEncoder(model, skips=clip_skips(model.config.num_hidden_layers))


def clip_skips(layers: int) -> int:
    """How many layers an SD 1.x/2.x text encoder's clip skip outputs reach back: all but the first."""
    return max(layers - 1, 0)


def _load_text_encoder_2(folder: Path) -> torch.nn.Module:
    from transformers import CLIPTextModelWithProjection

    return TextEncoder(CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2"), hidden_states=True)


def _is_sdxl(folder: Path) -> bool:
    return (folder / "text_encoder_2").is_dir()


def _load_unet(folder: Path) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet(UNet2DConditionModel.from_pretrained(folder / "unet"))


def _load_vae(folder: Path) -> torch.nn.Module:
    """The pipeline's VAE: an AutoencoderKL, or a tiny AutoencoderTiny (both decode with `decode`)."""
    from diffusers import AutoencoderKL, AutoencoderTiny

    config = json.loads((folder / "vae" / "config.json").read_text())
    tiny = config.get("_class_name") == "AutoencoderTiny"
    return (AutoencoderTiny if tiny else AutoencoderKL).from_pretrained(folder / "vae")


def load_tiny_vae(path: Path) -> torch.nn.Module:
    """A tiny autoencoder given beside the pipeline (`--vae`): a diffusers AutoencoderTiny folder."""
    from diffusers import AutoencoderTiny

    return AutoencoderTiny.from_pretrained(path)


def _latent_side(config: ModelConfig) -> int:
    """Latent side used for tracing and validation: the native one, capped at 32 to keep export fast, and a
    multiple of what the UNet halves and doubles again."""
    multiple = max(1, config.size_multiple // config.vae_scale_factor)
    return max(multiple, min(config.sample_size, 32) // multiple * multiple)


def _text_inputs(src: PipelineSource, batch: int, gen: torch.Generator) -> Inputs:
    """Prompts as the tokenizer makes them: [bos] random tokens, eos, then padding, all inside the vocabulary."""
    length, tokens = src.config.max_token_length, src.tokens
    ids = torch.full((batch, length), tokens.pad_id, dtype=torch.int32)
    start = 0 if tokens.bos_id is None else 1
    end = max(start, length // 2)
    ids[:, start:end] = torch.randint(0, tokens.vocab_size, (batch, end - start), generator=gen, dtype=torch.int32)
    if tokens.bos_id is not None:
        ids[:, 0] = tokens.bos_id
    ids[:, min(end, length - 1)] = tokens.eos_id
    return (ids,)


def _unet_inputs(src: PipelineSource, batch: int, gen: torch.Generator) -> Inputs:
    config = src.config
    side = _latent_side(config)
    sample = torch.randn(batch, config.unet_in_channels or config.latent_channels, side, side, generator=gen)
    timestep = torch.tensor([981.0])
    context = torch.randn(batch, config.max_token_length, config.embedding_dim, generator=gen)
    if config.sdxl:
        side_px = float(side * config.vae_scale_factor)
        time_ids = torch.tensor([[side_px, side_px, 0.0, 0.0, side_px, side_px][: config.time_ids_count]] * batch)
        return sample, timestep, context, torch.randn(batch, config.pooled_dim, generator=gen), time_ids
    if config.time_cond_proj_dim:
        return sample, timestep, context, torch.randn(batch, config.time_cond_proj_dim, generator=gen)
    return sample, timestep, context


def _decoder_inputs(src: PipelineSource, batch: int, gen: torch.Generator) -> Inputs:
    config = src.config
    side = _latent_side(config)
    return (torch.randn(batch, config.latent_channels, side, side, generator=gen),)


def _encoder_inputs(src: PipelineSource, batch: int, gen: torch.Generator) -> Inputs:
    config = src.config
    side = _latent_side(config) * config.vae_scale_factor
    return (torch.rand(batch, 3, side, side, generator=gen) * 2 - 1,)


IMAGE_AXES = {0: "batch", 2: "height", 3: "width"}


@dataclass(frozen=True)
class ComponentSpec:
    """How to build, trace and exercise one component."""

    name: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic_axes: dict[str, dict[int, str]]
    load: Callable[[Path], torch.nn.Module]
    sample_inputs: Callable[[PipelineSource, int, torch.Generator], Inputs]


SPECS: dict[str, ComponentSpec] = {
    "text_encoder": ComponentSpec(
        "text_encoder",
        ("input_ids",),
        ("last_hidden_state", "pooler_output"),
        {
            "input_ids": {0: "batch", 1: "sequence"},
            "last_hidden_state": {0: "batch", 1: "sequence"},
            "pooler_output": {0: "batch"},
        },
        _load_text_encoder,
        _text_inputs,
    ),
    "unet": ComponentSpec(
        "unet",
        ("sample", "timestep", "encoder_hidden_states"),
        ("out_sample",),
        {
            "sample": IMAGE_AXES,
            "timestep": {0: "steps"},
            "encoder_hidden_states": {0: "batch", 1: "sequence"},
            "out_sample": IMAGE_AXES,
        },
        _load_unet,
        _unet_inputs,
    ),
    "vae_decoder": ComponentSpec(
        "vae_decoder",
        ("latent_sample",),
        ("sample",),
        {"latent_sample": IMAGE_AXES, "sample": IMAGE_AXES},
        lambda folder: VaeDecoder(_load_vae(folder)),
        _decoder_inputs,
    ),
    "vae_encoder": ComponentSpec(
        "vae_encoder",
        ("sample",),
        ("latent_parameters",),
        {"sample": IMAGE_AXES, "latent_parameters": IMAGE_AXES},
        lambda folder: VaeEncoder(_load_vae(folder)),
        _encoder_inputs,
    ),
}

# Tiny autoencoders: the decoder as the VAE's; the encoder returns latents, not a posterior's parameters.
TINY_VAE_ENCODER = replace(
    SPECS["vae_encoder"],
    output_names=("latent_sample",),
    dynamic_axes={"sample": IMAGE_AXES, "latent_sample": IMAGE_AXES},
    load=lambda folder: TinyVaeEncoder(_load_vae(folder)),
)


# A UNet distilled with a guidance embedding (LCM) takes it as a fourth input, named as Optimum names it.
UNET_WITH_GUIDANCE_EMBEDDING = replace(
    SPECS["unet"],
    input_names=(*SPECS["unet"].input_names, "timestep_cond"),
    dynamic_axes={**SPECS["unet"].dynamic_axes, "timestep_cond": {0: "batch"}},
)


# SDXL's UNet also takes the pooled text embedding and the time ids (Optimum's names).
UNET_SDXL = replace(
    SPECS["unet"],
    input_names=(*SPECS["unet"].input_names, "text_embeds", "time_ids"),
    dynamic_axes={**SPECS["unet"].dynamic_axes, "text_embeds": {0: "batch"}, "time_ids": {0: "batch"}},
)


def _hidden_state_names(folder: Path, encoder: str) -> tuple[str, ...]:
    layers = int(json.loads((folder / encoder / "config.json").read_text())["num_hidden_layers"])
    return tuple(f"hidden_states.{i}" for i in range(layers + 1))


def _text_encoder_spec(name: str, src: PipelineSource) -> ComponentSpec:
    """SDXL's encoders return every layer's hidden states after their first two outputs."""
    base = SPECS["text_encoder"]
    first = ("text_embeds", "last_hidden_state") if name == "text_encoder_2" else base.output_names
    hidden = _hidden_state_names(src.folder, name)
    axes = {**base.dynamic_axes, "text_embeds": {0: "batch"}}
    axes.update({h: {0: "batch", 1: "sequence"} for h in hidden})
    load = _load_text_encoder_2 if name == "text_encoder_2" else _load_text_encoder
    return replace(base, name=name, output_names=(*first, *hidden), dynamic_axes=axes, load=load)


def _clip_skip_spec(src: PipelineSource) -> ComponentSpec:
    """An SD 1.x/2.x text encoder with its `clip_skip.K` outputs after the usual two."""
    base = SPECS["text_encoder"]
    layers = int(json.loads((src.folder / "text_encoder" / "config.json").read_text())["num_hidden_layers"])
    skipped = tuple(f"clip_skip.{k}" for k in range(1, clip_skips(layers) + 1))
    axes = {**base.dynamic_axes, **{name: {0: "batch", 1: "sequence"} for name in skipped}}
    return replace(base, output_names=(*base.output_names, *skipped), dynamic_axes=axes)


def component_spec(name: str, src: PipelineSource) -> ComponentSpec:
    """The spec of component `name` for this model (SDXL's encoders and UNet, LCM's UNet, tiny VAEs differ; SD3's
    and FLUX's own graphs are in components_transformers.py)."""
    if name == "tiny_vae_decoder" and src.config.family == "flux2":
        from .components_llm import flux2_tiny_decoder_spec

        return flux2_tiny_decoder_spec(src)
    if name == "tiny_vae_decoder":
        return replace(SPECS["vae_decoder"], name=name, load=lambda folder: VaeDecoder(load_tiny_vae(src.tiny_vae)))
    if name == "tiny_vae_encoder":
        return replace(TINY_VAE_ENCODER, name=name, load=lambda folder: TinyVaeEncoder(load_tiny_vae(src.tiny_vae)))
    if name == "vae_encoder" and src.config.vae_kind == "tiny":
        return TINY_VAE_ENCODER
    if src.config.family in TRANSFORMER_FAMILIES:
        from .components_transformers import transformer_component_spec

        spec = transformer_component_spec(name, src)
        if spec is not None:
            return spec
    if name.startswith("text_encoder") and src.config.sdxl:
        return _text_encoder_spec(name, src)
    if name == "text_encoder":
        return _clip_skip_spec(src)
    if name == "unet" and src.config.sdxl:
        return UNET_SDXL
    if name == "unet" and src.config.time_cond_proj_dim:
        return UNET_WITH_GUIDANCE_EMBEDDING
    return SPECS[name]
