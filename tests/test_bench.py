"""`sd-bench`: the quick smoke run's JSON, and the report generator on a fixed input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import onnxruntime as ort
import pytest
from click.testing import CliRunner

from sd_onnx.benchmarks.cli import ENGINES, QUICK_ENGINES
from sd_onnx.benchmarks.peers import PEERS_ENV
from sd_onnx.benchmarks.report import markdown, write_report
from sd_onnx.runtime.openvino_engine import default_precision

FIXTURE = Path(__file__).parent / "data" / "bench_fixture.json"
NUMERIC_FIELDS = (
    "load_first_s",
    "load_second_s",
    "text_encoder_s",
    "first_step_s",
    "unet_step_median_s",
    "unet_step_min_s",
    "unet_step_max_s",
    "vae_decode_s",
    "end_to_end_s",
    "peak_rss_mb",
    "install_mb",
    "model_mb",
)


def test_quick_run_reports_every_field(tmp_path: Path) -> None:
    """Without peers' environments the quick run still runs sd-onnx and diffusers, and says for every peer
    engine how to set it up."""
    out = tmp_path / "quick.json"
    cmd = [sys.executable, "-m", "sd_onnx.benchmarks.cli", "--quick", "--json", str(out)]
    env = {**os.environ, PEERS_ENV: str(tmp_path / "no-peers")}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert list(report["engines"]) == [
        "sd-onnx-int8", "sd-onnx-int8-ort-cpu", "sd-onnx-int8-openvino", "sd-onnx-fp32", "sd-onnx-fp32-openvino",
        "sd-onnx-int8-low-memory", "diffusers-pytorch",
    ]  # fmt: skip
    peers = [name for name in QUICK_ENGINES if ENGINES[name].peer]
    assert sorted(report["skipped"]) == sorted(peers) and "openvino-fp32" in peers
    assert report["skipped"]["openvino-int8"] == "no openvino environment: sd-bench peers setup --only openvino"
    assert "openvino-int8: skipped (no openvino environment: sd-bench peers setup --only openvino)" in result.stderr
    assert report["machine"]["cores"] >= 1 and isinstance(report["machine"]["isa"], list)
    assert report["settings"]["steps"] == 4 and report["settings"]["threads"] == 2
    for name, record in report["engines"].items():
        for field in NUMERIC_FIELDS:
            assert record[field] > 0, (name, field)
        assert record["unet_step_min_s"] <= record["unet_step_median_s"] <= record["unet_step_max_s"]
        assert record["unet_steps"] == 5  # PNDM runs one extra UNet call in its warm-up
        assert record["cold_first_image_s"] > record["end_to_end_s"]  # it also counts imports and the load
        assert record["versions"]
        if name.startswith("sd-onnx"):  # a 1-step image with empty caches ran first, in its own process
            assert record["first_image_empty_caches_s"] > 0
    assert report["engines"]["sd-onnx-fp32"]["versions"]["onnxruntime"] != "-"
    assert "torch" not in report["engines"]["sd-onnx-fp32"]["versions"]
    openvino = report["engines"]["sd-onnx-int8-openvino"]
    assert openvino["engine"] == f"OpenVINO {openvino['versions']['openvino']} {default_precision()}"
    assert report["engines"]["sd-onnx-int8-ort-cpu"]["engine"].endswith("CPUExecutionProvider")
    text = markdown(report)
    assert f"- sd-onnx-int8-openvino: sd-onnx 0.1.0, onnxruntime {ort.__version__}" in text
    assert "| openvino-fp32 | skipped: no openvino environment: sd-bench peers setup --only openvino |" in text


def test_turbo_style_run_one_step_without_guidance_and_a_failing_peer(tiny_pipeline: Path, tmp_path: Path) -> None:
    """`run` with 1 step and guidance 0 (the Turbo row): every engine runs a single unguided UNet call, and the
    report goes under its own name beside the main one. A peer whose export fails (out of memory, a build
    error) is reported as failed, with its reason, beside the engines that ran; the run goes on."""
    from sd_onnx.benchmarks.cli import main

    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'MemoryError: cannot allocate' >&2\nexit 1\n")
    fake.chmod(0o755)
    args = ["run", "--model", str(tiny_pipeline), "--steps", "1", "--guidance", "0", "--size", "32"]
    args += ["--engines", "optimum-ort,sd-onnx-fp32,diffusers-pytorch", "--optimum-python", str(fake)]
    args += ["--name", "turbo", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"), "--low-memory"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "turbo.json").read_text())
    assert report["settings"]["guidance"] == 0 and report["settings"]["steps"] == 1
    assert "export_fp32" in report["preparation"]
    assert "--work <work>" in report["command"] and str(tmp_path) not in report["command"]  # no machine paths
    failed = report["engines"].pop("optimum-ort")
    assert failed["error"] == "optimum-ort export failed: MemoryError: cannot allocate" and failed["seconds"] >= 0
    assert list(report["engines"]) == ["sd-onnx-fp32", "diffusers-pytorch"]
    for record in report["engines"].values():
        assert record["unet_steps"] == 1 and record["end_to_end_s"] > 0
    assert (tmp_path / "out" / "turbo_peak_rss.png").is_file()
    text = (tmp_path / "out" / "turbo.md").read_text()
    assert "| optimum-ort | failed: optimum-ort export failed: MemoryError: cannot allocate |" in text
    assert "Ratios against optimum-ort" not in text
    refused = CliRunner().invoke(main, ["run", "--random", "sd15", "--model", str(tiny_pipeline)])
    assert refused.exit_code != 0 and "give exactly one of --model PATH or --random" in refused.output


def test_tiny_autoencoder_rows_skip_engines_without_one(tiny_pipeline: Path, tmp_path: Path) -> None:
    """`--tiny-vae FOLDER`: our export carries it beside the VAE and decodes with it, diffusers swaps it in,
    and engines without such an option are listed as skipped, with the reason; a work folder whose export has
    no tiny autoencoder is refused rather than silently decoding with the VAE."""
    from diffusers import AutoencoderTiny

    from sd_onnx.benchmarks.cli import main

    from .test_tiny_vae import TINY_AUTOENCODER

    AutoencoderTiny(**TINY_AUTOENCODER).save_pretrained(tmp_path / "taesd")
    args = ["run", "--model", str(tiny_pipeline), "--steps", "1", "--guidance", "0", "--size", "32", "--name", "t"]
    args += ["--engines", "sd-onnx-fp32,diffusers-pytorch,openvino-fp32", "--openvino-python", sys.executable]
    args += ["--out", str(tmp_path / "out")]
    result = CliRunner().invoke(main, [*args, "--work", str(tmp_path / "w"), "--tiny-vae", str(tmp_path / "taesd")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "t.json").read_text())
    assert list(report["engines"]) == ["sd-onnx-fp32", "diffusers-pytorch"]
    assert report["settings"]["vae"] == "tiny autoencoder"
    assert report["skipped"] == {"openvino-fp32": "no tiny-autoencoder option in this engine"}
    assert all(record["unet_steps"] == 1 for record in report["engines"].values())
    assert "--tiny-vae <tiny-vae>" in report["command"]
    shutil.copytree(tmp_path / "w", tmp_path / "plain")  # a work folder whose export has no tiny autoencoder
    for manifest_file in (tmp_path / "plain").rglob("sd_onnx.json"):
        manifest = json.loads(manifest_file.read_text())
        for name in ("tiny_vae_decoder", "tiny_vae_encoder"):
            manifest["components"].pop(name, None)
        manifest["config"]["tiny_vae_scaling_factor"] = manifest["config"]["tiny_vae_shift_factor"] = None
        manifest_file.write_text(json.dumps(manifest))
    refused = CliRunner().invoke(
        main, [*args, "--work", str(tmp_path / "plain"), "--tiny-vae", str(tmp_path / "taesd")]
    )
    assert refused.exit_code != 0 and "has no tiny autoencoder: use another --work" in refused.output
    bad = CliRunner().invoke(main, [*args, "--work", str(tmp_path / "w"), "--tiny-vae", str(tmp_path)])
    assert bad.exit_code != 0 and "not a diffusers AutoencoderTiny folder" in bad.output


def test_report_markdown_and_plots_from_fixed_json(tmp_path: Path) -> None:
    report = json.loads(FIXTURE.read_text())
    text = markdown(report)
    assert "Ratios against diffusers-pytorch" in text and "Goal:" not in text  # no sd-onnx-int8 row
    # sd-onnx: step 3.0 s vs diffusers 8.0 s; VAE 5.0 vs 6.0 s; end to end 20 vs 40 s; RSS 4000 vs 5000 MB.
    assert "| sd-onnx-fp32 | 0.38x | 0.83x | 0.50x | - | 0.80x |" in text
    assert report["machine"]["cpu"] in text
    written = write_report(report, tmp_path)
    names = sorted(p.name for p in written)
    assert names == ["benchmark.json", "benchmark.md", "peak_rss.png", "time_per_component.png"]
    for png in tmp_path.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_goal_against_the_best_peer_per_column() -> None:
    """The goal table takes, per column, the best engine that is not sd-onnx (Optimum's step, the OpenVINO
    row's RSS) and says met or missed by how much; ratio tables are against sd-onnx-int8 first."""
    report = json.loads(FIXTURE.read_text())
    engines = report["engines"]
    engines["sd-onnx-int8"] = {**engines["sd-onnx-fp32"], "unet_step_median_s": 3.0, "end_to_end_s": 36.0}
    engines["sd-onnx-int8"]["peak_rss_mb"] = 2000.0
    engines["openvino-int8"] = {**engines["optimum-ort"], "unet_step_median_s": 5.0, "end_to_end_s": 24.0}
    engines["openvino-int8"]["peak_rss_mb"] = 2500.0
    # components only (our graphs under OpenVINO): not a peer's configuration, even with the fastest step
    engines["openvino-onnx-int8"] = {**engines["openvino-int8"], "end_to_end_s": None, "unet_step_median_s": 1.0}
    engines["sdcpp-q8_0"] = {"error": "killed by the system (out of memory)"}
    text = markdown(report)
    assert "| UNet/transformer step (s) | optimum-ort | 4.00 | 3.00 | 0.75x | met (<= 0.8x) |" in text
    assert "| end to end (s) | openvino-int8 | 24.00 | 36.00 | 1.50x | missed by 1.88x (<= 0.8x) |" in text
    assert "| peak RSS (MB) | openvino-int8 | 2500 | 2000 | 0.80x | met (<= 1.0x) |" in text
    assert text.index("Ratios against sd-onnx-int8") < text.index("Ratios against diffusers-pytorch")
    assert "| openvino-onnx-int8 | 0.33x | " in text and "| sdcpp-q8_0 | failed: killed" in text


def test_components_interleaves_runs_and_reports_ratios_to_the_first(
    tiny_export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sd_onnx.benchmarks import components
    from sd_onnx.benchmarks.cli import main

    order: list[str] = []
    open_graph = components.open_graph

    class Recorded:
        """A graph that logs which folder's graph runs, and on which engine."""

        def __init__(self, file: Path, threads: int, provider: str) -> None:
            self.graph, self.folder = open_graph(file, threads, provider), file.parent.parent.name
            self.input_dtype, self.input_rank = self.graph.input_dtype, self.graph.input_rank

        def __call__(self, **feeds: object) -> list:
            order.append((self.folder, self.graph.provider))
            return self.graph(**feeds)

    monkeypatch.setattr(components, "open_graph", Recorded)
    other = tmp_path / "other"
    other.symlink_to(tiny_export)
    out = tmp_path / "components.json"
    args = ["components", f"a={tiny_export}", f"b={other}@openvino:f32", "--size", "64", "--rounds", "3"]
    result = CliRunner().invoke(main, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["engines"] == {"a": "cpu", "b": "openvino:f32"}
    for component in ("unet", "vae_decoder"):
        assert report[component]["ratio"]["a"] == 1.0
        assert all(len(report[component]["seconds"][n]) == 3 for n in ("a", "b"))
    # Per component: two warm-up runs each, then rounds that alternate a, b, a, b, ...
    a, b = (tiny_export.name, "CPUExecutionProvider"), ("other", "OpenVINO")
    assert order == ([a, a, b, b] + [a, b] * 3) * 2
    for bad, message in (("nonsense", "NAME=FOLDER"), (f"a={tiny_export}@openvino:f64", "unknown precision 'f64'")):
        result = CliRunner().invoke(main, ["components", bad])
        assert result.exit_code != 0 and message in result.output, result.output


def test_peers_get_the_engine_modules_without_sd_onnx(tmp_path: Path) -> None:
    """A peer's environment has no sd-onnx: run_engine lends it a folder with the engine modules alone, and
    they import from there (standard library and NumPy only)."""
    from sd_onnx.benchmarks.cli import _engine_modules

    root = _engine_modules(tmp_path)
    code = "import sd_onnx.benchmarks.engines as e, sys; print(e.__file__); print(sorted(e.RUNNERS))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"PYTHONPATH": str(root)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].startswith(str(root))
    assert "optimum-ort" in result.stdout


def test_report_command_keeps_notes_in_the_json_and_renders_them(tmp_path: Path) -> None:
    from sd_onnx.benchmarks.cli import main

    report = tmp_path / "peers.json"
    report.write_text(FIXTURE.read_text())
    (tmp_path / "notes.md").write_text("Optimum wins the VAE column: its decoder graph is unfused.\n")
    result = CliRunner().invoke(main, ["report", str(report), "--notes", str(tmp_path / "notes.md")])
    assert result.exit_code == 0, result.output
    assert json.loads(report.read_text())["notes"].startswith("Optimum wins the VAE column")
    text = (tmp_path / "peers.md").read_text()
    assert "## Notes\n\nOptimum wins the VAE column: its decoder graph is unfused." in text
    assert text.index("## Notes") < text.index("Library versions per engine")
    assert (tmp_path / "peers_peak_rss.png").is_file() and (tmp_path / "peers_time_per_component.png").is_file()
    (tmp_path / "other.json").write_text("{}")
    refused = CliRunner().invoke(main, ["report", str(tmp_path / "other.json")])
    assert refused.exit_code != 0 and "not an sd-bench report (no engines, settings" in refused.output
    (tmp_path / "broken.json").write_text("{")
    refused = CliRunner().invoke(main, ["report", str(tmp_path / "broken.json")])
    assert refused.exit_code != 0 and "not JSON" in refused.output
