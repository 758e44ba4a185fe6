"""A1111 clients against a server with two models (`sd-run serve --models-dir`): each client's real request
sequence replayed as recorded from its source, what it reads back checked (titles, the model switch in the PNG's
`Model:` and in `info`), HTTP Basic auth, png-info on our PNGs and A1111's, the ignored-field list and
`--strict`, the model cache, and the webuiapi package itself against a real server process."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from PIL import Image, PngImagePlugin

from sd_onnx.runtime.cli import main
from sd_onnx.runtime.infotext import parse_infotext
from sd_onnx.runtime.pipeline import StableDiffusionPipeline
from sd_onnx.runtime.server.app import ServeConfig, ServerState, create_app
from sd_onnx.runtime.server.models import ModelCache, ModelUnavailable, discover, entry_of_folder
from sd_onnx.runtime.shipped import shipped_model
from tests.test_server import free_port

PROMPT = "a red circle on a blue background"
NAMES = ("circles", "squares")  # two copies of the shipped model, told apart by their manifests' names

# Each client's calls as its source makes them: (method, path, body). "$TITLE" is the second model's title as
# the client picked it from /sdapi/v1/sd-models; "$OPTIONS" spreads the options object the client read last.
OPEN_WEBUI = [  # open_webui/routers/images.py, engine "automatic1111"
    ("GET", "/sdapi/v1/options", None),  # verify the URL; get_image_model reads sd_model_checkpoint
    ("GET", "/sdapi/v1/sd-models", None),  # get_models: {"id": title, "name": model_name}
    ("GET", "/sdapi/v1/options", None),  # set_image_model reads the options ...
    ("POST", "/sdapi/v1/options", {"$OPTIONS": True, "sd_model_checkpoint": "$TITLE"}),  # ... and posts them back
    (
        "POST",
        "/sdapi/v1/txt2img",
        {
            "prompt": PROMPT,
            "batch_size": 1,
            "width": 64,
            "height": 64,
            "steps": 4,
            "negative_prompt": "",
            "cfg_scale": 2.0,
            "sampler_name": "Euler a",
            "scheduler": "Automatic",
        },
    ),  # fmt: skip
]
SILLYTAVERN = [  # src/endpoints/stable-diffusion.js (the server side of its A1111 source)
    ("GET", "/sdapi/v1/options", None),  # /ping
    ("GET", "/sdapi/v1/upscalers", None),  # /upscalers: names
    ("GET", "/sdapi/v1/latent-upscale-modes", None),  # ... with the latent ones spliced in
    ("GET", "/sdapi/v1/sd-vae", None),  # /vaes: model_name of each
    ("GET", "/sdapi/v1/samplers", None),  # /samplers: name of each
    ("GET", "/sdapi/v1/schedulers", None),  # /schedulers
    ("GET", "/sdapi/v1/sd-models", None),  # /models: {value: title, text: model_name}
    ("GET", "/sdapi/v1/options", None),  # /get-model: sd_model_checkpoint
    ("POST", "/sdapi/v1/options", {"sd_model_checkpoint": "$TITLE"}),  # /set-model ...
    ("GET", "/sdapi/v1/progress", None),  # ... then waits for progress 0 and job_count 0
    (
        "POST",
        "/sdapi/v1/txt2img",
        {  # /generate: the extension's payload, its own url and auth included
            "url": "http://127.0.0.1:7860",
            "auth": "user:sekret",
            "prompt": PROMPT,
            "negative_prompt": "blurry",
            "sampler_name": "DDIM",
            "scheduler": "normal",
            "steps": 4,
            "cfg_scale": 2.0,
            "width": 64,
            "height": 64,
            "restore_faces": False,
            "enable_hr": False,
            "hr_upscaler": "Latent",
            "hr_scale": 2.0,
            "hr_additional_modules": [],
            "denoising_strength": 0.7,
            "hr_second_pass_steps": 0,
            "seed": 7,
            "override_settings": {"CLIP_stop_at_last_layers": 1},
            "override_settings_restore_afterwards": True,
            "clip_skip": 1,
        },
    ),  # fmt: skip
    ("POST", "/sdapi/v1/interrupt", None),  # when the browser hangs up
]
OTHER_FEATURES = {"/sdapi/v1/upscalers", "/sdapi/v1/latent-upscale-modes"}  # the upscalers' routes


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two servable copies of the shipped model, a folder without a manifest, and a copy with a bad one."""
    root = tmp_path_factory.mktemp("models")
    for name in (*NAMES, "broken"):
        shutil.copytree(shipped_model(), root / name)
        manifest = json.loads((root / name / "sd_onnx.json").read_text())
        manifest["name"] = name
        if name == "broken":
            manifest["format_version"] = "one"
        (root / name / "sd_onnx.json").write_text(json.dumps(manifest))
    (root / "notes").mkdir()
    (root / "README.txt").write_text("not a model")
    return root


