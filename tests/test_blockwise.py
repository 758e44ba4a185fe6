"""Block-by-block transformer export (exporter/blockwise.py): the stitched graph is the transformer's computation
(validated against PyTorch whole and block by block, at shapes other than the trace's, and equal to the whole
trace's graph on held-out inputs, so a pipeline runs it as it runs that one), one graph with one data file, no
block left opaque; misuse is a clear error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from sd_onnx.exporter.blockwise import BLOCK_DOMAIN, block_lists
from sd_onnx.exporter.convert import convert
from sd_onnx.exporter.errors import ExportError
from sd_onnx.exporter.quantize_weights_folder import held_out_feeds
from sd_onnx.runtime.manifest import Manifest

from .test_export_errors import assert_one_line_error, run_cli

FAMILIES = ("flux2_klein", "sd3")  # double/single-stream and joint blocks; Z-Image below


def transformer_blocks(pipeline: Path) -> int:
    """How many blocks diffusers' transformer of `pipeline` has in its block lists."""
    import diffusers

    model = diffusers.DiffusionPipeline.from_pretrained(pipeline).transformer
    return sum(len(blocks) for _, blocks in block_lists(model))


def outputs(model_file: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_blockwise_graph_computes_what_the_whole_trace_does(
    family: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    pipeline = request.getfixturevalue(f"tiny_{family}_pipeline")
    whole = request.getfixturevalue(f"tiny_{family}_export")
    out = tmp_path / "onnx"
    manifest = convert(str(pipeline), out, components=("transformer",), blockwise=True, log=lambda line: None)
    info = manifest.components["transformer"]
    assert info.validation["max_abs_diff"] <= 1e-4  # vs PyTorch, at batch 2 and other sizes than the trace's
    blocks = info.validation["blocks"]  # each block vs its PyTorch block
    assert blocks["count"] == transformer_blocks(pipeline) and blocks["max_abs_diff"] <= 1e-4
    assert sorted(info.files) == ["transformer/lora_targets.json", "transformer/model.onnx"]  # small: weights inline
    graph = onnx.load(str(out / info.file), load_external_data=False).graph
    assert not [n for n in graph.node if n.domain == BLOCK_DOMAIN]
    assert info.inputs == Manifest.load(whole).components["transformer"].inputs
    for feeds in held_out_feeds(info.inputs, info.validation["input_shapes"], manifest.config, vocab_size=10):
        ours, theirs = outputs(out / info.file, feeds), outputs(whole / info.file, feeds)
        np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_a_bf16_blockwise_export_keeps_its_weights_narrow(tiny_z_image_pipeline: Path, tmp_path: Path) -> None:
    """The full-size path (--trace-dtype bf16, blockwise by default): bf16 weights behind Casts, validated against
    the bf16-loaded module computing in fp32, block by block too."""
    manifest = convert(str(tiny_z_image_pipeline), tmp_path / "onnx", components=("transformer",),
                       trace_dtype="bf16", log=lambda line: None)  # fmt: skip
    info = manifest.components["transformer"]
    assert info.optimizations["narrow_weights"] == "bfloat16" and info.validation["max_abs_diff"] <= 1e-4
    assert info.validation["blocks"]["count"] == transformer_blocks(tiny_z_image_pipeline)
    assert sorted(info.files) == ["transformer/model.onnx", "transformer/model.onnx_data"]  # one data file
    graph = onnx.load(str(tmp_path / "onnx" / info.file), load_external_data=False).graph
    assert {t.data_type for t in graph.initializer if len(t.dims) > 1} == {onnx.TensorProto.BFLOAT16}


def test_block_lists_are_the_outermost_lists_of_alike_blocks() -> None:
    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.to_out = torch.nn.ModuleList([torch.nn.Linear(2, 2), torch.nn.Dropout()])  # not a block list

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = torch.nn.ModuleList([Block(), Block()])
            self.mixed = torch.nn.ModuleList([torch.nn.Linear(2, 2), torch.nn.Conv2d(2, 2, 1)])
            self.head = torch.nn.Linear(2, 2)

    assert [name for name, _ in block_lists(Model())] == ["blocks"]
    assert block_lists(torch.nn.Linear(2, 2)) == []


def test_a_block_that_differs_from_pytorch_is_named(tiny_flux2_klein_pipeline: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"^block model\.transformer_blocks\.0: ONNX output differs from PyTorch"):
        convert(str(tiny_flux2_klein_pipeline), tmp_path / "onnx", components=("transformer",), blockwise=True,
                atol=0.0, log=lambda line: None)  # fmt: skip
    assert not (tmp_path / "onnx").exists()


def test_blockwise_on_a_unet_model_is_a_one_line_error(tiny_pipeline: Path, tmp_path: Path) -> None:
    code, output = run_cli(str(tiny_pipeline), str(tmp_path / "onnx"), "--blockwise")
    assert_one_line_error(code, output, "--blockwise: for transformer models")
    assert not (tmp_path / "onnx").exists()
