"""SD3 and FLUX.1 run torch-free, in parity with diffusers' pipelines on the same tiny seeded weights: same
seed, same settings, mean absolute pixel difference <= 1/255 (txt2img, img2img, a second prompt, FLUX-dev's
embedded guidance, SD3 without its T5), and the requests they cannot take refused with the field named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sd_onnx.runtime import DiffusionPipeline, GenerationRequest, RequestError
from sd_onnx.runtime.families.flux import unpack

PROMPT, NEGATIVE = "a red circle on a blue square", "blurry"
TOLERANCE = 1 / 255


def reference(folder: Path, cls_name: str):
    import diffusers

    pipe = getattr(diffusers, cls_name).from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_images(pipe, seed: int = 0, output_type: str = "np", **kwargs) -> np.ndarray:
    with torch.no_grad():
        images = pipe(generator=torch.Generator("cpu").manual_seed(seed), output_type=output_type, **kwargs).images
    return np.asarray(images)


def mean_abs(ours: np.ndarray, theirs: np.ndarray) -> float:
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    return float(np.abs(np.asarray(ours, np.float64) - theirs).mean())


def init_image(side: int) -> Image.Image:
    rng = np.random.default_rng(3)
    return Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def sd3(tiny_sd3_pipeline: Path, tiny_sd3_export: Path):
    return DiffusionPipeline.from_pretrained(tiny_sd3_export, provider="cpu"), reference(
        tiny_sd3_pipeline, "StableDiffusion3Pipeline"
    )


@pytest.fixture(scope="module")
def flux(tiny_flux_pipeline: Path, tiny_flux_export: Path):
    return DiffusionPipeline.from_pretrained(tiny_flux_export, provider="cpu"), reference(
        tiny_flux_pipeline, "FluxPipeline"
    )


def test_sd3_loads_as_its_family(sd3) -> None:
    ours, _ = sd3
    assert type(ours).__name__ == "StableDiffusion3Pipeline"
    assert ours.family.name == "sd3" and ours.components_used[-2] == "transformer"
    assert ours.scheduler_name == "flow_euler"


@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_sd3_txt2img_matches_diffusers(sd3, guidance: float) -> None:
    ours, theirs = sd3
    settings = {"num_inference_steps": 3, "guidance_scale": guidance}
    got = ours(PROMPT, negative_prompt=NEGATIVE, seed=4, output_type="np", **settings).images
    want = diffusers_images(theirs, 4, prompt=PROMPT, negative_prompt=NEGATIVE, **settings)
    assert mean_abs(got, want) <= TOLERANCE


def test_sd3_batch_and_second_prompt_match_diffusers(sd3) -> None:
    ours, theirs = sd3
    settings = {"num_inference_steps": 2, "guidance_scale": 4.0, "num_images_per_prompt": 2}
    got = ours([PROMPT], prompt_2="a green triangle", seed=7, output_type="np", **settings).images
    want = diffusers_images(theirs, 7, prompt=[PROMPT], prompt_2="a green triangle", **settings)
    assert mean_abs(got, want) <= TOLERANCE


def test_sd3_img2img_matches_diffusers(sd3) -> None:
    from diffusers import StableDiffusion3Img2ImgPipeline

    ours, theirs = sd3
    side = ours.config.default_resolution
    image = init_image(side)
    settings = {"num_inference_steps": 4, "guidance_scale": 3.0, "strength": 0.7}
    got = ours(PROMPT, image=image, seed=2, output_type="np", **settings).images
    img2img = StableDiffusion3Img2ImgPipeline(**theirs.components)
    img2img.set_progress_bar_config(disable=True)
    want = diffusers_images(img2img, 2, prompt=PROMPT, image=image, **settings)
    assert mean_abs(got, want) <= TOLERANCE


def test_flux_txt2img_matches_diffusers(flux) -> None:
    ours, theirs = flux
    assert type(ours).__name__ == "FluxPipeline" and ours.family.name == "flux"
    settings = {"num_inference_steps": 3, "num_images_per_prompt": 2}
    got = ours(PROMPT, seed=5, output_type="np", **settings).images
    want = diffusers_images(theirs, 5, prompt=PROMPT, **settings)
    assert mean_abs(got, want) <= TOLERANCE


def test_flux_non_square_size_matches_diffusers(flux) -> None:
    ours, theirs = flux
    side, multiple = ours.config.default_resolution, ours.config.size_multiple
    settings = {"num_inference_steps": 2, "height": side, "width": side + 2 * multiple}
    got = ours(PROMPT, seed=1, output_type="np", **settings).images
    want = diffusers_images(theirs, 1, prompt=PROMPT, **settings)
    assert mean_abs(got, want) <= TOLERANCE


def test_flux_img2img_matches_diffusers(flux) -> None:
    from diffusers import FluxImg2ImgPipeline

    ours, theirs = flux
    image = init_image(ours.config.default_resolution)
    settings = {"num_inference_steps": 4, "strength": 0.6}
    got = ours(PROMPT, image=image, seed=9, output_type="np", **settings).images
    img2img = FluxImg2ImgPipeline(**theirs.components)
    img2img.set_progress_bar_config(disable=True)
    want = diffusers_images(img2img, 9, prompt=PROMPT, image=image, **settings)
    assert mean_abs(got, want) <= TOLERANCE


def test_flux_dev_embeds_the_guidance_and_matches_diffusers(tiny_flux_dev_pipeline: Path, tiny_flux_dev_export: Path):
    ours = DiffusionPipeline.from_pretrained(tiny_flux_dev_export, provider="cpu")
    theirs = reference(tiny_flux_dev_pipeline, "FluxPipeline")
    assert "guidance" in {spec.name for spec in ours.manifest.components["transformer"].inputs}
    images = {}
    for guidance in (1.5, 6.0):
        got = ours(PROMPT, seed=3, num_inference_steps=2, guidance_scale=guidance, output_type="np").images
        want = diffusers_images(theirs, 3, prompt=PROMPT, num_inference_steps=2, guidance_scale=guidance)
        assert mean_abs(got, want) <= TOLERANCE
        images[guidance] = got
    assert np.abs(images[1.5] - images[6.0]).mean() > 1e-4  # the guidance reaches the transformer


@pytest.mark.parametrize(
    ("family", "cls_name", "length"),
    [("flux", "FluxPipeline", 40), ("sd3", "StableDiffusion3Pipeline", 12), ("z_image", "ZImagePipeline", 20)],
)
def test_max_sequence_length_reads_as_many_tokens_as_diffusers(request, family: str, cls_name: str, length: int):
    """A request's max_sequence_length (T5's or the LLM's tokens) conditions as diffusers' argument does: parity
    at a length other than the model's, and the result differs from the default length's."""
    ours = DiffusionPipeline.from_pretrained(request.getfixturevalue(f"tiny_{family}_export"), provider="cpu")
    theirs = reference(request.getfixturevalue(f"tiny_{family}_pipeline"), cls_name)
    prompt = "a red circle on a blue square beside a green triangle under a yellow sky at dawn"
    settings = {"num_inference_steps": 2, "width": 64, "height": 64, "guidance_scale": 4.0}
    got = ours(prompt, seed=1, max_sequence_length=length, output_type="np", **settings).images
    want = diffusers_images(theirs, 1, prompt=prompt, max_sequence_length=length, **settings)
    assert mean_abs(got, want) <= TOLERANCE
    default = ours(prompt, seed=1, output_type="np", **settings).images
    assert np.abs(got - default).mean() > 1e-5


def test_max_sequence_length_is_checked(flux, tiny_export: Path) -> None:
    ours, _ = flux
    with pytest.raises(RequestError, match="max_sequence_length: must be <= 512, got 513"):
        ours.prepare(GenerationRequest(PROMPT, max_sequence_length=513))
    with pytest.raises(RequestError, match="max_sequence_length: must be an integer"):
        ours.prepare(GenerationRequest(PROMPT, max_sequence_length=1.5))
    unet_model = DiffusionPipeline.from_pretrained(tiny_export, provider="cpu")
    with pytest.raises(RequestError, match="max_sequence_length: applies to .*FLUX.* models only"):
        unet_model.prepare(GenerationRequest(PROMPT, max_sequence_length=64))


def test_forge_distilled_cfg_scale_is_flux_devs_guidance(tiny_flux_dev_export: Path) -> None:
    """Forge clients send FLUX.1-dev's guidance as `distilled_cfg_scale` with `cfg_scale` 1: the image is the
    API's at that guidance, not at 1; a `cfg_scale` above 1 beside it (real CFG, not run here) is listed as
    ignored, and a 422 for a bad value names the field the client sent."""
    import json
    import time

    from fastapi.testclient import TestClient

    from sd_onnx.runtime.server.app import ServeConfig, ServerState, create_app

    from .test_server import png_of

    pipe = DiffusionPipeline.from_pretrained(tiny_flux_dev_export, provider="cpu")
    settings = {"steps": 2, "seed": 5, "width": 64, "height": 64}
    want = pipe.generate(GenerationRequest(PROMPT, guidance_scale=3.5, **settings), output_type="np").images[0]
    with TestClient(create_app(ServerState(ServeConfig()), loader=lambda: pipe)) as client:
        while client.get("/health").status_code != 200:
            time.sleep(0.05)
        body = {"prompt": PROMPT, "cfg_scale": 1, "distilled_cfg_scale": 3.5, **settings}
        r = client.post("/sdapi/v1/txt2img", json=body)
        assert r.status_code == 200, r.text
        got = np.asarray(png_of(r.json()["images"][0]).convert("RGB"), np.float64) / 255
        assert np.abs(got - want).max() <= 1 / 255 + 1e-6
        assert "CFG scale: 3.5" in json.loads(r.json()["info"])["infotexts"][0]
        r = client.post("/sdapi/v1/txt2img", json={**body, "cfg_scale": 7})
        assert r.status_code == 200 and json.loads(r.json()["info"])["ignored"] == ["cfg_scale"]
        r = client.post("/sdapi/v1/txt2img", json={**body, "distilled_cfg_scale": -2})
        assert r.status_code == 422 and "distilled_cfg_scale" in r.text


def test_flow_models_refuse_ddpm_samplers_and_sdxl_fields(sd3, flux) -> None:
    ours, _ = sd3
    with pytest.raises(RequestError, match="scheduler: euler_a cannot sample a flow-matching model.*flow_euler"):
        ours.prepare(GenerationRequest(PROMPT, scheduler="Euler a"))
    assert ours.prepare(GenerationRequest(PROMPT, scheduler="Euler")).scheduler == "flow_euler"  # as Forge reads it
    with pytest.raises(RequestError, match="original_size: applies to SDXL models only"):
        ours.prepare(GenerationRequest(PROMPT, original_size=(64, 64)))
    flux_pipe, _ = flux
    with pytest.raises(RequestError, match="negative_prompt_2: applies to"):
        flux_pipe.prepare(GenerationRequest(PROMPT, negative_prompt_2="x"))


def test_a1111_syntax_reaches_t5_as_plain_text(flux) -> None:
    """A1111's markup is read, not sent to T5: "(red:1.3)" encodes as "red"."""
    ours, _ = flux
    settings = {"steps": 2, "seed": 0}
    marked = ours.generate(GenerationRequest("a (red:1.3) circle", prompt_syntax="a1111", **settings), output_type="np")
    plain = ours.generate(GenerationRequest("a red circle", **settings), output_type="np")
    assert np.array_equal(marked.images, plain.images)


