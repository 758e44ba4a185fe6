"""LoRAs applied when a session is created, without PyTorch: each targeted weight becomes base + scale *
(alpha / rank) * up @ down, handed to onnxruntime as an initializer override (`SessionOptions.add_initializer`).

Which initializer holds which module's weight, in which layout, and where its bytes are, the exporter records
per component in TARGETS_FILE (exporter/lora_targets.py). LoRA files are read in the layouts training tools
write: diffusers/PEFT (`unet.<module>.lora_A.weight`, `transformer.<module>.lora_A.weight` for SD3/FLUX,
`text_encoder.<module>.lora_B.weight`, older `.lora.down.weight`), and kohya/A1111
(`lora_unet_<module with _>.lora_down.weight`, `lora_te_*`, `.alpha`). Formats that are not a plain low-rank
pair (LoHa, LoKr, DoRA) and kohya SDXL, SD3 and FLUX files named after the original checkpoint's blocks are
refused: fuse those at export (`sd-export convert --lora`, where diffusers converts them).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from .echo import echo
from .files import UntrustedFileError, inside, parse_json, read_json, regular_file
from .request import RequestError
from .schema import Obj, Opt, SchemaError, check

TARGETS_FILE = "lora_targets.json"
# Key prefix -> component; longer prefixes first (text_encoder_2 before text_encoder).
PREFIXES = (
    ("text_encoder_2.", "text_encoder_2"), ("text_encoder.", "text_encoder"), ("unet.", "unet"),
    ("transformer.", "transformer"),
    ("lora_te2_", "text_encoder_2"), ("lora_te1_", "text_encoder"), ("lora_te_", "text_encoder"),
    ("lora_unet_", "unet"),
)  # fmt: skip
# Key suffix -> which part of the pair it is.
PARTS = {
    ".lora_A.weight": "down", ".lora_B.weight": "up", ".lora_down.weight": "down", ".lora_up.weight": "up",
    ".lora.down.weight": "down", ".lora.up.weight": "up", ".lora_linear_layer.down.weight": "down",
    ".lora_linear_layer.up.weight": "up", ".alpha": "alpha",
}  # fmt: skip
SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}
MAX_HEADER = 100 * 2**20
MAX_LORA_BYTES = 8 << 30  # SDXL LoRAs of high rank reach 1-2 GB
MAX_TARGETS_BYTES = 64 << 20  # SDXL's UNet map is about 1 MB
MAX_WEIGHT_VALUES = 1 << 30
WEIGHT_DTYPES = ("float32", "float16")
LAYOUTS = ("conv", "gemm", "matmul")
TENSOR_SPEC = Obj({"dtype": str, "shape": [int], "data_offsets": [int]})
SAFETENSORS_HEADER = Obj({}, {"__metadata__": Opt({str: str})})
TARGETS_SCHEMA = Obj(
    {
        "modules": {str: [Obj({"tensor": str, "layout": str})]},
        "tensors": {str: Obj({"dtype": str, "shape": [int], "file": str, "offset": int})},
    },
    {"token_embedding": str},
)


@dataclass
class LowRank:
    """One module's update: up (out x r [x 1 x 1]) @ down (r x in [x kh x kw]), scaled by alpha / r."""

    down: np.ndarray | None = None
    up: np.ndarray | None = None
    alpha: float | None = None

    def delta(self) -> np.ndarray:
        """The weight update in the module's own layout (Linear: out x in; Conv: out x in x kh x kw)."""
        rank = self.down.shape[0]
        update = self.up.reshape(self.up.shape[0], rank) @ self.down.reshape(rank, -1)
        shape = (self.up.shape[0], *self.down.shape[1:])
        return (update * ((self.alpha or rank) / rank)).reshape(shape)


