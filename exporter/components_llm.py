"""The graphs of pipelines conditioned on an LLM (Qwen3): Z-Image (Turbo) and FLUX.2 [klein].

- `text_encoder`: (`input_ids` int32, `attention_mask` int32) -> the hidden states the pipeline takes, each named
  `hidden_states.K` after its index in transformers' `hidden_states` tuple: Z-Image's penultimate one
  (`hidden_states[-2]`), FLUX.2 [klein]'s layers 9, 18 and 27 (its `text_encoder_out_layers`), which the runtime
  stacks as the pipeline does.
- Z-Image's `transformer`: (`hidden_states` latents (batch, channels, height, width), `timestep` (batch,) as the
  pipeline passes it ((1000 - t) / 1000), `encoder_hidden_states` (batch, sequence, width), `encoder_attention_mask`
  (batch, sequence), 1 for a prompt's tokens) -> `out_hidden_states`, the model's raw output (the pipeline negates
  it). diffusers' ZImageTransformer2DModel takes a list of prompt states of each prompt's own length; this graph
  is its batched form, exactly equivalent: each prompt's valid tokens first, the rest masked (see ZImageTransformer).
- FLUX.2 [klein]'s `transformer`: (`hidden_states` (batch, tokens, 4 x latent channels): the 2x2-patchified latents
  one token per position, `encoder_hidden_states` (batch, sequence, 3 x the LLM's width), `timestep` (batch,) as the
  pipeline passes it (t / 1000), `txt_ids` (sequence, 4), `img_ids` (tokens, 4): rotary positions (t, h, w, l) as
  2-D tensors, as FLUX.1's) -> `out_hidden_states`, FLUX.1's names.
- FLUX.2 [klein]'s `vae_decoder`: `latent_sample` is what the pipeline samples, the patchified latents normalized by
  the VAE's batch-norm statistics (batch, 4 x latent channels, height / 16, width / 16); the graph un-normalizes and
  unpatchifies them, as Flux2KleinPipeline does before vae.decode.
- FLUX.2 [klein]'s `vae_encoder`: `sample` (batch, 3, height, width) in [-1, 1] -> `latent_sample`, a reference
  image's latents as the transformer takes them: the posterior's mode, patchified 2x2 and normalized by the
  batch-norm statistics (Flux2KleinPipeline's _encode_vae_image). The pipeline has no img2img: its `image` is a
  reference whose tokens the transformer attends to beside the latents' (runtime/families/flux2.py).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from .components import IMAGE_AXES, SPECS, ComponentSpec, Inputs, _latent_side
from .components_transformers import traceable_rotary
from .lean import load_dtype
from .source import PipelineSource

TEXT_AXES = {0: "batch", 1: "sequence"}
SEQ_MULTI_OF = 32  # Z-Image pads its image and caption token runs to multiples of 32
FLUX2_TEXT_LAYERS = (9, 18, 27)  # Flux2KleinPipeline's default text_encoder_out_layers
SAMPLE_TOKENS = 64  # prompt length of the sample inputs (the graph's sequence axis is dynamic)


def text_layers(src: PipelineSource) -> tuple[int, ...]:
    """The indices of the hidden states the family's pipeline conditions on."""
    if src.config.family == "flux2":
        return FLUX2_TEXT_LAYERS
    layers = int(json.loads((src.folder / "text_encoder" / "config.json").read_text())["num_hidden_layers"])
    return (layers - 1,)  # Z-Image: hidden_states[-2] of layers + 1


class LlmEncoder(torch.nn.Module):
    """A Qwen3 model's hidden states `layers`, for ids and their attention mask (no cache)."""

    def __init__(self, model: torch.nn.Module, layers: tuple[int, ...]) -> None:
        super().__init__()
        self.model, self.layers = model, layers

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(
            input_ids=input_ids.long(), attention_mask=attention_mask.long(), output_hidden_states=True, use_cache=False
        )
        return tuple(out.hidden_states[k] for k in self.layers)


def _load_llm(src: PipelineSource):
    def load(folder: Path) -> torch.nn.Module:
        import transformers

        index = json.loads((folder / "model_index.json").read_text())
        cls = getattr(transformers, index["text_encoder"][1])
        return LlmEncoder(cls.from_pretrained(folder / "text_encoder").eval(), text_layers(src))

    return load


