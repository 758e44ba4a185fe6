"""A1111's upscaling routes: /sdapi/v1/upscalers, /sdapi/v1/latent-upscale-modes, /sdapi/v1/extra-single-image and
/sdapi/v1/extra-batch-images, over the built-in resamplers and the server's exported upscalers
(`sd-run serve --upscalers-dir`, `state.upscalers`).

An extras request is decoded, checked and upscaled off the event loop, one request at a time, with at most
`queue_size` waiting (503 beyond). Its images are limited to `OUTPUT_FACTOR` times the pixels the server
generates (an image it makes, upscaled 4x): every pass of a model and the result are checked before any work,
and the input image is refused from its header beyond that. A request past `--timeout` (504), a client that
hangs up (499) or a shutdown stops the work at its next tile.
"""

from __future__ import annotations

import asyncio
import base64
import html
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from fastapi import APIRouter, HTTPException
from PIL import Image

from ..echo import echo
from ..image import ImageError, decode_base64_image
from ..upscale import RESAMPLERS, UpscaleCancelled, plan, postprocessed_png, upscale_image
from .extras_schemas import ExtrasBatchImagesRequest, ExtrasRequest, ExtrasSingleImageRequest
from .state import ClientGone, ServerState, unless_client_gone

OUTPUT_FACTOR = 16  # an image the server may generate, upscaled 4x
BUILT_IN_SCALE = 4  # what A1111 reports for its resamplers (UpscalerData's default)
# A1111's shared.latent_upscale_modes, in its order (hires fix's latent upscalers).
LATENT_UPSCALE_MODES = ("Latent", "Latent (antialiased)", "Latent (bicubic)", "Latent (bicubic antialiased)",
                        "Latent (nearest)", "Latent (nearest-exact)")  # fmt: skip
NOT_IMPLEMENTED = ("gfpgan_visibility", "codeformer_visibility")


class ExtrasWork:
    """One worker thread for upscaling and a bound on waiting requests."""

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sd-extras")
        self.pending = 0
        self.lock = threading.Lock()

    async def run(self, work: Callable[[Callable[[], bool]], Any]) -> Any:
        """`work(cancelled)` on the worker thread; 503 when `queue_size` requests already wait, 504 past the
        timeout; a client that hangs up (or a server cancelling the request) stops it at the next tile."""
        with self.lock:
            if self.pending > self.state.config.queue_size:
                raise HTTPException(503, "upscaling queue is full", headers={"Retry-After": "10"})
            self.pending += 1
        stop = threading.Event()

        def cancelled() -> bool:
            jobs = self.state.jobs
            return stop.is_set() or (jobs is not None and not jobs.accepting)

        future: Future = self.executor.submit(lambda: None if stop.is_set() else work(cancelled))
        future.add_done_callback(lambda _: self._done())
        try:
            return await asyncio.wait_for(unless_client_gone(asyncio.wrap_future(future)), self.state.config.timeout_s)
        except (TimeoutError, asyncio.TimeoutError):
            stop.set()
            raise HTTPException(
                504, f"upscaling exceeded the limit timeout_s={self.state.config.timeout_s:g}"
            ) from None
        except (ClientGone, asyncio.CancelledError):
            stop.set()
            raise
        except UpscaleCancelled:
            raise HTTPException(503, "server is shutting down", headers={"Retry-After": "10"}) from None

    def _done(self) -> None:
        with self.lock:
            self.pending -= 1


def add_routes(api: APIRouter, state: ServerState) -> None:
    work = ExtrasWork(state)

    @api.get("/sdapi/v1/upscalers")
    def upscalers() -> list[dict[str, Any]]:
        """A1111's list: the resamplers None, Lanczos and Nearest, then the exported upscalers by folder name."""
        built_in = [{"name": name, "model_name": None, "model_path": None, "model_url": None,
                     "scale": BUILT_IN_SCALE} for name in RESAMPLERS]  # fmt: skip
        return built_in + [
            {
                "name": name,
                "model_name": u.manifest.name,
                "model_path": u.folder.name,
                "model_url": None,
                "scale": u.scale,
            }  # fmt: skip
            for name, u in state.upscalers.items()
        ]

    @api.get("/sdapi/v1/latent-upscale-modes")
    def latent_upscale_modes() -> list[dict[str, str]]:
        return [{"name": name} for name in LATENT_UPSCALE_MODES]

    @api.post("/sdapi/v1/extra-single-image")
    async def extra_single_image(body: ExtrasSingleImageRequest) -> dict[str, Any]:
        limit = _check(body, state)
        images, info = await work.run(
            lambda cancelled: _process(body, [("image", body.image)], state, limit, cancelled)
        )
        return {"html_info": info, "image": images[0]}

    @api.post("/sdapi/v1/extra-batch-images")
    async def extra_batch_images(body: ExtrasBatchImagesRequest) -> dict[str, Any]:
        limit = _check(body, state)
        if len(body.imageList) > state.config.limits.max_batch:
            raise HTTPException(422, f"imageList: at most {state.config.limits.max_batch} images (--max-batch)")
        sources = [(f"imageList[{i}].data", item.data) for i, item in enumerate(body.imageList)]
        images, info = await work.run(lambda cancelled: _process(body, sources, state, limit, cancelled))
        return {"html_info": info, "images": images}


