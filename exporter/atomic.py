"""Build a folder under a temporary name beside its destination and rename it into place when complete,
so an interrupted run (Ctrl-C, SIGTERM, crash) never leaves a half-written result where a complete one is expected."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import ExportError


@contextmanager
def staging_folder(output: Path) -> Iterator[Path]:
    """A temporary folder beside `output`, removed on any failure, Ctrl-C or SIGTERM."""
    parent = output.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=parent))
    except OSError as exc:
        raise ExportError(f"cannot write to {parent}: {exc.strerror or exc}") from exc
    _signals_received.clear()
    previous = signal.signal(signal.SIGTERM, _raise_interrupt) if _is_main_thread() else None
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def publish(staging: Path, output: Path) -> None:
    """Move the finished folder into place; an old OUTPUT is only removed once the new one is there.

    A SIGTERM whose KeyboardInterrupt was swallowed on the way (raised inside a finalizer or a library's
    callback) still stops the publication here."""
    if _signals_received:
        raise KeyboardInterrupt(f"signal {_signals_received[0]}")
    old = None
    if output.exists():
        old = output.with_name(f".{output.name}.old-{os.getpid()}")
        output.rename(old)
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp's 0700 would hide the export from a server running as another user
    staging.rename(output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


_signals_received: list[int] = []


def _raise_interrupt(signum: int, frame: object) -> None:
    _signals_received.append(signum)
    raise KeyboardInterrupt(f"signal {signum}")


def _is_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()
