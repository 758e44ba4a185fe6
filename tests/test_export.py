"""`sd-export convert` on the tiny pipeline: layout, manifest, and parity of each graph against PyTorch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from sd_onnx.exporter.components import SPECS
from sd_onnx.exporter.source import inspect_folder
from sd_onnx.runtime.manifest import Manifest, ManifestError, sha256_file

COMPONENTS = ("text_encoder", "unet", "vae_decoder", "vae_encoder")  # an SD 1.x pipeline's

PROMPT = "a photo of an astronaut riding a horse"


def test_layout_is_readable_by_onnx_pipelines(tiny_export: Path) -> None:
    for name in COMPONENTS:
        assert (tiny_export / name / "model.onnx").is_file()
    assert (tiny_export / "scheduler" / "scheduler_config.json").is_file()
    index = json.loads((tiny_export / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"  # as Optimum writes it (its auto class reads it)
    assert index["unet"] == ["diffusers", "OnnxRuntimeModel"]
    assert index["scheduler"] == ["diffusers", "PNDMScheduler"]
    assert not list(tiny_export.parent.glob(".*partial*")), "staging folder left behind"


def test_tokenizer_json_matches_clip_tokenizer(tiny_export: Path, tiny_pipeline: Path) -> None:
    from tokenizers import Tokenizer
    from transformers import CLIPTokenizer

    ours = Tokenizer.from_file(str(tiny_export / "tokenizer" / "tokenizer.json"))
    reference = CLIPTokenizer.from_pretrained(tiny_pipeline / "tokenizer")
    assert ours.encode(PROMPT).ids == reference(PROMPT).input_ids
    assert ours.encode(PROMPT).ids == [49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 49407]


def test_manifest_records_sizes_signatures_hashes_and_validation(tiny_export: Path) -> None:
    manifest = Manifest.load(tiny_export)
    assert manifest.name == "tiny-sd" and manifest.config.size_multiple == 4 and manifest.vocabulary is None
    manifest.verify(tiny_export)
    cfg = manifest.config
    assert (cfg.embedding_dim, cfg.latent_channels, cfg.vae_scale_factor, cfg.sample_size) == (32, 4, 2, 16)
    assert cfg.scaling_factor == pytest.approx(0.18215) and cfg.default_resolution == 32
    assert manifest.model_family == "sd-custom" and manifest.pipeline_class == "StableDiffusionPipeline"
    unet = manifest.components["unet"]
    assert [t.name for t in unet.inputs] == ["sample", "timestep", "encoder_hidden_states"]
    assert unet.inputs[0].shape == ["batch", 4, "height", "width"] and unet.inputs[0].dtype == "float32"
    assert unet.outputs[0].name == "out_sample"
    assert manifest.components["text_encoder"].inputs[0].dtype == "int32"
    assert manifest.components["vae_encoder"].outputs[0].shape[1] == 8  # mean and log-variance
    for name, info in manifest.components.items():
        assert info.opset >= 17 and info.precision == "fp32"
        assert 0 <= info.validation["max_abs_diff"] <= info.validation["atol"], name
        assert info.files == {rel: sha256_file(tiny_export / rel) for rel in info.files}
    assert {"torch", "onnx", "onnxruntime", "diffusers"} <= set(manifest.tools)


@pytest.mark.parametrize("name", COMPONENTS)
def test_graph_matches_pytorch_at_another_shape(tiny_export: Path, tiny_pipeline: Path, name: str) -> None:
    """Parity at batch 3 and a non-square size proves the dynamic axes, not only the traced shape."""
    spec = SPECS[name]
    module = spec.load(tiny_pipeline).eval()
    gen = torch.Generator().manual_seed(7)
    inputs = list(spec.sample_inputs(inspect_folder(tiny_pipeline), 3, gen))
    if inputs[0].ndim == 4:  # image-like first input: make it 24 x 40 (latent) or its pixel equivalent
        factor = 2 if name == "vae_encoder" else 1
        inputs[0] = torch.randn(3, inputs[0].shape[1], 24 * factor, 40 * factor, generator=gen)
    with torch.no_grad():
        expected = module(*inputs)
    expected = expected if isinstance(expected, tuple) else (expected,)
    session = ort.InferenceSession(str(tiny_export / name / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {n: t.numpy() for n, t in zip(spec.input_names, inputs, strict=True)})
    for g, e in zip(got, expected, strict=True):
        assert g.shape == tuple(e.shape)
        np.testing.assert_allclose(g, e.numpy(), atol=1e-4, rtol=1e-4)


def test_verify_detects_modified_file(tiny_export: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_export, copy)
    with open(copy / "vae_decoder" / "model.onnx", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    with pytest.raises(ManifestError, match="sha256 mismatch"):
        Manifest.load(copy).verify(copy)
    (copy / "unet" / "model.onnx").unlink()
    with pytest.raises(ManifestError, match="missing model file"):
        Manifest.load(copy).verify(copy, ("unet",))