def load(folder: Path) -> StableDiffusionPipeline:
    """What `sd-run serve` loads a model with (on the CPU provider, for speed here)."""
    pipe = StableDiffusionPipeline.from_pretrained(folder, provider="cpu")
    pipe.self_test()
    return pipe


def serve(models_dir: Path, max_loaded: int = 1, **config: Any) -> Iterator[TestClient]:
    """The app `sd-run serve --models-dir` builds, ready."""
    entries, _ = discover(models_dir)
    cache = ModelCache(entries, load, max_loaded)
    with TestClient(create_app(ServerState(ServeConfig(**config), models=cache), cache.start)) as client:
        deadline = time.monotonic() + 60
        while client.get("/health").status_code != 200:
            assert time.monotonic() < deadline, "not ready"
            time.sleep(0.05)
        yield client


@pytest.fixture
def client(models_dir: Path) -> Iterator[TestClient]:
    yield from serve(models_dir)


def replay(client: TestClient, calls: list, **headers: str) -> list[httpx.Response]:
    """Send a client's calls in order, filling in "$TITLE" and "$OPTIONS" as that client does; every answer is
    a 200 (the upscalers' routes too, once that feature registers them)."""
    answers: list[httpx.Response] = []
    options: dict = {}
    models: list = []
    routes = {getattr(route, "path", None) for route in client.app.routes}
    for method, path, body in calls:
        if body is not None:
            title = next(m["title"] for m in models if m["model_name"] == NAMES[1])
            body = {**(options if body.get("$OPTIONS") else {}), **body}
            body = {k: title if v == "$TITLE" else v for k, v in body.items() if k != "$OPTIONS"}
        answer = client.request(method, path, json=body, headers=headers)
        if path not in OTHER_FEATURES or path in routes:
            assert answer.status_code == 200, (path, answer.text)
        if path == "/sdapi/v1/options" and method == "GET":
            options = answer.json()
        if path == "/sdapi/v1/sd-models":
            models = answer.json()
        answers.append(answer)
    return answers


def png_text(b64: str) -> str:
    return Image.open(io.BytesIO(base64.b64decode(b64))).text["parameters"]


def titles(client: TestClient) -> dict[str, str]:
    return {m["model_name"]: m["title"] for m in client.get("/sdapi/v1/sd-models").json()}


def test_discovery_serves_each_export_and_says_why_others_are_skipped(models_dir: Path) -> None:
    entries, warnings = discover(models_dir)
    assert [e.name for e in entries] == list(NAMES)
    assert [line.split(":")[0] for line in warnings] == ["skipped broken", "skipped notes"]
    assert all("\n" not in line for line in warnings)
    first = entries[0]
    assert first.title == f"circles [{first.sha256[:10]}]" and first.sha256 != entries[1].sha256
    assert first.matches(first.title) and first.matches("circles") and first.matches(first.sha256[:8].upper())
    assert not first.matches(first.sha256[:7]) and not first.matches("circle")


def test_open_webui(client: TestClient) -> None:
    answers = replay(client, OPEN_WEBUI)
    first, second = titles(client)["circles"], titles(client)["squares"]
    assert answers[0].json()["sd_model_checkpoint"] == first
    listed = [{"id": m["title"], "name": m["model_name"]} for m in answers[1].json()]
    assert listed == [{"id": first, "name": "circles"}, {"id": second, "name": "squares"}]
    assert answers[3].json() is None  # the options posted back changed nothing but the checkpoint
    result = answers[4].json()
    info = json.loads(result["info"])
    assert len(result["images"]) == 1 and "Model: squares" in png_text(result["images"][0])
    assert info["sd_model_checkpoint"] == second and info["ignored"] == []
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == second


