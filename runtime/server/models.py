"""The models one server offers and the pipelines it keeps loaded.

`sd-run serve --models-dir DIR` offers every exported folder in DIR, `-m FOLDER` one. Each model is named as
A1111 names checkpoints: `model_name`, its sha256 and `title`, "name [first 10 hex digits]". The sha256 is the
manifest's: the manifest lists every graph file's sha256, so it identifies the whole export, and reading it
costs kilobytes, not the gigabytes of the weights. A request names a model by title, model name, full sha256 or
a prefix of at least 8 hex digits (A1111's short and legacy hashes), exactly.

`ModelCache` keeps at most `capacity` pipelines, evicting the least recently used. A model is loaded (and
self-tested, by the loader) on first use; while it loads, the loaded ones keep serving, so the peak is one
model more than the capacity. A pipeline evicted while a request runs on it lives until that request ends
(each job holds the pipeline it runs on, see jobs.Job).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..files import MAX_JSON_BYTES, read_bytes
from ..manifest import MANIFEST_NAME, Manifest, ModelConfig
from ..pipeline import StableDiffusionPipeline
from ..scheduler_config import read_scheduler_config
from ..session import return_freed_memory

LOG = logging.getLogger("sd_onnx.server")
MIN_HASH_PREFIX = 8  # A1111's legacy model hash; its short hash has 10


class ModelUnavailable(ValueError):
    """A model that cannot be served: its folder failed to load or to generate."""


@dataclass(frozen=True, eq=False)
class ModelEntry:
    """One servable model folder and what the routes need to know without loading it."""

    folder: Path
    name: str
    sha256: str | None  # None: a plain ONNX folder without a manifest (`-m` only)
    config: ModelConfig
    scheduler_config: dict[str, Any]
    family: str | None = None

    @property
    def hash(self) -> str | None:
        return self.sha256[:10] if self.sha256 else None

    @property
    def title(self) -> str:
        return f"{self.name} [{self.hash}]" if self.hash else self.name

    def matches(self, text: str) -> bool:
        """Whether `text` names this model: its title, model name, sha256 or a prefix of it."""
        if text in (self.title, self.name):
            return True
        digits = text.lower()
        return bool(self.sha256) and len(digits) >= MIN_HASH_PREFIX and self.sha256.startswith(digits)

    def describe(self) -> dict[str, Any]:
        """The model as A1111's /sdapi/v1/sd-models lists a checkpoint (the folder's name, not the server's path)."""
        return {"title": self.title, "model_name": self.name, "hash": self.hash, "sha256": self.sha256,
                "filename": self.folder.name, "config": None, "family": self.family}  # fmt: skip


def manifest_sha256(folder: Path) -> str | None:
    """The sha256 of the folder's manifest (bounded read), or None for a folder without one."""
    path = Path(folder) / MANIFEST_NAME
    if not path.exists():
        return None
    return hashlib.sha256(read_bytes(path, MAX_JSON_BYTES, "manifest")).hexdigest()


def entry_of_folder(folder: Path) -> ModelEntry:
    """A manifest folder's entry, from its manifest and scheduler config only (ValueError when either is bad)."""
    manifest = Manifest.load(folder)
    return ModelEntry(folder, manifest.name, manifest_sha256(folder), manifest.config,
                      read_scheduler_config(folder), manifest.model_family)  # fmt: skip


def entry_of_pipeline(pipe: StableDiffusionPipeline) -> ModelEntry:
    """The entry of a pipeline already loaded (`-m`, tests, a Ray ingress): plain ONNX folders included."""
    family = pipe.manifest.model_family if pipe.manifest else None
    sha = manifest_sha256(pipe.folder) if pipe.manifest else None
    return ModelEntry(pipe.folder, pipe.model_name, sha, pipe.config, pipe.scheduler_config, family)


def discover(models_dir: Path) -> tuple[list[ModelEntry], list[str]]:
    """Every exported folder directly in `models_dir` (sorted by folder name; hidden ones and files left out)
    and one warning line per folder skipped: no or a bad manifest, or a name or hash another model has."""
    entries: list[ModelEntry] = []
    warnings = []
    for folder in sorted(Path(models_dir).iterdir()):
        if folder.name.startswith(".") or not folder.is_dir():
            continue
        try:
            entry = entry_of_folder(folder)
        except (ValueError, OSError) as exc:
            warnings.append(f"skipped {folder.name}: {_first_line(exc)}")
            continue
        twin = next((e for e in entries if e.name == entry.name or e.sha256 == entry.sha256), None)
        if twin is not None:
            warnings.append(f"skipped {folder.name}: {twin.folder.name} already serves a model named {entry.name!r}"
                            + ("" if twin.name == entry.name else " with the same manifest"))  # fmt: skip
            continue
        entries.append(entry)
    return entries, warnings


