"""`sd-export upscaler FILE OUT`: an ESRGAN / Real-ESRGAN checkpoint (.pth or .safetensors) to a validated ONNX
folder: `model.onnx` (height and width dynamic) and `upscaler.json` (runtime/upscaler_manifest.py).

The checkpoint is untrusted: a .pth is a pickle, so it is read with `torch.load(weights_only=True)` only, which
refuses any object that is not tensors and plain containers; a .safetensors file goes through the runtime's
bounded, schema-checked reader. The graph is traced like the pipeline's components (trace.py) and compared with
the PyTorch module on a seeded random image (validate.py).
"""

from __future__ import annotations

import gc
import pickle
import time
import warnings
import zipfile
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sd_onnx.runtime.files import UntrustedFileError, regular_file
from sd_onnx.runtime.lora import read_safetensors
from sd_onnx.runtime.manifest import TensorSpec, sha256_file
from sd_onnx.runtime.upscaler_manifest import UpscalerManifest

from .atomic import publish, staging_folder
from .components import ComponentSpec
from .errors import ExportError
from .trace import pack_graph, trace_component
from .upscaler_arch import Architecture, from_state_dict
from .upscaler_int8 import quantize_upscaler
from .validate import compare_outputs, open_session, signature

Log = Callable[[str], None]
MAX_CHECKPOINT_BYTES = 4 << 30  # the largest ESRGAN-class files are about 70 MB
DEFAULT_TILE, DEFAULT_OVERLAP = 192, 16  # A1111's ESRGAN tile size; its overlap is 8, ours blends over 16
TRACE_SIZE, CHECK_SIZE = (32, 32), (40, 48)  # (height, width); different, so the dynamic axes are exercised
GRAPH = "model.onnx"
SPEC = ComponentSpec(
    "upscaler",
    ("image",),
    ("upscaled",),
    {"image": {0: "batch", 2: "height", 3: "width"}, "upscaled": {0: "batch", 2: "out_height", 3: "out_width"}},
    load=lambda folder: None,  # the module comes from the checkpoint, not from a pipeline folder
    sample_inputs=lambda source, batch, generator: (),
)


def read_state_dict(file: Path, kind: str = "upscaler") -> dict[str, torch.Tensor]:
    """The tensors of a .pth (weights-only unpickling) or .safetensors `kind` checkpoint, unwrapped from
    Real-ESRGAN's `params_ema` / `params`; ExportError in one line for anything else."""
    file = Path(file).expanduser()
    try:
        size = regular_file(file, "checkpoint").st_size
        if size > MAX_CHECKPOINT_BYTES:
            raise ExportError(f"{file}: {size / 2**30:.1f} GiB, larger than an upscaler checkpoint can be")
        if file.suffix == ".safetensors":
            tensors, _ = read_safetensors(file)
            state: Any = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in tensors.items()}
        elif file.suffix in (".pth", ".pt", ".ckpt"):
            state = _unpickle_weights(file)
        else:
            raise ExportError(f"{file}: expected a .pth or .safetensors {kind} checkpoint")
    except UntrustedFileError as exc:
        raise ExportError(str(exc)) from None
    for wrapper in ("params_ema", "params", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise ExportError(f"{file}: holds no state dict of tensors")
    return {k: v.float() for k, v in state.items()}


def _unpickle_weights(file: Path) -> Any:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # notes on pickle protocols, irrelevant to a refusal
            return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ExportError(
            f"{file}: refused: not a weights-only checkpoint ({_unpickler_reason(exc)}); only tensors and plain "
            "containers are unpickled, never objects that could run code"
        ) from None
    except (RuntimeError, EOFError, ValueError, KeyError, IndexError, zipfile.BadZipFile, OSError) as exc:
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"{file}: not a readable PyTorch checkpoint ({reason})") from None


