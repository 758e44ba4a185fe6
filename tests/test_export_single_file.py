"""A single-file (.safetensors, LDM layout) checkpoint converts to the same graphs as its diffusers folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from sd_onnx.exporter.convert import convert
from sd_onnx.exporter.errors import ExportError
from sd_onnx.models.ldm_checkpoint import write_single_file
from sd_onnx.runtime.manifest import Manifest


@pytest.fixture(scope="module")
def checkpoint(tiny_pipeline: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_single_file(tiny_pipeline, tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


def test_single_file_round_trip(checkpoint: Path, tiny_pipeline: Path, tiny_export: Path, tmp_path: Path) -> None:
    out = tmp_path / "from-ckpt"
    manifest = convert(str(checkpoint), out, config=str(tiny_pipeline), log=lambda line: None)
    assert manifest.source == str(checkpoint)
    assert not (out / "_single_file_pipeline").exists()
    Manifest.load(out).verify(out)
    rng = np.random.default_rng(0)
    feeds = {
        "sample": rng.standard_normal((2, 4, 16, 16), dtype=np.float32),
        "timestep": np.array([500.0], dtype=np.float32),
        "encoder_hidden_states": rng.standard_normal((2, 77, 32), dtype=np.float32),
    }
    outputs = [
        ort.InferenceSession(str(folder / "unet" / "model.onnx")).run(None, feeds)[0] for folder in (out, tiny_export)
    ]
    np.testing.assert_allclose(outputs[0], outputs[1], atol=1e-6)
    assert (out / "tokenizer" / "tokenizer.json").is_file()


def test_single_file_without_config_offline_is_a_clear_error(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ExportError, match="cannot load single-file checkpoint"):
        convert(str(checkpoint), tmp_path / "out", log=lambda line: None)
    assert not (tmp_path / "out").exists()


def test_other_file_types_are_refused(tmp_path: Path) -> None:
    weird = tmp_path / "model.bin"
    weird.write_bytes(b"x")
    with pytest.raises(ExportError, match="not a diffusers folder nor a .safetensors/.ckpt checkpoint"):
        convert(str(weird), tmp_path / "out", log=lambda line: None)


@pytest.mark.parametrize("recipe", ["TINY_SDXL", "TINY_SDXL_REFINER"])
def test_sdxl_single_file_round_trip(recipe: str, tmp_path: Path) -> None:
    """An SDXL base or refiner in the original layout (OpenCLIP second encoder, label_emb) converts to the same
    graphs as its diffusers folder; its class comes from the checkpoint's keys or from --config."""
    from sd_onnx.exporter.source import single_file_pipeline_class
    from sd_onnx.models import build

    recipe_sizes = getattr(build, recipe)
    if recipe == "TINY_SDXL":  # diffusers tells SDXL's two encoders apart by width, as SDXL's 768 and 1280 differ
        second = {**recipe_sizes["text_encoder_2"], "hidden_size": 48, "projection_dim": 48}
        unet = {**recipe_sizes["unet"], "cross_attention_dim": 80, "projection_class_embeddings_input_dim": 6 * 8 + 48}
        recipe_sizes = {**recipe_sizes, "text_encoder_2": second, "unet": unet}
    folder = build.build_pipeline(recipe_sizes, tmp_path / "pipeline", seed=0)
    checkpoint = write_single_file(folder, tmp_path / "sdxl.safetensors")
    expected = "StableDiffusionXLPipeline" if recipe == "TINY_SDXL" else "StableDiffusionXLImg2ImgPipeline"
    assert single_file_pipeline_class(checkpoint, None) == expected
    components = (
        ("text_encoder_2", "unet") if recipe == "TINY_SDXL_REFINER" else ("text_encoder", "text_encoder_2", "unet")
    )
    from_folder = convert(str(folder), tmp_path / "a", components=components, log=lambda line: None)
    from_file = convert(
        str(checkpoint), tmp_path / "b", config=str(folder), components=components, log=lambda line: None
    )
    assert from_file.pipeline_class == from_folder.pipeline_class == expected and from_file.model_family == "sdxl"
    assert from_file.config == from_folder.config
    for name in components:
        session = ort.InferenceSession(str(tmp_path / "a" / name / "model.onnx"))
        feeds = random_feeds(session, np.random.default_rng(0))
        for got, want in zip(
            ort.InferenceSession(str(tmp_path / "b" / name / "model.onnx")).run(None, feeds),
            session.run(None, feeds),
            strict=True,
        ):
            np.testing.assert_allclose(got, want, atol=1e-5, err_msg=name)


def random_feeds(session: ort.InferenceSession, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Seeded inputs for a graph: token ids for integer inputs, normal floats elsewhere; named dims fixed."""
    dims = {"batch": 1, "sequence": 77, "height": 8, "width": 8}
    feeds = {}
    for arg in session.get_inputs():
        shape = [dims.get(d, 1) if isinstance(d, str) else d for d in arg.shape]
        if "int" in arg.type:
            feeds[arg.name] = rng.integers(0, 1000, shape).astype(np.int64 if "int64" in arg.type else np.int32)
        else:
            feeds[arg.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def test_sd2_single_file_round_trip(tmp_path: Path) -> None:
    """SD 2.x in the original layout (OpenCLIP text encoder with the block diffusers drops, linear transformer
    projections) converts to the same text encoder and UNet graphs as its diffusers folder."""
    from safetensors import safe_open

    from sd_onnx.models import build

    text = {**build.TINY["text_encoder"], "hidden_act": "gelu"}  # OpenCLIP's activation tells SD 2 apart
    unet = {**build.TINY["unet"], "use_linear_projection": True}
    recipe = {**build.TINY, "text_encoder": text, "tokenizer": {"pad_token": "!"}, "unet": unet}
    folder = build.build_pipeline(recipe, tmp_path / "sd2", seed=0)
    checkpoint = write_single_file(folder, tmp_path / "sd2.safetensors")
    with safe_open(str(checkpoint), "pt") as f:
        keys = set(f.keys())
    layers = text["num_hidden_layers"]
    assert f"cond_stage_model.model.transformer.resblocks.{layers}.attn.in_proj_weight" in keys  # the extra block
    assert not any(k.startswith("cond_stage_model.transformer.") for k in keys)
    components = ("text_encoder", "unet")
    convert(str(folder), tmp_path / "a", components=components, log=lambda line: None)
    convert(str(checkpoint), tmp_path / "b", config=str(folder), components=components, log=lambda line: None)
    rng = np.random.default_rng(0)
    unet_feeds = {
        "sample": rng.standard_normal((2, 4, 16, 16), dtype=np.float32),
        "timestep": np.array([500.0], dtype=np.float32),
        "encoder_hidden_states": rng.standard_normal((2, 77, text["hidden_size"]), dtype=np.float32),
    }
    ids = np.array([[49406, 320, 1125, 49407] + [0] * 73], dtype=np.int32)
    for name, feeds in (("text_encoder", {"input_ids": ids}), ("unet", unet_feeds)):
        sessions = [ort.InferenceSession(str(tmp_path / side / name / "model.onnx")) for side in ("a", "b")]
        outputs = [session.run(None, feeds)[0] for session in sessions]
        np.testing.assert_allclose(outputs[0], outputs[1], atol=1e-5, err_msg=name)
