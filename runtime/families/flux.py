"""What FLUX.1 adds (diffusers' FluxPipeline): a transformer on 16-channel latents packed into 2x2 patches
(a sequence of 64-wide tokens with (0, row, column) position ids), conditioned on T5's states and CLIP-L's
pooled output; sampled by flow matching with the schedule shifted by the image's size. No classifier-free
guidance: FLUX.1-dev takes the guidance scale as an input (distilled), schnell ignores it."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from ..request import GenerationRequest
from ..sequence_tokenizer import sequence_tokenizer_for
from .base import Conditioning, FlowMatching, texts_or
from .clip import plain_texts, run_encoder

LOG = logging.getLogger("sd_onnx")
PACK = 2  # latents enter the transformer as 2x2 patches


class Flux(FlowMatching):
    name = "flux"
    pipeline_class = "FluxPipeline"
    label = "FLUX"
    request_fields = frozenset({"prompt_2", "max_sequence_length"})
    tokenizer_folders = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}
    fill_encodes_image = True

    def load_tokenizers(self) -> dict:
        from ..tokenizer import tokenizer_for

        return {
            "text_encoder": tokenizer_for(self.folder, "tokenizer", "text_encoder", self.config.max_token_length),
            "text_encoder_2": sequence_tokenizer_for(
                self.folder, "tokenizer_2", "text_encoder_2", self.config.max_sequence_length
            ),
        }

    def uses_cfg(self, guidance_scale: float) -> bool:
        return False

    def conditioning(self, pipe: Any, request: GenerationRequest, do_cfg: bool) -> Conditioning:
        """T5's states (the text), CLIP's pooled output, and for dev the guidance scale, per image."""
        if any(request.negative_prompts or ()):
            LOG.warning("FLUX.1 has no classifier-free guidance: the negative prompt is not used")
        prompts = plain_texts(request.prompts, request.prompt_syntax)
        prompts_2 = plain_texts(texts_or(request.prompt_2, prompts), request.prompt_syntax)
        clip = run_encoder(pipe.component("text_encoder"), self.tokenizers["text_encoder"](prompts))
        pipe.release("text_encoder")
        t5_tokenizer = self.tokenizers["text_encoder_2"].with_length(request.max_sequence_length)
        t5 = run_encoder(pipe.component("text_encoder_2"), t5_tokenizer(prompts_2))
        pipe.release("text_encoder_2")
        text = t5["last_hidden_state"].astype(np.float32).repeat(request.batch, axis=0)
        extra = {"pooled_projections": clip["pooler_output"].astype(np.float32).repeat(request.batch, axis=0)}
        if self.config.guidance_embeds:
            extra["guidance"] = np.full(request.image_count, request.guidance_scale, np.float32)
        side = self.config.vae_scale_factor * PACK
        shared = {
            "txt_ids": np.zeros((text.shape[1], 3), np.float32),
            "img_ids": image_ids(request.height // side, request.width // side),
        }
        return Conditioning(text, extra, shared)

    def set_timesteps(self, sched: Any, request: GenerationRequest) -> None:
        """diffusers' FLUX: sigmas from 1 to 1/N, shifted by `mu` from the packed sequence's length."""
        from ..schedulers.flow_match_euler import calculate_shift

        n = request.steps
        side = self.config.vae_scale_factor * PACK
        seq = (request.height // side) * (request.width // side)
        sigmas = None if sched.config.get("use_flow_sigmas") else np.linspace(1.0, 1 / n, n)
        sched.set_timesteps(n, sigmas=sigmas, mu=calculate_shift(seq, sched.config))

    def denoiser_feeds(self, graph: Any, sample: np.ndarray, t: float, cond: Conditioning) -> dict[str, Any]:
        timestep = np.full(len(sample), np.float32(t) / np.float32(1000), graph.input_dtype("timestep"))
        feeds = {"hidden_states": pack(sample), "timestep": timestep, "encoder_hidden_states": cond.text}
        return {**feeds, **cond.extra, **cond.shared}

    def denoiser_output(self, output: np.ndarray, sample: np.ndarray) -> np.ndarray:
        """The unpacked prediction: the latents' channels only (a Fill model's input also held the mask's)."""
        batch, _, height, width = sample.shape
        return unpack(output, (batch, output.shape[-1] // PACK**2, height, width))

    def inpaint_channels(self, mask: np.ndarray, masked_latents: np.ndarray) -> np.ndarray:
        """FLUX.1 Fill's: the masked image's latents, then each latent pixel's factor x factor mask pixels as
        channels (row-major within the block), as FluxFillPipeline.prepare_mask_latents lays them out."""
        factor = self.config.vae_scale_factor
        _, _, height, width = masked_latents.shape
        blocks = mask[:, 0].reshape(len(mask), height, factor, width, factor).transpose(0, 2, 4, 1, 3)
        channels = blocks.reshape(len(mask), factor * factor, height, width)
        channels = np.concatenate([channels] * (len(masked_latents) // len(channels)))
        return np.concatenate([masked_latents, channels], axis=1).astype(np.float32)


def pack(latents: np.ndarray) -> np.ndarray:
    """(B, C, H, W) -> (B, H/2 * W/2, C * 4): each 2x2 patch one token, as diffusers' _pack_latents."""
    b, c, h, w = latents.shape
    patches = latents.reshape(b, c, h // PACK, PACK, w // PACK, PACK).transpose(0, 2, 4, 1, 3, 5)
    return np.ascontiguousarray(patches.reshape(b, (h // PACK) * (w // PACK), c * PACK * PACK))


def unpack(tokens: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The inverse of `pack` for latents of `shape`."""
    b, c, h, w = shape
    patches = tokens.reshape(b, h // PACK, w // PACK, c, PACK, PACK).transpose(0, 3, 1, 4, 2, 5)
    return np.ascontiguousarray(patches.reshape(b, c, h, w))


def image_ids(rows: int, columns: int) -> np.ndarray:
    """Each packed token's (0, row, column), as diffusers' _prepare_latent_image_ids."""
    ids = np.zeros((rows, columns, 3), np.float32)
    ids[..., 1] = np.arange(rows, dtype=np.float32)[:, None]
    ids[..., 2] = np.arange(columns, dtype=np.float32)[None, :]
    return ids.reshape(rows * columns, 3)