def test_sillytavern(client: TestClient) -> None:
    answers = replay(client, SILLYTAVERN)
    by_path = {path: answer for (_, path, _), answer in zip(SILLYTAVERN, answers, strict=True)}
    assert [v["model_name"] for v in by_path["/sdapi/v1/sd-vae"].json()] == []
    assert "ddim" in [s["name"] for s in by_path["/sdapi/v1/samplers"].json()]
    assert [s["label"] for s in by_path["/sdapi/v1/schedulers"].json()] == ["Automatic"]  # no Karras: zero SNR
    progress = by_path["/sdapi/v1/progress"].json()
    assert progress["progress"] == 0 and progress["state"]["job_count"] == 0  # the switch is done
    info = json.loads(by_path["/sdapi/v1/txt2img"].json()["info"])
    text = info["infotexts"][0]
    assert (
        "Model: squares" in text and "Sampler: ddim" in text and text.startswith(PROMPT + "\nNegative prompt: blurry")
    )
    assert info["sd_model_checkpoint"] == titles(client)["squares"]
    assert info["ignored"] == ["scheduler"]  # "normal" has no sampler here; url, auth: not A1111's, ignored as there
    assert by_path["/sdapi/v1/interrupt"].json() == {"interrupted": 0}


def test_override_settings_apply_to_one_request_unless_kept(client: TestClient) -> None:
    first, second = titles(client)["circles"], titles(client)["squares"]
    for restore, current in ((True, first), (False, second)):
        body = {"prompt": PROMPT, "steps": 2, "seed": 1, "override_settings": {"sd_model_checkpoint": "squares"},
                "override_settings_restore_afterwards": restore}  # fmt: skip
        answer = client.post("/sdapi/v1/txt2img", json=body).json()
        assert "Model: squares" in png_text(answer["images"][0])
        assert json.loads(answer["info"])["sd_model_checkpoint"] == second
        assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == current
    clip = {"prompt": PROMPT, "steps": 2, "override_settings": {"CLIP_stop_at_last_layers": 2}}
    answer = client.post("/sdapi/v1/txt2img", json=clip).json()
    assert "Clip skip: 2" in png_text(answer["images"][0]) and json.loads(answer["info"])["ignored"] == []
    back = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": first[-11:-1]})  # a hash prefix
    assert back.status_code == 200 and client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == first


@pytest.mark.parametrize(
    ("path", "body", "detail"),
    [
        ("/sdapi/v1/options", {"sd_model_checkpoint": "nope [1]"}, "sd_model_checkpoint: no model named 'nope [1]'"),
        ("/sdapi/v1/options", {"sd_model_checkpoint": 3}, "sd_model_checkpoint: must be a model's title"),
        ("/sdapi/v1/options", {"sd_vae": "vae-ft-mse.safetensors"}, "sd_vae: no VAE named"),
        ("/sdapi/v1/options", [1], "body: "),
        ("/sdapi/v1/txt2img", {"override_settings": {"sd_model_checkpoint": "nope"}},
         "override_settings.sd_model_checkpoint: no model named 'nope'"),
        ("/sdapi/v1/txt2img", {"override_settings": {"CLIP_stop_at_last_layers": 0}},
         "override_settings.CLIP_stop_at_last_layers: must be an integer >= 1"),
        ("/sdapi/v1/txt2img", {"override_settings": {"CLIP_stop_at_last_layers": 40}},
         "override_settings.CLIP_stop_at_last_layers: "),  # past the encoder's layers: the request's own check
        ("/sdapi/v1/txt2img", {"override_settings": {"sd_vae": "x"}}, "override_settings.sd_vae: no VAE named 'x'"),
        ("/sdapi/v1/txt2img", {"override_settings": [1]}, "override_settings: "),
        ("/v1/images/generations", {"prompt": "x", "model": "dall-e-3"}, "model: no model named 'dall-e-3'"),
    ],
)  # fmt: skip
def test_unknown_models_and_settings_are_422_naming_the_field(
    client: TestClient, path: str, body: Any, detail: str
) -> None:
    answer = client.post(path, json=body)
    assert answer.status_code == 422 and answer.json()["detail"].startswith(detail), answer.text


