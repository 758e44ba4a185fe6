"""Stable Diffusion 1.x/2.x and the UNet models built like it: inpainting UNets (the mask and the masked
image's latents are concatenated to the latents, see inpaint.py), LCM (a guidance embedding instead of
classifier-free guidance) and Turbo (one step, no guidance; both from the manifest's defaults).

One CLIP text encoder; the UNet takes its last hidden state (or a `clip_skip.K` output)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..guidance import guidance_embedding
from ..request import GenerationRequest
from .base import Conditioning, Family
from .clip import emphasized, encode_inputs, run_encoder


class StableDiffusion(Family):
    name = "sd"
    pipeline_class = "StableDiffusionPipeline"
    label = "SD"

    @classmethod
    def recognizes(cls, config: Any) -> bool:
        return config.family == "sd" or (not config.family and not config.sdxl)

    def conditioning(self, pipe: Any, request: GenerationRequest, do_cfg: bool) -> Conditioning:
        """Text states (with guidance: unconditional then conditional) and, for LCM, the guidance embedding
        as `timestep_cond`."""
        text = self.encode_prompt(
            pipe,
            request.prompts,
            request.negative_prompts,
            request.batch,
            do_cfg,
            request.prompt_syntax,
            request.clip_skip,
        )
        return Conditioning(text, self.distilled_guidance(request))

    def distilled_guidance(self, request: GenerationRequest) -> dict[str, np.ndarray]:
        """LCM's guidance embedding (`timestep_cond`), per image; none for other UNets."""
        if not self.config.time_cond_proj_dim:
            return {}
        w = np.full(request.image_count, request.guidance_scale - 1.0, np.float32)
        return {"timestep_cond": guidance_embedding(w, self.config.time_cond_proj_dim)}

    def encode_prompt(
        self,
        pipe: Any,
        prompts: list[str],
        negative: list[str] | None,
        per_prompt: int = 1,
        do_cfg: bool = True,
        syntax: str = "plain",
        clip_skip: int | None = None,
    ) -> np.ndarray:
        """Text embeddings, repeated per image; with guidance, [unconditional; conditional] in one batch.
        `syntax` and `clip_skip` as GenerationRequest documents them."""
        negatives = negative if negative is not None else [""] * len(prompts)
        if len(negatives) != len(prompts):
            raise ValueError(f"negative_prompt has {len(negatives)} entries for {len(prompts)} prompts")
        texts = [*negatives, *prompts] if do_cfg else list(prompts)
        encoder = pipe.component("text_encoder")
        ids, weights = encode_inputs(self.tokenizers["text_encoder"], texts, syntax)
        outputs = run_encoder(encoder, ids)
        pipe.release("text_encoder")
        states = outputs[f"clip_skip.{clip_skip}"] if clip_skip else outputs[encoder.output_names[0]]
        return emphasized(states, weights, len(texts)).repeat(per_prompt, axis=0)

    def denoiser_feeds(self, graph: Any, sample: np.ndarray, t: float, cond: Conditioning) -> dict[str, Any]:
        """The UNet's inputs as Optimum names them; its timestep as the graph takes it (recent Optimum exports:
        0-d; ours: one per row)."""
        dtype = graph.input_dtype("timestep")
        timestep = np.array(t, dtype) if graph.input_rank("timestep") == 0 else np.full(len(sample), t, dtype)
        return {"sample": sample, "timestep": timestep, "encoder_hidden_states": cond.text, **cond.extra}
