"""`sd-run prompt` and `sd-run info`: image, PNG metadata, and one-line errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from sd_onnx.runtime.cli import main


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def test_prompt_writes_png_with_a1111_parameters(tiny_export: Path, tmp_path: Path) -> None:
    out = tmp_path / "img.png"
    code, output = run(
        "prompt", "a red circle", "-m", str(tiny_export), "-o", str(out), "--negative", "blue",
        "--steps", "3", "--seed", "7", "--scheduler", "Euler a", "--width", "24", "--height", "16",
    )  # fmt: skip
    assert code == 0, output
    assert str(out) in output
    image = Image.open(out)
    assert image.size == (24, 16)
    params = image.text["parameters"]
    assert params.startswith("a red circle\nNegative prompt: blue\nSteps: 3, Sampler: euler_a, CFG scale: 7.5, Seed: 7")


def test_batch_writes_one_file_per_image(tiny_export: Path, tmp_path: Path) -> None:
    code, output = run(
        "prompt", "x", "-m", str(tiny_export), "-o", str(tmp_path / "b.png"), "--steps", "2", "--batch", "2"
    )
    assert code == 0, output
    assert (tmp_path / "b-0.png").is_file() and (tmp_path / "b-1.png").is_file()


def test_info_prints_manifest_and_providers(tiny_export: Path) -> None:
    code, output = run("info", str(tiny_export))
    assert code == 0
    assert "unet: unet/model.onnx fp32 opset 17" in output and "CPUExecutionProvider" in output


def corrupt_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    with open(dst / "unet" / "model.onnx", "r+b") as f:
        f.write(b"garbage")
    return dst


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--width", "30"], "multiples of 8"),
        (["--steps", "0"], "num_inference_steps must be an integer >= 1"),
        (["--scheduler", "heun"], "unknown scheduler 'heun'"),
        (["--provider", "tpu"], "unknown provider 'tpu'"),
        (["-m", "/nonexistent/model"], "no such model folder"),
    ],
)
def test_user_errors_are_one_line(tiny_export: Path, tmp_path: Path, args: list[str], message: str) -> None:
    base = ["prompt", "x", "-m", str(tiny_export), "-o", str(tmp_path / "o.png"), "--steps", "2"]
    code, output = run(*base, *args)
    errors = [line for line in output.splitlines() if line.startswith("Error")]
    assert code != 0 and len(errors) == 1 and message in errors[0], output
    assert "Traceback" not in output and not (tmp_path / "o.png").exists()


def test_corrupt_and_missing_model_files(tiny_export: Path, tmp_path: Path) -> None:
    folder = corrupt_copy(tiny_export, tmp_path / "corrupt")
    code, output = run("prompt", "x", "-m", str(folder), "--steps", "1", "-o", str(tmp_path / "o.png"))
    assert code != 0 and "sha256 mismatch" in output
    (folder / "unet" / "model.onnx").unlink()
    code, output = run("prompt", "x", "-m", str(folder), "--steps", "1", "-o", str(tmp_path / "o.png"))
    assert code != 0 and "missing model file" in output


def test_unavailable_provider_falls_back_to_cpu_with_warning(tiny_export: Path, tmp_path: Path) -> None:
    out = tmp_path / "cuda.png"
    code, output = run("prompt", "x", "-m", str(tiny_export), "-o", str(out), "--steps", "1", "--provider", "cuda")
    assert code == 0 and out.is_file()
    assert "falling back to CPU" in output
