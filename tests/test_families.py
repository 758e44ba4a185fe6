"""Other SD-architecture families against diffusers on the same weights: SD 2.x (v-prediction, linear
projections, per-block head counts, a tokenizer that pads with "!"), LCM (a UNet distilled with a guidance
embedding) and Turbo-style one-step, guidance-free sampling."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sd_onnx.runtime import StableDiffusionPipeline

from .test_pipeline import DIFFUSERS_NAMES

PROMPT, NEGATIVE = "a photo of an astronaut riding a horse", "blurry"


def build(out: Path, recipe_changes: dict, scheduler, pad_token: str | None = None, pipeline_class: str | None = None):
    from transformers import CLIPTokenizer

    from sd_onnx.models.build import TINY, create_modules, save_pipeline
    from sd_onnx.models.clip_vocab import write_clip_tokenizer_files

    recipe = {part: {**TINY[part], **recipe_changes.get(part, {})} for part in TINY}
    tokenizer = None
    if pad_token:
        write_clip_tokenizer_files(out.parent / "tokenizer-src")
        tokenizer = CLIPTokenizer.from_pretrained(out.parent / "tokenizer-src", pad_token=pad_token)
    torch.manual_seed(0)
    save_pipeline(*create_modules(recipe), out, scheduler=scheduler, tokenizer=tokenizer)
    if pipeline_class:
        index = json.loads((out / "model_index.json").read_text())
        (out / "model_index.json").write_text(json.dumps({**index, "_class_name": pipeline_class}))
    return out


def export(source: Path, out: Path, **options) -> StableDiffusionPipeline:
    from sd_onnx.exporter.convert import convert

    convert(str(source), out, log=lambda line: None, **options)
    return StableDiffusionPipeline.from_pretrained(out, provider="cpu")


def reference(folder: Path, cls_name: str = "StableDiffusionPipeline"):
    import diffusers

    pipe = getattr(diffusers, cls_name).from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, StableDiffusionPipeline]:
    from diffusers import EulerDiscreteScheduler

    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type="v_prediction",
        timestep_spacing="leading", steps_offset=1,
    )  # fmt: skip
    changes = {"text_encoder": {"hidden_act": "gelu"},
               "unet": {"use_linear_projection": True, "attention_head_dim": (2, 4)}}  # fmt: skip
    root = tmp_path_factory.mktemp("sd2")
    source = build(root / "pipeline", changes, scheduler, pad_token="!")
    return source, export(source, root / "onnx")


@pytest.mark.parametrize("scheduler", ["euler", "euler_a", "dpmpp_2m", "ddim"])
def test_sd2_v_prediction_matches_diffusers(sd2, scheduler: str) -> None:
    import diffusers

    source, ours = sd2
    assert ours.config.prediction_type == "v_prediction"
    assert ours.tokenizer(["a cat"])[0, -1] == ours.tokenizer.pad_id == ours.tokenizer.tokenizer.token_to_id("!")
    pipe = reference(source)
    pipe.scheduler = getattr(diffusers, DIFFUSERS_NAMES[scheduler]).from_config(pipe.scheduler.config)
    settings = {"num_inference_steps": 6, "guidance_scale": 7.5}
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    generator = torch.Generator().manual_seed(8)  # Euler a's step noise; the latents are given
    expected = pipe(PROMPT, negative_prompt=NEGATIVE, latents=latents.clone(), generator=generator,
                    output_type="np", **settings).images  # fmt: skip
    got = ours(PROMPT, negative_prompt=NEGATIVE, latents=latents.numpy(), seed=8, scheduler=scheduler,
               output_type="np", **settings).images  # fmt: skip
    assert np.abs(got - expected).mean() <= 1 / 255
    seeded = pipe(PROMPT, generator=torch.Generator().manual_seed(21), output_type="np", **settings).images
    assert (
        np.abs(ours(PROMPT, seed=21, scheduler=scheduler, output_type="np", **settings).images - seeded).mean()
        <= 1 / 255
    )


@pytest.fixture(scope="module")
def lcm(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, StableDiffusionPipeline]:
    from diffusers import LCMScheduler

    scheduler = LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    root = tmp_path_factory.mktemp("lcm")
    source = build(root / "pipeline", {"unet": {"time_cond_proj_dim": 16}}, scheduler,
                   pipeline_class="LatentConsistencyModelPipeline")  # fmt: skip
    return source, export(source, root / "onnx")


def test_lcm_feeds_the_guidance_embedding_and_matches_diffusers(lcm) -> None:
    source, ours = lcm
    unet = ours.manifest.components["unet"]
    assert [t.name for t in unet.inputs][-1] == "timestep_cond" and unet.inputs[-1].shape == ["batch", 16]
    assert ours.config.default_steps == 4 and ours.config.guidance_scale == 8.5  # diffusers' LCM defaults
    pipe = reference(source, "LatentConsistencyModelPipeline")
    expected = pipe(PROMPT, generator=torch.Generator().manual_seed(4), output_type="np").images
    got = ours(PROMPT, seed=4, output_type="np")
    assert got.request.steps == 4 and np.abs(got.images - expected).mean() <= 1 / 255
    other = pipe(PROMPT, generator=torch.Generator().manual_seed(4), guidance_scale=3.0, num_inference_steps=2,
                 output_type="np").images  # fmt: skip
    got = ours(PROMPT, seed=4, guidance_scale=3.0, num_inference_steps=2, output_type="np").images
    assert np.abs(got - other).mean() <= 1 / 255
    assert np.abs(other - expected).mean() > 1 / 255  # the embedding and the steps matter


def test_turbo_style_one_step_without_guidance(tiny_pipeline: Path, tmp_path: Path) -> None:
    """SD-Turbo's recipe: Euler a on trailing timesteps, one step, guidance 0, recorded as the model's
    defaults so a plain call needs no settings."""
    from diffusers import EulerAncestralDiscreteScheduler

    scheduler = EulerAncestralDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                timestep_spacing="trailing")  # fmt: skip
    source = build(tmp_path / "pipeline", {}, scheduler)
    ours = export(source, tmp_path / "onnx", default_steps=1, guidance_scale=0.0)
    pipe = reference(source)
    expected = pipe(PROMPT, num_inference_steps=1, guidance_scale=0.0, generator=torch.Generator().manual_seed(6),
                    output_type="np").images  # fmt: skip
    got = ours(PROMPT, seed=6, output_type="np")
    assert got.request.steps == 1 and got.request.guidance_scale == 0.0
    assert np.abs(got.images - expected).mean() <= 1 / 255


def opened(built: tuple[Path, Path]) -> tuple[Path, StableDiffusionPipeline]:
    """(diffusers folder, the runtime's pipeline on its export)."""
    source, folder = built
    return source, StableDiffusionPipeline.from_pretrained(folder, provider="cpu")


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl: tuple[Path, Path]) -> tuple[Path, StableDiffusionPipeline]:
    return opened(tiny_sdxl)