def test_openai_model_field_and_model_list(client: TestClient) -> None:
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == list(NAMES)
    body = {"prompt": PROMPT, "model": "squares", "steps": 2, "seed": 3}
    made = client.post("/v1/images/generations", json=body).json()["data"][0]["b64_json"]
    assert "Model: squares" in png_text(made)
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == titles(client)["circles"]


def test_a_running_request_keeps_its_model_when_another_replaces_it(client: TestClient) -> None:
    result: dict = {}
    slow = {"prompt": PROMPT, "steps": 20, "seed": 2, "batch_size": 4, "width": 128, "height": 128}
    worker = threading.Thread(target=lambda: result.update(r=client.post("/sdapi/v1/txt2img", json=slow)))
    worker.start()
    deadline = time.monotonic() + 30
    while client.get("/sdapi/v1/progress").json()["state"]["sampling_step"] == 0:
        assert time.monotonic() < deadline and worker.is_alive(), "the job did not start"
        time.sleep(0.01)
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "squares"}).status_code == 200
    worker.join()
    assert result["r"].status_code == 200 and "Model: circles" in png_text(result["r"].json()["images"][0])


def test_the_cache_keeps_at_most_k_pipelines_least_recently_used_out(models_dir: Path) -> None:
    loads: list[str] = []

    def fake(folder: Path) -> object:
        loads.append(folder.name)
        if folder.name in broken:
            raise RuntimeError("cannot generate an image at the model's defaults\nsecond line")
        return object()

    broken: set[str] = set()
    entries = [entry_of_folder(models_dir / name) for name in NAMES]
    one = ModelCache(entries, fake, capacity=1)
    circles = one.start()
    assert one.get(entries[0]) is circles and loads == ["circles"]  # loaded once
    one.get(entries[1])
    assert not one.holds(entries[0]) and one.holds(entries[1]) and one.loaded_count() == 1
    two = ModelCache(entries, fake, capacity=2)
    two.get(entries[0]), two.get(entries[1]), two.get(entries[0])
    assert two.holds(entries[0]) and two.holds(entries[1]) and loads.count("circles") == 2
    broken.add("squares")
    failing = ModelCache(entries, fake, capacity=1)
    for _ in range(2):  # the reason stays; the folder is not read again
        with pytest.raises(ModelUnavailable, match=r"^squares \[\w+\]: cannot be served \(cannot .*defaults\)$"):
            failing.get(entries[1])
    assert [e.name for e in failing.listed()] == ["circles"] and loads.count("squares") == 3  # loaded once
    broken.add("circles")
    with pytest.raises(ModelUnavailable, match="no model could be loaded"):
        ModelCache(entries, fake, 1).start()


def test_basic_auth_carries_the_api_key_as_its_password(models_dir: Path) -> None:
    for client in serve(models_dir, api_key="sekret"):
        options = "/sdapi/v1/options"
        assert client.get(options, auth=("anyone", "sekret")).status_code == 200
        assert client.get(options, auth=("", "sekret")).status_code == 200
        assert client.get(options, headers={"Authorization": "Bearer sekret"}).status_code == 200
        for bad in (("anyone", "wrong"), ("sekret", "")):
            assert client.get(options, auth=bad).status_code == 401
        for header in ("Basic !!!", "Basic " + base64.b64encode(b"sekret").decode(), "Basic"):
            assert client.get(options, headers={"Authorization": header}).status_code == 401
        answers = replay(client, OPEN_WEBUI[:2], authorization="Basic " + base64.b64encode(b"u:sekret").decode())
        assert answers[1].json()[0]["model_name"] == "circles"


def test_png_info_reads_our_pngs_back(client: TestClient) -> None:
    body = {"prompt": "a small red circle", "negative_prompt": "green", "steps": 3, "seed": 11, "width": 48}
    made = client.post("/sdapi/v1/txt2img", json=body).json()["images"][0]
    answer = client.post("/sdapi/v1/png-info", json={"image": "data:image/png;base64," + made}).json()
    assert answer["info"] == png_text(made) and answer["items"] == {}
    parameters = answer["parameters"]
    assert parameters["Prompt"] == "a small red circle" and parameters["Negative prompt"] == "green"
    assert (parameters["Steps"], parameters["Seed"], parameters["Size-1"], parameters["Size-2"]) == (
        "3",
        "11",
        "48",
        "64",
    )
    assert parameters["Model"] == "circles" and parameters["Clip skip"] == "1"


