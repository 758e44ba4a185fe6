"""What A1111 clients list of the prompt features: `GET /sdapi/v1/embeddings` (the textual-inversion words the
current model reads, and the files skipped with why; see embeddings.py) and `GET /sdapi/v1/loras` (the files
`<lora:NAME>` can pick; see lora_tags.py)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from ..embeddings import describe
from ..pipeline import StableDiffusionPipeline
from .state import ServerState


def add_routes(api: APIRouter, state: ServerState) -> None:
    @api.get("/sdapi/v1/embeddings")
    def embeddings() -> dict[str, Any]:
        pipe = _current_pipeline(state)
        return describe(pipe.embeddings, pipe.skipped_embeddings)

    @api.get("/sdapi/v1/loras")
    def loras() -> list[dict[str, Any]]:
        pipe = _current_pipeline(state)
        return pipe.lora_library.describe() if pipe.lora_library else []


def _current_pipeline(state: ServerState) -> StableDiffusionPipeline:
    """The current model's pipeline when it is loaded, else the one the server started with (every model of
    a server is loaded with the same --embeddings and --lora-dir)."""
    pipe, _ = state.ready()
    models = getattr(state, "models", None)
    loaded = models.loaded(state.current_model()) if models is not None and hasattr(models, "loaded") else None
    return loaded or pipe
