"""`StableDiffusionXLPipeline`: SDXL base models, following diffusers' pipeline of the same name.

Two CLIP text encoders condition the UNet: their penultimate hidden states side by side, plus the second's
pooled projection and six "time ids" (original size, crop corner, target size) as extra UNet inputs. An absent
negative prompt is zeros when the model says so (`force_zeros_for_empty_prompt`). Everything else (schedulers,
seeds, img2img, limits) is the base pipeline's. `StableDiffusionPipeline.from_pretrained` returns this class
for an SDXL folder, so the CLI and the server need nothing of their own.
"""

from __future__ import annotations

import numpy as np

from .manifest import ManifestError
from .pipeline import StableDiffusionPipeline, emphasized, encode_inputs
from .request import GenerationRequest
from .tokenizer import tokenizer_for

BASE_TIME_IDS, REFINER_TIME_IDS = 6, 5  # a refiner takes an aesthetic score instead of the target size
AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE = 6.0, 2.5  # diffusers' defaults


class StableDiffusionXLPipeline(StableDiffusionPipeline):
    """SDXL base or refiner: txt2img and img2img with the base pipeline's settings; `prompt_2` defaults to the
    prompt. A refiner (the second text encoder only, an aesthetic score among its time ids) is meant for img2img
    on a base model's output, as diffusers' StableDiffusionXLImg2ImgPipeline runs it."""

    def __init__(self, folder, manifest, config, scheduler, session_config, *args, **kwargs) -> None:  # noqa: ANN001, ANN002, ANN003
        if config.time_ids_count not in (BASE_TIME_IDS, REFINER_TIME_IDS):
            raise ManifestError(f"{folder}: an SDXL UNet with {config.time_ids_count} time ids is not supported")
        self.refiner = config.time_ids_count == REFINER_TIME_IDS
        self.tokenizer_2 = tokenizer_for(folder, "tokenizer_2", "text_encoder_2", config.max_token_length)
        encoders = ("text_encoder_2",) if not (folder / "text_encoder").is_dir() else ("text_encoder", "text_encoder_2")
        self.components_used = (*encoders, "unet", "vae_decoder")
        super().__init__(folder, manifest, config, scheduler, session_config, *args, **kwargs)

    def conditioning(self, request: GenerationRequest, do_cfg: bool) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        prompts = request.prompts
        texts, texts_2 = prompts, _per_prompt(request.prompt_2, len(prompts)) or prompts
        zeros = do_cfg and request.negative_prompts is None and self.config.force_zeros_for_empty_prompt
        if do_cfg and not zeros:  # negatives and prompts through each encoder at once: one encoder loaded at a time
            negatives = request.negative_prompts or [""] * len(prompts)
            negatives_2 = _per_prompt(request.negative_prompt_2, len(prompts)) or negatives
            texts, texts_2 = negatives + texts, negatives_2 + texts_2
        embeddings, pooled = self.encode_prompts(texts, texts_2, request.prompt_syntax, request.clip_skip)
        if zeros:
            embeddings = np.concatenate([np.zeros_like(embeddings), embeddings])
            pooled = np.concatenate([np.zeros_like(pooled), pooled])
        embeddings, pooled = _repeat_per_prompt(embeddings, request.batch), _repeat_per_prompt(pooled, request.batch)
        time_ids = self.time_ids(request, do_cfg)
        return embeddings, {"text_embeds": pooled, "time_ids": time_ids}

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
            rows = [self._negative_base_row(request, original, crop, target), [*original, *crop, *target]]
        halves = rows if do_cfg else rows[1:]
        return np.concatenate([np.tile(np.array(row, np.float32), (request.image_count, 1)) for row in halves])

    @staticmethod
    def _negative_base_row(
        request: GenerationRequest, original: tuple[int, int], crop: tuple[int, int], target: tuple[int, int]
    ) -> list[int]:
        """The base's negative time ids, with diffusers' two rules: txt2img uses the negative sizes only when
        both are given (crop then defaults to (0, 0)); img2img takes each negative size alone and the crop of
        the positive half."""
        negative_original, negative_target = request.negative_original_size, request.negative_target_size
        if request.image is not None:
            return [*(negative_original or original), *crop, *(negative_target or target)]
        if negative_original is None or negative_target is None:
            return [*original, *crop, *target]
        return [*negative_original, *(request.negative_crops_coords_top_left or (0, 0)), *negative_target]

    def encode_prompts(
        self, prompts: list[str], prompts_2: list[str], syntax: str = "plain", clip_skip: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Both encoders' penultimate hidden states (or `clip_skip` more layers before the last, as diffusers
        counts), side by side, and the second encoder's pooled projection (of each text's first chunk, in
        A1111's syntax)."""
        states = []
        encoders = (("text_encoder", self.tokenizer, prompts), ("text_encoder_2", self.tokenizer_2, prompts_2))
        if "text_encoder" not in self.components_used:  # a refiner: diffusers feeds the second encoder `prompt`
            encoders = (("text_encoder_2", self.tokenizer_2, prompts),)
        chunks = max(len(t.chunks(text)[0]) for _, t, texts in encoders for text in texts) if syntax != "plain" else 1
        for name, tokenizer, texts in encoders:
            encoder = self.component(name)
            ids, weights = encode_inputs(tokenizer, texts, syntax, chunks)
            ids = ids.astype(encoder.input_dtype("input_ids", np.int32))
            outputs = dict(zip(encoder.output_names, encoder(input_ids=ids), strict=True))
            hidden = sorted((k for k in outputs if k.startswith("hidden_states.")), key=lambda k: int(k.split(".")[1]))
            states.append(emphasized(outputs[hidden[-2 - (clip_skip or 0)]], weights, len(texts)))
            self.release(name)
        pooled = outputs["text_embeds"]
        pooled = pooled if weights is None else pooled[:: len(pooled) // len(texts)]
        return np.concatenate(states, axis=-1), pooled


def _per_prompt(value: str | tuple[str, ...] | None, count: int) -> list[str] | None:
    if value is None:
        return None
    return [value] * count if isinstance(value, str) else list(value) * (count // len(value))


def _repeat_per_prompt(values: np.ndarray, per_prompt: int) -> np.ndarray:
    """[uncond; cond] or [cond] batches with each prompt's rows repeated per image, as diffusers orders them."""
    return values.repeat(per_prompt, axis=0)


__all__ = ["StableDiffusionXLPipeline"]