def test_flux_through_the_server_with_a1111_and_openai_requests(tiny_flux_export: Path) -> None:
    """The server takes a transformer family with no change: A1111's txt2img as webuiapi sends it ("Euler",
    a negative prompt, CFG 7), the samplers list, and the OpenAI images route."""
    import json

    import httpx

    from .test_server import Server, png_of

    server = Server(tiny_flux_export)
    try:
        samplers = httpx.get(f"{server.url}/sdapi/v1/samplers", timeout=30).json()
        assert [s["name"] for s in samplers] == ["flow_euler"]
        body = {"prompt": PROMPT, "negative_prompt": "", "steps": 2, "seed": 11, "sampler_name": "Euler",
                "cfg_scale": 7, "width": 128, "height": 64, "batch_size": 1}  # fmt: skip
        r = httpx.post(f"{server.url}/sdapi/v1/txt2img", json=body, timeout=120)
        assert r.status_code == 200, r.text
        image = png_of(r.json()["images"][0])
        assert image.size == (128, 64)
        assert "Sampler: flow_euler" in image.text["parameters"] and json.loads(r.json()["info"])["seed"] == 11
        bad = httpx.post(f"{server.url}/sdapi/v1/txt2img", json={**body, "sampler_name": "DPM++ 2M"}, timeout=60)
        assert bad.status_code == 422 and "flow_euler" in bad.text
        openai = {"prompt": PROMPT, "size": "64x64", "response_format": "b64_json"}
        r = httpx.post(f"{server.url}/v1/images/generations", json=openai, timeout=120)
        assert r.status_code == 200, r.text
        assert png_of(r.json()["data"][0]["b64_json"]).size == (64, 64)
    finally:
        server.stop()