A1111_INFOTEXT = (
    "masterpiece, (a cat:1.2),\nsitting on a mat\nNegative prompt: blurry,\nlowres\n"
    "Steps: 25, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 512x768, "
    'Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Clip skip: 2, Lora hashes: "add_detail: 7c6bad76eb54, '
    'more: 0123456789ab", Hires upscaler: Latent, Version: v1.10.1'
)


def test_png_info_parses_an_a1111_infotext_as_a1111_does(client: TestClient) -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", A1111_INFOTEXT)
    info.add_text("Software", "AUTOMATIC1111")
    buffer = io.BytesIO()
    Image.new("RGB", (512, 768)).save(buffer, format="PNG", pnginfo=info)  # over the pixel limit: header only
    answer = client.post("/sdapi/v1/png-info", json={"image": base64.b64encode(buffer.getvalue()).decode()})
    assert answer.status_code == 200, answer.text
    data = answer.json()
    assert data["info"] == A1111_INFOTEXT and data["items"] == {"Software": "AUTOMATIC1111"}
    expected = {
        "Prompt": "masterpiece, (a cat:1.2),\nsitting on a mat", "Negative prompt": "blurry,\nlowres",
        "Steps": "25", "Sampler": "DPM++ 2M", "Schedule type": "Karras", "CFG scale": "7", "Seed": "1234",
        "Size-1": "512", "Size-2": "768", "Model hash": "6ce0161689", "Model": "v1-5-pruned-emaonly",
        "Clip skip": "2", "Lora hashes": "add_detail: 7c6bad76eb54, more: 0123456789ab", "Hires upscaler": "Latent",
        "Version": "v1.10.1", "RNG": "GPU", "Hires checkpoint": "Use same checkpoint",
    }  # fmt: skip
    assert {k: data["parameters"][k] for k in expected} == expected
    assert parse_infotext("just a prompt")["Prompt"] == "just a prompt"
    refused = client.post("/sdapi/v1/png-info", json={"image": base64.b64encode(b"not an image").decode()})
    assert refused.status_code == 422 and refused.json()["detail"].startswith("image: not a readable image")


WEBUIAPI_PAYLOAD = {  # what webuiapi 0.9's txt2img sends besides the prompt and sizes, at its defaults
    "enable_hr": False, "hr_scale": 2, "hr_upscaler": "Latent", "hr_second_pass_steps": 0, "hr_resize_x": 0,
    "hr_resize_y": 0, "hr_checkpoint_name": None, "hr_sampler_name": None, "hr_scheduler": None, "hr_prompt": "",
    "hr_negative_prompt": "", "denoising_strength": 0.7, "firstphase_width": 0, "firstphase_height": 0, "styles": [],
    "subseed": -1, "subseed_strength": 0.0, "seed_resize_from_h": 0, "seed_resize_from_w": 0, "restore_faces": False,
    "tiling": False, "do_not_save_samples": False, "do_not_save_grid": False, "eta": 1.0, "s_churn": 0, "s_tmax": 0,
    "s_tmin": 0, "s_noise": 1, "override_settings": {}, "override_settings_restore_afterwards": True,
    "sampler_name": "Euler a", "scheduler": "automatic", "sampler_index": "Euler a", "script_name": None,
    "script_args": [], "send_images": True, "save_images": False, "alwayson_scripts": {},
}  # fmt: skip
UNSUPPORTED = [
    ({"restore_faces": True}, "restore_faces"),
    ({"tiling": True}, "tiling"),
    ({"subseed_strength": 0.5}, "subseed_strength"),
    ({"alwayson_scripts": {"ADetailer": {"args": [{"ad_model": "face_yolov8n.pt"}]}, "Dynamic Prompts": {"args": []}}},
     "alwayson_scripts.ADetailer"),  # ControlNet is implemented: tests/test_controlnet.py
    ({"override_settings": {"sd_lora": "x"}}, "override_settings.sd_lora"),
    ({"override_settings": {"samples_format": "jpg"}}, "override_settings.samples_format"),
    ({"styles": ["anime"]}, "styles"),
    ({"scheduler": "exponential"}, "scheduler"),
]  # fmt: skip


