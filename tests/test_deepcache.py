"""DeepCache: the ONNX full + shallow UNets against the method's own PyTorch implementation (the DeepCache
package's DeepCacheSDHelper on diffusers' pipeline, same weights, seed and schedule), and the export paths."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sd_onnx.exporter.deepcache import branches, deepcache_folder
from sd_onnx.exporter.errors import ExportError
from sd_onnx.runtime import StableDiffusionPipeline
from sd_onnx.runtime.manifest import Manifest
from sd_onnx.runtime.request import RequestError

PROMPT, NEGATIVE, STEPS, SEED = "a photo of an astronaut riding a horse", "blurry", 7, 11
SETTINGS = {"negative_prompt": NEGATIVE, "num_inference_steps": STEPS, "guidance_scale": 7.5}
SCHEDULERS = {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler"}


@pytest.fixture(scope="module")
def exports(tiny_pipeline: Path, tiny_export: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """The tiny export with DeepCache graphs added at every branch it has."""
    root = tmp_path_factory.mktemp("deepcache")
    config = json.loads((tiny_pipeline / "unet" / "config.json").read_text())
    folders = {}
    for branch in range(len(branches(config))):
        folders[branch] = root / f"branch{branch}"
        deepcache_folder(tiny_export, folders[branch], branch, log=lambda line: None)
    return folders


@torch.no_grad()
def reference(pipe, scheduler: str, interval: int, branch: tuple[int, int] | None) -> np.ndarray:
    """diffusers' pipeline under DeepCacheSDHelper (the paper's authors' implementation for diffusers)."""
    import diffusers
    from DeepCache import DeepCacheSDHelper

    original = pipe.scheduler
    pipe.scheduler = getattr(diffusers, SCHEDULERS[scheduler]).from_config(original.config)
    helper = DeepCacheSDHelper(pipe=pipe)
    if branch is not None:  # the helper numbers branches as level * 3 + layer
        helper.set_params(cache_interval=interval, cache_branch_id=branch[0] * 3 + branch[1])
        helper.enable()
    try:
        generator = torch.Generator().manual_seed(SEED)
        return pipe(PROMPT, generator=generator, output_type="np", **SETTINGS).images
    finally:
        pipe.scheduler = original
        if branch is not None:
            helper.disable()


def level_and_layer(tiny_pipeline: Path, branch: int) -> tuple[int, int]:
    per_level = json.loads((tiny_pipeline / "unet" / "config.json").read_text())["layers_per_block"] + 1
    return divmod(branch, per_level)


@pytest.mark.parametrize(
    "branch, interval, scheduler", [(0, 3, "ddim"), (1, 2, "euler"), (2, 2, "ddim"), (3, 4, "euler")]
)
def test_matches_the_deepcache_reference(reference_pipe, tiny_pipeline, exports, branch, interval, scheduler) -> None:
    ours = StableDiffusionPipeline.from_pretrained(exports[branch], provider="cpu")
    expected = reference(reference_pipe, scheduler, interval, level_and_layer(tiny_pipeline, branch))
    got = ours(PROMPT, seed=SEED, scheduler=scheduler, deepcache_interval=interval, output_type="np", **SETTINGS)
    assert got.images.shape == expected.shape
    assert np.abs(got.images - expected).max() <= 1e-4
    plain = reference(reference_pipe, scheduler, 1, None)
    assert np.abs(plain - expected).max() > 100 * np.abs(got.images - expected).max()  # the cache changed it
    assert got.parameters["DeepCache"] == f"interval {interval}, branch {branch}"


def test_interval_one_is_the_plain_unet(tiny_export: Path, exports) -> None:
    plain = StableDiffusionPipeline.from_pretrained(tiny_export, provider="cpu")
    cached = StableDiffusionPipeline.from_pretrained(exports[0], provider="cpu")
    expected = plain(PROMPT, seed=SEED, output_type="np", **SETTINGS).images
    for interval in (None, 1):
        got = cached(PROMPT, seed=SEED, output_type="np", deepcache_interval=interval, **SETTINGS)
        np.testing.assert_array_equal(got.images, expected)
        assert "DeepCache" not in got.parameters


class UnetCalls:
    """Which graph each UNet call of a pipeline ran: "unet" or "unet_shallow", with its batch; in low-memory mode
    also that no other UNet graph is held when one is requested."""

    def __init__(self, pipe: StableDiffusionPipeline, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[str, int]] = []
        component = pipe.component

        def recording(name: str):
            held = {c for c in pipe.loaded_components if c.startswith("unet")} - {name}
            assert not (pipe.low_memory and held), f"{name} requested while {held} held"
            model = component(name)
            calls = self.calls

            class Recorder:
                def __getattr__(self, attr: str):
                    return getattr(model, attr)

                def __call__(self, **feeds):
                    calls.append((name, len(feeds["sample"])))
                    return model(**feeds)

            return Recorder() if name.startswith("unet") else model

        monkeypatch.setattr(pipe, "component", recording)


