"""The hires fix (runtime/hires.py) as A1111 runs it: the latent interpolation against torch, the second pass's
schedule, the two passes against the same passes run by hand through the Python API, the checks, the A1111
route (SillyTavern's body) and the CLI."""

from __future__ import annotations

import base64
import io
import json
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given
from hypothesis import settings as examples
from hypothesis import strategies as st
from PIL import Image

from sd_onnx.runtime import GenerationRequest, HiresFix, Limits, RequestError, StableDiffusionPipeline, hires_fix
from sd_onnx.runtime.hires import second_pass_schedule
from sd_onnx.runtime.hires_upscalers import IMAGE_UPSCALERS, LATENT_MODES, find_upscaler, interpolate

PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def pipe(tiny_export: Path) -> StableDiffusionPipeline:
    return StableDiffusionPipeline.from_pretrained(tiny_export, provider="cpu", scheduler="euler")


def test_latent_modes_interpolate_as_torch() -> None:
    rng = np.random.default_rng(0)
    for source in ((8, 8), (5, 7), (64, 48)):
        latents = (rng.standard_normal((2, 4, *source)) * 3).astype(np.float32)
        for size in ((16, 16), (11, 13), (4, 5), source, (2 * source[0], 3 * source[1]), (128, 96)):
            for name, (mode, antialias) in LATENT_MODES.items():
                expected = torch.nn.functional.interpolate(
                    torch.from_numpy(latents), size=size, mode=mode, antialias=antialias
                ).numpy()
                got = interpolate(latents, size, mode, antialias)
                assert got.dtype == np.float32 and got.shape == expected.shape
                if mode.startswith("nearest"):  # a copy of the chosen rows and columns
                    assert np.array_equal(got, expected), (name, source, size)
                else:  # float32 rounding (torch fuses multiply-adds)
                    assert np.abs(got - expected).max() < 3e-5, (name, source, size)


def test_upscalers_are_found_by_name() -> None:
    assert find_upscaler(None).name == "Latent" and find_upscaler("latent (BICUBIC)").mode == "bicubic"
    assert find_upscaler("lanczos").resize is IMAGE_UPSCALERS["Lanczos"] and find_upscaler("ESRGAN_4x") is None
    model = {"ESRGAN_4x": lambda image, width, height: image}  # a deployment's model upscaler joins the list
    assert find_upscaler("esrgan_4x", model).name == "ESRGAN_4x"
    picture = Image.fromarray(np.random.default_rng(1).integers(0, 255, (20, 30, 3), np.uint8))
    for name in ("None", "Lanczos", "Nearest"):
        assert find_upscaler(name).resize(picture, 75, 50).size == (75, 50)
    # A1111's Nearest scales by the ratio with its filter (x2.5 -> 75x50, a multiple of 8 away), then Lanczos.
    stepped = picture.resize((75, 50), Image.Resampling.NEAREST).resize((72, 48), Image.Resampling.LANCZOS)
    expected = stepped.resize((75, 50), Image.Resampling.LANCZOS)
    assert np.array_equal(np.asarray(find_upscaler("Nearest").resize(picture, 75, 50)), np.asarray(expected))


def test_second_pass_runs_exactly_the_hires_steps() -> None:
    """A1111: int(steps / min(denoising, 0.999)) steps scheduled, the last `steps` of them run."""
    for steps in range(1, 60):
        for denoising in (0.01, 0.1, 0.3, 0.33, 0.45, 0.5, 0.7, 0.75, 0.999, 1.0):
            schedule, strength = second_pass_schedule(steps, denoising)
            assert schedule == int(steps / min(denoising, 0.999)) and 0 < strength <= 1
            assert int(schedule * strength) == steps, (steps, denoising)
    assert second_pass_schedule(10, 0.5) == (20, 0.5)


