"""The shapes training recipe runs end to end on tiny step counts, checkpoints, and resumes where it stopped."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from sd_onnx.models.shapes import data, train


@pytest.fixture
def short_recipe(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "VAE_STEPS": 2,
        "VAE_BATCH": 4,
        "TEXT_STEPS": 2,
        "TEXT_BATCH": 4,
        "DATASET_SIZE": 250,
        "UNET_CYCLES": ((2, 1e-3, 1), (1, 3e-4, 0)),
        "UNET_BATCH": 4,
        "DECODER_STEPS": 2,
        "DECODER_BATCH": 4,
        "CHECKPOINT_EVERY": 1,
    }.items():
        monkeypatch.setattr(train, name, value)


def test_training_writes_a_pipeline_with_measured_scaling_factor(short_recipe: None, tmp_path: Path) -> None:
    """One short run: the pipeline's VAE scaling factor is the dataset's, and the text encoder's unused token
    embeddings stay zero."""
    trainer = train.Trainer(tmp_path)
    out = trainer.run()
    vae_config = json.loads((out / "vae" / "config.json").read_text())
    dataset = torch.load(tmp_path / "dataset.pt")
    assert vae_config["scaling_factor"] == pytest.approx(1 / dataset["latents"].std().item())
    assert dataset["latents"].shape == (250, 4, 16, 16)
    assert json.loads((out / "model_index.json").read_text())["unet"] == ["diffusers", "UNet2DConditionModel"]
    weights = trainer.text_encoder.get_input_embeddings().weight
    used = (weights.abs().sum(dim=1) > 0).sum().item()
    assert 20 < used < 40  # the grammar's words plus the special tokens, out of 49,408 rows


def test_interrupted_run_resumes_from_its_checkpoint(short_recipe: None, tmp_path: Path) -> None:
    def interrupt(*args: object) -> None:
        raise KeyboardInterrupt

    trainer = train.Trainer(tmp_path)
    trainer._train_unet = interrupt  # Ctrl-C as the second stage starts
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    resumed = train.Trainer(tmp_path)
    assert resumed.state["vae_step"] == 2 and resumed.state["text_step"] == 2 and resumed.state["unet_step"] == 0
    vae_before = {k: v.clone() for k, v in resumed.vae.state_dict().items()}
    text_before = {k: v.clone() for k, v in resumed.text_encoder.state_dict().items()}
    resumed.run()
    assert resumed.state["unet_step"] == 3 and resumed.state["decoder_step"] == 2
    vae = resumed.vae.state_dict()
    decoder = [k for k in vae if k.startswith(("decoder.", "post_quant_conv."))]
    # The decoder stage fine-tunes the decoder only: the encoder, and the latents the UNet learned, stay.
    assert all(torch.equal(vae_before[k], v) for k, v in vae.items() if k not in decoder)
    assert not all(torch.equal(vae_before[k], vae[k]) for k in decoder)
    # The UNet stage trains on a frozen text encoder.
    assert all(torch.equal(text_before[k], v) for k, v in resumed.text_encoder.state_dict().items())


def test_text_pretraining_makes_every_attribute_readable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(train, "TEXT_STEPS", 300)
    trainer = train.Trainer(tmp_path)
    heads = trainer._pretrain_text()
    rng = random.Random(123)
    scenes = [data.random_scene(rng, data.split_combinations()[1]) for _ in range(200)]  # held-out combinations
    ids = trainer._tokens([s.caption for s in scenes])
    with torch.no_grad():
        logits = heads.logits(trainer.text_encoder(ids)[0][:, -1])  # the last padding token
    for name in train.AttributeHeads.ATTRIBUTES:
        labels = train.AttributeHeads.labels(name, scenes)
        accuracy = (logits[name].argmax(-1) == labels).float().mean().item()
        assert accuracy > 0.9, f"{name}: {accuracy:.2f}"
