"""int8 quantization: static QDQ with onnxruntime's quantization tools, one recipe per component.

What the recipes encode (measured, see docs/performance.md and benchmarks/results): Conv and the weight
MatMuls/Gemms are quantized (u8 activations, s8 per-channel weights) because onnxruntime has fast
QLinearConv and QLinearMatMul kernels for them; the attention core (fused at export into
MultiHeadAttention, or left as activation x activation MatMuls and Softmax with --no-optimize) stays
float, because quantizing it costs more in (de)quantization than it saves; dynamic quantization is never
used (ConvInteger has no fast kernel). The text encoder stays fp32: it runs once per image and
conditions everything after it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from sd_onnx.runtime.manifest import ComponentInfo, sha256_file

from .calibrate import FeedReader, record_ranges, structure_with_types
from .errors import ExportError
from .optimize import quantize_before_concat
from .trace import EXTERNAL_DATA_SUFFIX, TWO_GB, pack_graph
from .validate import open_session


@dataclass(frozen=True)
class Recipe:
    """Which operators of a component get int8, and how they are calibrated."""

    op_types: tuple[str, ...]
    weight_matmuls_only: bool = True
    per_channel: bool = True
    calibration: str = "minmax"
    keep_float: tuple[str, ...] = ()  # node-name substrings left in float (sensitive layers)
    # Op types whose int8 outputs are not requantized: onnxruntime then runs DQ -> MatMul as
    # MatMulIntegerToFloat (int8 GEMM, float result), saving a quantize and a dequantize per projection
    # (SD 1.5 UNet step 0.95x, closer to fp32; measured in one process, same calibration ranges).
    float_outputs: tuple[str, ...] = ("MatMul", "Gemm")
    # Quantize the slices of a chunked group norm before their Concat (see optimize.chunk_group_norms).
    quantize_slices: bool = False


RECIPES: dict[str, Recipe] = {
    "unet": Recipe(op_types=("Conv", "MatMul", "Gemm")),  # Gemm: the time-embedding projections (100 MB fp32)
    "vae_decoder": Recipe(op_types=("Conv",), keep_float=("conv_in", "conv_out"), quantize_slices=True),
    "vae_encoder": Recipe(op_types=("Conv",), keep_float=("conv_in", "conv_out"), quantize_slices=True),
}
CALIBRATION = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile}
# Graphs above this take the memory-lean path (see calibrate.record_ranges): onnxruntime's pre-processing and
# calibration hold a graph's weights two to three times, so SDXL's 10 GB UNet ran out of 24 GB. SD 1.5's UNet
# (3.4 GB) keeps the measured recipe with pre-processing.
LARGE_GRAPH = 4 * 2**30


def cpu_has_vnni() -> bool:
    """Whether this CPU has 8-bit dot-product instructions (else weights use 7 bits to avoid saturation)."""
    cpuinfo = Path("/proc/cpuinfo")
    return cpuinfo.is_file() and any(f in cpuinfo.read_text() for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


def select_nodes(model_file: Path, recipe: Recipe) -> tuple[list[str], list[str]]:
    """(nodes to quantize, candidate nodes kept float) under the recipe."""
    model = onnx.load(str(model_file), load_external_data=False)
    weights = {init.name for init in model.graph.initializer}
    chosen, kept = [], []
    for node in model.graph.node:
        if node.op_type not in recipe.op_types:
            continue
        activation_only = node.op_type == "MatMul" and not any(i in weights for i in node.input)
        if (recipe.weight_matmuls_only and activation_only) or any(k in node.name for k in recipe.keep_float):
            kept.append(node.name)
        else:
            chosen.append(node.name)
    return chosen, kept


def quantize_graph(
    src: Path, dst: Path, recipe: Recipe, feeds: list[dict[str, np.ndarray]], reduce_range: bool, ranges: Path
) -> dict[str, Any]:
    """Static QDQ quantization of `src` into `dst` (weights over 2 GB go to `<name>_data`)."""
    size = sum(p.stat().st_size for p in src.parent.iterdir() if p.is_file())
    big, large = size > TWO_GB, size > LARGE_GRAPH
    src, dst, ranges = src.resolve(), dst.resolve(), ranges.resolve()
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp, working_directory(Path(tmp)):
        if large:  # memory-lean: the graph typed without loading weights, ranges recorded with them loaded once
            if recipe.calibration != "minmax":
                raise ExportError(f"{src}: graphs over {LARGE_GRAPH >> 30} GB calibrate with minmax only")
            prepared = src.parent / "_prepared.onnx"  # beside the weights it references
            onnx.save_model(structure_with_types(src), str(prepared))
            record_ranges(prepared, recipe.op_types, feeds, ranges)
        else:
            # onnxruntime's shape inference drops a debug copy of the graph in the working directory when it
            # cannot infer every shape; here that copy goes away with the temporary folder.
            prepared = Path(tmp) / "prepared.onnx"
            quant_pre_process(
                str(src), str(prepared), auto_merge=True, save_as_external_data=big, all_tensors_to_one_file=True
            )
        chosen, kept = select_nodes(prepared, recipe)
        quantize_static(
            str(prepared),
            str(dst),
            FeedReader(feeds),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(recipe.op_types),
            nodes_to_quantize=chosen,
            per_channel=recipe.per_channel,
            reduce_range=reduce_range,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            use_external_data_format=big,
            calibrate_method=CALIBRATION[recipe.calibration],
            calibration_cache_path=ranges,
            extra_options={"OpTypesToExcludeOutputQuantization": list(recipe.float_outputs)},
        )
    if large:
        prepared.unlink()
    if big:
        _rename_external_data(dst)
    concats = _quantize_slices(dst) if recipe.quantize_slices else 0
    return {
        "recipe": asdict(recipe),
        "quantized_nodes": len(chosen),
        "float_nodes": len(kept),
        "reduce_range": reduce_range,
        "pre_processed": not large,
        "concats_quantized": concats,
    }


def _quantize_slices(model_file: Path) -> int:
    model = onnx.load(str(model_file), load_external_data=False)
    count = quantize_before_concat(model)
    if count:
        onnx.save_model(model, str(model_file))
    return count


@contextmanager
def working_directory(folder: Path) -> Iterator[None]:
    """Run the block with `folder` as the working directory (contextlib.chdir, before Python 3.11)."""
    previous = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)


def _rename_external_data(model_file: Path) -> None:
    """onnxruntime names the data file `<model>.data`; use the exporter's `<model>_data` convention."""
    scratch = model_file.parent / "_requant"
    scratch.mkdir()
    for item in list(model_file.parent.iterdir()):
        if (
            item.is_file()
            and item.name.startswith(model_file.stem)
            and item.name != model_file.name + EXTERNAL_DATA_SUFFIX
        ):
            shutil.move(item, scratch / item.name)
    pack_graph(scratch / model_file.name, model_file)