def _llm_inputs(src: PipelineSource, batch: int, gen: torch.Generator) -> Inputs:
    """Prompts as the tokenizer pads them (right): random tokens, then padding, each row its own length."""
    length, tokens = min(src.config.max_sequence_length, SAMPLE_TOKENS), src.tokens
    ids = torch.full((batch, length), tokens.pad_id, dtype=torch.int32)
    mask = torch.zeros((batch, length), dtype=torch.int32)
    for row in range(batch):
        valid = max(1, length - 1 - 23 * row)
        ids[row, :valid] = torch.randint(0, tokens.vocab_size, (valid,), generator=gen, dtype=torch.int32)
        mask[row, :valid] = 1
    return ids, mask


class RealRotaryAttention:
    """ZSingleStreamAttnProcessor with the rotary embedding as real cos/sin tables (`freqs_cis` = (cos, sin), each
    (batch, tokens, head width / 2)) instead of complex numbers, which ONNX has not: the same products, (a + ib) x
    (c + is) = (ac - bs) + i(as + bc) over interleaved pairs. `attention_mask`: (batch, tokens) bool, True where a
    key may be attended to."""

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        freqs_cis: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        query = attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1))
        key = attn.to_k(hidden_states).unflatten(-1, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(-1, (attn.heads, -1))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if freqs_cis is not None:
            query, key = _rotate(query, freqs_cis), _rotate(key, freqs_cis)
        mask = attention_mask[:, None, None, :] if attention_mask is not None else None
        out = torch.nn.functional.scaled_dot_product_attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=mask
        )
        out = out.transpose(1, 2).flatten(2, 3).to(query.dtype)
        return attn.to_out[0](out)


