"""Sessions: the engine and execution provider each graph runs on (onnxruntime, or OpenVINO where chosen), session
options, the optimized-graph cache, input checks."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import hashlib
import logging
import os
import re
import sys
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .echo import echo
from .graph import GraphModel
from .manifest import TRANSFORMER_FAMILIES, ComponentInfo
from .openvino_engine import PRECISIONS, EngineUnavailable, OpenVinoModel, default_precision, openvino_version

LOG = logging.getLogger("sd_onnx")
CPU = "CPUExecutionProvider"
# sd-onnx's own OpenVINO engine (openvino_engine.py), named like a provider so that a pipeline's sessions are chosen
# in one place; onnxruntime's OpenVINO execution provider keeps its own name ("OpenVINOExecutionProvider").
OPENVINO = "OpenVINO"
AUTO_OPENVINO_COMPONENTS = ("unet",)  # see auto_openvino_components
AUTO_OPENVINO_FLAGS = ("amx_int8", "avx512_bf16")
AMX_FLAG = "amx_bf16"

PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "dml": "DmlExecutionProvider",
    "directml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "openvino": OPENVINO,
}
OPTIMIZATION_LEVELS = {
    "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
AUTO_ORDER = ("CUDAExecutionProvider", "DmlExecutionProvider", "CoreMLExecutionProvider")
CACHE_ENV = "SD_ONNX_CACHE"
# "0": `auto` never picks OpenVINO (the same engine on every CPU class: reproducible pixels, no compile step).
AUTO_OPENVINO_ENV = "SD_ONNX_AUTO_OPENVINO"


def cache_root() -> Path:
    """Where optimized graphs are kept: $SD_ONNX_CACHE, else `user_cache_dir()`. Never the model folder, which
    may be read-only or inside the installed package."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return user_cache_dir()


def user_cache_dir() -> Path:
    """sd-onnx's folder in the platform's user cache directory ($XDG_CACHE_HOME or ~/.cache on Linux,
    ~/Library/Caches on macOS, %LOCALAPPDATA% on Windows)."""
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
        return base / "sd-onnx" / "Cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "sd-onnx"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sd-onnx"


def resolve_providers(provider: str) -> list[str]:
    """Provider list for a short name ("cpu", "cuda", "dml", "coreml", "openvino", "auto") or a raw onnxruntime name.

    "auto" takes a GPU provider when onnxruntime has one, else OpenVINO where `auto_openvino_components()` names
    any (for those components only, see `open_model`), else the CPU provider. "openvino:f32" / "openvino:bf16"
    name OpenVINO with a precision (see `split_provider`). An unavailable provider falls back to CPU with a
    warning; an unknown one is a ValueError.
    """
    provider, _ = split_provider(provider)
    available = ort.get_available_providers()
    if provider == "auto":
        chosen = next((p for p in AUTO_ORDER if p in available), OPENVINO if auto_openvino_components() != () else CPU)
    elif PROVIDER_ALIASES.get(provider.lower()) == OPENVINO:
        chosen = OPENVINO
        if openvino_version() is None:
            warnings.warn(
                "openvino is not installed (pip install 'sd-onnx[openvino]'); falling back to CPU",
                stacklevel=2,
            )
            chosen = CPU
    else:
        chosen = PROVIDER_ALIASES.get(provider.lower(), provider)
        if chosen not in ort.get_all_providers():
            known = ", ".join([*PROVIDER_ALIASES, "auto"])
            raise ValueError(f"unknown provider {provider!r} (known: {known}, or an onnxruntime provider name)")
        if chosen not in available:
            warnings.warn(f"{chosen} is not available in this onnxruntime build; falling back to CPU", stacklevel=2)
            chosen = "CPUExecutionProvider"
    return [chosen] if chosen == CPU else [chosen, CPU]