def test_target_sizes_follow_a1111() -> None:
    """calculate_target_resolution: scale, one side keeping the aspect, both sides cropping the latents."""
    config = SimpleNamespace(vae_scale_factor=8)
    first = SimpleNamespace(width=512, height=768, steps=20)
    plan = HiresFix(scale=1.5).plan(first, config)
    assert plan.upscale == (768, 1152) and plan.size == (768, 1152) and plan.crop == (0, 0)
    assert HiresFix(resize_x=1024).plan(first, config).size == (1024, 1536)
    assert HiresFix(resize_y=1024).plan(first, config).size == (680, 1024)
    both = HiresFix(resize_x=1024, resize_y=1024).plan(first, config)
    assert both.upscale == (1024, 1536) and both.crop == (0, 64) and both.size == (1024, 1024)
    latents = np.arange(192 * 128, dtype=np.float32).reshape(1, 1, 192, 128)
    assert np.array_equal(both.cropped_latents(latents), latents[:, :, 32:160])  # A1111's [t//2 : H - (t+1)//2]
    wide = HiresFix(resize_x=1024, resize_y=512).plan(SimpleNamespace(width=512, height=512, steps=4), config)
    assert wide.upscale == (1024, 1024) and wide.size == (1024, 512) and (wide.steps, wide.schedule) == (4, 5)


@pytest.mark.parametrize("upscaler", ["Latent", "Latent (bicubic antialiased)", "Latent (nearest)"])
def test_latent_hires_is_the_two_passes_by_hand(pipe: StableDiffusionPipeline, upscaler: str) -> None:
    """First pass to latents, interpolated, img2img on them at the target size with the same seed: pixel for pixel."""
    mode, antialias = LATENT_MODES[upscaler]
    steps_seen = []
    settings = HiresFix(scale=2, upscaler=upscaler, steps=3, denoising_strength=0.5)
    request = GenerationRequest(PROMPT, steps=4, width=32, height=24, seed=11, batch=2, seed_per_image=True)
    out = hires_fix(pipe, request, settings, callback=lambda i, total, latents: steps_seen.append((i, total)))
    second = []
    for seed in (11, 12):  # A1111's batch: image i from seed + i
        first = pipe(PROMPT, num_inference_steps=4, width=32, height=24, output_type="latent", seed=seed).images
        upscaled = interpolate(first, (first.shape[2] * 2, first.shape[3] * 2), mode, antialias)
        # 3 steps at strength 0.5: the last 3 of a 6-step schedule
        second.append(pipe(PROMPT, image=upscaled, strength=0.5, num_inference_steps=6, seed=seed).images[0])
    assert [image.size for image in out.images] == [(64, 48), (64, 48)]
    for got, expected in zip(out.images, second, strict=True):
        assert np.array_equal(np.asarray(got), np.asarray(expected))
    assert steps_seen == [(i, 7) for i in range(7)]  # one run of 4 + 3 steps
    params = out.parameters
    assert params["Size"] == "32x24" and params["Steps"] == 4 and params["Denoising strength"] == 0.5
    assert params["Hires upscale"] == 2 and params["Hires steps"] == 3 and params["Hires upscaler"] == upscaler
    # The same settings on the request run from generate (the CLI's and the server's path).
    again = pipe.generate(pipe.prepare(replace(request, hires=settings)))
    assert np.array_equal(np.asarray(again.images[1]), np.asarray(out.images[1]))


def test_image_upscaler_hires_encodes_the_resized_picture(pipe: StableDiffusionPipeline) -> None:
    """Image upscalers decode, resize as A1111 and encode the picture again (the posterior's mean)."""
    from sd_onnx.runtime.image import from_pil

    class Mean:
        def randn(self, shape: tuple[int, ...]) -> np.ndarray:
            return np.zeros(shape, np.float32)

    settings = HiresFix(scale=1.5, upscaler="Lanczos", denoising_strength=0.7, prompt="a green square")
    out = hires_fix(pipe, GenerationRequest(PROMPT, steps=5, width=32, height=32, seed=3), settings)
    picture = pipe(PROMPT, num_inference_steps=5, width=32, height=32, seed=3).images[0]
    resized = IMAGE_UPSCALERS["Lanczos"](picture, 48, 48)
    latents = pipe.encode_image(from_pil(resized, 48, 48), Mean())
    schedule, strength = second_pass_schedule(5, 0.7)
    expected = pipe("a green square", image=latents, strength=strength, num_inference_steps=schedule, seed=3)
    assert out.images[0].size == (48, 48)
    assert np.array_equal(np.asarray(out.images[0]), np.asarray(expected.images[0]))
    assert out.parameters["Hires prompt"] == "a green square" and "Hires steps" not in out.parameters


