"""Peers' virtual environments: engines whose pins conflict with ours (Optimum pins transformers 4.57 and an
older huggingface_hub) live in environments of their own, made with pip from package names only, so a user
reproduces a report, or the compatibility test, with `sd-bench peers setup` and nothing else.

They go to $SD_ONNX_PEERS, else the user cache directory (beside, not inside, the runtime's graph cache).
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from collections.abc import Callable
from pathlib import Path

from sd_onnx.runtime.session import user_cache_dir

PEERS_ENV = "SD_ONNX_PEERS"
# What each environment installs, with the pins that make it resolve (checked 2026-12-02: optimum-onnx 0.1
# brings transformers 4.57, which needs huggingface_hub < 1.0 and so diffusers <= 0.35).
PEERS: dict[str, tuple[str, ...]] = {
    "optimum": ("torch==2.13.0", "optimum-onnx", "onnxruntime", "diffusers==0.35.2", "huggingface-hub<1.0"),
}
# A module each environment must import once set up; its absence means the setup did not finish.
CHECKS = {"optimum": "optimum.onnxruntime"}


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
    check = subprocess.run([str(python), "-c", f"import {CHECKS[name]}"], capture_output=True, check=False)
    return check.returncode == 0


def setup_peer(name: str, log: Callable[[str], None] = print) -> Path:
    """Create (or finish) peer `name`'s environment and return its Python; PeerSetupError with pip's last line."""
    if name not in PEERS:
        raise PeerSetupError(f"unknown peer {name!r} (known: {', '.join(PEERS)})")
    if is_ready(name):
        return peer_python(name)
    folder = peers_root() / name
    log(f"{name}: creating {folder} and installing {' '.join(PEERS[name])}")
    venv.create(folder, with_pip=True, clear=True)
    result = subprocess.run(
        [str(peer_python(name)), "-m", "pip", "install", "-q", *PEERS[name]], capture_output=True, text=True
    )
    if result.returncode != 0 or not is_ready(name):
        lines = [line for line in result.stderr.splitlines() if line.strip() and "WARNING" not in line]
        raise PeerSetupError(f"{name}: pip install failed: {lines[-1] if lines else 'no message'}")
    return peer_python(name)


__all__ = ["PEERS", "PeerSetupError", "is_ready", "peer_python", "peers_root", "setup_peer"]