def test_fields_we_do_not_implement_are_listed_not_dropped(client: TestClient) -> None:
    plain = {"prompt": PROMPT, "steps": 2, "seed": 1, "width": 64, "height": 64}
    at_defaults = client.post("/sdapi/v1/txt2img", json={**WEBUIAPI_PAYLOAD, **plain})
    assert at_defaults.status_code == 200 and json.loads(at_defaults.json()["info"])["ignored"] == []
    for extra, name in UNSUPPORTED:
        body = json.dumps({**plain, **extra, "not_an_a1111_field": float("nan")})  # NaN: not JSON, but Python's
        answer = client.post("/sdapi/v1/txt2img", content=body, headers={"Content-Type": "application/json"})
        assert answer.status_code == 200, answer.text
        assert json.loads(answer.json()["info"])["ignored"] == [name]
        assert "not_an_a1111_field" not in answer.json()["parameters"]  # used nowhere, echoed nowhere
    ignored = client.post("/sdapi/v1/options", json={"samples_format": "jpg", "sd_vae": "None"}).json()
    assert ignored == {"ignored": ["samples_format"]}


def test_strict_refuses_what_it_would_ignore(models_dir: Path) -> None:
    for client in serve(models_dir, strict=True):
        plain = {"prompt": PROMPT, "steps": 2, "seed": 1}
        for extra, name in UNSUPPORTED:
            answer = client.post("/sdapi/v1/txt2img", json={**plain, **extra})
            assert answer.status_code == 422 and answer.json()["detail"].startswith(f"{name}: not supported"), name
        assert client.post("/sdapi/v1/txt2img", json={**WEBUIAPI_PAYLOAD, **plain}).status_code == 200
        assert replay(client, OPEN_WEBUI)[-1].status_code == 200  # it posts the options back unchanged
        refused = client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 2})
        assert refused.status_code == 422 and refused.json()["detail"].startswith("CLIP_stop_at_last_layers: ")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-m", "x"], "--models-dir and -m do not go together"),
        (["--ray"], "--models-dir and --ray do not go together"),
        (["--lora", "x.safetensors"], "--models-dir and --lora do not go together"),
    ],
)
def test_cli_refuses_what_does_not_go_with_models_dir(models_dir: Path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(main, ["serve", "--models-dir", str(models_dir), *args])
    assert result.exit_code == 2 and message in result.output, result.output


def test_cli_refuses_a_folder_without_servable_models(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(main, ["serve", "--models-dir", str(tmp_path)])
    assert result.exit_code == 1 and "warning: " in result.output and "no servable model folder" in result.output
    lone = CliRunner().invoke(main, ["serve", "--max-loaded-models", "2"])
    assert lone.exit_code == 2 and "--max-loaded-models needs --models-dir" in lone.output


def test_webuiapi_package_against_a_real_server(models_dir: Path) -> None:
    webuiapi = pytest.importorskip("webuiapi")
    port = free_port()
    cmd = [sys.executable, "-m", "sd_onnx.runtime.cli", "serve", "--models-dir", str(models_dir), "--port", str(port),
           "--provider", "cpu", "--api-key", "sekret", "--max-loaded-models", "2"]  # fmt: skip
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, server.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.2)
        api = webuiapi.WebUIApi(host="127.0.0.1", port=port, username="me", password="sekret")
        names = api.util_get_model_names()
        assert [name.split(" [")[0] for name in names] == list(NAMES)
        assert api.get_options()["sd_model_checkpoint"] == names[0] == api.util_get_current_model()
        api.util_set_model(names[1])
        assert api.util_get_current_model() == names[1]
        result = api.txt2img(
            prompt=PROMPT, negative_prompt="green", seed=5, steps=4, cfg_scale=2.0, width=64, height=64
        )
        assert result.image.size == (64, 64) and result.info["sd_model_checkpoint"] == names[1]
        assert result.info["ignored"] == [] and "Model: squares" in result.info["infotexts"][0]
        read = api.png_info(result.image)
        assert read.info == result.info["infotexts"][0]
        assert read.parameters["Model"] == "squares" and read.parameters["Seed"] == "5"
        assert api.get_embeddings() == {"loaded": {}, "skipped": {}} and api.get_loras() == []
    finally:
        server.terminate()
        server.wait(timeout=60)
