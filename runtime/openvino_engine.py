"""OpenVINO as a second engine for the same ONNX graphs: `OpenVinoModel` runs like `OnnxModel`.

Why not onnxruntime's OpenVINO execution provider: the plugin (`onnxruntime-ep-openvino` 1.8.1) offers devices of
Intel's vendor id only, so it runs nothing on AMD CPUs, and the replacing wheel (`onnxruntime-openvino` 1.24.1)
failed on graphs with `MultiHeadAttention`. OpenVINO's own ONNX reader takes our graphs as they are
(`com.microsoft` MultiHeadAttention, QDQ int8), so this module reads the very `.onnx` files the manifest lists,
compiles each for the input shapes of the call (static shapes are what OpenVINO plans best) and keeps the compiled
model on disk in the user cache directory. The rest of the runtime does not know which engine runs a graph.

Precision: OpenVINO's CPU plugin runs float layers in bf16 where the CPU has bf16 instructions (AMX, AVX-512 bf16)
unless told `f32`; `precision="auto"` keeps that default (fidelity measured in docs/performance.md), `"f32"` is the
exact path, `"bf16"` asks for bf16 where the CPU has it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import logging
import mmap
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .graph import GraphModel
from .manifest import ComponentInfo

LOG = logging.getLogger("sd_onnx")
PRECISIONS = ("auto", "f32", "bf16")
# Compiled shapes kept per graph: a generation alternates at most between the guided and the unguided batch
# (guidance interval); each compiled model holds its own repacked weights, so no more than that.
COMPILED_KEPT = 2
# NumPy dtype names (the manifest's) -> ONNX type strings (onnxruntime's NodeArg.type); OpenVINO's names -> NumPy's.
ONNX_TYPES = {"float32": "tensor(float)", "float64": "tensor(double)", "float16": "tensor(float16)",
              "int64": "tensor(int64)", "int32": "tensor(int32)"}  # fmt: skip
OPENVINO_DTYPES = {"f32": "float32", "f64": "float64", "f16": "float16", "i64": "int64", "i32": "int32"}
BLOBS_KEPT = 4  # compiled shapes kept on disk per graph and settings (each about the size of the graph's weights)
MAX_SHAPES_BYTES = 64 * 1024
Shapes = dict[str, list[int]]


class EngineUnavailable(RuntimeError):
    """OpenVINO cannot run this graph (not installed, an operator it cannot read, a compile error)."""


@dataclass(frozen=True)
class GraphInput:
    """What `OnnxModel.graph_inputs` holds for onnxruntime (name, ONNX type string, shape), for OpenVINO."""

    name: str
    type: str
    shape: list[int | str | None]


@functools.cache
def openvino_version() -> str | None:
    """The installed OpenVINO's version, or None when the `openvino` package is missing."""
    try:
        import openvino
    except ImportError:
        return None
    return openvino.__version__.split("-")[0]


@functools.cache
def _core() -> Any:
    import openvino

    return openvino.Core()


def default_precision() -> str:
    """The precision OpenVINO's CPU plugin runs float layers in here when not told ("bf16" or "f32")."""
    return _precision_name(_core().get_property("CPU", "INFERENCE_PRECISION_HINT"))