class ModelCache:
    """The offered models, the current one (what requests without a model name use) and at most `capacity`
    loaded pipelines, least recently used first out."""

    def __init__(
        self,
        entries: list[ModelEntry],
        load: Callable[[Path], StableDiffusionPipeline],
        capacity: int = 1,
    ) -> None:
        if not entries:
            raise ValueError("no model to serve")
        if capacity < 1:
            raise ValueError(f"max_loaded_models: must be >= 1, got {capacity}")
        self.entries = list(entries)
        self.capacity = capacity
        self.current = self.entries[0]
        self.failed: dict[str, str] = {}  # title -> why it cannot be served
        self._load = load
        self._loaded: OrderedDict[ModelEntry, StableDiffusionPipeline] = OrderedDict()
        self._lock = threading.Lock()  # the maps above
        self._loading = threading.Lock()  # one load at a time: each can take the memory of a model

    @classmethod
    def of(cls, pipe: StableDiffusionPipeline) -> ModelCache:
        """A cache of the one model already loaded (`-m`, tests, a Ray ingress): nothing else to load."""

        def no_other(folder: Path) -> StableDiffusionPipeline:
            raise ModelUnavailable(f"{folder.name}: not loaded by this server")

        cache = cls([entry_of_pipeline(pipe)], no_other, 1)
        cache._loaded[cache.current] = pipe
        return cache

    def start(self) -> StableDiffusionPipeline:
        """Load the first model that loads and generates, which becomes current; each that fails is left out
        with a one-line warning. ModelUnavailable when none does."""
        for entry in list(self.entries):
            try:
                pipe = self.get(entry)
            except ModelUnavailable as exc:
                LOG.warning("%s", exc)
                continue
            self.current = entry
            return pipe
        raise ModelUnavailable("no model could be loaded: " + "; ".join(self.failed.values()))

    def find(self, text: str) -> ModelEntry | None:
        """The offered model `text` names (see ModelEntry.matches), or None."""
        with self._lock:
            return next((entry for entry in self.entries if entry.matches(text)), None)

    def listed(self) -> list[ModelEntry]:
        with self._lock:
            return list(self.entries)

    def loaded(self, entry: ModelEntry) -> StableDiffusionPipeline | None:
        """The pipeline of `entry` if it is loaded (and now the most recently used), else None; never loads."""
        with self._lock:
            pipe = self._loaded.get(entry)
            if pipe is not None:
                self._loaded.move_to_end(entry)
            return pipe

    def holds(self, entry: ModelEntry) -> bool:
        """Whether `entry` is loaded (without counting as a use)."""
        with self._lock:
            return entry in self._loaded

    def loaded_count(self) -> int:
        with self._lock:
            return len(self._loaded)

    def get(self, entry: ModelEntry) -> StableDiffusionPipeline:
        """The pipeline of `entry`, loaded now if need be (blocking: call it off the event loop). A model that
        fails to load is no longer offered; ModelUnavailable says why, now and for later requests."""
        pipe = self.loaded(entry)
        if pipe is not None:
            return pipe
        with self._loading:
            pipe = self.loaded(entry)  # loaded by the request this one waited for
            if pipe is not None:
                return pipe
            if entry.title in self.failed:
                raise ModelUnavailable(self.failed[entry.title])
            try:
                pipe = self._load(entry.folder)
            except Exception as exc:  # noqa: BLE001 - whatever stops a model loading makes it unservable
                reason = f"{entry.title}: cannot be served ({_first_line(exc)})"
                with self._lock:
                    self.failed[entry.title] = reason
                    self.entries = [e for e in self.entries if e is not entry]
                raise ModelUnavailable(reason) from None
            with self._lock:
                self._loaded[entry] = pipe
                evicted = [self._loaded.popitem(last=False) for _ in range(len(self._loaded) - self.capacity)]
        if evicted:
            LOG.info("unloaded %s", ", ".join(e.title for e, _ in evicted))
            del evicted
            return_freed_memory()
        return pipe


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
