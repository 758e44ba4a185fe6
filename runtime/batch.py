"""`sd-run batch`: a JSONL file of generation requests -> OUTDIR/<id>.png (with its parameters chunk) and
OUTDIR/results.jsonl, one record per request (id, line, status, seed, file, timings or error).

Each line is a JSON object with the Python API's request fields (FIELDS below) and an optional `id`
(default `line-N`), one image per line. A bad line becomes an error record and the rest goes on. Every PNG
is written under a temporary name and renamed, then its record is appended and synced, so a crash at any
point leaves either a finished image with its record, or work that `--resume` redoes: resume keeps the
records of images that exist, drops the rest (failed requests and half-written leftovers) and runs every id
without one. The same `run_item` runs here and on Ray workers (batch_ray.py), so both write the same bytes
for the same seeds.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .annotator_models import AnnotatorNetwork
from .annotators import annotate
from .controlnet import MAX_CONTROLS, ControlUnit
from .files import UntrustedFileError, inside, parse_json, read_lines, regular_file
from .image import ImageError, decode_image, parameters_text, png_bytes
from .pipeline import StableDiffusionPipeline
from .request import GenerationRequest, Limits, RequestError

RESULTS_NAME = "results.jsonl"
FIELDS = (
    "prompt",
    "negative_prompt",
    "steps",
    "guidance_scale",
    "width",
    "height",
    "seed",
    "scheduler",
    "eta",
    "guidance_interval",
    "vae_tiling",
    "deepcache_interval",
    "tome_ratio",
    "prompt_syntax",
    "clip_skip",
    "max_sequence_length",
    "skip_guidance_layers",
    "skip_layer_guidance_scale",
    "skip_layer_guidance_start",
    "skip_layer_guidance_stop",
    "controls",
    "guess_mode",
)
# A ControlNet unit on a line: its image is a path inside the prompts file's folder.
CONTROL_KEYS = ("image", "model", "weight", "start", "end", "module", "resize_mode")
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# A line holds two prompts of at most 10,000 characters and a few settings; with 50,000 lines (14 hours at an
# image a second; split larger lists) the items read stay under 1 GB.
MAX_LINE_CHARS = 20_000
MAX_LINES = 50_000
MAX_RECORD_CHARS = 1 << 20


@dataclass(frozen=True)
class BatchItem:
    """One line: its id, its line number and its request fields, or why the line cannot run."""

    id: str
    line: int
    fields: dict[str, Any] | None
    error: str | None = None
    folder: str | None = None  # the prompts file's folder, which a line's control images must be inside


def read_items(path: Path) -> list[BatchItem]:
    """Every non-blank line of a JSONL file as an item; malformed lines, unknown fields and repeated ids are
    items with an error. The file is read one bounded line at a time (see files.read_lines); raises
    ValueError only when the file itself cannot be read: not a regular file, not UTF-8, too many lines."""
    items, seen = [], {}
    for number, line, problem in read_lines(path, MAX_LINE_CHARS, MAX_LINES, "prompts file"):
        if line is None:
            items.append(BatchItem(f"line-{number}", number, None, problem))
        elif line.strip():
            item = replace(_parse_line(line, number), folder=str(Path(path).resolve().parent))
            key = item.id.casefold()  # Cat.png and cat.png are one file on macOS and Windows
            if key in seen:
                item = BatchItem(f"line-{number}", number, None, f"id {item.id!r} is already used on line {seen[key]}")
            seen.setdefault(key, number)
            items.append(item)
    if not items:
        raise ValueError(f'{path}: has no requests (one JSON object per line, such as {{"prompt": "a cat"}})')
    return items


def _parse_line(line: str, number: int) -> BatchItem:
    default_id = f"line-{number}"
    try:
        data = parse_json(line, f"line {number}", finite=False)  # the request's checks name a bad number
    except ValueError as exc:
        reason = "nested too deeply" if "nested" in str(exc) else "not valid JSON"
        return BatchItem(default_id, number, None, reason)
    if not isinstance(data, dict):
        return BatchItem(default_id, number, None, 'must be a JSON object such as {"prompt": "a cat"}')
    item_id = data.pop("id", default_id)
    if not isinstance(item_id, str):
        return BatchItem(default_id, number, None, f"id: must be a string, got {type(item_id).__name__}")
    if not ID_PATTERN.fullmatch(item_id):
        return BatchItem(default_id, number, None, "id: must be 1-128 letters, digits, '.', '_' or '-', not first '.'")
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        return BatchItem(item_id, number, None, f"{unknown[0]}: unknown field; known: id, {', '.join(FIELDS)}")
    if "prompt" not in data:
        return BatchItem(item_id, number, None, "prompt: required")
    for name in ("prompt", "negative_prompt"):
        if name in data and not isinstance(data[name], str):
            return BatchItem(item_id, number, None, f"{name}: must be a string (one image per line)")
    return BatchItem(item_id, number, data)


def run_item(
    pipe: StableDiffusionPipeline,
    item: BatchItem,
    limits: Limits,
    networks: dict[str, AnnotatorNetwork] | None = None,
) -> tuple[dict[str, Any], bytes | None]:
    """Generate one item (its controls preprocessed with the exported `networks`): its result record and PNG
    bytes (None when it failed). Never raises for a bad request or a failed generation: the record says why."""
    record: dict[str, Any] = {"id": item.id, "line": item.line}
    if item.error is not None:
        return {**record, "status": "error", "error": item.error}, None
    started = time.perf_counter()
    try:
        fields = dict(item.fields)
        if "controls" in fields:
            fields["controls"] = _controls(
                fields["controls"], Path(item.folder or "."), limits.input_pixels(pipe.config), networks
            )
        request = pipe.prepare(GenerationRequest(**{"prompt_syntax": "a1111", **fields}), limits)
        out = pipe.generate(request)
    except ValueError as exc:  # RequestError names the field
        return {**record, "status": "error", "error": str(exc)}, None
    except Exception as exc:  # noqa: BLE001 - one failed image must not stop the batch
        return {**record, "status": "error", "error": f"{type(exc).__name__}: {exc}"}, None
    seconds = time.perf_counter() - started
    png = png_bytes(out.images[0], parameters_text(request, out.parameters, 0))
    timings = {"generate_s": round(seconds, 3), "steps": request.steps}
    return {**record, "status": "ok", "seed": request.seed, "file": f"{item.id}.png", "timings": timings}, png


def _controls(
    entries: Any, folder: Path, max_pixels: int, networks: dict[str, AnnotatorNetwork] | None
) -> tuple[ControlUnit, ...]:
    """A line's `controls` ([{"image": "edges/a.png", "model": "canny", "weight": 0.8, "module": "canny"}, ...])
    as ControlNet units, each image read from inside `folder` within `max_pixels` and preprocessed by `module`."""
    if not isinstance(entries, list) or len(entries) > MAX_CONTROLS:
        raise RequestError("controls", f"must be a list of at most {MAX_CONTROLS} objects")
    units = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "image" not in entry or set(entry) - set(CONTROL_KEYS):
            raise RequestError(f"controls[{i}]", f"must be an object with image and any of {', '.join(CONTROL_KEYS)}")
        try:
            image = decode_image(inside(folder, entry["image"], "the prompts file"), max_pixels)
        except (UntrustedFileError, ImageError, OSError) as exc:
            raise RequestError(f"controls[{i}].image", str(exc)) from None
        try:
            control = annotate(image, entry.get("module", "none"), networks=networks)
        except RequestError as exc:
            raise RequestError(f"controls[{i}].{exc.field}", exc.reason) from None
        numbers = {k: entry[n] for k, n in (("scale", "weight"), ("start", "start"), ("end", "end")) if n in entry}
        units.append(ControlUnit(control, entry.get("model"), **numbers, resize_mode=entry.get("resize_mode",
                                 "just_resize"), module=entry.get("module", "none")))  # fmt: skip
    return tuple(units)


class BatchOutput:
    """OUTDIR: atomic PNGs and an append-only, synced results.jsonl; `start` checks it and, on resume, keeps
    only the records of finished images."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.results = self.folder / RESULTS_NAME

    def start(self, resume: bool) -> set[str]:
        """Prepare the folder; returns the ids already done (empty unless resuming)."""
        if self.folder.exists() and not self.folder.is_dir():
            raise ValueError(f"{self.folder}: exists and is not a folder")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"{self.folder}: cannot create this folder ({exc.strerror})") from None
        for leftover in self.folder.glob(".*.partial"):
            leftover.unlink()
        if not resume:
            if self.results.exists() and self.results.stat().st_size:
                raise ValueError(f"{self.results} exists: add --resume to continue that run, or use another OUTDIR")
            return set()
        done = {r["id"]: r for r in self._records() if r.get("status") == "ok" and self._has_image(r)}
        partial = self.folder / f".{RESULTS_NAME}.partial"
        partial.write_text("".join(json.dumps(r) + "\n" for r in done.values()), encoding="utf-8")
        partial.replace(self.results)
        return set(done)

    def write(self, record: dict[str, Any], png: bytes | None) -> None:
        """The image (renamed into place), then its record (flushed and synced)."""
        if png is not None:
            partial = self.folder / f".{record['file']}.partial"
            partial.write_bytes(png)
            partial.replace(self.folder / record["file"])
        with self.results.open("a", encoding="utf-8") as out:
            out.write(json.dumps(record) + "\n")
            out.flush()
            os.fsync(out.fileno())

    def _has_image(self, record: dict[str, Any]) -> bool:
        """Whether a record's image is its id's file in this folder (a record naming another file is not ours)."""
        name = f"{record['id']}.png"
        if record.get("file") != name:
            return False
        try:
            regular_file(inside(self.folder, name, self.results))
        except UntrustedFileError:
            return False
        return True

    def _records(self) -> Iterator[dict[str, Any]]:
        """Every complete record; a line cut short by a crash is skipped."""
        if not self.results.is_file():
            return
        for _, line, _ in read_lines(self.results, MAX_RECORD_CHARS, MAX_LINES, "results file"):
            try:
                record = parse_json(line or "", str(self.results))
            except ValueError:
                continue
            if (
                isinstance(record, dict)
                and isinstance(record.get("id"), str)
                and isinstance(record.get("file", ""), str)
            ):
                yield record