def split_provider(provider: str) -> tuple[str, str | None]:
    """("openvino", "f32") for "openvino:f32": the CLI's, server's and batch's one string for engine and precision;
    (provider, None) for any name without a precision. ValueError for a precision other than PRECISIONS'."""
    if not isinstance(provider, str):
        raise ValueError(f"provider must be a string, got {type(provider).__name__}")
    name, sep, precision = provider.partition(":")
    if not sep:
        return provider, None
    precision = precision.lower()
    if PROVIDER_ALIASES.get(name.lower()) != OPENVINO:
        raise ValueError(f"provider {provider!r}: only openvino takes a precision (openvino:{'|'.join(PRECISIONS)})")
    if precision not in PRECISIONS:
        raise ValueError(f"provider {provider!r}: unknown precision {precision!r} (known: {', '.join(PRECISIONS)})")
    return name, precision


def auto_openvino_components(family: str = "sd") -> tuple[str, ...] | None:
    """The component folders "auto" runs on OpenVINO here for a model of `family` (config.family), the rest on
    onnxruntime's CPU provider: every graph (None) of a UNet model where OpenVINO is installed and the CPU has AMX,
    the UNet's graphs where it has AVX-512 bf16 without AMX, else none (an empty tuple). Transformer families
    (SD3, FLUX, SANA, Z-Image) stay on onnxruntime: their bf16-stored and weight-only int8 graphs were measured
    there only. $SD_ONNX_AUTO_OPENVINO=0 keeps everything on onnxruntime.

    Measured (docs/performance.md; SD 1.5 int8, 512x512, 2 threads). On a Xeon with AMX, OpenVINO is faster on
    every graph: UNet step 0.46x onnxruntime's, text encoder 0.33x, int8 decoder 0.87x, and the float decoder an
    int8 export keeps (vae.choose_decoder) 0.46x the int8 one on onnxruntime; 20 steps end to end with every
    graph on OpenVINO took 0.94x the UNet and float decoder alone on it. On an AMD Zen with AVX-512 bf16 but no
    AMX the UNet step takes 0.79x, but the int8 decoder on onnxruntime wins (2.44 s against 3.52 s int8 and
    3.16 s float on OpenVINO). On AVX2-only CPUs OpenVINO was no faster in fp32 and slower in int8."""
    flags = cpu_flags()
    if os.environ.get(AUTO_OPENVINO_ENV) == "0" or openvino_version() is None or not set(AUTO_OPENVINO_FLAGS) & flags:
        return ()
    return None if AMX_FLAG in flags and family not in TRANSFORMER_FAMILIES else AUTO_OPENVINO_COMPONENTS


def runs_on_openvino(config: SessionConfig, component: str) -> bool:
    """Whether `open_model` puts `component`'s folder on OpenVINO under `config` (before any fallback)."""
    placed = config.openvino_components
    return config.providers[0] == OPENVINO and (placed is None or component in placed)


def openvino_placement(provider: str, family: str = "sd") -> tuple[str, ...] | None:
    """The components of a `family` model to run on OpenVINO for `provider`: "auto"'s measured choice, or None
    (every graph) when OpenVINO is named."""
    return auto_openvino_components(family) if split_provider(provider)[0] == "auto" else None


def ort_version() -> str:
    return ort.__version__


