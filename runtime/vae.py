"""Which autoencoder a pipeline decodes (and encodes) with: the model's own VAE (a KL autoencoder, or SANA's DC-AE),
or a tiny autoencoder (TAESD) exported beside it or as the model's own, each with its own latent scaling.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from .manifest import FLOAT_DECODER, ManifestError, ModelConfig


@dataclass(frozen=True)
class VaeChoice:
    """Which decoder and encoder a pipeline uses, and how their latents are scaled."""

    decoder: str
    encoder: str
    scaling_factor: float
    shift_factor: float | None
    tiny: bool
    # Whether the encoder returns the latents themselves (a tiny autoencoder, SANA's DC-AE), not a posterior's
    # mean and log-variance to sample them from.
    deterministic: bool = False


VAE_OPTIONS = ("auto", "full", "tiny")


def choose_vae(vae: str, config: ModelConfig, folder: Path) -> VaeChoice:
    """The model's own VAE ("auto", "full") or a tiny autoencoder ("tiny": the one exported beside it, else the
    model's own if that is tiny); ManifestError when the folder has no such VAE."""
    if vae not in VAE_OPTIONS:
        raise ValueError(f"vae must be one of {', '.join(VAE_OPTIONS)}, got {vae!r}")
    kind, scaling = config.vae_kind, config.scaling_factor
    own = VaeChoice("vae_decoder", "vae_encoder", scaling, config.shift_factor, kind == "tiny", kind in ("tiny", "dc"))
    if vae == "tiny" and config.tiny_vae_scaling_factor is not None:
        scaling, shift = config.tiny_vae_scaling_factor, config.tiny_vae_shift_factor
        return VaeChoice("tiny_vae_decoder", "tiny_vae_encoder", scaling, shift, True, True)
    if vae == "tiny" and not own.tiny:
        raise ManifestError(f"{folder}: has no tiny autoencoder (export one with sd-export convert --vae TAESD_FOLDER)")
    if vae == "full" and own.tiny:
        raise ManifestError(f"{folder}: its only VAE is a tiny autoencoder")
    return own


def choose_decoder(choice: VaeChoice, components: tuple[str, ...], on_openvino: bool, low_memory: bool) -> VaeChoice:
    """`choice` with the fp32 decoder an int8 export keeps beside its int8 one (FLOAT_DECODER) where OpenVINO runs
    it (`on_openvino`), outside low-memory mode: OpenVINO runs the float decoder in bf16 faster than any engine
    runs the int8 one on a Xeon with AMX (docs/performance.md). Low-memory mode keeps the int8 decoder, whose
    group norms run in chunks."""
    if choice.decoder != "vae_decoder" or FLOAT_DECODER not in components or not on_openvino or low_memory:
        return choice
    return replace(choice, decoder=FLOAT_DECODER)


__all__ = ["VAE_OPTIONS", "VaeChoice", "choose_decoder", "choose_vae"]
