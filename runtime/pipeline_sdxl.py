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
from .pipeline import StableDiffusionPipeline
from .request import GenerationRequest
from .tokenizer import CLIPTokenizer

BASE_TIME_IDS = 6  # a refiner takes 5 (an aesthetic score instead of the target size)


class StableDiffusionXLPipeline(StableDiffusionPipeline):
    """SDXL base: txt2img and img2img with the base pipeline's settings; `prompt_2` is the prompt itself."""

    components_used = ("text_encoder", "text_encoder_2", "unet", "vae_decoder")

    def __init__(self, folder, manifest, config, scheduler, session_config, low_memory=False) -> None:  # noqa: ANN001
        if config.time_ids_count != BASE_TIME_IDS:
            raise ManifestError(
                f"{folder}: an SDXL UNet with {config.time_ids_count} time ids (a refiner?) is not supported yet"
            )
        self.tokenizer_2 = CLIPTokenizer(folder / "tokenizer_2", config.max_token_length)
        super().__init__(folder, manifest, config, scheduler, session_config, low_memory)

    def conditioning(self, request: GenerationRequest, do_cfg: bool) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        prompts = request.prompts
        embeddings, pooled = self.encode_prompts(prompts, _per_prompt(request.prompt_2, len(prompts)) or prompts)
        if do_cfg:
            negatives = request.negative_prompts
            if negatives is None and self.config.force_zeros_for_empty_prompt:
                negative, negative_pooled = np.zeros_like(embeddings), np.zeros_like(pooled)
            else:
                negatives = negatives or [""] * len(prompts)
                negatives_2 = _per_prompt(request.negative_prompt_2, len(prompts)) or negatives
                negative, negative_pooled = self.encode_prompts(negatives, negatives_2)
            embeddings = np.concatenate([negative, embeddings])
            pooled = np.concatenate([negative_pooled, pooled])
        self.release("text_encoder")
        self.release("text_encoder_2")
        embeddings, pooled = _repeat_per_prompt(embeddings, request.batch), _repeat_per_prompt(pooled, request.batch)
        size = (request.height, request.width)
        crop = request.crops_coords_top_left or (0, 0)
        sizes = [*(request.original_size or size), *crop, *(request.target_size or size)]
        time_ids = np.tile(np.array(sizes, np.float32), (len(pooled), 1))
        return embeddings, {"text_embeds": pooled, "time_ids": time_ids}

    def encode_prompts(self, prompts: list[str], prompts_2: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Both encoders' penultimate hidden states, concatenated, and the second encoder's pooled projection."""
        states = []
        for name, tokenizer, texts in (
            ("text_encoder", self.tokenizer, prompts),
            ("text_encoder_2", self.tokenizer_2, prompts_2),
        ):
            encoder = self.component(name)
            ids = tokenizer(texts).astype(encoder.input_dtype("input_ids", np.int32))
            outputs = dict(zip(encoder.output_names, encoder(input_ids=ids), strict=True))
            hidden = sorted((k for k in outputs if k.startswith("hidden_states.")), key=lambda k: int(k.split(".")[1]))
            states.append(outputs[hidden[-2]])
        return np.concatenate(states, axis=-1), outputs["text_embeds"]


def _per_prompt(value: str | tuple[str, ...] | None, count: int) -> list[str] | None:
    if value is None:
        return None
    return [value] * count if isinstance(value, str) else list(value) * (count // len(value))


def _repeat_per_prompt(values: np.ndarray, per_prompt: int) -> np.ndarray:
    """[uncond; cond] or [cond] batches with each prompt's rows repeated per image, as diffusers orders them."""
    return values.repeat(per_prompt, axis=0)


__all__ = ["StableDiffusionXLPipeline"]
