"""POST /sdapi/v1/png-info: the generation parameters an image carries, in A1111's shape: `info` (the
`parameters` text), `items` (the image's other text entries) and `parameters` (the text parsed as A1111 parses
it, see infotext.py). Reads this server's PNGs and A1111's alike."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, Field

from ..image import ImageError, base64_bytes
from ..infotext import parse_infotext, read_info
from .schemas import FINITE
from .state import ServerState


class PngInfoRequest(BaseModel):
    model_config = FINITE

    image: str = Field(..., description="A base64 image or data URL.")


def add_routes(api: APIRouter, state: ServerState) -> None:
    @api.post("/sdapi/v1/png-info")
    async def png_info(body: PngInfoRequest) -> dict[str, Any]:
        limit = state.config.limits.input_pixels(state.current_model().config)
        try:  # text chunks after the pixels need them decoded: off the event loop, capped from the header
            text, items = await asyncio.to_thread(read_info, base64_bytes(body.image.strip()), limit)
        except ImageError as exc:
            raise HTTPException(422, f"image: {exc}") from None
        return {"info": text or "", "items": items, "parameters": parse_infotext(text) if text else {}}
