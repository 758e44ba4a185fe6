"""The manifest's schema and its checker: a manifest of the wrong shape fails on load with one line naming the
field (`components.unet.files: expected an object, got list`), never later as a traceback.

The schema is data: a Python type, `Opt(spec)`, `[spec]` (list of), `{str: spec}` (mapping of) or an
`Obj` of named fields. No pydantic: the runtime stays within its five dependencies.
"""

from __future__ import annotations

import math
import posixpath
from dataclasses import dataclass, field
from typing import Any

from .manifest import ALL_COMPONENTS, STAGE_COMPONENTS, ManifestError


@dataclass(frozen=True)
class Opt:
    """A field that may be absent or null."""

    spec: Any


@dataclass(frozen=True)
class Obj:
    """A JSON object with required and optional fields; other keys are allowed (forward compatibility)."""

    fields: dict[str, Any]
    optional: dict[str, Any] = field(default_factory=dict)


DIM = (int, str)
TENSOR = Obj({"name": str, "shape": [DIM], "dtype": str})
COMPONENT = Obj(
    {"file": str, "files": {str: str}, "inputs": [TENSOR], "outputs": [TENSOR]},
    {"precision": str, "opset": int, "validation": dict, "quantization": dict, "optimizations": dict},
)
CONFIG = Obj(
    {
        "embedding_dim": int,
        "latent_channels": int,
        "vae_scale_factor": int,
        "scaling_factor": float,
        "sample_size": int,
        "max_token_length": int,
    },
    {
        "prediction_type": str,
        "shift_factor": Opt(float),
        "guidance_scale": float,
        "size_multiple": int,
        "default_resolution": int,
        "time_cond_proj_dim": Opt(int),
        "default_steps": Opt(int),
        "pooled_dim": Opt(int),
        "time_ids_count": Opt(int),
        "force_zeros_for_empty_prompt": bool,
        "unet_in_channels": Opt(int),
        "vae_kind": str,
        "tiny_vae_scaling_factor": Opt(float),
        "deepcache_branch": Opt(int),
        "token_merging": bool,
        "unet_stages": int,
    },
)
MANIFEST = Obj(
    {
        "format_version": int,
        "source": str,
        "model_family": str,
        "pipeline_class": str,
        "config": CONFIG,
        "components": {str: COMPONENT},
    },
    {
        "tools": Opt({str: str}),
        "name": Opt(str),
        "vocabulary": Opt([str]),
        "loras": Opt([Obj({"file": str, "sha256": str, "scale": float}, {})]),
    },
)
# Sizes: positive and below what any model uses by far (an absurd value would fail later, deep in a library).
SIZES = (
    "embedding_dim", "latent_channels", "vae_scale_factor", "sample_size", "max_token_length", "size_multiple",
    "time_cond_proj_dim", "default_steps", "pooled_dim", "time_ids_count", "unet_in_channels",
)  # fmt: skip
MAX_SIZE = 1 << 16
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def check_manifest(data: Any) -> None:
    """ManifestError naming the first field that does not match the schema or its rules."""
    check(data, MANIFEST, "")
    config = data["config"]
    for key in SIZES:
        if config.get(key) is not None and not 0 < config[key] <= MAX_SIZE:
            raise ManifestError(f"config.{key}: must be in 1..{MAX_SIZE}, got {config[key]}")
    if config["scaling_factor"] <= 0:
        raise ManifestError(f"config.scaling_factor: must be positive, got {config['scaling_factor']}")
    if not 0 <= config.get("guidance_scale", 0) <= 100:
        raise ManifestError(f"config.guidance_scale: must be in 0..100, got {config['guidance_scale']}")
    if config.get("shift_factor") is not None and abs(config["shift_factor"]) > 10:
        raise ManifestError(f"config.shift_factor: must be in -10..10, got {config['shift_factor']}")
    name = data.get("name") or ""
    if len(name) > 200 or not name.isprintable():
        raise ManifestError("name: must be one printable line of at most 200 characters")
    if config.get("vae_kind", "full") not in ("full", "tiny"):
        raise ManifestError(f"config.vae_kind: must be full or tiny, got {config['vae_kind']!r}")
    if not 0 <= (config.get("deepcache_branch") or 0) <= MAX_SIZE:
        raise ManifestError(f"config.deepcache_branch: must be in 0..{MAX_SIZE}, got {config['deepcache_branch']}")
    if config.get("prediction_type", "epsilon") not in PREDICTION_TYPES:
        raise ManifestError(f"config.prediction_type: must be one of {', '.join(PREDICTION_TYPES)}")
    if "unet" not in data["components"]:
        raise ManifestError("components: no unet")
    if ("unet_shallow" in data["components"]) != (config.get("deepcache_branch") is not None):
        raise ManifestError("components.unet_shallow: present exactly when config.deepcache_branch is set")
    if ("unet_tome" in data["components"]) != bool(config.get("token_merging")):
        raise ManifestError("components.unet_tome: present exactly when config.token_merging is true")
    stages = config.get("unet_stages", 0)
    if stages not in (0, len(STAGE_COMPONENTS)):
        raise ManifestError(f"config.unet_stages: must be 0 or {len(STAGE_COMPONENTS)}, got {stages}")
    if any((name in data["components"]) != bool(stages) for name in STAGE_COMPONENTS):
        raise ManifestError("components.unet_stage_*: all present exactly when config.unet_stages is set")
    for name, component in data["components"].items():
        if name not in ALL_COMPONENTS:
            raise ManifestError(f"components.{name}: unknown component (known: {', '.join(ALL_COMPONENTS)})")
        if component["file"] not in component["files"]:
            raise ManifestError(f"components.{name}.file: {component['file']!r} is not listed in its files")
        for rel in component["files"]:
            if not _inside(rel):
                raise ManifestError(f"components.{name}.files: {rel!r} is not a path inside the model folder")


def check(value: Any, spec: Any, path: str) -> None:
    """Check `value` against `spec` recursively; `path` is the dotted field name for messages."""
    where = path or "manifest"
    if isinstance(spec, Opt):
        if value is not None:
            check(value, spec.spec, path)
    elif isinstance(spec, Obj):
        _expect(value, dict, where)
        for key, sub in spec.fields.items():
            if key not in value:
                raise ManifestError(f"{_join(path, key)}: missing")
            check(value[key], sub, _join(path, key))
        for key, sub in spec.optional.items():
            if key in value:  # present: it must match (null only where the spec says Opt)
                check(value[key], sub, _join(path, key))
    elif isinstance(spec, list):
        _expect(value, list, where)
        for i, item in enumerate(value):
            check(item, spec[0], f"{where}[{i}]")
    elif isinstance(spec, dict) and spec:
        _expect(value, dict, where)
        (sub,) = spec.values()
        for key, item in value.items():
            check(item, sub, _join(path, key))
    else:
        _expect(value, spec, where)


def _expect(value: Any, types: Any, where: str) -> None:
    types = types if isinstance(types, tuple) else (types,)
    ok = any(_is(value, t) for t in types)
    if not ok:
        wanted = " or ".join(_NAMES.get(t, t.__name__) for t in types)
        raise ManifestError(f"{where}: expected {wanted}, got {_NAMES.get(type(value), type(value).__name__)}")


def _is(value: Any, kind: type) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _inside(rel: str) -> bool:
    norm = posixpath.normpath(rel.replace("\\", "/"))
    return bool(rel) and not norm.startswith(("/", "../")) and norm != ".." and ":" not in norm.split("/")[0]


_NAMES = {
    dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number", bool: "a boolean",
    type(None): "null",
}  # fmt: skip
