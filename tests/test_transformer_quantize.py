"""Weight-only int8/int4 quantization of SD3 and FLUX.1 exports (exporter/quantize_weights.py): what the manifest
records, which operators the graphs hold, fidelity against the fp32 graphs, and torch-free generation close to
the fp32 export's images.

Thresholds, from the tiny seeded models (random weights of widths 16-96 are worse-conditioned than trained ones):
held-out cosine vs fp32 measured int8 0.9999-0.99996 and int4 0.993-0.998 per graph, so the exporter's floors
(int8 0.999, int4 0.98) hold with margin; the mean abs pixel difference to the fp32 export's image (3 steps)
measured int8 0.18-1.3/255 and int4 1.7-1.9/255, bounded here at 3/255 and 6/255.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from sd_onnx.exporter.cli import main as sd_export
from sd_onnx.exporter.convert import convert
from sd_onnx.exporter.errors import ExportError
from sd_onnx.exporter.quantize_folder import quantize_folder
from sd_onnx.exporter.quantize_weights import scheme_for
from sd_onnx.exporter.quantize_weights_folder import MIN_COSINE
from sd_onnx.runtime.manifest import Manifest

QUANTIZED = {"sd3": ("transformer", "text_encoder_3"), "flux": ("transformer", "text_encoder_2")}
FLOAT = {"sd3": ("text_encoder", "text_encoder_2", "vae_decoder", "vae_encoder"),
         "flux": ("text_encoder", "vae_decoder", "vae_encoder")}  # fmt: skip
PIXEL_BOUND = {"int8": 3 / 255, "int4": 6 / 255}


@pytest.fixture(scope="module")
def exports(tiny_sd3_export: Path, tiny_flux_export: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """{(family, precision): folder}: the fp32 exports and their int8/int4 copies made by `sd-export quantize`."""
    root = tmp_path_factory.mktemp("weight-only")
    folders = {("sd3", "fp32"): tiny_sd3_export, ("flux", "fp32"): tiny_flux_export}
    for family, source in (("sd3", tiny_sd3_export), ("flux", tiny_flux_export)):
        for precision in ("int8", "int4"):
            out = root / f"{family}-{precision}"
            quantize_folder(source, out, precision=precision, log=lambda line: None)
            folders[family, precision] = out
    return folders


CASES = [(family, precision) for family in QUANTIZED for precision in ("int8", "int4")]


@pytest.mark.parametrize(("family", "precision"), CASES)
def test_manifest_records_the_quantization(exports: dict, family: str, precision: str) -> None:
    folder = exports[family, precision]
    manifest = Manifest.load(folder)
    manifest.verify(folder)
    for name in QUANTIZED[family]:
        info, scheme = manifest.components[name], scheme_for(name, precision)
        assert info.precision == precision
        q = info.quantization
        assert (q["method"], q["bits"], q["block_size"]) == (f"weight-only, {scheme.method}", scheme.bits,
                                                             scheme.block_size)  # fmt: skip
        assert q["operator"].startswith(operator(name, precision)) and q["per_channel"] is (scheme.method == "dynamic")
        assert q["accuracy_level"] == scheme.accuracy_level and q["symmetric"] is scheme.symmetric
        assert q["quantized_ops"]["MatMul"] > 0 and q["parameters_quantized"] > 0
        if name == "transformer":  # the timestep/pooled/adaLN Linears on 2-D inputs are Gemms in the trace
            assert q["quantized_ops"]["Gemm"] > 0
        assert not (folder / name / "lora_targets.json").exists()
    for name in FLOAT[family]:
        assert manifest.components[name].precision == "fp32" and not manifest.components[name].quantization


def operator(name: str, precision: str) -> str:
    """int8 transformers: MatMulInteger after a DynamicQuantizeLinear of the activations; T5 at int8 and everything
    at int4: MatMulNBits."""
    return "MatMulInteger" if scheme_for(name, precision).method == "dynamic" else "MatMulNBits"


@pytest.mark.parametrize(("family", "precision"), CASES)
def test_weight_matmuls_become_quantized_operators(exports: dict, family: str, precision: str) -> None:
    folder = exports[family, precision]
    for name in QUANTIZED[family]:
        model = onnx.load(str(folder / name / "model.onnx"))
        weights = {t.name: t for t in model.graph.initializer}
        quantized = [n for n in model.graph.node if n.op_type == operator(name, precision)]
        assert quantized
        if operator(name, precision) == "MatMulNBits":
            assert all(onnx.helper.get_attribute_value(a) == scheme_for(name, precision).bits
                       for n in quantized for a in n.attribute if a.name == "bits")  # fmt: skip
        else:
            assert all(weights[n.input[1]].data_type == onnx.TensorProto.INT8 for n in quantized)
            assert sum(n.op_type == "DynamicQuantizeLinear" for n in model.graph.node) == len(quantized)
        float_weights = [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in weights]
        assert not float_weights, float_weights
        attention = ("MatMul", "MultiHeadAttention")  # activation x activation products stay float, fused or not
        assert any(n.op_type in attention for n in model.graph.node)
        onnx.checker.check_model(model)


@pytest.mark.parametrize(("family", "precision"), CASES)
def test_fidelity_against_fp32_is_measured_and_high(exports: dict, family: str, precision: str) -> None:
    manifest = Manifest.load(exports[family, precision])
    for name in QUANTIZED[family]:
        v = manifest.components[name].validation
        assert v["reference"] == "fp32 onnx" and v["held_out_samples"] == 2 and v["min_cosine"] == MIN_COSINE[precision]
        assert v["cosine_min"] >= MIN_COSINE[precision], (name, v)


GENERATE = """
import json, sys
sys.modules.update({"torch": None, "diffusers": None, "transformers": None})  # any import of them fails
import numpy as np
from sd_onnx.runtime import DiffusionPipeline
images = {}
for label, folder in json.loads(sys.argv[1]).items():
    pipe = DiffusionPipeline.from_pretrained(folder, provider="cpu")
    images[label] = pipe("a red circle on a blue square", seed=3, num_inference_steps=3, output_type="np").images
