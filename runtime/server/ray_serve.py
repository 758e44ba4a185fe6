"""`sd-run serve --ray`: the same FastAPI app as Ray Serve's ingress, the model held by a deployment of replicas.

Each model replica loads the pipeline once (threads = its CPUs) and runs one generation at a time; Serve
queues the rest at the ingress (`max_queued_requests`, past which the routes answer 503 like the
single-process queue) and routes to the least busy replica, or adds replicas under `--autoscale`. A job
streams its progress (step, latents) back to the ingress, so /sdapi/v1/progress, interrupt and timeouts work
as in one process; a replica that dies mid-job answers its request 503 and Serve replaces it. Deploying
again under the same application name (`deploy` with a new model folder) rolls the replicas over without
dropping requests. Needs the `[ray]` extra.
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from fastapi import FastAPI
from ray import serve
from ray.exceptions import RayActorError, RayError
from ray.serve.exceptions import BackPressureError, RequestCancelledError

from ..pipeline import GenerationCancelled, StableDiffusionPipeline
from ..ray_cluster import connect, loopback_serve_replica
from ..request import GenerationRequest, Limits
from .app import create_app
from .jobs import Job, QueueFull, ShuttingDown, WorkerLost
from .state import ServeConfig, ServerState

APP_NAME = "sd-onnx"
INGRESS_CONCURRENCY = 1000  # the ingress only waits on replicas; Serve's own queue bounds the work


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide to deploy: `address` None starts a local Ray on 127.0.0.1."""

    address: str | None = None
    replicas: int = 1
    autoscale: tuple[int, int] | None = None
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"replicas: must be >= 1, got {self.replicas}")
        if self.autoscale is not None and not 1 <= self.autoscale[0] <= self.autoscale[1]:
            raise ValueError(f"autoscale: needs 1 <= MIN <= MAX, got {self.autoscale[0]}:{self.autoscale[1]}")
        if not (self.cpus_per_replica > 0 and math.isfinite(self.cpus_per_replica)):
            raise ValueError(f"cpus_per_replica: must be a positive number, got {self.cpus_per_replica}")
        if not (self.gpus_per_replica >= 0 and math.isfinite(self.gpus_per_replica)):
            raise ValueError(f"gpus_per_replica: must be >= 0, got {self.gpus_per_replica}")

    def scaling(self) -> dict[str, Any]:
        """Serve's replica settings: a fixed count, or autoscaling on queued + running requests."""
        if self.autoscale is None:
            return {"num_replicas": self.replicas}
        low, high = self.autoscale
        return {
            "autoscaling_config": {
                "min_replicas": low,
                "initial_replicas": low,
                "max_replicas": high,
                "target_ongoing_requests": 1,  # one generation per replica: queue depth is the signal
                "upscale_delay_s": 5,
                "downscale_delay_s": 120,
            }
        }


class ModelReplica:
    """One copy of the pipeline; `generate` streams ("step", i, total, latents) and then ("done", output)."""

    def __init__(self, folder: str, provider: str, threads: int | None, loras: list[tuple[str, float]]) -> None:
        loopback_serve_replica()
        self.pipe = StableDiffusionPipeline.from_pretrained(folder, provider=provider, threads=threads, loras=loras)
        self.pipe.self_test()  # the replica is not ready (nor the old one replaced) until it can generate

    async def generate(self, request: GenerationRequest) -> AsyncIterator[tuple]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple] = asyncio.Queue()
        stop = threading.Event()

        def on_step(i: int, total: int, latents: Any) -> None:
            loop.call_soon_threadsafe(events.put_nowait, ("step", i + 1, total, latents))

        def work() -> tuple:
            try:
                return ("done", self.pipe.generate(request, callback=on_step, cancelled=stop.is_set))
            except GenerationCancelled as exc:
                return ("cancelled", str(exc))
            except ValueError as exc:
                return ("invalid", str(exc))
            except Exception as exc:  # noqa: BLE001 - reported to the caller, which answers it like a local failure
                return ("failed", f"{type(exc).__name__}: {exc}")

        task = loop.run_in_executor(None, work)
        task.add_done_callback(lambda _: events.put_nowait(("finished",)))
        yield ("started",)
        try:
            while (event := await events.get())[0] == "step":
                yield event
            yield await task
        finally:  # the caller went away (interrupt, timeout, disconnect): stop within a step, then free the slot
            stop.set()
            await asyncio.shield(task)