def test_schedule_and_guidance_interval_switches(exports, monkeypatch) -> None:
    pipe = StableDiffusionPipeline.from_pretrained(exports[0], provider="cpu", low_memory=True)
    calls = UnetCalls(pipe, monkeypatch)
    pipe(PROMPT, seed=SEED, scheduler="ddim", deepcache_interval=3, output_type="np", **SETTINGS)
    assert [c[0] for c in calls.calls] == ["unet", "unet_shallow", "unet_shallow"] * 2 + ["unet"]
    assert pipe.loaded_components == ()  # low memory: both UNet graphs released after the loop
    calls.calls.clear()
    sigmas = pipe_sigmas(pipe)
    # Guidance for the first two steps only: the third call's batch changes, so it runs full.
    interval = (float(sigmas[2] + sigmas[1]) / 2, 1e9)
    pipe(PROMPT, seed=SEED, scheduler="ddim", deepcache_interval=3, guidance_interval=interval, output_type="np",
         **SETTINGS)  # fmt: skip
    assert calls.calls == [("unet", 2), ("unet_shallow", 2), ("unet", 1), ("unet", 1), ("unet_shallow", 1),
                           ("unet_shallow", 1), ("unet", 1)]  # fmt: skip


def pipe_sigmas(pipe: StableDiffusionPipeline) -> np.ndarray:
    from sd_onnx.runtime.schedulers import make_scheduler

    sched = make_scheduler("ddim", pipe.scheduler_config)
    sched.set_timesteps(STEPS)
    return sched.sigma_at(sched.timesteps)


def test_weights_are_stored_once(tiny_export: Path, exports) -> None:
    folder = exports[0]
    manifest = Manifest.load(folder)
    manifest.verify(folder)
    shallow, unet = manifest.components["unet_shallow"], manifest.components["unet"]
    assert shallow.file == "unet/shallow.onnx" and "unet/model.onnx_data" in shallow.files
    assert shallow.files["unet/model.onnx_data"] == unet.files["unet/model.onnx_data"]
    assert [o.name for o in unet.outputs] == ["out_sample", "deepcache_feature"]
    assert "deepcache_feature" in [i.name for i in shallow.inputs]
    plain_bytes = (tiny_export / "unet" / "model.onnx").stat().st_size
    stored = sum(p.stat().st_size for p in (folder / "unet").iterdir() if p.suffix != ".json")
    assert stored < plain_bytes * 1.1  # the shallow graph adds its structure, not a second copy of weights
    assert manifest.config.deepcache_branch == 0
    assert shallow.validation["max_abs_diff"] <= 1e-5


def test_convert_and_int8_keep_the_derived_graphs(tiny_pipeline: Path, tmp_path: Path) -> None:
    """DeepCache and token-merging graphs made at export, then made again from the int8 UNet by quantization."""
    from sd_onnx.exporter.convert import convert
    from sd_onnx.exporter.quantize_folder import quantize_folder

    fp32 = tmp_path / "fp32"
    convert(str(tiny_pipeline), fp32, deepcache_branch=1, tome=True, log=lambda line: None)
    int8 = tmp_path / "int8"
    quantize_folder(fp32, int8, prompts=("a red circle",), steps=2, log=lambda line: None)
    for folder, precision in ((fp32, "fp32"), (int8, "int8")):
        manifest = Manifest.load(folder)
        manifest.verify(folder)
        assert manifest.config.deepcache_branch == 1 and manifest.config.token_merging
        assert manifest.components["unet_shallow"].precision == manifest.components["unet_tome"].precision == precision
        pipe = StableDiffusionPipeline.from_pretrained(folder, provider="cpu")
        off = pipe(PROMPT, seed=SEED, output_type="np", **SETTINGS).images
        for accelerator in ({"deepcache_interval": 2}, {"tome_ratio": 0.5}):
            on = pipe(PROMPT, seed=SEED, output_type="np", **SETTINGS, **accelerator).images
            assert 0 < np.abs(on - off).mean() < 0.2, (precision, accelerator)
    with pytest.raises(ExportError, match="already has DeepCache graphs"):
        deepcache_folder(fp32, tmp_path / "again", 0)
    with pytest.raises(ExportError, match=r"--deepcache-branch 9: this UNet has branches 0..3"):
        convert(str(tiny_pipeline), tmp_path / "bad", deepcache_branch=9, log=lambda line: None)
    assert not (tmp_path / "bad").exists()