def describe_engines() -> dict[str, str]:
    """One line per engine for `sd-run info` and reports: version, what it can run here, and what "auto" picks."""
    lines = {"onnxruntime": f"{ort.__version__} ({', '.join(ort.get_available_providers())})"}
    version = openvino_version()
    if version is None:
        lines["openvino"] = "not installed (pip install 'sd-onnx[openvino]')"
    else:
        lines["openvino"] = f"{version} (CPU; float layers in {default_precision()} unless openvino:f32)"
    chosen, placed = resolve_providers("auto")[0], auto_openvino_components()
    if chosen == OPENVINO:
        flags = ", ".join(sorted({*AUTO_OPENVINO_FLAGS, AMX_FLAG} & cpu_flags()))
        where = "every graph" if placed is None else f"{', '.join(placed)}, {CPU} for the rest"
        lines["auto"] = f"OpenVINO for {where} (the CPU has {flags})"
    else:
        why = (
            "a GPU provider" if chosen != CPU
            else "openvino not installed" if version is None
            else f"{AUTO_OPENVINO_ENV}=0" if os.environ.get(AUTO_OPENVINO_ENV) == "0"
            else "no AMX or bf16"
        )  # fmt: skip
        lines["auto"] = f"{chosen} ({why})"
    return lines


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (Linux); empty elsewhere."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags") and ":" in line:
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@dataclass(frozen=True)
class SessionConfig:
    """onnxruntime settings shared by a pipeline's sessions."""

    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    threads: int | None = None
    optimization: str = "all"
    cache: bool = True
    cache_dir: Path | None = None  # None: cache_root()
    # One CPU arena for all sessions that ask for it (see shared_arena); else each session has its own.
    shared_arena: bool = False
    # OpenVINO only: the precision of float layers ("auto": OpenVINO's default for the CPU; see openvino_engine).
    precision: str = "auto"
    # With OpenVINO first: the component folders it runs (None: all); the others run on onnxruntime's CPU provider.
    openvino_components: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.optimization not in OPTIMIZATION_LEVELS:
            raise ValueError(
                f"unknown optimization level {self.optimization!r} (known: {', '.join(OPTIMIZATION_LEVELS)})"
            )
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r} (known: {', '.join(PRECISIONS)})")


def open_model(
    model_file: Path,
    info: ComponentInfo | None,
    config: SessionConfig,
    initializers: dict[str, np.ndarray] | None = None,
    arena: bool = True,
    lean: bool = False,
) -> OnnxModel | OpenVinoModel:
    """One component's session on the engine `config` names: OpenVINO when it comes first (for the components it is
    placed on), else onnxruntime. A graph OpenVINO cannot read or compile runs on onnxruntime's CPU provider
    instead, with one log line saying why."""
    if config.providers[0] != OPENVINO:
        return OnnxModel(model_file, info, config, initializers, arena, lean)
    on_cpu = replace(config, providers=config.providers[1:] or (CPU,))
    if not runs_on_openvino(config, model_file.parent.name):
        return OnnxModel(model_file, info, on_cpu, initializers, arena, lean)

    def fallback() -> OnnxModel:
        return OnnxModel(model_file, info, on_cpu, initializers, arena, lean)

    try:
        cache = _openvino_cache(config)
        return OpenVinoModel(model_file, info, config.threads, config.precision, cache, initializers, fallback)
    except EngineUnavailable as exc:
        LOG.warning(
            "openvino cannot run %s (%s); running it on onnxruntime's CPU provider",
            model_file.parent.name,
            exc,
        )
        return fallback()


def _openvino_cache(config: SessionConfig) -> Path | None:
    """Where OpenVINO keeps compiled models (beside the optimized onnxruntime graphs); None when off or when it
    cannot be made. A read-only one is still read (writes to it are skipped, see BlobCache.save)."""
    if not config.cache:
        return None
    folder = (config.cache_dir or cache_root()) / "openvino"
    with contextlib.suppress(OSError):
        folder.mkdir(parents=True, exist_ok=True)
    return folder if folder.is_dir() else None


# A failing run is raised as GraphRunError, its message in one line: onnxruntime's own log of it is not printed too.
QUIET_RUN = ort.RunOptions()
QUIET_RUN.log_severity_level = 4


class GraphRunError(RuntimeError):
    """A graph that loaded failed while running (most often memory for a large size): one line saying which."""


