"""`sd-run batch`: one PNG (with its parameters) and one results record per line, bad lines reported while the
rest goes on, atomic resume after a crash (SIGKILL of the driver) with every image exactly once, and the Ray
run (a `ray start --head` cluster on 127.0.0.1) writing the same bytes as the local one."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from PIL import Image

from sd_onnx.runtime.batch import RESULTS_NAME
from sd_onnx.runtime.cli import main

GOOD = [{"id": "cat", "prompt": "a cat", "steps": 3, "seed": 1}, {"prompt": "a dog", "steps": 3, "seed": 2}]
BAD = ["not json", '{"id": "cat", "prompt": "again"}', '{"prompt": "x", "steps": 0}', '{"prompt": "x", "colour": 1}',
       '{"id": "CAT", "prompt": "x"}', '{"prompt": ["a", "b"]}', '{"prompt": "x", "seed": true}', "[1, 2]",
       '{"id": "../up", "prompt": "x"}', '{"prompt": "x", "width": 1e999}', '{"id": 5, "prompt": "x"}']  # fmt: skip


def write_prompts(path: Path, rows: list, bad: list[str] = ()) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows) + "".join(line + "\n" for line in bad))
    return path


def records(outdir: Path) -> list[dict]:
    return [json.loads(line) for line in (outdir / RESULTS_NAME).read_text().splitlines()]


def run_cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["batch", *args, "--threads", "1"])
    return result.exit_code, result.output


def test_each_line_gets_an_image_or_its_error_and_the_rest_goes_on(tmp_path: Path):
    prompts = write_prompts(tmp_path / "p.jsonl", GOOD, BAD)
    code, output = run_cli(str(prompts), str(tmp_path / "out"))
    assert code == 1 and "11 of 13 failed" in output
    by_id = {r["id"]: r for r in records(tmp_path / "out")}
    assert by_id["cat"]["status"] == by_id["line-2"]["status"] == "ok" and by_id["cat"]["seed"] == 1
    assert by_id["cat"]["timings"]["steps"] == 3 and by_id["cat"]["timings"]["generate_s"] > 0
    assert by_id["line-3"]["error"] == "not valid JSON"
    assert by_id["line-4"]["error"] == "id 'cat' is already used on line 1"
    assert by_id["line-5"]["error"].startswith("steps: must be >= 1")
    assert by_id["line-6"]["error"].startswith("colour: unknown field")
    assert by_id["line-7"]["error"] == "id 'CAT' is already used on line 1"
    assert by_id["line-8"]["error"] == "prompt: must be a string (one image per line)"
    assert by_id["line-9"]["error"].startswith("seed: ")
    assert by_id["line-10"]["error"].startswith("must be a JSON object")
    assert by_id["line-11"]["error"].startswith("id: must be")
    assert by_id["line-12"]["error"].startswith("width: ")
    assert by_id["line-13"]["error"] == "id: must be a string, got int"
    assert all(set(r) == {"id", "line", "status", "error"} for r in by_id.values() if r["status"] == "error")
    with Image.open(tmp_path / "out" / "cat.png") as image:
        assert "a cat" in image.text["parameters"] and "Seed: 1" in image.text["parameters"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["cat.png", "line-2.png", RESULTS_NAME]


def test_a_finished_folder_needs_resume(tmp_path: Path):
    prompts = write_prompts(tmp_path / "p.jsonl", GOOD)
    assert run_cli(str(prompts), str(tmp_path / "out"))[0] == 0
    code, output = run_cli(str(prompts), str(tmp_path / "out"))
    assert code == 1 and "--resume" in output and "Traceback" not in output
    code, output = run_cli(str(prompts), str(tmp_path / "out"), "--resume")
    assert code == 0 and "0 done, 0 failed, 2 already done" in output


def test_resume_redoes_failed_missing_and_half_written_work(tmp_path: Path):
    prompts = write_prompts(tmp_path / "p.jsonl", GOOD + [{"id": "bird", "prompt": "a bird", "steps": 0}])
    out = tmp_path / "out"
    run_cli(str(prompts), str(out))
    before = (out / "cat.png").read_bytes()
    (out / "line-2.png").unlink()  # a record without its image
    (out / ".bird.png.partial").write_bytes(b"half")  # a crash mid-write
    with (out / RESULTS_NAME).open("a") as results:
        results.write('{"id": "cut sh')  # a record cut short
    prompts.write_text(prompts.read_text().replace('"steps": 0', '"steps": 2'))  # the failed line, fixed
    code, output = run_cli(str(prompts), str(out), "--resume")
    assert code == 0 and "2 done, 0 failed, 1 already done" in output
    assert sorted(r["id"] for r in records(out)) == ["bird", "cat", "line-2"]
    assert all(r["status"] == "ok" for r in records(out))
    assert (out / "cat.png").read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["bird.png", "cat.png", "line-2.png", RESULTS_NAME]


def test_a_byte_order_mark_is_accepted_and_an_empty_file_refused(tmp_path: Path):
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD[0]).encode() + b"\r\n")  # as Notepad and Excel save
    code, output = run_cli(str(bom), str(tmp_path / "out"))
    assert code == 0 and "1 done, 0 failed" in output
    (tmp_path / "empty.jsonl").write_text("\n  \n")
    code, output = run_cli(str(tmp_path / "empty.jsonl"), str(tmp_path / "out2"))
    assert code == 1 and "has no requests" in output and not (tmp_path / "out2").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["missing.jsonl", "out"], "missing.jsonl: no such prompts file"),
        (["/dev/zero", "out"], "/dev/zero: is a device, FIFO or socket, not a regular prompts file"),
        ([".", "out"], "is a directory"),
        (["p.jsonl", "p.jsonl"], "is a file"),
        (["p.jsonl", "out", "--workers", "2"], "need --ray"),
        (["p.jsonl", "out", "--steps", "3"], "No such option"),
    ],
)
def test_hostile_invocations_are_one_line_errors(tmp_path: Path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    write_prompts(tmp_path / "p.jsonl", GOOD)
    code, output = run_cli(*args)
    assert code != 0 and message in output and "Traceback" not in output


# Ray and crashes ----------------------------------------------------------------------------------------------

SLOW = [{"id": f"img-{i}", "prompt": f"shape number {i}", "steps": 40, "seed": 100 + i} for i in range(8)]
SD_RUN = [sys.executable, "-m", "sd_onnx.runtime.cli", "batch"]


@pytest.fixture(scope="module")
def ray_address():
    pytest.importorskip("ray")
    ray_cli = str(Path(sys.executable).with_name("ray"))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    flags = ["--num-cpus=2", "--include-dashboard=false", "--node-ip-address=127.0.0.1", "--disable-usage-stats"]
    # A cluster with token authentication, as `ray start` makes by default since Ray 2.52 (given the token
    # explicitly: whether `ray start` generates one itself differs between Ray versions); an explicit address
    # joins it with the mode and token set, as docs/scale-out.md tells users.
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    before = {name: os.environ.get(name) for name in auth}
    os.environ.update(auth)
    subprocess.run([ray_cli, "start", "--head", f"--port={port}", *flags], check=True, capture_output=True)
    yield f"127.0.0.1:{port}"
    subprocess.run([ray_cli, "stop", "--force"], capture_output=True)
    for name, value in before.items():
        if value is None:
            os.environ.pop(name)
        else:
            os.environ[name] = value


def ray_args(address: str) -> list[str]:
    return ["--ray", "--address", address, "--workers", "2", "--cpus-per-worker", "1"]


def test_serve_ray_deploys_onto_a_running_cluster_and_returns(ray_address, tmp_path: Path):
    """The CLI path of `sd-run serve --ray --address`: deploy, return, keep serving from the cluster."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cli = [sys.executable, "-m", "sd_onnx.runtime.cli", "serve", "--ray", "--address", ray_address]
    deployed = subprocess.run([*cli, "--port", str(port), "--replicas", "1"], capture_output=True, text=True,
                              timeout=300)  # fmt: skip
    try:
        assert deployed.returncode == 0 and "serve shutdown" in deployed.stdout, deployed.stderr[-2000:]
        body = {"prompt": "a cat", "steps": 3, "seed": 1}
        answer = httpx.post(f"http://127.0.0.1:{port}/sdapi/v1/txt2img", json=body, timeout=120)
        assert answer.status_code == 200 and "Seed: 1" in json.loads(answer.json()["info"])["infotexts"][0]
    finally:
        stop = f"import ray; from ray import serve; ray.init(address={ray_address!r}); serve.shutdown()"
        subprocess.run([sys.executable, "-c", stop], capture_output=True, timeout=120)
    no_token = {name: value for name, value in os.environ.items() if not name.startswith("RAY_AUTH")}
    refused = subprocess.run([*cli, "--port", str(port)], capture_output=True, text=True, timeout=300, env=no_token)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "RAY_AUTH_MODE=token" in refused.stderr.splitlines()[-1]


