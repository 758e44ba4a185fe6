"""What Z-Image (Turbo) adds (diffusers' ZImagePipeline): a single-stream DiT on 16-channel latents, conditioned
on the penultimate hidden states of a Qwen3 encoder that reads each prompt as a chat turn (thinking on), of each
prompt's valid tokens only; sampled by flow matching over sigmas 1 .. 1/N (the scheduler's shift on top). The
transformer is given (1000 - t) / 1000 and predicts the negated velocity.

Its guidance differs from the others' in two ways diffusers defines: classifier-free guidance is on for any
guidance scale above 0 (Z-Image-Turbo runs at 0: none), and a scale g is applied as cond + g (cond - uncond),
which is the shared policy's uncond + (1 + g)(cond - uncond). (ZImagePipeline's cfg_normalization and
cfg_truncation are off by default and not offered.)

diffusers hands the transformer a list of prompt states of each prompt's length; the exported graph takes them as
one batch with their attention mask (exporter/components_llm.py), which the runtime cuts to the longest prompt
padded to a multiple of 32, as diffusers' transformer pads it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..chat_template import ChatPrompts
from ..request import GenerationRequest
from .base import Conditioning, FlowMatching
from .clip import plain_texts
from .llm import encode_outputs

SEQ_MULTI_OF = 32  # the transformer pads each prompt's tokens to a multiple of 32


class ZImage(FlowMatching):
    name = "z_image"
    pipeline_class = "ZImagePipeline"
    label = "Z-Image"
    request_fields = frozenset({"max_sequence_length"})

    def load_tokenizers(self) -> dict:
        length = self.config.max_sequence_length
        return {"text_encoder": ChatPrompts(self.folder, "tokenizer", "text_encoder", length, True, True)}

    def uses_cfg(self, guidance_scale: float) -> bool:
        return guidance_scale > 0

    def cfg_scale(self, guidance_scale: float) -> float:
        return 1.0 + guidance_scale

    def conditioning(self, pipe: Any, request: GenerationRequest, do_cfg: bool) -> Conditioning:
        """[negative; prompt] states of each text's tokens (an absent negative prompt is ""), padded together to
        the longest's multiple of 32, with their mask."""
        texts = plain_texts(request.prompts, request.prompt_syntax)
        if do_cfg:
            texts = plain_texts(request.negative_prompts or [""] * len(texts), request.prompt_syntax) + texts
        outputs, mask = encode_outputs(pipe, self.tokenizers["text_encoder"], texts, request.max_sequence_length)
        states = next(iter(outputs.values()))  # the one layer the graph returns (hidden_states[-2])
        length = max(1, -(-int(mask.sum(axis=1).max()) // SEQ_MULTI_OF)) * SEQ_MULTI_OF
        mask = mask_of(mask, length)
        states = np.pad(states[:, :length], ((0, 0), (0, length - min(length, states.shape[1])), (0, 0)))
        states = states * mask[..., None]  # what lies past a prompt is masked; zeros keep it finite
        extra = {"encoder_attention_mask": mask.repeat(request.batch, axis=0)}
        return Conditioning(states.astype(np.float32).repeat(request.batch, axis=0), extra)

    def set_timesteps(self, sched: Any, request: GenerationRequest) -> None:
        """diffusers' Z-Image: sigmas from 1 to 1/N; `mu` from the image's token count, which only a scheduler
        that shifts dynamically uses (Z-Image-Turbo's shifts by 3, fixed)."""
        from ..schedulers.flow_match_euler import calculate_shift

        n = request.steps
        side = self.config.vae_scale_factor * (self.config.patch_size or 2)
        seq = (request.height // side) * (request.width // side)
        sigmas = np.linspace(1.0, 1 / n, n, dtype=np.float32)
        sched.set_timesteps(n, sigmas=sigmas, mu=calculate_shift(seq, sched.config))

    def denoiser_feeds(self, graph: Any, sample: np.ndarray, t: float, cond: Conditioning) -> dict[str, Any]:
        thousand = np.float32(1000)
        timestep = np.full(len(sample), (thousand - np.float32(t)) / thousand, graph.input_dtype("timestep"))
        mask = cond.extra["encoder_attention_mask"]
        return {
            "hidden_states": sample,
            "timestep": timestep,
            "encoder_hidden_states": cond.text,
            "encoder_attention_mask": mask.astype(graph.input_dtype("encoder_attention_mask", np.int32)),
        }

    def denoiser_output(self, output: np.ndarray, sample: np.ndarray) -> np.ndarray:
        return -output


def mask_of(mask: np.ndarray, length: int) -> np.ndarray:
    """`mask` cut or zero-padded to `length` tokens."""
    return np.pad(mask[:, :length], ((0, 0), (0, max(length - mask.shape[1], 0)))).astype(np.int32)
