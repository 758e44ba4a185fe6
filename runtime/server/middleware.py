"""HTTP plumbing around the routes: the browser rules (the Host and Origin checks, CORS for listed origins,
security headers), the request body limit (413 whether or not the length is declared), per-endpoint metrics
that count every answer including 500s, and error bodies that always serialise."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import Headers, MutableHeaders

from .state import CLIENT_GONE, ClientGone, ServeConfig, ServerState, normalize_origin

__all__ = ["CLIENT_CLOSED", "BodyLimit", "BrowserGuard", "ClientGone", "SecurityHeaders", "install"]

LOG = logging.getLogger("sd_onnx.server")
MAX_ERRORS = 5
WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::"})
# On every answer; the page sets its own Content-Security-Policy (page.py), everything else may load nothing.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}
CORS_METHODS = "GET, POST, OPTIONS"
CORS_MAX_AGE = "600"
OTHER_SITES = "requests from pages of other web sites are refused (serve a web app with --allow-origin)"
HOST_REFUSED = (
    "Host: not a name of this server (a defence against DNS rebinding); use its address, localhost or the "
    "--public-url host"
)


class SecurityHeaders:
    """Outermost: the security headers on every answer, whatever produced it (a route, a refusal, a 500), and
    for an origin listed with --allow-origin the CORS headers that let its pages read the answer. Other
    origins get no CORS headers, so a browser keeps the answer from them."""

    def __init__(self, app: Any, config: ServeConfig) -> None:
        self.app, self.listed = app, frozenset(config.allow_origins)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        origin = Headers(scope=scope).get("origin")
        allowed = origin if origin in self.listed else None

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers.setdefault(name, value)
                if self.listed:
                    headers.add_vary_header("Origin")
                if allowed is not None:
                    headers["Access-Control-Allow-Origin"] = allowed
            await send(message)

        return await self.app(scope, receive, send_with_headers)


class BrowserGuard:
    """The one place for the checks that keep web pages the user visits away from this server: a Host that is
    not one of the server's names (DNS rebinding) is refused with 421, a request a browser sends for a page
    of another site (its Origin, or Sec-Fetch-Site when it has no Origin) with 403; requests without either
    header (curl, Python clients, SDKs) pass. A listed origin's CORS preflight is answered here."""

    def __init__(self, app: Any, config: ServeConfig) -> None:
        self.app = app
        self.hosts = accepted_hosts(config)
        self.origins = frozenset(o for o in (normalize_origin(config.public_url), *config.allow_origins) if o)
        self.listed = frozenset(config.allow_origins)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        refusal = self._host_refusal(headers) or self._origin_refusal(scope, headers)
        if refusal is not None:
            status, detail = refusal
            return await JSONResponse({"detail": detail}, status_code=status)(scope, receive, send)
        preflight = scope["method"] == "OPTIONS" and "access-control-request-method" in headers
        if preflight and headers.get("origin") in self.listed:
            return await _preflight(headers)(scope, receive, send)
        return await self.app(scope, receive, send)

    def _host_refusal(self, headers: Headers) -> tuple[int, str] | None:
        """421 for a Host that is none of the server's names; an IP address always passes (rebinding needs a
        name that the attacker's DNS points here), and so does a request without Host (HTTP/1.0)."""
        host = headers.get("host")
        if self.hosts is None or host is None:
            return None
        name = host_name(host)
        if name is not None and (name in self.hosts or _is_ip(name)):
            return None
        return 421, HOST_REFUSED

    def _origin_refusal(self, scope: dict, headers: Headers) -> tuple[int, str] | None:
        """403 for what a browser sends on behalf of another site's page. Sec-Fetch-Site `same-origin` or
        `none` (typed address, bookmark) passes: browsers set it and page scripts cannot. Else an Origin must
        be the server's own (this Host, the public URL) or listed; without Origin, a browser's cross-site or
        same-site request passes only as a GET/HEAD navigation (a link to the page)."""
        site = headers.get("sec-fetch-site")
        if site in ("same-origin", "none"):
            return None
        origin = headers.get("origin")
        if origin is not None:
            return None if self._is_ours_or_listed(origin, scope, headers) else (403, f"Origin: {OTHER_SITES}")
        if site is None:
            return None
        if scope["method"] in ("GET", "HEAD") and headers.get("sec-fetch-mode") == "navigate":
            return None
        return 403, f"Sec-Fetch-Site: {OTHER_SITES}"

    def _is_ours_or_listed(self, origin: str, scope: dict, headers: Headers) -> bool:
        """The request's own origin (its scheme and its Host, which passed the Host check), the public URL's,
        or one listed with --allow-origin; never `null`."""
        normal = normalize_origin(origin)
        own = normalize_origin(f"{scope.get('scheme', 'http')}://{headers.get('host', '')}")
        return normal is not None and (normal in self.origins or normal == own)


