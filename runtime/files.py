"""Reading files that someone else wrote: model folders, LoRA files, prompt lists.

Every reader of such a file goes through here, so the same rules hold everywhere:
- a path named inside a file resolves inside its folder, after symlinks (`inside`);
- only regular files are read (a device such as /dev/zero or a FIFO would never end), and never more bytes than
  what the file can sensibly be (`read_bytes`, `read_text`, `read_lines`);
- JSON is bounded in size and nesting depth before its types are checked (`read_json`, `parse_json`).
A broken rule is an `UntrustedFileError` (a ValueError) whose one line names the file: the CLI prints it, a
server refuses to start with it, the Python API raises it.
"""

from __future__ import annotations

import json
import math
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .echo import echo

MAX_JSON_BYTES = 16 << 20  # configs, maps and manifests are kilobytes; tokenizer.json files are a few MB
MAX_JSON_DEPTH = 64  # diffusers and tokenizers files nest 5-6 deep
MiB = 1 << 20


class UntrustedFileError(ValueError):
    """A file is missing, special, too large, malformed, or names a path outside its folder."""


def inside(folder: Path, relative: str, source: Path | str) -> Path:
    """`folder / relative` when it resolves inside `folder` (symlinks followed); `source` is the file that
    named the path, for the message. Absolute paths, drive letters, URLs and `..` that leave are refused."""
    if not isinstance(relative, str) or not relative or "\x00" in relative:
        raise UntrustedFileError(f"{source}: {echo(relative)} is not a path inside {folder}")
    root = Path(os.path.realpath(folder))
    target = Path(os.path.realpath(root / relative))
    parts = relative.replace("\\", "/").split("/")
    within = target != root and any(target.is_relative_to(r) for r in (root, *_hub_blobs(Path(folder))))
    if Path(relative).is_absolute() or ":" in parts[0] or not within:
        raise UntrustedFileError(f"{source}: {echo(relative)} is not a path inside {folder}")
    return target


def _hub_blobs(folder: Path) -> tuple[Path, ...]:
    """A Hugging Face Hub cache snapshot (`models--org--name/snapshots/REV`) links its files to the same
    repository's `blobs/`: that folder belongs to the model too."""
    blobs = folder.parent.parent / "blobs"
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--") and blobs.is_dir():
        return (Path(os.path.realpath(blobs)),)
    return ()


def regular_file(path: Path, what: str = "file") -> os.stat_result:
    """The stat of `path` (symlinks followed) when it is a regular file; otherwise UntrustedFileError."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise UntrustedFileError(f"{path}: no such {what}") from None
    except OSError as exc:
        raise UntrustedFileError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not stat.S_ISREG(info.st_mode):
        kind = "a folder" if stat.S_ISDIR(info.st_mode) else "a device, FIFO or socket"
        raise UntrustedFileError(f"{path}: is {kind}, not a regular {what}")
    return info


def read_bytes(path: Path, limit: int, what: str = "file") -> bytes:
    """The whole file, when it is a regular file of at most `limit` bytes."""
    path = Path(path)
    regular_file(path, what)
    try:
        # O_NONBLOCK: a FIFO swapped in after the check opens at once instead of waiting for a writer.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
        with os.fdopen(fd, "rb") as file:
            if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
                raise UntrustedFileError(f"{path}: is not a regular {what}")
            data = file.read(limit + 1)
    except OSError as exc:
        raise UntrustedFileError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if len(data) > limit:
        raise UntrustedFileError(f"{path}: larger than {_size(limit)}, more than a {what} can be")
    return data


def read_text(path: Path, limit: int, what: str = "file") -> str:
    """UTF-8 text (a byte-order mark, as Notepad writes, is dropped) of at most `limit` bytes."""
    data = read_bytes(path, limit, what)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UntrustedFileError(f"{path}: not UTF-8 text (byte {exc.start})") from None


def read_json(path: Path, limit: int = MAX_JSON_BYTES, what: str = "JSON file") -> Any:
    """A JSON document from a file of at most `limit` bytes and `MAX_JSON_DEPTH` levels (types unchecked: the
    caller's schema does that)."""
    return parse_json(read_text(path, limit, what), str(path))


def parse_json(text: str | bytes, where: str, depth: int = MAX_JSON_DEPTH, finite: bool = True) -> Any:
    """json.loads with a nesting limit and errors as one line naming `where`; with `finite`, NaN, Infinity and
    numbers beyond float range are errors too (without, they are left for a request's checks to name)."""
    numbers = {"parse_constant": _no_constant, "parse_float": _finite} if finite else {}
    try:
        data = json.loads(text, **numbers)
    except RecursionError:  # the decoder's own guard, far below the C stack
        raise UntrustedFileError(f"{where}: JSON nested deeper than {depth} levels") from None
    except ValueError as exc:  # JSONDecodeError, bad UTF-8, an integer of 5000 digits
        raise UntrustedFileError(f"{where}: corrupt JSON ({str(exc).splitlines()[0][:200]})") from None
    if _nesting(data) > depth:
        raise UntrustedFileError(f"{where}: JSON nested deeper than {depth} levels")
    return data


def read_lines(path: Path, max_line: int, max_lines: int, what: str = "file") -> Iterator[tuple[int, str | None, str]]:
    """(line number, text, problem) for each line of a UTF-8 text file, read one bounded line at a time. A line
    longer than `max_line` bytes, or not UTF-8, comes as (number, None, why) and is skipped to its end without
    being held, so one bad line does not stop the others."""
    path = Path(path)
    regular_file(path, what)
    try:
        with open(path, "rb") as file:
            for number in range(1, max_lines + 2):
                raw = file.readline(max_line + 1)
                if not raw:
                    return
                if number > max_lines:
                    raise UntrustedFileError(f"{path}: more than {max_lines} lines")
                if len(raw.rstrip(b"\r\n")) > max_line:
                    while raw and not raw.endswith(b"\n"):  # the rest of the long line, in bounded pieces
                        raw = file.readline(max_line + 1)
                    yield number, None, f"line is longer than {max_line} characters"
                    continue
                try:
                    text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
                except UnicodeDecodeError as exc:
                    yield number, None, f"not UTF-8 text (byte {exc.start})"
                    continue
                yield number, text.rstrip("\r\n"), ""
    except OSError as exc:
        raise UntrustedFileError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _nesting(data: Any) -> int:
    """How deep lists and objects nest in parsed JSON, walked without recursion."""
    deepest, pending = 0, [(data, 1)]
    while pending:
        value, level = pending.pop()
        if isinstance(value, (list, dict)):
            deepest = max(deepest, level)
            pending.extend((item, level + 1) for item in (value.values() if isinstance(value, dict) else value))
    return deepest


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:20]} is out of range")
    return value


def _size(count: int) -> str:
    return f"{count / MiB:g} MiB" if count >= MiB else f"{count} bytes"
