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

import functools
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .manifest import ComponentInfo

LOG = logging.getLogger("sd_onnx")
PRECISIONS = ("auto", "f32", "bf16")
# Compiled shapes kept per graph: a generation alternates at most between the guided and the unguided batch
# (guidance interval); each compiled model holds its own repacked weights, so no more than that.
COMPILED_KEPT = 2
ONNX_TYPES = {"f32": "tensor(float)", "i64": "tensor(int64)", "i32": "tensor(int32)", "f16": "tensor(float16)"}


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


class OpenVinoModel:
    """One component compiled by OpenVINO's CPU plugin; same call, checks and observers as `OnnxModel`.

    `initializers` (load-time LoRAs) replace the graph's constants of those names before compiling; such a graph
    is not cached on disk (its weights are one LoRA mix). `on_failure` builds the onnxruntime session that takes
    over when a shape cannot be compiled at call time (an operator OpenVINO reads but cannot compile)."""

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
        from .session import check_input  # session imports this module lazily; the reverse is safe

        if openvino_version() is None:
            raise EngineUnavailable("the openvino package is not installed (pip install 'sd-onnx[openvino]')")
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r} (known: {', '.join(PRECISIONS)})")
        self.name = model_file.parent.name
        self.info = info
        self._check = check_input
        try:
            self.model = _core().read_model(str(model_file))
            if initializers:
                _replace_constants(self.model, initializers)
        except Exception as exc:  # noqa: BLE001 - OpenVINO raises RuntimeError subclasses and others
            raise EngineUnavailable(_first_line(exc)) from exc
        self.config: dict[str, str] = {}
        if threads:
            self.config["INFERENCE_NUM_THREADS"] = str(threads)
        if precision != "auto":
            self.config["INFERENCE_PRECISION_HINT"] = precision
        if cache_dir is not None and not initializers:
            self.config["CACHE_DIR"] = str(cache_dir)
        self.input_specs = {i.name: i for i in info.inputs} if info else {}
        self.graph_inputs = {
            port.get_any_name(): GraphInput(
                port.get_any_name(),
                ONNX_TYPES.get(port.get_element_type().get_type_name(), "tensor(float)"),
                [d.get_length() if d.is_static else None for d in port.get_partial_shape()],
            )
            for port in self.model.inputs
        }
        self.output_names = [port.get_any_name() for port in self.model.outputs]
        self.observers: list[Callable[[dict[str, np.ndarray]], None]] = []
        self._compiled: OrderedDict[tuple, Any] = OrderedDict()
        self._on_failure = on_failure
        self._fallback: Any = None

    def __call__(self, **feeds: np.ndarray) -> list[np.ndarray]:
        for name, value in feeds.items():
            if name in self.input_specs:
                self._check(self.name, self.input_specs[name], value)
        for observe in self.observers:
            observe(feeds)
        if self._fallback is not None:
            return self._fallback(**feeds)
        try:
            compiled = self._compiled_for(feeds)
        except EngineUnavailable as exc:
            if self._on_failure is None:
                raise
            LOG.warning("openvino cannot compile %s (%s); running it on onnxruntime's CPU provider", self.name, exc)
            self._fallback = self._on_failure()
            self._compiled.clear()
            return self._fallback(**feeds)
        request = compiled.create_infer_request()
        request.infer({name: np.asarray(value, order="C") for name, value in feeds.items()})  # keeps 0-d
        return [np.array(request.get_output_tensor(i).data) for i in range(len(self.output_names))]

    def _compiled_for(self, feeds: dict[str, np.ndarray]) -> Any:
        """The model compiled for these feeds' shapes (compiled once per shape; the oldest dropped first)."""
        key = tuple(sorted((name, value.shape) for name, value in feeds.items()))
        if key in self._compiled:
            self._compiled.move_to_end(key)
            return self._compiled[key]
        while len(self._compiled) >= COMPILED_KEPT:
            self._compiled.popitem(last=False)  # freed before the next compile: one copy fewer at the peak
        try:
            self.model.reshape({name: list(value.shape) for name, value in feeds.items()})
            self._compiled[key] = _core().compile_model(self.model, "CPU", self.config)
        except Exception as exc:  # noqa: BLE001 - OpenVINO's compile errors are RuntimeErrors of several kinds
            raise EngineUnavailable(_first_line(exc)) from exc
        return self._compiled[key]

    @property
    def provider(self) -> str:
        """ "OpenVINO" (or onnxruntime's provider once this graph fell back to it)."""
        return self._fallback.provider if self._fallback is not None else "OpenVINO"

    @property
    def precision(self) -> str:
        """The precision float layers run in: the compiled model's, else what the configuration asks for."""
        if self._fallback is not None:
            return "f32"
        for compiled in self._compiled.values():
            return _precision_name(compiled.get_property("INFERENCE_PRECISION_HINT"))
        return self.config.get("INFERENCE_PRECISION_HINT") or default_precision()

    def input_dtype(self, name: str, default: type = np.float32) -> type:
        arg = self.graph_inputs.get(name)
        return {"tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(float)": np.float32}.get(
            arg.type if arg else "", default
        )

    def input_rank(self, name: str) -> int:
        return len(self.graph_inputs[name].shape)


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