def _preflight(headers: Headers) -> Response:
    """The CORS preflight answer for a listed origin (SecurityHeaders adds Access-Control-Allow-Origin): the
    API's methods and whatever headers the page asks to send (the API key, a JSON content type, an SDK's own)."""
    allow = {"Access-Control-Allow-Methods": CORS_METHODS, "Access-Control-Max-Age": CORS_MAX_AGE}
    requested = headers.get("access-control-request-headers")
    if requested:
        allow["Access-Control-Allow-Headers"] = requested
    return Response(status_code=204, headers=allow)


def accepted_hosts(config: ServeConfig) -> frozenset[str] | None:
    """The names a browser may use for this server: localhost, the bound address and the public URL's host;
    None (any) when the listening address is unknown, or a wildcard with no public URL to name the server."""
    if config.host is None:
        return None
    bound = config.host.strip("[]").lower()
    public = (urlsplit(config.public_url).hostname or "").lower()
    if bound in WILDCARD_HOSTS and public in WILDCARD_HOSTS:
        return None
    return frozenset({"localhost"} | {name for name in (bound, public) if name not in WILDCARD_HOSTS})


def host_name(host: str) -> str | None:
    """The name in a Host header (`name`, `name:port`, `[v6]:port`), lower case without a trailing dot."""
    try:
        parts = urlsplit(f"//{host}")
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        return None
    return parts.hostname.rstrip(".") if parts.hostname else None


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class BodyLimit:
    """Read the whole body first (up to `max_bytes`, chunked or not) and answer 413 past it; the app then
    sees the buffered body. Bodies are small JSON documents, so buffering costs nothing. Once the body is in,
    the request's CLIENT_GONE waits for the client to hang up, so its job can be dropped (state.generate)."""

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

        token = CLIENT_GONE.set(_until_disconnect(receive))
        try:
            return await self.app(scope, replay, send)
        finally:
            CLIENT_GONE.reset(token)

    async def _too_large(self, scope: dict, receive: Any, send: Any) -> None:
        detail = f"request body exceeds the limit max_body_bytes={self.max_bytes}"
        await JSONResponse({"detail": detail}, status_code=413, headers={"Connection": "close"})(scope, receive, send)


def _until_disconnect(receive: Callable[[], Awaitable[dict]]) -> Callable[[], Awaitable[None]]:
    """A wait for the server's `http.disconnect` (the body was read already, so nothing else should come)."""

    async def until_disconnect() -> None:
        while (await receive())["type"] != "http.disconnect":
            await asyncio.sleep(0.1)  # a stray message: never spin

    return until_disconnect


CLIENT_CLOSED = 499  # nginx's status for it, so /metrics can count such requests apart


def install(app: FastAPI, state: ServerState) -> None:
    """Security headers, browser checks, body limit, metrics and error handlers on `app`. Outermost first:
    SecurityHeaders (so every answer has them, 500s included), metrics (so refusals are counted), BrowserGuard
    (before any body is read), BodyLimit."""
    app.add_middleware(BodyLimit, max_bytes=state.config.max_body_bytes)
    app.add_middleware(BrowserGuard, config=state.config)

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

    app.add_middleware(SecurityHeaders, config=state.config)
