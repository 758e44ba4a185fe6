"""Trace one torch module to an ONNX file.

Engine: torch.onnx's TorchScript tracer (`dynamo=False`), as Optimum uses. Measured on the tiny UNet
(torch 2.13): 0.6 s against 20 s for the dynamo exporter, with the same parity (1e-6) and working
batch/height/width axes. The dynamo graph has fewer nodes (576 vs 1,256, mostly shape arithmetic), but
onnxruntime constant-folds that arithmetic at load, so the runtime graphs end up alike; the tracer's
speed and lower peak memory on the 860M-parameter UNet decide it.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import onnx
import torch

from .components import ComponentSpec, Inputs

EXTERNAL_DATA_SUFFIX = "_data"
TWO_GB = 2**31


def trace_component(module: torch.nn.Module, spec: ComponentSpec, inputs: Inputs, out_file: Path, opset: int) -> None:
    """Export `module` to `out_file`; graphs over 2 GB keep their weights in one `model.onnx_data` file."""
    scratch = out_file.parent / "_trace"
    scratch.mkdir(parents=True, exist_ok=True)
    traced = scratch / out_file.name
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about python control flow on shapes are expected
        torch.onnx.export(
            module,
            inputs,
            str(traced),
            dynamo=False,
            opset_version=opset,
            input_names=list(spec.input_names),
            output_names=list(spec.output_names),
            dynamic_axes=spec.dynamic_axes,
            do_constant_folding=True,
        )
    if len(list(scratch.iterdir())) == 1 and traced.stat().st_size < TWO_GB:
        traced.replace(out_file)
    else:
        _repack_external_data(traced, out_file)
    shutil.rmtree(scratch)


def _repack_external_data(traced: Path, out_file: Path) -> None:
    """Gather the tracer's one-file-per-tensor external data into a single `<name>_data` file."""
    model = onnx.load(str(traced), load_external_data=True)
    onnx.save_model(
        model,
        str(out_file),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=out_file.name + EXTERNAL_DATA_SUFFIX,
        size_threshold=1024,
    )
