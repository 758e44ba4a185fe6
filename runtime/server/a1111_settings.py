"""A1111's settings: GET and POST /sdapi/v1/options, and a txt2img/img2img body's `override_settings`.

GET answers the keys A1111 clients read: `sd_model_checkpoint` (the current model's title; Open WebUI,
SillyTavern and webuiapi read it), `sd_checkpoint_hash`, `sd_vae`, `CLIP_stop_at_last_layers`,
`samples_format` and a few more. What can be set:

- `sd_model_checkpoint` (a title, model name or hash prefix, see models.py): POST makes it the current model
  once it has loaded and passed its self-test; in `override_settings` it applies to that request only, unless
  `override_settings_restore_afterwards` is false (then it stays current, as in A1111). Unknown: 422.
- `CLIP_stop_at_last_layers` in `override_settings`: the request's clip skip, as A1111 counts (1: last layer).
- `sd_vae`: "Automatic" or "None", both the model's own VAE (this server offers no separate VAE files).

Any other key equal to what GET answers changes nothing (Open WebUI posts the whole options object back with a
new checkpoint); set to another value it is ignored and named: POST answers `{"ignored": [...]}` (A1111
answers null, as this does when nothing is ignored), a generation lists it in `info`; `--strict` refuses it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, HTTPException

from ..echo import echo
from ..families import family_for
from ..pipeline import StableDiffusionPipeline
from ..schedulers import default_sampler
from .a1111_fields import cut, ignored_fields, strict_refusal
from .a1111_schedules import with_schedule
from .models import ModelEntry
from .schemas import Txt2ImgRequest
from .state import ServerState

VAE_NAMES = ("Automatic", "None")
CLIP_SKIP = "CLIP_stop_at_last_layers"
MISSING = object()


def options(state: ServerState) -> dict[str, Any]:
    """What GET /sdapi/v1/options answers."""
    entry = state.current_model()
    return {
        "sd_model_checkpoint": entry.title,
        "sd_checkpoint_hash": entry.sha256,
        "sd_checkpoints_limit": state.models.capacity,
        "sd_vae": "Automatic",
        CLIP_SKIP: 1,
        "samples_format": "png",
        "enable_pnginfo": True,
        "randn_source": "CPU",  # the seeds give torch's CPU generator's noise (rng.py)
        "eta_noise_seed_delta": 0,
        "live_previews_enable": True,
        "outdir_samples": "",  # nothing is saved on the server
        "save_images_add_number": False,
    }


def add_routes(api: APIRouter, state: ServerState) -> None:
    @api.get("/sdapi/v1/options")
    def get_options() -> dict[str, Any]:
        return options(state)

    @api.post("/sdapi/v1/options")
    async def set_options(body: dict[str, Any]) -> dict[str, Any] | None:
        """Switch the current model (`sd_model_checkpoint`); other keys, see the module's docstring."""
        before = options(state)
        _check_vae(body.get("sd_vae"), "sd_vae")
        handled = ("sd_model_checkpoint", "sd_vae")
        ignored = [cut(k) for k, v in body.items() if k not in handled and _differs(v, before.get(k, MISSING))]
        if state.config.strict and ignored:
            raise HTTPException(422, strict_refusal(ignored))
        name = body.get("sd_model_checkpoint")
        if name is not None:
            if not isinstance(name, str):
                raise HTTPException(422, f"sd_model_checkpoint: must be a model's title, got {echo(name)}")
            await state.select(name, "sd_model_checkpoint")
        return {"ignored": ignored} if ignored else None


@dataclass
class Applied:
    """A body with its settings applied: the model it runs on, the body as the request is made from it, the
    A1111 fields ignored, and request-field names for 422s that came from `override_settings`."""

    entry: ModelEntry
    pipe: StableDiffusionPipeline
    body: Txt2ImgRequest
    ignored: list[str] = field(default_factory=list)
    names: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # the body's undeclared keys (alwayson_scripts: ControlNet)

    def info(self) -> dict[str, Any]:
        """What A1111's `info` says of the model, and the fields this server ignored."""
        return {"sd_model_name": self.entry.name, "sd_model_hash": self.entry.hash,
                "sd_model_checkpoint": self.entry.title, "ignored": self.ignored}  # fmt: skip


