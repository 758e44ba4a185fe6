"""`GET /`: one plain HTML/JS page for people (no build step, no CDN) that drives the A1111 routes: it posts to
/sdapi/v1/txt2img, polls /sdapi/v1/progress for a live preview and shows the result with its parameters."""

from __future__ import annotations

from functools import cache
from importlib.resources import files

from fastapi import FastAPI
from fastapi.responses import HTMLResponse

from .state import ServerState


@cache
def _template() -> str:
    return files(__package__).joinpath("static", "index.html").read_text(encoding="utf-8")


def add_routes(app: FastAPI, state: ServerState) -> None:
    """The page itself is public (it holds no data); it asks for the API key only when the server has one, and
    sends it with each call as the API routes require."""

    @app.get("/", include_in_schema=False)
    def index() -> HTMLResponse:
        needs_key = "true" if state.config.api_key is not None else "false"
        return HTMLResponse(_template().replace("{{NEEDS_KEY}}", needs_key))
