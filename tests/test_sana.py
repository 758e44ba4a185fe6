"""SANA and SANA-Sprint end to end on tiny seeded models (models/build.py's tiny-sana and tiny-sana-sprint): the
export's graphs and manifest, then the torch-free runtime in parity with diffusers' SanaPipeline,
SanaSprintPipeline and SanaSprintImg2ImgPipeline on the same weights, seed and settings (mean absolute pixel
difference <= 1/255), and the samplers each refuses."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image

from sd_onnx.runtime import DiffusionPipeline, GenerationRequest, RequestError
from sd_onnx.runtime.families.sana import COMPLEX_HUMAN_INSTRUCTION

from .conftest import built, exported
from .test_transformer_families import TOLERANCE, mean_abs, reference
from .test_transformer_families import diffusers_images as parity_images

PROMPT, NEGATIVE = "A red circle on a blue square ", "blurry"
SIDE = 32  # the tiny models' default: sample_size 8 x the DC-AE's factor 4 (diffusers takes multiples of 32)


@pytest.fixture(scope="module")
def tiny_sana(tmp_path_factory: pytest.TempPathFactory):
    """(our pipeline, diffusers' SanaPipeline) on the tiny SANA's weights."""
    source = built("tiny-sana", tmp_path_factory)
    export = exported(source, tmp_path_factory)
    return DiffusionPipeline.from_pretrained(export, provider="cpu"), reference(source, "SanaPipeline")


@pytest.fixture(scope="module")
def tiny_sana_sprint(tmp_path_factory: pytest.TempPathFactory):
    """(our pipeline, diffusers' SanaSprintPipeline) on the tiny SANA-Sprint's weights."""
    source = built("tiny-sana-sprint", tmp_path_factory)
    export = exported(source, tmp_path_factory)
    return DiffusionPipeline.from_pretrained(export, provider="cpu"), reference(source, "SanaSprintPipeline")


def diffusers_images(pipe, seed: int, **kwargs) -> np.ndarray:
    """diffusers' images at our size: no resolution binning (its bins are for 1024-pixel models)."""
    return parity_images(pipe, seed, **{"height": SIDE, "width": SIDE, "use_resolution_binning": False, **kwargs})


def test_export_signatures_and_config(tiny_sana, tiny_sana_sprint) -> None:
    sana, sprint = tiny_sana[0], tiny_sana_sprint[0]
    for pipe in (sana, sprint):
        components = pipe.manifest.components
        assert set(components) == {"text_encoder", "transformer", "vae_decoder", "vae_encoder"}
        for info in components.values():
            assert info.validation["max_abs_diff"] <= info.validation["atol"]
        signature = {name: [(t.name, t.dtype) for t in info.inputs] for name, info in components.items()}
        assert signature["text_encoder"] == [("input_ids", "int32"), ("attention_mask", "int32")]
        assert [t.name for t in components["text_encoder"].outputs] == ["last_hidden_state"]
        assert signature["vae_decoder"] == [("latent_sample", "float32")]
        assert [t.name for t in components["vae_encoder"].outputs] == ["latent_sample"]  # DC-AE: no posterior
        assert [t.name for t in components["transformer"].outputs] == ["out_hidden_states"]
        config = pipe.config
        assert (config.vae_kind, config.latent_channels, config.vae_scale_factor) == ("dc", 32, 4)
        assert (config.max_sequence_length, config.size_multiple, config.default_resolution) == (300, 32, SIDE)
        assert config.guidance_scale == 4.5
    inputs = ["hidden_states", "encoder_hidden_states", "encoder_attention_mask", "timestep"]
    assert [t.name for t in sana.manifest.components["transformer"].inputs] == inputs
    assert [t.name for t in sprint.manifest.components["transformer"].inputs] == [*inputs, "guidance"]
    assert (sana.config.family, sana.config.default_steps, sana.config.guidance_embeds) == ("sana", 20, False)
    assert (sprint.config.family, sprint.config.default_steps, sprint.config.guidance_embeds) == (
        "sana_sprint",
        2,
        True,
    )
    assert sprint.config.guidance_embeds_scale == pytest.approx(0.1)
    assert type(sana).__name__ == "SanaPipeline" and sana.scheduler_name == "dpmpp_2m_flow"  # SANA's published one
    assert type(sprint).__name__ == "SanaSprintPipeline" and sprint.scheduler_name == "scm"


def test_prompts_are_tokenized_behind_the_instruction_as_diffusers(tiny_sana) -> None:
    ours, theirs = tiny_sana
    instruction = len(theirs.tokenizer.encode(COMPLEX_HUMAN_INSTRUCTION))
    text = COMPLEX_HUMAN_INSTRUCTION + PROMPT.lower().strip()
    settings = {"padding": "max_length", "max_length": instruction + 298, "truncation": True}
    want = theirs.tokenizer([text], padding_side="right", **settings)  # as the pipelines pad
    ids, mask = ours.family.tokenizers["text_encoder"].encode([text])
    assert ids.tolist() == want["input_ids"] and mask.tolist() == want["attention_mask"]


@pytest.mark.parametrize("guidance", [1.0, 4.5])
def test_sana_txt2img_matches_diffusers(tiny_sana, guidance: float) -> None:
    ours, theirs = tiny_sana
    settings = {"num_inference_steps": 4, "guidance_scale": guidance}
    got = ours(PROMPT, negative_prompt=NEGATIVE, seed=4, output_type="np", **settings).images
    want = diffusers_images(theirs, 4, prompt=PROMPT, negative_prompt=NEGATIVE, **settings)
    assert mean_abs(got, want) <= TOLERANCE
    assert want.std() > 0.05  # an image, not a flat field


@pytest.mark.parametrize(("prompts", "per_prompt"), [([PROMPT, "a green triangle"], 1), (PROMPT, 2)])
def test_sana_batches_and_non_square_size_match_diffusers(tiny_sana, prompts, per_prompt: int) -> None:
    """Several prompts, or several images of one: diffusers' SanaPipeline tiles the attention masks where it
    repeats the states per prompt, so several prompts with several images each pair masks and prompts wrongly
    there (not here)."""
    ours, theirs = tiny_sana
    settings = {"num_inference_steps": 2, "guidance_scale": 3.0, "num_images_per_prompt": per_prompt}
    got = ours(prompts, seed=7, width=2 * SIDE, output_type="np", **settings).images
    want = diffusers_images(theirs, 7, prompt=prompts, width=2 * SIDE, **settings)
    assert mean_abs(got, want) <= TOLERANCE


def test_sana_sprint_matches_diffusers_with_embedded_guidance(tiny_sana_sprint) -> None:
    ours, theirs = tiny_sana_sprint
    images = {}
    for guidance in (4.5, 1.5):
        settings = {"guidance_scale": guidance, "num_images_per_prompt": 2}
        got = ours(PROMPT, seed=3, output_type="np", **settings).images  # the model's 2 steps
        want = diffusers_images(theirs, 3, prompt=PROMPT, **settings)
        assert mean_abs(got, want) <= TOLERANCE
        images[guidance] = got
    assert np.abs(images[4.5] - images[1.5]).mean() > 1e-4  # the guidance reaches the transformer


def test_sana_sprint_one_step_matches_diffusers(tiny_sana_sprint) -> None:
    ours, theirs = tiny_sana_sprint
    got = ours(PROMPT, num_inference_steps=1, seed=5, output_type="np").images
    want = diffusers_images(theirs, 5, prompt=PROMPT, num_inference_steps=1, intermediate_timesteps=None)
    assert mean_abs(got, want) <= TOLERANCE


@pytest.mark.parametrize("strength", [0.5, 0.9])
def test_sana_sprint_img2img_matches_diffusers(tiny_sana_sprint, strength: float) -> None:
    from diffusers import SanaSprintImg2ImgPipeline

    ours, theirs = tiny_sana_sprint
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8))
    got = ours(PROMPT, image=image, strength=strength, seed=2, output_type="np").images
    img2img = SanaSprintImg2ImgPipeline(**theirs.components)
    img2img.set_progress_bar_config(disable=True)
    want = diffusers_images(img2img, 2, prompt=PROMPT, image=image, strength=strength)
    assert mean_abs(got, want) <= TOLERANCE