def _rotate(x: torch.Tensor, freqs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    cos, sin = (f.unsqueeze(2) for f in freqs)  # (batch, tokens, 1, pairs)
    real, imaginary = x[..., 0::2].float(), x[..., 1::2].float()
    return torch.stack([real * cos - imaginary * sin, real * sin + imaginary * cos], dim=-1).flatten(3).type_as(x)


class ZImageTransformer(torch.nn.Module):
    """diffusers' ZImageTransformer2DModel.forward (basic mode, one image per prompt) on a padded batch.

    diffusers pads each image's token run and each prompt's to a multiple of 32 (the image's padding with
    `x_pad_token` at position (0, 0, 0), the prompt's with `cap_pad_token` at positions continuing its own), places
    the image at rotary position (prompt's padded length + 1, row, column), refines image and prompt runs apart,
    then runs [image; prompt] through the main layers, masking only what pads the batch to its longest item. Here
    the prompts come as one (batch, sequence) tensor with `encoder_attention_mask`; every token at or past a
    prompt's padded length is masked as a key, so each item sees exactly the tokens it sees in diffusers. The
    sequence may be longer than the longest padded prompt (masked tokens change nothing); the runtime passes it cut
    to that length, which costs what diffusers' batch costs."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.patch, self.frame_patch = model.all_patch_size[0], model.all_f_patch_size[0]
        if self.frame_patch != 1:
            raise NotImplementedError("Z-Image's transformer with a frame patch other than 1")
        tables = model.rope_embedder.precompute_freqs_cis(model.axes_dims, model.axes_lens, theta=model.rope_theta)
        for axis, table in enumerate(tables):
            self.register_buffer(f"cos_{axis}", table.real.contiguous(), persistent=False)
            self.register_buffer(f"sin_{axis}", table.imag.contiguous(), persistent=False)
        self.axes = len(tables)
        processor = RealRotaryAttention()
        for block in (*model.noise_refiner, *model.context_refiner, *model.layers):
            block.attention.set_processor(processor)

    def rotary(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) of position `ids` (batch, tokens, axes), the axes' tables side by side (RopeEmbedder)."""
        cos = [getattr(self, f"cos_{a}")[ids[..., a]] for a in range(self.axes)]
        sin = [getattr(self, f"sin_{a}")[ids[..., a]] for a in range(self.axes)]
        return torch.cat(cos, dim=-1), torch.cat(sin, dim=-1)

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor,
    ) -> torch.Tensor:
        model, p = self.model, self.patch
        key = f"{p}-{self.frame_patch}"
        batch, channels, height, width = hidden_states.shape
        rows, columns = height // p, width // p
        adaln = model.t_embedder(timestep * model.t_scale).type_as(hidden_states)

        # The image: 2x2 patches, embedded, padded with x_pad_token to a multiple of 32 tokens.
        patches = hidden_states.reshape(batch, channels, rows, p, columns, p).permute(0, 2, 4, 3, 5, 1)
        x = model.all_x_embedder[key](patches.reshape(batch, rows * columns, p * p * channels))
        tokens = rows * columns
        padded = (tokens + SEQ_MULTI_OF - 1) // SEQ_MULTI_OF * SEQ_MULTI_OF
        pad = model.x_pad_token.to(x.dtype).expand(batch, SEQ_MULTI_OF, x.shape[-1])
        x = torch.cat([x, pad], dim=1)[:, :padded]

        # The prompts: valid tokens, then cap_pad_token up to the padded length, then masked batch padding.
        lengths = encoder_attention_mask.long().sum(dim=1, keepdim=True)  # (batch, 1)
        padded_lengths = (lengths + SEQ_MULTI_OF - 1) // SEQ_MULTI_OF * SEQ_MULTI_OF
        positions = torch.cumsum(torch.ones_like(encoder_attention_mask, dtype=torch.long), dim=1) - 1
        valid, kept = positions < lengths, positions < padded_lengths
        cap = model.cap_embedder(encoder_hidden_states * valid.unsqueeze(-1).to(encoder_hidden_states.dtype))
        cap = torch.where(valid.unsqueeze(-1), cap, model.cap_pad_token.to(cap.dtype))

        # Rotary positions: the prompt's (1 + index, 0, 0); the image's (padded prompt + 1, row, column), its
        # padding (0, 0, 0).
        frame_limit = model.axes_lens[0] - 1
        zeros = torch.zeros_like(positions)
        cap_ids = torch.stack([torch.clamp(positions + 1, max=frame_limit), zeros, zeros], dim=-1)
        row_ids = torch.arange(rows, device=x.device).view(rows, 1).expand(rows, columns).reshape(-1)
        column_ids = torch.arange(columns, device=x.device).view(1, columns).expand(rows, columns).reshape(-1)
        grid = torch.stack([row_ids, column_ids], dim=-1).unsqueeze(0).expand(batch, tokens, 2)
        frame = (padded_lengths + 1).unsqueeze(-1).expand(batch, tokens, 1)
        image_ids = torch.cat([frame, grid], dim=-1)
        image_ids = torch.cat([image_ids, torch.zeros_like(image_ids[:, :1]).expand(batch, SEQ_MULTI_OF, 3)], dim=1)
        image_ids = image_ids[:, :padded]
        x_freqs, cap_freqs = self.rotary(image_ids), self.rotary(cap_ids)

        for layer in model.noise_refiner:
            x = layer(x, None, x_freqs, adaln)
        for layer in model.context_refiner:
            cap = layer(cap, kept, cap_freqs)
        unified = torch.cat([x, cap], dim=1)
        freqs = tuple(torch.cat([a, b], dim=1) for a, b in zip(x_freqs, cap_freqs, strict=True))
        mask = torch.cat([torch.ones_like(x[..., 0], dtype=torch.bool), kept], dim=1)
        for layer in model.layers:
            unified = layer(unified, mask, freqs, adaln)
        out = model.all_final_layer[key](unified, c=adaln)[:, :tokens]
        out = out.reshape(batch, rows, columns, p, p, channels).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(batch, channels, height, width)


def _load_z_image(folder: Path) -> torch.nn.Module:
    from diffusers import ZImageTransformer2DModel

    return ZImageTransformer(ZImageTransformer2DModel.from_pretrained(folder / "transformer", torch_dtype=load_dtype()))