class OpenVinoModel(GraphModel):
    """One component compiled by OpenVINO's CPU plugin; same call, checks and observers as `OnnxModel`.

    Compiled once per input shape (static shapes: 4-8 % faster steps than a dynamic compile, SD 1.5 int8 UNet) and
    kept on disk in `cache_dir`, keyed by the graph's files, the shapes and the settings; a later load maps the
    compiled blob instead of reading the graph (SD 1.5 int8 UNet: 2.4 s and 1.97 GB peak, against 9.6 s and 2.8 GB
    for the first compile; OpenVINO's own CACHE_DIR needs the graph read first, 2.7 GB). `initializers` (load-time
    LoRAs) replace the graph's constants of those names; such a graph is held in memory and never cached (its
    weights are one LoRA mix). `on_failure` builds the onnxruntime session that takes over when a shape cannot be
    compiled at call time."""

    def __init__(
        self,
        model_file: Path,
        info: ComponentInfo | None,
        threads: int | None,
        precision: str,
        cache_dir: Path | None,
        initializers: dict[str, np.ndarray] | None = None,
        on_failure: Callable[[], Any] | None = None,
    ) -> None:
        super().__init__()
        if openvino_version() is None:
            raise EngineUnavailable("the openvino package is not installed (pip install 'sd-onnx[openvino]')")
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r} (known: {', '.join(PRECISIONS)})")
        self.name = model_file.parent.name
        self.file = model_file
        self.info = info
        self._initializers = initializers or {}
        self.config: dict[str, str] = {}
        if threads:
            self.config["INFERENCE_NUM_THREADS"] = str(threads)
        if precision != "auto":
            self.config["INFERENCE_PRECISION_HINT"] = precision
        self._blobs = BlobCache(cache_dir, info, self.config) if cache_dir and info and not initializers else None
        # Held only where it cannot be read again cheaply or must be checked now: LoRA mixes, folders without a
        # manifest (the signature comes from the graph); else read per compile and dropped.
        self._model = self._read() if initializers or info is None else None
        self.input_specs = {i.name: i for i in info.inputs} if info else {}
        if info is not None:
            self.graph_inputs = {i.name: GraphInput(i.name, ONNX_TYPES.get(i.dtype, "tensor(float)"), i.shape)
                                 for i in info.inputs}  # fmt: skip
            self.output_names = [o.name for o in info.outputs]
        else:
            self.graph_inputs = {port.get_any_name(): _graph_input(port) for port in self._model.inputs}
            self.output_names = [port.get_any_name() for port in self._model.outputs]
        self._compiled: OrderedDict[tuple, Any] = OrderedDict()
        self._lock = threading.Lock()  # server workers may share a pipeline: one compile per shape, one cache
        self._on_failure = on_failure
        self._fallback: Any = None
        if self._blobs:
            self._load_newest()

    def _load_newest(self) -> None:
        """Map the most recently used compiled shapes now, as onnxruntime loads at session creation: the first call
        at that size then starts at once (SD 1.5 int8 UNet: 2.4 s of mapping moved out of the first step)."""
        shapes = self._blobs.newest()
        compiled, mapped = self._blobs.load(shapes) if shapes else (None, None)
        if compiled is not None:
            self._compiled[_key(shapes)] = (compiled, mapped)

    def __call__(self, **feeds: np.ndarray) -> list[np.ndarray]:
        self.checked(feeds)
        if self._fallback is not None:
            return self._fallback(**feeds)
        try:
            with self._lock:
                compiled = self._compiled_for(feeds)
        except EngineUnavailable as exc:
            if self._on_failure is None:
                raise
            with self._lock:
                if self._fallback is None:
                    LOG.warning("openvino cannot run %s (%s); running it on onnxruntime's CPU provider", self.name, exc)
                    self._fallback = self._on_failure()
                    self._compiled.clear()
            return self._fallback(**feeds)
        request = compiled.create_infer_request()
        request.infer({name: np.asarray(value, order="C") for name, value in feeds.items()})  # keeps 0-d
        return [np.array(request.get_output_tensor(i).data) for i in range(len(self.output_names))]

    def _compiled_for(self, feeds: dict[str, np.ndarray]) -> Any:
        """The model compiled for these feeds' shapes (once per shape; the least recently used dropped first)."""
        shapes = {name: list(value.shape) for name, value in sorted(feeds.items())}
        key = _key(shapes)
        if key in self._compiled:
            self._compiled.move_to_end(key)
            return self._compiled[key][0]
        while len(self._compiled) >= COMPILED_KEPT:
            self._compiled.popitem(last=False)  # freed before the next compile: one copy fewer at the peak
        compiled, mapped = self._blobs.load(shapes) if self._blobs else (None, None)
        if compiled is None:
            model = self._model or self._read()
            try:
                model.reshape(shapes)
                compiled = _core().compile_model(model, "CPU", self.config)
            except Exception as exc:  # noqa: BLE001 - OpenVINO's compile errors are RuntimeErrors of several kinds
                raise EngineUnavailable(_first_line(exc)) from exc
            del model
            if self._blobs:
                self._blobs.save(shapes, compiled)
        self._compiled[key] = (compiled, mapped)  # the mapped blob lives as long as the model compiled from it
        return compiled

    def _read(self) -> Any:
        """The graph as OpenVINO reads it, with the LoRA updates swapped in; EngineUnavailable if it cannot."""
        try:
            model = _core().read_model(str(self.file))
            if self._initializers:
                _replace_constants(model, self._initializers)
        except EngineUnavailable:
            raise
        except Exception as exc:  # noqa: BLE001 - OpenVINO raises RuntimeError subclasses and others
            raise EngineUnavailable(_first_line(exc)) from exc
        return model

    @property
    def provider(self) -> str:
        """ "OpenVINO" (or onnxruntime's provider once this graph fell back to it)."""
        return self._fallback.provider if self._fallback is not None else "OpenVINO"

    @property
    def precision(self) -> str:
        """The precision float layers run in: the compiled model's, else what the configuration asks for."""
        if self._fallback is not None:
            return "f32"
        for compiled, _ in self._compiled.values():
            return _precision_name(compiled.get_property("INFERENCE_PRECISION_HINT"))
        return self.config.get("INFERENCE_PRECISION_HINT") or default_precision()


