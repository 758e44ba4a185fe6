"""What A1111 clients list before they generate: /sdapi/v1/sd-models (the models this server offers, see
models.py), /sdapi/v1/schedulers (A1111 1.9+ schedule types, see a1111_schedules.py) and /sdapi/v1/sd-vae
(empty: each model decodes with its own VAE, `sd_vae` "Automatic" or "None"; there are no separate VAE files).

/sdapi/v1/embeddings and /sdapi/v1/loras: see a1111_prompts.py.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from ..request import DEFAULT_STEPS
from .a1111_schedules import schedule_types
from .state import ServerState


def add_routes(api: APIRouter, state: ServerState) -> None:
    @api.get("/sdapi/v1/sd-models")
    def sd_models() -> list[dict[str, Any]]:
        state.ready()
        return [entry.describe() for entry in state.models.listed()]

    @api.get("/sdapi/v1/schedulers")
    def schedulers() -> list[dict[str, Any]]:
        return schedule_types(state.current_model().scheduler_config)

    @api.get("/sd-onnx/limits")
    def limits() -> dict[str, Any]:
        """What the web page reads instead of hard-coding numbers: the server's limits and the current model's
        defaults (sizes in pixels; sides must be multiples of `size_multiple`)."""
        config, limits = state.current_model().config, state.config.limits
        return {
            "max_steps": limits.max_steps,
            "max_pixels": limits.pixels(config),
            "max_batch": limits.max_batch,
            "steps": min(config.default_steps or DEFAULT_STEPS, limits.max_steps),
            "guidance_scale": config.guidance_scale,
            "width": config.default_resolution,
            "height": config.default_resolution,
            "size_multiple": config.size_multiple,
        }

    @api.get("/sdapi/v1/sd-vae")
    def sd_vae() -> list[dict[str, Any]]:
        state.ready()
        return []
