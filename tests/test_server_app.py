"""The application in process: server errors are answered, logged in one line and counted; the browser rules
(Host and Origin checks, CORS for listed origins, security headers) hold for every route; a client that hangs
up loses its job."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
import time

import pytest
from fastapi.testclient import TestClient

from sd_onnx.runtime.pipeline import GenerationCancelled
from sd_onnx.runtime.request import GenerationRequest
from sd_onnx.runtime.server import page
from sd_onnx.runtime.server.app import ServeConfig, ServerState, create_app
from sd_onnx.runtime.server.jobs import JobQueue
from sd_onnx.runtime.server.state import CLIENT_GONE, ClientGone


def test_a_bug_is_a_counted_500_not_a_dropped_connection() -> None:
    state = ServerState(ServeConfig())
    app = create_app(state, loader=lambda: (_ for _ in ()).throw(AssertionError("not loaded in this test")))

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("a bug")

    client = TestClient(app, raise_server_exceptions=False)
    r = client.get("/boom")
    assert r.status_code == 500 and r.json() == {"detail": "internal server error"}
    metrics = client.get("/metrics").text
    assert 'sd_requests_total{endpoint="/boom",status="500"} 1.0' in metrics


def app_client(**config: object) -> TestClient:
    """The app as `sd-run serve --host 127.0.0.1 --port 7860` builds it (plus `config`), without a model."""
    settings = {"host": "127.0.0.1", "public_url": "http://127.0.0.1:7860", **config}
    state = ServerState(ServeConfig(**settings))
    app = create_app(state, loader=lambda: (_ for _ in ()).throw(AssertionError("not loaded in this test")))

    @app.post("/echo")
    def echo() -> dict:
        return {"ok": True}

    return TestClient(app, base_url="http://127.0.0.1:7860")


@pytest.mark.parametrize(
    ("headers", "status", "detail"),
    [
        ({"Origin": "https://evil.example"}, 403, "Origin: "),
        ({"Origin": "null"}, 403, "Origin: "),  # a data: page, a sandboxed frame
        ({"Origin": "http://127.0.0.1:9999"}, 403, "Origin: "),  # another port is another origin
        ({"Sec-Fetch-Site": "cross-site"}, 403, "Sec-Fetch-Site: "),
        ({"Sec-Fetch-Site": "same-site"}, 403, "Sec-Fetch-Site: "),  # every port of 127.0.0.1 is the same site
        ({"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"}, 403, "Origin: "),
        ({"Host": "evil.example"}, 421, "Host: "),
        ({"Host": "evil.example:7860", "Origin": "http://evil.example:7860"}, 421, "Host: "),  # DNS rebinding
        ({}, 200, None),  # curl, SDKs
        ({"Origin": "http://127.0.0.1:7860"}, 200, None),
        ({"Origin": "http://localhost:7860", "Host": "localhost:7860"}, 200, None),
        ({"Origin": "null", "Sec-Fetch-Site": "same-origin"}, 200, None),  # set by the browser, not by scripts
        ({"Sec-Fetch-Site": "none"}, 200, None),
        ({"Host": "[::1]:7860"}, 200, None),
        ({"Host": "10.1.2.3:7860"}, 200, None),  # an address is never a rebound name
    ],
)
def test_browser_rules(headers: dict, status: int, detail: str | None) -> None:
    r = app_client().post("/echo", headers=headers, content=b"{}")
    assert r.status_code == status, r.text
    if detail is not None:
        assert r.json()["detail"].startswith(detail) and "\n" not in r.json()["detail"]
        assert "evil" not in r.text  # a refusal never echoes the input
    assert "access-control-allow-origin" not in r.headers


def test_a_cross_site_link_to_the_page_opens_it_but_a_cross_site_form_does_not_post() -> None:
    client = app_client()
    link = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document"}
    assert client.get("/", headers=link).status_code == 200
    form = {**link, "Origin": "https://evil.example", "Content-Type": "text/plain"}
    assert client.post("/sdapi/v1/interrupt", headers=form, content=b"x").status_code == 403
    assert client.post("/sdapi/v1/interrupt", headers=link, content=b"x").status_code == 403


def test_a_listed_origin_gets_cors_answers_and_others_none() -> None:
    client = app_client(allow_origins=("https://App.example:443/",))
    app = {"Origin": "https://app.example", "Sec-Fetch-Site": "cross-site"}
    preflight = {**app, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    r = client.options("/sdapi/v1/txt2img", headers=preflight)
    assert r.status_code == 204 and r.headers["access-control-allow-origin"] == "https://app.example"
    assert "POST" in r.headers["access-control-allow-methods"]
    assert r.headers["access-control-allow-headers"] == "content-type" and "Origin" in r.headers["vary"]
    r = client.post("/echo", headers=app, content=b"{}")
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
    other = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    r = client.options("/sdapi/v1/txt2img", headers=other)
    assert r.status_code == 403 and "access-control-allow-origin" not in r.headers


@pytest.mark.parametrize(
    ("config", "host", "status"),
    [
        ({"host": None}, "evil.example", 200),  # built in process (tests, Ray's builder): nothing to check against
        ({"host": "0.0.0.0", "public_url": "http://0.0.0.0:7860"}, "box.lan:7860", 200),  # all interfaces, no name
        ({"host": "0.0.0.0", "public_url": "https://sd.example.org"}, "sd.example.org", 200),
        ({"host": "0.0.0.0", "public_url": "https://sd.example.org"}, "box.lan:7860", 421),
        ({"host": "0.0.0.0", "public_url": "https://sd.example.org"}, "192.168.1.5:7860", 200),
        ({"host": "127.0.0.1", "public_url": "https://sd.example.org"}, "SD.example.org.", 200),
        ({"host": "box.lan", "public_url": "http://box.lan:7860"}, "box.lan:7860", 200),
        ({"host": "::1", "public_url": "http://[::1]:7860"}, "localhost:7860", 200),
        ({"host": "::1", "public_url": "http://[::1]:7860"}, "rebind.example:7860", 421),
    ],
)
def test_host_check(config: dict, host: str, status: int) -> None:
    assert app_client(**config).post("/echo", headers={"Host": host}).status_code == status


def test_a_bad_allowed_origin_is_refused() -> None:
    for text in ("null", "*", "https://app.example/path", "ftp://app.example", "app.example"):
        with pytest.raises(ValueError, match="allow_origins: "):
            ServeConfig(allow_origins=(text,))


def test_security_headers_on_the_page_and_every_answer() -> None:
    client = app_client()
    page = client.get("/")
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "frame-ancestors 'none'" in policy
    assert "script-src 'sha256-" in policy and "style-src 'sha256-" in policy and "unsafe" not in policy
    for r in (page, client.get("/health"), client.post("/echo", headers={"Origin": "https://evil.example"})):
        assert r.headers["x-content-type-options"] == "nosniff" and r.headers["x-frame-options"] == "DENY"
        assert (
            r.headers["referrer-policy"] == "no-referrer"
            and "frame-ancestors 'none'" in r.headers["content-security-policy"]
        )
    assert client.get("/docs").status_code == 404 and client.get("/redoc").status_code == 404
    assert client.get("/openapi.json").status_code == 200


def test_the_page_csp_hashes_are_of_the_scripts_it_sends() -> None:
    for needs_key in (True, False):
        html, policy = page.render(needs_key)
        script = re.search(r"<script>(.*?)</script>", html, re.DOTALL).group(1)
        digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
        assert f"script-src 'sha256-{digest}'" in policy


class EndlessPipe:
    """Steps until cancelled, as a real pipeline polls `cancelled` between steps; counts the jobs it started."""

    def __init__(self) -> None:
        self.started = 0

    def generate(self, request: GenerationRequest, callback: object, cancelled: object) -> None:
        self.started += 1
        while not cancelled():
            time.sleep(0.01)
        raise GenerationCancelled("cancelled")


def test_a_client_that_hangs_up_drops_its_queued_job_and_stops_its_running_one() -> None:
    pipe = EndlessPipe()
    state = ServerState(ServeConfig(queue_size=2))
    state.jobs, state.pipe = JobQueue(pipe, workers=1, size=2), pipe
    hung_up = asyncio.Event()

    async def client(name: str) -> str:
        async def until_gone() -> None:
            await hung_up.wait()

        CLIENT_GONE.set(until_gone)  # what middleware.BodyLimit sets for each request
        try:
            await state.generate(GenerationRequest(prompt=name))
        except ClientGone:
            return "gone"
        return "answered"

    async def scenario() -> list[str]:
        clients = [asyncio.create_task(client("running"))]
        while state.jobs.busy() == 0:
            await asyncio.sleep(0.01)
        clients += [asyncio.create_task(client(name)) for name in ("queued", "queued too")]
        while state.jobs.depth() < 2:
            await asyncio.sleep(0.01)
        hung_up.set()
        return await asyncio.gather(*clients)

    assert asyncio.run(scenario()) == ["gone"] * 3
    assert state.jobs.depth() == 0  # the queued ones left at once
    deadline = time.monotonic() + 2
    while state.jobs.busy():
        assert time.monotonic() < deadline, "the running job was not cancelled"
        time.sleep(0.01)
    time.sleep(0.1)
    # The queued jobs never ran, or one did for an instant: the worker may take it between the running job's
    # cancel and its own client's (both arrive in the same event-loop turn); it then stops at its first step.
    assert pipe.started <= 2
    state.jobs.shutdown(1)


class InstantPipe:
    def generate(self, request: GenerationRequest, callback: object, cancelled: object) -> str:
        return "image"


def test_a_job_has_left_running_when_its_answer_arrives() -> None:
    """A client that reads its answer and then interrupts (SillyTavern does) must find nothing running."""
    queue = JobQueue(InstantPipe(), workers=1, size=2)
    running_at_answer: list[int] = []
    job = queue.submit(GenerationRequest(prompt="x"))
    job.future.add_done_callback(lambda _: running_at_answer.append(queue.busy()))  # runs as the answer is set
    assert job.future.result(timeout=5) == "image" and running_at_answer == [0]
    assert queue.interrupt() == 0
    queue.shutdown(1)