def test_load_time_lora_reaches_both_graphs(tiny_pipeline: Path, tiny_export: Path, exports, tmp_path: Path) -> None:
    from .lora_files import write_diffusers_lora

    lora = write_diffusers_lora(tiny_pipeline, tmp_path / "lora.safetensors", seed=3)
    plain = StableDiffusionPipeline.from_pretrained(tiny_export, provider="cpu", loras=[lora])
    cached = StableDiffusionPipeline.from_pretrained(exports[0], provider="cpu", loras=[lora])
    expected = plain(PROMPT, seed=SEED, output_type="np", **SETTINGS).images
    np.testing.assert_allclose(cached(PROMPT, seed=SEED, output_type="np", **SETTINGS).images, expected, atol=1e-6)
    without = StableDiffusionPipeline.from_pretrained(exports[0], provider="cpu")
    on = cached(PROMPT, seed=SEED, deepcache_interval=2, output_type="np", **SETTINGS).images
    assert (
        np.abs(on - without(PROMPT, seed=SEED, deepcache_interval=2, output_type="np", **SETTINGS).images).max() > 1e-3
    )


@pytest.mark.parametrize(
    "value, message",
    [(0, "deepcache_interval: must be"), (1001, "deepcache_interval: must be"), ("2", "deepcache_interval"),
     (2.5, "deepcache_interval")],
)  # fmt: skip
def test_bad_intervals(exports, value, message) -> None:
    pipe = StableDiffusionPipeline.from_pretrained(exports[0], provider="cpu")
    with pytest.raises(RequestError, match=message):
        pipe(PROMPT, deepcache_interval=value)


def test_a_model_without_the_graphs_says_how_to_get_them(tiny_export: Path) -> None:
    pipe = StableDiffusionPipeline.from_pretrained(tiny_export, provider="cpu")
    with pytest.raises(RequestError, match="deepcache_interval: this model has no DeepCache graphs.*sd-export"):
        pipe(PROMPT, deepcache_interval=2)
    assert pipe(PROMPT, deepcache_interval=1, num_inference_steps=1).images


def test_cli_uses_the_shipped_models_graphs(tmp_path: Path) -> None:
    from PIL import Image

    from sd_onnx.models.shapes import shipped_model

    for model in ((), ("-m", str(shipped_model("int8")))):
        out = tmp_path / "dc.png"
        cmd = [sys.executable, "-m", "sd_onnx.runtime.cli", "prompt", "a red circle on a blue background", *model,
               "--deepcache", "3", "--steps", "6", "--seed", "1", "-o", str(out)]  # fmt: skip
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        assert 'DeepCache: "interval 3, branch 0"' in Image.open(out).text["parameters"]
    bad = subprocess.run([*cmd[:-2], "--deepcache", "0", "-o", str(out)], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and bad.stderr.strip().splitlines()[-1] == "Error: --deepcache: must be >= 1, got 0"


def test_server_and_batch_fields(exports, tiny_export: Path, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from sd_onnx.runtime.server.app import ServeConfig, ServerState, create_app

    for folder, has_graphs in ((exports[0], True), (tiny_export, False)):
        pipe = StableDiffusionPipeline.from_pretrained(folder, provider="cpu")
        with TestClient(create_app(ServerState(ServeConfig()), loader=lambda pipe=pipe: pipe)) as client:
            while client.get("/health").status_code != 200:
                time.sleep(0.05)
            body = {"prompt": "a cat", "steps": 4, "seed": 5, "deepcache_interval": 2}
            r = client.post("/sdapi/v1/txt2img", json=body)
            openai = client.post("/v1/images/generations", json={"prompt": "a cat", "deepcache_interval": 2})
            if has_graphs:
                assert r.status_code == 200 and openai.status_code == 200, r.text
                assert 'DeepCache: "interval 2, branch 0"' in json.loads(r.json()["info"])["infotexts"][0]
            else:
                assert r.status_code == 422 and "deepcache_interval: this model has no DeepCache" in r.text
            for bad in (0, "x", 2.5, 10**6):
                r = client.post("/sdapi/v1/txt2img", json={**body, "deepcache_interval": bad})
                assert r.status_code == 422 and "deepcache_interval" in r.text, (bad, r.text)
    lines = [{"id": "ok", "prompt": "a cat", "steps": 4, "deepcache_interval": 2},
             {"id": "bad", "prompt": "a cat", "deepcache_interval": 0}]  # fmt: skip
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    cmd = [sys.executable, "-m", "sd_onnx.runtime.cli", "batch", str(tmp_path / "p.jsonl"), str(tmp_path / "out"),
           "-m", str(exports[0])]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    records = {r["id"]: r for r in map(json.loads, (tmp_path / "out" / "results.jsonl").read_text().splitlines())}
    assert run.returncode == 1 and records["ok"]["status"] == "ok"
    assert "deepcache_interval" in records["bad"]["error"]