def test_a_model_upscaler_joins_by_name(pipe: StableDiffusionPipeline) -> None:
    """Model upscalers (runtime/upscale.py's image_resizers) are looked up after the built-in ones."""
    calls = []

    def model(image: Image.Image, width: int, height: int) -> Image.Image:
        calls.append((image.size, width, height))
        return image.resize((width, height), Image.Resampling.BICUBIC)

    settings = HiresFix(scale=2, upscaler="esrgan_4x", steps=1, upscalers={"ESRGAN_4x": model})
    out = hires_fix(pipe, GenerationRequest(PROMPT, steps=2, width=16, height=16, seed=0), settings)
    assert calls == [((16, 16), 32, 32)] and out.images[0].size == (32, 32)
    assert out.parameters["Hires upscaler"] == "ESRGAN_4x"


def test_hires_settings_are_checked(pipe: StableDiffusionPipeline) -> None:
    limits = Limits(max_steps=10, max_pixels=64 * 64)
    request = GenerationRequest(PROMPT, steps=4, width=32, height=32, seed=1)
    for settings, message in (
        (HiresFix(upscaler="ESRGAN_4x"), "hires_upscaler: unknown upscaler 'ESRGAN_4x'; known: Latent"),
        (HiresFix(scale=3), "hires_scale: makes 96x96, which exceeds the limit max_pixels=4096"),
        (HiresFix(scale=1.1), "hires_scale: makes 34x34; width and height must be positive multiples of 4"),
        (HiresFix(scale=0), r"hires_scale: must be in \(0, 16\]"),
        (HiresFix(scale=float("nan")), "hires_scale: must be a finite number"),
        (HiresFix(resize_x=128), "hires_resize_x: makes 128x128, which exceeds"),
        (HiresFix(resize_y=-8), "hires_resize_y: must be >= 0"),
        (HiresFix(steps=11), "hires_steps: must be 0 .* to max_steps=10, got 11"),
        (HiresFix(denoising_strength=0), r"hires_denoising_strength: must be in \(0, 1\]"),
        (HiresFix(denoising_strength=1e-300), "hires_denoising_strength: 1e-300 runs 4 steps as the end of a sched"),
        (HiresFix(sampler="no such sampler"), "hires_sampler: "),
        (HiresFix(prompt="x" * 10_001), "hires_prompt: 10001 characters exceeds"),
    ):
        with pytest.raises(RequestError, match=message):
            pipe.prepare(replace(request, hires=settings), limits)
    image = Image.new("RGB", (32, 32))
    with pytest.raises(RequestError, match="hires: applies to txt2img only"):
        pipe.prepare(GenerationRequest(PROMPT, image=image, hires=HiresFix()), limits)
    with pytest.raises(RequestError, match="hires: must be a HiresFix"):
        pipe.prepare(GenerationRequest(PROMPT, hires={"scale": 2}), limits)
    checked = pipe.prepare(replace(request, hires=HiresFix(upscaler="lanczos")), limits)
    assert checked.hires.upscaler == "Lanczos" and checked.hires.resize_x == 0  # named as it is known


def test_benchmarks_can_run_the_hires_fix(pipe: StableDiffusionPipeline) -> None:
    """What a benchmark calls: the module's function on a request, timed from outside."""
    from sd_onnx.runtime import hires

    out = hires.hires_fix(pipe, GenerationRequest(PROMPT, steps=2, seed=0), hires.HiresFix(scale=2, steps=1))
    assert out.images[0].size == (64, 64) and out.request.hires.scale == 2


