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
from sd_onnx.exporter.quantize_folder import quantize_folder
from sd_onnx.exporter.quantize_weights_folder import MIN_COSINE
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
    """Weights stored as the bf16 tensors they are (transposed as used), each widened by one Cast to float; the
    graph computes in fp32 and matches the fp32 export of the same model up to the weights' bf16 rounding."""
    manifest = Manifest.load(bf16_flux)
    info = manifest.components[name]
    assert info.precision == "fp32" and info.validation["max_abs_diff"] < 1e-4  # an fp32 computation, not bf16's
    model = onnx.load(str(bf16_flux / info.file))
    stored = {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.BFLOAT16}
    matrices = [t for t in model.graph.initializer if len(t.dims) == 2]
    assert matrices and all(t.name in stored for t in matrices)
    casts = {n.input[0]: n for n in model.graph.node if n.op_type == "Cast"}
    assert all(name in casts and casts[name].attribute[0].i == onnx.TensorProto.FLOAT for name in stored)
    order = [n.name for n in model.graph.node]
    for node in model.graph.node:  # each Cast right before its weight's first reader
        if node.op_type == "Cast" and node.input[0] in stored:
            assert node.output[0] in model.graph.node[order.index(node.name) + 1].input
    assert not [n for n in model.graph.node if n.op_type == "Transpose" and n.input[0] in casts]
    feeds = {}
    rng = np.random.default_rng(0)
    for spec in info.inputs:
        shape = info.validation["input_shapes"][spec.name]
        value = rng.integers(0, 100, shape) if spec.dtype.startswith("int") else rng.random(shape)
        feeds[spec.name] = value.astype(spec.dtype)
    run = lambda f: ort.InferenceSession(str(f), providers=["CPUExecutionProvider"]).run(None, feeds)[0]  # noqa: E731
    lean, full = run(bf16_flux / info.file), run(tiny_flux_export / info.file)
    cosine = float((lean * full).sum() / np.linalg.norm(lean) / np.linalg.norm(full))
    assert cosine > 0.999  # the same model, its weights rounded to bf16


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_bf16_stored_weights_quantize(bf16_flux: Path, tmp_path: Path, precision: str) -> None:
    out = tmp_path / precision
    quantize_folder(bf16_flux, out, precision=precision, log=lambda line: None)
    manifest = Manifest.load(out)
    for name in ("transformer", "text_encoder_2"):
        info = manifest.components[name]
        model = onnx.load(str(out / info.file))
        assert info.precision == precision and info.validation["cosine_min"] >= MIN_COSINE[precision]
        assert not [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1].endswith("_T")]
        matrices = {t.name for t in model.graph.initializer if len(t.dims) == 2}
        widened = {n.output[0] for n in model.graph.node if n.op_type == "Cast" and n.input[0] in matrices}
        readers = {n.op_type for n in model.graph.node if set(n.input) & widened}
        assert readers <= {"Gather"}, readers  # T5's token and position-bias tables; every MatMul weight quantized


def test_unknown_trace_dtype_refused(tiny_flux_pipeline: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="unknown trace dtype"):
        convert(str(tiny_flux_pipeline), tmp_path / "out", trace_dtype="int8", log=lambda line: None)


def test_bf16_stored_graphs_run_unfolded_and_are_never_cached_folded(
    bf16_flux: Path, tiny_flux_export: Path, tmp_path: Path
) -> None:
    """The manifest marks bf16-stored weights; the runtime then keeps no optimized copy of the graph (it would hold
    every weight widened to fp32), and its lean session (each Cast just before its use) gives the folded session's
    outputs."""
    from sd_onnx.runtime.session import OnnxModel, SessionConfig

    info = Manifest.load(bf16_flux).components["text_encoder_2"]
    assert info.optimizations["narrow_weights"] == "bfloat16"
    assert "narrow_weights" not in Manifest.load(tiny_flux_export).components["text_encoder_2"].optimizations
    feeds = {"input_ids": np.arange(info.validation["input_shapes"]["input_ids"][1], dtype=np.int32)[None] % 50}
    outputs = {}
    for lean in (False, True):
        cache = tmp_path / f"cache-{lean}"
        model = OnnxModel(bf16_flux / info.file, info, SessionConfig(cache_dir=cache), lean=lean)
        outputs[lean] = model(**feeds)[0]
        assert not list(cache.rglob("*.onnx*"))
    np.testing.assert_allclose(outputs[True], outputs[False], atol=1e-5)
    plain = Manifest.load(tiny_flux_export).components["text_encoder_2"]
    OnnxModel(tiny_flux_export / plain.file, plain, SessionConfig(cache_dir=tmp_path / "plain"))
    assert list((tmp_path / "plain").rglob("*.onnx"))  # an fp32-stored graph is cached as before
