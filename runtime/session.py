"""onnxruntime sessions: execution provider choice, session options, optimized-graph cache, input checks."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .manifest import ComponentInfo, TensorSpec

PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "dml": "DmlExecutionProvider",
    "directml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
}
AUTO_ORDER = ("CUDAExecutionProvider", "DmlExecutionProvider", "CoreMLExecutionProvider")
CACHE_DIR = ".ort_cache"


def resolve_providers(provider: str) -> list[str]:
    """onnxruntime provider list for a short name ("cpu", "cuda", "dml", "coreml", "auto") or a raw name.

    An unavailable provider falls back to CPU with a warning; an unknown one is a ValueError.
    """
    available = ort.get_available_providers()
    if provider == "auto":
        chosen = next((p for p in AUTO_ORDER if p in available), "CPUExecutionProvider")
    else:
        chosen = PROVIDER_ALIASES.get(provider.lower(), provider)
        if chosen not in ort.get_all_providers():
            known = ", ".join([*PROVIDER_ALIASES, "auto"])
            raise ValueError(f"unknown provider {provider!r} (known: {known}, or an onnxruntime provider name)")
        if chosen not in available:
            warnings.warn(f"{chosen} is not available in this onnxruntime build; falling back to CPU", stacklevel=2)
            chosen = "CPUExecutionProvider"
    return [chosen] if chosen == "CPUExecutionProvider" else [chosen, "CPUExecutionProvider"]


class OnnxModel:
    """One component's session; checks feeds against the manifest's signature before running."""

    def __init__(
        self,
        model_file: Path,
        info: ComponentInfo | None,
        providers: list[str],
        threads: int | None = None,
        cache: bool = True,
    ) -> None:
        self.name = model_file.parent.name
        self.info = info
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        path = model_file
        if cache and info is not None and providers[0] == "CPUExecutionProvider":
            path = _cached_graph(model_file, info, options)
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises several types for unreadable graphs
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(f"{self.name}: cannot load {model_file} ({first})") from exc
        if options.optimized_model_filepath:  # the optimized graph is complete only now: publish it
            partial = Path(options.optimized_model_filepath)
            partial.replace(partial.with_name(partial.name.replace(".partial", "")))
        self.input_specs = {i.name: i for i in info.inputs} if info else {}
        self.input_types = {i.name: i.type for i in self.session.get_inputs()}

    def __call__(self, **feeds: np.ndarray) -> list[np.ndarray]:
        for name, value in feeds.items():
            if name in self.input_specs:
                _check(self.name, self.input_specs[name], value)
        return self.session.run(None, feeds)

    def accepts(self, name: str) -> str | None:
        """The onnxruntime type string of input `name`, or None if the graph has no such input."""
        return self.input_types.get(name)


def _check(component: str, spec: TensorSpec, value: np.ndarray) -> None:
    if str(value.dtype) != spec.dtype:
        raise ValueError(f"{component}: input {spec.name} must be {spec.dtype}, got {value.dtype}")
    if value.ndim != len(spec.shape) or any(
        isinstance(d, int) and d != s for d, s in zip(spec.shape, value.shape, strict=True)
    ):
        raise ValueError(f"{component}: input {spec.name} must have shape {spec.shape}, got {list(value.shape)}")


def _cached_graph(model_file: Path, info: ComponentInfo, options: ort.SessionOptions) -> Path:
    """Path to load: the optimized graph saved by an earlier load, or the original while saving one.

    The cache key is the model's hash and the onnxruntime version, so a changed model or runtime
    never reuses a stale graph. A read-only model folder simply skips the cache.
    """
    digest = info.files[info.file][:16]
    cache_dir = model_file.parent / CACHE_DIR
    cached = cache_dir / f"{digest}-ort{ort.__version__}.onnx"
    if cached.is_file():
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        return cached
    try:
        cache_dir.mkdir(exist_ok=True)
    except OSError:
        return model_file
    if os.access(cache_dir, os.W_OK):
        options.optimized_model_filepath = str(cached.with_suffix(".partial.onnx"))
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", cached.name + "_data"
        )
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    return model_file
