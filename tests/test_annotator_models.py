"""Preprocessors that run a network (HED soft edges): `sd-export annotator` against PyTorch, the torch-free
runtime's map against controlnet-aux's HEDdetector pixel for pixel, and the untrusted-folder checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from sd_onnx.exporter.annotator import controlnet_aux_module
from sd_onnx.exporter.cli import main as export_cli
from sd_onnx.runtime.annotator_models import AnnotatorManifest, load_annotators
from sd_onnx.runtime.annotators import annotate, module_names
from sd_onnx.runtime.files import UntrustedFileError
from sd_onnx.runtime.request import RequestError

from .test_controlnet import drawing


def test_export_records_the_network_and_its_check_against_pytorch(annotators_dir: Path) -> None:
    manifest, graph = AnnotatorManifest.load(annotators_dir / "hed")
    assert manifest.network == "hed" and graph.name == "model.onnx"
    assert manifest.validation["max_abs_diff"] < 1e-4
    assert [s["name"] for s in manifest.inputs] == ["image"] and manifest.outputs[0]["shape"][2:] == [
        "height",
        "width",
    ]


@pytest.mark.parametrize(("module", "safe"), [("softedge_hed", False), ("softedge_hedsafe", True)])
def test_hed_maps_are_controlnet_auxs(annotators_dir: Path, hed_checkpoint: Path, module: str, safe: bool) -> None:
    """controlnet-aux's HEDdetector on the same weights, at a size it keeps (a multiple of 64, detect and image
    resolution alike): the same uint8 map, give or take one level where float rounding meets truncation."""
    hed = controlnet_aux_module("hed")
    network = hed.ControlNetHED_Apache2()
    network.load_state_dict(torch.load(hed_checkpoint, weights_only=True))
    picture = drawing().resize((192, 128))
    want = hed.HEDdetector(network.eval())(np.asarray(picture), 128, 128, safe=safe, output_type="np")
    got = np.asarray(annotate(picture, module, networks=load_annotators(annotators_dir)))
    assert got.shape == want.shape == (128, 192, 3)
    assert np.abs(got.astype(int) - want).max() <= 1 and (got != want).mean() < 0.01
    levels = set(np.unique(want).tolist())
    assert levels <= {0, 127, 255} and len(levels) >= 2 if safe else len(levels) > 50  # detail, not a flat map


def test_modules_need_their_network() -> None:
    assert "softedge_hed" not in module_names() and "canny" in module_names()
    with pytest.raises(RequestError, match="softedge_hed runs the hed network, which is not loaded") as raised:
        annotate(drawing(), "softedge_hed")
    assert raised.value.field == "module"


def test_export_refuses_another_networks_checkpoint(tmp_path: Path) -> None:
    torch.save({"conv.weight": torch.zeros(1, 1, 3, 3)}, tmp_path / "other.pth")
    result = CliRunner().invoke(export_cli, ["annotator", "hed", str(tmp_path / "other.pth"), str(tmp_path / "o")])
    assert result.exit_code == 1 and "Error: the checkpoint is not ControlNetHED_Apache2's" in result.output
    assert not (tmp_path / "o").exists()


def test_a_damaged_or_misnamed_folder_is_refused(annotators_dir: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(annotators_dir, copy)
    shutil.move(copy / "hed", copy / "pidinet")
    with pytest.raises(UntrustedFileError, match="holds the hed network; name the folder so"):
        load_annotators(copy)
    shutil.move(copy / "pidinet", copy / "hed")
    manifest = json.loads((copy / "hed" / "annotator.json").read_text())
    for field, value, message in (("graph", "../../x.onnx", "not a path inside"), ("network", "midas", "network:"),
                                  ("sha256", "0" * 64, "sha256 differs")):  # fmt: skip
        (copy / "hed" / "annotator.json").write_text(json.dumps({**manifest, field: value}))
        with pytest.raises(UntrustedFileError, match=message):
            load_annotators(copy)
    with pytest.raises(UntrustedFileError, match="no such folder of annotators"):
        load_annotators(tmp_path / "missing")
    Image.new("RGB", (4, 4)).save(tmp_path / "x.png")  # a file is no folder either
    with pytest.raises(UntrustedFileError):
        load_annotators(tmp_path / "x.png")


def test_a_narrow_picture_cannot_make_a_huge_map() -> None:
    """`processor_res` sets the short side: a 64x1 picture at 512 would be 32768x512. Refused, naming the field."""
    with pytest.raises(RequestError, match="makes this 64x1 picture 32768x512, more than") as raised:
        annotate(Image.new("RGB", (64, 1)), "invert", 512)
    assert raised.value.field == "resolution"
    assert annotate(Image.new("RGB", (64, 32)), "invert", 512).size == (1024, 512)


def graph_folder(root: Path, graph: onnx.ModelProto) -> Path:
    """An annotators folder whose hed graph is `graph`, its manifest's sha256 made to match (a crafted folder)."""
    from sd_onnx.runtime.manifest import sha256_file

    (root / "hed").mkdir(parents=True)
    onnx.save(graph, str(root / "hed" / "model.onnx"))
    image = {"name": "image", "shape": [1, 3, "h", "w"], "dtype": "float32"}
    AnnotatorManifest("hed", "model.onnx", sha256_file(root / "hed" / "model.onnx"), [image], [image]).save(
        root / "hed"
    )
    return root


