"""A1111's schedule types (A1111 1.9+: the `scheduler` field of txt2img/img2img and /sdapi/v1/schedulers): the
ones this server runs, and the sampler that a sampler name and a schedule type make together.

A1111 splits "DPM++ 2M Karras" into the sampler "DPM++ 2M" and the schedule type "Karras"; this runtime's
samplers carry their schedule, so "Karras" picks a sampler's Karras variant where there is one. "Automatic" is
each sampler's own schedule. The other A1111 types (uniform, exponential, sgm_uniform, ...) have no sampler
here: a request naming one is answered with the sampler's own schedule and the field listed as ignored.
"""

from __future__ import annotations

from typing import Any

from ..schedulers import SCHEDULERS, make_scheduler, resolve_name

# name -> (label, default_rho), as A1111 lists them
SCHEDULE_TYPES: dict[str, tuple[str, float]] = {"automatic": ("Automatic", -1.0), "karras": ("Karras", 7.0)}


def schedule_types(scheduler_config: dict[str, Any]) -> list[dict[str, Any]]:
    """/sdapi/v1/schedulers: Automatic, and Karras where one of its samplers can follow the model's schedule."""
    karras = any(_runs(key, scheduler_config) for key, (_, overrides, _) in SCHEDULERS.items() if overrides)
    return [
        {"name": name, "label": label, "aliases": None, "default_rho": rho, "need_inner_model": False}
        for name, (label, rho) in SCHEDULE_TYPES.items()
        if name == "automatic" or karras
    ]


def with_schedule(sampler: str | None, schedule: str | None, default_sampler: str) -> tuple[str | None, bool]:
    """The sampler name to run for `sampler` (None: the model's, `default_sampler`) on schedule type `schedule`
    (name or label, any case), and whether the schedule type is honoured. An unknown sampler is left as given,
    for the request's own check to name."""
    kind = (schedule or "automatic").strip().lower()
    if kind == "automatic":
        return sampler, True
    if kind != "karras":
        return sampler, False
    try:
        key = resolve_name(sampler or default_sampler)
    except ValueError:
        return sampler, True
    if SCHEDULERS[key][1].get("use_karras_sigmas"):
        return sampler, True
    karras = f"{key}_karras"
    return (karras, True) if karras in SCHEDULERS else (sampler, False)


def _runs(key: str, scheduler_config: dict[str, Any]) -> bool:
    try:
        make_scheduler(key, scheduler_config)
    except ValueError:
        return False
    return True
