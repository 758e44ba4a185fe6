"""Bad input to `sd-export convert`: one clear line, non-zero exit, nothing left at OUTPUT."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from sd_onnx.exporter.cli import main


def run_cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["convert", *args])
    return result.exit_code, result.output


def copy_pipeline(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def assert_one_line_error(code: int, output: str, expected: str) -> None:
    assert code != 0
    lines = [line for line in output.strip().splitlines() if line.startswith("Error")]
    assert len(lines) == 1 and expected in lines[0], output
    assert "Traceback" not in output


def test_missing_folder(tmp_path: Path) -> None:
    code, out = run_cli(str(tmp_path / "nope"), str(tmp_path / "out"))
    assert_one_line_error(code, out, "no such folder or file")
    assert not (tmp_path / "out").exists()


def test_folder_that_is_not_a_pipeline(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    code, out = run_cli(str(tmp_path / "empty"), str(tmp_path / "out"))
    assert_one_line_error(code, out, "not a diffusers pipeline")


@pytest.mark.parametrize(
    ("pipeline_class", "message"),
    [
        ("PixArtAlphaPipeline", "unsupported model family PixArtAlphaPipeline"),
        ("StableDiffusionXLPipeline", "incomplete pipeline, missing text_encoder_2, tokenizer_2"),
        ("FluxPipeline", "incomplete pipeline, missing text_encoder_2, tokenizer_2, transformer"),
    ],
)
def test_unsupported_or_incomplete_model_family(
    tiny_pipeline: Path, tmp_path: Path, pipeline_class: str, message: str
) -> None:
    folder = copy_pipeline(tiny_pipeline, tmp_path / "other")
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = pipeline_class
    (folder / "model_index.json").write_text(json.dumps(index))
    code, out = run_cli(str(folder), str(tmp_path / "out"))
    assert_one_line_error(code, out, message)


def test_corrupt_weights_file(tiny_pipeline: Path, tmp_path: Path) -> None:
    folder = copy_pipeline(tiny_pipeline, tmp_path / "corrupt")
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    code, out = run_cli(str(folder), str(tmp_path / "out"))
    assert_one_line_error(code, out, "unet: cannot load weights")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.partial-*"))


def test_no_write_permission(tiny_pipeline: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, out = run_cli(str(tiny_pipeline), str(blocker / "out"))
    assert_one_line_error(code, out, "cannot write to")


def test_existing_output_needs_overwrite(tiny_pipeline: Path, tmp_path: Path) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("old")
    code, out = run_cli(str(tiny_pipeline), str(out_dir), "--components", "vae_decoder")
    assert_one_line_error(code, out, "already exists")
    assert (out_dir / "keep.txt").exists()
    code, out = run_cli(str(tiny_pipeline), str(out_dir), "--components", "vae_decoder", "--overwrite")
    assert code == 0, out
    assert not (out_dir / "keep.txt").exists() and (out_dir / "vae_decoder" / "model.onnx").is_file()
    assert "[1/1] vae_decoder" in out


def test_validation_failure_above_atol(tiny_pipeline: Path, tmp_path: Path) -> None:
    code, out = run_cli(str(tiny_pipeline), str(tmp_path / "out"), "--components", "unet", "--atol", "1e-12")
    assert_one_line_error(code, out, "unet: ONNX output differs from PyTorch")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.partial-*"))


def test_unknown_component(tiny_pipeline: Path, tmp_path: Path) -> None:
    code, out = run_cli(str(tiny_pipeline), str(tmp_path / "out"), "--components", "unet,refiner")
    assert_one_line_error(code, out, "unknown component(s) refiner")


def test_hub_id_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    code, out = run_cli("some-org/some-model", str(tmp_path / "out"))
    assert_one_line_error(code, out, "some-org/some-model: not in the Hugging Face cache (HF_HOME) and the Hub cannot")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT, signal.SIGTERM])
def test_interrupted_export_leaves_nothing_at_output(tiny_pipeline: Path, tmp_path: Path, sig: int) -> None:
    out_dir = tmp_path / "out"
    cmd = [sys.executable, "-m", "sd_onnx.exporter.cli", "convert", str(tiny_pipeline), str(out_dir)]
    # A job started in the background inherits SIGINT ignored (as CI may run us); the child starts from the default.
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".out.partial-*/text_encoder")):
        assert proc.poll() is None, proc.stdout.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(sig)
    output = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode != 0
    assert not out_dir.exists()
    if sig != signal.SIGKILL:  # a catchable signal also cleans up the staging folder
        assert not list(tmp_path.glob(".out.partial-*")), output
        assert "Traceback" not in output


def test_a_failing_trace_is_one_line_and_writes_nothing(
    tiny_pipeline: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk during tracing surfaces from torch.onnx as a RuntimeError; the user gets one line."""
    import torch

    def full_disk(*args: object, **kwargs: object) -> None:
        raise RuntimeError("ONNX export failed. Could not open file or directory: /x/_trace/weight\\nmore")

    monkeypatch.setattr(torch.onnx, "export", full_disk)
    code, out = run_cli(str(tiny_pipeline), str(tmp_path / "out"), "--components", "unet")
    assert_one_line_error(code, out, "unet: torch.onnx could not export it: ONNX export failed. Could not open file")
    assert not (tmp_path / "out").exists()


def test_a_lora_the_loader_refuses_is_named_with_its_first_reason() -> None:
    """torch's "Error(s) in loading state_dict for X:" only introduces its list (an SD3 LoRA fused into FLUX ended
    the one Error line at that colon): the first item and the count of the rest follow it."""
    from sd_onnx.exporter.lora import loader_reason

    mismatch = "\tsize mismatch for transformer_blocks.{}.attn.to_q.lora_B.weight: [16, 4] in the file, [32, 4] here."
    torch_error = RuntimeError("Error(s) in loading state_dict for FluxTransformer2DModel:\n" + "\n".join(
        mismatch.format(i) for i in range(3)))  # fmt: skip
    assert loader_reason(torch_error) == (
        "Error(s) in loading state_dict for FluxTransformer2DModel: size mismatch for "
        "transformer_blocks.0.attn.to_q.lora_B.weight: [16, 4] in the file, [32, 4] here. (+2 more)"
    )
    assert loader_reason(ValueError("no weights\nsecond line")) == "no weights"
    assert loader_reason(AssertionError()) == "AssertionError"
