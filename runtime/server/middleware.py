"""HTTP plumbing around the routes: the request body limit (413 whether or not the length is declared),
per-endpoint metrics that count every answer including 500s, and error bodies that always serialise."""

from __future__ import annotations

import logging
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from .state import ServerState

LOG = logging.getLogger("sd_onnx.server")
MAX_ERRORS = 5


class BodyLimit:
    """Read the whole body first (up to `max_bytes`, chunked or not) and answer 413 past it; the app then
    sees the buffered body. Bodies are small JSON documents, so buffering costs nothing."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", [])).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await self._too_large(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await self._too_large(scope, receive, send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    async def _too_large(self, scope: dict, receive: Any, send: Any) -> None:
        detail = f"request body exceeds the limit max_body_bytes={self.max_bytes}"
        await JSONResponse({"detail": detail}, status_code=413, headers={"Connection": "close"})(scope, receive, send)


class ClientGone(Exception):
    """The client hung up before its request was complete: nothing to answer, and not a server error."""


CLIENT_CLOSED = 499  # nginx's status for it, so /metrics can count such requests apart


def install(app: FastAPI, state: ServerState) -> None:
    """Body limit, metrics and error handlers on `app`."""
    app.add_middleware(BodyLimit, max_bytes=state.config.max_body_bytes)

    @app.middleware("http")
    async def measure(request: Request, call_next: Any) -> Response:
        started = time.perf_counter()
        try:
            response = await call_next(request)
        except ClientGone:
            response = Response(status_code=CLIENT_CLOSED)
        except Exception as exc:  # noqa: BLE001 - a bug must still be answered, logged in one line and counted
            LOG.error("%s %s failed: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
            response = JSONResponse({"detail": "internal server error"}, status_code=500)
        route = request.scope.get("route")
        endpoint = getattr(route, "path", "unmatched")
        state.requests.labels(endpoint, str(response.status_code)).inc()
        state.latency.labels(endpoint).observe(time.perf_counter() - started)
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        """422 in the same shape as every other refusal, `{"detail": "field: reason"}`, naming each bad field
        without echoing the input (NaN or megabytes would not serialise or would flood the client)."""
        lines = []
        for error in exc.errors()[:MAX_ERRORS]:
            if error.get("type") == "json_invalid":
                lines.append("body: not valid JSON")
                continue
            where = ".".join(str(part) for part in error.get("loc", ()) if part != "body") or "body"
            lines.append(f"{where}: {error.get('msg', 'invalid')}")
        detail = "; ".join(lines).encode("utf-8", "backslashreplace").decode("utf-8")  # no lone surrogates
        return JSONResponse({"detail": detail}, status_code=422)
