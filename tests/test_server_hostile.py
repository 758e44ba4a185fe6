"""The server against hostile and odd input: every answer a 4xx naming the field or a clean 503/504, never a 500;
limits, auth, shutdown and timeouts behave as documented."""

from __future__ import annotations

import base64
import io
import json
import signal
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from .test_server import LIMITS, Server, png_of

TXT2IMG_FIELDS = ("negative_prompt", "steps", "cfg_scale", "width", "height", "seed", "sampler_name",
                  "batch_size", "n_iter", "eta", "scheduler", "sampler_index", "override_settings", "restore_faces",
                  "alwayson_scripts", "sd_model_checkpoint", "image", "model")  # fmt: skip
POST_ROUTES = ("/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/v1/images/generations", "/sdapi/v1/interrupt",
               "/sdapi/v1/options", "/sdapi/v1/png-info")  # fmt: skip


@pytest.fixture(scope="module")
def server(tiny_export: Path) -> Iterator[Server]:
    srv = Server(tiny_export, "--queue-size", "4", *LIMITS)
    yield srv
    srv.stop()


def post_raw(server: Server, path: str, text: str, **kwargs: object) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", content=text.encode("utf-8", "surrogatepass"),
                      headers={"content-type": "application/json"}, timeout=60, **kwargs)  # fmt: skip


