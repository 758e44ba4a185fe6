"""Shared fixtures: the tiny seeded pipeline (diffusers format) and its ONNX export, built once per session."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Optimized graphs go to the user cache directory by default; tests (and the servers they start) use their own,
# removed when the run ends.
if "SD_ONNX_CACHE" not in os.environ:
    os.environ["SD_ONNX_CACHE"] = tempfile.mkdtemp(prefix="sd-onnx-test-cache-")
    atexit.register(shutil.rmtree, os.environ["SD_ONNX_CACHE"], True)


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sd_onnx.models.build import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "tiny-sd", seed=0)


@pytest.fixture(scope="session")
def tiny_export(tiny_pipeline: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sd_onnx.exporter.convert import convert

    out = tmp_path_factory.mktemp("export") / "tiny-onnx"
    convert(str(tiny_pipeline), out, log=lambda line: None)
    return out