class BlobCache:
    """Compiled models of one graph on disk, one file per input shapes (and a small JSON naming them): written once
    (atomically), mapped on load."""

    def __init__(self, folder: Path, info: ComponentInfo, config: dict[str, str]) -> None:
        # Every file of the graph, weights included (two exports of one architecture share the graph file's bytes),
        # the OpenVINO version and the settings that change what is compiled.
        settings = json.dumps([sorted(info.files.values()), info.file, openvino_version(), sorted(config.items())])
        self.folder = folder
        self.config = config  # given again on import: OpenVINO's CPU plugin applies the import's settings
        self.prefix = hashlib.sha256(settings.encode()).hexdigest()[:16]

    def path(self, shapes: Shapes) -> Path:
        key = hashlib.sha256(json.dumps(shapes, sort_keys=True).encode()).hexdigest()[:12]
        return self.folder / f"{self.prefix}-{key}.blob"

    def newest(self) -> Shapes | None:
        """The input shapes of the most recently used compiled file, the likeliest next call; None if none."""
        blobs = self._blobs()
        if not blobs:
            return None
        named = blobs[0].with_suffix(".json")
        try:
            if not named.is_file():  # not a FIFO or a device, which would block or never end
                return None
            with named.open("rb") as file:
                shapes = json.loads(file.read(MAX_SHAPES_BYTES))
        except (OSError, ValueError, RecursionError):
            return None
        valid = isinstance(shapes, dict) and all(
            isinstance(k, str) and isinstance(v, list) and all(type(d) is int and 0 <= d < 2**31 for d in v)
            for k, v in shapes.items()
        )
        return shapes if valid and self.path(shapes) == blobs[0] else None

    def load(self, shapes: Shapes) -> tuple[Any, Any]:
        """The compiled model for `shapes` imported from its file, and the file's mapping, which the model may read
        from and must outlive it; (None, None) when there is none or it is unusable (then compiled anew).

        The import copies the weights it keeps (repacked for the kernels), so the mapped pages are handed back
        right after: SD 1.5's int8 UNet holds 1.2 GB instead of 2.0."""
        import openvino

        path = self.path(shapes)
        if not path.is_file():
            return None, None
        try:
            with path.open("rb") as file:  # copy-on-write: the file itself is never changed
                mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)
            data = np.frombuffer(mapped, dtype=np.uint8)
            compiled = _core().import_model(openvino.Tensor(data, shared_memory=True), "CPU", self.config)
            # A port has several tensor names (the graph's input and names its compiler gave it): match any.
            inputs = {name: list(port.get_partial_shape().to_shape()) for port in compiled.inputs
                      for name in port.get_names()}  # fmt: skip
            ports = len(compiled.inputs)
        except Exception as exc:  # noqa: BLE001 - a truncated or foreign blob: compile instead
            LOG.info("openvino: cached %s unusable (%s); compiling", path.name, _first_line(exc))
            return None, None
        if ports != len(shapes) or any(inputs.get(name) != shape for name, shape in shapes.items()):
            # another graph's or size's file put in this one's place
            LOG.info("openvino: cached %s is for other inputs; compiling", path.name)
            return None, None
        if hasattr(mapped, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
            mapped.madvise(mmap.MADV_DONTNEED)  # what is read again comes back from the file
        with contextlib.suppress(OSError):  # a shared cache may hold files of another user
            os.utime(path)  # most recently used: the last to be pruned
        return compiled, (mapped, data)

    def save(self, shapes: Shapes, compiled: Any) -> None:
        """Write the compiled model (a partial file renamed when complete); an unwritable cache is skipped."""
        path = self.path(shapes)
        partial = path.with_suffix(f".{os.getpid()}.partial")
        try:
            path.with_suffix(".json").write_text(json.dumps(shapes))
            stream = io.BytesIO()
            compiled.export_model(stream)
            partial.write_bytes(stream.getbuffer())
            partial.replace(path)
        except Exception as exc:  # noqa: BLE001 - a full disk or an export OpenVINO refuses: run uncached
            LOG.info("openvino: cannot cache %s (%s)", path.name, _first_line(exc))
            partial.unlink(missing_ok=True)
            return
        for old in self._blobs()[BLOBS_KEPT:]:
            with contextlib.suppress(OSError):  # another user's file in a shared cache stays
                old.unlink(missing_ok=True)
                old.with_suffix(".json").unlink(missing_ok=True)

    def _blobs(self) -> list[Path]:
        """This graph's compiled files, most recently used first."""
        found = []
        for blob in self.folder.glob(f"{self.prefix}-*.blob"):
            try:
                found.append((blob.stat().st_mtime, blob))
            except OSError:  # removed meanwhile by another process's pruning
                continue
        return [blob for _, blob in sorted(found, reverse=True)]


def _key(shapes: Shapes) -> tuple:
    return tuple((name, tuple(shape)) for name, shape in sorted(shapes.items()))


def _graph_input(port: Any) -> GraphInput:
    return GraphInput(
        port.get_any_name(),
        ONNX_TYPES.get(OPENVINO_DTYPES.get(port.get_element_type().get_type_name(), ""), "tensor(float)"),
        [d.get_length() if d.is_static else None for d in port.get_partial_shape()],
    )


def _replace_constants(model: Any, initializers: dict[str, np.ndarray]) -> None:
    """Swap the constants named like `initializers` (OpenVINO's ONNX reader names each after its initializer) for
    the given arrays, in the constant's own element type; a name not found is an EngineUnavailable, so a LoRA is
    never dropped silently."""
    from openvino import op

    found = {c.get_friendly_name(): c for c in model.get_ops() if c.get_type_name() == "Constant"}
    missing = sorted(set(initializers) - set(found))
    if missing:
        raise EngineUnavailable(f"no constant named {missing[0]!r} for a LoRA update ({len(missing)} missing)")
    for name, weight in initializers.items():
        old = found[name]
        shape = list(old.get_output_shape(0))
        if shape != list(weight.shape):
            raise EngineUnavailable(f"LoRA update of {name!r} has shape {list(weight.shape)}, the graph's {shape}")
        new = op.Constant(np.ascontiguousarray(weight.astype(old.get_data().dtype)))
        new.set_friendly_name(name)
        for target in old.output(0).get_target_inputs():
            target.replace_source_output(new.output(0))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _precision_name(value: Any) -> str:
    """ "bf16", "f32" or "f16" from OpenVINO's element type (or its string)."""
    name = value.to_string() if hasattr(value, "to_string") else str(value)
    return {"bfloat16": "bf16", "float32": "f32", "float16": "f16"}.get(name.lower(), name.lower())
