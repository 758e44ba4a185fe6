"""What a model family is: the pieces it names around the shared generation loop.

A generation is a request, conditioning (the family's text encoders -> the tensors its denoiser takes), a
denoiser (a UNet or transformer graph, with its own input packing), a sampler loop over a schedule
(sampling.py), a guidance policy (guidance.py) and a decoder (the VAE, in the pipeline). A family supplies the
first two and its schedule; everything else is shared, so a new family is one small module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from ..inpaint import latent_mask
from ..manifest import Manifest, ModelConfig
from ..tokenizer import CLIPTokenizer

if TYPE_CHECKING:
    from ..request import GenerationRequest
    from ..schedulers import Scheduler
    from ..session import OnnxModel


@dataclass
class Conditioning:
    """What the denoiser is conditioned on, batched as it is called: with classifier-free guidance the
    unconditional rows first, then the conditional ones. `text`: the text states (`encoder_hidden_states`);
    `extra`: the denoiser's other per-row inputs (SDXL's pooled embedding and time ids, LCM's guidance
    embedding, FLUX's ids), by graph input name."""

    text: np.ndarray
    extra: dict[str, np.ndarray] = field(default_factory=dict)
    # Inputs that are the same for every row (FLUX's positional ids), passed as they are.
    shared: dict[str, np.ndarray] = field(default_factory=dict)
    # Reference image tokens (1, tokens, channels) every row's denoiser attends to beside its latents (FLUX.2).
    references: np.ndarray | None = None

    def conditional_half(self) -> Conditioning:
        """The conditional rows alone (guided conditioning is [unconditional; conditional])."""
        half = len(self.text) // 2
        extra = {k: v[len(v) // 2 :] for k, v in self.extra.items()}
        return Conditioning(self.text[half:], extra, self.shared, self.references)


def texts_or(value: str | tuple[str, ...] | None, fallback: list[str]) -> list[str]:
    """A second prompt field (`prompt_2`) as one text per row of `fallback`, or `fallback` where it is absent."""
    if value is None:
        return fallback
    return [value] * len(fallback) if isinstance(value, str) else list(value)


class Family:
    """A model family as data plus the few functions that differ: which graphs it runs, how prompts become
    the denoiser's conditioning, how latents enter and leave its denoiser, and its schedule. Methods that run
    graphs take the pipeline (`pipe`) so that a pipeline copied with other LoRAs runs its own sessions."""

    name: ClassVar[str]
    pipeline_class: ClassVar[str]  # diffusers' name for this family's pipeline
    label: ClassVar[str]  # how messages name it: "SDXL"
    denoiser: ClassVar[str] = "unet"
    # The request fields beyond the common ones that this family reads (others are refused, not ignored).
    request_fields: ClassVar[frozenset[str]] = frozenset()
    # The most text tokens a request's max_sequence_length may ask for (diffusers' bound for T5 and the LLMs).
    max_sequence_limit: ClassVar[int] = 512
    # An inpainting denoiser's pipeline encodes the init image (a draw from the generator) even at strength 1
    # (FluxFillPipeline does; diffusers' inpainting UNet pipelines skip it).
    fill_encodes_image: ClassVar[bool] = False
    # Each text encoder graph -> the tokenizer folder it reads.
    tokenizer_folders: ClassVar[dict[str, str]] = {"text_encoder": "tokenizer"}
    # Whether a request's `image` is a reference the denoiser attends to (FLUX.2 [klein] edits from it) rather
    # than an img2img start: no strength, and the output takes the reference's size unless told otherwise.
    reference_images: ClassVar[bool] = False
    max_references: ClassVar[int] = 1  # how many references one request may give (a list as `image`)

    def __init__(self, folder: Path, config: ModelConfig, manifest: Manifest | None) -> None:
        self.folder, self.config, self.manifest = folder, config, manifest
        self.tokenizers: dict[str, CLIPTokenizer] = self.load_tokenizers()

    @classmethod
    def recognizes(cls, config: ModelConfig) -> bool:
        """Whether a model with `config` belongs to this family (an exported folder names its family)."""
        return config.family == cls.name

    def load_tokenizers(self) -> dict[str, CLIPTokenizer]:
        from ..tokenizer import tokenizer_for

        return {
            encoder: tokenizer_for(self.folder, folder, encoder, self.config.max_token_length)
            for encoder, folder in self.tokenizer_folders.items()
        }

    @property
    def components(self) -> tuple[str, ...]:
        """The graphs txt2img runs besides the decoder, in the order they run."""
        return (*self.tokenizers, self.denoiser)

    def uses_cfg(self, guidance_scale: float) -> bool:
        """Whether guidance runs the denoiser on a second, unconditional half of the batch (classifier-free
        guidance); a model distilled with guidance as an input (LCM) never does."""
        return guidance_scale > 1.0 and not self.config.time_cond_proj_dim

    def cfg_scale(self, guidance_scale: float) -> float:
        """The weight w of the shared guidance, uncond + w (cond - uncond), that a request's `guidance_scale` means
        (Z-Image's g is cond + g (cond - uncond): w = 1 + g)."""
        return guidance_scale

    def conditioning(self, pipe: Any, request: GenerationRequest, do_cfg: bool) -> Conditioning:
        raise NotImplementedError

    def check_request(self, request: GenerationRequest) -> None:
        """RequestError for a resolved request this family's graphs cannot run (beyond the shared checks)."""

    @classmethod
    def reference_size(cls, image: Any, config: ModelConfig) -> tuple[int, int]:
        """(width, height) a reference image is encoded at (families with `reference_images`); RequestError
        naming `image` for one the family cannot take."""
        raise NotImplementedError

    def set_timesteps(self, sched: Scheduler, request: GenerationRequest) -> None:
        """The schedule this request samples (FLUX shifts it by the image's size)."""
        sched.set_timesteps(request.steps)

    @staticmethod
    def first_step(steps: int, strength: float) -> int:
        """Where img2img at `strength` enters a schedule of `steps` (diffusers' UNet pipelines round the steps
        taken down)."""
        return steps - min(int(steps * strength), steps)

    def denoiser_feeds(self, graph: OnnxModel, sample: np.ndarray, t: float, cond: Conditioning) -> dict[str, Any]:
        """The denoiser graph's inputs for latents `sample` (already batched for guidance) at timestep `t`."""
        raise NotImplementedError

    def denoiser_output(self, output: np.ndarray, sample: np.ndarray) -> np.ndarray:
        """The denoiser's prediction in the latents' layout (packing families unpack here)."""
        return output

    def inpaint_channels(self, mask: np.ndarray, masked_latents: np.ndarray) -> np.ndarray:
        """What an inpainting denoiser takes beside its latents, for the (1, 1, H, W) pixel mask and the masked
        image's latents: an inpainting UNet the latent-sized mask, then the masked image's latents."""
        small = latent_mask(mask, self.config.vae_scale_factor, len(masked_latents))
        return np.concatenate([small, masked_latents], axis=1)

    def sampler_prediction(
        self, sched: Scheduler, prediction: np.ndarray, model_input: np.ndarray, t: float
    ) -> np.ndarray:
        """The (guided) prediction for `model_input` at `t` as the sampler's `step` takes it: the prediction itself
        (SANA-Sprint turns its flow velocity into the TrigFlow velocity that sCM steps on)."""
        return prediction

    def final_latents(self, sched: Scheduler, latents: np.ndarray) -> np.ndarray:
        """The sampled latents as the decoder takes them: themselves (SANA-Sprint divides by sCM's sigma_data)."""
        return latents


class FlowMatching(Family):
    """Transformer families sampled by flow matching (SD3, FLUX, ...): what they share."""

    denoiser = "transformer"

    @classmethod
    def recognizes(cls, config: ModelConfig) -> bool:
        return config.family == cls.name

    @staticmethod
    def first_step(steps: int, strength: float) -> int:
        """diffusers' flow-matching img2img pipelines round the steps skipped down instead."""
        return int(max(steps - min(steps * strength, steps), 0))