@dataclass
class Lora:
    """A LoRA file read for load-time application: its low-rank pairs by component and module key."""

    file: Path
    scale: float
    modules: dict[str, dict[str, LowRank]] = field(default_factory=dict)  # component -> module key -> pair

    @classmethod
    def read(cls, file: str | Path, scale: float = 1.0) -> Lora:
        """Read and check a .safetensors LoRA; ValueError naming the file for anything unusable."""
        file = Path(file).expanduser()
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not -10.0 <= scale <= 10.0:
            raise RequestError("loras", f"{file.name}: scale must be a number in -10..10, got {scale!r}")
        try:
            tensors, metadata = read_safetensors(file)
        except UntrustedFileError as exc:
            raise RequestError("loras", str(exc)) from None
        lora = cls(file, float(scale))
        alphas = _metadata_alphas(metadata)
        for key, value in tensors.items():
            component, module, part = _split_key(file, key)
            pair = lora.modules.setdefault(component, {}).setdefault(module, LowRank(alpha=alphas.get(component)))
            if part == "alpha":
                pair.alpha = _alpha(file, key, value)
            else:
                setattr(pair, part, value.astype(np.float32))
        for pairs in lora.modules.values():
            for module, pair in pairs.items():
                _check_pair(file, module, pair)
        if not lora.modules:
            raise RequestError("loras", f"{file.name}: holds no LoRA weights")
        return lora


def parse_lora_option(text: str) -> tuple[Path, float]:
    """ "FILE[:SCALE]" -> (file, scale 1 by default); a colon that is part of an existing file's name (or a
    Windows drive) is not a scale. RequestError when the tail is no number."""
    head, sep, tail = text.rpartition(":")
    file = Path(text).expanduser()
    if sep and head and not file.is_file():
        try:
            return Path(head).expanduser(), float(tail)
        except ValueError:
            raise RequestError("loras", f"{text}: no such file, and {tail!r} is not a scale (FILE[:SCALE])") from None
    return file, 1.0


def read_loras(loras: Any) -> tuple[Lora, ...]:
    """`from_pretrained(loras=...)`: files or (file, scale) pairs, each read and checked."""
    if loras is None:
        return ()
    if isinstance(loras, (str, Path)) or not isinstance(loras, (list, tuple)):
        raise RequestError("loras", "must be a list of files or (file, scale) pairs")
    read = []
    for entry in loras:
        if isinstance(entry, (str, Path)):
            read.append(Lora.read(entry))
        elif isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[0], (str, Path)):
            read.append(Lora.read(*entry))
        else:
            raise RequestError("loras", f"{entry!r} is neither a file nor a (file, scale) pair")
    return tuple(read)


def weight_overrides(component_dir: Path, loras: list[Lora]) -> dict[str, np.ndarray]:
    """The initializers of one component's graph with every LoRA's update added, by initializer name; empty
    when no LoRA touches the component."""
    targets, steps = plan(component_dir, loras)
    updated: dict[str, np.ndarray] = {}
    for lora, path, pair in steps:
        _add(updated, targets, component_dir, targets["modules"][path], pair, lora.scale, lora.file.name, path)
    return {name: weight.astype(targets["tensors"][name]["dtype"]) for name, weight in updated.items()}


def plan(component_dir: Path, loras: list[Lora]) -> tuple[dict[str, Any], list[tuple[Lora, str, LowRank]]]:
    """The component's map and (LoRA, module path, pair) for every update of it, resolved without reading any
    weight; RequestError when the map is missing or a LoRA targets a module the map does not hold."""
    component = component_dir.name
    wanted = [lora for lora in loras if lora.modules.get(component)]
    if not wanted:
        return {}, []
    targets = _read_targets(component_dir, wanted[0])
    names = _module_names(targets["modules"])
    steps = []
    for lora in wanted:
        for key, pair in lora.modules[component].items():
            path = names.get(key)
            if path is None:
                raise RequestError(
                    "loras",
                    f"{lora.file.name}: targets {component} module {key!r}, which this export cannot change "
                    "at load time (a LoRA of another model, or one naming the original checkpoint's blocks: fuse "
                    "it with sd-export convert --lora)",
                )
            steps.append((lora, path, pair))
    return targets, steps


