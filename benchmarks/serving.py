"""Serving on Ray against the single-process server, on this machine, in one invocation:

- overhead: a single-process server (`sd-run serve`, 1 thread) and Ray Serve with one replica (1 CPU) run at
  the same time and get the same requests one at a time, alternating, so both see the same machine state;
  the difference in p50/p95 latency is what Ray's ingress -> replica hop and progress streaming cost;
- throughput: a closed loop of `clients` concurrent clients against, in turn, the single-process server with
  1 and with 2 threads, and Ray Serve with 1 and 2 replicas of 1 CPU each: images per minute.

Each server is a real `sd-run serve` process on 127.0.0.1, as users run it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from .machine import machine_info, versions

READY_TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serving(model: Path | None, *args: str) -> Iterator[str]:
    """An `sd-run serve` process (its own process group) until the block ends; yields its URL."""
    port = _free_port()
    cmd = [sys.executable, "-m", "sd_onnx.runtime.cli", "serve", "--port", str(port), "--queue-size", "64", *args]
    cmd += ["-m", str(model)] if model else []
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not _healthy(url):
            if proc.poll() is not None:
                raise RuntimeError(f"{' '.join(cmd)} exited: {proc.stderr.read()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{' '.join(cmd)} not ready in {READY_TIMEOUT_S} s")
            time.sleep(0.5)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


def _generate(client: httpx.Client, url: str, steps: int, seed: int) -> float:
    body = {"prompt": "a red circle on a blue square", "steps": steps, "seed": seed}
    started = time.perf_counter()
    answer = client.post(f"{url}/sdapi/v1/txt2img", json=body)
    elapsed = time.perf_counter() - started
    if answer.status_code != 200:
        raise RuntimeError(f"{url}: {answer.status_code} {answer.text[:200]}")
    return elapsed


def _percentiles(values: list[float]) -> dict[str, float]:
    cuts = statistics.quantiles(values, n=20, method="inclusive")
    return {"p50_s": statistics.median(values), "p95_s": cuts[18], "n": len(values)}


def overhead(model: Path | None, steps: int, requests: int) -> dict[str, Any]:
    """p50/p95 latency of the same sequential requests, alternating between the two servers."""
    latencies: dict[str, list[float]] = {"single_process": [], "ray_serve": []}
    ray_args = ("--ray", "--replicas", "1", "--cpus-per-replica", "1")
    with serving(model, "--threads", "1") as single, serving(model, *ray_args) as on_ray:
        urls = {"single_process": single, "ray_serve": on_ray}
        with httpx.Client(timeout=600) as client:
            for url in urls.values():  # warm-up, dropped
                _generate(client, url, steps, 0)
            for i in range(requests):
                order = list(urls.items()) if i % 2 == 0 else list(urls.items())[::-1]
                for name, url in order:
                    latencies[name].append(_generate(client, url, steps, 1000 + i))
    stats = {name: _percentiles(values) for name, values in latencies.items()}
    single, on_ray = stats["single_process"], stats["ray_serve"]
    return {
        **stats,
        "added_p50_ms": (on_ray["p50_s"] - single["p50_s"]) * 1000,
        "added_p95_ms": (on_ray["p95_s"] - single["p95_s"]) * 1000,
        "ratio_p50": on_ray["p50_s"] / single["p50_s"],
    }


THROUGHPUT_SETUPS = {
    "single process, 1 thread": ("--threads", "1"),
    "single process, 2 threads": ("--threads", "2"),
    "ray serve, 1 replica x 1 CPU": ("--ray", "--replicas", "1", "--cpus-per-replica", "1"),
    "ray serve, 2 replicas x 1 CPU": ("--ray", "--replicas", "2", "--cpus-per-replica", "1"),
}


def throughput(model: Path | None, steps: int, requests: int, clients: int) -> dict[str, Any]:
    """Images per minute for `requests` requests from `clients` concurrent clients, per setup."""
    results = {}
    for name, args in THROUGHPUT_SETUPS.items():
        with serving(model, *args) as url, httpx.Client(timeout=600) as client, ThreadPoolExecutor(clients) as pool:
            list(pool.map(lambda seed: _generate(client, url, steps, seed), range(clients)))  # warm-up
            started = time.perf_counter()
            latencies = list(pool.map(lambda seed: _generate(client, url, steps, seed), range(requests)))
            wall = time.perf_counter() - started
        results[name] = {"images_per_min": requests / wall * 60, "wall_s": wall, **_percentiles(latencies)}
    base = results["ray serve, 1 replica x 1 CPU"]["images_per_min"]
    return {"setups": results, "two_vs_one_replica": results["ray serve, 2 replicas x 1 CPU"]["images_per_min"] / base}


def measure(model: Path | None, steps: int, requests: int, clients: int) -> dict[str, Any]:
    """The whole report: machine, settings, overhead and throughput."""
    return {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine_info(),
        "versions": versions(("onnxruntime", "ray", "fastapi", "uvicorn")),
        "settings": {
            "model": model.name if model else "shipped shapes model",
            "steps": steps,
            "requests": requests,
            "clients": clients,
        },  # fmt: skip
        "overhead": overhead(model, steps, requests),
        "throughput": throughput(model, steps, requests, clients),
    }


def markdown(report: dict[str, Any]) -> str:
    """The report as a short Markdown page."""
    m, s, o, t = report["machine"], report["settings"], report["overhead"], report["throughput"]
    lines = [
        "## Serving on Ray vs the single-process server",
        "",
        f"Measured {report['date']}. Machine: {m['cpu']}, {m['cores']} logical cores, ISA {', '.join(m['isa'])}. "
        f"Model: {s['model']}, "
        f"{s['steps']} steps per image, A1111 txt2img over HTTP on 127.0.0.1.",
        "",
        f"### Per-request overhead ({s['requests']} sequential requests each, alternating between the two)",
        "",
        "| server | p50 (s) | p95 (s) |",
        "|---|---:|---:|",
        *(
            f"| {name.replace('_', ' ')} | {o[name]['p50_s']:.3f} | {o[name]['p95_s']:.3f} |"
            for name in ("single_process", "ray_serve")
        ),  # fmt: skip
        "",
        f"Ray adds {o['added_p50_ms']:.0f} ms at p50 and {o['added_p95_ms']:.0f} ms at p95 "
        f"({o['ratio_p50']:.2f}x the single-process p50).",
        "",
        f"### Throughput ({s['requests']} requests from {s['clients']} concurrent clients)",
        "",
        "| setup | images/min | p50 latency (s) | p95 latency (s) |",
        "|---|---:|---:|---:|",
        *(
            f"| {name} | {r['images_per_min']:.1f} | {r['p50_s']:.2f} | {r['p95_s']:.2f} |"
            for name, r in t["setups"].items()
        ),  # fmt: skip
        "",
        f"2 replicas give {t['two_vs_one_replica']:.2f}x the images per minute of 1 replica.",
        "",
    ]
    return "\n".join(lines)
