"""A1111 request fields this server does not implement, and when one of them asks for something.

A1111 clients send whole payloads: webuiapi posts `restore_faces: false`, `s_noise: 1`, `styles: []` with every
request. A field at A1111's default, or at a value that changes nothing, asks for nothing and passes quietly. A
field set to anything else (`restore_faces: true`, `subseed_strength: 0.3`, an `alwayson_scripts` entry with
arguments) would be dropped, so it is not dropped silently: the answer's `info` lists it under "ignored", and
`sd-run serve --strict` refuses the request with 422 naming it. Keys A1111 itself does not know are ignored as
A1111 ignores them (SillyTavern sends its own `url` and `auth` along).

Fields a body model declares are the routes' to honour; only the undeclared ones (pydantic's `model_extra`)
are checked here, so a field another feature implements later leaves this table by being declared.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

ECHO_CHARS = 80  # names from a client are cut to this, as values are in refusals (echo.py)


def _set(value: Any) -> bool:
    """Anything but "off": None, false, 0, "", [] and {}."""
    return value not in (None, False, 0, "", [], {})


def _not(default: Any) -> Callable[[Any], bool]:
    return lambda value: value is not None and value != default


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def _never(value: Any) -> bool:
    return False


# No-ops here: saving flags (nothing is saved), bookkeeping, and arguments of features listed by RULES.
NO_OPS = ("do_not_save_samples", "do_not_save_grid", "comments", "force_task_id", "disable_extra_networks",
          "script_args", "s_tmin", "s_tmax", "refiner_switch_at", "include_init_images", "mask_round")  # fmt: skip
# Undeclared A1111 field -> whether its value asks for something this server does not do.
RULES: dict[str, Callable[[Any], bool]] = {
    "restore_faces": _set,
    "tiling": _set,
    "subseed_strength": _set,
    "seed_resize_from_h": _positive,  # A1111: -1 (webuiapi sends 0) is off
    "seed_resize_from_w": _positive,
    "styles": _set,
    "s_churn": _set,
    "s_noise": _not(1),
    "s_min_uncond": _set,
    "script_name": _set,
    "send_images": lambda value: value is False,  # images are always sent
    "save_images": _set,  # nothing is saved on the server
    "refiner_checkpoint": _set,
    "firstpass_image": _set,
    "infotext": _set,
    "enable_hr": _set,
    "image_cfg_scale": _set,  # instruct-pix2pix models only
    "resize_mode": _set,  # 0: just resize, as this server does
    "initial_noise_multiplier": _not(1),
    "latent_mask": _set,
    **dict.fromkeys(NO_OPS, _never),
}
# Second-pass (hires fix) fields. With `enable_hr` undeclared, "enable_hr" alone names the missing second pass;
# once a route declares it, an undeclared one of these set while the second pass is on is listed by itself.
HIRES = ("hr_scale", "hr_upscaler", "hr_second_pass_steps", "hr_resize_x", "hr_resize_y", "hr_checkpoint_name",
         "hr_sampler_name", "hr_scheduler", "hr_prompt", "hr_negative_prompt", "hr_additional_modules",
         "firstphase_width", "firstphase_height", "denoising_strength", "hr_cfg", "hr_distilled_cfg")  # fmt: skip


def ignored_fields(extra: dict[str, Any], declared: dict[str, Any]) -> list[str]:
    """The undeclared A1111 fields of a body (`extra`) whose values ask for what this server does not do, in
    body order; `declared` holds the declared fields' values (a declared `enable_hr` turns the second pass on)."""
    hires = bool(declared.get("enable_hr"))
    found = []
    for name, value in extra.items():
        if name == "alwayson_scripts":
            found += script_names(value)
        elif name in ("mask_blur_x", "mask_blur_y"):  # A1111 sets both from mask_blur, which this server has
            found += [name] if value not in (None, declared.get("mask_blur", 4)) else []
        elif (name in RULES and RULES[name](value)) or (name in HIRES and hires and _set(value)):
            found.append(name)
    return found


def script_names(scripts: Any) -> list[str]:
    """`alwayson_scripts` entries that run and are not implemented here (ControlNet is: a1111_controlnet.py); an
    entry whose `args` is empty, as webuiapi sends for extensions it found but does not use, runs nothing."""
    if not isinstance(scripts, dict):
        return ["alwayson_scripts"] if _set(scripts) else []
    return [
        f"alwayson_scripts.{cut(str(name))}"
        for name, entry in scripts.items()
        if not (isinstance(entry, dict) and not _set(entry.get("args"))) and str(name).lower() != "controlnet"
    ]


def cut(name: str) -> str:
    """A client's key as the answer names it: at most ECHO_CHARS characters."""
    return name if len(name) <= ECHO_CHARS else name[:ECHO_CHARS] + "..."


def strict_refusal(ignored: Iterable[str]) -> str | None:
    """The 422 detail `--strict` answers for these ignored fields, or None when there are none."""
    names = list(ignored)
    if not names:
        return None
    others = f" (also: {', '.join(names[1:6])}{', ...' if len(names) > 6 else ''})" if len(names) > 1 else ""
    return f"{names[0]}: not supported by this server, which runs with --strict{others}"