def _module_names(paths: list[str]) -> dict[str, str]:
    """Every name a LoRA file may give a module -> its path in the map: dotted (diffusers/PEFT) or with
    underscores (kohya), with or without the `text_model.` level that transformers 4's CLIP models have."""
    names = {}
    for path in paths:
        bare = path.removeprefix("text_model.")
        for name in {path, bare, f"text_model.{bare}"}:
            names[name] = names[name.replace(".", "_")] = path
    return names


def check_loras(folder: Path, loras: list[Lora], components: list[str] | None = None) -> None:
    """Every LoRA applies to the model in `folder`: its components (default: the manifest's, else the
    sub-folders) exist and hold every module it targets."""
    from .manifest import MANIFEST_NAME, Manifest

    if not loras:
        return
    if components is None:
        has_manifest = (folder / MANIFEST_NAME).is_file()
        components = (
            list(Manifest.load(folder).components) if has_manifest else [p.name for p in folder.iterdir() if p.is_dir()]
        )
    for lora in loras:
        absent = sorted(set(lora.modules) - set(components))
        if absent == ["unet"] and "transformer" in components:  # kohya's lora_unet_* names of a DiT's blocks
            raise RequestError(
                "loras",
                f"{lora.file.name}: names the transformer's modules as the original checkpoint does (kohya); "
                "load-time LoRAs take diffusers/PEFT names (transformer.*): fuse it with sd-export convert --lora",
            )
        if absent:
            raise RequestError(
                "loras", f"{lora.file.name}: targets {', '.join(absent)}, which this model does not have"
            )
    for component in {c for lora in loras for c in lora.modules}:
        plan(folder / component, loras)


def _add(
    updated: dict[str, np.ndarray],
    targets: dict[str, Any],
    folder: Path,
    parts: list[dict[str, Any]],
    pair: LowRank,
    scale: float,
    file: str,
    path: str,
) -> None:
    """Add one module's scaled update to its initializer(s), reading each base weight on first use; the pair's
    shape is checked against the weight's before any product is made (a tiny file can declare a huge one)."""
    size = pair.up.shape[0] * int(np.prod(pair.down.shape[1:]))
    for part in parts:
        expected = int(np.prod(targets["tensors"][part["tensor"]]["shape"]))
        if size != expected:
            shape = [pair.up.shape[0], *pair.down.shape[1:]]
            raise RequestError(
                "loras", f"{file}: {path} is {shape} in this LoRA but has {expected} values in the model"
            )
    delta = pair.delta() * np.float32(scale)
    for part in parts:
        name, layout = part["tensor"], part["layout"]
        if name not in updated:
            updated[name] = base_weight(folder, targets["tensors"][name])
        weight = updated[name]
        if layout == "conv":
            change = delta.reshape(weight.shape) if delta.size == weight.size else delta
        else:  # a Linear: out x in (Gemm) or its transpose (MatMul)
            change = delta.reshape(delta.shape[0], -1)
            change = change.T if layout == "matmul" else change
        if change.shape != weight.shape:
            raise RequestError(
                "loras", f"{file}: {path} is {list(change.shape)} in this LoRA but {list(weight.shape)} in the model"
            )
        weight += change


def base_weight(folder: Path, where: dict[str, Any]) -> np.ndarray:
    """A float32 copy of an initializer's data, read from its file (inside the component's folder) at its
    recorded offset (updates are summed in float32 and cast back once, as fusing in PyTorch then converting
    would)."""
    dtype = np.dtype(where["dtype"])
    count = int(np.prod(where["shape"], dtype=np.int64))
    try:
        path = inside(folder, where["file"], folder / TARGETS_FILE)
        size = regular_file(path, "model file").st_size
    except UntrustedFileError as exc:
        raise RequestError("loras", str(exc)) from None
    if where["offset"] + count * dtype.itemsize > size:
        raise RequestError(
            "loras", f"{folder.name}: {where['file']} is shorter than its LoRA map says; re-export the model"
        )
    with open(path, "rb") as f:
        f.seek(where["offset"])
        raw = f.read(count * dtype.itemsize)
    return np.frombuffer(raw, dtype).reshape(where["shape"]).astype(np.float32)


