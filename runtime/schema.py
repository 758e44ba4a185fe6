"""Checking the shape of JSON read from files against a schema written as data, so that a file of the wrong
shape fails on load with one line naming the field (`components.unet.files: expected an object, got list`),
never later as a traceback.

A spec is a Python type, `Opt(spec)`, `[spec]` (list of), `{str: spec}` (mapping of) or an `Obj` of named
fields. No pydantic: the runtime stays within its five dependencies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .echo import ECHO_CHARS, echo


class SchemaError(ValueError):
    """A JSON value does not have the shape its schema asks for; the message names the field."""


@dataclass(frozen=True)
class Opt:
    """A field that may be absent or null."""

    spec: Any


@dataclass(frozen=True)
class Obj:
    """A JSON object with required and optional fields; other keys are allowed (forward compatibility)."""

    fields: dict[str, Any]
    optional: dict[str, Any] = field(default_factory=dict)


def check(value: Any, spec: Any, path: str = "", root: str = "document") -> None:
    """Check `value` against `spec` recursively; `path` is the dotted field name for messages, `root` the name
    of the whole value."""
    where = path or root
    if isinstance(spec, Opt):
        if value is not None:
            check(value, spec.spec, path, root)
    elif isinstance(spec, Obj):
        _expect(value, dict, where)
        for key, sub in spec.fields.items():
            if key not in value:
                raise SchemaError(f"{_join(path, key)}: missing")
            check(value[key], sub, _join(path, key), root)
        for key, sub in spec.optional.items():
            if key in value:  # present: it must match (null only where the spec says Opt)
                check(value[key], sub, _join(path, key), root)
    elif isinstance(spec, list):
        _expect(value, list, where)
        for i, item in enumerate(value):
            check(item, spec[0], f"{where}[{i}]", root)
    elif isinstance(spec, dict) and spec:
        _expect(value, dict, where)
        (sub,) = spec.values()
        for key, item in value.items():
            check(item, sub, _join(path, key), root)
    else:
        _expect(value, spec, where)


def _expect(value: Any, types: Any, where: str) -> None:
    types = types if isinstance(types, tuple) else (types,)
    ok = any(_is(value, t) for t in types)
    if not ok:
        wanted = " or ".join(_NAMES.get(t, t.__name__) for t in types)
        raise SchemaError(f"{where}: expected {wanted}, got {_NAMES.get(type(value), type(value).__name__)}")


def _is(value: Any, kind: type) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _join(path: str, key: str) -> str:
    """`path.key`; a key from the file that is not plain text (a newline, spaces, megabytes) as its short repr, so
    that a message stays one readable line."""
    if not (0 < len(key) <= ECHO_CHARS and key.isprintable() and not any(c.isspace() for c in key)):
        key = echo(key)
    return f"{path}.{key}" if path else key


_NAMES = {
    dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number", bool: "a boolean",
    type(None): "null",
}  # fmt: skip
