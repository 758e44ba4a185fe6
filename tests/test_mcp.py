"""`sd-run serve --mcp`: the MCP endpoint, tested with the `mcp` SDK's own client against a live server."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from sd_onnx.runtime import StableDiffusionPipeline
from sd_onnx.runtime.server.app import ServeConfig, ServerState, create_app

pytest.importorskip("mcp")
KEY = "agent-key"
PROMPT = "a red circle"


@pytest.fixture(scope="module")
def pipe(tiny_export: Path) -> StableDiffusionPipeline:
    return StableDiffusionPipeline.from_pretrained(tiny_export, provider="cpu")


@pytest.fixture(scope="module")
def url(pipe: StableDiffusionPipeline) -> Iterator[str]:
    import uvicorn

    app = create_app(ServerState(ServeConfig(api_key=KEY, mcp=True, host="127.0.0.1")), loader=lambda: pipe)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    base = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    while httpx.get(f"{base}/health").status_code != 200:
        time.sleep(0.05)
    yield f"{base}/mcp"
    server.should_exit = True
    thread.join(timeout=10)


def call(url: str, *calls: tuple[str, dict]) -> tuple[list, list, list]:
    """The tools' names, each call's result and the progress notifications, from one session of the SDK's
    client (with the API key as a bearer token)."""
    import httpx2
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    async def run() -> tuple[list, list, list]:
        progress: list[tuple[float, float | None]] = []

        async def on_progress(value: float, total: float | None, message: str | None) -> None:
            progress.append((value, total))

        http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {KEY}"})
        async with Client(streamable_http_client(url, http_client=http)) as client:
            names = [tool.name for tool in (await client.list_tools()).tools]
            results = [await client.call_tool(name, args, progress_callback=on_progress) for name, args in calls]
        return names, results, progress

    return asyncio.run(run())


def image_of(result) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(result.content[0].data)))


def test_generate_returns_the_apis_image_with_progress(url: str, pipe: StableDiffusionPipeline) -> None:
    names, results, progress = call(url, ("generate_image", {"prompt": PROMPT, "steps": 3, "seed": 5}),
                                    ("list_models", {}), ("list_samplers", {}))  # fmt: skip
    assert names == ["generate_image", "edit_image", "list_models", "list_samplers"]
    generated, models, samplers = results
    assert not generated.is_error and generated.content[0].mime_type == "image/png"
    want = pipe(PROMPT, num_inference_steps=3, seed=5).images[0]
    assert np.array_equal(np.asarray(image_of(generated)), np.asarray(want))
    assert "Steps: 3" in generated.content[1].text and "Seed: 5" in generated.content[1].text
    assert progress and progress[-1][0] == progress[-1][1] >= 3  # every step done (PNDM calls one more)
    assert json.loads(models.content[0].text)["models"][0]["current"] is True
    assert "euler_a" in json.loads(samplers.content[0].text)["samplers"]


def test_edit_inpaints_where_the_mask_says(url: str, pipe: StableDiffusionPipeline) -> None:
    picture = Image.fromarray(np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    mask = Image.new("L", (32, 32))
    mask.paste(255, (8, 8, 24, 24))

    def encoded(image: Image.Image) -> str:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return base64.b64encode(buffer.getvalue()).decode()

    _, (edited,), _ = call(url, ("edit_image", {"image": encoded(picture), "mask": encoded(mask), "prompt": PROMPT,
                                                "steps": 3, "seed": 2}))  # fmt: skip
    want = pipe(PROMPT, image=picture, mask_image=mask, num_inference_steps=3, seed=2).images[0]
    assert not edited.is_error and np.array_equal(np.asarray(image_of(edited)), np.asarray(want))


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"prompt": PROMPT, "width": 33}, "width: must be a positive multiple of"),
        ({"prompt": PROMPT, "steps": 100000}, "steps: 100000 exceeds the limit max_steps="),
        ({"prompt": PROMPT, "model": "nope"}, "model: no model named 'nope'"),
        ({"prompt": PROMPT, "steps": "many"}, "steps"),  # the SDK's argument validation names it
    ],
)
def test_a_bad_field_is_a_tool_error_naming_it(url: str, arguments: dict, message: str) -> None:
    _, (result,), _ = call(url, ("generate_image", arguments))
    assert result.is_error and message in result.content[0].text, result.content[0].text


def test_the_endpoint_is_behind_the_api_key(url: str) -> None:
    answer = httpx.post(url, json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
    assert answer.status_code == 401 and answer.json() == {"detail": "missing or wrong API key"}
