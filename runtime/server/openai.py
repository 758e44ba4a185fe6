"""OpenAI-compatible image routes: POST /v1/images/generations (the official client's `images.generate`) and
GET /v1/images/files/{id}.png for `response_format="url"`."""

from __future__ import annotations

import base64
import time
from typing import Any

from fastapi import APIRouter, HTTPException
from fastapi.responses import Response

from ..image import parameters_text, png_bytes
from ..request import GenerationRequest
from .schemas import OpenAIImageRequest
from .state import ServerState

# GenerationRequest field -> OpenAI body field, so 422s name what the client sent.
FIELD_NAMES = {"batch": "n", "width": "size", "height": "size", "steps": "steps"}


def to_request(body: OpenAIImageRequest) -> GenerationRequest:
    width = height = None
    if body.size and body.size != "auto":
        width, height = (int(v) for v in body.size.split("x"))
    return GenerationRequest(
        prompt=body.prompt,
        negative_prompt=body.negative_prompt or None,
        steps=body.steps,
        guidance_scale=body.guidance_scale,
        width=width,
        height=height,
        seed=body.seed,
        batch=body.n,
    )


def add_routes(api: APIRouter, state: ServerState) -> None:
    @api.post("/v1/images/generations")
    async def generations(body: OpenAIImageRequest) -> dict[str, Any]:
        request = state.prepare(to_request(body), FIELD_NAMES)
        out = await state.generate(request)
        pngs = [png_bytes(img, parameters_text(request, out.parameters, i)) for i, img in enumerate(out.images)]
        if body.response_format == "url":
            data = [{"url": state.image_url(png)} for png in pngs]
        else:
            data = [{"b64_json": base64.b64encode(png).decode()} for png in pngs]
        return {"created": int(time.time()), "data": data}

    @api.get("/v1/images/files/{image_id}.png")
    def image_file(image_id: str) -> Response:
        with state.images_lock:
            png = state.images.get(image_id)  # an in-memory store: no request path reaches the file system
        if png is None:
            raise HTTPException(404, "no such image (the store keeps the most recent ones only)")
        return Response(png, media_type="image/png")