def test_sdxl_exports_both_encoders_with_optimums_names(sdxl) -> None:
    _, ours = sdxl
    manifest = ours.manifest
    assert type(ours).__name__ == "StableDiffusionXLPipeline" and manifest.model_family == "sdxl"
    assert ours.config.pooled_dim == 32 and ours.config.time_ids_count == 6 and ours.config.embedding_dim == 64
    assert ours.config.force_zeros_for_empty_prompt
    assert [t.name for t in manifest.components["unet"].inputs] == [
        "sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"
    ]  # fmt: skip
    outputs = [t.name for t in manifest.components["text_encoder_2"].outputs]
    assert outputs[:2] == ["text_embeds", "last_hidden_state"] and outputs[-1] == "hidden_states.3"
    assert ours.tokenizer_2.pad_id == ours.tokenizer_2.tokenizer.token_to_id("!")


@pytest.mark.parametrize("scheduler", ["euler", "euler_a", "dpmpp_2m", "ddim"])
def test_sdxl_matches_diffusers(sdxl, scheduler: str) -> None:
    import diffusers

    source, ours = sdxl
    pipe = reference(source, "StableDiffusionXLPipeline")
    pipe.scheduler = getattr(diffusers, DIFFUSERS_NAMES[scheduler]).from_config(pipe.scheduler.config)
    for extra in ({}, {"negative_prompt": NEGATIVE, "num_images_per_prompt": 2}):
        settings = {"num_inference_steps": 5, "guidance_scale": 5.0, "height": 32, "width": 48, **extra}
        expected = pipe(PROMPT, generator=torch.Generator().manual_seed(3), output_type="np", **settings).images
        got = ours(PROMPT, seed=3, scheduler=scheduler, output_type="np", **settings).images
        assert got.shape == expected.shape and np.abs(got - expected).mean() <= 1 / 255, extra


