"""ControlNet preprocessors that run a network (HED soft edges), torch-free: graphs that `sd-export annotator`
wrote from controlnet-aux's architectures, each in a sub-folder of an annotators folder (`--annotators-dir`)
named after its network, with `annotator.json` beside `model.onnx`.

Module names are A1111's ControlNet extension's: `softedge_hed` and `softedge_hedsafe` (the map quantized to
three levels, controlnet-aux's `safe_step`) run the `hed` network. The graph returns the edge probability at the
input's size; the map is that times 255, truncated to uint8, as controlnet-aux does.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from .echo import echo
from .files import UntrustedFileError, inside, read_json, regular_file
from .manifest import sha256_file
from .schema import Obj, SchemaError, check

MANIFEST_NAME = "annotator.json"
GRAPH = "model.onnx"
FORMAT_VERSION = 1
MAX_MANIFEST_BYTES = 1 << 20
NETWORKS = ("hed",)
# A1111 module -> (the network it runs, whether its map is quantized to three levels)
MODEL_MODULES = {"softedge_hed": ("hed", False), "softedge_hedsafe": ("hed", True)}
SPEC = Obj({"name": str, "shape": [(int, str)], "dtype": str})
SCHEMA = Obj(
    {"format_version": int, "network": str, "graph": str, "sha256": str, "inputs": [SPEC], "outputs": [SPEC]},
    {"source": dict, "validation": dict},
)


@dataclass(frozen=True)
class AnnotatorManifest:
    """One exported preprocessor network: its graph file and how it was made."""

    network: str
    graph: str
    sha256: str
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    format_version: int = FORMAT_VERSION
    source: dict[str, Any] = field(default_factory=dict)
    validation: dict[str, Any] = field(default_factory=dict)

    def save(self, folder: Path) -> None:
        (folder / MANIFEST_NAME).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, folder: Path) -> tuple[AnnotatorManifest, Path]:
        """(manifest, graph path) of an exported annotator folder, its graph's sha256 checked; UntrustedFileError
        naming the file and field for anything unusable."""
        folder = Path(folder)
        path = folder / MANIFEST_NAME
        if not path.is_file():
            raise UntrustedFileError(f"{folder}: has no {MANIFEST_NAME} (export one with sd-export annotator)")
        data = read_json(path, MAX_MANIFEST_BYTES, "manifest")
        try:
            check(data, SCHEMA, "", MANIFEST_NAME)
            manifest = cls(**{k: v for k, v in data.items() if k in set(SCHEMA.fields) | set(SCHEMA.optional)})
            if manifest.format_version != FORMAT_VERSION:
                raise ValueError(f"format_version: this runtime reads {FORMAT_VERSION}, got {manifest.format_version}")
            if manifest.network not in NETWORKS:
                raise ValueError(f"network: {echo(manifest.network)} is none of {', '.join(NETWORKS)}")
        except (SchemaError, ValueError) as exc:
            raise UntrustedFileError(f"{path}: {exc}") from None
        graph = inside(folder, manifest.graph, path)
        regular_file(graph, "graph file")
        if sha256_file(graph) != manifest.sha256:
            raise UntrustedFileError(f"{graph}: sha256 differs from {MANIFEST_NAME} (damaged or modified)")
        return manifest, graph


class AnnotatorNetwork:
    """One exported network, its session opened at once (onnxruntime's CPU provider), so that a folder it cannot
    run fails where it is loaded (a server's start), not at a request."""

    def __init__(self, folder: Path, threads: int | None = None) -> None:
        self.manifest, self.graph = AnnotatorManifest.load(folder)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        try:
            self._session = ort.InferenceSession(str(self.graph), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime's load errors have no common type
            raise UntrustedFileError(f"{self.graph}: onnxruntime cannot load it ({_first_line(exc)})") from None
        inputs, outputs = self._session.get_inputs(), self._session.get_outputs()
        if [(i.name, i.type, len(i.shape)) for i in inputs] != [("image", "tensor(float)", 4)] or [
            (o.type, len(o.shape)) for o in outputs[:1]
        ] != [("tensor(float)", 4)]:
            raise UntrustedFileError(f"{self.graph}: not an annotator graph (one float image in, one float map out)")

    def edges(self, pixels: np.ndarray, safe: bool) -> np.ndarray:
        """(H, W, 3) uint8 RGB -> (H, W) uint8 map; ValueError when the graph fails or returns something else."""
        image = pixels.astype(np.float32).transpose(2, 0, 1)[None]
        try:
            edge = self._session.run(None, {"image": image})[0]
        except Exception as exc:  # noqa: BLE001 - onnxruntime's run errors have no common type
            raise ValueError(f"{self.graph}: onnxruntime could not run it ({_first_line(exc)})") from None
        if edge.shape != (1, 1, *pixels.shape[:2]) or not np.isfinite(edge).all():
            raise ValueError(f"{self.graph}: returned a {edge.shape} map, not a finite (1, 1, H, W) one")
        edge = edge[0, 0].astype(np.float64)
        if safe:  # controlnet-aux's safe_step(x, 2)
            edge = (edge.astype(np.float32) * 3).astype(np.int32).astype(np.float32) / 2
        return (edge * 255.0).clip(0, 255).astype(np.uint8)


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:200]


def load_annotators(folder: Path | None, threads: int | None = None) -> dict[str, AnnotatorNetwork]:
    """The exported networks in the sub-folders of `folder` named after them (hidden ones, such as an export in
    progress, skipped); {} for None. UntrustedFileError naming the first one that is unusable."""
    if folder is None:
        return {}
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise UntrustedFileError(f"{folder}: no such folder of annotators")
    networks = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        network = AnnotatorNetwork(sub, threads)
        if network.manifest.network != sub.name:
            raise UntrustedFileError(f"{sub}: holds the {network.manifest.network} network; name the folder so")
        networks[sub.name] = network
    return networks


__all__ = ["MODEL_MODULES", "NETWORKS", "AnnotatorManifest", "AnnotatorNetwork", "load_annotators"]