def test_batch_on_ray_writes_the_same_bytes_as_locally(tmp_path: Path, ray_address):
    prompts = write_prompts(tmp_path / "p.jsonl", GOOD + SLOW[:2], BAD[:1])
    subprocess.run([*SD_RUN, str(prompts), str(tmp_path / "local"), "--threads", "1"], capture_output=True)
    ray_run = subprocess.run([*SD_RUN, str(prompts), str(tmp_path / "ray"), *ray_args(ray_address)],
                             capture_output=True, text=True, timeout=300)  # fmt: skip
    assert ray_run.returncode == 1 and "1 of 5 failed" in ray_run.stderr, ray_run.stderr[-2000:]
    pngs = sorted(p.name for p in (tmp_path / "local").glob("*.png"))
    assert pngs == sorted(p.name for p in (tmp_path / "ray").glob("*.png")) and len(pngs) == 4
    for name in pngs:
        assert (tmp_path / "local" / name).read_bytes() == (tmp_path / "ray" / name).read_bytes(), name

    def comparable(outdir: Path) -> list[dict]:
        return sorted(({k: v for k, v in r.items() if k != "timings"} for r in records(outdir)), key=lambda r: r["id"])

    assert comparable(tmp_path / "local") == comparable(tmp_path / "ray")


@pytest.mark.parametrize("where", ["local", "ray"])
def test_a_killed_driver_resumes_with_every_image_exactly_once(tmp_path: Path, where, request):
    extra = ray_args(request.getfixturevalue("ray_address")) if where == "ray" else ["--threads", "1"]
    prompts = write_prompts(tmp_path / "p.jsonl", SLOW)
    out = tmp_path / "out"
    driver = subprocess.Popen([*SD_RUN, str(prompts), str(out), *extra], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and driver.poll() is None:
        if (out / RESULTS_NAME).is_file() and len(records(out)) >= 2:
            break
        time.sleep(0.05)
    assert driver.poll() is None, "the run ended before it could be killed"
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    interrupted = len(records(out))
    assert 2 <= interrupted < len(SLOW)
    resumed = subprocess.run([*SD_RUN, str(prompts), str(out), "--resume", *extra], capture_output=True, text=True,
                             timeout=300)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    ids = [r["id"] for r in records(out)]
    assert sorted(ids) == sorted(row["id"] for row in SLOW)  # each exactly once
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{row['id']}.png" for row in SLOW] + [RESULTS_NAME])
    fresh = tmp_path / "fresh"
    subprocess.run([*SD_RUN, str(prompts), str(fresh), "--threads", "1"], capture_output=True, check=True)
    for row in SLOW:
        assert (out / f"{row['id']}.png").read_bytes() == (fresh / f"{row['id']}.png").read_bytes()
    shutil.rmtree(fresh)
