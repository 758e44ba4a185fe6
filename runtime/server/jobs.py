"""A bounded job queue in front of the server's pipelines: a fixed pool of worker threads takes jobs in order;
a full queue is refused at once (the caller answers 503), so accepted work is never dropped. Each job carries
the pipeline it runs on (a server with several models, see models.py), so one queue and one pool of workers
bound the work whatever model each request names, and a pipeline unloaded while a job runs on it stays alive
until that job ends.

Cancellation (interrupt, request timeout, a client that hangs up, shutdown) is a flag the pipeline polls between
denoising steps and between decoded images, so a cancelled job stops within one UNet step or one VAE decode; a
job cancelled while it waits leaves the queue at once.
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from ..pipeline import GenerationCancelled, PipelineOutput, StableDiffusionPipeline
from ..request import GenerationRequest


class QueueFull(Exception):
    """No room for another job."""


class ShuttingDown(Exception):
    """The server stopped accepting work."""


class WorkerLost(Exception):
    """The process running a job died (a Ray replica killed or crashed); the job may be retried."""


@dataclass
class Job:
    """One resolved generation request, the pipeline it runs on, a future for its result, a cancel flag and its
    progress."""

    request: GenerationRequest
    pipe: StableDiffusionPipeline | None = field(default=None, repr=False, compare=False)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    future: Future = field(default_factory=Future)
    cancelled: threading.Event = field(default_factory=threading.Event)
    step: int = 0
    total: int = 0
    latents: np.ndarray | None = None
    started: float | None = None
    on_cancel: Callable[[], None] | None = field(default=None, repr=False)

    def cancel(self) -> None:
        """Ask the job to stop: a flag the pipeline polls between steps, and a hook for remote jobs."""
        self.cancelled.set()
        if self.on_cancel is not None:
            self.on_cancel()


class Jobs(Protocol):
    """What the routes need of a job queue: this module's JobQueue, or ray_serve.RemoteJobs."""

    accepting: bool
    steps_done: int
    busy_seconds: float

    def submit(self, request: GenerationRequest, pipe: StableDiffusionPipeline | None = None) -> Job: ...
    def depth(self) -> int: ...
    def current(self) -> Job | None: ...
    def busy(self) -> int: ...
    def interrupt(self) -> int: ...
    def shutdown(self, timeout: float = 30.0) -> None: ...


class JobQueue:
    """Bounded FIFO + worker threads; a job runs on its own pipeline, else on `pipe`."""

    def __init__(self, pipe: StableDiffusionPipeline | None, workers: int, size: int) -> None:
        self.pipe = pipe
        self.pending: queue.Queue[Job | None] = queue.Queue(maxsize=size)
        self.running: dict[str, Job] = {}
        self.accepting = True
        self.stopping = False
        self.steps_done = 0
        self.busy_seconds = 0.0
        self._lock = threading.Lock()
        self._workers = [
            threading.Thread(target=self._work, daemon=True, name=f"sd-worker-{i}") for i in range(workers)
        ]
        for worker in self._workers:
            worker.start()

    def submit(self, request: GenerationRequest, pipe: StableDiffusionPipeline | None = None) -> Job:
        """Queue a job on `pipe` (default: the queue's) or raise QueueFull / ShuttingDown right away."""
        if not self.accepting:
            raise ShuttingDown("server is shutting down")
        job = Job(request, pipe or self.pipe)
        job.on_cancel = lambda: self._drop(job)
        try:
            self.pending.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"queue is full ({self.pending.maxsize} waiting)") from None
        return job

    def _drop(self, job: Job) -> None:
        """A job cancelled while it waits (its client hung up or timed out) leaves the queue at once, so its
        place goes to the next request instead of a 503; a running job is not in the queue."""
        with self.pending.mutex:
            for index, waiting in enumerate(self.pending.queue):
                if waiting is job:  # by identity: a Job's == would compare its request's images
                    del self.pending.queue[index]
                    self.pending.not_full.notify()
                    return

    def depth(self) -> int:
        return self.pending.qsize()

    def current(self) -> Job | None:
        with self._lock:
            return next(iter(self.running.values()), None)

    def busy(self) -> int:
        with self._lock:
            return len(self.running)

    def interrupt(self) -> int:
        """Cancel every running job; returns how many."""
        with self._lock:
            for job in self.running.values():
                job.cancel()
            return len(self.running)

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop accepting, answer every queued job "shutting down", let running jobs finish for up to `timeout`
        seconds, then cancel them (each stops within a step). Safe to call more than once."""
        self.accepting = False
        while True:
            try:
                job = self.pending.get_nowait()
            except queue.Empty:
                break
            if job is not None and job.future.set_running_or_notify_cancel():
                job.future.set_exception(ShuttingDown("server is shutting down"))
        if not self.stopping:
            self.stopping = True
            for _ in self._workers:
                self.pending.put(None)
        deadline = time.monotonic() + timeout
        for worker in self._workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        if any(worker.is_alive() for worker in self._workers):
            self.interrupt()
            for worker in self._workers:
                worker.join(10.0)

    def _work(self) -> None:
        while (job := self.pending.get()) is not None:
            if job.future.set_running_or_notify_cancel():
                self._run(job)

    def _run(self, job: Job) -> None:
        def on_step(i: int, total: int, latents: np.ndarray) -> None:
            job.step, job.total, job.latents = i + 1, total, latents
            with self._lock:
                self.steps_done += 1

        with self._lock:
            self.running[job.id] = job
        job.started = time.monotonic()
        outcome: PipelineOutput | BaseException
        try:
            outcome = job.pipe.generate(job.request, callback=on_step, cancelled=job.cancelled.is_set)
        except GenerationCancelled as exc:
            outcome = ShuttingDown("server is shutting down") if not self.accepting else exc
        except Exception as exc:  # noqa: BLE001 - any failure must still answer the waiting request
            outcome = exc
        # Leave `running` before answering: a client that reads its answer and then interrupts or asks for
        # progress must not find its own finished job still running.
        with self._lock:
            self.running.pop(job.id, None)
            self.busy_seconds += time.monotonic() - job.started
        if isinstance(outcome, BaseException):
            job.future.set_exception(outcome)
        else:
            job.future.set_result(outcome)
