"""FLUX.2 [klein] end to end on the tiny seeded model (models/build.py's tiny-flux2-klein, a base model): the
export's graphs and manifest, the transformer and text encoder graphs against PyTorch at shapes they were not
traced at, the chat-template tokenizer (thinking off, padded to 512) against transformers', and the torch-free
pipeline in parity with diffusers' Flux2KleinPipeline (same weights, seed and settings: mean absolute pixel
difference <= 1/255), with and without classifier-free guidance, tiled or not."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from sd_onnx.runtime import DiffusionPipeline, GenerationRequest, RequestError
from sd_onnx.runtime.configs import read_model_config
from sd_onnx.runtime.manifest import Manifest
from sd_onnx.runtime.request import Limits

from .test_transformer_families import TOLERANCE, diffusers_images, mean_abs

PROMPT = "a red circle on a blue square"
LAYERS = (9, 18, 27)


@pytest.fixture(scope="module")
def flux2(tiny_flux2_klein_pipeline: Path, tiny_flux2_klein_export: Path):
    from diffusers import Flux2KleinPipeline

    theirs = Flux2KleinPipeline.from_pretrained(tiny_flux2_klein_pipeline)
    theirs.set_progress_bar_config(disable=True)
    return DiffusionPipeline.from_pretrained(tiny_flux2_klein_export, provider="cpu"), theirs


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_export_signatures_config_and_validation(tiny_flux2_klein_export: Path) -> None:
    manifest = Manifest.load(tiny_flux2_klein_export)
    manifest.verify(tiny_flux2_klein_export)
    assert manifest.pipeline_class == "Flux2KleinPipeline" and manifest.model_family == "flux2"
    signatures = {
        name: ({t.name: (t.dtype, t.shape) for t in info.inputs}, {t.name: (t.dtype, t.shape) for t in info.outputs})
        for name, info in manifest.components.items()
    }
    text = ["batch", "sequence"]
    assert signatures["text_encoder"] == (
        {"input_ids": ("int32", text), "attention_mask": ("int32", text)},
        {f"hidden_states.{k}": ("float32", [*text, 32]) for k in LAYERS},
    )
    tokens = ["batch", "image_sequence", 128]
    assert signatures["transformer"] == (
        {
            "hidden_states": ("float32", tokens),
            "encoder_hidden_states": ("float32", [*text, 3 * 32]),
            "timestep": ("float32", ["batch"]),
            "txt_ids": ("float32", ["sequence", 4]),
            "img_ids": ("float32", ["image_sequence", 4]),
        },
        {"out_hidden_states": ("float32", tokens)},
    )
    assert signatures["vae_decoder"] == (
        {"latent_sample": ("float32", ["batch", 128, "height", "width"])},
        {"sample": ("float32", ["batch", 3, "height", "width"])},
    )
    assert signatures["vae_encoder"] == (  # a reference image's latents as the transformer takes them
        {"sample": ("float32", ["batch", 3, "height", "width"])},
        {"latent_sample": ("float32", ["batch", 128, "height", "width"])},
    )
    assert set(signatures) == {"text_encoder", "transformer", "vae_decoder", "vae_encoder"}
    for info in manifest.components.values():
        assert info.validation["max_abs_diff"] <= info.validation["atol"]
    config = manifest.config
    assert (config.family, config.max_sequence_length, config.patch_size, config.embedding_dim) == ("flux2", 512, 1, 96)
    assert (config.latent_channels, config.vae_scale_factor, config.size_multiple) == (128, 4, 4)
    assert (config.default_steps, config.guidance_scale, config.default_resolution) == (50, 4.0, 256)
    assert (config.scaling_factor, config.shift_factor) == (1.0, None)


def test_distilled_models_default_to_four_unguided_steps(tiny_flux2_klein_pipeline: Path, tmp_path: Path) -> None:
    folder = tmp_path / "distilled"
    for part in ("transformer", "vae", "tokenizer"):
        (folder / part).mkdir(parents=True)
        for file in (tiny_flux2_klein_pipeline / part).glob("*.json"):
            shutil.copy2(file, folder / part / file.name)
    index = json.loads((tiny_flux2_klein_pipeline / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "is_distilled": True}))
    config = read_model_config(folder)
    assert (config.default_steps, config.guidance_scale, config.family) == (4, 1.0, "flux2")


def test_graphs_match_pytorch_at_other_shapes(tiny_flux2_klein_pipeline: Path, tiny_flux2_klein_export: Path) -> None:
    """The transformer at a batch, image size and prompt length it was not traced at, against diffusers' forward
    with the pipeline's 3-D ids; the text encoder's three layers against transformers' hidden_states."""
    from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel
    from transformers import Qwen3ForCausalLM

    model = Flux2Transformer2DModel.from_pretrained(tiny_flux2_klein_pipeline / "transformer").eval()
    gen = torch.Generator().manual_seed(0)
    rows, columns, length = 6, 10, 512
    hidden = torch.randn(3, rows * columns, 128, generator=gen)
    text = torch.randn(3, length, 96, generator=gen)
    t = torch.rand(3, generator=gen)
    img_ids = Flux2KleinPipeline._prepare_latent_ids(torch.zeros(3, 128, rows, columns))
    txt_ids = Flux2KleinPipeline._prepare_text_ids(text)
    with torch.no_grad():
        want = model(hidden, text, t, img_ids=img_ids, txt_ids=txt_ids, guidance=None, return_dict=False)[0]
    feeds = {"hidden_states": hidden.numpy(), "encoder_hidden_states": text.numpy(), "timestep": t.numpy()}
    feeds.update(txt_ids=txt_ids[0].float().numpy(), img_ids=img_ids[0].float().numpy())
    got = session(tiny_flux2_klein_export / "transformer" / "model.onnx").run(None, feeds)[0]
    assert np.abs(got - want.numpy()).max() < 1e-5

    encoder = Qwen3ForCausalLM.from_pretrained(tiny_flux2_klein_pipeline / "text_encoder").eval()
    ids = torch.randint(0, encoder.config.vocab_size, (2, 100), generator=gen)
    mask = torch.ones(2, 100, dtype=torch.int64)
    mask[1, 40:] = 0
    with torch.no_grad():
        states = encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    got = session(tiny_flux2_klein_export / "text_encoder" / "model.onnx").run(
        None, {"input_ids": ids.numpy().astype(np.int32), "attention_mask": mask.numpy().astype(np.int32)}
    )
    for k, layer in zip(LAYERS, got, strict=True):
        assert np.abs(layer - states[k].numpy()).max() < 1e-4


