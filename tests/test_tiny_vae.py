"""Tiny autoencoders (TAESD-style AutoencoderTiny) against diffusers: exported beside the VAE with `--vae`, or as
the pipeline's own VAE; txt2img and img2img through the runtime's `vae="tiny"` match diffusers with the same
AutoencoderTiny."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sd_onnx.runtime import DiffusionPipeline, ManifestError

PROMPT = "a red circle on a blue background"
# TAESD's layout at test size: 4 levels of a factor 2 would not match the tiny pipeline's 2-level VAE (factor 2).
TINY_AUTOENCODER = {
    "encoder_block_out_channels": (8, 8),
    "decoder_block_out_channels": (8, 8),
    "num_encoder_blocks": (1, 1),
    "num_decoder_blocks": (1, 1),
}


@pytest.fixture(scope="module")
def taesd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from diffusers import AutoencoderTiny

    torch.manual_seed(1)
    folder = tmp_path_factory.mktemp("taesd") / "taesd"
    AutoencoderTiny(**TINY_AUTOENCODER).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def with_tiny(tiny_pipeline: Path, taesd: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sd_onnx.exporter.convert import convert

    out = tmp_path_factory.mktemp("with-tiny") / "onnx"
    convert(str(tiny_pipeline), out, vae=str(taesd), log=lambda line: None)
    return out


def reference(source: Path, taesd: Path):
    from diffusers import AutoencoderTiny, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(source, safety_checker=None, requires_safety_checker=False)
    pipe.vae = AutoencoderTiny.from_pretrained(taesd)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_tiny_vae_beside_the_full_one_matches_diffusers(tiny_pipeline: Path, taesd: Path, with_tiny: Path) -> None:
    from diffusers import StableDiffusionImg2ImgPipeline

    ours = DiffusionPipeline.from_pretrained(with_tiny, provider="cpu", vae="tiny")
    manifest = ours.manifest
    assert {"tiny_vae_decoder", "tiny_vae_encoder", "vae_decoder"} <= set(manifest.components)
    assert manifest.config.tiny_vae_scaling_factor == 1.0 and manifest.config.vae_kind == "full"
    assert [t.name for t in manifest.components["tiny_vae_encoder"].outputs] == ["latent_sample"]
    pipe = reference(tiny_pipeline, taesd)
    settings = {"num_inference_steps": 4, "guidance_scale": 6.0, "output_type": "np"}
    expected = pipe(PROMPT, generator=torch.Generator().manual_seed(3), **settings).images
    got = ours(PROMPT, seed=3, **settings).images
    assert np.abs(got - expected).mean() <= 1 / 255
    full = DiffusionPipeline.from_pretrained(with_tiny, provider="cpu")(PROMPT, seed=3, **settings).images
    assert np.abs(full - got).mean() > 1 / 255  # the tiny decoder is the one used
    init = Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8))
    img2img = StableDiffusionImg2ImgPipeline(**pipe.components)
    expected = img2img(PROMPT, image=init, strength=0.6, generator=torch.Generator().manual_seed(4), **settings).images
    got = ours(PROMPT, image=init, strength=0.6, seed=4, **settings).images
    assert np.abs(got - expected).mean() <= 1 / 255


def test_a_pipeline_whose_own_vae_is_tiny(tiny_pipeline: Path, taesd: Path, tmp_path: Path) -> None:
    from sd_onnx.exporter.convert import convert

    pipe = reference(tiny_pipeline, taesd)
    pipe.save_pretrained(tmp_path / "pipeline")
    convert(str(tmp_path / "pipeline"), tmp_path / "onnx", log=lambda line: None)
    ours = DiffusionPipeline.from_pretrained(tmp_path / "onnx", provider="cpu")
    assert ours.config.vae_kind == "tiny" and ours.vae.tiny
    settings = {"num_inference_steps": 3, "guidance_scale": 6.0, "output_type": "np"}
    expected = pipe(PROMPT, generator=torch.Generator().manual_seed(5), **settings).images
    assert np.abs(ours(PROMPT, seed=5, **settings).images - expected).mean() <= 1 / 255
    with pytest.raises(ManifestError, match="its only VAE is a tiny autoencoder"):
        DiffusionPipeline.from_pretrained(tmp_path / "onnx", provider="cpu", vae="full")


def test_tiny_vae_errors(tiny_pipeline: Path, tiny_export: Path, tmp_path: Path) -> None:
    from diffusers import AutoencoderTiny

    from sd_onnx.exporter.convert import convert
    from sd_onnx.exporter.errors import ExportError

    with pytest.raises(ManifestError, match="has no tiny autoencoder"):
        DiffusionPipeline.from_pretrained(tiny_export, provider="cpu", vae="tiny")
    with pytest.raises(ValueError, match="vae must be one of auto, full, tiny"):
        DiffusionPipeline.from_pretrained(tiny_export, provider="cpu", vae="small")
    with pytest.raises(ExportError, match="not a diffusers AutoencoderTiny folder"):
        convert(str(tiny_pipeline), tmp_path / "a", vae=str(tiny_pipeline / "vae"), log=lambda line: None)
    AutoencoderTiny().save_pretrained(tmp_path / "taesd-sd")  # SD's TAESD: 1/8 scale, not this model's 1/2
    with pytest.raises(ExportError, match="at 1/8 scale; this model's VAE makes 4-channel ones at 1/2"):
        convert(str(tiny_pipeline), tmp_path / "b", vae=str(tmp_path / "taesd-sd"), log=lambda line: None)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_cli_tiny_vae_and_live_preview(with_tiny: Path, tiny_export: Path, taesd: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner
    from diffusers import AutoencoderTiny

    from sd_onnx.runtime.cli import main

    args = ["prompt", "x", "-m", str(with_tiny), "--steps", "4", "--seed", "7", "-o", str(tmp_path / "o.png")]
    result = CliRunner().invoke(main, [*args, "--vae", "tiny", "--preview", str(tmp_path / "p.png"),
                                       "--preview-every", "2"])  # fmt: skip
    assert result.exit_code == 0, result.output
    pipe = DiffusionPipeline.from_pretrained(with_tiny, vae="tiny")
    final = pipe("x", num_inference_steps=4, seed=7, output_type="latent").images
    assert np.array_equal(
        np.asarray(Image.open(tmp_path / "o.png")), np.asarray(pipe.decode_latents(final)[0] * 255 + 0.5, np.uint8)
    )
    # The last preview is the final latents through the tiny decoder, as diffusers' AutoencoderTiny decodes them.
    with torch.no_grad():
        expected = AutoencoderTiny.from_pretrained(taesd).decode(torch.from_numpy(final)).sample.numpy()
    preview = np.asarray(Image.open(tmp_path / "p.png"), np.float32) / 255
    assert np.abs(preview - np.clip(expected[0].transpose(1, 2, 0) / 2 + 0.5, 0, 1)).mean() <= 1 / 255
    result = CliRunner().invoke(main, ["prompt", "x", "-m", str(tiny_export), "--preview", str(tmp_path / "q.png")])
    assert result.exit_code != 0 and "--preview: this model has no tiny autoencoder" in result.output


def test_benchmark_times_the_tiny_decoder_beside_the_full_one(with_tiny: Path) -> None:
    from sd_onnx.benchmarks.components import compare_components

    report = compare_components({"model": with_tiny}, size=32, rounds=1)
    assert set(report["vae_decoder"]["median_s"]) == {"model", "model-tiny"}
    assert set(report["unet"]["median_s"]) == {"model"}