def test_sd3_refuses_sizes_past_its_position_embedding(sd3) -> None:
    import json

    ours, _ = sd3
    config = json.loads((ours.folder / "transformer" / "config.json").read_text())
    side = config["pos_embed_max_size"] * config["patch_size"] * ours.config.vae_scale_factor
    assert ours.prepare(GenerationRequest(PROMPT, width=side, height=side)).width == side
    with pytest.raises(
        RequestError, match=f"width: {side + ours.config.size_multiple} is larger than this model's {side} px"
    ):
        ours.prepare(GenerationRequest(PROMPT, width=side + ours.config.size_multiple, height=side))


@pytest.mark.parametrize("value", ["big", -1, 1.5, True])
def test_sd3_refuses_a_damaged_position_embedding_size_at_load(tiny_sd3_export: Path, tmp_path: Path, value) -> None:
    """A `pos_embed_max_size` that is not a positive integer is refused when the folder loads, in one line naming
    it, instead of being taken as absent (which let any size reach the graph and fail there)."""
    import json
    import shutil

    from sd_onnx.runtime.manifest import ManifestError

    folder = Path(shutil.copytree(tiny_sd3_export, tmp_path / "sd3"))
    path = folder / "transformer" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "pos_embed_max_size": value}))
    with pytest.raises(ManifestError, match="transformer/config.json: pos_embed_max_size: must be an integer"):
        DiffusionPipeline.from_pretrained(folder, provider="cpu")