def test_prompts_tokenize_as_the_pipeline(flux2) -> None:
    """Chat turns with thinking off, padded to 512 with their mask: what Flux2KleinPipeline's tokenizer call makes."""
    ours, theirs = flux2
    prompts = [PROMPT, "", "word " * 600]
    ids, mask = ours.family.tokenizers["text_encoder"].encode(prompts)
    for prompt, row, valid in zip(prompts, ids, mask, strict=True):
        message = [{"role": "user", "content": prompt}]
        text = theirs.tokenizer.apply_chat_template(
            message, tokenize=False, add_generation_prompt=True, enable_thinking=False
        )
        want = theirs.tokenizer(text, padding="max_length", truncation=True, max_length=512)
        assert row.tolist() == want.input_ids and valid.tolist() == want.attention_mask


def test_loads_as_its_family_and_reads_image_as_a_reference(flux2) -> None:
    ours, _ = flux2
    assert type(ours).__name__ == "Flux2KleinPipeline" and ours.family.name == "flux2"
    assert ours.components_used == ("text_encoder", "transformer", "vae_decoder")
    assert ours.family.uses_cfg(4.0) and not ours.family.uses_cfg(1.0)
    reference = Image.new("RGB", (100, 70))  # cropped to a multiple of the latent scale: the output's size by default
    resolved = ours.prepare(GenerationRequest(PROMPT, image=reference))
    m = ours.config.vae_scale_factor
    assert (resolved.width, resolved.height, resolved.strength) == (100 // m * m, 70 // m * m, None)
    assert ours.prepare(GenerationRequest(PROMPT, image=reference, width=64, height=64)).width == 64
    for field, value in (("strength", 0.5), ("mask_image", Image.new("L", (100, 70)))):
        with pytest.raises(RequestError, match=f"^{field}: FLUX.2 \\[klein\\] reads `image` as a reference"):
            ours.prepare(GenerationRequest(PROMPT, image=reference, **{field: value}))
    with pytest.raises(RequestError, match="^image: 40x64: a reference needs sides of 64"):
        ours.prepare(GenerationRequest(PROMPT, image=Image.new("RGB", (40, 64))))
    with pytest.raises(RequestError, match="^image: the reference makes the output 600x600, over the limit"):
        ours.prepare(GenerationRequest(PROMPT, image=Image.new("RGB", (600, 600))), Limits())
    with pytest.raises(RequestError, match="^image: a FLUX.2 \\[klein\\] reference must be a PIL image"):
        ours.prepare(GenerationRequest(PROMPT, image=np.zeros((1, 3, 64, 64), np.float32)))
    several = [reference, Image.new("RGB", (64, 96))]  # the first reference sets the size
    first = ours.prepare(GenerationRequest(PROMPT, image=several))
    assert (first.width, first.height) == (resolved.width, resolved.height)
    with pytest.raises(RequestError, match="^image: 5 references: FLUX.2 \\[klein\\] takes 1 to 4$"):
        ours.prepare(GenerationRequest(PROMPT, image=[reference] * 5))
    with pytest.raises(RequestError, match="^image: 40x64: a reference needs sides of 64"):  # the second one
        ours.prepare(GenerationRequest(PROMPT, image=[reference, Image.new("RGB", (40, 64))]))
    with pytest.raises(RequestError, match="^image: 0 references"):
        ours.prepare(GenerationRequest(PROMPT, image=[]))


def test_editing_from_a_reference_matches_diffusers(flux2) -> None:
    """diffusers' `image=`: the reference encoded (mode of the posterior, patchified, normalized), its tokens at
    time position 10 beside the latents' at every step, with and without guidance; a large one scaled to 1024^2
    pixels first (here: cropped to a multiple of 16 about its center, the output at its size)."""
    ours, theirs = flux2
    reference = Image.fromarray(np.random.default_rng(5).integers(0, 256, (70, 100, 3), dtype=np.uint8))
    for guidance in (1.0, 4.0):
        settings = {"num_inference_steps": 2, "guidance_scale": guidance}
        got = ours(PROMPT, image=reference, seed=3, output_type="np", **settings).images
        m = ours.config.vae_scale_factor
        assert got.shape == (1, 70 // m * m, 100 // m * m, 3)
        assert mean_abs(got, diffusers_images(theirs, 3, prompt=PROMPT, image=reference, **settings)) <= TOLERANCE


def test_editing_from_several_references_matches_diffusers(flux2) -> None:
    """diffusers' `image=[a, b]`: each reference encoded at its own size, the i-th at time position 10 + 10 i,
    all their tokens after the latents'; the output at the first one's size."""
    ours, theirs = flux2
    rng = np.random.default_rng(8)
    references = [Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)) for shape in ((64, 80, 3), (96, 64, 3))]
    settings = {"num_inference_steps": 2, "guidance_scale": 1.0}
    got = ours(PROMPT, image=references, seed=5, output_type="np", **settings).images
    assert got.shape == (1, 64, 80, 3)
    difference = mean_abs(got, diffusers_images(theirs, 5, prompt=PROMPT, image=references, **settings))
    assert difference <= TOLERANCE
    one = ours(PROMPT, image=references[:1], seed=5, output_type="np", **settings).images
    assert mean_abs(got, one) > 10 * difference  # the second reference is attended to, as diffusers does


