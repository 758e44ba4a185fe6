"""`upscaler.json`: what an exported upscaler folder holds (written by `sd-export upscaler`, read by
`runtime/upscale.py`), and the checks a folder from a stranger passes before its graph is opened.

The graph takes (batch, channels, height, width) float32 pixels in [0, 1], RGB order, and returns the same
layout `scale` times larger; height and width must be multiples of `input_multiple` (Real-ESRGAN's x2 and x1
models unshuffle their input). `tile` and `tile_overlap` are the runtime's defaults, in input pixels.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .echo import echo
from .files import UntrustedFileError, inside, read_json, regular_file
from .manifest import sha256_file
from .schema import Obj, SchemaError, check

MANIFEST_NAME = "upscaler.json"
FORMAT_VERSION = 1
MAX_MANIFEST_BYTES = 1 << 20
CHANNEL_MODES = {1: "L", 3: "RGB", 4: "RGBA"}  # graph channels -> the PIL mode fed to it
SCALES = range(1, 9)
TILES = range(16, 8193)
SPEC = Obj({"name": str, "shape": [(int, str)], "dtype": str})
SCHEMA = Obj(
    {
        "format_version": int,
        "name": str,
        "architecture": str,
        "scale": int,
        "channels": int,
        "input_multiple": int,
        "tile": int,
        "tile_overlap": int,
        "graph": str,
        "sha256": str,
        "precision": str,
        "inputs": [SPEC],
        "outputs": [SPEC],
    },
    {"opset": int, "hyperparameters": dict, "source": dict, "validation": dict, "quantization": dict, "tools": dict},
)


@dataclass(frozen=True)
class UpscalerManifest:
    """One exported upscaler: its graph file, scale and the runtime's tiling defaults, plus how it was made."""

    name: str
    architecture: str
    scale: int
    channels: int
    input_multiple: int
    tile: int
    tile_overlap: int
    graph: str
    sha256: str
    precision: str
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    opset: int = 17
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    validation: dict[str, Any] = field(default_factory=dict)
    quantization: dict[str, Any] = field(default_factory=dict)
    tools: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def save(self, folder: Path) -> None:
        (folder / MANIFEST_NAME).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, folder: Path, verify: bool = True) -> tuple[UpscalerManifest, Path]:
        """(manifest, graph path) of an exported upscaler folder; with `verify`, the graph's sha256 is checked
        too. UntrustedFileError naming the file and field for anything unusable."""
        folder = Path(folder)
        path = folder / MANIFEST_NAME
        if not folder.is_dir():
            raise UntrustedFileError(f"{folder}: no such upscaler folder")
        if not path.is_file():
            raise UntrustedFileError(f"{folder}: has no {MANIFEST_NAME} (export one with sd-export upscaler)")
        data = read_json(path, MAX_MANIFEST_BYTES, "upscaler manifest")
        try:
            check(data, SCHEMA, "", MANIFEST_NAME)
            known = set(SCHEMA.fields) | set(SCHEMA.optional)
            manifest = cls(**{k: v for k, v in data.items() if k in known})
            manifest._check_values()
        except (SchemaError, ValueError) as exc:
            raise UntrustedFileError(f"{path}: {exc}") from None
        graph = inside(folder, manifest.graph, path)
        regular_file(graph, "graph file")
        if verify and sha256_file(graph) != manifest.sha256:
            raise UntrustedFileError(
                f"{graph}: sha256 differs from {MANIFEST_NAME} (damaged or modified; export again)"
            )
        return manifest, graph

    def _check_values(self) -> None:
        if self.format_version != FORMAT_VERSION:
            raise ValueError(f"format_version: this runtime reads {FORMAT_VERSION}, got {echo(self.format_version)}")
        rules = {
            "scale": self.scale in SCALES,
            "channels": self.channels in CHANNEL_MODES,
            "input_multiple": self.input_multiple in (1, 2, 4),
            "tile": self.tile in TILES and self.tile % self.input_multiple == 0,
            "tile_overlap": 0 <= self.tile_overlap <= self.tile // 4,
            "precision": self.precision in ("fp32", "int8"),
        }
        for name, ok in rules.items():
            if not ok:
                raise ValueError(f"{name}: {echo(getattr(self, name))} is out of range")
