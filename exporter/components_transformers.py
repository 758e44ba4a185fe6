"""The graphs of SD3/3.5 and FLUX.1 pipelines: an MMDiT `transformer` instead of a UNet, T5 beside CLIP.

Names follow Optimum's SD3/FLUX export (its `sd3-transformer-2d`, `flux-transformer-2d` and `t5-encoder`
configs), so its ONNX pipelines can read our folders:

- `transformer`: (`hidden_states`, `encoder_hidden_states`, `pooled_projections`, `timestep`) -> `out_hidden_states`;
  FLUX adds `txt_ids` and `img_ids` (2-D, one row of 3 position ids per token, as diffusers >= 0.31 takes them)
  and, for guidance-distilled models (FLUX.1-dev), `guidance`. SD3's `hidden_states` are the latents
  (batch, channels, height, width) and `timestep` the scheduler's timesteps (0..1000) as the pipeline passes them;
  FLUX's `hidden_states` are the 2x2-packed latents (batch, height/2 x width/2, 4 x channels) and its
  `timestep` and `guidance` are what FluxPipeline passes (timestep / 1000, the guidance scale), scaled by 1000 in
  the graph.
- SD3's CLIP-L and CLIP-G (`text_encoder`, `text_encoder_2`) have projections: `text_embeds`,
  `last_hidden_state` and every layer's `hidden_states.K`, as SDXL's second encoder, since SD3 conditions on the
  penultimate layer and the pooled projections. FLUX's CLIP-L (`text_encoder`): `last_hidden_state`,
  `pooler_output`.
- T5 (SD3 `text_encoder_3`, FLUX `text_encoder_2`): int32 `input_ids` -> `last_hidden_state`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from types import ModuleType

import torch

from sd_onnx.runtime.configs import SANA_FAMILIES
from sd_onnx.runtime.manifest import LLM_FAMILIES

from .components import IMAGE_AXES, SPECS, ComponentSpec, Inputs, TextEncoder, _hidden_state_names, _latent_side
from .lean import load_dtype
from .source import PipelineSource

FLUX_PACKING = 2  # FluxPipeline packs 2x2 latent pixels into one token
IMAGE_TOKENS = {0: "batch", 1: "image_sequence"}


class SD3Transformer(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        timestep: torch.Tensor,
    ) -> torch.Tensor:
        return self.model(
            hidden_states=hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            pooled_projections=pooled_projections,
            timestep=timestep,
            return_dict=False,
        )[0]


class FluxTransformer(torch.nn.Module):
    """FLUX's transformer; `guidance` is given to guidance-distilled models only. Runs with a traceable rotary
    embedding (see `traceable_rotary`), for the reference outputs and the trace alike."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        timestep: torch.Tensor,
        txt_ids: torch.Tensor,
        img_ids: torch.Tensor,
        *guidance: torch.Tensor,
    ) -> torch.Tensor:
        from diffusers.models.transformers import transformer_flux

        with traceable_rotary(transformer_flux):
            return self.model(
                hidden_states=hidden_states,
                encoder_hidden_states=encoder_hidden_states,
                pooled_projections=pooled_projections,
                timestep=timestep,
                img_ids=img_ids,
                txt_ids=txt_ids,
                guidance=guidance[0] if guidance else None,
                return_dict=False,
            )[0]


@contextmanager
def traceable_rotary(module: ModuleType) -> Iterator[None]:
    """FLUX's (or FLUX.2's) attention, in diffusers' transformer `module`, with `_apply_rotary_emb` in place of
    diffusers' apply_rotary_emb, whose `x.reshape(*x.shape[:-1], -1, 2)` the tracer records with a constant shape:
    the traced graph would then take the traced batch size only (Optimum's FLUX export patches it the same way)."""
    original = module.apply_rotary_emb
    module.apply_rotary_emb = _apply_rotary_emb
    try:
        yield
    finally:
        module.apply_rotary_emb = original


