"""What Stable Diffusion 3/3.5 adds (diffusers' StableDiffusion3Pipeline): an MMDiT transformer on 16-channel
latents sampled by flow matching, conditioned on three text encoders: CLIP-L and CLIP-G (penultimate hidden
states side by side, zero-padded to T5's width, and their pooled projections side by side) followed along the
sequence by T5's states (zeros when the folder has no T5, as diffusers does with `text_encoder_3=None`)."""

from __future__ import annotations

import os
from functools import cached_property
from typing import Any

import numpy as np

from ..echo import echo
from ..files import inside
from ..guidance import skip_layer_scale
from ..manifest import ManifestError, read_json
from ..request import SKIP_LAYER_FIELDS, GenerationRequest, RequestError
from ..sequence_tokenizer import sequence_tokenizer_for
from .base import Conditioning, FlowMatching, texts_or
from .clip import penultimate, plain_texts, run_encoder


class StableDiffusion3(FlowMatching):
    name = "sd3"
    pipeline_class = "StableDiffusion3Pipeline"
    label = "SD3"
    request_fields = frozenset({"prompt_2", "negative_prompt_2", "max_sequence_length", *SKIP_LAYER_FIELDS})
    tokenizer_folders = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2", "text_encoder_3": "tokenizer_3"}

    def check_request(self, request: GenerationRequest) -> None:
        """SD3's position embedding covers `pos_embed_max_size` patches a side: larger images cannot run (the
        graph would read past its table)."""
        side = self.max_side
        for field, value in (("width", request.width), ("height", request.height)):
            if side is not None and value > side:
                raise RequestError(field, f"{value} is larger than this model's {side} px (its position embedding)")
        if request.skip_guidance_layers:  # refused where it would not run, as the PNG would claim it did
            if not self.uses_cfg(request.guidance_scale):
                raise RequestError("skip_guidance_layers", "applies with classifier-free guidance (guidance_scale > 1)")
            if not any(skip_layer_scale(request, i, request.steps) for i in range(request.steps)):
                raise RequestError(
                    "skip_layer_guidance_start",
                    f"no step of {request.steps} lies between {request.skip_layer_guidance_start:g} and "
                    f"{request.skip_layer_guidance_stop:g} of the schedule: raise steps or widen the window",
                )

    @cached_property
    def max_side(self) -> int | None:
        """The largest image side in pixels, from the transformer's config beside its graph (None: not given);
        ManifestError for a value that is not a positive integer (which would let any size reach the graph)."""
        path = self.folder / "transformer" / "config.json"
        if not os.path.lexists(path):
            return None
        config = read_json(inside(self.folder, "transformer/config.json", self.folder))
        patches = config.get("pos_embed_max_size")
        if patches is None:
            return None
        if not isinstance(patches, int) or isinstance(patches, bool) or not 1 <= patches <= 65536:
            raise ManifestError(f"{path}: pos_embed_max_size: must be an integer in 1..65536, got {echo(patches)}")
        return patches * (self.config.patch_size or 1) * self.config.vae_scale_factor

    def load_tokenizers(self) -> dict:
        from ..tokenizer import tokenizer_for

        _ = self.max_side  # a damaged transformer config fails at load, not at the first request

        tokenizers: dict[str, Any] = {
            name: tokenizer_for(self.folder, self.tokenizer_folders[name], name, self.config.max_token_length)
            for name in ("text_encoder", "text_encoder_2")
        }
        if (self.folder / "text_encoder_3").is_dir():  # T5 is optional, as in diffusers
            length = self.config.max_sequence_length
            tokenizers["text_encoder_3"] = sequence_tokenizer_for(self.folder, "tokenizer_3", "text_encoder_3", length)
        return tokenizers

    def conditioning(self, pipe: Any, request: GenerationRequest, do_cfg: bool) -> Conditioning:
        """[negative; prompt] states and pooled vectors (diffusers' SD3: an absent negative prompt is "")."""
        prompts = plain_texts(request.prompts, request.prompt_syntax)
        texts = prompts
        if do_cfg:
            negatives = request.negative_prompts or [""] * len(prompts)
            texts = plain_texts(negatives, request.prompt_syntax) + prompts
        texts_2 = _second(request, texts, len(prompts), do_cfg)
        clip_states, pooled = [], []
        for name, batch in (("text_encoder", texts), ("text_encoder_2", texts_2)):
            outputs = run_encoder(pipe.component(name), self.tokenizers[name](batch))
            pipe.release(name)
            clip_states.append(penultimate(outputs, request.clip_skip))
            pooled.append(outputs["text_embeds"])
        clip = np.concatenate(clip_states, axis=-1)
        t5 = self.t5_states(pipe, texts, request.max_sequence_length or self.config.max_sequence_length)
        clip = np.pad(clip, ((0, 0), (0, 0), (0, t5.shape[-1] - clip.shape[-1])))
        text = np.concatenate([clip, t5], axis=1).repeat(request.batch, axis=0)
        pooled_projections = np.concatenate(pooled, axis=-1).repeat(request.batch, axis=0)
        return Conditioning(text.astype(np.float32), {"pooled_projections": pooled_projections.astype(np.float32)})

    def t5_states(self, pipe: Any, texts: list[str], length: int) -> np.ndarray:
        """T5's states of `length` tokens per text; zeros without T5, as diffusers conditions then."""
        tokenizer = self.tokenizers.get("text_encoder_3")
        if tokenizer is None:
            return np.zeros((len(texts), length, self.config.embedding_dim), np.float32)
        ids = tokenizer.with_length(length)(texts)
        states = run_encoder(pipe.component("text_encoder_3"), ids)["last_hidden_state"]
        pipe.release("text_encoder_3")
        return states

    def set_timesteps(self, sched: Any, request: GenerationRequest) -> None:
        """diffusers' SD3: the scheduler's own (shifted) sigmas; `mu` from the image size where the scheduler
        shifts dynamically (SD3.5 does not)."""
        if sched.config.get("use_dynamic_shifting"):
            from ..schedulers.flow_match_euler import calculate_shift

            patch = self.config.patch_size or 1
            factor = self.config.vae_scale_factor * patch
            seq = (request.height // factor) * (request.width // factor)
            sched.set_timesteps(request.steps, mu=calculate_shift(seq, sched.config))
        else:
            sched.set_timesteps(request.steps)

    def denoiser_feeds(self, graph: Any, sample: np.ndarray, t: float, cond: Conditioning) -> dict[str, Any]:
        timestep = np.full(len(sample), t, graph.input_dtype("timestep"))
        return {"hidden_states": sample, "timestep": timestep, "encoder_hidden_states": cond.text, **cond.extra}


def _second(request: GenerationRequest, texts: list[str], count: int, do_cfg: bool) -> list[str]:
    """CLIP-G's texts: `prompt_2` / `negative_prompt_2` where given, else the same as CLIP-L's."""
    positives = texts_or(request.prompt_2, texts[-count:])
    return texts_or(request.negative_prompt_2, texts[:count]) + positives if do_cfg else positives
