"""Peers' virtual environments: engines whose pins conflict with ours (Optimum pins transformers 4.57 and an
older huggingface_hub) live in environments of their own, made with pip from package names only, so a user
reproduces a report, or the compatibility test, with `sd-bench peers setup` and nothing else.

They go to $SD_ONNX_PEERS, else the user cache directory (beside, not inside, the runtime's graph cache).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import venv
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sd_onnx.runtime.session import user_cache_dir

PEERS_ENV = "SD_ONNX_PEERS"


@dataclass(frozen=True)
class Peer:
    """How to make one peer's environment: what pip installs (package names and the pins that make them
    resolve), what it then removes, and a module the finished environment imports."""

    packages: tuple[str, ...]
    check: str
    remove: tuple[str, ...] = ()


# Checked 2026-12-02. optimum-onnx 0.1 brings transformers 4.57, which needs huggingface_hub < 1.0 and so
# diffusers <= 0.35. optimum-intel pulls a torchvision that fails to import beside the CPU torch 2.13
# ("operator torchvision::nms does not exist") and is not needed for diffusion: it is removed.
# stable-diffusion-cpp-python is a source distribution: pip builds stable-diffusion.cpp with cmake (minutes).
PEERS: dict[str, Peer] = {
    "optimum": Peer(
        ("torch==2.13.0", "optimum-onnx", "onnxruntime", "diffusers==0.35.2", "huggingface-hub<1.0"),
        "optimum.onnxruntime",
    ),
    "openvino": Peer(
        ("torch==2.13.0", "optimum-intel[openvino]", "diffusers"), "optimum.intel.openvino", ("torchvision",)
    ),
    "sdcpp": Peer(("stable-diffusion-cpp-python", "numpy", "pillow"), "stable_diffusion_cpp"),
}
SETUP_RECORD = "sd-onnx-setup.json"


class PeerSetupError(RuntimeError):
    """A peer's environment could not be made (no network, a package that does not resolve or build)."""


def peers_root() -> Path:
    return Path(os.environ.get(PEERS_ENV) or user_cache_dir() / "peers").expanduser()


def peer_python(name: str) -> Path:
    """The Python of peer `name`'s environment (which may not exist yet)."""
    folder = peers_root() / name
    return folder / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")


def is_ready(name: str) -> bool:
    python = peer_python(name)
    if not python.is_file():
        return False
    check = subprocess.run([str(python), "-c", f"import {PEERS[name].check}"], capture_output=True, check=False)
    return check.returncode == 0


def setup_peer(name: str, log: Callable[[str], None] = print) -> Path:
    """Create (or finish) peer `name`'s environment and return its Python; PeerSetupError with pip's last line."""
    if name not in PEERS:
        raise PeerSetupError(f"unknown peer {name!r} (known: {', '.join(PEERS)})")
    if is_ready(name):
        return peer_python(name)
    peer, folder = PEERS[name], peers_root() / name
    log(f"{name}: creating {folder} and installing {' '.join(peer.packages)}")
    started = time.perf_counter()
    venv.create(folder, with_pip=True, clear=True)
    _pip(name, "install", *peer.packages)
    if peer.remove:
        _pip(name, "uninstall", "-y", *peer.remove)
    if not is_ready(name):
        raise PeerSetupError(f"{name}: installed, but `import {peer.check}` fails")
    record = {"seconds": round(time.perf_counter() - started, 1), "packages": list(peer.packages)}
    (folder / SETUP_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return peer_python(name)


def setup_record(name: str) -> dict:
    """How long peer `name`'s setup took (pip's downloads and builds), if this machine made it."""
    path = peers_root() / name / SETUP_RECORD
    return json.loads(path.read_text()) if path.is_file() else {}


def _pip(name: str, *args: str) -> None:
    result = subprocess.run([str(peer_python(name)), "-m", "pip", *args, "-q"], capture_output=True, text=True)
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip() and "WARNING" not in line]
        raise PeerSetupError(f"{name}: pip {args[0]} failed: {lines[-1] if lines else 'no message'}")


__all__ = ["PEERS", "Peer", "PeerSetupError", "is_ready", "peer_python", "peers_root", "setup_peer", "setup_record"]
