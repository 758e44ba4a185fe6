"""The repository stands on its own: nothing in it points at the machine or folders it was built on."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OUTSIDE = re.compile(r"\.\./shared|/work/|/root/|/home/\w+/")


def tracked_text_files() -> list[Path]:
    try:
        names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    suffixes = {".py", ".md", ".json", ".toml", ".txt", ".cfg", ".yml", ".yaml", ""}
    files = [ROOT / name for name in names.splitlines() if Path(name).suffix in suffixes]
    return [f for f in files if f.is_file() and f.stat().st_size < 2_000_000 and "tokenizer" not in f.parts]


def test_no_file_refers_to_paths_outside_the_repository() -> None:
    offenders = []
    for path in tracked_text_files():
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if OUTSIDE.search(line) and path != Path(__file__).resolve():
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:100]}")
    assert not offenders, "\n".join(offenders)


def test_runtime_does_not_import_the_models_package() -> None:
    """models/ uses the runtime (to evaluate its model); the runtime finds the shipped files without its code."""
    for path in (ROOT / "runtime").rglob("*.py"):
        assert not re.search(r"^\s*(from|import) (sd_onnx\.models|\.\.+models)\b", path.read_text(), re.M), path