def test_cli_takes_several_references(flux2, tiny_flux2_klein_export: Path, tmp_path: Path) -> None:
    """`sd-run prompt --image a --image b`: the API's image; five are refused naming --image."""
    from click.testing import CliRunner

    from sd_onnx.runtime.cli import main

    ours, _ = flux2
    rng = np.random.default_rng(9)
    references = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(2)]
    for i, image in enumerate(references):
        image.save(tmp_path / f"ref{i}.png")
    paths = [str(tmp_path / f"ref{i}.png") for i in range(2)]
    common = ["prompt", PROMPT, "-m", str(tiny_flux2_klein_export), "--steps", "2", "--seed", "3", "--guidance", "1"]
    out = str(tmp_path / "o.png")
    result = CliRunner().invoke(main, [*common, "--image", paths[0], "--image", paths[1], "-o", out])
    assert result.exit_code == 0, result.output
    request = GenerationRequest(PROMPT, image=references, steps=2, seed=3, guidance_scale=1.0)
    want = ours.generate(request, output_type="np")
    got = np.asarray(Image.open(tmp_path / "o.png").convert("RGB"), np.float64) / 255
    assert np.abs(got - want.images[0]).max() <= 1 / 255 + 1e-6
    result = CliRunner().invoke(main, [*common, *[a for _ in range(5) for a in ("--image", paths[0])]])
    assert result.exit_code == 1 and "Error: --image: 5 references: FLUX.2 [klein] takes 1 to 4\n" in result.output