def test_sdxl_through_the_cli(sdxl, tmp_path: Path) -> None:
    from click.testing import CliRunner
    from PIL import Image

    from sd_onnx.runtime.cli import main

    folder = sdxl[1].folder
    result = CliRunner().invoke(
        main, ["prompt", "a cat", "-m", str(folder), "-o", str(tmp_path / "x.png"), "--steps", "2"]
    )
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "x.png").size == (32, 32)
    result = CliRunner().invoke(main, ["info", str(folder)])
    assert result.exit_code == 0 and "family: sdxl" in result.output and "text_encoder_2:" in result.output


def test_sdxl_img2img_matches_diffusers(sdxl) -> None:
    from PIL import Image

    source, ours = sdxl
    pipe = reference(source, "StableDiffusionXLImg2ImgPipeline")
    init = Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8))
    settings = {"image": init, "strength": 0.6, "num_inference_steps": 10, "guidance_scale": 5.0}
    expected = pipe(PROMPT, generator=torch.Generator().manual_seed(9), output_type="np", **settings).images
    got = ours(PROMPT, seed=9, scheduler="euler", output_type="np", **settings).images
    assert np.abs(got - expected).mean() <= 1 / 255


def test_sdxl_second_prompts_and_size_conditioning_match_diffusers(sdxl) -> None:
    from sd_onnx.runtime import DiffusionPipeline

    source, ours = sdxl
    assert type(DiffusionPipeline.from_pretrained(ours.folder, provider="cpu")) is type(ours)
    pipe = reference(source, "StableDiffusionXLPipeline")
    settings = {"num_inference_steps": 4, "guidance_scale": 5.0, "prompt_2": "an oil painting",
                "negative_prompt": "blurry", "negative_prompt_2": "dark", "original_size": (64, 96),
                "target_size": (40, 24), "crops_coords_top_left": (8, 4)}  # fmt: skip
    expected = pipe(PROMPT, generator=torch.Generator().manual_seed(2), output_type="np", **settings).images
    got = ours(PROMPT, seed=2, scheduler="euler", output_type="np", **settings).images
    assert np.abs(got - expected).mean() <= 1 / 255
    plain = ours(PROMPT, seed=2, scheduler="euler", output_type="np", num_inference_steps=4, guidance_scale=5.0)
    assert np.abs(plain.images - got).mean() > 1 / 255  # the conditioning is used
    negative_sizes = {"negative_original_size": (48, 32), "negative_target_size": (24, 40),
                      "negative_crops_coords_top_left": (2, 6)}  # fmt: skip
    pixels = np.random.default_rng(1).uniform(-1, 1, (1, 3, 32, 32)).astype(np.float32)
    for images in ({}, {"image": pixels, "strength": 0.7}):
        pipe = reference(source, "StableDiffusionXLImg2ImgPipeline" if images else "StableDiffusionXLPipeline")
        reference_images = {**images, "image": torch.from_numpy(pixels)} if images else {}
        expected = pipe(PROMPT, generator=torch.Generator().manual_seed(2), output_type="np", **settings,
                        **negative_sizes, **reference_images).images  # fmt: skip
        got = ours(PROMPT, seed=2, scheduler="euler", output_type="np", **settings, **negative_sizes, **images).images
        assert np.abs(got - expected).mean() <= 1 / 255, images.keys()


def test_sdxl_fields_are_refused_on_other_models(tiny_export: Path) -> None:
    pipe = StableDiffusionPipeline.from_pretrained(tiny_export, provider="cpu")
    with pytest.raises(ValueError, match="prompt_2: applies to SDXL, FLUX, SD3 models only"):
        pipe(PROMPT, prompt_2="x", num_inference_steps=1)


def test_sdxl_fp16_keeps_the_vae_that_overflows_in_fp32(sdxl, tmp_path: Path) -> None:
    source, fp32 = sdxl
    fp16 = export(source, tmp_path / "fp16", precision="fp16", components=("text_encoder", "text_encoder_2", "unet",
                                                                           "vae_decoder"))  # fmt: skip
    precisions = {name: info.precision for name, info in fp16.manifest.components.items()}
    assert precisions == {"text_encoder": "fp16", "text_encoder_2": "fp16", "unet": "fp16", "vae_decoder": "fp32"}
    settings = {"num_inference_steps": 3, "seed": 1, "output_type": "np"}
    assert np.abs(fp16(PROMPT, **settings).images - fp32(PROMPT, **settings).images).max() < 0.02


@pytest.fixture(scope="module")
def refiner(tiny_sdxl_refiner: tuple[Path, Path]) -> tuple[Path, StableDiffusionPipeline]:
    return opened(tiny_sdxl_refiner)


