"""Token merging (ToMe for SD): the ONNX token-merging UNet against tomesd, the method's own implementation,
patched into diffusers' pipeline on the same weights, seed and settings; and the export paths."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sd_onnx.exporter.errors import ExportError
from sd_onnx.exporter.tome import token_merging_folder
from sd_onnx.runtime import StableDiffusionPipeline
from sd_onnx.runtime.manifest import Manifest
from sd_onnx.runtime.request import RequestError

PROMPT, NEGATIVE, STEPS, SEED = "a photo of an astronaut riding a horse", "blurry", 5, 11
SETTINGS = {"negative_prompt": NEGATIVE, "num_inference_steps": STEPS, "guidance_scale": 7.5}


@pytest.fixture(scope="module")
def merging_export(tiny_export: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tome") / "tiny-tome"
    token_merging_folder(tiny_export, out, log=lambda line: None)
    return out


@torch.no_grad()
def reference(pipe, ratio: float, size: int) -> np.ndarray:
    """diffusers' pipeline patched by tomesd (deterministic partitions, self-attention only, outermost level)."""
    import tomesd

    tomesd.apply_patch(pipe, ratio=ratio, use_rand=False)
    try:
        generator = torch.Generator().manual_seed(SEED)
        return pipe(PROMPT, generator=generator, height=size, width=size, output_type="np", **SETTINGS).images
    finally:
        tomesd.remove_patch(pipe)


@pytest.mark.parametrize("ratio, size", [(0.5, 32), (0.3, 48), (0.75, 32)])
def test_matches_tomesd(reference_pipe, merging_export: Path, ratio: float, size: int) -> None:
    ours = StableDiffusionPipeline.from_pretrained(merging_export, provider="cpu")
    expected = reference(reference_pipe, ratio, size)
    got = ours(PROMPT, seed=SEED, tome_ratio=ratio, height=size, width=size, output_type="np", **SETTINGS)
    assert got.images.shape == expected.shape == (1, size, size, 3)
    error = np.abs(got.images - expected).max()
    assert error <= 1e-4
    plain = ours(PROMPT, seed=SEED, height=size, width=size, output_type="np", **SETTINGS).images
    assert np.abs(plain - expected).max() > 100 * error  # merging changed the picture
    assert got.parameters["ToMe ratio"] == ratio


def test_ratio_zero_and_none_are_the_plain_unet(tiny_export: Path, merging_export: Path) -> None:
    plain = StableDiffusionPipeline.from_pretrained(tiny_export, provider="cpu")
    merging = StableDiffusionPipeline.from_pretrained(merging_export, provider="cpu")
    expected = plain(PROMPT, seed=SEED, output_type="np", **SETTINGS).images
    for ratio in (None, 0, 0.0):
        got = merging(PROMPT, seed=SEED, tome_ratio=ratio, output_type="np", **SETTINGS)
        np.testing.assert_array_equal(got.images, expected)
        assert "ToMe ratio" not in got.parameters
    validation = Manifest.load(merging_export).components["unet_tome"].validation
    assert validation["ratio_0_max_abs_diff"] <= 1e-5 < validation["ratio_0.5_mean_abs_change"]


def test_weights_stored_once(merging_export: Path, tmp_path: Path) -> None:
    manifest = Manifest.load(merging_export)
    manifest.verify(merging_export)
    tome, unet = manifest.components["unet_tome"], manifest.components["unet"]
    assert tome.file == "unet/tome.onnx" and tome.files["unet/model.onnx_data"] == unet.files["unet/model.onnx_data"]
    assert [i.name for i in tome.inputs][-1] == "tome_ratio" and tome.inputs[-1].dtype == "float64"
    assert (merging_export / "unet" / "tome.onnx").stat().st_size < 0.2 * (
        merging_export / "unet" / "model.onnx_data"
    ).stat().st_size
    with pytest.raises(ExportError, match="already has the token-merging UNet"):
        token_merging_folder(merging_export, tmp_path / "again")


def test_refused_where_it_cannot_apply(tiny_sdxl, tiny_export: Path, merging_export: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="no self-attention at its outermost level"):
        token_merging_folder(tiny_sdxl[1], tmp_path / "sdxl")
    assert not (tmp_path / "sdxl").exists()
    plain = StableDiffusionPipeline.from_pretrained(tiny_export, provider="cpu")
    with pytest.raises(RequestError, match="tome_ratio: this model has no token-merging UNet.*sd-export"):
        plain(PROMPT, tome_ratio=0.5)
    merging = StableDiffusionPipeline.from_pretrained(merging_export, provider="cpu")
    for value, message in ((0.8, "tome_ratio: must be"), (-0.1, "tome_ratio: must be"), ("x", "tome_ratio")):
        with pytest.raises(RequestError, match=message):
            merging(PROMPT, tome_ratio=value)


def test_cli_server_and_batch(merging_export: Path, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient
    from PIL import Image

    from sd_onnx.runtime.server.app import ServeConfig, ServerState, create_app

    out = tmp_path / "tome.png"
    cmd = [sys.executable, "-m", "sd_onnx.runtime.cli", "prompt", "a red circle", "-m", str(merging_export),
           "--tome", "0.5", "--steps", "3", "-o", str(out)]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "ToMe ratio: 0.5" in Image.open(out).text["parameters"]
    bad = subprocess.run([*cmd[:-4], "--tome", "0.9", "-o", str(out)], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and bad.stderr.strip().splitlines()[-1].startswith("Error: --tome: must be")
    pipe = StableDiffusionPipeline.from_pretrained(merging_export, provider="cpu")
    with TestClient(create_app(ServerState(ServeConfig()), loader=lambda: pipe)) as client:
        while client.get("/health").status_code != 200:
            pass
        r = client.post("/sdapi/v1/txt2img", json={"prompt": "a cat", "steps": 3, "tome_ratio": 0.5})
        assert r.status_code == 200 and "ToMe ratio: 0.5" in json.loads(r.json()["info"])["infotexts"][0]
        assert client.post("/v1/images/generations", json={"prompt": "a cat", "tome_ratio": 0.5}).status_code == 200
        for bad_value in (0.9, "x", [0.5]):
            r = client.post("/sdapi/v1/txt2img", json={"prompt": "a cat", "tome_ratio": bad_value})
            assert r.status_code == 422 and "tome_ratio" in r.text, (bad_value, r.text)
        both = client.post("/sdapi/v1/txt2img", json={"prompt": "a cat", "tome_ratio": 0.5, "deepcache_interval": 2})
        assert both.status_code == 422 and "deepcache_interval" in both.text
    (tmp_path / "p.jsonl").write_text(json.dumps({"id": "a", "prompt": "a cat", "steps": 3, "tome_ratio": 0.5}) + "\n")
    batch = [sys.executable, "-m", "sd_onnx.runtime.cli", "batch", str(tmp_path / "p.jsonl"), str(tmp_path / "b"),
             "-m", str(merging_export)]  # fmt: skip
    assert subprocess.run(batch, capture_output=True, text=True, timeout=120).returncode == 0
    assert "ToMe ratio: 0.5" in Image.open(tmp_path / "b" / "a.png").text["parameters"]
