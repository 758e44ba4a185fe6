"""`sd-run serve --ray` on a local Ray (127.0.0.1, 3 logical CPUs: 2 replicas and a builder test's) with the
shipped model: two replicas answer A1111 and OpenAI requests at once with the local pipeline's pixels, a killed
replica answers 503 and is replaced, a full queue answers 503 with Retry-After, deploying a new model folder
rolls over without failed requests, and the application builder for `serve run` and KubeRay works."""

from __future__ import annotations

import base64
import io
import json
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")
httpx = pytest.importorskip("httpx")

from PIL import Image  # noqa: E402
from ray import serve  # noqa: E402

from sd_onnx.runtime.manifest import MANIFEST_NAME  # noqa: E402
from sd_onnx.runtime.pipeline import StableDiffusionPipeline  # noqa: E402
from sd_onnx.runtime.request import GenerationRequest, Limits  # noqa: E402
from sd_onnx.runtime.server.ray_serve import APP_NAME, RayOptions, build_app, check_fits, deploy  # noqa: E402
from sd_onnx.runtime.server.state import ServeConfig  # noqa: E402
from sd_onnx.runtime.shipped import shipped_model  # noqa: E402

QUEUE = 2  # two requests at once reach two replicas; Serve may count one being assigned as queued


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=3, include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="ERROR",
             log_to_driver=False)  # fmt: skip
    port = free_port()
    config = ServeConfig(queue_size=QUEUE, public_url=f"http://127.0.0.1:{port}")
    deploy(shipped_model(), config, RayOptions(replicas=2), threads=1, port=port)
    yield {"url": f"http://127.0.0.1:{port}", "config": config, "port": port}
    serve.shutdown()
    ray.shutdown()


def local_pixels(prompt: str, seed: int, steps: int) -> np.ndarray:
    pipe = StableDiffusionPipeline.from_pretrained(threads=1)
    request = pipe.prepare(GenerationRequest(prompt, steps=steps, seed=seed), Limits())
    return np.asarray(pipe.generate(request).images[0])


def png_pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def test_two_replicas_answer_a1111_and_openai_at_once_with_local_pixels(cluster):
    url = cluster["url"]
    a1111 = {"prompt": "a red circle", "steps": 4, "seed": 11}
    openai = {"prompt": "a blue square", "steps": 4, "seed": 12, "response_format": "b64_json"}
    with httpx.Client(timeout=120) as client, ThreadPoolExecutor(2) as pool:
        first = pool.submit(client.post, f"{url}/sdapi/v1/txt2img", json=a1111)
        second = pool.submit(client.post, f"{url}/v1/images/generations", json=openai)
        answers = first.result(), second.result()
    assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
    info = json.loads(answers[0].json()["info"])
    assert info["seed"] == 11 and "Seed: 11" in info["infotexts"][0]
    np.testing.assert_array_equal(png_pixels(answers[0].json()["images"][0]), local_pixels("a red circle", 11, 4))
    openai_png = answers[1].json()["data"][0]["b64_json"]
    np.testing.assert_array_equal(png_pixels(openai_png), local_pixels("a blue square", 12, 4))
    health = httpx.get(f"{url}/health").json()
    assert health == {"status": "ok", "running": 0, "queued": 0}


def test_field_errors_are_422_before_any_replica(cluster):
    answer = httpx.post(f"{cluster['url']}/sdapi/v1/txt2img", json={"prompt": "x", "steps": 0}, timeout=30)
    assert answer.status_code == 422 and answer.json()["detail"].startswith("steps:")


def test_the_web_page_is_served_by_the_ingress(cluster):
    page = httpx.get(f"{cluster['url']}/", timeout=30)
    assert page.status_code == 200 and 'id="generate"' in page.text and "/sdapi/v1/txt2img" in page.text


def model_replicas() -> list:
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "#Model#" in a["name"]]
    return [ray.get_actor(name, namespace="serve") for name in names]


def wait_for_step(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if httpx.get(f"{url}/sdapi/v1/progress", timeout=10).json()["state"]["sampling_step"] > 0:
            return
        time.sleep(0.05)
    raise AssertionError("the job never started")


def test_killed_replica_answers_503_and_the_next_request_succeeds(cluster):
    url = cluster["url"]
    slow = {"prompt": "a slow one", "steps": 50, "width": 128, "height": 128, "seed": 3}
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(httpx.post, f"{url}/sdapi/v1/txt2img", json=slow, timeout=120)
        wait_for_step(url)
        for replica in model_replicas():  # whichever runs it
            ray.kill(replica, no_restart=False)
        answer = running.result()
    assert answer.status_code == 503 and "replica" in answer.json()["detail"]
    assert answer.headers["retry-after"]
    after = httpx.post(f"{url}/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "seed": 1}, timeout=120)
    assert after.status_code == 200, after.text


def test_full_queue_answers_503_with_retry_after(cluster):
    url = cluster["url"]
    slow = {"prompt": "busy", "steps": 30, "width": 128, "height": 128, "seed": 5}
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: httpx.post(f"{url}/sdapi/v1/txt2img", json=slow, timeout=180), range(6)))
    codes = sorted(a.status_code for a in answers)
    assert codes.count(200) >= 2 and codes.count(503) >= 1 and set(codes) == {200, 503}, codes  # 2 running
    refused = next(a for a in answers if a.status_code == 503)
    assert refused.headers["retry-after"] and "queue" in refused.json()["detail"]