async def apply(state: ServerState, body: Txt2ImgRequest) -> Applied:
    """The model a body runs on (its override's, else the current one, loaded if need be) and the body with
    `override_settings`, `sampler_index` and the schedule type applied; 422 for a bad setting, and under
    --strict for anything ignored."""
    settings = body.override_settings
    key = "override_settings.sd_model_checkpoint"
    checkpoint = settings.get("sd_model_checkpoint")
    if checkpoint is not None and not isinstance(checkpoint, str):
        raise HTTPException(422, f"{key}: must be a model's title, got {echo(checkpoint)}")
    entry = state.find_model(checkpoint, key)
    declared = {name: getattr(body, name) for name in type(body).model_fields}
    ignored = ignored_fields(body.model_extra or {}, declared)
    update, names = _clip_skip(body, settings.get(CLIP_SKIP), ignored)
    distilled, distilled_names = _distilled_guidance(body, entry, ignored)
    update, names = {**update, **distilled, **_reference_strength(body, entry, ignored)}, {**names, **distilled_names}
    _check_vae(settings.get("sd_vae"), "override_settings.sd_vae")
    before = options(state)
    handled = ("sd_model_checkpoint", CLIP_SKIP, "sd_vae")
    ignored += [f"override_settings.{cut(k)}" for k, v in settings.items()
                if k not in handled and _differs(v, before.get(k, MISSING))]  # fmt: skip
    sampler, honoured = with_schedule(body.sampler_name or body.sampler_index, body.scheduler, _sampler_of(entry))
    if not honoured:
        ignored.append("scheduler")
    if state.config.strict and ignored:
        raise HTTPException(422, strict_refusal(ignored))
    if checkpoint and not body.override_settings_restore_afterwards:
        await state.select(checkpoint, key)
    entry, pipe = await state.model(checkpoint, key)
    body_values = _declared_only(body, {**declared, "sampler_name": sampler, **update})
    return Applied(entry, pipe, body_values, ignored, names, dict(body.model_extra or {}))


def _declared_only(body: Txt2ImgRequest, values: dict[str, Any]) -> Txt2ImgRequest:
    """The body with `values` for its declared fields and none of its other keys: those are accounted for in
    `ignored`, and must not reach a request as attributes (pydantic exposes extra keys as attributes too)."""
    return type(body).model_construct(**values)


def _clip_skip(body: Txt2ImgRequest, value: Any, ignored: list[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """`CLIP_stop_at_last_layers` as the body's `clip_skip` (a body's own clip_skip wins), with the name its
    422s should carry; a server without clip skip ignores any value but 1 (the last layer)."""
    if value is None:
        return {}, {}
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise HTTPException(422, f"override_settings.{CLIP_SKIP}: must be an integer >= 1, got {echo(value)}")
    if "clip_skip" not in type(body).model_fields:
        if value != 1:
            ignored.append(f"override_settings.{CLIP_SKIP}")
        return {}, {}
    if body.clip_skip is not None:
        return {}, {}
    return {"clip_skip": value}, {"clip_skip": f"override_settings.{CLIP_SKIP}"}


def _distilled_guidance(
    body: Txt2ImgRequest, entry: ModelEntry, ignored: list[str]
) -> tuple[dict[str, Any], dict[str, str]]:
    """Forge's `distilled_cfg_scale` as the guidance of a model that takes it as an input (FLUX.1-dev,
    SANA-Sprint), as Forge reads it; `cfg_scale` then asks for classifier-free guidance on top, which these
    models do not run here (ignored unless 1). Other models have no distilled guidance: Forge, too, leaves the
    field unused for them."""
    value = getattr(body, "distilled_cfg_scale", None)
    if value is None or not entry.config.guidance_embeds:
        return {}, {}
    if body.cfg_scale not in (None, 1):
        ignored.append("cfg_scale")
    return {"cfg_scale": value}, {"guidance_scale": "distilled_cfg_scale"}


def _reference_strength(body: Txt2ImgRequest, entry: ModelEntry, ignored: list[str]) -> dict[str, Any]:
    """On a family that reads `image` as a reference to edit from (FLUX.2 [klein]) an img2img body's init image
    is that reference and takes no strength; A1111 clients send `denoising_strength` with every img2img call, so
    it is ignored and named rather than refused (one outside A1111's range [0, 1] is still a 422)."""
    if "init_images" not in type(body).model_fields or not family_for(entry.config).reference_images:
        return {}
    strength = body.denoising_strength
    if strength is not None and not 0.0 <= strength <= 1.0:  # NaN too
        raise HTTPException(422, f"denoising_strength: must be in [0, 1], got {strength:.10g}")
    if strength is not None:
        ignored.append("denoising_strength")
    return {"denoising_strength": None}


def _check_vae(value: Any, name: str) -> None:
    if value is not None and value not in VAE_NAMES:
        raise HTTPException(
            422, f"{name}: no VAE named {echo(value)}; this server has {' and '.join(VAE_NAMES)}, the model's own"
        )


def _differs(value: Any, current: Any) -> bool:
    return current is MISSING or value != current or type(value) is not type(current)


def _sampler_of(entry: ModelEntry) -> str:
    """The model's own sampler, as the pipeline picks it (its scheduler config's class)."""
    try:
        return default_sampler(entry.scheduler_config)
    except ValueError:
        return "pndm"
