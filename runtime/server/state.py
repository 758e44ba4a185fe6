"""What the routes share: settings, the models and their loaded pipelines, the job queue, metrics, the URL image
store, and `generate`, the one path from a GenerationRequest to an HTTP answer."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import sys
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fastapi import HTTPException
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ..annotator_models import AnnotatorNetwork, load_annotators
from ..echo import echo
from ..pipeline import GenerationCancelled, PipelineOutput, StableDiffusionPipeline
from ..request import GenerationRequest, Limits, RequestError
from ..upscale import Upscaler, load_upscalers
from .jobs import Job, JobQueue, Jobs, QueueFull, ShuttingDown, WorkerLost
from .models import ModelCache, ModelEntry, ModelUnavailable

LOG = logging.getLogger("sd_onnx.server")
Progress = Callable[[int, int], Awaitable[None]]
PROGRESS_POLL_S = 0.1  # how often a waiting request looks for a finished step to report
# Set by middleware.BodyLimit for each HTTP request once its body is read: waits until the client hangs up, so
# `generate` can drop or cancel the job of a client that is no longer there. None outside a request.
CLIENT_GONE: ContextVar[Callable[[], Awaitable[None]] | None] = ContextVar("sd_onnx_client_gone", default=None)


class ClientGone(Exception):
    """The client hung up before its answer was ready: nothing to answer, and not a server error."""


@dataclass(frozen=True)
class ServeConfig:
    """Limits and security settings of one server."""

    limits: Limits = field(default_factory=Limits)
    timeout_s: float = 600.0
    max_body_bytes: int = 10 * 1024 * 1024
    api_key: str | None = None
    workers: int = 1
    queue_size: int = 8
    image_store_size: int = 64
    public_url: str = "http://127.0.0.1:7860"
    graceful_shutdown_s: float = 30.0
    # The address the server listens on, for the Host check (DNS rebinding); None (an app built in process,
    # Ray Serve's builder) accepts any Host.
    host: str | None = None
    # Web origins (scheme://host[:port]) besides the server's own whose browser requests are served, with CORS.
    allow_origins: tuple[str, ...] = ()
    # Exported upscalers, one per sub-folder (`--upscalers-dir`), for the extras routes and hires fix.
    upscalers_dir: Path | None = None
    # Exported ControlNet preprocessor networks, one per sub-folder (`--annotators-dir`; annotator_models.py).
    annotators_dir: Path | None = None
    # Refuse (422) A1111 fields and settings the server would otherwise ignore and list in `info` (--strict).
    strict: bool = False
    # Serve the MCP endpoint at /mcp (`--mcp`; mcp_tools.py), behind the same API key.
    mcp: bool = False

    def __post_init__(self) -> None:
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api_key is empty; give a key or None for no authentication")
        origins = []
        for text in self.allow_origins:
            origin = normalize_origin(text)
            if origin is None:
                raise ValueError(
                    f"allow_origins: {text!r} is not an origin like https://app.example or http://host:port"
                )
            origins.append(origin)
        object.__setattr__(self, "allow_origins", tuple(origins))  # as browsers write them, to compare exactly


def normalize_origin(text: str) -> str | None:
    """`scheme://host[:port]` as a browser serialises it in `Origin` (lower case, no default port, no slash), or
    None when `text` is not an http(s) origin (a path, query, user name or the opaque `null` origin)."""
    try:
        parts = urlsplit(text.strip())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.password:
        return None
    if parts.path not in ("", "/") or parts.query or parts.fragment or any(c.isspace() for c in text.strip()):
        return None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    default = 80 if parts.scheme == "http" else 443
    return f"{parts.scheme}://{host}" + (f":{port}" if port is not None and port != default else "")


class ServerState:
    """Shared by every route; the pipeline arrives from a loader thread so /health can say "loading"."""

    def __init__(
        self,
        config: ServeConfig,
        jobs_factory: Callable[[StableDiffusionPipeline], Jobs] | None = None,
        models: ModelCache | None = None,
    ) -> None:
        """`jobs_factory` makes the job queue once the pipeline is loaded: by default worker threads, each job on
        its own pipeline; under Ray Serve a queue whose jobs run on the model's replicas (ray_serve.RemoteJobs).
        `models`: the models offered (`--models-dir`); None: the one the loader loads."""
        self.config = config
        self.upscalers: dict[str, Upscaler] = load_upscalers(config.upscalers_dir)
        self.annotators: dict[str, AnnotatorNetwork] = load_annotators(config.annotators_dir)
        self.jobs_factory = jobs_factory or (lambda pipe: JobQueue(None, config.workers, config.queue_size))
        self.models = models
        # A loaded pipeline: the current model's, unless a request on another model evicted it (see `model`).
        self.pipe: StableDiffusionPipeline | None = None
        self.jobs: Jobs | None = None
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

    def load(self, loader: Callable[[], StableDiffusionPipeline]) -> None:
        """Build the pipeline; a model that cannot load ends the server with its one-line reason. Loaders that
        generate here call `pipe.self_test()`, so a model that cannot generate at its defaults never gets ready."""
        try:
            pipe = loader()
        except Exception as exc:  # noqa: BLE001 - whatever stops the model loading must stop the server, visibly
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            print(f"Error: {reason}", file=sys.stderr, flush=True)
            os._exit(1)
        if self.models is None:
            self.models = ModelCache.of(pipe)
        self.jobs = self.jobs_factory(pipe)
        self.pipe = pipe
        print(f"ready: {pipe.model_name} ({pipe.manifest.model_family if pipe.manifest else 'onnx folder'})",
              file=sys.stderr, flush=True)  # fmt: skip

    def ready(self) -> tuple[StableDiffusionPipeline, Jobs]:
        if self.jobs is not None and not self.jobs.accepting:
            raise HTTPException(503, "server is shutting down", headers={"Retry-After": "10"})
        if self.pipe is None or self.jobs is None:
            raise HTTPException(503, "model is still loading", headers={"Retry-After": "5"})
        return self.pipe, self.jobs

    def current_model(self) -> ModelEntry:
        """The model requests that name none run on (503 while the server is loading)."""
        self.ready()
        return self.models.current

    def find_model(self, name: str | None, field: str) -> ModelEntry:
        """The model `name` names (None or "": the current one); 422 naming the body's `field` when none has
        that name."""
        self.ready()
        entry = self.models.current if not name else self.models.find(name)
        if entry is None:
            known = ", ".join(e.title for e in self.models.listed()[:20])
            raise HTTPException(422, f"{field}: no model named {echo(name)}; this server has: {known}")
        return entry

    async def model(self, name: str | None, field: str) -> tuple[ModelEntry, StableDiffusionPipeline]:
        """The model `name` names (see `find_model`) and its pipeline, loaded off the event loop if need be;
        422 naming `field` when it cannot be served."""
        entry = self.find_model(name, field)
        try:
            pipe = self.models.loaded(entry) or await asyncio.to_thread(self.models.get, entry)
        except ModelUnavailable as exc:
            raise HTTPException(422, f"{field}: {exc}") from None
        if entry is self.models.current or not self.models.holds(self.models.current):
            self.pipe = pipe  # never a pipeline the cache let go of
        return entry, pipe

    async def select(self, name: str, field: str) -> ModelEntry:
        """Make the model `name` names the current one once it is loaded and has passed its self-test;
        requests already running keep the pipeline they run on."""
        entry, pipe = await self.model(name, field)
        self.models.current, self.pipe = entry, pipe
        return entry

    def prepare(
        self, request: GenerationRequest, names: dict[str, str], pipe: StableDiffusionPipeline | None = None
    ) -> GenerationRequest:
        """Resolve against the model (`pipe`, default the current one) and the server's limits; 422 naming the
        field as the API spells it."""
        current, _ = self.ready()
        try:
            return (pipe or current).prepare(request, self.config.limits)
        except RequestError as exc:
            raise HTTPException(422, f"{names.get(exc.field, exc.field)}: {exc.reason}") from None

    async def generate(
        self, request: GenerationRequest, pipe: StableDiffusionPipeline | None = None, progress: Progress | None = None
    ) -> PipelineOutput:
        """Queue a resolved request on `pipe` (default: the current model's) and wait; queue, timeout and
        cancellation become HTTP answers. The job of a request that times out or whose client hangs up is
        cancelled (dropped if still queued), not left running for nobody. `progress(step, total)` is awaited
        whenever the job has done another step (MCP's progress notifications)."""
        current, jobs = self.ready()
        try:
            job = jobs.submit(request, pipe or current)
        except (QueueFull, ShuttingDown) as exc:
            raise HTTPException(503, str(exc), headers={"Retry-After": "10"}) from None
        waiter = asyncio.wrap_future(job.future)
        reporter = asyncio.ensure_future(_report_steps(job, waiter, progress)) if progress is not None else None
        try:
            out = await asyncio.wait_for(unless_client_gone(waiter), self.config.timeout_s)
            if reporter is not None:
                await reporter  # the last step's notification before the answer
            return out
        except (TimeoutError, asyncio.TimeoutError):  # the same class from Python 3.11 on
            _abandon(job, waiter)
            raise HTTPException(504, f"generation exceeded the limit timeout_s={self.config.timeout_s:g}") from None
        except (ClientGone, asyncio.CancelledError):  # the client hung up, or the server cancelled its request
            _abandon(job, waiter)
            raise
        except GenerationCancelled:
            raise HTTPException(409, "generation was interrupted") from None
        except (QueueFull, ShuttingDown, WorkerLost) as exc:  # QueueFull: Serve's queue refuses when assigning
            raise HTTPException(503, str(exc), headers={"Retry-After": "10"}) from None
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        finally:
            if reporter is not None:
                reporter.cancel()

    def store_image(self, png: bytes) -> str:
        image_id = secrets.token_hex(16)
        with self.images_lock:
            self.images[image_id] = png
            while len(self.images) > self.config.image_store_size:
                self.images.popitem(last=False)
        return image_id

    def image_url(self, png: bytes) -> str:
        """A link to a stored image on the configured public URL (never the client's Host header)."""
        return f"{self.config.public_url}/v1/images/files/{self.store_image(png)}.png"


async def unless_client_gone(waiter: asyncio.Future) -> Any:
    """The work's result, or ClientGone as soon as the request's client hangs up (watched through CLIENT_GONE;
    without it, as in a plain ASGI call, just the result). The work itself is left to the caller; its later
    error, if any, is nobody's to log."""
    client_gone = CLIENT_GONE.get()
    if client_gone is None:
        return await asyncio.shield(waiter)
    gone = asyncio.ensure_future(client_gone())
    try:
        await asyncio.wait({waiter, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not waiter.done():
        waiter.add_done_callback(lambda done: done.cancelled() or done.exception())
        raise ClientGone
    return waiter.result()


async def _report_steps(job: Job, waiter: asyncio.Future, progress: Progress) -> None:
    """Await `progress(step, total)` whenever the job has done more steps (polled), the last one included."""
    reported = 0
    while True:
        done = waiter.done()
        if job.step > reported:
            reported = job.step
            await progress(job.step, job.total)
        if done:
            return
        await asyncio.sleep(PROGRESS_POLL_S)


def _abandon(job: Job, waiter: asyncio.Future) -> None:
    """Nobody will read this job's answer: cancel it at its next step, or drop it if it is still queued."""
    job.cancel()
    job.future.cancel()  # still queued: never runs
    waiter.add_done_callback(lambda done: done.cancelled() or done.exception())  # its error is nobody's to log
