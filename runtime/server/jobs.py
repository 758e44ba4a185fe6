"""A bounded job queue in front of one shared pipeline: a fixed pool of worker threads takes jobs in order;
a full queue is refused at once (the caller answers 503), so accepted work is never dropped."""

from __future__ import annotations

import queue
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..pipeline import GenerationCancelled, PipelineOutput, StableDiffusionPipeline


class QueueFull(Exception):
    """No room for another job."""


class ShuttingDown(Exception):
    """The server stopped accepting work."""


@dataclass
class Job:
    """One generation request: pipeline keyword arguments, a future for its result, a cancel flag."""

    kwargs: dict[str, Any]
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    future: Future = field(default_factory=Future)
    cancelled: threading.Event = field(default_factory=threading.Event)
    step: int = 0
    total: int = 0
    latents: np.ndarray | None = None
    started: float | None = None


class JobQueue:
    """Bounded FIFO + worker threads around one pipeline."""

    def __init__(self, pipe: StableDiffusionPipeline, workers: int, size: int) -> None:
        self.pipe = pipe
        self.pending: queue.Queue[Job | None] = queue.Queue(maxsize=size)
        self.running: dict[str, Job] = {}
        self.accepting = True
        self.steps_done = 0
        self.busy_seconds = 0.0
        self._lock = threading.Lock()
        self._workers = [
            threading.Thread(target=self._work, daemon=True, name=f"sd-worker-{i}") for i in range(workers)
        ]
        for worker in self._workers:
            worker.start()

    def submit(self, kwargs: dict[str, Any]) -> Job:
        """Queue a job or raise QueueFull / ShuttingDown right away."""
        if not self.accepting:
            raise ShuttingDown("server is shutting down")
        job = Job(kwargs)
        try:
            self.pending.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"queue is full ({self.pending.maxsize} waiting)") from None
        return job

    def depth(self) -> int:
        return self.pending.qsize()

    def current(self) -> Job | None:
        with self._lock:
            return next(iter(self.running.values()), None)

    def interrupt(self) -> int:
        """Cancel every running job; returns how many."""
        with self._lock:
            for job in self.running.values():
                job.cancelled.set()
            return len(self.running)

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop accepting, cancel what waits, let running jobs finish (up to `timeout`)."""
        self.accepting = False
        while True:
            try:
                job = self.pending.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.future.set_exception(ShuttingDown("server is shutting down"))
        for _ in self._workers:
            self.pending.put(None)
        deadline = time.monotonic() + timeout
        for worker in self._workers:
            worker.join(max(0.0, deadline - time.monotonic()))

    def _work(self) -> None:
        while (job := self.pending.get()) is not None:
            if job.future.set_running_or_notify_cancel():
                self._run(job)

    def _run(self, job: Job) -> None:
        def on_step(i: int, total: int, latents: np.ndarray) -> bool:
            job.step, job.total, job.latents = i + 1, total, latents
            with self._lock:
                self.steps_done += 1
            return not job.cancelled.is_set()

        with self._lock:
            self.running[job.id] = job
        job.started = time.monotonic()
        try:
            result: PipelineOutput = self.pipe(**job.kwargs, callback=on_step)
            job.future.set_result(result)
        except (GenerationCancelled, ValueError) as exc:
            job.future.set_exception(exc)
        except Exception as exc:  # noqa: BLE001 - any other failure must still answer the waiting request
            job.future.set_exception(exc)
        finally:
            with self._lock:
                self.running.pop(job.id, None)
                self.busy_seconds += time.monotonic() - job.started