@pytest.fixture(scope="module")
def server(tiny_export: Path):
    from .test_server import LIMITS, Server

    srv = Server(tiny_export, *LIMITS)
    yield srv
    srv.stop()


def png_of(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def sillytavern_body(**changes: object) -> dict:
    """The txt2img body SillyTavern's image generation sends (extension settings filled in)."""
    body = {"prompt": PROMPT, "negative_prompt": "blurry", "sampler_name": "Euler", "scheduler": "Automatic",
            "steps": 4, "cfg_scale": 7, "width": 32, "height": 32, "restore_faces": False, "enable_hr": True,
            "hr_upscaler": "Latent", "hr_scale": 2, "hr_additional_modules": [], "denoising_strength": 0.7,
            "hr_second_pass_steps": 0, "seed": 5, "override_settings": {"CLIP_stop_at_last_layers": 1},
            "override_settings_restore_afterwards": True, "clip_skip": 1, "save_images": True, "send_images": True,
            "do_not_save_grid": False, "do_not_save_samples": False}  # fmt: skip
    return {**body, **changes}


def test_a1111_txt2img_hires_fix(server) -> None:
    import httpx

    r = httpx.post(f"{server.url}/sdapi/v1/txt2img", json=sillytavern_body(), timeout=120)
    assert r.status_code == 200, r.text
    image, info = png_of(r.json()["images"][0]), json.loads(r.json()["info"])
    assert image.size == (64, 64)
    text = image.text["parameters"]
    assert "Size: 32x32" in text and "Denoising strength: 0.7, Hires upscale: 2, Hires upscaler: Latent" in text
    hires_fields = ("enable_hr", "hr_", "denoising_strength")
    assert info["Hires upscaler"] == "Latent" and not [f for f in info.get("ignored", []) if f.startswith(hires_fields)]
    resized = sillytavern_body(hr_resize_x=64, hr_resize_y=48, hr_upscaler="Lanczos", hr_second_pass_steps=2)
    r = httpx.post(f"{server.url}/sdapi/v1/txt2img", json=resized, timeout=120)
    assert r.status_code == 200, r.text
    image = png_of(r.json()["images"][0])
    assert image.size == (64, 48) and "Hires resize: 64x48, Hires steps: 2, Hires upscaler: Lanczos" in image.text[
        "parameters"]  # fmt: skip
    # Without enable_hr every hr field is ignored, as A1111 ignores them (SillyTavern sends them all).
    off = sillytavern_body(enable_hr=False, hr_scale=0, hr_upscaler="none")
    r = httpx.post(f"{server.url}/sdapi/v1/txt2img", json=off, timeout=120)
    assert r.status_code == 200 and png_of(r.json()["images"][0]).size == (32, 32), r.text
    assert "Hires" not in r.json()["info"] and "Denoising strength" not in r.json()["info"]
    for change, message in (
        ({"hr_upscaler": "R-ESRGAN 4x+"}, "hr_upscaler: unknown upscaler 'R-ESRGAN 4x+'"),
        ({"hr_scale": 3}, "hr_scale: makes 96x96, which exceeds the limit max_pixels=4096"),
        ({"hr_resize_x": 128}, "hr_resize_x: makes 128x128, which exceeds the limit max_pixels=4096"),
        ({"hr_second_pass_steps": 21}, "hr_second_pass_steps: must be 0"),
        ({"denoising_strength": 0}, "denoising_strength: must be in (0, 1]"),
        ({"hr_sampler_name": "nope"}, "hr_sampler_name: "),
        ({"hr_scale": "2"}, "hr_scale"),
    ):
        r = httpx.post(f"{server.url}/sdapi/v1/txt2img", json=sillytavern_body(**change), timeout=60)
        assert r.status_code == 422 and message in r.json()["detail"], (change, r.text)


def test_a1111_hires_fix_with_a_model_upscaler(tmp_path: Path) -> None:
    """`hr_upscaler` naming an upscaler of `--upscalers-dir` upscales the decoded picture with it (A1111: one
    x4 pass, then Lanczos to the target)."""
    from fastapi.testclient import TestClient
    from safetensors.torch import save_file

    from sd_onnx.exporter.upscaler import export_upscaler
    from sd_onnx.runtime.server.app import ServeConfig, ServerState, create_app

    from .test_upscale import compact

    save_file(compact().state_dict(), str(tmp_path / "compact.safetensors"))
    folder = tmp_path / "upscalers"
    export_upscaler(tmp_path / "compact.safetensors", folder / "Compact-x4", tile=64, log=lambda line: None)
    config = ServeConfig(upscalers_dir=folder)
    body = {"prompt": PROMPT, "steps": 2, "seed": 1, "enable_hr": True, "hr_upscaler": "Compact-x4", "hr_scale": 2,
            "hr_second_pass_steps": 1}  # fmt: skip
    with TestClient(create_app(ServerState(config), loader=lambda: StableDiffusionPipeline.from_pretrained())) as app:
        while app.get("/health").status_code != 200:
            time.sleep(0.05)
        r = app.post("/sdapi/v1/txt2img", json=body)
        assert r.status_code == 200, r.text
        image = png_of(r.json()["images"][0])
        assert image.size == (128, 128) and "Hires upscaler: Compact-x4" in image.text["parameters"]
        r = app.post("/sdapi/v1/txt2img", json={**body, "hr_upscaler": "Compact-x2"})
        assert r.status_code == 422 and "known: Latent" in r.json()["detail"] and "Compact-x4" in r.json()["detail"]


HIRES_FIELDS = ("hr_scale", "hr_resize_x", "hr_resize_y", "hr_upscaler", "hr_second_pass_steps", "denoising_strength",
                "hr_sampler_name", "hr_prompt", "hr_negative_prompt")  # fmt: skip


@examples(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(
    fields=st.fixed_dictionaries(
        {},
        optional={
            name: st.none() | st.booleans() | st.floats() | st.integers(-(2**70), 2**70) | st.text(max_size=6)
            for name in HIRES_FIELDS
        },
    )
)
def test_random_hires_fields_never_get_a_server_error(server, fields: dict) -> None:
    import httpx

    body = json.dumps({"prompt": "x", "steps": 2, "width": 16, "height": 16, "enable_hr": True, **fields})
    r = httpx.post(f"{server.url}/sdapi/v1/txt2img", content=body, headers={"content-type": "application/json"},
                   timeout=120)  # fmt: skip
    assert r.status_code in (200, 422), (r.status_code, r.text)


def test_cli_hires_fix(tiny_export: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from sd_onnx.runtime.cli import main

    args = ["prompt", PROMPT, "-m", str(tiny_export), "--steps", "3", "--seed", "4", "--width", "32", "--height", "24"]
    hires = ["--hires-scale", "2", "--hires-upscaler", "Latent", "--hires-steps", "2", "--hires-denoise", "0.5"]
    result = CliRunner().invoke(main, [*args, *hires, "-o", str(tmp_path / "h.png")])
    assert result.exit_code == 0, result.output
    made = Image.open(tmp_path / "h.png")
    assert made.size == (64, 48)
    assert "Size: 32x24" in made.text["parameters"] and "Hires upscale: 2, Hires steps: 2" in made.text["parameters"]
    result = CliRunner().invoke(main, [*args, "--hires-scale", "4", "-o", str(tmp_path / "big.png")])
    assert result.exit_code != 0 and "Error: --hires-scale: makes 128x96, which exceeds the limit" in result.output
    result = CliRunner().invoke(main, [*args, "--hires-upscaler", "SwinIR", "-o", str(tmp_path / "u.png")])
    assert result.exit_code != 0 and "Error: --hires-upscaler: unknown upscaler 'SwinIR'" in result.output
