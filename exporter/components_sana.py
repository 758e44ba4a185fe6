"""The graphs of SANA and SANA-Sprint pipelines: a Gemma-2 text encoder, a linear-attention DiT and a DC-AE.

Names follow Optimum's SANA export (its `gemma2-text-encoder`, `sana-transformer`, `dcae-encoder` and
`dcae-decoder` configs), so its ONNX pipeline can read our folders:

- `text_encoder`: (`input_ids` int32, `attention_mask` int32, right-padded as the pipelines tokenize) ->
  `last_hidden_state`, every position's (SANA selects the first and the last tokens from them).
- `transformer`: (`hidden_states` latents (batch, channels, height, width), `encoder_hidden_states` (batch,
  sequence, caption_channels), `encoder_attention_mask` (batch, sequence) int64, 1 for a prompt's tokens,
  `timestep` (batch,) as the pipeline passes it: SANA's sampler timestep x timestep_scale, SANA-Sprint's flow time
  sin t / (sin t + cos t)) and for SANA-Sprint `guidance` (batch,) (the guidance scale x guidance_embeds_scale)
  -> `out_hidden_states`.
- `vae_decoder`: `latent_sample` -> `sample`; `vae_encoder`: `sample` -> `latent_sample`, the DC-AE's latents
  themselves, unscaled (it has no posterior to sample).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from .components import (
    IMAGE_AXES,
    SPECS,
    TINY_VAE_ENCODER,
    ComponentSpec,
    Inputs,
    TinyVaeEncoder,
    VaeDecoder,
    _latent_side,
)
from .lean import load_dtype
from .source import PipelineSource

TEXT_AXES = {0: "batch", 1: "sequence"}
# Prompt length of the sample inputs: the trace's (batch 1) and the check's (batch 2) differ, so a length the
# trace fixed in the graph fails validation (the runtime feeds 300 tokens and the instruction's hundreds more).
SAMPLE_TOKENS = 40


class GemmaEncoder(torch.nn.Module):
    """Gemma-2's last hidden state for ids and their attention mask (no cache)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids.long(), attention_mask=attention_mask.long(), use_cache=False)
        return out.last_hidden_state


class SanaTransformer(torch.nn.Module):
    """SANA's transformer; `guidance` is given to SANA-Sprint's only."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor,
        timestep: torch.Tensor,
        *guidance: torch.Tensor,
    ) -> torch.Tensor:
        return self.model(
            hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask,
            timestep=timestep,
            guidance=guidance[0] if guidance else None,
            return_dict=False,
        )[0]


def _load_gemma(folder: Path) -> torch.nn.Module:
    from transformers import Gemma2Model

    return GemmaEncoder(Gemma2Model.from_pretrained(folder / "text_encoder"))


def _load_transformer(folder: Path) -> torch.nn.Module:
    from diffusers import SanaTransformer2DModel

    return SanaTransformer(SanaTransformer2DModel.from_pretrained(folder / "transformer", torch_dtype=load_dtype()))


def _load_dc_ae(folder: Path) -> torch.nn.Module:
    from diffusers import AutoencoderDC

    return AutoencoderDC.from_pretrained(folder / "vae")


def _lengths(batch: int, length: int) -> list[int]:
    """Each row's prompt length: the first the whole `length`, the others shorter (padding follows)."""
    return [max(1, length - 13 * row) for row in range(batch)]


def _text_inputs(src: PipelineSource, batch: int, gen: torch.Generator) -> Inputs:
    """Prompts as the pipelines tokenize them: `<bos>`, random tokens, then right padding, each row its length."""
    length, tokens = SAMPLE_TOKENS + 8 * batch, src.tokens
    ids = torch.full((batch, length), tokens.pad_id, dtype=torch.int32)
    mask = torch.zeros((batch, length), dtype=torch.int32)
    for row, valid in enumerate(_lengths(batch, length)):
        ids[row, :valid] = torch.randint(0, tokens.vocab_size, (valid,), generator=gen, dtype=torch.int32)
        ids[row, 0] = tokens.bos_id if tokens.bos_id is not None else ids[row, 0]
        mask[row, :valid] = 1
    return ids, mask


def _transformer_inputs(src: PipelineSource, batch: int, gen: torch.Generator) -> Inputs:
    config = src.config
    side, length = _latent_side(config), SAMPLE_TOKENS + 8 * batch
    mask = torch.zeros((batch, length), dtype=torch.int64)
    for row, valid in enumerate(_lengths(batch, length)):
        mask[row, :valid] = 1
    inputs = (
        torch.randn(batch, config.latent_channels, side, side, generator=gen),
        torch.randn(batch, length, config.embedding_dim, generator=gen),
        mask,
    )
    if config.guidance_embeds:  # Sprint: the flow time in (0, 1), the guidance scale x guidance_embeds_scale
        timestep = torch.rand(batch, generator=gen)
        guidance = (1 + 6 * torch.rand(batch, generator=gen)) * config.guidance_embeds_scale
        return (*inputs, timestep, guidance)
    return (*inputs, torch.rand(batch, generator=gen) * 1000 * config.timestep_scale)


TEXT_ENCODER = ComponentSpec(
    "text_encoder",
    ("input_ids", "attention_mask"),
    ("last_hidden_state",),
    {"input_ids": TEXT_AXES, "attention_mask": TEXT_AXES, "last_hidden_state": TEXT_AXES},
    _load_gemma,
    _text_inputs,
)

TRANSFORMER = ComponentSpec(
    "transformer",
    ("hidden_states", "encoder_hidden_states", "encoder_attention_mask", "timestep"),
    ("out_hidden_states",),
    {
        "hidden_states": IMAGE_AXES,
        "encoder_hidden_states": TEXT_AXES,
        "encoder_attention_mask": TEXT_AXES,
        "timestep": {0: "batch"},
        "out_hidden_states": IMAGE_AXES,
    },
    _load_transformer,
    _transformer_inputs,
)

SPRINT_TRANSFORMER = replace(
    TRANSFORMER,
    input_names=(*TRANSFORMER.input_names, "guidance"),
    dynamic_axes={**TRANSFORMER.dynamic_axes, "guidance": {0: "batch"}},
)


def sana_component_spec(name: str, src: PipelineSource) -> ComponentSpec:
    """The spec of SANA's (or SANA-Sprint's) component `name`."""
    if name == "text_encoder":
        return TEXT_ENCODER
    if name == "transformer":
        return SPRINT_TRANSFORMER if src.config.guidance_embeds else TRANSFORMER
    if name == "vae_decoder":
        return replace(SPECS["vae_decoder"], load=lambda folder: VaeDecoder(_load_dc_ae(folder)))
    if name == "vae_encoder":  # the latents, as a tiny autoencoder's encoder returns them
        return replace(TINY_VAE_ENCODER, load=lambda folder: TinyVaeEncoder(_load_dc_ae(folder)))
    raise KeyError(f"SANA pipelines have no {name}")
