"""The runtime installs and generates with only its five dependencies: a fresh venv, `pip install .`, no torch;
the installed package draws with its shipped model and no `-m`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from PIL import Image

from sd_onnx.models.shapes.data import parse_caption
from sd_onnx.models.shapes.judge import judge, score

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "diffusers", "transformers", "optimum", "scipy")


def folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


def test_plain_install_has_no_torch_and_generates(tiny_export: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python, sd_run = venv / "bin" / "python", venv / "bin" / "sd-run"
    subprocess.run([python, "-m", "pip", "install", "-q", str(REPO)], check=True, timeout=900)
    installed = subprocess.run([python, "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True).stdout
    names = {line.split("==")[0].lower() for line in installed.splitlines()}
    assert not names & set(HEAVY), names & set(HEAVY)
    check = "import sys, sd_onnx.runtime; assert not {'torch', 'diffusers', 'transformers'} & set(sys.modules)"
    subprocess.run([python, "-c", check], check=True)
    out = tmp_path / "torch-free.png"
    result = subprocess.run(
        [sd_run, "prompt", "a red circle", "-m", tiny_export, "-o", out, "--steps", "3", "--seed", "1"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert out.is_file()
    shipped = tmp_path / "shipped.png"
    prompt = "a red circle on a blue background"
    result = subprocess.run([sd_run, "prompt", prompt, "-o", shipped, "--seed", "3"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    verdict = score(parse_caption(prompt), judge(Image.open(shipped)))
    assert verdict["color"] and verdict["background"], verdict
    print(f"torch-free environment: {folder_mb(venv):.0f} MB")
