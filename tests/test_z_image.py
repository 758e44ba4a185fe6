"""Z-Image (Turbo) end to end on the tiny seeded model (models/build.py's tiny-z-image): the export's graphs and
manifest, the batched transformer graph against diffusers' per-prompt list forward, the chat-template tokenizer
against transformers', and the torch-free pipeline in parity with diffusers' ZImagePipeline and
ZImageImg2ImgPipeline (same weights, seed and settings: mean absolute pixel difference <= 1/255)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from sd_onnx.runtime import DiffusionPipeline, GenerationRequest, RequestError
from sd_onnx.runtime.manifest import Manifest

from .test_transformer_families import TOLERANCE, diffusers_images, mean_abs

PROMPT, NEGATIVE = "a red circle on a blue square", "blurry"
TOKENIZER_PROMPTS = ["a red circle", "", "Ünïcödé 漢字, emoji 🎨 and 12345!", "<|im_end|> is text here", "word " * 600]


@pytest.fixture(scope="module")
def z_image(tiny_z_image_pipeline: Path, tiny_z_image_export: Path):
    from diffusers import ZImagePipeline

    theirs = ZImagePipeline.from_pretrained(tiny_z_image_pipeline)
    theirs.set_progress_bar_config(disable=True)
    return DiffusionPipeline.from_pretrained(tiny_z_image_export, provider="cpu"), theirs


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_export_signatures_config_and_validation(tiny_z_image_pipeline: Path, tiny_z_image_export: Path) -> None:
    manifest = Manifest.load(tiny_z_image_export)
    manifest.verify(tiny_z_image_export)
    assert manifest.pipeline_class == "ZImagePipeline" and manifest.model_family == "z_image"
    layers = json.loads((tiny_z_image_pipeline / "text_encoder" / "config.json").read_text())["num_hidden_layers"]
    width = json.loads((tiny_z_image_pipeline / "transformer" / "config.json").read_text())["cap_feat_dim"]
    signatures = {
        name: (
            {t.name: (t.dtype, t.shape) for t in info.inputs},
            {t.name: (t.dtype, t.shape) for t in info.outputs},
        )
        for name, info in manifest.components.items()
    }
    text = ["batch", "sequence"]
    assert signatures["text_encoder"] == (
        {"input_ids": ("int32", text), "attention_mask": ("int32", text)},
        {f"hidden_states.{layers - 1}": ("float32", [*text, width])},  # the pipeline's hidden_states[-2]
    )
    image = ["batch", 16, "height", "width"]
    assert signatures["transformer"] == (
        {
            "hidden_states": ("float32", image),
            "timestep": ("float32", ["batch"]),
            "encoder_hidden_states": ("float32", [*text, width]),
            "encoder_attention_mask": ("int32", text),
        },
        {"out_hidden_states": ("float32", image)},
    )
    assert set(signatures) == {"text_encoder", "transformer", "vae_decoder", "vae_encoder"}
    for info in manifest.components.values():
        assert info.validation["max_abs_diff"] <= info.validation["atol"]
    config = manifest.config
    assert (config.family, config.max_sequence_length, config.patch_size) == ("z_image", 512, 2)
    assert config.embedding_dim == width
    assert (config.default_steps, config.guidance_scale, config.default_resolution) == (9, 0.0, 1024)
    assert (config.latent_channels, config.size_multiple, config.prediction_type) == (16, 4, "flow")
    assert (config.scaling_factor, config.shift_factor) == (0.3611, 0.1159)
    assert (tiny_z_image_export / "tokenizer" / "chat_template.jinja").is_file()


def test_transformer_graph_is_diffusers_list_forward(tiny_z_image_pipeline: Path, tiny_z_image_export: Path) -> None:
    """The batched graph equals diffusers' forward on lists at sizes and prompt lengths it was not traced at: image
    runs padded to 32 tokens or not, prompts of different padded lengths in one batch, a sequence longer than
    the longest padded prompt."""
    from diffusers import ZImageTransformer2DModel

    model = ZImageTransformer2DModel.from_pretrained(tiny_z_image_pipeline / "transformer").eval()
    graph = session(tiny_z_image_export / "transformer" / "model.onnx")
    gen = torch.Generator().manual_seed(0)
    for (height, width), lengths, sequence in (((8, 12), [5, 40], 64), ((16, 16), [32, 33, 7], 96), ((6, 4), [70], 96)):
        latents = torch.randn(len(lengths), 16, height, width, generator=gen)
        t = torch.rand(len(lengths), generator=gen)
        prompts = [torch.randn(n, 32, generator=gen) for n in lengths]
        with torch.no_grad():
            want = model(list(latents.unsqueeze(2).unbind(0)), t, prompts, return_dict=False)[0]
        states = np.zeros((len(lengths), sequence, 32), np.float32)
        mask = np.zeros((len(lengths), sequence), np.int32)
        for row, prompt in enumerate(prompts):
            states[row, : len(prompt)], mask[row, : len(prompt)] = prompt.numpy(), 1
        feeds = {"hidden_states": latents.numpy(), "timestep": t.numpy(), "encoder_hidden_states": states}
        got = graph.run(None, {**feeds, "encoder_attention_mask": mask})[0]
        assert np.abs(got - torch.stack(want).squeeze(2).numpy()).max() < 1e-5


def test_text_encoder_graph_is_the_penultimate_layer(tiny_z_image_pipeline: Path, tiny_z_image_export: Path) -> None:
    from transformers import Qwen3Model

    model = Qwen3Model.from_pretrained(tiny_z_image_pipeline / "text_encoder").eval()
    ids = torch.randint(0, model.config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 40, dtype=torch.int64)
    mask[1, 12:], mask[2, 30:] = 0, 0
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2].numpy()
    got = session(tiny_z_image_export / "text_encoder" / "model.onnx").run(
        None, {"input_ids": ids.numpy().astype(np.int32), "attention_mask": mask.numpy().astype(np.int32)}
    )[0]
    valid = mask.numpy().astype(bool)
    assert np.abs(got - want)[valid].max() < 1e-5


@pytest.mark.parametrize("thinking", [True, False])
def test_chat_prompts_tokenize_as_transformers(tiny_z_image_export: Path, thinking: bool) -> None:
    """The runtime's chat turns (no jinja) tokenize to transformers' apply_chat_template + tokenizer ids, cut at
    the model's sequence length; with thinking off (FLUX.2 [klein]) the template's empty thinking block."""
    from transformers import AutoTokenizer

    from sd_onnx.runtime.chat_template import ChatPrompts

    folder = tiny_z_image_export
    ours = ChatPrompts(folder, "tokenizer", "text_encoder", 512, thinking, pad_to_longest=True)
    theirs = AutoTokenizer.from_pretrained(folder / "tokenizer")
    ids, mask = ours.encode(TOKENIZER_PROMPTS)
    assert ids.shape[1] == 512 and ids.dtype == np.int32  # padded to the longest, which was cut
    for prompt, row, valid in zip(TOKENIZER_PROMPTS, ids, mask.astype(bool), strict=True):
        message = [{"role": "user", "content": prompt}]
        text = theirs.apply_chat_template(message, tokenize=False, add_generation_prompt=True, enable_thinking=thinking)
        want = theirs(text, truncation=True, max_length=512).input_ids
        assert row[valid].tolist() == want
        assert (row[~valid] == theirs.pad_token_id).all()


def test_loads_as_its_family(z_image) -> None:
    ours, _ = z_image
    assert type(ours).__name__ == "ZImagePipeline" and ours.family.name == "z_image"
    assert ours.components_used == ("text_encoder", "transformer", "vae_decoder")
    assert ours.scheduler_name == "flow_euler"
    with pytest.raises(RequestError, match="prompt_2: applies to"):
        ours.prepare(GenerationRequest(PROMPT, prompt_2="x"))


def test_turbo_txt2img_matches_diffusers(z_image) -> None:
    """Z-Image-Turbo's way: no guidance (a scale of 0)."""
    ours, theirs = z_image
    settings = {"num_inference_steps": 3, "guidance_scale": 0.0, "height": 64, "width": 64}
    got = ours(PROMPT, seed=1, output_type="np", **settings).images
    assert mean_abs(got, diffusers_images(theirs, 1, prompt=PROMPT, **settings)) <= TOLERANCE


