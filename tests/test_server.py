"""`sd-run serve` as a real process on a loopback port: A1111 and OpenAI routes, limits, security, load."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: Path | None, *args: str) -> None:
        """`sd-run serve -m MODEL ARGS` (no -m for None: ARGS name the models) on a free port, once ready."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        chosen = ["-m", str(model)] if model is not None else []
        cmd = [sys.executable, "-m", "sd_onnx.runtime.cli", "serve", *chosen, "--port", str(self.port), *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 60
        while True:
            assert self.proc.poll() is None, self.proc.stdout.read()
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.2)

    def rss_mb(self) -> float:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)


LIMITS = ("--max-steps", "20", "--max-pixels", str(64 * 64), "--max-batch", "4", "--max-body-bytes", "200000")


@pytest.fixture(scope="module")
def server(tiny_export: Path) -> Iterator[Server]:
    srv = Server(tiny_export, "--queue-size", "2", *LIMITS)
    yield srv
    srv.stop()


def png_of(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_txt2img_like_a1111(server: Server) -> None:
    body = {"prompt": "a red circle", "negative_prompt": "blue", "steps": 3, "seed": 77, "batch_size": 2,
            "sampler_name": "Euler a", "width": 32, "height": 24}  # fmt: skip
    r = httpx.post(f"{server.url}/sdapi/v1/txt2img", json=body, timeout=60)
    assert r.status_code == 200, r.text
    data = r.json()
    assert len(data["images"]) == 2
    image = png_of(data["images"][0])
    assert image.size == (32, 24)
    assert image.text["parameters"].startswith("a red circle\nNegative prompt: blue\nSteps: 3, Sampler: euler_a")
    assert json.loads(data["info"])["seed"] == 77 and data["parameters"]["steps"] == 3


def test_accelerator_fields_reach_the_pipeline(server: Server) -> None:
    body = {"prompt": "a cat", "steps": 3, "seed": 5, "guidance_interval": [0.5, 5.0], "vae_tiling": True}
    info = json.loads(httpx.post(f"{server.url}/sdapi/v1/txt2img", json=body, timeout=60).json()["info"])
    assert "Guidance interval: 0.5-5" in info["infotexts"][0] and "Tiled VAE: True" in info["infotexts"][0]
    openai = {"prompt": "a cat", "steps": 3, "seed": 5, "guidance_interval": [0.5, 5.0], "size": "32x32"}
    assert httpx.post(f"{server.url}/v1/images/generations", json=openai, timeout=60).status_code == 200


def test_img2img_samplers_models_progress_interrupt(server: Server) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(buffer, format="PNG")
    body = {"prompt": "x", "init_images": [base64.b64encode(buffer.getvalue()).decode()], "steps": 4,
            "denoising_strength": 0.5}  # fmt: skip
    r = httpx.post(f"{server.url}/sdapi/v1/img2img", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert png_of(r.json()["images"][0]).size == (32, 32)
    samplers = httpx.get(f"{server.url}/sdapi/v1/samplers").json()
    assert {"name": "dpmpp_2m_karras", "aliases": ["DPM++ 2M Karras"], "options": {}} in samplers
    models = httpx.get(f"{server.url}/sdapi/v1/sd-models").json()
    assert len(models) == 1 and len(models[0]["sha256"]) == 64 and "/" not in models[0]["filename"]
    progress = httpx.get(f"{server.url}/sdapi/v1/progress").json()
    assert set(progress) >= {"progress", "eta_relative", "state", "current_image"}
    assert httpx.post(f"{server.url}/sdapi/v1/interrupt").status_code == 200


def test_progress_and_interrupt_of_a_running_job(server: Server) -> None:
    result = {}
    body = {"prompt": "slow", "steps": 20, "width": 64, "height": 64, "batch_size": 4}
    worker = threading.Thread(
        target=lambda: result.update(r=httpx.post(f"{server.url}/sdapi/v1/txt2img", json=body, timeout=120))
    )
    worker.start()
    seen = None
    for _ in range(200):
        progress = httpx.get(f"{server.url}/sdapi/v1/progress").json()
        if progress["state"]["sampling_step"] > 0:
            seen = progress
            break
        time.sleep(0.01)
    httpx.post(f"{server.url}/sdapi/v1/interrupt")
    worker.join()
    assert seen is not None and 0 < seen["progress"] <= 1 and seen["current_image"]
    assert result["r"].status_code in (200, 409)


def test_openai_client(server: Server) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    out = client.images.generate(prompt="a green square", n=2, size="32x32", response_format="b64_json")
    assert len(out.data) == 2 and png_of(out.data[0].b64_json).size == (32, 32)
    out = client.images.generate(prompt="a green square", n=1, size="32x32", response_format="url")
    fetched = httpx.get(out.data[0].url)
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
    assert httpx.get(f"{server.url}/v1/images/files/{'0' * 32}.png").status_code == 404
    assert httpx.get(f"{server.url}/v1/images/files/..%2F..%2Fetc%2Fpasswd.png").status_code == 404


@pytest.mark.parametrize(
    ("path", "body", "status", "message"),
    [
        ("/sdapi/v1/txt2img", {"prompt": "x", "steps": 21}, 422, "max_steps=20"),
        ("/sdapi/v1/txt2img", {"prompt": "x", "width": 128, "height": 128}, 422, "max_pixels=4096"),
        ("/sdapi/v1/txt2img", {"prompt": "x", "batch_size": 3, "n_iter": 2}, 422, "max_batch=4"),
        ("/sdapi/v1/txt2img", {"prompt": "x", "width": 34, "steps": 1}, 422, "width: must be a positive multiple of 4"),
        ("/sdapi/v1/txt2img", {"prompt": "x", "sampler_name": "heun", "steps": 1}, 422, "unknown scheduler"),
        ("/sdapi/v1/txt2img", {"prompt": 5}, 422, ""),
        ("/sdapi/v1/img2img", {"prompt": "x", "init_images": ["not base64!"]}, 422, "init_images[0]: not valid base64"),
        ("/v1/images/generations", {"prompt": "x", "size": "big"}, 422, ""),
        ("/sdapi/v1/txt2img", {"prompt": "x" * 300_000}, 413, "max_body_bytes=200000"),
        ("/sdapi/v1/txt2img", {"prompt": "x", "guidance_interval": [5, 1]}, 422, "guidance_interval: needs 0 <= lo"),
        ("/sdapi/v1/txt2img", {"prompt": "x", "guidance_interval": [1]}, 422, "guidance_interval"),
        ("/v1/images/generations", {"prompt": "x", "guidance_interval": [-1, 2]}, 422, "guidance_interval: needs"),
        ("/sdapi/v1/txt2img", {"prompt": "x", "vae_tiling": [1]}, 422, "vae_tiling"),
    ],
)
def test_bad_input_is_4xx(server: Server, path: str, body: dict, status: int, message: str) -> None:
    r = httpx.post(f"{server.url}{path}", json=body, timeout=60)
    assert r.status_code == status, r.text
    assert message in r.text


def test_api_key_on_every_endpoint_but_health(tiny_export: Path) -> None:
    srv = Server(tiny_export, "--api-key", "s3cret", *LIMITS)
    try:
        assert httpx.get(f"{srv.url}/health").status_code == 200
        for method, path in [("GET", "/sdapi/v1/samplers"), ("GET", "/metrics"), ("POST", "/sdapi/v1/txt2img")]:
            assert httpx.request(method, f"{srv.url}{path}", json={"prompt": "x", "steps": 1}).status_code == 401
        ok = httpx.post(f"{srv.url}/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1},
                        headers={"Authorization": "Bearer s3cret"}, timeout=60)  # fmt: skip
        assert ok.status_code == 200
    finally:
        srv.stop()


def test_load_beyond_queue_gets_images_or_503_none_lost(server: Server) -> None:
    """Queue of 2 and one worker; 12 concurrent requests (4x what it holds): each answered once, correctly."""
    results: dict[int, httpx.Response] = {}

    def call(seed: int) -> None:
        results[seed] = httpx.post(
            f"{server.url}/sdapi/v1/txt2img",
            json={"prompt": "x", "steps": 20, "width": 64, "height": 64, "seed": seed},
            timeout=120,
        )

    threads = [threading.Thread(target=call, args=(seed,)) for seed in range(1000, 1012)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 12
    statuses = [r.status_code for r in results.values()]
    assert set(statuses) <= {200, 503} and statuses.count(503) > 0 and statuses.count(200) >= 3
    for seed, r in results.items():
        if r.status_code == 200:
            assert json.loads(r.json()["info"])["seed"] == seed and len(r.json()["images"]) == 1
        else:
            assert r.headers["retry-after"]
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'sd_requests_total{endpoint="/sdapi/v1/txt2img",status="503"}' in metrics
    assert "sd_queue_depth 0.0" in metrics and "sd_steps_per_second" in metrics


def test_soak_rss_before_and_after(server: Server) -> None:
    before = server.rss_mb()
    for i in range(200):
        r = httpx.post(
            f"{server.url}/sdapi/v1/txt2img", json={"prompt": f"soak {i}", "steps": 1, "seed": i}, timeout=60
        )
        assert r.status_code == 200
    after = server.rss_mb()
    print(f"server RSS before 200-request soak: {before:.0f} MB, after: {after:.0f} MB")
    assert after < before + 100


def test_schemathesis_finds_no_server_errors(server: Server, tmp_path: Path) -> None:
    report = tmp_path / "schemathesis.json"
    cmd = [sys.executable, "-m", "schemathesis.cli", "run", f"{server.url}/openapi.json",
           "--checks", "not_a_server_error",
           "--max-examples", "15", "--seed", "1", "--request-timeout", "60", "--report", "ndjson",
           "--report-ndjson-path", str(report)]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "NO_COLOR": "1"})
    cases = re.search(r"(\d+) generated", result.stdout)
    print(result.stdout[-1500:])
    assert result.returncode == 0, result.stdout[-3000:]
    assert cases and int(cases.group(1)) > 50


def test_graceful_shutdown_finishes_running_work(tiny_export: Path) -> None:
    srv = Server(tiny_export, *LIMITS)
    result = {}
    body = {"prompt": "last", "steps": 20, "width": 64, "height": 64, "batch_size": 4}
    worker = threading.Thread(
        target=lambda: result.update(r=httpx.post(f"{srv.url}/sdapi/v1/txt2img", json=body, timeout=120))
    )
    worker.start()
    while httpx.get(f"{srv.url}/sdapi/v1/progress").json()["state"]["sampling_step"] == 0:
        time.sleep(0.01)
    code = srv.stop()
    worker.join()
    assert result["r"].status_code == 200 and len(result["r"].json()["images"]) == 4
    assert code in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has shut down cleanly


def test_one_request_through_every_front_end_gives_the_same_pixels(
    server: Server, tiny_export: Path, tmp_path: Path
) -> None:
    """CLI, A1111 route, OpenAI route (seed and steps as extensions) and Python API build the same
    GenerationRequest, so the pixels and the PNG parameters agree byte for byte."""
    import numpy as np
    from click.testing import CliRunner

    from sd_onnx.runtime import StableDiffusionPipeline
    from sd_onnx.runtime.cli import main

    prompt, seed, steps = "a blue square", 1234, 3
    settings = ["--seed", str(seed), "--steps", str(steps), "--width", "32", "--height", "32"]
    result = CliRunner().invoke(
        main, ["prompt", prompt, "-m", str(tiny_export), "-o", str(tmp_path / "cli.png"), *settings]
    )
    assert result.exit_code == 0, result.output
    cli = Image.open(tmp_path / "cli.png")
    a1111 = httpx.post(f"{server.url}/sdapi/v1/txt2img", json={"prompt": prompt, "seed": seed, "steps": steps,
                       "width": 32, "height": 32}, timeout=60).json()  # fmt: skip
    openai = httpx.post(f"{server.url}/v1/images/generations", json={"prompt": prompt, "seed": seed, "steps": steps,
                        "size": "32x32"}, timeout=60).json()  # fmt: skip
    api = StableDiffusionPipeline.from_pretrained(tiny_export)(
        prompt, seed=seed, num_inference_steps=steps, width=32, height=32
    )
    images = [cli, png_of(a1111["images"][0]), png_of(openai["data"][0]["b64_json"]), api.images[0]]
    pixels = [np.asarray(image.convert("RGB")) for image in images]
    for other in pixels[1:]:
        np.testing.assert_array_equal(other, pixels[0])
    texts = {image.text["parameters"] for image in images[:3]}
    assert len(texts) == 1 and f"Seed: {seed}" in texts.pop()
