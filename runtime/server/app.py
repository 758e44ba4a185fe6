"""The FastAPI application: A1111 and OpenAI routes over the server's models and one bounded job queue, and
`run_server`, which serves it with a shutdown that answers 503 while running work drains."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import secrets
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.routing import Route

from ..pipeline import StableDiffusionPipeline
from . import (
    a1111,
    a1111_controlnet,
    a1111_lists,
    a1111_pnginfo,
    a1111_prompts,
    a1111_settings,
    middleware,
    openai,
    page,
)
from .extras import add_routes as add_extras_routes
from .models import ModelCache, ModelEntry
from .state import ServeConfig, ServerState

__all__ = ["ServeConfig", "ServerState", "create_app", "run_server"]
MCP_PATH = "/mcp"


def create_app(state: ServerState, loader: Callable[[], StableDiffusionPipeline]) -> FastAPI:
    """The application; `loader()` builds the pipeline in the background so /health can say "loading"."""

    agents = mcp_endpoint(state) if state.config.mcp else None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        threading.Thread(target=state.load, args=(loader,), daemon=True).start()
        async with agents.session_manager.run() if agents is not None else contextlib.nullcontext():
            yield
        if state.jobs is not None:
            await asyncio.to_thread(state.jobs.shutdown, state.config.graceful_shutdown_s)

    app = FastAPI(title="sd-onnx", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    middleware.install(app, state)
    page.add_routes(app, state)

    @app.get("/health")
    def health() -> JSONResponse:
        if state.jobs is not None and not state.jobs.accepting:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        if state.jobs is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ok", "running": state.jobs.busy(), "queued": state.jobs.depth()})

    api = APIRouter(dependencies=[Depends(_api_key_check(state))])
    a1111.add_routes(api, state)
    a1111_controlnet.add_routes(api, state)
    a1111_settings.add_routes(api, state)
    a1111_pnginfo.add_routes(api, state)
    openai.add_routes(api, state)
    add_extras_routes(api, state)
    a1111_prompts.add_routes(api, state)
    a1111_lists.add_routes(api, state)
    _add_schema(api, app)

    @api.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(state.registry), media_type=CONTENT_TYPE_LATEST)

    app.include_router(api)
    if agents is not None:
        app.router.routes.append(Route(MCP_PATH, _WithApiKey(agents.asgi, state)))
    return app


def mcp_endpoint(state: ServerState) -> Any:
    """The MCP endpoint of `state` (mcp_tools.py): its session manager (run by the app's lifespan) and its ASGI
    app. Imported here: the `mcp` SDK is needed only with --mcp."""
    from .mcp_tools import Endpoint

    return Endpoint(state, MCP_PATH)


class _WithApiKey:
    """An ASGI app behind the API key check every route but /health has (401 as the routes answer it). A class:
    Starlette serves a plain function endpoint as a GET request handler, not as an ASGI app."""

    def __init__(self, asgi: Any, state: ServerState) -> None:
        self.asgi, self.check = asgi, _api_key_check(state)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        try:
            self.check(Request(scope))
        except HTTPException as exc:
            response = JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)
            await response(scope, receive, send)
            return
        await self.asgi(scope, receive, send)


def _add_schema(api: APIRouter, app: FastAPI) -> None:
    """The OpenAPI schema, behind the API key like every route but /health. No /docs or /redoc viewer: both
    load their scripts from a CDN, so they were blank offline and would need the page's CSP opened to it."""

    @api.get("/openapi.json", include_in_schema=False)
    def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())


def _api_key_check(state: ServerState) -> Callable[[Request], None]:
    """The key as `Authorization: Bearer KEY`, `X-API-Key: KEY`, or HTTP Basic with the key as the password and
    any user name (what A1111 clients send: Open WebUI's and SillyTavern's "user:password", webuiapi's auth)."""

    def check(request: Request) -> None:
        key = state.config.api_key
        if key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        scheme = scheme.lower()
        authorization = token.strip() if scheme == "bearer" else _basic_password(token) if scheme == "basic" else ""
        given = request.headers.get("x-api-key") or authorization
        if not secrets.compare_digest(given.encode(errors="replace"), key.encode()):
            raise HTTPException(401, "missing or wrong API key", headers={"WWW-Authenticate": "Bearer"})

    return check


def _basic_password(token: str) -> str:
    """The password of HTTP Basic credentials (base64 of "user:password"); "" when they are malformed."""
    try:
        decoded = base64.b64decode(token.strip(), validate=True).decode("utf-8", errors="replace")
    except (binascii.Error, ValueError):
        return ""
    return decoded.partition(":")[2]


def run_server(
    config: ServeConfig,
    folder: Path,
    provider: str,
    threads: int | None,
    host: str,
    port: int,
    loras: list[tuple[Path, float]] | None = None,
    models: list[ModelEntry] | None = None,
    max_loaded_models: int = 1,
    embeddings: Path | None = None,
    lora_dir: Path | None = None,
) -> None:
    """Serve `folder`, or with `models` (`--models-dir`) each of them, at most `max_loaded_models` loaded at
    once, until SIGTERM/SIGINT. The first signal stops taking work (new requests and /health: 503 "shutting
    down"; queued jobs: 503), lets running jobs finish for up to `graceful_shutdown_s` and then cancels them,
    and only then closes the listening socket; a second signal exits at once."""

    def load(path: Path) -> StableDiffusionPipeline:
        pipe = StableDiffusionPipeline.from_pretrained(
            path, provider=provider, threads=threads, loras=loras, embeddings=embeddings, lora_dir=lora_dir
        )
        pipe.self_test()  # a folder whose first request would fail never gets ready, nor replaces a loaded one
        return pipe

    cache = ModelCache(models, load, max_loaded_models) if models else None
    state = ServerState(config, models=cache)
    app = create_app(state, cache.start if cache else lambda: load(folder))
    server = _DrainingServer(
        uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=10), state
    )
    server.run()


class _DrainingServer(uvicorn.Server):
    """uvicorn's server with a drain phase before its own shutdown."""

    def __init__(self, config: Any, state: ServerState) -> None:
        super().__init__(config)
        self.state = state
        self.draining = False

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.draining or self.state.jobs is None:
            return super().handle_exit(sig, frame)
        self.draining = True

        def drain() -> None:
            self.state.jobs.shutdown(self.state.config.graceful_shutdown_s)
            super(_DrainingServer, self).handle_exit(sig, frame)

        threading.Thread(target=drain, daemon=True, name="sd-drain").start()
        return None