def png_declaring(width: int, height: int) -> bytes:
    """A PNG header declaring width x height (few bytes; a decoder that trusts it allocates gigabytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def b64png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize(
    ("path", "text", "field"),
    [
        ("/sdapi/v1/txt2img", '{"prompt": "x", "cfg_scale": NaN}', "cfg_scale"),
        ("/sdapi/v1/txt2img", '{"prompt": "x", "cfg_scale": Infinity}', "cfg_scale"),
        ("/sdapi/v1/txt2img", '{"prompt": "x", "seed": NaN}', "seed"),
        ("/sdapi/v1/txt2img", '{"prompt": "x", "steps": -Infinity}', "steps"),
        ("/sdapi/v1/txt2img", '{"prompt": "x", "eta": NaN}', "eta"),
        ("/sdapi/v1/img2img", '{"prompt": "x", "init_images": ["AAAA"], "denoising_strength": NaN}',
         "denoising_strength"),
        ("/v1/images/generations", '{"prompt": "x", "n": NaN}', "n"),
    ],
)  # fmt: skip
def test_non_finite_numbers_are_422_naming_the_field(server: Server, path: str, text: str, field: str) -> None:
    r = post_raw(server, path, text)
    assert r.status_code == 422, r.text
    assert f"{field}: " in r.json()["detail"], r.text


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        ("/sdapi/v1/txt2img", {"prompt": "lone \ud800 surrogate", "steps": 1}, "prompt: is not valid Unicode text"),
        ("/sdapi/v1/txt2img", {"prompt": "x", "negative_prompt": "\udfff"}, "negative_prompt: is not valid"),
        ("/sdapi/v1/txt2img", {"prompt": "x", "seed": 2**64}, "seed: must be in [0, 18446744073709551615]"),
        ("/sdapi/v1/txt2img", {"prompt": "x", "cfg_scale": -2}, "cfg_scale: must be >= 0"),
        ("/sdapi/v1/txt2img", {"prompt": "x", "batch_size": -1, "n_iter": -1}, "batch_size: must be >= 1"),
        ("/sdapi/v1/txt2img", {"prompt": "x", "sampler_name": "heun"}, "sampler_name: unknown scheduler 'heun'"),
        ("/sdapi/v1/img2img", {"prompt": "x", "init_images": [b64png(Image.new("RGB", (8, 8)))], "steps": 4,
                               "denoising_strength": 0.1}, "denoising_strength: 0.1 x 4 steps leaves no denoising"),
        ("/sdapi/v1/img2img", {"prompt": "x", "init_images": ["data:image/png;base64"]},
         "init_images[0]: a data URL must look like data:image/png;base64,<data>"),
        ("/sdapi/v1/img2img", {"prompt": "x", "init_images": [base64.b64encode(png_declaring(10**5, 10**5)).decode()]},
         "init_images[0]: image is over the limit of 16384 pixels"),
        ("/sdapi/v1/img2img", {"prompt": "x", "init_images": [b64png(Image.new("RGB", (300, 300)))]},
         "init_images[0]: image is 300x300, over the limit of 16384 pixels"),
        ("/v1/images/generations", {"prompt": "x", "size": "0x0"}, "size: must be a positive multiple of 4"),
        ("/v1/images/generations", {"prompt": "x", "n": 0}, "n: must be >= 1"),
        ("/v1/images/generations", {"prompt": "x", "size": "\uff16\uff14x64"}, "size: String should match pattern"),
        ("/v1/images/generations", {"prompt": "x", "guidance_scale": 1e300}, "guidance_scale: must be <= 100"),
        ("/sdapi/v1/txt2img", {"prompt": "x", "cfg_scale": 3e38}, "cfg_scale: must be <= 100"),
        ("/sdapi/v1/txt2img", {"prompt": "x" * 10_001}, "prompt: 10001 characters exceeds the limit max_prompt_chars"),
        ("/sdapi/v1/txt2img", {"prompt": "x", "cfg_scale": True}, "cfg_scale: Input should be a valid number"),
        ("/sdapi/v1/txt2img", {"prompt": "x", "steps": "7"}, "steps: Input should be a valid integer"),
        ("/sdapi/v1/txt2img", {"prompt": "x", "steps": 1001}, "steps: 1001 exceeds the limit max_steps=20"),
    ],
)  # fmt: skip
def test_bad_values_are_422_with_one_line_naming_the_field(server: Server, path: str, body: dict, message: str) -> None:
    r = post_raw(server, path, json.dumps(body))
    assert r.status_code == 422, r.text
    assert message in r.json()["detail"]


def test_chunked_body_over_the_limit_is_413(server: Server) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"prompt": "'
        for _ in range(11):
            yield b"x" * 100_000
        yield b'"}'

    r = httpx.post(f"{server.url}/sdapi/v1/txt2img", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "max_body_bytes=200000" in r.text
    assert httpx.get(f"{server.url}/health").status_code == 200


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(
    path=st.sampled_from(POST_ROUTES),
    body=st.one_of(
        st.recursive(
            st.none() | st.booleans() | st.floats() | st.integers() | st.text(),
            lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
            max_leaves=8,
        ),
        st.fixed_dictionaries(
            {"prompt": st.text(max_size=20)},
            optional={
                name: st.none() | st.booleans() | st.floats() | st.integers(-(2**70), 2**70) | st.text(max_size=6)
                for name in (*TXT2IMG_FIELDS, "init_images", "denoising_strength", "n", "size")
            },
        ),
    ),
)
def test_random_json_never_gets_a_server_error(server: Server, path: str, body: object) -> None:
    r = post_raw(server, path, json.dumps(body))
    assert r.status_code < 500 or r.status_code in (503, 504), (r.status_code, r.text)


def test_still_healthy_after_the_random_json(server: Server) -> None:
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'status="500"' not in metrics
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"


def test_schema_is_behind_the_key_and_bearer_is_case_insensitive(tiny_export: Path) -> None:
    srv = Server(tiny_export, "--api-key", "s3cret", "--public-url", "https://images.example.test/", *LIMITS)
    try:
        assert httpx.get(f"{srv.url}/openapi.json").status_code == 401
        assert httpx.get(f"{srv.url}/openapi.json", headers={"Authorization": "bearer s3cret"}).status_code == 200
        for path in ("/docs", "/redoc"):  # CDN-loaded viewers: gone
            assert httpx.get(f"{srv.url}{path}", headers={"Authorization": "bearer s3cret"}).status_code == 404
        body = {"prompt": "x", "size": "8x8", "response_format": "url"}
        headers = {"authorization": "BEARER s3cret", "host": "localhost:1"}  # a Host the links must not follow
        r = httpx.post(f"{srv.url}/v1/images/generations", json=body, headers=headers, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["data"][0]["url"].startswith("https://images.example.test/v1/images/")
    finally:
        srv.stop()


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--api-key", ""], {}, "--api-key (or $SD_ONNX_API_KEY) is empty"),
        (["--api-key", " "], {}, "--api-key (or $SD_ONNX_API_KEY) is empty"),
        ([], {"SD_ONNX_API_KEY": ""}, "--api-key (or $SD_ONNX_API_KEY) is empty"),
        (["--public-url", "notaurl"], {}, "--public-url must be an http:// or https:// URL with a host"),
        (["--public-url", "http://"], {}, "--public-url must be an http:// or https:// URL with a host"),
        (["--timeout", "nan"], {}, "Invalid value for --timeout: must be a number of seconds"),
        (["--allow-origin", "*"], {}, "Invalid value for --allow-origin: '*' is not an origin"),
        (["--allow-origin", "https://a.example/ui"], {}, "Invalid value for --allow-origin: 'https://a.example/ui'"),
    ],
)
def test_settings_that_would_weaken_the_server_are_refused(
    tiny_export: Path, args: list[str], env: dict, message: str
) -> None:
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "sd_onnx.runtime.cli", "serve", "-m", str(tiny_export), "--port", "0", *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env={**os.environ, **env})
    assert result.returncode != 0 and f"Error: {message}" in result.stderr


def test_openai_size_auto_is_the_models_own(server: Server) -> None:
    r = post_raw(server, "/v1/images/generations", json.dumps({"prompt": "x", "size": "auto", "steps": 1}))
    assert r.status_code == 200 and png_of(r.json()["data"][0]["b64_json"]).size == (32, 32)


def test_timeout_cancels_the_running_job(tiny_export: Path) -> None:
    srv = Server(tiny_export, "--timeout", "1", "--max-steps", "1000", "--max-pixels", "4096")
    try:
        started = time.monotonic()
        r = httpx.post(f"{srv.url}/sdapi/v1/txt2img", json={"prompt": "x", "steps": 999, "width": 64, "height": 64},
                       timeout=60)  # fmt: skip
        assert r.status_code == 504 and time.monotonic() - started < 10
        deadline = time.monotonic() + 5  # cancellation lags by at most one UNet step
        while httpx.get(f"{srv.url}/sdapi/v1/progress").json()["state"]["job_count"]:
            assert time.monotonic() < deadline, "the timed-out job kept running"
            time.sleep(0.05)
        ok = httpx.post(f"{srv.url}/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1}, timeout=60)
        assert ok.status_code == 200
    finally:
        srv.stop()


def test_sigterm_cancels_queued_work_and_answers_503_while_draining(tiny_export: Path) -> None:
    srv = Server(tiny_export, *LIMITS)
    results: dict[str, httpx.Response] = {}
    running = {"prompt": "running", "steps": 20, "width": 64, "height": 64, "batch_size": 4}
    queued = {"prompt": "queued", "steps": 1}

    def call(name: str, body: dict) -> None:
        results[name] = httpx.post(f"{srv.url}/sdapi/v1/txt2img", json=body, timeout=120)

    first = threading.Thread(target=call, args=("running", running))
    first.start()
    while httpx.get(f"{srv.url}/sdapi/v1/progress").json()["state"]["sampling_step"] == 0:
        time.sleep(0.01)
    second = threading.Thread(target=call, args=("queued", queued))
    second.start()
    while httpx.get(f"{srv.url}/sdapi/v1/progress").json()["state"]["job_count"] < 2:
        time.sleep(0.01)
    srv.proc.send_signal(signal.SIGTERM)
    second.join()
    during = httpx.post(f"{srv.url}/sdapi/v1/txt2img", json=queued, timeout=30)
    health = httpx.get(f"{srv.url}/health")
    first.join()
    code = srv.proc.wait(timeout=60)
    assert results["queued"].status_code == 503 and "shutting down" in results["queued"].text
    assert during.status_code == 503 and "shutting down" in during.text
    assert health.status_code == 503 and health.json()["status"] == "shutting down"
    assert results["running"].status_code == 200 and len(results["running"].json()["images"]) == 4
    assert code in (0, -signal.SIGTERM)


def test_malformed_json_names_the_body(server: Server) -> None:
    r = post_raw(server, "/sdapi/v1/txt2img", '{"prompt": ')
    assert r.status_code == 422 and r.json()["detail"] == "body: not valid JSON"


def test_a_client_that_hangs_up_is_not_a_server_error(server: Server) -> None:
    import socket

    for _ in range(3):
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 1000\r\n\r\n{")  # fmt: skip
    time.sleep(0.5)
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'status="500"' not in metrics and 'status="499"' in metrics


def test_clients_that_hang_up_lose_their_jobs(tiny_export: Path) -> None:
    """Three clients open slow generations (one runs, two wait: the queue is full) and close their sockets after
    a second: the running job stops at its next step, the waiting ones leave the queue, and the next client is
    served, not refused 503."""
    import socket

    srv = Server(tiny_export, "--queue-size", "2", "--max-steps", "1000", "--max-pixels", "4096")
    body = json.dumps({"prompt": "slow", "steps": 999, "width": 64, "height": 64}).encode()
    head = (f"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: 127.0.0.1:{srv.port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()  # fmt: skip
    try:
        clients = []
        for _ in range(3):
            clients.append(socket.create_connection(("127.0.0.1", srv.port)))
            clients[-1].sendall(head + body)
            time.sleep(0.2)  # in order: the first runs
        assert wait_for_health(srv, lambda h: h["running"] == 1 and h["queued"] == 2), "jobs did not start"
        full = httpx.post(f"{srv.url}/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1}, timeout=60)
        assert full.status_code == 503  # the state the issue saw: others refused while nobody waits for the work
        time.sleep(1)
        step_at_close = httpx.get(f"{srv.url}/sdapi/v1/progress").json()["state"]["sampling_step"]
        for client in clients:
            client.close()
        closed = time.monotonic()
        assert wait_for_health(srv, lambda h: h["running"] == 0 and h["queued"] == 0), "abandoned jobs kept going"
        assert time.monotonic() - closed < 3 and step_at_close < 999
        ok = httpx.post(f"{srv.url}/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1}, timeout=60)
        assert ok.status_code == 200
        metrics = httpx.get(f"{srv.url}/metrics").text
        assert 'sd_requests_total{endpoint="/sdapi/v1/txt2img",status="499"} 3.0' in metrics
    finally:
        srv.stop()


def wait_for_health(srv: Server, condition: object, seconds: float = 5.0) -> bool:
    """Poll /health until `condition(body)` holds; False after `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition(httpx.get(f"{srv.url}/health").json()):
            return True
        time.sleep(0.05)
    return False
