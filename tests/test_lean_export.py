"""The memory-lean export path (exporter/lean.py, `sd-export convert --trace-dtype bf16`): a bf16 module yields the
fp32 graph of the same weights, validated against an fp32 computation at the usual tolerance."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from sd_onnx.exporter.convert import convert
from sd_onnx.exporter.errors import ExportError
from sd_onnx.exporter.lean import float32_compute
from sd_onnx.runtime.manifest import Manifest


class Block(torch.nn.Module):
    """Looks at a child's dtype, as T5's feed-forward does: widening per leaf module would break it."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)).to(self.b.weight.dtype))


def test_float32_compute_runs_bf16_weights_in_fp32_and_restores_them() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ModuleList([Block(), Block()]))
    model.forward = lambda x: model[1][1](model[1][0](model[0](x)))  # type: ignore[method-assign]
    narrow = model.to(torch.bfloat16)
    wide = {k: v.float() for k, v in narrow.state_dict().items()}
    x = torch.randn(3, 8)
    with torch.no_grad(), float32_compute(narrow):
        got = narrow(x)
    reference = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ModuleList([Block(), Block()]))
    reference.load_state_dict(wide)
    reference.forward = lambda x: reference[1][1](reference[1][0](reference[0](x)))  # type: ignore[method-assign]
    with torch.no_grad():
        want = reference(x)
    assert got.dtype == torch.float32 and torch.allclose(got, want, atol=1e-6)
    assert all(p.dtype == torch.bfloat16 for p in narrow.parameters())


@pytest.fixture(scope="module")
def bf16_flux(tiny_flux_pipeline: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("lean") / "flux-bf16"
    convert(str(tiny_flux_pipeline), out, components=("transformer", "text_encoder_2"), trace_dtype="bf16",
            log=lambda line: None)  # fmt: skip
    return out


@pytest.mark.parametrize("name", ["transformer", "text_encoder_2"])
def test_bf16_trace_writes_the_fp32_graph_of_the_bf16_weights(bf16_flux: Path, tiny_flux_export: Path, name: str):
    manifest = Manifest.load(bf16_flux)
    info = manifest.components[name]
    assert info.precision == "fp32" and info.validation["max_abs_diff"] < 1e-4  # an fp32 computation, not bf16's
    model = onnx.load(str(bf16_flux / info.file))
    assert {t.data_type for t in model.graph.initializer} <= {onnx.TensorProto.FLOAT, onnx.TensorProto.INT64}
    narrow = [n.name for n in model.graph.node for a in n.attribute
              if a.name == "to" and a.i in (onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT16)]  # fmt: skip
    assert not narrow
    for tensor in model.graph.initializer:  # every weight a bf16 value: its low 16 bits are zero
        if tensor.data_type == onnx.TensorProto.FLOAT and len(tensor.dims) == 2:
            bits = onnx.numpy_helper.to_array(tensor).view(np.uint32)
            assert not (bits & 0xFFFF).any(), tensor.name
    feeds = {}
    rng = np.random.default_rng(0)
    for spec in info.inputs:
        shape = info.validation["input_shapes"][spec.name]
        feeds[spec.name] = (rng.integers(0, 100, shape) if spec.dtype.startswith("int") else rng.random(shape)).astype(
            spec.dtype
        )
    run = lambda f: ort.InferenceSession(str(f), providers=["CPUExecutionProvider"]).run(None, feeds)[0]  # noqa: E731
    lean, full = run(bf16_flux / info.file), run(tiny_flux_export / info.file)
    cosine = float((lean * full).sum() / np.linalg.norm(lean) / np.linalg.norm(full))
    assert cosine > 0.999  # the same model, its weights rounded to bf16


def test_unknown_trace_dtype_refused(tiny_flux_pipeline: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="unknown trace dtype"):
        convert(str(tiny_flux_pipeline), tmp_path / "out", trace_dtype="int8", log=lambda line: None)
