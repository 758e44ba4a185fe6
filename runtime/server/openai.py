"""OpenAI-compatible image routes: POST /v1/images/generations (the official client's `images.generate`),
POST /v1/images/edits (`images.edit`: inpainting, the mask's transparent part repainted),
GET /v1/images/files/{id}.png for `response_format="url"` and GET /v1/models (`models.list`). A request's `model`
picks one of the server's models as A1111's `sd_model_checkpoint` does (title, model name or hash prefix;
absent: the current model); an unknown one is refused, 422 naming `model`."""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import Response
from PIL import Image, ImageOps
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from ..families import family_for
from ..image import ImageError, decode_image, parameters_text, png_bytes
from ..pipeline import StableDiffusionPipeline
from ..request import GenerationRequest
from .schemas import OpenAIImageEditFields, OpenAIImageRequest
from .state import ServerState

# GenerationRequest field -> OpenAI body field, so 422s name what the client sent.
MAX_EDIT_IMAGES = 8  # files one edit may upload (decoded one by one, each under the pixel limit)
FIELD_NAMES = {"batch": "n", "width": "size", "height": "size", "steps": "steps", "mask_image": "mask"}


def to_request(body: OpenAIImageRequest | OpenAIImageEditFields, **edit: Any) -> GenerationRequest:
    width = height = None
    if body.size and body.size != "auto":
        width, height = (int(v) for v in body.size.split("x"))
    elif "mask_image" in edit and isinstance(edit["image"], Image.Image):  # inpainting keeps the picture's size
        width, height = edit["image"].size
    return GenerationRequest(
        prompt=body.prompt,
        negative_prompt=body.negative_prompt or None,
        steps=body.steps,
        guidance_scale=body.guidance_scale,
        width=width,
        height=height,
        seed=body.seed,
        batch=body.n,
        guidance_interval=getattr(body, "guidance_interval", None),  # generations only (edits are multipart)
        vae_tiling=getattr(body, "vae_tiling", None),
        deepcache_interval=getattr(body, "deepcache_interval", None),
        tome_ratio=getattr(body, "tome_ratio", None),
        **edit,
    )


def transparency_mask(image: Image.Image) -> Image.Image:
    """OpenAI's mask convention (fully transparent = edit) as this runtime's (white = repaint)."""
    return ImageOps.invert(image.getchannel("A")).point(lambda v: 255 if v == 255 else 0)


async def read_edit(
    request: Request, state: ServerState
) -> tuple[OpenAIImageEditFields, StableDiffusionPipeline, dict[str, Any]]:
    """The edit form: its text fields, the pipeline of its model, and what it edits: on a model that edits from
    references (FLUX.2 [klein]) every uploaded image, as `images.edit(image=[...])` sends them; otherwise the one
    image inpainted where the mask (or, without one, the image itself) is transparent."""
    async with request.form() as form:  # closes the uploads' temporary files
        try:
            fields = OpenAIImageEditFields(**{k: v for k, v in form.items() if isinstance(v, str)})
        except ValidationError as exc:
            error = exc.errors()[0]
            raise HTTPException(422, f"{'.'.join(str(p) for p in error['loc'])}: {error['msg']}") from None
        _, pipe = await state.model(fields.model, "model")
        limit = state.config.limits.input_pixels(pipe.config)
        uploads = [u for key in ("image", "image[]") for u in form.getlist(key) if isinstance(u, UploadFile)]
        if not uploads:
            raise HTTPException(422, "image: a file is required")
        if len(uploads) > MAX_EDIT_IMAGES:
            raise HTTPException(422, f"image: {len(uploads)} files, more than {MAX_EDIT_IMAGES}")
        mask = form.get("mask")
        images = [await _decode(upload, limit, "image") for upload in uploads]
        mask = await _decode(mask, limit, "mask") if isinstance(mask, UploadFile) else None
    if family_for(pipe.config).reference_images:  # a mask or strength given is refused by the request core
        repaint = {} if mask is None else {"mask_image": transparency_mask(mask)}
        return fields, pipe, {"image": [i.convert("RGB") for i in images], "strength": fields.strength, **repaint}
    if len(images) > 1:  # several are references, which the request core refuses by name on this model
        return fields, pipe, {"image": images}
    image = images[0]
    if mask is not None and mask.size != image.size:
        raise HTTPException(
            422, f"mask: is {mask.width}x{mask.height}; it must have the image's size, {image.width}x{image.height}"
        )
    repaint = transparency_mask(mask or image)
    if repaint.getextrema() == (0, 0):
        where = "mask" if mask is not None else "image"
        raise HTTPException(422, f"{where}: has no fully transparent pixel to edit (transparent = edit)")
    return fields, pipe, {"image": image.convert("RGB"), "mask_image": repaint, "strength": fields.strength}


async def _decode(upload: UploadFile, limit: int, name: str) -> Image.Image:
    try:  # decoding can take seconds and hundreds of MB: off the event loop, capped from the header
        return await asyncio.to_thread(decode_image, await upload.read(), limit, "RGBA")
    except ImageError as exc:
        raise HTTPException(422, f"{name}: {exc}") from None


def add_routes(api: APIRouter, state: ServerState) -> None:
    async def answer(request: GenerationRequest, response_format: str, pipe: StableDiffusionPipeline) -> dict[str, Any]:
        prepared = state.prepare(request, FIELD_NAMES, pipe)
        out = await state.generate(prepared, pipe)
        pngs = [png_bytes(img, parameters_text(prepared, out.parameters, i)) for i, img in enumerate(out.images)]
        if response_format == "url":
            data = [{"url": state.image_url(png)} for png in pngs]
        else:
            data = [{"b64_json": base64.b64encode(png).decode()} for png in pngs]
        return {"created": int(time.time()), "data": data}

    @api.post("/v1/images/generations")
    async def generations(body: OpenAIImageRequest) -> dict[str, Any]:
        _, pipe = await state.model(body.model, "model")
        return await answer(to_request(body), body.response_format, pipe)

    @api.post("/v1/images/edits")
    async def edits(request: Request) -> dict[str, Any]:
        """Multipart, as the official client's `images.edit` sends it: image, mask, prompt, n, size, ..."""
        fields, pipe, edit = await read_edit(request, state)
        return await answer(to_request(fields, **edit), fields.response_format, pipe)

    @api.get("/v1/models")
    def models() -> dict[str, Any]:
        """The server's models as OpenAI lists models; each `id` is a model name `model` accepts."""
        state.ready()
        listed = [{"id": e.name, "object": "model", "created": 0, "owned_by": "sd-onnx"} for e in state.models.listed()]
        return {"object": "list", "data": listed}

    @api.get("/v1/images/files/{image_id}.png")
    def image_file(image_id: str) -> Response:
        with state.images_lock:
            png = state.images.get(image_id)  # an in-memory store: no request path reaches the file system
        if png is None:
            raise HTTPException(404, "no such image (the store keeps the most recent ones only)")
        return Response(png, media_type="image/png")
