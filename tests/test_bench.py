"""`sd-bench`: the quick smoke run's JSON, and the report generator on a fixed input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from sd_onnx.benchmarks.report import markdown, write_report

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
    out = tmp_path / "quick.json"
    cmd = [sys.executable, "-m", "sd_onnx.benchmarks.cli", "--quick", "--json", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert list(report["engines"]) == ["sd-onnx-fp32", "diffusers-pytorch"]
    assert report["machine"]["cores"] >= 1 and isinstance(report["machine"]["isa"], list)
    assert report["settings"]["steps"] == 4 and report["settings"]["threads"] == 2
    for name, record in report["engines"].items():
        for field in NUMERIC_FIELDS:
            assert record[field] > 0, (name, field)
        assert record["unet_step_min_s"] <= record["unet_step_median_s"] <= record["unet_step_max_s"]
        assert record["unet_steps"] == 5  # PNDM runs one extra UNet call in its warm-up
        assert record["versions"]
    assert report["engines"]["sd-onnx-fp32"]["versions"]["onnxruntime"] != "-"
    assert "torch" not in report["engines"]["sd-onnx-fp32"]["versions"]


def test_report_markdown_and_plots_from_fixed_json(tmp_path: Path) -> None:
    report = json.loads(FIXTURE.read_text())
    text = markdown(report)
    assert "Ratios against diffusers-pytorch" in text and "Ratios against optimum-ort" in text
    # sd-onnx: step 3.0 s vs diffusers 8.0 s and Optimum 4.0 s; RSS 4000 vs 5000 and 10000 MB.
    assert "| sd-onnx-fp32 | 0.38x | 0.83x | 0.50x | 0.80x |" in text
    assert "| sd-onnx-fp32 | 0.75x | 0.71x | 0.67x | 0.40x |" in text
    assert report["machine"]["cpu"] in text
    written = write_report(report, tmp_path)
    names = sorted(p.name for p in written)
    assert names == ["benchmark.json", "benchmark.md", "peak_rss.png", "time_per_component.png"]
    for png in tmp_path.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