def fidelity(fp32_file: Path, int8_file: Path, feeds: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """int8 vs fp32 outputs on held-out inputs: worst cosine similarity, max and mean abs difference."""
    reference, quantized = open_session(fp32_file), open_session(int8_file)
    cosines, max_diffs, mean_diffs = [], [], []
    for feed in feeds:  # every output (a ControlNet's residuals), as one vector
        a = np.concatenate([o.astype(np.float64).ravel() for o in reference.run(None, feed)])
        b = np.concatenate([o.astype(np.float64).ravel() for o in quantized.run(None, feed)])
        cosines.append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30)))
        max_diffs.append(float(np.abs(a - b).max()))
        mean_diffs.append(float(np.abs(a - b).mean()))
    return {
        "reference": "fp32 onnx",
        "held_out_samples": len(feeds),
        "cosine_min": min(cosines),
        "max_abs_diff": max(max_diffs),
        "mean_abs_diff": float(np.mean(mean_diffs)),
    }


def component_info(
    folder: Path, name: str, base: ComponentInfo, precision: str, extra: dict[str, Any]
) -> ComponentInfo:
    """The manifest entry of a re-written graph: new files and hashes, same signature."""
    files = sorted(p for p in (folder / name).iterdir() if p.is_file() and p.name != "config.json")
    return ComponentInfo(
        file=base.file,
        files={f"{name}/{p.name}": sha256_file(p) for p in files},
        inputs=base.inputs,
        outputs=base.outputs,
        precision=precision,
        opset=base.opset,
        validation=extra.pop("validation"),
        quantization=extra,
        optimizations=base.optimizations,
    )
