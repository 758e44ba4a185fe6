"""What SANA and SANA-Sprint add (diffusers' SanaPipeline and SanaSprintPipeline): a linear-attention DiT on
32-channel DC-AE latents, conditioned on Gemma-2's states with their attention mask.

A prompt is read (lower-cased, stripped) behind SANA's complex human instruction, tokenized to the instruction's
length plus `max_sequence_length` - 2 and cut to its first token and last `max_sequence_length` - 1 ones, as the
pipelines select them (the negative prompt is read alone, its first `max_sequence_length` tokens). SANA samples
by flow matching with classifier-free guidance; SANA-Sprint by sCM (TrigFlow, 1-4 steps) with the guidance scale
embedded: its transformer takes the flow time sin t / (sin t + cos t) and returns a flow velocity, which the
sampler's conversions (schedulers/scm.py) turn into the TrigFlow velocity it steps on.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from ..request import GenerationRequest
from ..schedulers.scm import SCMScheduler
from ..sequence_tokenizer import SequenceTokenizer, sequence_tokenizer_for
from ..tokenizer import load_tokenizer_file
from .base import Conditioning, FlowMatching
from .clip import plain_texts

LOG = logging.getLogger("sd_onnx")
# diffusers' default `complex_human_instruction` (SanaPipeline and SanaSprintPipeline), joined with newlines.
COMPLEX_HUMAN_INSTRUCTION = "\n".join(
    [
        "Given a user prompt, generate an 'Enhanced prompt' that provides detailed visual descriptions suitable for "
        "image generation. Evaluate the level of detail in the user prompt:",
        "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, and spatial "
        "relationships to create vivid and concrete scenes.",
        "- If the prompt is already detailed, refine and enhance the existing details slightly without "
        "overcomplicating.",
        "Here are examples of how to transform or refine prompts:",
        "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up in a round shape, sleeping "
        "peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.",
        "- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, featuring glowing street "
        "lamps, a diverse crowd of people in colorful clothing, and a double-decker bus passing by towering glass "
        "skyscrapers.",
        "Please generate only the enhanced description for the prompt below and avoid including any additional "
        "commentary or evaluations:",
        "User Prompt: ",
    ]
)


class Sana(FlowMatching):
    name = "sana"
    pipeline_class = "SanaPipeline"
    label = "SANA"

    def load_tokenizers(self) -> dict:
        """The instructed prompts' tokenizer (the instruction's tokens, `<bos>` included, + max_sequence_length - 2)
        as the text encoder's; the negative prompts' (max_sequence_length) beside it."""
        length = self.config.max_sequence_length
        self.negative_tokenizer = sequence_tokenizer_for(self.folder, "tokenizer", "text_encoder", length)
        instruction = len(load_tokenizer_file(self.folder / "tokenizer").encode(COMPLEX_HUMAN_INSTRUCTION).ids)
        prompts = sequence_tokenizer_for(self.folder, "tokenizer", "text_encoder", instruction + length - 2)
        return {"text_encoder": prompts}

    def conditioning(self, pipe: Any, request: GenerationRequest, do_cfg: bool) -> Conditioning:
        """[negative; prompt] Gemma states and their masks, each prompt's rows repeated per image."""
        prompts = [_clean(p) for p in plain_texts(request.prompts, request.prompt_syntax)]
        instructed = [COMPLEX_HUMAN_INSTRUCTION + p for p in prompts]
        text, mask = self.encode(pipe, self.tokenizers["text_encoder"], instructed, select=True)
        if do_cfg:
            negatives = request.negative_prompts or [""] * len(prompts)
            negatives = [_clean(n) for n in plain_texts(negatives, request.prompt_syntax)]
            negative, negative_mask = self.encode(pipe, self.negative_tokenizer, negatives, select=False)
            text, mask = np.concatenate([negative, text]), np.concatenate([negative_mask, mask])
        pipe.release("text_encoder")
        batch = request.batch
        return Conditioning(text.repeat(batch, axis=0), {"encoder_attention_mask": mask.repeat(batch, axis=0)})

    def encode(
        self, pipe: Any, tokenizer: SequenceTokenizer, texts: list[str], select: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        """Gemma's states and the attention mask of `texts`; `select`: of the first token and the last
        max_sequence_length - 1 (diffusers' select_index)."""
        ids, mask = tokenizer.encode(texts)
        graph = pipe.component("text_encoder")
        feeds = {
            "input_ids": ids.astype(graph.input_dtype("input_ids", np.int32)),
            "attention_mask": mask.astype(graph.input_dtype("attention_mask", np.int32)),
        }
        states = graph(**feeds)[0].astype(np.float32)
        if select:
            keep = [0, *range(ids.shape[1] - self.config.max_sequence_length + 1, ids.shape[1])]
            states, mask = states[:, keep], mask[:, keep]
        return states, mask

    def model_timestep(self, t: float) -> np.float32:
        """The transformer's timestep for the sampler's `t` (SanaPipeline: t x timestep_scale)."""
        return np.float32(t) * np.float32(self.config.timestep_scale)

    def denoiser_feeds(self, graph: Any, sample: np.ndarray, t: float, cond: Conditioning) -> dict[str, Any]:
        timestep = np.full(len(sample), self.model_timestep(t), graph.input_dtype("timestep"))
        mask = cond.extra["encoder_attention_mask"].astype(graph.input_dtype("encoder_attention_mask", np.int64))
        feeds = {"hidden_states": sample, "encoder_hidden_states": cond.text, "timestep": timestep}
        return {**feeds, **cond.extra, "encoder_attention_mask": mask}

    def denoiser_output(self, output: np.ndarray, sample: np.ndarray) -> np.ndarray:
        """A transformer that also predicts the variance (twice the channels): the prediction's half, as diffusers."""
        return output[:, : sample.shape[1]] if output.shape[1] == 2 * sample.shape[1] else output


class SanaSprint(Sana):
    name = "sana_sprint"
    pipeline_class = "SanaSprintPipeline"
    label = "SANA-Sprint"

    def uses_cfg(self, guidance_scale: float) -> bool:
        return False

    def conditioning(self, pipe: Any, request: GenerationRequest, do_cfg: bool) -> Conditioning:
        """SANA's conditioning of the prompts, and the embedded guidance: the scale x guidance_embeds_scale."""
        if any(request.negative_prompts or ()):
            LOG.warning("SANA-Sprint has no classifier-free guidance: the negative prompt is not used")
        cond = super().conditioning(pipe, request, False)
        scale = np.float32(request.guidance_scale) * np.float32(self.config.guidance_embeds_scale)
        cond.extra["guidance"] = np.full(request.image_count, scale, np.float32)
        return cond

    def model_timestep(self, t: float) -> np.float32:
        """sCM's angle t as the transformer's flow time sin t / (sin t + cos t)."""
        return np.float32(SCMScheduler.model_timestep(t))

    def sampler_prediction(self, sched: Any, prediction: np.ndarray, model_input: np.ndarray, t: float) -> np.ndarray:
        """The transformer's flow velocity as sCM's TrigFlow velocity (SanaSprintPipeline's conversion)."""
        return sched.model_velocity(prediction, model_input, t)

    def final_latents(self, sched: Any, latents: np.ndarray) -> np.ndarray:
        """sCM's last sample is x0 in sigma_data units: the decoder's latents are it divided by sigma_data."""
        return (latents / np.float32(sched.config["sigma_data"])).astype(np.float32)


def _clean(text: str) -> str:
    """The pipelines' text preprocessing without `clean_caption`: lower case, surrounding spaces stripped."""
    return text.lower().strip()