def _check(body: ExtrasRequest, state: ServerState) -> int:
    """The output pixel limit, once the names are known upscalers (422 otherwise) and, with --strict, no field
    asks for what is not implemented."""
    pipe, _ = state.ready()
    for field in ("upscaler_1", "upscaler_2"):
        name = getattr(body, field)
        if name not in RESAMPLERS and name not in state.upscalers:
            known = ", ".join([*RESAMPLERS, *state.upscalers])
            raise HTTPException(422, f"{field}: unknown upscaler {echo(name)} (known: {known})")
    if getattr(state.config, "strict", False) and _ignored(body):
        raise HTTPException(422, f"{_ignored(body)[0]}: not implemented by this server (--strict)")
    return OUTPUT_FACTOR * state.config.limits.pixels(pipe.config)


def _process(
    body: ExtrasRequest, sources: list[tuple[str, str]], state: ServerState, limit: int, cancelled: Callable[[], bool]
) -> tuple[list[str], str]:
    """Decode every image, plan and check every size, then upscale: (base64 PNGs, html_info)."""
    images = []
    for field, data in sources:
        try:
            images.append(decode_base64_image(data, limit))
        except ImageError as exc:
            raise HTTPException(422, f"{field}: {exc}") from None
    for image in images:
        _target(body, image, state, limit)  # every refusal before any work
    results, text = [], ""
    for image in images:
        result, text = _upscale(body, image, state, limit, cancelled)
        results.append(base64.b64encode(postprocessed_png(result, text, source=image)).decode())
    notes = [f"Not applied (not implemented here): {', '.join(_ignored(body))}"] if _ignored(body) else []
    lines = [line for line in (text, *notes) if line]
    return results, "<p>" + "<br>\n".join(html.escape(line) for line in lines) + "</p>"


def _ignored(body: ExtrasRequest) -> list[str]:
    """Fields that ask for what this server does not do: face restoration, and unknown fields."""
    asked = [f"{name}={getattr(body, name):g}" for name in NOT_IMPLEMENTED if getattr(body, name) > 0]
    return asked + sorted(key[:40] for key in (body.model_extra or {}))


def _target(body: ExtrasRequest, image: Image.Image, state: ServerState, limit: int) -> tuple[tuple[int, int], float]:
    """A1111's destination size (Upscaler.upscale rounds down to multiples of 8) and scale; 422 when it is
    empty or, counting every model pass of either upscaler, over `limit` pixels."""
    if body.resize_mode == 1:
        scale, field = (
            max(body.upscaling_resize_w / image.width, body.upscaling_resize_h / image.height),
            "upscaling_resize_w",
        )
    else:
        scale, field = body.upscaling_resize, "upscaling_resize"
    target = (int(image.width * scale // 8 * 8), int(image.height * scale // 8 * 8))
    if min(target) < 1:
        raise HTTPException(422, f"{field}: {image.width}x{image.height} scaled by {scale:g} rounds down to "
                            f"{target[0]}x{target[1]} (A1111 rounds to multiples of 8)")  # fmt: skip
    used = [body.upscaler_1] + ([body.upscaler_2] if body.extras_upscaler_2_visibility > 0 else [])
    for name in used if body.upscaler_1 != "None" else []:
        try:
            plan(image.size, name, target, state.upscalers, limit)
        except ValueError as exc:
            raise HTTPException(422, f"{field}: {exc}") from None
    return target, scale


def _upscale(
    body: ExtrasRequest, image: Image.Image, state: ServerState, limit: int, cancelled: Callable[[], bool]
) -> tuple[Image.Image, str]:
    """One image through A1111's extras upscale: upscaler 1, optionally blended with upscaler 2, optionally
    cropped (resize_mode 1); the infotext says what was done. upscaler_1 None does nothing, as in A1111."""
    if body.upscaler_1 == "None":
        return image, ""
    target, scale = _target(body, image, state, limit)
    info = {"Postprocess upscale to": f"{body.upscaling_resize_w}x{body.upscaling_resize_h}"} if body.resize_mode \
        else {"Postprocess upscale by": f"{scale:g}"}  # fmt: skip
    result = _one(body, image, body.upscaler_1, target, state, limit, cancelled)
    info["Postprocess upscaler"] = body.upscaler_1
    if body.upscaler_2 != "None" and body.extras_upscaler_2_visibility > 0:
        second = _one(body, image, body.upscaler_2, target, state, limit, cancelled).convert(result.mode)
        result = Image.blend(result, second, body.extras_upscaler_2_visibility)
        info["Postprocess upscaler 2"] = body.upscaler_2
    if body.resize_mode == 1 and body.upscaling_crop:
        info["Postprocess crop to"] = f"{result.width}x{result.height}"
    return result, ", ".join(f"{key}: {value}" for key, value in info.items())


def _one(
    body: ExtrasRequest,
    image: Image.Image,
    name: str,
    target: tuple[int, int],
    state: ServerState,
    limit: int,
    cancelled: Callable[[], bool],
) -> Image.Image:
    result = upscale_image(image, name, target, state.upscalers, max_pixels=limit, cancelled=cancelled)
    if body.resize_mode == 1 and body.upscaling_crop:
        size = (body.upscaling_resize_w, body.upscaling_resize_h)
        cropped = Image.new(result.mode, size)
        cropped.paste(result, (size[0] // 2 - result.width // 2, size[1] // 2 - result.height // 2))
        result = cropped
    return result