def test_deploying_a_new_model_rolls_over_without_failed_requests(cluster, tmp_path: Path):
    url = cluster["url"]
    renamed = tmp_path / "renamed"
    shutil.copytree(shipped_model(), renamed)
    manifest = json.loads((renamed / MANIFEST_NAME).read_text())
    manifest["name"] = "renamed-shapes"
    (renamed / MANIFEST_NAME).write_text(json.dumps(manifest))
    failures, done, stop = [], [], threading.Event()

    def load() -> None:
        with httpx.Client(timeout=120) as client:
            while not stop.is_set():
                answer = client.post(f"{url}/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "seed": 1})
                (done if answer.status_code == 200 else failures).append(answer.status_code)

    worker = threading.Thread(target=load)
    worker.start()
    try:
        deploy(renamed, cluster["config"], RayOptions(replicas=2), threads=1, port=cluster["port"])
        time.sleep(1)
    finally:
        stop.set()
        worker.join()
    assert not failures and done, (failures, len(done))
    models = httpx.get(f"{url}/sdapi/v1/sd-models", timeout=30).json()
    assert models[0]["model_name"] == "renamed-shapes"
    assert serve.status().applications[APP_NAME].status == "RUNNING"


def test_the_application_builder_for_serve_run_and_rayservice(cluster):
    args = {"model": str(shipped_model()), "replicas": "1", "cpus_per_replica": "0.1", "max_steps": "5"}
    serve.run(build_app(args), name="from-builder", route_prefix="/builder")
    try:
        base = f"{cluster['url']}/builder"
        too_many = httpx.post(f"{base}/sdapi/v1/txt2img", json={"prompt": "x", "steps": 6}, timeout=60)
        assert too_many.status_code == 422 and "max_steps=5" in too_many.json()["detail"]
        answer = httpx.post(f"{base}/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "seed": 3}, timeout=60)
        assert answer.status_code == 200
        np.testing.assert_array_equal(png_pixels(answer.json()["images"][0]), local_pixels("x", 3, 2))
    finally:
        serve.delete("from-builder")


@pytest.mark.parametrize(
    "args, message",
    [
        ({}, "model: required"),
        ({"model": "m", "colour": "red"}, "colour: unknown argument"),
        ({"model": "m", "replicas": "two"}, "replicas: must be an integer, got 'two'"),
        ({"model": "m", "replicas": "0"}, "replicas: must be >= 1"),
        ({"model": "m", "autoscale": "3"}, "autoscale: must be MIN:MAX, got '3'"),
        ({"model": "m", "autoscale": "4:2"}, "autoscale: needs 1 <= MIN <= MAX"),
        ({"model": "m", "cpus_per_replica": "nan"}, "cpus_per_replica: must be a positive number"),
    ],
)
def test_application_builder_arguments_are_checked(args, message):
    with pytest.raises(ValueError, match=message):
        build_app(args)


def test_the_kuberay_example_names_a_builder_that_accepts_its_args():
    yaml = pytest.importorskip("yaml")
    service = yaml.safe_load((Path(__file__).parents[1] / "docs" / "kuberay-rayservice.yaml").read_text())
    (app,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    module, _, name = app["import_path"].partition(":")
    builder = getattr(__import__(module, fromlist=[name]), name)
    assert builder is build_app
    assert build_app({**app["args"], "model": str(shipped_model())}) is not None


@pytest.mark.parametrize(
    "options, message",
    [
        (RayOptions(replicas=3), "3 replicas x 1 CPU need 3 CPUs and this machine's Ray has 2"),
        (RayOptions(autoscale=(4, 8), cpus_per_replica=0.5), "4 replicas x 0.5 CPU need 2 CPUs"),
        (RayOptions(gpus_per_replica=1), "1 replicas x 1 GPU need 1 GPUs and this machine's Ray has 0"),
    ],
)
def test_a_private_ray_refuses_replicas_it_cannot_hold(options, message):
    with pytest.raises(ValueError, match=message.replace("x", r"x").replace(".", r"\.")):
        check_fits(options, {"CPU": 2.0 if "0.5" not in message else 1.5})
    check_fits(RayOptions(replicas=2), {"CPU": 2.0})