def test_sd3_without_t5_matches_diffusers(tiny_sd3_pipeline: Path, tmp_path: Path) -> None:
    """diffusers runs SD3 with `text_encoder_3=None` (zeros in T5's place): an export of that folder too."""
    import json
    import shutil

    from sd_onnx.exporter.convert import convert

    source = tmp_path / "no-t5"
    shutil.copytree(tiny_sd3_pipeline, source)
    shutil.rmtree(source / "text_encoder_3")
    shutil.rmtree(source / "tokenizer_3")
    index = json.loads((source / "model_index.json").read_text())
    index["text_encoder_3"] = index["tokenizer_3"] = [None, None]
    (source / "model_index.json").write_text(json.dumps(index))
    convert(str(source), tmp_path / "onnx", log=lambda line: None)
    ours = DiffusionPipeline.from_pretrained(tmp_path / "onnx", provider="cpu")
    assert "text_encoder_3" not in ours.components_used
    from diffusers import StableDiffusion3Pipeline

    theirs = StableDiffusion3Pipeline.from_pretrained(source, text_encoder_3=None, tokenizer_3=None)
    settings = {"num_inference_steps": 2, "guidance_scale": 4.0}
    got = ours(PROMPT, seed=6, output_type="np", **settings).images
    want = diffusers_images(theirs, 6, prompt=PROMPT, **settings)
    assert mean_abs(got, want) <= TOLERANCE