print(json.dumps({k: float(np.abs(v.astype(np.float64) - images["fp32"]).mean()) for k, v in images.items()}))
"""


@pytest.mark.parametrize("family", QUANTIZED)
def test_generates_torch_free_close_to_fp32(exports: dict, family: str) -> None:
    folders = {p: str(exports[family, p]) for p in ("fp32", "int8", "int4")}
    out = subprocess.run([sys.executable, "-c", GENERATE, json.dumps(folders)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    diffs = json.loads(out.stdout.strip().splitlines()[-1])
    print(family, diffs)
    for precision in ("int8", "int4"):
        assert 0 < diffs[precision] <= PIXEL_BOUND[precision], diffs


def test_convert_int4_cli(tiny_flux_pipeline: Path, tmp_path: Path) -> None:
    out = tmp_path / "flux-int4"
    result = CliRunner().invoke(sd_export, ["convert", str(tiny_flux_pipeline), str(out), "--precision", "int4"])
    assert result.exit_code == 0, result.output
    manifest = Manifest.load(out)
    assert {n: c.precision for n, c in manifest.components.items()} == {
        "text_encoder": "fp32", "text_encoder_2": "int4", "transformer": "int4",
        "vae_decoder": "fp32", "vae_encoder": "fp32"}  # fmt: skip


def test_int4_refused_for_unet_models(tiny_pipeline: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="int4: for transformer models"):
        convert(str(tiny_pipeline), tmp_path / "out", precision="int4", log=lambda line: None)
    assert not (tmp_path / "out").exists()


def test_held_out_inputs_are_seeded_and_in_range(exports: dict) -> None:
    from sd_onnx.exporter.quantize_weights_folder import held_out_feeds

    manifest = Manifest.load(exports["flux", "fp32"])
    info = manifest.components["transformer"]
    shapes = info.validation["input_shapes"]
    a, b = (held_out_feeds(info.inputs, shapes, manifest.config, 1000) for _ in range(2))
    assert all(np.array_equal(a[0][k], b[0][k]) for k in a[0])
    assert not np.array_equal(a[0]["hidden_states"], a[1]["hidden_states"])
    assert a[0]["timestep"].min() >= 0 and a[0]["timestep"].max() <= 1
    ids = a[0]["img_ids"]
    assert ids[:, 0].max() == 0 and ids[:, 1].max() == ids[:, 2].max() == np.sqrt(len(ids)) - 1