def test_samplers_of_the_wrong_kind_are_refused(tiny_sana, tiny_sana_sprint, caplog) -> None:
    sana, sprint = tiny_sana[0], tiny_sana_sprint[0]
    with pytest.raises(RequestError, match="scheduler: ddpm cannot sample a flow-matching model.*flow_euler"):
        sana.prepare(GenerationRequest(PROMPT, scheduler="DDPM"))
    with pytest.raises(RequestError, match="scheduler: scm cannot sample a rectified-flow"):
        sana.prepare(GenerationRequest(PROMPT, scheduler="scm"))
    with pytest.raises(RequestError, match="scheduler: flow_euler cannot sample a TrigFlow"):
        sprint.prepare(GenerationRequest(PROMPT, scheduler="flow_euler"))
    # A1111's "Euler" (Forge's name on flow models) is each model's own flow sampler.
    assert sana.prepare(GenerationRequest(PROMPT, scheduler="Euler")).scheduler == "flow_euler"
    assert sana.prepare(GenerationRequest(PROMPT, scheduler="DPM++ 2M")).scheduler == "dpmpp_2m_flow"
    assert sprint.prepare(GenerationRequest(PROMPT, scheduler="Euler")).scheduler == "scm"
    with caplog.at_level(logging.WARNING, logger="sd_onnx"):
        sprint.generate(GenerationRequest(PROMPT, negative_prompt=NEGATIVE, steps=1, seed=0), output_type="latent")
    assert "negative prompt is not used" in caplog.text
