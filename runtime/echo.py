"""`echo`: how a value from outside (a request field, a file's content) appears in an error message.

Refusals name what was wrong without flooding whoever reads them: a 9 MB sampler name or a huge JSON value is
shown as a short excerpt of its repr with the size of the rest, never whole."""

from __future__ import annotations

from typing import Any

ECHO_CHARS = 80


def echo(value: Any, limit: int = ECHO_CHARS) -> str:
    """repr(value) cut to `limit` characters, with how much was left out: "'abc...' (+8.6M characters)"."""
    if isinstance(value, (str, bytes)) and len(value) > limit:
        return f"{repr(value[:limit])[: limit + 1]}... (+{_count(len(value) - limit)} characters)"
    try:
        text = repr(value)
    except (RecursionError, ValueError):  # too deep to print, or an integer too long for repr
        return f"<{type(value).__name__}>"
    return text if len(text) <= limit else f"{text[:limit]}... (+{_count(len(text) - limit)} characters)"


def _count(count: int) -> str:
    for unit, scale in (("M", 1 << 20), ("k", 1 << 10)):
        if count >= scale:
            return f"{count / scale:.1f}{unit}"
    return str(count)
