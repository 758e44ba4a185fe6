"""int8 quantization of the tiny export: QDQ placement per recipe, fidelity, manifest, runtime loading."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from sd_onnx.exporter.cli import main as export_cli
from sd_onnx.exporter.quantize import RECIPES
from sd_onnx.runtime import Manifest, StableDiffusionPipeline
from sd_onnx.runtime.manifest import FLOAT_DECODER

# Documented tolerance of int8 against fp32 on held-out calibration-like inputs (tiny random-weight model).
MIN_COSINE = {"unet": 0.97, "vae_decoder": 0.99, "vae_encoder": 0.99}


@pytest.fixture(scope="module")
def int8_export(tiny_export: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("int8") / "tiny-int8"
    result = CliRunner().invoke(export_cli, ["quantize", str(tiny_export), str(out), "--calibration-steps", "4"])
    assert result.exit_code == 0, result.output
    assert "[1/3] unet: int8" in result.output
    return out


def producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in model.graph.node for out in node.output}


def test_qdq_only_where_the_recipe_says(int8_export: Path) -> None:
    model = onnx.load(str(int8_export / "unet" / "model.onnx"))
    made_by = producers(model)
    weights = {i.name for i in model.graph.initializer}

    def dequantized(name: str) -> bool:
        return name in made_by and made_by[name].op_type == "DequantizeLinear"

    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert convs and all(dequantized(n.input[0]) and dequantized(n.input[1]) for n in convs)
    linear = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm")]
    assert linear and all(dequantized(n.input[1]) and made_by[n.input[1]].input[0] in weights for n in linear)
    # Their outputs stay float (no requantize): onnxruntime runs them as MatMulIntegerToFloat.
    requantized = {n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    assert not any(n.output[0] in requantized for n in linear)
    # The attention core was fused at export and stays a float MultiHeadAttention; no Softmax is left.
    attention = [n for n in model.graph.node if n.op_type == "MultiHeadAttention"]
    assert len(attention) == 8 and not any(n.op_type == "Softmax" for n in model.graph.node)
    assert not any(n.op_type in ("QLinearSoftmax", "QAttention") for n in model.graph.node)
    text = onnx.load(str(int8_export / "text_encoder" / "model.onnx"))
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in text.graph.node)


def test_vae_keeps_first_and_last_conv_float(int8_export: Path) -> None:
    model = onnx.load(str(int8_export / "vae_decoder" / "model.onnx"))
    made_by = producers(model)
    for node in model.graph.node:
        if node.op_type == "Conv":
            weight = node.input[1]  # a kept-float Conv keeps float weights, so it cannot become a QLinearConv
            is_dq = weight in made_by and made_by[weight].op_type == "DequantizeLinear"
            assert is_dq != any(k in node.name for k in RECIPES["vae_decoder"].keep_float), node.name


def test_vae_quantizes_group_norm_slices_before_joining_them(int8_export: Path) -> None:
    """The chunked group norms (optimize.chunk_group_norms) reach a quantized Conv as int8 slices, so the float
    tensor is never whole; the pixels' parity is test_int8_folder_runs_in_the_runtime_close_to_fp32's."""
    model = onnx.load(str(int8_export / "vae_decoder" / "model.onnx"))
    made_by = producers(model)
    concats = [n for n in model.graph.node if n.op_type == "Concat" and "/chunk/" in n.name]
    int8 = [n for n in concats if all(made_by[i].op_type == "QuantizeLinear" for i in n.input)]
    quantized = Manifest.load(int8_export).components["vae_decoder"].quantization["concats_quantized"]
    assert len(int8) == quantized > 0
    float_concats = {n.output[0] for n in concats if n not in int8}
    assert not any(n.op_type == "QuantizeLinear" and n.input[0] in float_concats for n in model.graph.node)


def test_manifest_records_recipe_calibration_and_fidelity(int8_export: Path) -> None:
    manifest = Manifest.load(int8_export)
    manifest.verify(int8_export)
    assert manifest.components["text_encoder"].precision == "fp32"
    for name, min_cosine in MIN_COSINE.items():
        info = manifest.components[name]
        assert info.precision == "int8"
        assert info.quantization["recipe"]["op_types"] == list(RECIPES[name].op_types)
        assert info.quantization["quantized_nodes"] > 0
        assert info.quantization["calibration"]["prompts"] == 8 and info.quantization["calibration"]["steps"] == 4
        assert (int8_export / info.quantization["calibration"]["ranges_file"]).is_file()
        assert info.validation["cosine_min"] >= min_cosine, (name, info.validation)
        assert info.validation["reference"] == "fp32 onnx"


def test_int8_folder_runs_in_the_runtime_close_to_fp32(int8_export: Path, tiny_export: Path) -> None:
    settings = {"prompt": "a red circle", "seed": 4, "num_inference_steps": 6, "output_type": "np"}
    fp32 = StableDiffusionPipeline.from_pretrained(tiny_export, provider="cpu")(**settings).images
    int8 = StableDiffusionPipeline.from_pretrained(int8_export, provider="cpu")(**settings).images
    assert int8.shape == fp32.shape
    assert np.abs(int8 - fp32).mean() < 0.05


def test_unknown_component_has_no_recipe(tiny_export: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        export_cli, ["quantize", str(tiny_export), str(tmp_path / "q"), "--components", "text_encoder"]
    )
    assert result.exit_code != 0 and "no int8 recipe for text_encoder" in result.output
    assert not (tmp_path / "q").exists()


def test_convert_with_precision_int8(tiny_pipeline: Path, tmp_path: Path) -> None:
    out = tmp_path / "direct-int8"
    result = CliRunner().invoke(
        export_cli,
        [
            "convert",
            str(tiny_pipeline),
            str(out),
            "--precision",
            "int8",
            "--components",
            "text_encoder,unet,vae_decoder",
        ],
    )
    assert result.exit_code == 0, result.output
    manifest = Manifest.load(out)
    assert manifest.components["unet"].precision == "int8" and manifest.components["text_encoder"].precision == "fp32"
    assert "vae_encoder" not in manifest.components


def test_quantization_leaves_nothing_in_the_working_directory(
    tiny_export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """onnxruntime's shape inference drops a debug graph in the working directory when it cannot infer every
    shape (as on SD 1.5's UNet); it must not land in the user's folder."""
    from sd_onnx.exporter import quantize

    original = quantize.quant_pre_process

    def leaky(*args: object, **kwargs: object) -> None:
        Path("sym_shape_infer_temp.onnx").write_bytes(b"debug copy")
        original(*args, **kwargs)

    monkeypatch.setattr(quantize, "quant_pre_process", leaky)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    out = tmp_path / "q"
    args = ["quantize", str(tiny_export), str(out), "--components", "unet", "--calibration-steps", "2"]
    result = CliRunner().invoke(export_cli, args)
    assert result.exit_code == 0, result.output
    assert list(cwd.iterdir()) == []
    assert Manifest.load(out).components["unet"].precision == "int8"


def test_calibration_samples_at_the_models_own_guidance() -> None:
    """The shapes model is made for guidance 2 (its manifest says so); calibrating at another guidance would
    measure ranges along trajectories users never sample."""
    from sd_onnx.exporter.calibrate import record
    from sd_onnx.models.shapes import shipped_model

    folder = shipped_model("fp32")
    calibration = record(folder, ("a red circle on a blue background",), steps=2, size=64)
    assert calibration.settings["guidance"] == Manifest.load(folder).config.guidance_scale == 2.0
    assert [f["sample"].shape for f in calibration.feeds["unet"]] == [(2, 4, 16, 16)] * 2
    assert record(folder, ("a red circle",), steps=1, size=64, guidance=5.0).settings["guidance"] == 5.0


def test_lean_ranges_equal_onnxruntimes_calibrator(tiny_export: Path, tmp_path: Path) -> None:
    """The memory-lean path for graphs over LARGE_GRAPH (SDXL's UNet) records the ranges onnxruntime's own
    MinMax calibrator records, so the quantized graph is the same recipe."""
    from onnxruntime.quantization.calibrate import MinMaxCalibrater, load_tensors_data

    from sd_onnx.exporter.calibrate import FeedReader, record_ranges

    unet = tiny_export / "unet" / "model.onnx"
    rng = np.random.default_rng(0)
    feeds = [
        {
            "sample": rng.standard_normal((2, 4, 16, 16), dtype=np.float32),
            "timestep": np.array([t], np.float32),
            "encoder_hidden_states": rng.standard_normal((2, 77, 32), dtype=np.float32),
        }
        for t in (900.0, 500.0, 100.0)
    ]
    ops = RECIPES["unet"].op_types
    record_ranges(unet, ops, feeds, tmp_path / "lean.json")
    assert not (unet.parent / "_calibration.onnx").exists()
    calibrator = MinMaxCalibrater(unet, list(ops), augmented_model_path=str(tmp_path / "augmented.onnx"))
    calibrator.augment_graph()
    calibrator.create_inference_session()
    calibrator.collect_data(FeedReader(feeds))
    theirs = calibrator.compute_data().data
    ours = load_tensors_data(tmp_path / "lean.json").data
    assert set(ours) == set(theirs) and len(ours) > 20
    for name, data in theirs.items():
        np.testing.assert_allclose(ours[name].range_value, data.range_value, rtol=1e-6, err_msg=name)


def test_lean_quantization_runs_close_to_fp32(
    tiny_export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole lean path (no pre-processing, recorded ranges) gives a working int8 UNet of the same recipe,
    from a graph whose every tensor is external data, as SDXL's is (shape constants included)."""
    import onnxruntime as ort

    from sd_onnx.exporter import quantize

    monkeypatch.setattr(quantize, "LARGE_GRAPH", 0)
    rng = np.random.default_rng(1)
    feed = {
        "sample": rng.standard_normal((2, 4, 16, 16), dtype=np.float32),
        "timestep": np.array([700.0], np.float32),
        "encoder_hidden_states": rng.standard_normal((2, 77, 32), dtype=np.float32),
    }
    unet = tmp_path / "external" / "model.onnx"
    unet.parent.mkdir()
    onnx.save_model(onnx.load(str(tiny_export / "unet" / "model.onnx")), str(unet), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="model.onnx_data", size_threshold=64)  # fmt: skip
    report = quantize.quantize_graph(unet, tmp_path / "int8.onnx", RECIPES["unet"], [feed], True, tmp_path / "r.json")
    assert report["pre_processed"] is False and report["quantized_nodes"] > 0
    assert not (unet.parent / "_prepared.onnx").exists()
    model = onnx.load(str(tmp_path / "int8.onnx"))
    float_weights = {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    matmuls_on_float_weights = [
        n.name for n in model.graph.node if n.op_type == "MatMul" and float_weights & set(n.input)
    ]
    assert not matmuls_on_float_weights  # every weight MatMul is int8, attention's behind the fused MHA included
    ops = {n.op_type for n in model.graph.node}
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    fp32 = ort.InferenceSession(str(unet)).run(None, feed)[0].ravel()
    int8 = ort.InferenceSession(str(tmp_path / "int8.onnx")).run(None, feed)[0].ravel()
    assert fp32 @ int8 / (np.linalg.norm(fp32) * np.linalg.norm(int8)) > 0.95


def test_quantizing_leaves_the_source_intact(tiny_export: Path, tmp_path: Path) -> None:
    from sd_onnx.exporter import quantize_folder

    before = {p: p.read_bytes() for p in tiny_export.rglob("*") if p.is_file()}
    quantize_folder.quantize_folder(tiny_export, tmp_path / "int8", log=lambda line: None, steps=2,
                                    components=("unet",))  # fmt: skip
    Manifest.load(tiny_export).verify(tiny_export)
    assert {p: p.read_bytes() for p in tiny_export.rglob("*") if p.is_file()} == before


def test_disk_errors_are_one_line(tiny_export: Path, tmp_path: Path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("x")
    result = CliRunner().invoke(export_cli, ["quantize", str(tiny_export), str(blocked / "out")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.startswith("Error: ") and len(result.output.strip().splitlines()) == 1


def test_the_fp32_decoder_is_kept_beside_the_int8_one_with_whole_group_norms(
    int8_export: Path, tiny_export: Path
) -> None:
    """For OpenVINO, which runs the float decoder in bf16 faster than any engine runs the int8 one on AMX: the
    fp32 graph as exported, its chunked group norms whole again, the same function (onnxruntime, fp32)."""
    import onnxruntime as ort

    manifest = Manifest.load(int8_export)
    info = manifest.components[FLOAT_DECODER]
    assert info.precision == "fp32" and info.file == f"{FLOAT_DECODER}/model.onnx"
    assert info.validation["max_abs_diff"] < 1e-4
    assert info.inputs == manifest.components["vae_decoder"].inputs
    chunked = onnx.load(str(tiny_export / "vae_decoder" / "model.onnx"), load_external_data=False)
    whole = onnx.load(str(int8_export / info.file), load_external_data=False)
    assert any("/chunk" in n.name for n in chunked.graph.node)
    norms = sum(n.op_type == "InstanceNormalization" for n in whole.graph.node)
    assert not any("/chunk" in n.name for n in whole.graph.node)
    assert (
        norms
        == info.optimizations["group_norms_whole"]
        == Manifest.load(tiny_export).components["vae_decoder"].optimizations["group_norms_chunked"]
    )
    latents = (
        np.random.default_rng(0)
        .standard_normal((1, Manifest.load(int8_export).config.latent_channels, 16, 16))
        .astype(np.float32)
    )
    name = info.inputs[0].name
    outputs = [
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {name: latents})[0]
        for path in (tiny_export / "vae_decoder" / "model.onnx", int8_export / info.file)
    ]
    assert np.abs(outputs[0] - outputs[1]).max() < 1e-4


def test_openvino_decodes_with_the_float_decoder_and_onnxruntime_with_int8(int8_export: Path) -> None:
    """Where OpenVINO runs the decoder it takes the float one (exact float layers with openvino:f32: the same
    pixels as the fp32 decoder on onnxruntime); onnxruntime and low-memory mode keep the int8 one."""
    cpu = StableDiffusionPipeline.from_pretrained(int8_export, provider="cpu")
    exact = StableDiffusionPipeline.from_pretrained(int8_export, provider="openvino:f32")
    lean = StableDiffusionPipeline.from_pretrained(int8_export, provider="openvino", low_memory=True)
    assert (cpu.vae.decoder, exact.vae.decoder, lean.vae.decoder) == ("vae_decoder", FLOAT_DECODER, "vae_decoder")
    latents = (
        np.random.default_rng(1)
        .standard_normal((1, Manifest.load(int8_export).config.latent_channels, 16, 16))
        .astype(np.float32)
    )
    fp32 = StableDiffusionPipeline.from_pretrained(int8_export, provider="cpu")
    fp32.vae = exact.vae  # the float decoder on onnxruntime: the reference for OpenVINO's f32
    assert np.abs(exact.decode_latents(latents) - fp32.decode_latents(latents)).max() < 1e-4
    assert np.abs(cpu.decode_latents(latents) - fp32.decode_latents(latents)).mean() > 1e-4  # int8 differs


@pytest.mark.parametrize("flags", [{"amx_bf16", "amx_int8", "amx_tile", "avx512_bf16"}, {"avx512_bf16"}])
def test_auto_decodes_with_the_float_decoder_on_openvino_only_with_amx(
    flags: set[str], int8_export: Path, monkeypatch
) -> None:
    """Measured (docs/performance.md): with AMX every graph is faster on OpenVINO, the float decoder in bf16 at
    0.46x the int8 one on onnxruntime; on AVX-512 bf16 without AMX only the UNet is, and the int8 decoder on
    onnxruntime beats both decoders on OpenVINO."""
    from sd_onnx.runtime import session

    monkeypatch.delenv("SD_ONNX_AUTO_OPENVINO")  # conftest's; this test is of auto's choice
    monkeypatch.setattr(session, "cpu_flags", lambda: frozenset(flags))
    pipe = StableDiffusionPipeline.from_pretrained(int8_export, provider="auto")
    amx = "amx_bf16" in flags
    assert pipe.vae.decoder == (FLOAT_DECODER if amx else "vae_decoder")
    assert pipe.component(pipe.vae.decoder).provider == ("OpenVINO" if amx else "CPUExecutionProvider")
    assert pipe.component("unet").provider == "OpenVINO"
    assert pipe.component("text_encoder").provider == ("OpenVINO" if amx else "CPUExecutionProvider")
    assert ("for unet, onnxruntime" in pipe.engine) != amx, pipe.engine
