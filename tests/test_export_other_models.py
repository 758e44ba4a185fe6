"""Models this project did not build: another vocabulary, token length and width; sizes the UNet cannot run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sd_onnx.runtime import StableDiffusionPipeline

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def char_tokenizer(folder: Path):
    """A CLIP-style tokenizer whose vocabulary is single characters (58 ids, specials at 0 and 1)."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True)
    tokens = ["<|startoftext|>", "<|endoftext|>", *LETTERS, *(c + "</w>" for c in LETTERS), "!", "!</w>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer.from_pretrained(folder, pad_token="<|endoftext|>", model_max_length=16)


@pytest.fixture(scope="module")
def char_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sd_onnx.models.build import TINY, create_modules, save_pipeline

    tokenizer = char_tokenizer(tmp_path_factory.mktemp("vocab") / "tok")
    recipe = {
        **TINY,
        "text_encoder": {
            **TINY["text_encoder"], "hidden_size": 24, "vocab_size": len(tokenizer), "max_position_embeddings": 16,
            "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1,
        },
        "unet": {**TINY["unet"], "cross_attention_dim": 24},
    }  # fmt: skip
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("charsd") / "pipeline"
    return save_pipeline(*create_modules(recipe), out, tokenizer=tokenizer)


def test_small_vocabulary_exports_validates_and_runs(char_pipeline: Path, tmp_path: Path) -> None:
    """Sample inputs come from the model's own tokenizer and vocabulary (CLIP's ids would be out of range)."""
    from diffusers import StableDiffusionPipeline as DiffusersPipeline

    from sd_onnx.exporter.convert import convert

    manifest = convert(str(char_pipeline), tmp_path / "onnx", log=lambda line: None)
    assert manifest.config.max_token_length == 16 and manifest.config.embedding_dim == 24
    assert manifest.components["text_encoder"].validation["max_abs_diff"] <= 1e-3
    ours = StableDiffusionPipeline.from_pretrained(tmp_path / "onnx", provider="cpu")
    assert ours.tokenizer(["abc"]).tolist() == [[0, 2, 3, 30, 1] + [1] * 11]
    reference = DiffusersPipeline.from_pretrained(char_pipeline, safety_checker=None, requires_safety_checker=False)
    reference.set_progress_bar_config(disable=True)
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    settings = {"num_inference_steps": 3, "guidance_scale": 5.0}
    expected = reference("red ball", latents=latents.clone(), output_type="np", **settings).images
    got = ours("red ball", latents=latents.numpy(), output_type="np", **settings).images
    assert np.abs(got - expected).mean() < 1 / 255


def test_size_multiple_comes_from_the_configs_and_is_enforced(tiny_export: Path) -> None:
    """VAE factor x 2 per UNet down-sampling level: 2 x 2 for the tiny model, 4 x 4 for the shipped one."""
    from sd_onnx.models.shapes import shipped_model
    from sd_onnx.runtime.manifest import Manifest

    assert Manifest.load(tiny_export).config.size_multiple == 4
    shapes = StableDiffusionPipeline.from_pretrained(shipped_model(), provider="cpu")
    assert shapes.config.size_multiple == 16
    with pytest.raises(ValueError, match="width: must be a positive multiple of 16 for this model"):
        shapes("a red circle on a blue background", width=72, num_inference_steps=1)
    image = shapes("a red circle on a blue background", width=80, height=48, num_inference_steps=1).images[0]
    assert image.size == (80, 48)
