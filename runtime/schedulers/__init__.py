"""NumPy schedulers, configured from an exported `scheduler_config.json`.

Names accepted: our short names ("dpmpp_2m_karras"), diffusers class names ("DPMSolverMultistepScheduler")
and A1111 sampler names ("DPM++ 2M Karras", "Euler a"), case-insensitively.

Flow-matching models (SD3, FLUX, SANA-Sprint) have their own samplers, in `FLOW_SCHEDULERS`: "flow_euler" and
"scm". A1111 Forge and ComfyUI call FLUX's sampler "Euler" (schedule "Simple"), a name that stays the DDPM
Euler here; the flow one answers to "Euler flow", "euler_flow", "FlowMatchEuler" and its diffusers class name,
and a model's config decides which kind runs (`is_flow_matching`): any other pairing is refused with the
samplers that can.
"""

from __future__ import annotations

from typing import Any

from ..echo import echo
from .base import NoiseSource, Scheduler
from .ddim import DDIMScheduler
from .ddpm import DDPMScheduler
from .dpmpp_2m import DPMSolverMultistepScheduler, FlowDPMSolverMultistepScheduler
from .euler import EulerScheduler
from .euler_ancestral import EulerAncestralScheduler
from .flow_match_euler import FlowMatchEulerScheduler, calculate_shift
from .lcm import LCMScheduler
from .lms import LMSScheduler
from .pndm import PNDMScheduler
from .scm import SCMScheduler

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
# The samplers of flow-matching models, apart (`SCHEDULERS` are the DDPM-family ones); `ALL_SCHEDULERS` both.
FLOW_SCHEDULERS: dict[str, tuple[type[Scheduler], dict[str, Any], tuple[str, ...]]] = {
    "flow_euler": (
        FlowMatchEulerScheduler,
        {},
        ("FlowMatchEulerDiscreteScheduler", "FlowMatchEuler", "Euler flow", "euler_flow"),
    ),
    "scm": (SCMScheduler, {}, ("SCMScheduler", "sCM")),
    # DPM-Solver++(2M) on flow sigmas: the sampler of models whose own config is DPMSolverMultistepScheduler with
    # use_flow_sigmas (SANA); its shift is the config's static flow_shift, so it follows no other flow schedule.
    "dpmpp_2m_flow": (FlowDPMSolverMultistepScheduler, {}, ("DPM++ 2M flow", "DPMSolverMultistepScheduler flow")),
}
ALL_SCHEDULERS = {**SCHEDULERS, **FLOW_SCHEDULERS}
_BY_NAME = {alias.lower(): key for key, (_, _, aliases) in ALL_SCHEDULERS.items() for alias in (key, *aliases)}

# diffusers' flow-matching scheduler classes; a config of any other class (or with a beta schedule) is DDPM-style.
FLOW_CLASSES = frozenset(
    {"FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler", "FlowMatchLCMScheduler", "SCMScheduler"}
)
BETA_KEYS = ("beta_start", "beta_end", "beta_schedule", "trained_betas")
FAMILY_NAMES = {
    "ddpm": "DDPM-style (beta schedule)",
    "flow": "rectified-flow (FlowMatch)",
    "trigflow": "TrigFlow (sCM)",
}


def _samples(key: str, family: str, config: dict[str, Any]) -> bool:
    """Whether sampler `key` can run a model of `family` with scheduler `config` (DPM-Solver's flow sigmas follow
    no schedule but their own: only configs that name them)."""
    cls = ALL_SCHEDULERS[key][0]
    return cls.family == family and (cls is not FlowDPMSolverMultistepScheduler or bool(config.get("use_flow_sigmas")))


def default_sampler(config: dict[str, Any]) -> str:
    """The sampler a model's scheduler config names (its class; DPM-Solver in flow mode is `dpmpp_2m_flow`)."""
    return sampler_for(resolve_name(config.get("_class_name", "pndm")), config)


