"""The FastAPI application: A1111 and OpenAI routes over one shared pipeline and its bounded job queue."""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import os
import secrets
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from PIL import Image, UnidentifiedImageError
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ..image import a1111_parameters
from ..pipeline import GenerationCancelled, StableDiffusionPipeline
from ..schedulers import SCHEDULERS, scheduler_names
from .jobs import JobQueue, QueueFull, ShuttingDown
from .schemas import Img2ImgRequest, OpenAIImageRequest, Txt2ImgRequest

# SD 1.x latent -> RGB approximation, for cheap progress previews.
PREVIEW_FACTORS = np.array(
    [[0.298, 0.207, 0.208], [0.187, 0.286, 0.173], [-0.158, 0.189, 0.264], [-0.184, -0.271, -0.473]], np.float32
)


@dataclass(frozen=True)
class ServeConfig:
    """Limits and security settings of one server."""

    max_steps: int = 50
    max_pixels: int = 1024 * 1024
    max_batch: int = 4
    timeout_s: float = 600.0
    max_body_bytes: int = 10 * 1024 * 1024
    api_key: str | None = None
    workers: int = 1
    queue_size: int = 8
    image_store_size: int = 64


class ServerState:
    """What the routes share: the pipeline (once loaded), the queue, metrics, the URL image store."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.pipe: StableDiffusionPipeline | None = None
        self.jobs: JobQueue | None = None
        self.images: OrderedDict[str, bytes] = OrderedDict()
        self.images_lock = threading.Lock()
        self.registry = CollectorRegistry()
        self.requests = Counter("sd_requests", "HTTP requests", ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram(
            "sd_request_latency_seconds", "Request latency", ["endpoint"], registry=self.registry,
            buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600),
        )  # fmt: skip
        Gauge("sd_queue_depth", "Jobs waiting", registry=self.registry).set_function(
            lambda: self.jobs.depth() if self.jobs else 0
        )
        Gauge("sd_steps_per_second", "Denoising steps per busy second", registry=self.registry).set_function(
            lambda: self.jobs.steps_done / self.jobs.busy_seconds if self.jobs and self.jobs.busy_seconds else 0.0
        )

    def load(self, loader: Any) -> None:
        """Build the pipeline; a model that cannot load ends the server with its one-line reason."""
        try:
            pipe = loader()
        except (ValueError, OSError) as exc:
            print(f"Error: {exc}", file=sys.stderr, flush=True)
            os._exit(1)
        self.jobs = JobQueue(pipe, self.config.workers, self.config.queue_size)
        self.pipe = pipe

    def store_image(self, png: bytes) -> str:
        image_id = secrets.token_hex(16)
        with self.images_lock:
            self.images[image_id] = png
            while len(self.images) > self.config.image_store_size:
                self.images.popitem(last=False)
        return image_id


def create_app(state: ServerState, loader: Any) -> FastAPI:
    """The application; `loader()` builds the pipeline in the background so /health can say "loading"."""

    async def lifespan(app: FastAPI):  # noqa: ANN202 - FastAPI's lifespan protocol
        thread = threading.Thread(target=state.load, args=(loader,), daemon=True)
        thread.start()
        yield
        if state.jobs is not None:
            await asyncio.to_thread(state.jobs.shutdown)

    app = FastAPI(title="sd-onnx", version="0.1.0", lifespan=lifespan)
    app.add_middleware(_BodyLimit, max_bytes=state.config.max_body_bytes)

    @app.middleware("http")
    async def measure(request: Request, call_next: Any) -> Response:
        started = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        endpoint = getattr(route, "path", "unmatched")
        state.requests.labels(endpoint, str(response.status_code)).inc()
        state.latency.labels(endpoint).observe(time.perf_counter() - started)
        return response

    @app.get("/health")
    def health() -> JSONResponse:
        if state.jobs is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        if not state.jobs.accepting:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return JSONResponse({"status": "ok"})

    api = APIRouter(dependencies=[Depends(_api_key_check(state))])
    _add_a1111_routes(api, state)
    _add_openai_routes(api, state)

    @api.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(state.registry), media_type=CONTENT_TYPE_LATEST)

    app.include_router(api)
    return app


def _api_key_check(state: ServerState) -> Any:
    def check(request: Request) -> None:
        key = state.config.api_key
        if key is None:
            return
        given = request.headers.get("x-api-key") or request.headers.get("authorization", "").removeprefix("Bearer ")
        if not secrets.compare_digest(given.encode(), key.encode()):
            raise HTTPException(401, "missing or wrong API key", headers={"WWW-Authenticate": "Bearer"})

    return check


def _ready(state: ServerState) -> tuple[StableDiffusionPipeline, JobQueue]:
    if state.pipe is None or state.jobs is None:
        raise HTTPException(503, "model is still loading", headers={"Retry-After": "5"})
    return state.pipe, state.jobs


def _check_limits(state: ServerState, steps: int, width: int, height: int, images: int) -> None:
    cfg = state.config
    if steps > cfg.max_steps:
        raise HTTPException(422, f"steps {steps} exceeds the limit max_steps={cfg.max_steps}")
    if width * height > cfg.max_pixels:
        raise HTTPException(422, f"{width}x{height} exceeds the limit max_pixels={cfg.max_pixels}")
    if images > cfg.max_batch:
        raise HTTPException(422, f"{images} images exceeds the limit max_batch={cfg.max_batch}")


async def _generate(state: ServerState, kwargs: dict[str, Any]) -> Any:
    """Queue a job and wait for it; maps queue, timeout and pipeline errors to HTTP answers."""
    pipe, jobs = _ready(state)
    kwargs.setdefault("height", pipe.config.default_resolution)
    kwargs.setdefault("width", pipe.config.default_resolution)
    images = kwargs.get("num_images_per_prompt", 1)
    _check_limits(state, kwargs["num_inference_steps"], kwargs["width"], kwargs["height"], images)
    try:
        job = jobs.submit(kwargs)
    except (QueueFull, ShuttingDown) as exc:
        raise HTTPException(503, str(exc), headers={"Retry-After": "10"}) from None
    try:
        return await asyncio.wait_for(asyncio.wrap_future(job.future), state.config.timeout_s)
    except TimeoutError:
        job.cancelled.set()
        raise HTTPException(504, f"generation exceeded the limit timeout_s={state.config.timeout_s:g}") from None
    except GenerationCancelled:
        raise HTTPException(409, "generation was interrupted") from None
    except ShuttingDown as exc:
        raise HTTPException(503, str(exc), headers={"Retry-After": "10"}) from None
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None


def _png(image: Image.Image, parameters: str | None = None) -> bytes:
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def _decode_image(data: str) -> Image.Image:
    payload = data.split(",", 1)[1] if data.startswith("data:") else data
    try:
        return Image.open(io.BytesIO(base64.b64decode(payload, validate=True))).convert("RGB")
    except (binascii.Error, UnidentifiedImageError, OSError, ValueError):
        raise HTTPException(422, "init_images[0] is not a base64-encoded image") from None


def _a1111_kwargs(body: Txt2ImgRequest) -> dict[str, Any]:
    seed = body.seed if body.seed >= 0 else secrets.randbits(32)
    kwargs = {
        "prompt": body.prompt,
        "negative_prompt": body.negative_prompt or None,
        "num_inference_steps": body.steps,
        "guidance_scale": body.cfg_scale,
        "seed": seed,
        "num_images_per_prompt": body.batch_size * body.n_iter,
    }
    if body.width is not None:
        kwargs["width"] = body.width
    if body.height is not None:
        kwargs["height"] = body.height
    if body.sampler_name:
        kwargs["scheduler"] = body.sampler_name
    return kwargs


def _add_a1111_routes(api: APIRouter, state: ServerState) -> None:
    async def run(body: Txt2ImgRequest, extra: dict[str, Any]) -> dict[str, Any]:
        kwargs = {**_a1111_kwargs(body), **extra}
        out = await _generate(state, kwargs)
        text = a1111_parameters(body.prompt, body.negative_prompt, out.parameters)
        images = [base64.b64encode(_png(img, text)).decode() for img in out.images]
        info = {"prompt": body.prompt, "seed": kwargs["seed"], "infotexts": [text] * len(images), **out.parameters}
        return {"images": images, "parameters": body.model_dump(exclude={"init_images"}), "info": json.dumps(info)}

    @api.post("/sdapi/v1/txt2img")
    async def txt2img(body: Txt2ImgRequest) -> dict[str, Any]:
        return await run(body, {})

    @api.post("/sdapi/v1/img2img")
    async def img2img(body: Img2ImgRequest) -> dict[str, Any]:
        return await run(body, {"image": _decode_image(body.init_images[0]), "strength": body.denoising_strength})

    @api.get("/sdapi/v1/samplers")
    def samplers() -> list[dict[str, Any]]:
        names = scheduler_names()
        return [
            {"name": key, "aliases": [n for n in names if n != key and _same(n, key)], "options": {}}
            for key in SCHEDULERS
        ]

    @api.get("/sdapi/v1/sd-models")
    def sd_models() -> list[dict[str, Any]]:
        pipe, _ = _ready(state)
        manifest = pipe.manifest
        name = manifest.source.rstrip("/").split("/")[-1] if manifest else "onnx-model"
        digest = manifest.components["unet"].files[manifest.components["unet"].file] if manifest else ""
        return [
            {"title": name, "model_name": name, "hash": digest[:10], "sha256": digest, "filename": name, "config": None}
        ]

    @api.get("/sdapi/v1/progress")
    def progress(skip_current_image: bool = False) -> dict[str, Any]:
        _, jobs = _ready(state)
        job = jobs.current()
        fraction = job.step / job.total if job and job.total else 0.0
        elapsed = time.monotonic() - job.started if job and job.started else 0.0
        eta = elapsed / fraction - elapsed if fraction > 0 else 0.0
        preview = None if skip_current_image or job is None or job.latents is None else _preview(job.latents)
        return {
            "progress": fraction,
            "eta_relative": eta,
            "state": {
                "job_count": jobs.depth() + (1 if job else 0),
                "sampling_step": job.step if job else 0,
                "sampling_steps": job.total if job else 0,
                "interrupted": bool(job and job.cancelled.is_set()),
            },
            "current_image": preview,
            "textinfo": None,
        }

    @api.post("/sdapi/v1/interrupt")
    def interrupt() -> dict[str, Any]:
        _, jobs = _ready(state)
        return {"interrupted": jobs.interrupt()}


def _same(alias: str, key: str) -> bool:
    from ..schedulers import resolve_name

    return resolve_name(alias) == key


def _preview(latents: np.ndarray) -> str | None:
    if latents.shape[1] != 4:
        return None
    rgb = np.einsum("chw,cr->hwr", latents[0], PREVIEW_FACTORS)
    image = Image.fromarray(((rgb + 1) / 2 * 255).clip(0, 255).astype(np.uint8))
    return base64.b64encode(_png(image)).decode()


def _add_openai_routes(api: APIRouter, state: ServerState) -> None:
    @api.post("/v1/images/generations")
    async def generations(body: OpenAIImageRequest, request: Request) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"prompt": body.prompt, "num_inference_steps": 20, "num_images_per_prompt": body.n}
        kwargs["num_inference_steps"] = min(20, state.config.max_steps)
        kwargs["seed"] = secrets.randbits(32)
        if body.size:
            width, height = (int(v) for v in body.size.split("x"))
            kwargs.update(width=width, height=height)
        out = await _generate(state, kwargs)
        pngs = [_png(img, a1111_parameters(body.prompt, None, out.parameters)) for img in out.images]
        if body.response_format == "url":
            base = str(request.base_url).rstrip("/")
            data = [{"url": f"{base}/v1/images/files/{state.store_image(png)}.png"} for png in pngs]
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


class _BodyLimit:
    """Refuse request bodies over `max_bytes` with 413, whether or not they declare their length."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await _too_large(self.max_bytes, scope, receive, send)
        seen = 0

        async def limited_receive() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise _BodyTooLarge
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _BodyTooLarge:
            await _too_large(self.max_bytes, scope, receive, send)


class _BodyTooLarge(Exception):
    pass


async def _too_large(limit: int, scope: dict, receive: Any, send: Any) -> None:
    response = JSONResponse({"detail": f"request body exceeds the limit max_body_bytes={limit}"}, status_code=413)
    await response(scope, receive, send)
