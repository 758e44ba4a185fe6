"""Manifests of the wrong shape: one-line errors naming the field, from the loader, `info`, `prompt` and `serve`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from sd_onnx.runtime.cli import main
from sd_onnx.runtime.manifest import MANIFEST_NAME, Manifest, ManifestError


def edited(data: dict, path: str, value: Any) -> dict:
    """A copy of `data` with the dotted `path` set to `value` (or removed when value is ...)."""
    data = json.loads(json.dumps(data))
    *parents, last = path.split(".")
    node = data
    for key in parents:
        node = node[key]
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return data


BROKEN = [
    (lambda m: [], "manifest: expected an object, got a list"),
    (lambda m: edited(m, "components", []), "components: expected an object, got a list"),
    (lambda m: edited(m, "config", None), "config: expected an object, got null"),
    (lambda m: edited(m, "source", 5), "source: expected a string, got an integer"),
    (lambda m: edited(m, "config.sample_size", "16"), "config.sample_size: expected an integer, got a string"),
    (lambda m: edited(m, "config.size_multiple", 0), "config.size_multiple: must be in 1..65536, got 0"),
    (lambda m: edited(m, "components.unet.file", "unet/x.onnx"), "components.unet.file: 'unet/x.onnx' is not listed"),
    (lambda m: edited(m, "components.unet.files", {"../../etc/passwd": "x", "unet/model.onnx": "y"}),
     "components.unet.files: '../../etc/passwd' is not a path inside the model folder"),
    (lambda m: edited(m, "components.unet.inputs", [{"name": "x"}]), "components.unet.inputs[0].shape: missing"),
    (lambda m: edited(m, "components.unet", ...), "components: no unet"),
    (lambda m: edited(m, "format_version", 99), "unsupported manifest format_version 99"),
    (lambda m: edited(m, "vocabulary", "red"), "vocabulary: expected a list, got a string"),
    (lambda m: edited(m, "config.size_multiple", None), "config.size_multiple: expected an integer, got null"),
    (lambda m: edited(m, "components.unet.validation", None), "components.unet.validation: expected an object"),
    (lambda m: edited(m, "config.max_token_length", 10**30), "config.max_token_length: must be in 1..65536"),
    (lambda m: edited(m, "config.scaling_factor", 0), "config.scaling_factor: must be in (0, 100], got 0"),
    (lambda m: edited(m, "config.guidance_scale", 1e308), "config.guidance_scale: must be in 0..100"),
    (lambda m: edited(m, "config.prediction_type", "x"), "config.prediction_type: must be one of epsilon"),
    (lambda m: edited(m, "config.shift_factor", 1e308), "config.shift_factor: must be in -10..10"),
    (lambda m: edited(m, "name", "x\nSteps: 999"), "name: must be one printable line"),
    (lambda m: edited(m, "config.deepcache_branch", 0), "components.unet_shallow: present exactly when"),
    (lambda m: edited(m, "config.deepcache_branch", -1), "config.deepcache_branch: must be in 0..65536"),
    (lambda m: edited(m, "config.token_merging", True), "components.unet_tome: present exactly when"),
    (lambda m: edited(m, "config.token_merging", "yes"), "config.token_merging: expected a boolean"),
    (lambda m: edited(m, "config.unet_stages", 4), "components.unet_stage_*: all present exactly when"),
    (lambda m: edited(m, "config.unet_stages", 3), "config.unet_stages: must be 0 or 4, got 3"),
    (lambda m: edited(m, "components.unet_x", m["components"]["unet"]), "components.unet_x: unknown component"),
]  # fmt: skip


@pytest.fixture()
def folder(tiny_export: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(tiny_export, copy)
    return copy


@pytest.mark.parametrize(("breaker", "message"), BROKEN)
def test_loader_info_and_prompt_name_the_field(folder: Path, breaker: Any, message: str) -> None:
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    (folder / MANIFEST_NAME).write_text(json.dumps(breaker(manifest)))
    with pytest.raises(ManifestError, match="^" + str(folder / MANIFEST_NAME).replace(".", r"\.") + ": "):
        Manifest.load(folder)
    for args in (["info", str(folder)], ["prompt", "x", "-m", str(folder), "-o", str(folder / "o.png")]):
        result = CliRunner().invoke(main, args)
        lines = [line for line in result.output.splitlines() if line.startswith("Error")]
        assert result.exit_code == 1 and len(lines) == 1 and message in lines[0], result.output
        assert result.exception is None or isinstance(result.exception, SystemExit)


def test_older_manifest_without_size_multiple_reads_it_from_the_unet_config(folder: Path) -> None:
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    (folder / MANIFEST_NAME).write_text(json.dumps(edited(manifest, "config.size_multiple", ...)))
    assert Manifest.load(folder).config.size_multiple == 4
    (folder / "unet" / "config.json").unlink()
    with pytest.raises(ManifestError, match="config.size_multiple: missing"):
        Manifest.load(folder)


def test_serve_exits_with_one_line_instead_of_loading_forever(folder: Path) -> None:
    (folder / MANIFEST_NAME).write_text(json.dumps({"format_version": 1, "components": []}))
    cmd = [sys.executable, "-m", "sd_onnx.runtime.cli", "serve", "-m", str(folder), "--port", "0"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "Error:" in result.stderr and "source: missing" in result.stderr


def test_info_survives_odd_validation_figures(folder: Path) -> None:
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    manifest = edited(manifest, "components.unet.validation", {"max_abs_diff": "small"})
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    result = CliRunner().invoke(main, ["info", str(folder), "--no-verify"])
    assert result.exit_code == 0 and "unet: unet/model.onnx fp32 opset 17, not validated" in result.output