def _z_image_inputs(src: PipelineSource, batch: int, gen: torch.Generator) -> Inputs:
    """Latents whose token count is no multiple of 32 (so the image is padded), and prompts of different padded
    lengths in one batch."""
    config = src.config
    side = max(config.patch_size, min(_latent_side(config), 10) // config.patch_size * config.patch_size)
    length = SAMPLE_TOKENS
    mask = torch.zeros(batch, length, dtype=torch.int32)
    for row in range(batch):
        mask[row, : max(1, 40 - 27 * row)] = 1
    return (
        torch.randn(batch, config.latent_channels, side, side, generator=gen),
        torch.rand(batch, generator=gen),
        torch.randn(batch, length, config.embedding_dim, generator=gen),
        mask,
    )


Z_IMAGE_TRANSFORMER = ComponentSpec(
    "transformer",
    ("hidden_states", "timestep", "encoder_hidden_states", "encoder_attention_mask"),
    ("out_hidden_states",),
    {
        "hidden_states": IMAGE_AXES,
        "timestep": {0: "batch"},
        "encoder_hidden_states": TEXT_AXES,
        "encoder_attention_mask": TEXT_AXES,
        "out_hidden_states": IMAGE_AXES,
    },
    _load_z_image,
    _z_image_inputs,
)


class Flux2Transformer(torch.nn.Module):
    """FLUX.2's transformer without a guidance input (klein's), with FLUX.1's traceable rotary embedding."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        txt_ids: torch.Tensor,
        img_ids: torch.Tensor,
    ) -> torch.Tensor:
        from diffusers.models.transformers import transformer_flux2

        with traceable_rotary(transformer_flux2):
            return self.model(
                hidden_states=hidden_states,
                encoder_hidden_states=encoder_hidden_states,
                timestep=timestep,
                img_ids=img_ids,
                txt_ids=txt_ids,
                guidance=None,
                return_dict=False,
            )[0]


class Flux2VaeDecoder(torch.nn.Module):
    """AutoencoderKLFlux2's decoder on the pipeline's latents: un-normalized with the VAE's batch-norm running
    statistics, unpatchified (2x2 from channels), decoded, as Flux2KleinPipeline does; with `decoder` (a tiny
    autoencoder, TAEF2) that one decodes the same unpatchified latents instead."""

    def __init__(self, model: torch.nn.Module, decoder: torch.nn.Module | None = None) -> None:
        super().__init__()
        bn = model.bn
        self.register_buffer("mean", bn.running_mean.detach().clone().view(1, -1, 1, 1))
        self.register_buffer("std", torch.sqrt(bn.running_var.detach().view(1, -1, 1, 1) + model.config.batch_norm_eps))
        self.decoder = model if decoder is None else decoder

    def forward(self, latent_sample: torch.Tensor) -> torch.Tensor:
        latents = latent_sample * self.std + self.mean
        batch, channels, height, width = latents.shape
        latents = latents.reshape(batch, channels // 4, 2, 2, height, width).permute(0, 1, 4, 2, 5, 3)
        return self.decoder.decode(latents.reshape(batch, channels // 4, height * 2, width * 2), return_dict=False)[0]


class Flux2VaeEncoder(torch.nn.Module):
    """A reference image's latents, as Flux2KleinPipeline encodes them: the posterior's mode, patchified 2x2 into
    channels, normalized by the VAE's batch-norm running statistics."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        bn = model.bn
        self.register_buffer("mean", bn.running_mean.detach().clone().view(1, -1, 1, 1))
        self.register_buffer("std", torch.sqrt(bn.running_var.detach().view(1, -1, 1, 1) + model.config.batch_norm_eps))

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        latents = self.model.encode(sample).latent_dist.mode()
        batch, channels, height, width = latents.shape
        latents = latents.reshape(batch, channels, height // 2, 2, width // 2, 2).permute(0, 1, 3, 5, 2, 4)
        return (latents.reshape(batch, channels * 4, height // 2, width // 2) - self.mean) / self.std


def _load_flux2(folder: Path) -> torch.nn.Module:
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer(Flux2Transformer2DModel.from_pretrained(folder / "transformer", torch_dtype=load_dtype()))


def _load_flux2_decoder(folder: Path) -> torch.nn.Module:
    from diffusers import AutoencoderKLFlux2

    return Flux2VaeDecoder(AutoencoderKLFlux2.from_pretrained(folder / "vae"))


def _load_flux2_encoder(folder: Path) -> torch.nn.Module:
    from diffusers import AutoencoderKLFlux2

    return Flux2VaeEncoder(AutoencoderKLFlux2.from_pretrained(folder / "vae"))


def flux2_ids(rows: int, columns: int) -> torch.Tensor:
    """Flux2KleinPipeline's latent ids: (rows x columns, 4) of (0, row, column, 0)."""
    ids = torch.zeros(rows, columns, 4)
    ids[..., 1] = torch.arange(rows)[:, None]
    ids[..., 2] = torch.arange(columns)[None, :]
    return ids.reshape(rows * columns, 4)


def flux2_text_ids(length: int) -> torch.Tensor:
    """Flux2KleinPipeline's text ids: (length, 4) of (0, 0, 0, index)."""
    ids = torch.zeros(length, 4)
    ids[:, 3] = torch.arange(length)
    return ids


def _flux2_inputs(src: PipelineSource, batch: int, gen: torch.Generator) -> Inputs:
    config = src.config
    side = min(_latent_side(config), 8)
    return (
        torch.randn(batch, side * side, config.latent_channels, generator=gen),
        torch.randn(batch, SAMPLE_TOKENS, config.embedding_dim, generator=gen),
        torch.rand(batch, generator=gen),
        flux2_text_ids(SAMPLE_TOKENS),
        flux2_ids(side, side),
    )


IMAGE_TOKENS = {0: "batch", 1: "image_sequence"}
FLUX2_TRANSFORMER = ComponentSpec(
    "transformer",
    ("hidden_states", "encoder_hidden_states", "timestep", "txt_ids", "img_ids"),
    ("out_hidden_states",),
    {
        "hidden_states": IMAGE_TOKENS,
        "encoder_hidden_states": TEXT_AXES,
        "timestep": {0: "batch"},
        "txt_ids": {0: "sequence"},
        "img_ids": {0: "image_sequence"},
        "out_hidden_states": IMAGE_TOKENS,
    },
    _load_flux2,
    _flux2_inputs,
)


def _llm_spec(src: PipelineSource) -> ComponentSpec:
    outputs = tuple(f"hidden_states.{k}" for k in text_layers(src))
    axes = {"input_ids": TEXT_AXES, "attention_mask": TEXT_AXES, **{name: TEXT_AXES for name in outputs}}
    return ComponentSpec("text_encoder", ("input_ids", "attention_mask"), outputs, axes, _load_llm(src), _llm_inputs)


def flux2_tiny_decoder_spec(src: PipelineSource) -> ComponentSpec:
    """FLUX.2's tiny_vae_decoder (`sd-export convert --vae TAEF2`): the tiny decoder behind the VAE's batch-norm
    un-normalization and unpatchifying, so that it takes the sampler's latents as the vae_decoder graph does."""

    def load(folder: Path) -> torch.nn.Module:
        from diffusers import AutoencoderKLFlux2

        from .components import load_tiny_vae

        return Flux2VaeDecoder(AutoencoderKLFlux2.from_pretrained(folder / "vae"), load_tiny_vae(src.tiny_vae))

    return replace(SPECS["vae_decoder"], name="tiny_vae_decoder", load=load)


def llm_component_spec(name: str, src: PipelineSource) -> ComponentSpec | None:
    """The spec of Z-Image's or FLUX.2 [klein]'s component `name`; None for the VAE graphs it shares."""
    if name == "text_encoder":
        return _llm_spec(src)
    if name == "transformer":
        return Z_IMAGE_TRANSFORMER if src.config.family == "z_image" else FLUX2_TRANSFORMER
    if name == "vae_decoder" and src.config.family == "flux2":
        return replace(SPECS["vae_decoder"], load=_load_flux2_decoder)
    if name == "vae_encoder" and src.config.family == "flux2":
        return replace(SPECS["vae_encoder"], output_names=("latent_sample",), load=_load_flux2_encoder,
                       dynamic_axes={"sample": IMAGE_AXES, "latent_sample": IMAGE_AXES})  # fmt: skip
    return None