def test_txt2img_matches_diffusers(flux2) -> None:
    """No guidance (1.0), then classifier-free guidance on a batch of two prompts, two images each, non-square;
    the second also decoded in tiles, as diffusers' vae.enable_tiling() does."""
    ours, theirs = flux2
    settings = {"num_inference_steps": 2, "guidance_scale": 1.0, "height": 64, "width": 64}
    got = ours(PROMPT, seed=1, output_type="np", **settings).images
    assert mean_abs(got, diffusers_images(theirs, 1, prompt=PROMPT, **settings)) <= TOLERANCE
    prompts = [PROMPT, "a green cat sitting on a long wooden table"]
    settings = {"num_inference_steps": 2, "guidance_scale": 3.5, "height": 64, "width": 96, "num_images_per_prompt": 2}
    got = ours(prompts, seed=2, output_type="np", vae_tiling=True, **settings).images
    theirs.vae.enable_tiling()
    try:
        assert mean_abs(got, diffusers_images(theirs, 2, prompt=prompts, **settings)) <= TOLERANCE
    finally:
        theirs.vae.disable_tiling()


def test_taef2_decodes_the_samplers_latents(tiny_flux2_klein_pipeline: Path, flux2, tmp_path: Path) -> None:
    """A tiny autoencoder (TAEF2-class: the VAE's 32 channels at its scale) exported beside FLUX.2 [klein] decodes
    the sampler's latents as the reference does: un-normalized by the VAE's batch-norm statistics, unpatchified,
    AutoencoderTiny.decode; one its latents do not fit is refused."""
    from diffusers import AutoencoderKLFlux2, AutoencoderTiny

    from sd_onnx.exporter.convert import convert
    from sd_onnx.exporter.errors import ExportError

    torch.manual_seed(0)
    blocks = {"encoder_block_out_channels": (8, 8), "decoder_block_out_channels": (8, 8)}
    counts = {"num_encoder_blocks": (1, 1), "num_decoder_blocks": (1, 1)}
    AutoencoderTiny(latent_channels=32, **blocks, **counts).save_pretrained(tmp_path / "taef2")
    out = tmp_path / "onnx"
    convert(str(tiny_flux2_klein_pipeline), out, vae=str(tmp_path / "taef2"), log=lambda line: None)
    assert "tiny_vae_encoder" not in Manifest.load(out).components  # no init images on this family
    ours = DiffusionPipeline.from_pretrained(out, provider="cpu", vae="tiny")
    request = {"num_inference_steps": 2, "width": 64, "height": 64}
    latents = flux2[0](PROMPT, seed=2, output_type="latent", **request).images
    got = ours(PROMPT, seed=2, output_type="np", **request).images
    vae = AutoencoderKLFlux2.from_pretrained(tiny_flux2_klein_pipeline / "vae")
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    raw = torch.from_numpy(latents) * std + vae.bn.running_mean.view(1, -1, 1, 1)
    b, c, h, w = raw.shape
    raw = raw.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c // 4, h * 2, w * 2)
    with torch.no_grad():
        decoded = AutoencoderTiny.from_pretrained(tmp_path / "taef2").decode(raw).sample
    want = (decoded / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert mean_abs(got, want) <= TOLERANCE
    AutoencoderTiny(latent_channels=16, **blocks, **counts).save_pretrained(tmp_path / "taef1")
    with pytest.raises(ExportError, match="makes 16-channel latents at 1/2 scale; this model's VAE makes 32-channel"):
        convert(str(tiny_flux2_klein_pipeline), tmp_path / "bad", vae=str(tmp_path / "taef1"), log=lambda line: None)


def test_a1111_img2img_edits_from_its_init_image(flux2) -> None:
    """An A1111 img2img call on FLUX.2 [klein]: the init image is the reference (the image equals the API's), the
    `denoising_strength` every client sends is listed as ignored, and a mask is a 422 naming the client's field."""
    import base64
    import io
    import time

    from fastapi.testclient import TestClient
    from openai import OpenAI, UnprocessableEntityError

    from sd_onnx.runtime.server.app import ServeConfig, ServerState, create_app

    from .test_server import png_of

    ours, _ = flux2
    reference = Image.fromarray(np.random.default_rng(6).integers(0, 256, (64, 80, 3), dtype=np.uint8))
    settings = {"steps": 2, "seed": 4, "width": 80, "height": 64}
    want = ours.generate(GenerationRequest(PROMPT, image=reference, guidance_scale=1.0, **settings), output_type="np")
    buffer = io.BytesIO()
    reference.save(buffer, format="PNG")
    init = base64.b64encode(buffer.getvalue()).decode()
    body = {"prompt": PROMPT, "init_images": [init], "denoising_strength": 0.75, "cfg_scale": 1, **settings}
    with TestClient(create_app(ServerState(ServeConfig()), loader=lambda: ours)) as client:
        while client.get("/health").status_code != 200:
            time.sleep(0.05)
        r = client.post("/sdapi/v1/img2img", json=body)
        assert r.status_code == 200, r.text
        got = np.asarray(png_of(r.json()["images"][0]).convert("RGB"), np.float64) / 255
        assert np.abs(got - want.images[0]).max() <= 1 / 255 + 1e-6
        info = json.loads(r.json()["info"])
        assert info["ignored"] == ["denoising_strength"] and "Denoising strength" not in info["infotexts"][0]
        r = client.post("/sdapi/v1/img2img", json={**body, "mask": init})
        assert r.status_code == 422 and r.json()["detail"].startswith("mask: FLUX.2 [klein] reads `image` as")
        r = client.post("/sdapi/v1/img2img", json={**body, "denoising_strength": 5})
        assert r.status_code == 422 and r.json()["detail"] == "denoising_strength: must be in [0, 1], got 5"
        several = GenerationRequest(PROMPT, image=[reference, reference.rotate(90, expand=True)], guidance_scale=1.0,
                                    **settings)  # fmt: skip
        want = ours.generate(several, output_type="np").images[0]
        rotated = io.BytesIO()
        reference.rotate(90, expand=True).save(rotated, format="PNG")
        second = base64.b64encode(rotated.getvalue()).decode()
        r = client.post("/sdapi/v1/img2img", json={**body, "init_images": [init, second]})
        assert r.status_code == 200, r.text
        got = np.asarray(png_of(r.json()["images"][0]).convert("RGB"), np.float64) / 255
        assert np.abs(got - want).max() <= 1 / 255 + 1e-6
        r = client.post("/sdapi/v1/img2img", json={**body, "init_images": [init] * 5})
        assert r.status_code == 422 and r.json()["detail"] == "init_images: 5 references: FLUX.2 [klein] takes 1 to 4"
        sdk = OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client, max_retries=0)
        pngs = [("a.png", buffer.getvalue(), "image/png"), ("b.png", rotated.getvalue(), "image/png")]
        out = sdk.images.edit(image=pngs, prompt=PROMPT, response_format="b64_json",  # the SDK's image[] fields
                              extra_body={"seed": 4, "steps": 2, "guidance_scale": 1.0, "size": "80x64"})  # fmt: skip
        got = np.asarray(png_of(out.data[0].b64_json).convert("RGB"), np.float64) / 255
        assert np.abs(got - want).max() <= 1 / 255 + 1e-6
        with pytest.raises(UnprocessableEntityError) as refused:
            sdk.images.edit(image=pngs, mask=pngs[0], prompt=PROMPT)
        assert str(refused.value.response.json()).count("mask: FLUX.2 [klein] reads `image` as a reference") == 1