def _read_targets(folder: Path, lora: Lora) -> dict[str, Any]:
    path = folder / TARGETS_FILE
    if not path.is_file():
        raise RequestError(
            "loras",
            f"{lora.file.name}: {folder.name} has no LoRA map ({TARGETS_FILE}); int8 graphs (and int4 weights) "
            "cannot take a LoRA at load time (their weights are quantized) and older exports lack the map: fuse "
            "the LoRA at export (sd-export convert --lora) or re-export",
        )
    return read_targets(folder)


def read_targets(folder: Path) -> dict[str, Any]:
    """A component's LoRA map (bounded, types checked); RequestError naming the file when it is unusable."""
    try:
        path = inside(folder.parent, f"{folder.name}/{TARGETS_FILE}", folder.parent)
        targets = read_json(path, MAX_TARGETS_BYTES, "LoRA map")
        check(targets, TARGETS_SCHEMA, "", TARGETS_FILE)
        _check_targets(targets)
    except (UntrustedFileError, SchemaError) as exc:
        where = "" if str(exc).startswith(str(path)) else f"{path}: "
        raise RequestError("loras", f"{where}{exc}") from None
    return targets


def _check_targets(targets: dict[str, Any]) -> None:
    """What the schema's types cannot say: layouts, dtypes, sizes, and that every module's tensor is listed."""
    for name, where in targets["tensors"].items():
        if where["dtype"] not in WEIGHT_DTYPES or where["offset"] < 0 or not 0 < len(where["shape"]) <= 4:
            raise SchemaError(f"tensors.{echo(name)}: needs a float dtype, an offset >= 0 and 1-4 dimensions")
        if any(d < 1 for d in where["shape"]) or np.prod(where["shape"], dtype=np.float64) > MAX_WEIGHT_VALUES:
            raise SchemaError(
                f"tensors.{echo(name)}.shape: must be positive sizes of at most {MAX_WEIGHT_VALUES} values"
            )
    for module, parts in targets["modules"].items():
        for part in parts:
            if part["layout"] not in LAYOUTS or part["tensor"] not in targets["tensors"]:
                raise SchemaError(
                    f"modules.{echo(module)}: layout must be one of {', '.join(LAYOUTS)} and its tensor listed"
                )


def _split_key(file: Path, key: str) -> tuple[str, str, str]:
    """(component, module key, part) of a LoRA tensor name."""
    suffix = next((suffix for suffix in PARTS if key.endswith(suffix)), None)
    if suffix is None:
        kind = "LoHa/LoKr/DoRA" if any(s in key for s in ("hada_", "lokr_", "dora_scale", "magnitude")) else "an"
        raise RequestError(
            "loras",
            f"{file.name}: {key!r} is {kind} unsupported LoRA weight; load-time LoRAs take low-rank pairs "
            "(lora_A/lora_B, lora_down/lora_up); fuse other kinds at export (sd-export convert --lora)",
        )
    stem = key[: -len(suffix)].removeprefix("base_model.model.")
    prefix, component = next(((p, c) for p, c in PREFIXES if stem.startswith(p)), ("", "unet"))
    return component, stem[len(prefix) :], PARTS[suffix]


def _check_pair(file: Path, module: str, pair: LowRank) -> None:
    if pair.down is None or pair.up is None:
        missing = "down (lora_A)" if pair.down is None else "up (lora_B)"
        raise RequestError("loras", f"{file.name}: {module} has no {missing} weight")
    if (
        pair.down.ndim not in (2, 4)
        or pair.up.ndim != pair.down.ndim
        or pair.up.shape[1] != pair.down.shape[0]
        or not pair.down.shape[0]
    ):
        raise RequestError(
            "loras",
            f"{file.name}: {module}: up {list(pair.up.shape)} and down {list(pair.down.shape)} are no low-rank pair",
        )
    if not (np.isfinite(pair.down).all() and np.isfinite(pair.up).all()):
        raise RequestError("loras", f"{file.name}: {module} holds NaN or infinite values")


