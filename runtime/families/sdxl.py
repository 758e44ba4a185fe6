"""What SDXL adds to Stable Diffusion (diffusers' StableDiffusionXLPipeline): two CLIP text encoders whose
penultimate hidden states go side by side, the second's pooled projection (`text_embeds`) and six "time ids"
(original size, crop corner, target size) as extra UNet inputs; an absent negative prompt is zeros when the
model says so (`force_zeros_for_empty_prompt`). A refiner has the second encoder only and an aesthetic score
among five time ids. Everything else (samplers, seeds, img2img, inpainting, limits) is shared."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..manifest import ManifestError
from ..request import SDXL_FIELDS, GenerationRequest
from .base import Conditioning
from .clip import emphasized, encode_inputs, penultimate, run_encoder
from .sd import StableDiffusion

BASE_TIME_IDS, REFINER_TIME_IDS = 6, 5  # a refiner takes an aesthetic score instead of the target size
AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE = 6.0, 2.5  # diffusers' defaults


class StableDiffusionXL(StableDiffusion):
    name = "sdxl"
    pipeline_class = "StableDiffusionXLPipeline"
    label = "SDXL"
    request_fields = frozenset(SDXL_FIELDS)
    tokenizer_folders = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}

    @classmethod
    def recognizes(cls, config: Any) -> bool:
        return config.sdxl

    def load_tokenizers(self) -> dict:
        if self.config.time_ids_count not in (BASE_TIME_IDS, REFINER_TIME_IDS):
            raise ManifestError(
                f"{self.folder}: an SDXL UNet with {self.config.time_ids_count} time ids is not supported"
            )
        self.refiner = self.config.time_ids_count == REFINER_TIME_IDS
        from ..tokenizer import tokenizer_for

        has_first = (self.folder / "text_encoder").is_dir()
        names = ("text_encoder", "text_encoder_2") if has_first else ("text_encoder_2",)
        return {
            name: tokenizer_for(self.folder, self.tokenizer_folders[name], name, self.config.max_token_length)
            for name in names
        }

    def conditioning(self, pipe: Any, request: GenerationRequest, do_cfg: bool) -> Conditioning:
        prompts = request.prompts
        texts, texts_2 = prompts, _per_prompt(request.prompt_2, len(prompts)) or prompts
        zeros = do_cfg and request.negative_prompts is None and self.config.force_zeros_for_empty_prompt
        if do_cfg and not zeros:  # negatives and prompts through each encoder at once: one encoder loaded at a time
            negatives = request.negative_prompts or [""] * len(prompts)
            negatives_2 = _per_prompt(request.negative_prompt_2, len(prompts)) or negatives
            texts, texts_2 = negatives + texts, negatives_2 + texts_2
        embeddings, pooled = self.encode_prompts(pipe, texts, texts_2, request.prompt_syntax, request.clip_skip)
        if zeros:
            embeddings = np.concatenate([np.zeros_like(embeddings), embeddings])
            pooled = np.concatenate([np.zeros_like(pooled), pooled])
        embeddings, pooled = embeddings.repeat(request.batch, axis=0), pooled.repeat(request.batch, axis=0)
        extra = {"text_embeds": pooled, "time_ids": self.time_ids(request, do_cfg)}
        return Conditioning(embeddings, extra)

    def time_ids(self, request: GenerationRequest, do_cfg: bool) -> np.ndarray:
        """Size and crop conditioning per image: original size, crop corner, then the target size (base) or an
        aesthetic score (refiner: the negative half gets the negative score); [unconditional; conditional]."""
        size = (request.height, request.width)
        original, crop = request.original_size or size, request.crops_coords_top_left or (0, 0)
        target = request.target_size or size
        if self.refiner:
            score = AESTHETIC_SCORE if request.aesthetic_score is None else request.aesthetic_score
            negative_score = request.negative_aesthetic_score
            negative_score = NEGATIVE_AESTHETIC_SCORE if negative_score is None else negative_score
            rows = [[*(request.negative_original_size or original), *(request.negative_crops_coords_top_left or (0, 0)),
                     negative_score], [*original, *crop, score]]  # fmt: skip
        else:
            rows = [_negative_base_row(request, original, crop, target), [*original, *crop, *target]]
        halves = rows if do_cfg else rows[1:]
        return np.concatenate([np.tile(np.array(row, np.float32), (request.image_count, 1)) for row in halves])

    def encode_prompts(
        self, pipe: Any, prompts: list[str], prompts_2: list[str], syntax: str = "plain", clip_skip: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Both encoders' penultimate hidden states (or `clip_skip` more layers before the last, as diffusers
        counts), side by side, and the second encoder's pooled projection (of each text's first chunk, in
        A1111's syntax)."""
        states = []
        first, second = self.tokenizers.get("text_encoder"), self.tokenizers["text_encoder_2"]
        encoders = (("text_encoder", first, prompts), ("text_encoder_2", second, prompts_2))
        if first is None:  # a refiner: diffusers feeds the second encoder `prompt`
            encoders = (("text_encoder_2", second, prompts),)
        chunks = max(len(t.chunks(text)[0]) for _, t, texts in encoders for text in texts) if syntax != "plain" else 1
        for name, tokenizer, texts in encoders:
            ids, weights = encode_inputs(tokenizer, texts, syntax, chunks)
            outputs = run_encoder(pipe.component(name), ids)
            states.append(emphasized(penultimate(outputs, clip_skip), weights, len(texts)))
            pipe.release(name)
        pooled = outputs["text_embeds"]
        pooled = pooled if weights is None else pooled[:: len(pooled) // len(texts)]
        return np.concatenate(states, axis=-1), pooled


def _negative_base_row(
    request: GenerationRequest, original: tuple[int, int], crop: tuple[int, int], target: tuple[int, int]
) -> list[int]:
    """The base's negative time ids, with diffusers' two rules: txt2img uses the negative sizes only when both
    are given (crop then defaults to (0, 0)); img2img takes each negative size alone and the crop of the
    positive half."""
    negative_original, negative_target = request.negative_original_size, request.negative_target_size
    if request.image is not None:
        return [*(negative_original or original), *crop, *(negative_target or target)]
    if negative_original is None or negative_target is None:
        return [*original, *crop, *target]
    return [*negative_original, *(request.negative_crops_coords_top_left or (0, 0)), *negative_target]


def _per_prompt(value: str | tuple[str, ...] | None, count: int) -> list[str] | None:
    if value is None:
        return None
    return [value] * count if isinstance(value, str) else list(value) * (count // len(value))
