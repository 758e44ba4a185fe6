"""Hub ids as model paths, against a local stand-in for the Hub (HF_ENDPOINT): the CLI and the Python API fetch
only the runtime's files into HF_HOME, reuse them offline, honour revisions, and fail in one line."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from .fake_hub import COMMIT, fake_hub

REPO = "sd-onnx-test/tiny-onnx"


@pytest.fixture(scope="module")
def hub_repo(tiny_export: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny export as a Hub repository would hold it, plus PyTorch weights the runtime must not fetch."""
    repo = tmp_path_factory.mktemp("hub") / "repo"
    shutil.copytree(tiny_export, repo)
    (repo / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 4096)
    return repo


def run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, env={**os.environ, **env}, capture_output=True, text=True, timeout=300, check=False)


def sd_run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "sd_onnx.runtime.cli", *args], env)


def test_cli_fetches_a_hub_id_and_reuses_it_offline(hub_repo: Path, tmp_path: Path) -> None:
    home = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1"}
    with fake_hub({REPO: hub_repo}) as (endpoint, requests):
        online = {**home, "HF_ENDPOINT": endpoint}
        result = sd_run("prompt", "a cat", "-m", REPO, "--steps", "2", "-o", str(tmp_path / "a.png"), env=online)
        assert result.returncode == 0, result.stderr
        assert any("/resolve/" in r for r in requests)
    assert Image.open(tmp_path / "a.png").size == (32, 32)
    snapshot = tmp_path / "hf" / "hub" / "models--sd-onnx-test--tiny-onnx" / "snapshots" / COMMIT
    assert (snapshot / "unet" / "model.onnx").is_file() and (snapshot / "sd_onnx.json").is_file()
    assert not (snapshot / "unet" / "diffusion_pytorch_model.safetensors").exists()  # only what the runtime reads

    # The server is gone: offline mode serves the cached snapshot, and names what is missing otherwise.
    offline = {**home, "HF_ENDPOINT": endpoint, "HF_HUB_OFFLINE": "1"}
    result = sd_run("prompt", "a cat", "-m", REPO, "--steps", "2", "-o", str(tmp_path / "b.png"), env=offline)
    assert result.returncode == 0, result.stderr
    result = sd_run("info", "-m", "sd-onnx-test/other-model", env=offline)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("Error: sd-onnx-test/other-model: not in the Hugging")
    assert "HF_HUB_OFFLINE=1" in result.stderr


def test_api_revisions_and_hub_errors(hub_repo: Path, tmp_path: Path) -> None:
    script = (
        "import sys\n"
        "from sd_onnx.runtime import DiffusionPipeline\n"
        "kw = {'revision': sys.argv[2]} if len(sys.argv) > 2 else {}\n"
        "try:\n"
        "    pipe = DiffusionPipeline.from_pretrained(sys.argv[1], provider='cpu', **kw)\n"
        "    print('OK', pipe.model_name, pipe.folder.name)\n"
        "except ValueError as exc:\n"
        "    print('ValueError', exc)\n"
    )
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1"}
    with fake_hub({REPO: hub_repo}) as (endpoint, _):
        env["HF_ENDPOINT"] = endpoint

        def load(*args: str) -> str:
            result = run([sys.executable, "-c", script, *args], env)
            assert result.returncode == 0, result.stderr
            return result.stdout.strip()

        assert load(REPO, "v1") == f"OK tiny-sd {COMMIT}"
        assert load(f"{REPO}@{COMMIT}") == f"OK tiny-sd {COMMIT}"
        assert load(REPO, "nope") == f"ValueError {REPO}@nope: the Hugging Face Hub repository has no revision 'nope'"
        assert load("sd-onnx-test/missing").startswith("ValueError sd-onnx-test/missing: no such folder, nor a Hugging")
        assert load(f"{REPO}@v1", "main").startswith(f"ValueError {REPO}@v1: names revision 'v1' but revision='main'")
        assert load("./not/a-folder") == "ValueError not/a-folder: no such model folder"