def run_failure(exc: Exception) -> str:
    """onnxruntime's run error in short: the node and its status message, without the source location and C++
    signature it carries ("... Status Message: /onnxruntime_src/...cc:360 void* ...(size_t, ...) Failed to ...")."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    node = re.search(r"running (\w+) node\. Name:'([^']*)'", text)
    _, _, status = text.partition("Status Message: ")
    status = re.sub(r"^\S+\.(?:cc|h|cpp):\d+ (?:[^()]*\([^()]*\)\S* )?", "", status) or text
    if "Failed to allocate memory" in status:
        status += ": out of memory (a smaller size or batch needs less)"
    where = f"{node.group(1)} node {node.group(2)}: " if node else ""
    return echo(where + status, 300).strip("'\"")


def lean_options(options: ort.SessionOptions) -> None:
    """Options that hold little beyond a graph's memory-mapped weights: no graph optimization (constant folding
    would widen every bf16-stored weight at load), no prepacking (a copy of every weight), no arena or memory
    pattern, and nodes in the graph's order, so that a weight stored bf16 is widened by its Cast just before its
    use and freed after."""
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.add_session_config_entry("session.disable_prepacking", "1")
    options.enable_cpu_mem_arena = options.enable_mem_pattern = False
    options.execution_order = ort.ExecutionOrder.PRIORITY_BASED


class OnnxModel(GraphModel):
    """One component's onnxruntime session; checks feeds against the manifest's signature before running."""

    def __init__(
        self,
        model_file: Path,
        info: ComponentInfo | None,
        config: SessionConfig,
        initializers: dict[str, np.ndarray] | None = None,
        arena: bool = True,
        lean: bool = False,
    ) -> None:
        """`initializers` replace the graph's initializers of those names (load-time LoRAs, see lora.py); the
        optimized-graph cache is then skipped, since it would bake them in under another key, optimization stops
        at "extended" and constant folding is off. `arena=False` allocates every tensor on its own, so memory goes
        back as soon as a tensor dies (slower; for one-shot graphs whose activations dwarf their weights): no
        arena, no buffer reuse (onnxruntime's plan would keep a dead tensor's buffer for a later tensor and so hold
        it meanwhile) and large blocks mapped on their own (see map_large_blocks). SD 1.5's int8 VAE decoder at
        512x512: 0.87 -> 0.40 GB working memory, 4 -> 7 s.

        A graph whose weights are stored bf16 behind Casts (`sd-export --trace-dtype bf16`, the manifest's
        narrow_weights) is never cached optimized: onnxruntime folds the Casts into fp32 copies, and saving that
        held both (SANA-Sprint's 2.6 B-parameter Gemma: first load 48 s at a 16.3 GB peak, 8.7 GB more disk, and
        24 s to load from the cache against 18 s to fold again). `lean` runs such a graph unfolded instead, as the
        exporter validates it (lean_options): each Cast just before its use, the weights memory-mapped (that Gemma: load
        0.2 s, a call 5.4 s, peak 7.4 GB against 18 s, 11.6 s and 11.2 GB folded; later calls 4.6 s against 2.9)."""
        super().__init__()
        self.name = model_file.parent.name
        self.info = info
        if info is not None and info.precision == "fp16" and config.providers[0] == "CPUExecutionProvider":
            warnings.warn(
                f"{self.name} is fp16, which the CPU provider runs through casts (slower than fp32); "
                "on CPUs use an fp32 or int8 export",
                stacklevel=2,
            )
        options = ort.SessionOptions()
        options.log_severity_level = 3
        # A memory pattern makes the arena allocate a second, planned block after the first run and keep both:
        # 1.8 -> 1.4 GB for SD 1.5's int8 UNet at 512x512, at the same speed (benchmarks/results/peak_memory.json).
        options.enable_mem_pattern = False
        on_cpu = config.providers[0] == "CPUExecutionProvider"
        if not arena:
            options.enable_cpu_mem_arena = False
            options.enable_mem_reuse = False
            map_large_blocks()
        elif config.shared_arena and on_cpu:
            shared_arena()
            options.add_session_config_entry("session.use_env_allocators", "1")
        options.graph_optimization_level = OPTIMIZATION_LEVELS[config.optimization]
        if lean:
            lean_options(options)
        if config.threads:
            options.intra_op_num_threads = config.threads
        disabled = []
        if initializers:
            # Rewrites that copy a weight into a new tensor before overrides apply would silently drop them:
            # "all"'s layout changes (NCHWc convolutions, fp16 casts on CPU) and constant folding (the sliced
            # halves of a GEGLU projection).
            level = min(options.graph_optimization_level, OPTIMIZATION_LEVELS["extended"], key=int)
            options.graph_optimization_level, disabled = level, ["ConstantFolding"]
        # onnxruntime reads the overrides' memory for the session's lifetime: keep them referenced.
        self._overrides = [ort.OrtValue.ortvalue_from_numpy(w) for w in (initializers or {}).values()]
        for name, value in zip(initializers or {}, self._overrides, strict=True):
            options.add_initializer(name, value)
        path = model_file
        if config.cache and not initializers and info is not None and on_cpu and not info.narrow_weights and not lean:
            path = _cached_graph(model_file, info, options, config.cache_dir or cache_root())
        try:
            self.session = ort.InferenceSession(
                str(path), options, providers=list(config.providers), disabled_optimizers=disabled
            )
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises several types for unreadable graphs
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(f"{self.name}: cannot load {model_file} ({first})") from exc
        if options.optimized_model_filepath:  # the optimized graph is complete only now: publish it
            partial = Path(options.optimized_model_filepath)
            partial.replace(partial.with_name(partial.name.replace(".partial", "")))
        self.input_specs = {i.name: i for i in info.inputs} if info else {}
        self.graph_inputs = {i.name: i for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __call__(self, **feeds: np.ndarray) -> list[np.ndarray]:
        self.checked(feeds)
        try:
            return self.session.run(None, feeds, QUIET_RUN)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types (Fail, RuntimeException, ...)
            raise GraphRunError(f"{self.name}: onnxruntime could not run the graph ({run_failure(exc)})") from exc

    @property
    def provider(self) -> str:
        """The execution provider that runs this graph first (CPU fallback comes after)."""
        return self.session.get_providers()[0]


@functools.cache
def shared_arena() -> None:
    """Register the process's shared CPU arena (once). Sessions run one after another, so sharing it makes a
    pipeline's working memory the largest graph's rather than the sum of all (SD 1.5 int8 at 512x512: the UNet's
    0.5 GB and the VAE decoder's 1 GB; benchmarks/results/peak_memory.json)."""
    cpu = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    ort.create_and_register_allocator(cpu, ort.OrtArenaCfg({}))


@functools.cache
def map_large_blocks() -> None:
    """Have glibc's malloc map every block of 1 MiB or more on its own, so that it goes back to the OS when freed.

    glibc otherwise serves blocks up to 32 MiB from its heap, where a freed block below a live one stays resident:
    without an arena, a VAE decoder's many freed tensors then held 2.9 GB at once. The setting is process-wide
    and made once, by the first session that runs without an arena (low-memory mode)."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD


def return_freed_memory() -> None:
    """Hand memory freed by released sessions back to the OS (glibc keeps it for reuse otherwise); no-op elsewhere."""
    gc.collect()
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """glibc on Linux; None elsewhere and for other C libraries (musl has no malloc_trim)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


def _cached_graph(model_file: Path, info: ComponentInfo, options: ort.SessionOptions, root: Path) -> Path:
    """Path to load: the optimized graph saved by an earlier load, or the original while saving one.

    The cache key is the model's hash and the onnxruntime version, so a changed model or runtime
    never reuses a stale graph. An unwritable cache directory simply skips the cache.
    """
    # Every file of the graph, weights included: two exports of one architecture share the graph file's bytes.
    digest = hashlib.sha256("".join(sorted(info.files.values())).encode()).hexdigest()[:16]
    cache_dir = root / "optimized"
    cached = cache_dir / f"{digest}-ort{ort.__version__}-level{int(options.graph_optimization_level)}.onnx"
    if cached.is_file():
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        return cached
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError:
        return model_file
    if os.access(cache_dir, os.W_OK):
        options.optimized_model_filepath = str(cached.with_suffix(".partial.onnx"))
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", cached.name + "_data"
        )
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    return model_file
