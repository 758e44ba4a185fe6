"""What FLUX.2 [klein] adds (diffusers' Flux2KleinPipeline): a FLUX-style transformer on the VAE's latents
patchified 2x2 into channels and normalized by the VAE's batch-norm statistics (the sampler's latents; the
vae_decoder graph undoes both), one token per latent position with (0, row, column, 0) rotary ids; conditioned on
three hidden layers (9, 18, 27) of a Qwen3 encoder stacked side by side per token, for each prompt read as a chat
turn with thinking off and padded to 512 tokens (the transformer attends to the padding too); its text ids
(0, 0, 0, index). Sampled by flow matching over sigmas 1 .. 1/N shifted by FLUX.2's empirical `mu` (from the
image's token count and the number of steps). Classifier-free guidance above a scale of 1 for the base models; the
step-distilled ones (model_index.json's is_distilled) ignore the scale. The negative half is "" as in diffusers
(which takes no negative prompt text); a negative prompt given here is read in its place.

A request's `image` is a reference to edit from, or a list of up to four (diffusers' `image=`): each scaled to
at most 1024x1024 pixels, cropped to a multiple of 16 about its center, encoded by the vae_encoder graph, its
tokens given positions (10 + 10 i, row, column, 0) for the i-th and appended to the latents' tokens at every step
(the transformer attends to all; only the latents' predictions are kept). The output takes the first reference's
size unless the request sets one.
"""

from __future__ import annotations

import math
import os
from functools import cached_property
from typing import Any

import numpy as np
from PIL import Image

from ..chat_template import ChatPrompts
from ..files import inside
from ..image import from_pil
from ..manifest import read_json
from ..request import GenerationRequest, RequestError, reference_list
from .base import Conditioning, FlowMatching
from .clip import plain_texts
from .llm import encode_outputs