def sampler_for(key: str, config: dict[str, Any]) -> str:
    """Sampler `key` as it runs on a model with scheduler `config`, as Forge reads A1111's names on flow models:
    "Euler" is Euler on the model's flow sigmas (`flow_euler`; sCM for SANA-Sprint), "DPM++ 2M" on a model whose
    config is DPM-Solver in flow mode (SANA) `dpmpp_2m_flow`."""
    if key == "euler" and is_flow_matching(config):
        return "scm" if model_family(config) == "trigflow" else "flow_euler"
    if key == "dpmpp_2m" and config.get("use_flow_sigmas"):
        return "dpmpp_2m_flow"
    return key


def scheduler_names() -> list[str]:
    """Every accepted name, for help texts and the A1111 samplers endpoint."""
    return [name for key, (_, _, aliases) in ALL_SCHEDULERS.items() for name in (key, *aliases)]


def resolve_name(name: str) -> str:
    """Short name for any accepted spelling; ValueError naming the choices otherwise."""
    key = _BY_NAME.get(str(name).strip().lower())
    if key is None:
        raise ValueError(
            f"unknown scheduler {echo(name)} (known: {', '.join(ALL_SCHEDULERS)}, or their diffusers/A1111 names)"
        )
    return key


def model_family(config: dict[str, Any]) -> str | None:
    """What a scheduler config says the model is: "flow" (rectified flow: a FlowMatch class, or
    `prediction_type` "flow_prediction" / `use_flow_sigmas` as SANA's DPM-Solver config), "trigflow" (sCM),
    "ddpm" (another class, or beta-schedule keys), or None when it says nothing (each sampler's defaults)."""
    class_name = str(config.get("_class_name") or "")
    if class_name == "SCMScheduler" or config.get("prediction_type") == "trigflow":
        return "trigflow"
    flow = class_name.startswith("FlowMatch") or class_name in FLOW_CLASSES
    if flow or config.get("prediction_type") == "flow_prediction" or config.get("use_flow_sigmas"):
        return "flow"
    if class_name or any(k in config for k in BETA_KEYS):
        return "ddpm"
    return None


def is_flow_matching(config: dict[str, Any]) -> bool:
    """Whether a scheduler config belongs to a flow-matching model (rectified flow or TrigFlow), which only the
    samplers in `FLOW_SCHEDULERS` can sample."""
    return model_family(config) in ("flow", "trigflow")


def follows_zero_snr(key: str) -> bool:
    """Whether a sampler can run a zero-terminal-SNR schedule (its diffusers counterpart offers
    `rescale_betas_zero_snr`); the others would silently run another noise schedule than the model's."""
    cls, _, _ = ALL_SCHEDULERS[key]
    return "rescale_betas_zero_snr" in cls.defaults


def make_scheduler(name: str, config: dict[str, Any], eta: float = 0.0) -> Scheduler:
    """Build the named scheduler from a diffusers scheduler config (unknown keys are ignored); `eta` is the
    stochasticity of the samplers that take one (DDIM). One rule for every sampler: a schedule it cannot
    follow is a ValueError saying why, never a silent substitute."""
    key = resolve_name(name)
    cls, overrides, _ = ALL_SCHEDULERS[key]
    family = model_family(config)
    if family is not None and not _samples(key, family, config):
        able = ", ".join(k for k in ALL_SCHEDULERS if _samples(k, family, config))
        if cls.family == family:  # DPM-Solver's flow sigmas on another flow schedule
            raise ValueError(
                f"{key} follows DPM-Solver's own flow sigmas, which this model's scheduler does not use "
                f"(use_flow_sigmas); samplers that can: {able}"
            )
        kind = "flow-matching" if family != "ddpm" and cls.family == "ddpm" else FAMILY_NAMES[family]
        raise ValueError(f"{key} cannot sample a {kind} model; samplers that can: {able}")
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


__all__ = [
    "ALL_SCHEDULERS",
    "FLOW_SCHEDULERS",
    "SCHEDULERS",
    "FlowMatchEulerScheduler",
    "NoiseSource",
    "SCMScheduler",
    "Scheduler",
    "calculate_shift",
    "default_sampler",
    "is_flow_matching",
    "make_scheduler",
    "model_family",
    "resolve_name",
    "sampler_for",
    "scheduler_names",
]