def _alpha(file: Path, key: str, value: np.ndarray) -> float:
    """A `.alpha` tensor's one finite value."""
    values = np.asarray(value, np.float64).reshape(-1)
    if values.size != 1 or not np.isfinite(values[0]):
        raise RequestError("loras", f"{file.name}: {key} must be one finite number")
    return float(values[0])


def _metadata_alphas(metadata: dict[str, str]) -> dict[str, float]:
    """diffusers' `lora_adapter_metadata` (PEFT config per component): lora_alpha by component."""
    try:
        config = parse_json(metadata.get("lora_adapter_metadata", "{}"), "lora_adapter_metadata")
        alphas = {key.split(".")[0]: float(value) for key, value in config.items() if key.endswith(".lora_alpha")}
        return {component: alpha for component, alpha in alphas.items() if np.isfinite(alpha)}
    except (ValueError, TypeError, AttributeError):
        return {}


def read_safetensors(file: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Tensors (float32/float16; bfloat16 widened to float32) and metadata of a .safetensors file, NumPy only.
    The header is bounded and checked before any tensor is read; each tensor is read alone, within the file.
    UntrustedFileError naming the file otherwise."""
    if file.suffix != ".safetensors":
        raise UntrustedFileError(f"{file}: not a .safetensors file")
    size = regular_file(file, ".safetensors file").st_size
    if size > MAX_LORA_BYTES:
        raise UntrustedFileError(f"{file}: {size / 2**30:.1f} GiB, larger than a LoRA can be")
    with open(file, "rb") as f:
        head = f.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 2 <= length <= min(MAX_HEADER, size - 8):
            raise UntrustedFileError(f"{file.name}: not a readable .safetensors file (header length)")
        header = parse_json(f.read(length), file.name)
        try:
            check(header, SAFETENSORS_HEADER, "", "header")
            metadata = header.pop("__metadata__", None) or {}
            check(header, {str: TENSOR_SPEC}, "", "header")
            _disjoint(header)
            tensors = {name: _tensor(f, 8 + length, size, spec) for name, spec in header.items()}
        except (SchemaError, ValueError) as exc:
            raise UntrustedFileError(f"{file.name}: not a readable .safetensors file ({exc})") from None
    return tensors, metadata


def _disjoint(header: dict[str, Any]) -> None:
    """Tensors may not share bytes (safetensors' rule): a file that names one range many times would be read,
    and held, as many times."""
    ranges = sorted(tuple(spec["data_offsets"]) for spec in header.values())
    for (_, end), (begin, _) in zip(ranges, ranges[1:], strict=False):
        if begin < end:
            raise ValueError("tensors overlap")


def _tensor(file: BinaryIO, start: int, size: int, spec: dict[str, Any]) -> np.ndarray:
    dtype = SAFETENSORS_DTYPES.get(spec["dtype"])
    if dtype is None:
        raise ValueError(f"dtype {echo(spec['dtype'])} is not a float type")
    begin, end = (start + o for o in spec["data_offsets"])
    shape = tuple(spec["shape"])
    if len(shape) > 8 or any(d < 0 for d in shape):
        raise ValueError(f"shape {echo(list(shape))} is not a tensor shape")
    expected = int(np.prod(shape, dtype=np.float64)) * np.dtype(dtype).itemsize
    if not start <= begin <= end <= size or end - begin != expected:
        raise ValueError("data offsets do not match the shape")
    file.seek(begin)
    array = np.frombuffer(file.read(end - begin), dtype).reshape(shape)
    if spec["dtype"] == "BF16":  # the upper half of a float32
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array