class Flux2(FlowMatching):
    name = "flux2"
    pipeline_class = "Flux2KleinPipeline"
    label = "FLUX.2 [klein]"
    request_fields = frozenset({"max_sequence_length"})
    reference_images = True
    max_references = 4  # Black Forest Labs' limit for klein (4B and 9B)

    def load_tokenizers(self) -> dict:
        length = self.config.max_sequence_length
        return {"text_encoder": ChatPrompts(self.folder, "tokenizer", "text_encoder", length, False, False)}

    @cached_property
    def distilled(self) -> bool:
        """Whether the model is step-distilled (model_index.json's is_distilled): no classifier-free guidance."""
        if not os.path.lexists(self.folder / "model_index.json"):
            return False
        return bool(read_json(inside(self.folder, "model_index.json", self.folder)).get("is_distilled", False))

    def uses_cfg(self, guidance_scale: float) -> bool:
        return guidance_scale > 1.0 and not self.distilled

    @classmethod
    def reference_size(cls, image: Any, config: Any) -> tuple[int, int]:
        return reference_image(image, config.vae_scale_factor).size

    def conditioning(self, pipe: Any, request: GenerationRequest, do_cfg: bool) -> Conditioning:
        """[negative; prompt] states: the three layers side by side per token, over all 512 (padded) tokens."""
        texts = plain_texts(request.prompts, request.prompt_syntax)
        if do_cfg:
            texts = plain_texts(request.negative_prompts or [""] * len(texts), request.prompt_syntax) + texts
        outputs, _ = encode_outputs(pipe, self.tokenizers["text_encoder"], texts, request.max_sequence_length)
        layers = sorted((k for k in outputs if k.startswith("hidden_states.")), key=lambda k: int(k.split(".")[1]))
        states = np.stack([outputs[k] for k in layers], axis=2)  # (texts, tokens, layers, width)
        text = states.reshape(*states.shape[:2], -1).astype(np.float32).repeat(request.batch, axis=0)
        rows, columns = (side // self.config.vae_scale_factor for side in (request.height, request.width))
        ids, references = latent_ids(rows, columns), None
        if request.image is not None:
            references, reference_ids = self.references(pipe, reference_list(request.image))
            ids = np.concatenate([ids, reference_ids])
        return Conditioning(text, {}, {"txt_ids": text_ids(text.shape[1]), "img_ids": ids}, references)

    def references(self, pipe: Any, images: list[Any]) -> tuple[np.ndarray, np.ndarray]:
        """The reference images' tokens (1, tokens, channels), one after another, and their positions: image i's
        (10 + 10 i, row, column, 0), as diffusers' _prepare_image_ids."""
        tokens, ids = [], []
        for i, image in enumerate(images):
            image = reference_image(image, self.config.vae_scale_factor)
            latents = pipe.component("vae_encoder")(sample=from_pil(image, *image.size))[0]
            _, channels, rows, columns = latents.shape
            tokens.append(latents.reshape(1, channels, rows * columns).transpose(0, 2, 1))
            positions = latent_ids(rows, columns)
            positions[:, 0] = 10 + 10 * i
            ids.append(positions)
        pipe.release("vae_encoder")
        return np.ascontiguousarray(np.concatenate(tokens, axis=1), np.float32), np.concatenate(ids)

    def set_timesteps(self, sched: Any, request: GenerationRequest) -> None:
        n = request.steps
        seq = (request.height // self.config.vae_scale_factor) * (request.width // self.config.vae_scale_factor)
        sigmas = None if sched.config.get("use_flow_sigmas") else np.linspace(1.0, 1 / n, n)
        sched.set_timesteps(n, sigmas=sigmas, mu=empirical_mu(seq, n))

    def denoiser_feeds(self, graph: Any, sample: np.ndarray, t: float, cond: Conditioning) -> dict[str, Any]:
        timestep = np.full(len(sample), np.float32(t) / np.float32(1000), graph.input_dtype("timestep"))
        batch, channels = sample.shape[:2]
        tokens = np.ascontiguousarray(sample.reshape(batch, channels, -1).transpose(0, 2, 1))
        if cond.references is not None:  # every row attends to the references' tokens after its own
            tokens = np.concatenate([tokens, np.repeat(cond.references, batch, axis=0)], axis=1)
        return {"hidden_states": tokens, "timestep": timestep, "encoder_hidden_states": cond.text, **cond.shared}

    def denoiser_output(self, output: np.ndarray, sample: np.ndarray) -> np.ndarray:
        tokens = sample.shape[2] * sample.shape[3]  # the latents' own; reference tokens' predictions are dropped
        return np.ascontiguousarray(output[:, :tokens].transpose(0, 2, 1)).reshape(sample.shape)


def reference_image(image: Any, multiple: int, max_area: int = 1024 * 1024) -> Image.Image:
    """A reference as Flux2KleinPipeline prepares it: checked (a PIL image, sides >= 64, aspect <= 8), scaled down
    to `max_area` pixels if larger (Lanczos), then cropped about its center to a multiple of `multiple`."""
    if not isinstance(image, Image.Image):
        raise RequestError("image", f"a FLUX.2 [klein] reference must be a PIL image, got {type(image).__name__}")
    width, height = image.size
    if min(width, height) < 64 or max(width / height, height / width) > 8:
        raise RequestError("image", f"{width}x{height}: a reference needs sides of 64+ pixels and an aspect <= 8:1")
    if width * height > max_area:
        scale = math.sqrt(max_area / (width * height))
        image = image.resize((int(width * scale), int(height * scale)), Image.Resampling.LANCZOS)
        width, height = image.size
    cropped = (width // multiple * multiple, height // multiple * multiple)
    left, top = (width - cropped[0]) // 2, (height - cropped[1]) // 2
    return image.crop((left, top, left + cropped[0], top + cropped[1]))


def empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """diffusers' compute_empirical_mu (FLUX.2): the schedule's shift, linear in the token count, interpolated
    between fits for 10 and 200 steps (beyond 4300 tokens the 200-step fit)."""
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    if image_seq_len > 4300:
        return float(a2 * image_seq_len + b2)
    m_200, m_10 = a2 * image_seq_len + b2, a1 * image_seq_len + b1
    a = (m_200 - m_10) / 190.0
    return float(a * num_steps + (m_200 - 200.0 * a))


def latent_ids(rows: int, columns: int) -> np.ndarray:
    """Each latent token's (0, row, column, 0), as diffusers' _prepare_latent_ids."""
    ids = np.zeros((rows, columns, 4), np.float32)
    ids[..., 1] = np.arange(rows, dtype=np.float32)[:, None]
    ids[..., 2] = np.arange(columns, dtype=np.float32)[None, :]
    return ids.reshape(rows * columns, 4)


def text_ids(length: int) -> np.ndarray:
    """Each text token's (0, 0, 0, index), as diffusers' _prepare_text_ids."""
    ids = np.zeros((length, 4), np.float32)
    ids[:, 3] = np.arange(length, dtype=np.float32)
    return ids
