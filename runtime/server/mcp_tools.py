"""An MCP endpoint for agents (`sd-run serve --mcp`): streamable HTTP at /mcp, behind the server's API key, with
the maintained `mcp` SDK (2.x). Tools:

- `generate_image`: a prompt and the txt2img fields of the HTTP routes -> the image (PNG, MCP image content)
  and its parameters (text), with a progress notification per denoising step;
- `edit_image`: the same with an image (base64 or a data URL), `strength`, and a `mask` (white is repainted)
  for inpainting;
- `list_models`, `list_samplers`.

Requests go through the server's one request core (`ServerState.prepare`, its limits, its queue): a bad field is
a tool error naming it, as the HTTP routes' 422 does.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import HTTPException
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.mcpserver.utilities.types import Image
from mcp.server.streamable_http_manager import StreamableHTTPASGIApp
from mcp.server.transport_security import TransportSecuritySettings

from ..image import ImageError, decode_base64_image, parameters_text, png_bytes
from ..request import GenerationRequest
from ..schedulers import scheduler_names
from .state import ServerState


def build(state: ServerState) -> MCPServer:
    """The MCP server of `state`'s models (its session manager still to be run by the app's lifespan)."""
    server = MCPServer("sd-onnx", instructions="Draws images with local Stable Diffusion models (ONNX, no GPU needed).")

    @server.tool(structured_output=False)  # image content, not a JSON result
    async def generate_image(
        prompt: str,
        ctx: Context,
        negative_prompt: str | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        width: int | None = None,
        height: int | None = None,
        seed: int | None = None,
        scheduler: str | None = None,
        model: str | None = None,
    ) -> list[Any]:
        """Generate an image from a text prompt. Unset fields take the model's defaults (size, steps,
        guidance); `model` is one of list_models' names (default: the server's current model)."""
        request = GenerationRequest(prompt, negative_prompt, steps, guidance_scale, width, height, seed,
                                    scheduler=scheduler)  # fmt: skip
        return await _run(state, request, model, ctx)

    @server.tool(structured_output=False)
    async def edit_image(
        image: str,
        prompt: str,
        ctx: Context,
        mask: str | None = None,
        strength: float | None = None,
        negative_prompt: str | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int | None = None,
        model: str | None = None,
    ) -> list[Any]:
        """Redraw an image (base64 PNG/JPEG or a data URL) after a prompt: img2img by `strength` (0-1), or
        inpainting where `mask` (same size; white = repaint) says. The output keeps the image's size."""
        _, pipe = await _model(state, model)
        limit = state.config.limits.input_pixels(pipe.config)
        picture = await _decode(image, "image", limit)
        repaint = None if mask is None else (await _decode(mask, "mask", limit)).convert("L")
        request = GenerationRequest(prompt, negative_prompt, steps, guidance_scale, picture.width, picture.height,
                                    seed, image=picture, strength=strength, mask_image=repaint)  # fmt: skip
        return await _run(state, request, model, ctx)

    @server.tool()
    def list_models() -> dict[str, list[dict[str, Any]]]:
        """The models this server draws with: name, family, native resolution, and whether it is current."""
        state.ready()
        current = state.models.current
        return {"models": [{"name": e.name, "family": e.family, "resolution": e.config.default_resolution,
                            "current": e is current} for e in state.models.listed()]}  # fmt: skip

    @server.tool()
    def list_samplers() -> dict[str, list[str]]:
        """Sampler names `scheduler` accepts."""
        return {"samplers": list(scheduler_names())}

    return server


async def _model(state: ServerState, name: str | None) -> tuple[Any, Any]:
    try:
        return await state.model(name, "model")
    except HTTPException as exc:
        raise ToolError(str(exc.detail)) from None


async def _decode(data: str, field: str, limit: int) -> Any:
    try:  # decoding can take seconds: off the event loop, capped from the header
        return await asyncio.to_thread(decode_base64_image, data, limit)
    except ImageError as exc:
        raise ToolError(f"{field}: {exc}") from None


async def _run(state: ServerState, request: GenerationRequest, model: str | None, ctx: Context) -> list[Any]:
    """Resolve, queue and answer one request: its PNG as image content, then its parameters as text."""
    _, pipe = await _model(state, model)
    try:
        prepared = state.prepare(request, {"mask_image": "mask"}, pipe)
        out = await state.generate(prepared, pipe, progress=lambda step, total: ctx.report_progress(step, total))
    except HTTPException as exc:
        raise ToolError(str(exc.detail)) from None
    text = parameters_text(prepared, out.parameters, 0)
    return [Image(data=png_bytes(out.images[0], text), format="png"), text]


class Endpoint:
    """The MCP server of `state` at `path`: `session_manager` is run by the app's lifespan, `asgi` serves it. The
    SDK's own Host check is off: the app checks Host and Origin for /mcp as for every route (middleware.py)."""

    def __init__(self, state: ServerState, path: str) -> None:
        self.server = build(state)
        security = TransportSecuritySettings(enable_dns_rebinding_protection=False)
        self.server.streamable_http_app(streamable_http_path=path, transport_security=security)
        self.session_manager = self.server.session_manager
        self.asgi = StreamableHTTPASGIApp(self.session_manager)