def test_sdxl_refiner_img2img_matches_diffusers(refiner) -> None:
    """The second text encoder only, an aesthetic score among 5 time ids (negative half: the negative score)."""
    from PIL import Image

    source, ours = refiner
    assert set(ours.manifest.components) == {"text_encoder_2", "unet", "vae_decoder", "vae_encoder"}
    assert ours.config.time_ids_count == 5 and not ours.config.force_zeros_for_empty_prompt
    pipe = reference(source, "StableDiffusionXLImg2ImgPipeline")
    init = Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8))
    for extra in ({}, {"negative_prompt": NEGATIVE, "aesthetic_score": 7.0, "negative_aesthetic_score": 2.0}):
        settings = {"image": init, "strength": 0.6, "num_inference_steps": 10, "guidance_scale": 5.0, **extra}
        expected = pipe(PROMPT, generator=torch.Generator().manual_seed(9), output_type="np", **settings).images
        got = ours(PROMPT, seed=9, scheduler="euler", output_type="np", **settings).images
        assert np.abs(got - expected).mean() <= 1 / 255, extra
    sizes = {"original_size": (64, 48), "crops_coords_top_left": (4, 8), "negative_original_size": (24, 24)}
    settings = {"image": init, "strength": 0.6, "num_inference_steps": 6, "guidance_scale": 5.0, **sizes}
    expected = pipe(PROMPT, generator=torch.Generator().manual_seed(9), output_type="np", **settings).images
    got = ours(PROMPT, seed=9, scheduler="euler", output_type="np", **settings).images
    assert np.abs(got - expected).mean() <= 1 / 255


@pytest.mark.parametrize("scheduler", ["euler", "dpmpp_2m"])
def test_sdxl_base_and_refiner_ensemble_matches_diffusers(sdxl, refiner, scheduler: str) -> None:
    """diffusers' ensemble of experts: the base denoises the first 70 % and hands its latents over."""
    import diffusers

    (base_source, base), (refiner_source, ours_refiner) = sdxl, refiner
    pipes = (
        reference(base_source, "StableDiffusionXLPipeline"),
        reference(refiner_source, "StableDiffusionXLImg2ImgPipeline"),
    )
    for pipe in pipes:
        pipe.scheduler = getattr(diffusers, DIFFUSERS_NAMES[scheduler]).from_config(pipe.scheduler.config)
    settings = {"num_inference_steps": 10, "guidance_scale": 5.0}
    handed = pipes[0](PROMPT, generator=torch.Generator().manual_seed(4), denoising_end=0.7, output_type="latent",
                      height=32, width=48, **settings).images  # fmt: skip
    expected = pipes[1](PROMPT, generator=torch.Generator().manual_seed(4), denoising_start=0.7, image=handed,
                        output_type="np", **settings).images  # fmt: skip
    latents = base(PROMPT, seed=4, scheduler=scheduler, denoising_end=0.7, output_type="latent", height=32, width=48,
                   **settings).images  # fmt: skip
    assert latents.shape == tuple(handed.shape) and np.abs(latents - handed.numpy()).max() < 1e-3
    got = ours_refiner(PROMPT, seed=4, scheduler=scheduler, denoising_start=0.7, image=latents, output_type="np",
                       **settings).images  # fmt: skip
    assert got.shape == expected.shape == (1, 32, 48, 3) and np.abs(got - expected).mean() <= 1 / 255


def test_ensemble_fields_are_checked(sdxl, refiner, tiny_export: Path) -> None:
    base, ours_refiner = sdxl[1], refiner[1]
    with pytest.raises(ValueError, match="denoising_start: continues a denoising"):
        ours_refiner(PROMPT, denoising_start=0.5)
    with pytest.raises(ValueError, match="denoising_start: 0.8 must be below denoising_end 0.5"):
        base(PROMPT, image=np.zeros((1, 4, 16, 16), np.float32), denoising_start=0.8, denoising_end=0.5)
    with pytest.raises(ValueError, match=r"denoising_end: must be a fraction in \(0, 1\), got 1"):
        base(PROMPT, denoising_end=1.0)
    with pytest.raises(ValueError, match="height: is 64 but the image array makes it 32"):
        ours_refiner(PROMPT, image=np.zeros((1, 4, 16, 16), np.float32), height=64, denoising_start=0.5)
    with pytest.raises(ValueError, match="image: has 3 latents for 2 images"):
        ours_refiner(PROMPT, image=np.zeros((3, 4, 16, 16), np.float32), num_images_per_prompt=2)
    with pytest.raises(ValueError, match="denoising_end: applies to SDXL models only"):
        StableDiffusionPipeline.from_pretrained(tiny_export, provider="cpu")(PROMPT, denoising_end=0.5)