def square_mask(side: int) -> Image.Image:
    mask = np.zeros((side, side), np.uint8)
    mask[side // 4 : 3 * side // 4, side // 8 : side // 2] = 255
    return Image.fromarray(mask)


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_inpainting_matches_diffusers(name: str, request) -> None:
    """An ordinary transformer inpaints as diffusers' StableDiffusion3InpaintPipeline / FluxInpaintPipeline do:
    the unmasked part put back, noised to the next step, after each step. Compared as latents: diffusers 0.42's
    SD3 inpainting decodes without adding back the VAE's shift factor it subtracted when encoding (diffusers
    issue 13611, item 1; its txt2img
    and img2img add it), so its pixels are off by that shift; ours decode as SD3's other pipelines do."""
    import diffusers

    ours, theirs = request.getfixturevalue(name)
    side = ours.config.default_resolution
    image, mask = init_image(side), square_mask(side)
    settings = {"num_inference_steps": 4, "strength": 0.8}
    settings |= {"guidance_scale": 3.0} if name == "sd3" else {}
    got = ours(PROMPT, image=image, mask_image=mask, seed=8, output_type="latent", **settings).images
    cls = {"sd3": "StableDiffusion3InpaintPipeline", "flux": "FluxInpaintPipeline"}[name]
    inpaint = getattr(diffusers, cls)(**theirs.components)
    inpaint.set_progress_bar_config(disable=True)
    want = diffusers_images(inpaint, 8, "latent", prompt=PROMPT, image=image, mask_image=mask, **settings)
    want = want if name == "sd3" else unpack(want, got.shape)  # FLUX returns its latents packed
    assert mean_abs(got, want) <= TOLERANCE * float(np.abs(got).mean())


def test_flux_fill_inpaints_as_diffusers(tmp_path_factory: pytest.TempPathFactory) -> None:
    """FLUX.1 Fill: the transformer takes the masked image's latents and the mask's pixels beside its latents; a
    folder of FluxFillPipeline loads as FluxFillPipeline, inpaints and outpaints in parity with diffusers' (its
    default strength 1 and a partial one), and refuses a request without image and mask."""
    from .conftest import built, exported

    source = built("tiny-flux-fill", tmp_path_factory)
    ours = DiffusionPipeline.from_pretrained(exported(source, tmp_path_factory), provider="cpu")
    theirs = reference(source, "FluxFillPipeline")
    assert type(ours).__name__ == "FluxFillPipeline" and ours.config.inpainting
    side = ours.config.default_resolution
    image, outpaint = init_image(side), np.zeros((side, side), np.uint8)
    outpaint[:, side // 2 :] = 255
    for mask, strength in ((square_mask(side), 1.0), (Image.fromarray(outpaint), 0.7)):
        settings = {"num_inference_steps": 3, "guidance_scale": 30.0, "strength": strength}
        got = ours(PROMPT, image=image, mask_image=mask, seed=4, output_type="np", **settings).images
        want = diffusers_images(theirs, 4, prompt=PROMPT, image=image, mask_image=mask, **settings)
        assert mean_abs(got, want) <= TOLERANCE
    with pytest.raises(RequestError, match="image: this is an inpainting model"):
        ours.prepare(GenerationRequest(PROMPT))


def tiny_autoencoder(out: Path, scaling: float, shift: float) -> Path:
    """A TAESD3/TAEF1-class AutoencoderTiny (16 latent channels, with a scaling and a shift factor) at the tiny
    models' 1/2 scale, seeded."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    blocks = {"encoder_block_out_channels": (8, 8), "decoder_block_out_channels": (8, 8)}
    counts = {"num_encoder_blocks": (1, 1), "num_decoder_blocks": (1, 1)}
    AutoencoderTiny(latent_channels=16, scaling_factor=scaling, shift_factor=shift, **blocks, **counts).save_pretrained(
        out
    )
    return out


@pytest.mark.parametrize("name", ["flux"])  # SD3 (TAESD3) takes the same path: scaling and shift of the tiny VAE
def test_tiny_autoencoder_matches_diffusers(name: str, request, tmp_path: Path) -> None:
    """TAEF1-class tiny VAE exported beside the VAE (`--vae`): decoding and img2img encoding with its own scaling
    and shift, as diffusers' pipelines do with an AutoencoderTiny as their `vae`."""
    from diffusers import AutoencoderTiny

    from sd_onnx.exporter.convert import convert

    source = request.getfixturevalue(f"tiny_{name}_pipeline")
    cls = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}[name]
    tiny = tiny_autoencoder(tmp_path / "tiny-vae", 1.5, 0.1)
    convert(str(source), tmp_path / "onnx", vae=str(tiny), log=lambda line: None)
    ours = DiffusionPipeline.from_pretrained(tmp_path / "onnx", provider="cpu", vae="tiny")
    theirs = reference(source, cls)
    theirs.vae = AutoencoderTiny.from_pretrained(tiny)
    settings = {"num_inference_steps": 2} | ({"guidance_scale": 3.0} if name == "sd3" else {})
    got = ours(PROMPT, seed=4, output_type="np", **settings).images
    assert mean_abs(got, diffusers_images(theirs, 4, prompt=PROMPT, **settings)) <= TOLERANCE
    with pytest.raises(RequestError, match="vae_tiling: this model's autoencoder .tiny_vae_decoder. has no tiled"):
        ours(PROMPT, vae_tiling=True)
    image = init_image(ours.config.default_resolution)
    got = ours(PROMPT, image=image, strength=0.6, seed=4, output_type="np", **settings).images
    img2img = getattr(__import__("diffusers"), cls.replace("Pipeline", "Img2ImgPipeline"))(**theirs.components)
    img2img.set_progress_bar_config(disable=True)
    want = diffusers_images(img2img, 4, prompt=PROMPT, image=image, strength=0.6, **settings)
    assert mean_abs(got, want) <= TOLERANCE


def test_textual_inversion_files_are_skipped_with_a_reason_on_transformer_families(tiny_flux_export, tmp_path) -> None:
    from safetensors.numpy import save_file

    save_file({"emb_params": np.ones((1, 32), np.float32)}, str(tmp_path / "myword.safetensors"))
    pipe = DiffusionPipeline.from_pretrained(tiny_flux_export, provider="cpu", embeddings=tmp_path)
    assert pipe.embeddings == []
    assert pipe.skipped_embeddings == {"myword": "textual-inversion embeddings apply to SD 1.x/2.x and SDXL, not FLUX"}


def test_sd3_skip_layer_guidance_matches_diffusers(tiny_sd3_pipeline: Path, sd3, tmp_path: Path) -> None:
    """`sd-export convert --skip-layers` derives the transformer with those blocks skipped (sharing its weights,
    checked against PyTorch's skip_layers forward); skip_guidance_layers then guides as diffusers does, and
    changes the image. Layers the export did not skip, or an export without the graph, are refused by name."""
    from sd_onnx.exporter.convert import convert
    from sd_onnx.exporter.errors import ExportError
    from sd_onnx.runtime import Manifest

    out = tmp_path / "slg"
    convert(str(tiny_sd3_pipeline), out, skip_layers=(1,), log=lambda line: None)
    manifest = Manifest.load(out)
    manifest.verify(out)
    skip = manifest.components["transformer_skip"]
    assert manifest.config.skip_guidance_layers == [1] and skip.validation["max_abs_diff"] <= 1e-4
    assert sorted(skip.files) == ["transformer/model.onnx_data", "transformer/skip_layers.onnx"]  # shared weights
    ours = DiffusionPipeline.from_pretrained(out, provider="cpu")
    settings = {"num_inference_steps": 10, "guidance_scale": 4.0, "height": 64, "width": 64}
    slg = {"skip_guidance_layers": [1], "skip_layer_guidance_stop": 0.5}
    got = ours(PROMPT, seed=1, output_type="np", **settings, **slg).images
    assert mean_abs(got, diffusers_images(sd3[1], 1, prompt=PROMPT, **settings, **slg)) <= TOLERANCE
    assert mean_abs(got, ours(PROMPT, seed=1, output_type="np", **settings).images) > 1e-3
    with pytest.raises(RequestError, match=r"^skip_guidance_layers: this export skips blocks \[1\], got \[0\]"):
        ours.prepare(GenerationRequest(PROMPT, skip_guidance_layers=(0,)))
    with pytest.raises(RequestError, match=r"^skip_guidance_layers: applies with classifier-free guidance"):
        ours.prepare(GenerationRequest(PROMPT, skip_guidance_layers=(1,), guidance_scale=1.0))
    with pytest.raises(RequestError, match="^skip_layer_guidance_start: no step of 2 lies between 0.01 and 0.2"):
        ours.prepare(GenerationRequest(PROMPT, skip_guidance_layers=(1,), guidance_scale=4.0, steps=2))
    with pytest.raises(RequestError, match="^skip_layer_guidance_start: must be below skip_layer_guidance_stop"):
        ours.prepare(GenerationRequest(PROMPT, skip_guidance_layers=(1,), skip_layer_guidance_start=0.5))
    with pytest.raises(RequestError, match="^skip_guidance_layers: this export has no skip-layer graph"):
        sd3[0].prepare(GenerationRequest(PROMPT, skip_guidance_layers=(1,)))
    lines = tmp_path / "prompts.jsonl"  # sd-run batch lines take the same fields
    lines.write_text('{"prompt": "a", "steps": 10, "guidance_scale": 4, "seed": 1, "skip_guidance_layers": [1]}\n')
    from click.testing import CliRunner

    from sd_onnx.runtime.cli import main

    result = CliRunner().invoke(main, ["batch", str(lines), str(tmp_path / "images"), "-m", str(out)])
    assert result.exit_code == 0, result.output
    assert 'SLG: "layers 1, scale 2.8' in Image.open(tmp_path / "images" / "line-1.png").text["parameters"]
    with pytest.raises(ExportError, match=r"--skip-layers: the transformer has blocks 0\.\.1, got \[2\]"):
        convert(str(tiny_sd3_pipeline), tmp_path / "bad", skip_layers=(2,), log=lambda line: None)


def test_skip_layers_are_sd3_only(flux, tiny_flux_pipeline: Path, tmp_path: Path) -> None:
    from sd_onnx.exporter.convert import convert
    from sd_onnx.exporter.errors import ExportError

    with pytest.raises(RequestError, match="^skip_guidance_layers: applies to SD3 models only"):
        flux[0].prepare(GenerationRequest(PROMPT, skip_guidance_layers=(0,)))
    with pytest.raises(ExportError, match="--skip-layers: skip-layer guidance is SD3's; this model is flux"):
        convert(str(tiny_flux_pipeline), tmp_path / "bad", skip_layers=(0,), log=lambda line: None)
    assert not (tmp_path / "bad").exists()