def _unpickler_reason(exc: Exception) -> str:
    """The weights-only unpickler's own reason ("Unsupported global: GLOBAL os.system"), without its advice."""
    text = str(exc)
    _, marker, rest = text.partition("WeightsUnpickler error:")
    lines = [line.strip() for line in (rest if marker else text).splitlines() if line.strip()]
    return lines[0].partition(" was not an allowed global")[0][:200] if lines else type(exc).__name__


def export_upscaler(
    file: Path,
    output: Path,
    *,
    int8: bool = False,
    tile: int = DEFAULT_TILE,
    name: str | None = None,
    opset: int = 17,
    atol: float = 1e-3,
    overwrite: bool = False,
    log: Log = print,
) -> UpscalerManifest:
    """Export the checkpoint `file` to the folder `output` (written atomically); with `int8`, the graph is
    quantized when it keeps fidelity (see upscaler_int8.py), else the fp32 graph is kept and the reason logged."""
    file, output = Path(file).expanduser(), Path(output).expanduser()
    if output.exists() and not overwrite:
        raise ExportError(f"{output} already exists (use --overwrite to replace it)")
    arch = from_state_dict(read_state_dict(file), str(file))
    if not 4 * DEFAULT_OVERLAP <= tile <= 8192 or tile % arch.input_multiple:
        raise ExportError(f"--tile: must be in 64..8192 and a multiple of {arch.input_multiple}, got {tile}")
    log(f"{file.name}: {arch.name} x{arch.scale}, {arch.hyperparameters}")
    started = time.perf_counter()
    with staging_folder(output) as staging:
        validation, inputs, outputs = _export_graph(arch, staging, opset, atol)
        log(f"exported and validated in {time.perf_counter() - started:.1f} s: max |onnx - torch| "
            f"{validation['max_abs_diff']:.2e}")  # fmt: skip
        quantization: dict[str, Any] = {}
        if int8:
            quantization = quantize_upscaler(staging / GRAPH, arch.channels, arch.input_multiple, log)
        manifest = UpscalerManifest(
            name=name or file.stem,
            architecture=arch.name,
            scale=arch.scale,
            channels=arch.channels,
            input_multiple=arch.input_multiple,
            tile=tile,
            tile_overlap=DEFAULT_OVERLAP,
            graph=GRAPH,
            sha256=sha256_file(staging / GRAPH),
            precision="int8" if quantization.get("kept") else "fp32",
            inputs=inputs,
            outputs=outputs,
            opset=opset,
            hyperparameters=arch.hyperparameters,
            source={"file": file.name, "sha256": sha256_file(file)},
            validation=validation,
            quantization=quantization,
            tools=_tool_versions(),
        )
        manifest.save(staging)
        publish(staging, output)
    log(f"wrote {output}")
    return manifest


def _export_graph(arch: Architecture, folder: Path, opset: int, atol: float) -> tuple[dict, list, list]:
    """Trace the module into `folder/model.onnx` and compare it with PyTorch on a seeded random image."""
    m = arch.input_multiple
    trace = torch.rand(1, arch.channels, *(s // m * m for s in TRACE_SIZE), generator=torch.Generator().manual_seed(0))
    check = torch.rand(1, arch.channels, *(s // m * m for s in CHECK_SIZE), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = [arch.module(check).numpy()]
    traced = trace_component(arch.module, SPEC, (trace,), folder / "_trace", opset)
    gc.collect()
    pack_graph(traced, folder / GRAPH)
    session = open_session(folder / GRAPH)
    validation = compare_outputs("upscaler", session, {"image": check.numpy()}, reference, atol)
    inputs, outputs = signature(session)
    return validation, [_spec(s) for s in inputs], [_spec(s) for s in outputs]


def _spec(spec: TensorSpec) -> dict[str, Any]:
    return {"name": spec.name, "shape": spec.shape, "dtype": spec.dtype}


def _tool_versions() -> dict[str, str]:
    versions = {}
    for package in ("sd-onnx", "torch", "onnx", "onnxruntime"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "unknown"
    return versions
