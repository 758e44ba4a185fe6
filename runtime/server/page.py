"""`GET /`: one plain HTML/JS page for people (no build step, no CDN) that drives the A1111 routes: it posts to
/sdapi/v1/txt2img (a model from /sdapi/v1/sd-models through override_settings), polls /sdapi/v1/progress for a
live preview, shows the results with their parameters, downloads and "use these settings", and keeps a
bounded history of them in the browser's local storage.

Its Content-Security-Policy allows exactly its own inline script and style (by their sha256), images from
`data:` URLs (the results and previews) and requests to its own origin, so nothing injected into it runs."""

from __future__ import annotations

import base64
import hashlib
import re
from functools import cache
from importlib.resources import files

from fastapi import FastAPI
from fastapi.responses import HTMLResponse

from .state import ServerState


@cache
def _template() -> str:
    return files(__package__).joinpath("static", "index.html").read_text(encoding="utf-8")


@cache
def render(needs_key: bool) -> tuple[str, str]:
    """The page and its Content-Security-Policy (the hashes are of the page as sent, key flag included)."""
    html = _template().replace("{{NEEDS_KEY}}", "true" if needs_key else "false")
    return html, "; ".join(
        [
            "default-src 'none'",
            f"script-src {_hashes(html, 'script')}",
            f"style-src {_hashes(html, 'style')}",
            "img-src data:",
            "connect-src 'self'",
            "form-action 'self'",
            "base-uri 'none'",
            "frame-ancestors 'none'",
        ]
    )


def _hashes(html: str, tag: str) -> str:
    """CSP source expressions for each inline `<tag>` of the page ('none' without one)."""
    bodies = re.findall(rf"<{tag}\b[^>]*>(.*?)</{tag}>", html, flags=re.DOTALL)
    digests = [base64.b64encode(hashlib.sha256(body.encode("utf-8")).digest()).decode() for body in bodies]
    return " ".join(f"'sha256-{digest}'" for digest in digests) or "'none'"


def add_routes(app: FastAPI, state: ServerState) -> None:
    """The page itself is public (it holds no data); it asks for the API key only when the server has one, and
    sends it with each call as the API routes require."""

    @app.get("/", include_in_schema=False)
    def index() -> HTMLResponse:
        html, policy = render(state.config.api_key is not None)
        return HTMLResponse(html, headers={"Content-Security-Policy": policy})