def test_a_crafted_graph_is_refused_at_load_or_at_the_call(tmp_path: Path) -> None:
    """A graph whose sha256 matches its manifest is still untrusted: one that does not load, or takes other inputs,
    is refused where the folder loads (a server's start); one that returns no map is the module's error."""
    from onnx import TensorProto, helper

    (tmp_path / "garbage" / "hed").mkdir(parents=True)
    (tmp_path / "garbage" / "hed" / "model.onnx").write_bytes(b"\x08\x07garbage" * 10)
    from sd_onnx.runtime.manifest import sha256_file

    AnnotatorManifest("hed", "model.onnx", sha256_file(tmp_path / "garbage" / "hed" / "model.onnx"), [], []).save(
        tmp_path / "garbage" / "hed"
    )
    with pytest.raises(UntrustedFileError, match="onnxruntime cannot load it"):
        load_annotators(tmp_path / "garbage")

    def graph(input_type: int, output_shape: list, op: str = "Identity") -> onnx.ModelProto:
        inputs = [helper.make_tensor_value_info("image", input_type, [1, 3, "h", "w"])]
        outputs = [helper.make_tensor_value_info("edge", input_type, output_shape)]
        nodes = [helper.make_node(op, ["image"], ["edge"], **({"keepdims": 1} if op == "ReduceMean" else {}))]
        return helper.make_model(
            helper.make_graph(nodes, "g", inputs, outputs), opset_imports=[helper.make_opsetid("", 17)]
        )

    with pytest.raises(UntrustedFileError, match="not an annotator graph"):
        load_annotators(graph_folder(tmp_path / "f16", graph(TensorProto.FLOAT16, [1, 3, "h", "w"])))
    wrong = load_annotators(graph_folder(tmp_path / "identity", graph(TensorProto.FLOAT, [1, 3, "h", "w"])))
    with pytest.raises(RequestError, match=r"softedge_hed: .* returned a \(1, 3, 8, 8\) map") as raised:
        annotate(Image.new("RGB", (8, 8)), "softedge_hed", networks=wrong)
    assert raised.value.field == "module"


def test_export_refuses_unreadable_and_broken_checkpoints(tmp_path: Path, hed_checkpoint: Path) -> None:
    (tmp_path / "text.pth").write_text("hello world\n")
    state = torch.load(hed_checkpoint, weights_only=True)
    state["norm"] = torch.full_like(state["norm"], float("nan"))
    torch.save(state, tmp_path / "nan.pth")
    for name, message in (("text.pth", "not a readable PyTorch checkpoint"), ("nan.pth", "NaN or infinite")):
        result = CliRunner().invoke(export_cli, ["annotator", "hed", str(tmp_path / name), str(tmp_path / "o")])
        assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output, result.output
    result = CliRunner().invoke(export_cli, ["annotator", "depth", str(hed_checkpoint), str(tmp_path / "o")])
    assert result.exit_code == 2 and "Invalid value for 'NETWORK'" in result.output


def test_an_export_is_readable_by_others_as_the_umask_allows(annotators_dir: Path) -> None:
    import os

    umask = os.umask(0)
    os.umask(umask)
    assert (annotators_dir / "hed").stat().st_mode & 0o777 == 0o777 & ~umask