class RemoteJobs:
    """The server's job queue when the model lives on Serve replicas: each job follows its stream in a thread."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle.options(stream=True, method_name="generate")
        self.accepting = True
        self.steps_done = 0
        self.busy_seconds = 0.0
        self.jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    def submit(self, request: GenerationRequest, pipe: StableDiffusionPipeline | None = None) -> Job:
        """Stream the job from a model replica; `pipe` (the ingress's metadata pipeline) is not what runs it."""
        if not self.accepting:
            raise ShuttingDown("server is shutting down")
        job = Job(request)
        job.future.set_running_or_notify_cancel()  # results always land; a waiter that gave up ignores them
        with self._lock:
            self.jobs[job.id] = job
        threading.Thread(target=self._follow, args=(job,), daemon=True, name=f"sd-remote-{job.id[:8]}").start()
        return job

    def depth(self) -> int:
        with self._lock:
            return sum(job.started is None for job in self.jobs.values())

    def busy(self) -> int:
        with self._lock:
            return sum(job.started is not None for job in self.jobs.values())

    def current(self) -> Job | None:
        with self._lock:
            return next((job for job in self.jobs.values() if job.started is not None), None)

    def interrupt(self) -> int:
        with self._lock:
            running = [job for job in self.jobs.values() if job.started is not None]
        for job in running:
            job.cancel()
        return len(running)

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop accepting, let jobs finish for up to `timeout` seconds, then cancel the rest."""
        self.accepting = False
        deadline = time.monotonic() + timeout
        while self.jobs and time.monotonic() < deadline:
            time.sleep(0.1)
        with self._lock:
            left = list(self.jobs.values())
        for job in left:
            job.cancel()

    def _follow(self, job: Job) -> None:
        stream = self.handle.remote(job.request)
        job.on_cancel = stream.cancel
        if job.cancelled.is_set():
            stream.cancel()
        outcome: Any
        try:
            outcome = self._result(job, iter(stream))
        except Exception as exc:  # noqa: BLE001 - every failure answers the waiting request
            outcome = _as_server_error(exc, job)
        with self._lock:  # leave before answering, as JobQueue does
            self.jobs.pop(job.id, None)
            if job.started is not None:
                self.busy_seconds += time.monotonic() - job.started
        if isinstance(outcome, BaseException):
            job.future.set_exception(outcome)
        else:
            job.future.set_result(outcome)

    def _result(self, job: Job, events: Iterator[tuple]) -> Any:
        for event in events:
            kind = event[0]
            if kind == "started":
                job.started = time.monotonic()
            elif kind == "step":
                job.step, job.total, job.latents = event[1], event[2], event[3]
                with self._lock:
                    self.steps_done += 1
            elif kind == "done":
                return event[1]
            elif kind == "cancelled":
                raise GenerationCancelled(event[1])
            elif kind == "invalid":
                raise ValueError(event[1])
            else:
                raise RuntimeError(event[1])
        raise WorkerLost("the model replica ended the job without a result")


def _as_server_error(exc: Exception, job: Job) -> Exception:
    """Serve's and Ray's exceptions as the ones the routes answer: 503 queue full / replica lost, 409 cancelled."""
    if isinstance(exc, BackPressureError):
        return QueueFull("queue is full")
    if isinstance(exc, (RequestCancelledError, asyncio.CancelledError)) or job.cancelled.is_set():
        return GenerationCancelled("generation was interrupted")
    if isinstance(exc, RayActorError):
        return WorkerLost("the model replica running this request stopped; retry")
    if isinstance(exc, RayError):
        return WorkerLost(f"the model replica failed ({type(exc).__name__}); retry")
    return exc


@serve.ingress()
class Ingress:
    """The HTTP front: sd-onnx's FastAPI app, built on the replica, with the model's metadata loaded without
    sessions (requests are checked here, generated on ModelReplica)."""

    def __init__(self, model: Any, folder: str, config: ServeConfig, loras: list[tuple[str, float]]) -> None:
        loopback_serve_replica()
        self.model, self.folder, self.config, self.loras = model, folder, config, loras

    def __serve_build_asgi_app__(self) -> FastAPI:
        state = ServerState(self.config, jobs_factory=lambda pipe: RemoteJobs(self.model))

        def metadata() -> StableDiffusionPipeline:
            return StableDiffusionPipeline.from_pretrained(
                self.folder, provider="cpu", low_memory=True, verify=False, loras=self.loras
            )

        return create_app(state, metadata)


def application(
    folder: Path, config: ServeConfig, options: RayOptions, provider: str, threads: int | None, loras: list
) -> Any:
    """The Serve application graph: Ingress -> ModelReplica x N."""
    cpus, gpus = options.cpus_per_replica, options.gpus_per_replica
    if provider == "auto" and gpus > 0:
        provider = "cuda"
    threads = threads or max(1, math.floor(cpus))
    model = serve.deployment(
        ModelReplica,
        name="Model",
        ray_actor_options={"num_cpus": cpus, "num_gpus": gpus},
        max_ongoing_requests=1,
        max_queued_requests=config.queue_size,
        graceful_shutdown_timeout_s=config.timeout_s,
        health_check_period_s=5,
        **options.scaling(),
    ).bind(str(folder), provider, threads, [(str(path), scale) for path, scale in loras])
    ingress = serve.deployment(
        Ingress,
        name="Ingress",
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=INGRESS_CONCURRENCY,
        graceful_shutdown_timeout_s=config.timeout_s,
    )
    return ingress.bind(model, str(folder), config, [(str(path), scale) for path, scale in loras])


BUILD_ARGS = ("model", "replicas", "autoscale", "cpus_per_replica", "gpus_per_replica", "provider", "queue_size",
              "timeout_s", "max_steps", "max_pixels", "max_batch")  # fmt: skip


def build_app(args: dict[str, str]) -> Any:
    """Serve's application builder, for `serve run` and KubeRay's RayService (`import_path:
    sd_onnx.runtime.server.ray_serve:build_app` with these `args`): the same application as `sd-run serve --ray`.
    `model` is required; the API key comes from $SD_ONNX_API_KEY (a Kubernetes secret), never from args."""
    unknown = sorted(set(args) - set(BUILD_ARGS))
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown argument; known: {', '.join(BUILD_ARGS)}")
    if "model" not in args:
        raise ValueError("model: required (the exported model folder, the same path on every node)")
    options = RayOptions(
        replicas=_number(args, "replicas", int, 1),
        autoscale=parse_min_max(str(args["autoscale"])) if "autoscale" in args else None,
        cpus_per_replica=_number(args, "cpus_per_replica", float, 1.0),
        gpus_per_replica=_number(args, "gpus_per_replica", float, 0.0),
    )
    max_pixels = _number(args, "max_pixels", int, 0) or None
    limits = Limits(_number(args, "max_steps", int, Limits.max_steps), max_pixels,
                    _number(args, "max_batch", int, Limits.max_batch))  # fmt: skip
    config = ServeConfig(
        limits=limits,
        api_key=os.environ.get("SD_ONNX_API_KEY") or None,
        queue_size=_number(args, "queue_size", int, ServeConfig.queue_size),
        timeout_s=_number(args, "timeout_s", float, ServeConfig.timeout_s),
    )
    return application(Path(args["model"]), config, options, args.get("provider", "auto"), None, [])


def parse_min_max(text: str) -> tuple[int, int]:
    """`autoscale` as "MIN:MAX" -> two integers (their order is RayOptions' to check)."""
    low, colon, high = text.partition(":")
    if not (colon and low.strip().isdigit() and high.strip().isdigit()):
        raise ValueError(f"autoscale: must be MIN:MAX, got {text!r}")
    return int(low), int(high)


def _number(args: dict[str, Any], name: str, kind: type, default: float) -> Any:
    try:
        return kind(args[name]) if name in args else default
    except (TypeError, ValueError):
        raise ValueError(f"{name}: must be {'an integer' if kind is int else 'a number'}, got {args[name]!r}") from None


def deploy(
    folder: Path,
    config: ServeConfig,
    options: RayOptions,
    provider: str = "auto",
    threads: int | None = None,
    loras: list | None = None,
    host: str = "127.0.0.1",
    port: int = 7860,
) -> None:
    """Start (or, under the same name, roll over to) the application and wait until every replica is up."""
    connect(options.address)
    if options.address is None:
        check_fits(options, ray.cluster_resources())
    serve.start(http_options={"host": host, "port": port})
    serve.run(application(folder, config, options, provider, threads, loras or []), name=APP_NAME, route_prefix="/")


def check_fits(options: RayOptions, resources: dict[str, float]) -> None:
    """A private Ray has no autoscaler: refuse (ValueError) the replicas its CPUs and GPUs cannot all hold,
    rather than wait forever for the ones that never start."""
    count = options.autoscale[0] if options.autoscale else options.replicas
    for name, each in (("CPU", options.cpus_per_replica), ("GPU", options.gpus_per_replica)):
        have = resources.get(name, 0.0)
        if count * each > have + 1e-9:
            raise ValueError(
                f"{count} replicas x {each:g} {name} need {count * each:g} {name}s and this machine's Ray has "
                f"{have:g}: use fewer --replicas or a smaller --{name.lower()}s-per-replica"
            )


def run_ray_server(
    config: ServeConfig,
    folder: Path,
    options: RayOptions,
    provider: str,
    threads: int | None,
    host: str,
    port: int,
    loras: list | None = None,
) -> None:
    """Deploy; on a cluster (`--address`) leave the application running there and return, locally serve
    until SIGINT/SIGTERM and then shut Serve and Ray down (running requests drain first)."""
    deploy(folder, config, options, provider, threads, loras, host, port)
    if options.address is not None:
        print(f"deployed {APP_NAME!r} on the cluster; `serve shutdown` stops it", flush=True)
        return
    print("ready", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    ray.shutdown()