@dataclass
class BatchSummary:
    done: int = 0
    failed: int = 0
    skipped: int = 0


def run_batch(
    items: list[BatchItem],
    output: BatchOutput,
    done: set[str],
    execute: Callable[[list[BatchItem]], Iterable[tuple[dict[str, Any], bytes | None]]],
    on_result: Callable[[dict[str, Any]], None] | None = None,
) -> BatchSummary:
    """Run the items not `done` yet (see BatchOutput.start) through `execute` (local or Ray) and write each
    result as it arrives."""
    todo = [item for item in items if item.id not in done]
    summary = BatchSummary(skipped=len(items) - len(todo))
    for record, png in execute(todo):
        output.write(record, png)
        if record["status"] == "ok":
            summary.done += 1
        else:
            summary.failed += 1
        if on_result is not None:
            on_result(record)
    return summary


def local_executor(
    pipe: StableDiffusionPipeline, limits: Limits, networks: dict[str, AnnotatorNetwork] | None = None
) -> Callable[[list[BatchItem]], Iterator[tuple[dict[str, Any], bytes | None]]]:
    """Run items one after another in this process."""

    def execute(items: list[BatchItem]) -> Iterator[tuple[dict[str, Any], bytes | None]]:
        for item in items:
            yield run_item(pipe, item, limits, networks)

    return execute
