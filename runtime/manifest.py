"""The model folder's manifest (`sd_onnx.json`): the one place component files, shapes, dtypes and hashes live.

Written by the exporter, read by the runtime and the tests. Plain dataclasses and JSON, so the runtime
needs nothing beyond the standard library to read it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MANIFEST_NAME = "sd_onnx.json"
FORMAT_VERSION = 1
COMPONENTS = ("text_encoder", "unet", "vae_decoder", "vae_encoder")


class ManifestError(ValueError):
    """A model folder is missing, incomplete, corrupt or does not match its manifest."""


@dataclass
class TensorSpec:
    """One graph input or output; symbolic dimensions are strings such as "batch"."""

    name: str
    shape: list[int | str]
    dtype: str


@dataclass
class ComponentInfo:
    """One exported graph: its files (path relative to the folder -> sha256), signature and validation."""

    file: str
    files: dict[str, str]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    precision: str = "fp32"
    opset: int = 17
    validation: dict[str, Any] = field(default_factory=dict)
    quantization: dict[str, Any] = field(default_factory=dict)
    optimizations: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ComponentInfo:
        data = dict(data)
        data["inputs"] = [TensorSpec(**t) for t in data["inputs"]]
        data["outputs"] = [TensorSpec(**t) for t in data["outputs"]]
        return cls(**data)


@dataclass
class ModelConfig:
    """Sizes read from the source model's own configs; nothing in the runtime assumes SD 1.5's."""

    embedding_dim: int
    latent_channels: int
    vae_scale_factor: int
    scaling_factor: float
    sample_size: int
    max_token_length: int
    prediction_type: str = "epsilon"
    shift_factor: float | None = None
    # The classifier-free guidance the model was made for (SD: 7.5); used when a caller gives none.
    guidance_scale: float = 7.5

    @property
    def default_resolution(self) -> int:
        return self.sample_size * self.vae_scale_factor


@dataclass
class Manifest:
    """Everything the runtime needs to know about an exported model folder."""

    source: str
    model_family: str
    pipeline_class: str
    config: ModelConfig
    components: dict[str, ComponentInfo]
    tools: dict[str, str] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["config"]["default_resolution"] = self.config.default_resolution
        return data

    def save(self, folder: Path) -> Path:
        path = Path(folder) / MANIFEST_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        if data.get("format_version") != FORMAT_VERSION:
            raise ManifestError(f"unsupported manifest format_version {data.get('format_version')!r}")
        config = {k: v for k, v in data["config"].items() if k != "default_resolution"}
        return cls(
            source=data["source"],
            model_family=data["model_family"],
            pipeline_class=data["pipeline_class"],
            config=ModelConfig(**config),
            components={k: ComponentInfo.from_dict(v) for k, v in data["components"].items()},
            tools=data.get("tools", {}),
        )

    @classmethod
    def load(cls, folder: Path) -> Manifest:
        path = Path(folder) / MANIFEST_NAME
        if not path.is_file():
            raise ManifestError(f"{folder}: no {MANIFEST_NAME}; not an sd-onnx model folder")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ManifestError(f"{path}: corrupt manifest ({exc})") from exc

    def verify(self, folder: Path, components: tuple[str, ...] | None = None) -> None:
        """Check that every file of the named components exists and has the recorded sha256."""
        for name in components or tuple(self.components):
            for rel, expected in self.components[name].files.items():
                path = Path(folder) / rel
                if not path.is_file():
                    raise ManifestError(f"{name}: missing model file {path}")
                if sha256_file(path) != expected:
                    raise ManifestError(f"{name}: sha256 mismatch for {path} (corrupt or modified file)")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks so multi-GB weights need no memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
