"""`sd-bench` peers: OpenVINO (optimum-intel) engines on the tiny model in their own environment, OpenVINO
reading this project's graphs, and stable-diffusion.cpp on the SD 1.5 architecture (manual: it builds from
source and needs a full-size model)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from sd_onnx.benchmarks.cli import main
from sd_onnx.benchmarks.peers import PEERS, PeerSetupError, is_ready, setup_peer
from sd_onnx.runtime.manifest import Manifest

OPENVINO_ENGINES = ("openvino-fp32", "openvino-int8", "openvino-hybrid-int8", "openvino-onnx-fp32")
OPENVINO_UNET = """
import sys, numpy as np, openvino as ov
model, feeds, out = sys.argv[1:4]
core = ov.Core()
compiled = core.compile_model(core.read_model(model), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
inputs = dict(np.load(feeds))
np.save(out, compiled([inputs[i.any_name] for i in compiled.inputs])[0])
"""


MANUAL = pytest.mark.skipif(
    not os.environ.get("SD_ONNX_MANUAL"),
    reason="manual (SD_ONNX_MANUAL=1): makes OpenVINO's environment and runs its engines (about 4 minutes)",
)


@MANUAL
def test_openvino_engines_run_the_tiny_model(tiny_pipeline: Path, openvino_python: str, tmp_path: Path) -> None:
    """Each OpenVINO engine exports (fp32 IR, 8-bit weights, hybrid int8 calibrated on our prompts) in its own
    environment, runs every step, and records its precision, export time and memory."""
    args = ["run", "--model", str(tiny_pipeline), "--steps", "2", "--size", "32", "--name", "ov"]
    args += ["--engines", ",".join(OPENVINO_ENGINES), "--openvino-python", openvino_python]
    args += ["--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "ov.json").read_text())
    assert list(report["engines"]) == list(OPENVINO_ENGINES)
    for name, record in report["engines"].items():
        assert "error" not in record, (name, record)
        # diffusers' PNDM makes one extra UNet call; the ONNX rows time the UNet alone, once per step
        assert record["unet_steps"] == (2 if "onnx" in name else 3), name
        assert record["unet_step_median_s"] > 0 and record["vae_decode_s"] > 0
        assert record["inference_precision"] in ("f32", "bf16", "f16") and record["peak_rss_mb"] > 0
        assert record["versions"]["openvino"] != "-"
    for name in OPENVINO_ENGINES[:3]:
        assert report["engines"][name]["end_to_end_s"] > 0 and report["engines"][name]["text_encoder_s"] > 0
        assert report["preparation"][f"export_{name}"]["process_peak_rss_mb"] > 0
        assert (tmp_path / "work" / name / "unet" / "openvino_model.xml").is_file()
    assert report["engines"]["openvino-onnx-fp32"]["end_to_end_s"] is None  # components only
    assert not list((tmp_path / "work").glob("*.partial*"))
    # Turbo-style, unguided: optimum-intel's static reshape would double the UNet batch; ours leaves it free
    turbo = ["--engines", "openvino-int8", "--steps", "1", "--guidance", "0", "--name", "ov-turbo"]
    result = CliRunner().invoke(main, [*args, *turbo])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "out" / "ov-turbo.json").read_text())["engines"]["openvino-int8"]
    assert "error" not in record and record["unet_steps"] == 1, record


@MANUAL
def test_openvino_reads_our_unet_graph_and_computes_the_same(
    tiny_export: Path, openvino_python: str, tmp_path: Path
) -> None:
    """OpenVINO's ONNX reader takes our optimized fp32 UNet (fused MultiHeadAttention included) and, at f32
    precision, matches onnxruntime: the openvino-onnx rows time the same computation."""
    graph = tiny_export / "unet" / "model.onnx"
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    shapes = Manifest.load(tiny_export).components["unet"].validation["input_shapes"]
    assert {i.name for i in session.get_inputs()} == set(shapes)
    feeds = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
    np.savez(tmp_path / "feeds.npz", **feeds)
    cmd = [openvino_python, "-c", OPENVINO_UNET, str(graph), str(tmp_path / "feeds.npz"), str(tmp_path / "o.npy")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    expected = session.run(None, feeds)[0]
    np.testing.assert_allclose(np.load(tmp_path / "o.npy"), expected, atol=1e-4, rtol=1e-4)


def test_peer_setup_knows_its_peers_and_what_makes_them_ready(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SD_ONNX_PEERS", str(tmp_path))
    assert set(PEERS) == {"optimum", "openvino", "sdcpp"}
    assert not any(is_ready(name) for name in PEERS)  # nothing made under this root yet
    with pytest.raises(PeerSetupError, match="unknown peer 'onnxstream'"):
        setup_peer("onnxstream")
    assert "torchvision" in PEERS["openvino"].remove  # it fails to import beside the CPU torch


@pytest.mark.skipif(
    not os.environ.get("SD_ONNX_MANUAL"),
    reason="manual (SD_ONNX_MANUAL=1): builds stable-diffusion.cpp from source and the 4 GB SD 1.5 architecture",
)
def test_sdcpp_engine_runs_the_sd15_architecture(tmp_path: Path) -> None:
    """stable-diffusion.cpp loads the LDM single file written from our random SD 1.5 weights, converted to
    q4_0 by its own converter, and reports steps from its callback and text/VAE times from its log."""
    setup_peer("sdcpp")
    work = Path(os.environ.get("SD_ONNX_MANUAL_WORK") or tmp_path / "work")
    args = ["run", "--random", "sd15", "--steps", "2", "--size", "256", "--engines", "sdcpp-q4_0", "--name", "cpp"]
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "out"), "--work", str(work)])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "out" / "cpp.json").read_text())["engines"]["sdcpp-q4_0"]
    assert "error" not in record, record
    assert record["unet_steps"] == 2 and record["weight_type"] == "q4_0"
    assert record["text_encoder_s"] > 0 and record["vae_decode_s"] > 0 and record["end_to_end_s"] > 0
    assert record["model_mb"] < 1500  # 4-bit UNet and CLIP: well under the 4 GB fp32 checkpoint