def _apply_rotary_emb(
    x: torch.Tensor,
    freqs_cis: tuple[torch.Tensor, torch.Tensor],
    use_real: bool = True,
    use_real_unbind_dim: int = -1,
    sequence_dim: int = 2,
) -> torch.Tensor:
    """diffusers' apply_rotary_emb as FLUX calls it (real cos/sin, interleaved pairs), the pairs taken by strided
    slices instead of a reshape: the same values."""
    if not use_real or use_real_unbind_dim != -1 or sequence_dim not in (1, 2):
        raise NotImplementedError("FLUX's rotary embedding takes real cos/sin over interleaved pairs")
    cos, sin = freqs_cis  # (tokens, head width)
    where = (None, slice(None), None) if sequence_dim == 1 else (None, None, slice(None))
    cos, sin = cos[where], sin[where]
    real, imaginary = x[..., 0::2], x[..., 1::2]
    rotated = torch.stack([-imaginary, real], dim=-1).flatten(3)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class T5Encoder(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids.long(), return_dict=False)[0]


def _load_transformer(folder: Path) -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    dtype = load_dtype()  # bf16 for the memory-lean export (lean.py)
    if _config_class(folder / "transformer") == "FluxTransformer2DModel":
        return FluxTransformer(FluxTransformer2DModel.from_pretrained(folder / "transformer", torch_dtype=dtype))
    return SD3Transformer(SD3Transformer2DModel.from_pretrained(folder / "transformer", torch_dtype=dtype))


def _config_class(folder: Path) -> str:
    return json.loads((folder / "config.json").read_text()).get("_class_name", "")


def _load_t5(name: str) -> Callable[[Path], torch.nn.Module]:
    def load(folder: Path) -> torch.nn.Module:
        from transformers import T5EncoderModel

        return T5Encoder(T5EncoderModel.from_pretrained(folder / name, dtype=load_dtype()))

    return load


def _load_clip_with_projection(name: str) -> Callable[[Path], torch.nn.Module]:
    def load(folder: Path) -> torch.nn.Module:
        from transformers import CLIPTextModelWithProjection

        return TextEncoder(CLIPTextModelWithProjection.from_pretrained(folder / name), hidden_states=True)

    return load


def _load_clip(folder: Path) -> torch.nn.Module:
    from transformers import CLIPTextModel

    return TextEncoder(CLIPTextModel.from_pretrained(folder / "text_encoder"))