def test_guided_batch_matches_diffusers(z_image) -> None:
    """Classifier-free guidance as Z-Image defines it, prompts and negative prompts of different lengths in one
    batch, two images per prompt, a non-square size."""
    ours, theirs = z_image
    prompts = [PROMPT, "a green cat sitting on a long wooden table near a bright window at noon"]
    settings = {"num_inference_steps": 3, "guidance_scale": 2.5, "height": 64, "width": 96, "num_images_per_prompt": 2}
    got = ours(prompts, negative_prompt=[NEGATIVE, ""], seed=2, output_type="np", **settings).images
    want = diffusers_images(theirs, 2, prompt=prompts, negative_prompt=[NEGATIVE, ""], **settings)
    assert mean_abs(got, want) <= TOLERANCE
    unguided = {**settings, "guidance_scale": 0.0}
    plain = ours(prompts, negative_prompt=[NEGATIVE, ""], seed=2, output_type="np", **unguided).images
    assert np.abs(plain - got).mean() > 1e-4  # the guidance is applied


def test_img2img_matches_diffusers(z_image) -> None:
    from diffusers import ZImageImg2ImgPipeline

    ours, theirs = z_image
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    img2img = ZImageImg2ImgPipeline(**theirs.components)
    img2img.set_progress_bar_config(disable=True)
    settings = {"num_inference_steps": 4, "strength": 0.6, "guidance_scale": 1.5, "height": 64, "width": 64}
    got = ours(PROMPT, image=image, seed=9, output_type="np", **settings).images
    assert mean_abs(got, diffusers_images(img2img, 9, prompt=PROMPT, image=image, **settings)) <= TOLERANCE
