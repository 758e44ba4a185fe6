"""NumPy schedulers, configured from an exported `scheduler_config.json`.

Names accepted: our short names ("dpmpp_2m_karras"), diffusers class names ("DPMSolverMultistepScheduler")
and A1111 sampler names ("DPM++ 2M Karras", "Euler a"), case-insensitively.
"""

from __future__ import annotations

from typing import Any

from ..echo import echo
from .base import NoiseSource, Scheduler
from .ddim import DDIMScheduler
from .ddpm import DDPMScheduler
from .dpmpp_2m import DPMSolverMultistepScheduler
from .euler import EulerScheduler
from .euler_ancestral import EulerAncestralScheduler
from .lcm import LCMScheduler
from .lms import LMSScheduler
from .pndm import PNDMScheduler

KARRAS = {"use_karras_sigmas": True}

# short name -> (class, config overrides, other accepted names)
SCHEDULERS: dict[str, tuple[type[Scheduler], dict[str, Any], tuple[str, ...]]] = {
    "pndm": (PNDMScheduler, {}, ("PNDMScheduler", "PLMS")),
    "ddim": (DDIMScheduler, {}, ("DDIMScheduler", "DDIM")),
    "euler": (EulerScheduler, {}, ("EulerDiscreteScheduler", "Euler")),
    "euler_a": (EulerAncestralScheduler, {}, ("EulerAncestralDiscreteScheduler", "Euler a", "euler_ancestral")),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {}, ("DPMSolverMultistepScheduler", "DPM++ 2M")),
    "dpmpp_2m_karras": (DPMSolverMultistepScheduler, KARRAS, ("DPM++ 2M Karras",)),
    "lms": (LMSScheduler, {}, ("LMSDiscreteScheduler", "LMS")),
    "lms_karras": (LMSScheduler, KARRAS, ("LMS Karras",)),
    "lcm": (LCMScheduler, {}, ("LCMScheduler", "LCM")),
    "ddpm": (DDPMScheduler, {}, ("DDPMScheduler", "DDPM")),
}
_BY_NAME = {alias.lower(): key for key, (_, _, aliases) in SCHEDULERS.items() for alias in (key, *aliases)}


def scheduler_names() -> list[str]:
    """Every accepted name, for help texts and the A1111 samplers endpoint."""
    return [name for key, (_, _, aliases) in SCHEDULERS.items() for name in (key, *aliases)]


def resolve_name(name: str) -> str:
    """Short name for any accepted spelling; ValueError naming the choices otherwise."""
    key = _BY_NAME.get(str(name).strip().lower())
    if key is None:
        raise ValueError(
            f"unknown scheduler {echo(name)} (known: {', '.join(SCHEDULERS)}, or their diffusers/A1111 names)"
        )
    return key


def follows_zero_snr(key: str) -> bool:
    """Whether a sampler can run a zero-terminal-SNR schedule (its diffusers counterpart offers
    `rescale_betas_zero_snr`); the others would silently run another noise schedule than the model's."""
    cls, _, _ = SCHEDULERS[key]
    return "rescale_betas_zero_snr" in cls.defaults


def make_scheduler(name: str, config: dict[str, Any], eta: float = 0.0) -> Scheduler:
    """Build the named scheduler from a diffusers scheduler config (unknown keys are ignored); `eta` is the
    stochasticity of the samplers that take one (DDIM). One rule for every sampler: a schedule it cannot
    follow is a ValueError saying why, never a silent substitute."""
    key = resolve_name(name)
    cls, overrides, _ = SCHEDULERS[key]
    if config.get("rescale_betas_zero_snr"):
        able = ", ".join(k for k in SCHEDULERS if follows_zero_snr(k) and not SCHEDULERS[k][1].get("use_karras_sigmas"))
        if not follows_zero_snr(key):
            raise ValueError(
                f"{key} cannot follow this model's zero-terminal-SNR noise schedule (rescale_betas_zero_snr); "
                f"samplers that can: {able}"
            )
        if overrides.get("use_karras_sigmas") or config.get("use_karras_sigmas"):
            # Measured: from sigma 4096 the Karras steps crowd at t=999, where DPM++ 2M's second-order term
            # amplifies one-ulp differences in float32 sigmas into 0.7 % of the sample after 25 steps.
            raise ValueError(
                f"{key}: Karras sigmas are numerically unstable on this model's zero-terminal-SNR schedule "
                f"(they start at sigma 4096); samplers that can: {able}"
            )
    return cls(**{**config, **overrides}, eta=eta)


__all__ = ["NoiseSource", "Scheduler", "make_scheduler", "resolve_name", "scheduler_names", "SCHEDULERS"]