def _t5_inputs(src: PipelineSource, batch: int, gen: torch.Generator) -> Inputs:
    """T5 prompts as the tokenizer makes them (no start token): random tokens, `</s>`, then padding."""
    length, tokens = src.config.max_sequence_length, src.t5_tokens
    ids = torch.full((batch, length), tokens.pad_id, dtype=torch.int32)
    end = max(1, length // 2)
    ids[:, :end] = torch.randint(0, tokens.vocab_size, (batch, end), generator=gen, dtype=torch.int32)
    ids[:, min(end, length - 1)] = tokens.eos_id
    return (ids,)


def prompt_tokens(src: PipelineSource) -> int:
    """Tokens of the prompt embeddings the transformer takes: SD3 CLIP's then T5's, FLUX T5's."""
    config = src.config
    return config.max_sequence_length + (config.max_token_length if config.family == "sd3" else 0)


def _sd3_inputs(src: PipelineSource, batch: int, gen: torch.Generator) -> Inputs:
    config = src.config
    side = _latent_side(config)
    return (
        torch.randn(batch, config.latent_channels, side, side, generator=gen),
        torch.randn(batch, prompt_tokens(src), config.embedding_dim, generator=gen),
        torch.randn(batch, config.pooled_dim, generator=gen),
        torch.rand(batch, generator=gen) * 1000,
    )


def flux_image_ids(rows: int, columns: int) -> torch.Tensor:
    """FluxPipeline's `img_ids`: (rows x columns, 3) of (0, row, column) per packed token."""
    ids = torch.zeros(rows, columns, 3)
    ids[..., 1] = torch.arange(rows)[:, None]
    ids[..., 2] = torch.arange(columns)[None, :]
    return ids.reshape(rows * columns, 3)


def _flux_inputs(src: PipelineSource, batch: int, gen: torch.Generator) -> Inputs:
    config = src.config
    side = _latent_side(config) // FLUX_PACKING
    tokens = prompt_tokens(src)
    inputs = (
        torch.randn(
            batch, side * side, (config.unet_in_channels or config.latent_channels) * FLUX_PACKING**2, generator=gen
        ),
        torch.randn(batch, tokens, config.embedding_dim, generator=gen),
        torch.randn(batch, config.pooled_dim, generator=gen),
        torch.rand(batch, generator=gen),
        torch.zeros(tokens, 3),
        flux_image_ids(side, side),
    )
    return (*inputs, 1 + 4 * torch.rand(batch, generator=gen)) if config.guidance_embeds else inputs


TEXT_AXES = {0: "batch", 1: "sequence"}

SD3_TRANSFORMER = ComponentSpec(
    "transformer",
    ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep"),
    ("out_hidden_states",),
    {
        "hidden_states": IMAGE_AXES,
        "encoder_hidden_states": TEXT_AXES,
        "pooled_projections": {0: "batch"},
        "timestep": {0: "batch"},
        "out_hidden_states": IMAGE_AXES,
    },
    _load_transformer,
    _sd3_inputs,
)

FLUX_TRANSFORMER = ComponentSpec(
    "transformer",
    (*SD3_TRANSFORMER.input_names, "txt_ids", "img_ids"),
    ("out_hidden_states",),
    {
        **SD3_TRANSFORMER.dynamic_axes,
        "hidden_states": IMAGE_TOKENS,
        "txt_ids": {0: "sequence"},
        "img_ids": {0: "image_sequence"},
        "out_hidden_states": IMAGE_TOKENS,
    },
    _load_transformer,
    _flux_inputs,
)

FLUX_DEV_TRANSFORMER = replace(
    FLUX_TRANSFORMER,
    input_names=(*FLUX_TRANSFORMER.input_names, "guidance"),
    dynamic_axes={**FLUX_TRANSFORMER.dynamic_axes, "guidance": {0: "batch"}},
)


def _t5_spec(name: str) -> ComponentSpec:
    return ComponentSpec(
        name,
        ("input_ids",),
        ("last_hidden_state",),
        {"input_ids": TEXT_AXES, "last_hidden_state": TEXT_AXES},
        _load_t5(name),
        _t5_inputs,
    )


def _clip_with_projection_spec(name: str, src: PipelineSource) -> ComponentSpec:
    hidden = _hidden_state_names(src.folder, name)
    outputs = ("text_embeds", "last_hidden_state", *hidden)
    axes = {"input_ids": TEXT_AXES, "text_embeds": {0: "batch"}, **{o: TEXT_AXES for o in outputs[1:]}}
    return replace(SPECS["text_encoder"], name=name, output_names=outputs, dynamic_axes=axes,
                   load=_load_clip_with_projection(name))  # fmt: skip


def transformer_component_spec(name: str, src: PipelineSource) -> ComponentSpec | None:
    """The spec of SD3's or FLUX's component `name`; None for the ones they share with UNet pipelines (VAE)."""
    family = src.config.family
    if family in SANA_FAMILIES:  # SANA, SANA-Sprint: components_sana.py
        from .components_sana import sana_component_spec

        return sana_component_spec(name, src)
    if family in LLM_FAMILIES:  # Z-Image, FLUX.2 [klein]: components_llm.py
        from .components_llm import llm_component_spec

        return llm_component_spec(name, src)
    if name == "transformer":
        if family == "sd3":
            return SD3_TRANSFORMER
        return FLUX_DEV_TRANSFORMER if src.config.guidance_embeds else FLUX_TRANSFORMER
    if (family, name) in (("sd3", "text_encoder_3"), ("flux", "text_encoder_2")):
        return _t5_spec(name)
    if family == "sd3" and name in ("text_encoder", "text_encoder_2"):
        return _clip_with_projection_spec(name, src)
    if family == "flux" and name == "text_encoder":
        return replace(SPECS["text_encoder"], load=_load_clip)
    return None
