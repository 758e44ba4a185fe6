"""Inpainting against diffusers' StableDiffusionInpaintPipeline on the same weights and seed: an inpainting UNet
(9 input channels) and an ordinary one (the original re-noised outside the mask after each step)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sd_onnx.runtime import AutoPipelineForInpainting, DiffusionPipeline
from sd_onnx.runtime.image import from_pil

from .test_pipeline import DIFFUSERS_NAMES

PROMPT = "a red circle on a blue background"


def picture(seed: int, mode: str = "RGB", size: tuple[int, int] = (32, 32)) -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode == "L":  # a mask: a white rectangle (repaint) on black, with soft grey edges to binarize
        mask = np.zeros((32, 32), np.float32)
        mask[8:24, 4:20] = 1.0
        mask[8:24, 20] = 0.6
        mask[7, 4:20] = 0.4
        return Image.fromarray((mask * 255).astype(np.uint8), "L")
    return Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(np.uint8))


def box_mask(size: tuple[int, int], box: tuple[int, int, int, int]) -> Image.Image:
    """Black with a white box (left, top, right, bottom) to repaint."""
    mask = Image.new("L", size)
    mask.paste(255, box)
    return mask


def reference(folder: Path, scheduler: str):
    import diffusers

    pipe = diffusers.StableDiffusionInpaintPipeline.from_pretrained(
        folder, safety_checker=None, requires_safety_checker=False
    )
    pipe.scheduler = getattr(diffusers, DIFFUSERS_NAMES[scheduler]).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("unet", ["tiny_inpaint", "tiny_pipeline"])
@pytest.mark.parametrize("scheduler", ["euler", "ddim", "dpmpp_2m"])
def test_inpainting_matches_diffusers(unet: str, scheduler: str, request: pytest.FixtureRequest) -> None:
    if unet == "tiny_inpaint":
        source, folder = request.getfixturevalue("tiny_inpaint")
    else:
        source, folder = request.getfixturevalue("tiny_pipeline"), request.getfixturevalue("tiny_export")
    pipe, ours = reference(source, scheduler), AutoPipelineForInpainting.from_pretrained(folder, provider="cpu")
    assert ours.config.inpainting == (unet == "tiny_inpaint")
    expected_class = "StableDiffusionInpaintPipeline" if unet == "tiny_inpaint" else "StableDiffusionPipeline"
    assert type(ours).__name__ == expected_class
    image, mask = picture(0), picture(0, "L")
    for extra in ({}, {"strength": 0.6, "negative_prompt": "blurry", "num_images_per_prompt": 2}):
        settings = {"image": image, "mask_image": mask, "num_inference_steps": 6, "guidance_scale": 6.0, **extra}
        expected = pipe(PROMPT, generator=torch.Generator().manual_seed(5), output_type="np", **settings).images
        got = ours(PROMPT, seed=5, scheduler=scheduler, output_type="np", **settings).images
        assert got.shape == expected.shape and np.abs(got - expected).mean() <= 1 / 255, extra
    if unet == "tiny_pipeline":  # outside the mask the original comes back (through the VAE), inside it does not
        kept, repainted = np.asarray(mask) < 128, np.asarray(mask) >= 128
        plain = ours.decode_latents(ours.encode_image(from_pil(image, 32, 32), _zero_noise()))[0]
        assert np.abs(got[0] - plain)[kept].mean() < np.abs(got[0] - plain)[repainted].mean()


def _zero_noise():
    class Zero:
        def randn(self, shape):
            return np.zeros(shape, np.float32)

    return Zero()


def test_mask_crop_geometry_matches_diffusers() -> None:
    """The box around the mask and the two aspect-keeping resizes, pixel for pixel, over many shapes."""
    from diffusers.image_processor import VaeImageProcessor

    from sd_onnx.runtime.inpaint import crop_region, resize_cover, resize_fill

    processor = VaeImageProcessor()
    rng = np.random.default_rng(0)
    for _ in range(150):
        w, h = (int(v) for v in rng.integers(8, 90, 2))
        left, top = int(rng.integers(0, w)), int(rng.integers(0, h))
        box = (left, top, int(rng.integers(left + 1, w + 1)), int(rng.integers(top + 1, h + 1)))
        mask, pad = box_mask((w, h), box), int(rng.integers(0, 12))
        width, height = (int(v) * 8 for v in rng.integers(2, 9, 2))
        region = crop_region(mask, width, height, pad)
        assert region == processor.get_crop_region(mask, width, height, pad=pad), (w, h, box, pad, width, height)
        image = picture(int(rng.integers(1000)), size=(w, h))
        fill, cover = resize_fill(image, width, height), resize_cover(image, width, height)
        assert np.array_equal(np.asarray(fill), np.asarray(processor._resize_and_fill(image, width, height)))
        assert np.array_equal(np.asarray(cover), np.asarray(processor._resize_and_crop(image, width, height)))


@pytest.mark.parametrize("unet", ["tiny_inpaint", "tiny_pipeline"])
def test_padding_mask_crop_matches_diffusers(unet: str, request: pytest.FixtureRequest) -> None:
    """Only a box around a small mask in a larger, non-square picture is inpainted at 32x32 and pasted back."""
    if unet == "tiny_inpaint":
        source, folder = request.getfixturevalue("tiny_inpaint")
    else:
        source, folder = request.getfixturevalue("tiny_pipeline"), request.getfixturevalue("tiny_export")
    pipe, ours = reference(source, "euler"), AutoPipelineForInpainting.from_pretrained(folder, provider="cpu")
    image, mask = picture(7, size=(56, 40)), box_mask((56, 40), (30, 6, 41, 14))
    settings = {"image": image, "mask_image": mask, "num_inference_steps": 5, "padding_mask_crop": 3,
                "height": 32, "width": 32, "strength": 0.8}  # fmt: skip
    expected = pipe(PROMPT, generator=torch.Generator().manual_seed(4), **settings).images[0]
    got = ours(PROMPT, seed=4, scheduler="euler", **settings)
    assert got.images[0].size == image.size == expected.size
    diff = np.abs(np.asarray(got.images[0], np.float32) - np.asarray(expected, np.float32))
    assert diff.mean() <= 1.0, diff.mean()
    outside = np.asarray(mask) == 0  # the original is kept, to the pixel, wherever nothing was masked
    assert np.array_equal(np.asarray(got.images[0])[outside], np.asarray(image)[outside])
    assert got.parameters["Inpaint area"] == "Only masked" and got.parameters["Masked area padding"] == 3
    as_array = ours(PROMPT, seed=4, scheduler="euler", output_type="np", **settings).images
    assert as_array.shape == (1, 40, 56, 3) and np.allclose(as_array[0] * 255, np.asarray(got.images[0]))


def test_paste_back_keeps_what_is_not_masked(tiny_export: Path) -> None:
    """A1111's overlay on a 4-channel model at strength 1: outside a hard mask the original to the pixel, inside it
    the decoded result; a blurred mask blends the two toward its edge. The default stays diffusers'."""
    pipe = DiffusionPipeline.from_pretrained(tiny_export, provider="cpu")
    image, mask = picture(9), box_mask((32, 32), (0, 0, 16, 32))  # the left half repainted
    settings = {"image": image, "mask_image": mask, "num_inference_steps": 4, "seed": 3}
    plain = pipe(PROMPT, **settings)
    pasted = pipe(PROMPT, paste_back=True, **settings)
    original, result, got = np.asarray(image), np.asarray(plain.images[0]), np.asarray(pasted.images[0])
    kept = np.asarray(mask) == 0
    assert np.abs(result.astype(int) - original)[kept].mean() > 1  # diffusers: the VAE's round trip
    assert np.array_equal(got[kept], original[kept]) and np.array_equal(got[~kept], result[~kept])
    assert pasted.parameters["Paste back"] is True and "Paste back" not in plain.parameters
    as_array = pipe(PROMPT, paste_back=True, output_type="np", **settings).images
    assert np.array_equal(np.round(as_array[0] * 255).astype(np.uint8), got)
    # Blurred: A1111's mask_for_overlay is the blurred mask doubled, so the result shows fully from half-way in.
    from sd_onnx.runtime.inpaint import blurred

    soft = np.asarray(blurred(mask, 3), np.float32) * 2
    blended = pipe(PROMPT, paste_back=True, mask_blur=3, **settings)
    plain_blurred = np.asarray(pipe(PROMPT, mask_blur=3, **settings).images[0]).astype(int)
    got = np.asarray(blended.images[0]).astype(int)
    assert np.array_equal(got[soft == 0], original[soft == 0]) and np.array_equal(got[soft >= 255], plain_blurred[
        soft >= 255])  # fmt: skip
    edge = (soft > 0) & (soft < 255)
    low, high = np.minimum(original, plain_blurred)[edge], np.maximum(original, plain_blurred)[edge]
    assert edge.sum() > 50 and ((got[edge] >= low - 1) & (got[edge] <= high + 1)).all()
    assert (got[edge] != original[edge]).any() and (got[edge] != plain_blurred[edge]).any()


def test_inpainting_requests_are_checked(tiny_inpaint: tuple[Path, Path], tiny_export: Path) -> None:
    inpaint = DiffusionPipeline.from_pretrained(tiny_inpaint[1], provider="cpu")
    plain = DiffusionPipeline.from_pretrained(tiny_export, provider="cpu")
    with pytest.raises(ValueError, match="image: this is an inpainting model: give an image and a mask_image"):
        inpaint(PROMPT, num_inference_steps=1)
    with pytest.raises(ValueError, match="mask_image: this is an inpainting model: give a mask_image"):
        inpaint(PROMPT, image=picture(0), num_inference_steps=1)
    with pytest.raises(ValueError, match="mask_image: masks an init image: give the image to inpaint too"):
        plain(PROMPT, mask_image=picture(0, "L"), num_inference_steps=1)
    with pytest.raises(ValueError, match=r"mask_image: must be a PIL image or a \(1, 1, H, W\) array"):
        plain(PROMPT, image=picture(0), mask_image=np.ones((32, 32)), num_inference_steps=1)
    with pytest.raises(ValueError, match="mask_image: values must be finite and in"):
        plain(PROMPT, image=picture(0), mask_image=np.full((1, 1, 32, 32), np.nan), num_inference_steps=1)
    with pytest.raises(ValueError, match="mask_image: is 16x16, not the output's 32x32"):
        plain(PROMPT, image=picture(0), mask_image=np.ones((1, 1, 16, 16)), num_inference_steps=1)
    out = plain(PROMPT, image=picture(0), mask_image=picture(0, "L"), num_inference_steps=2, seed=1)
    assert out.request.strength == 1.0 and out.parameters["Inpaint"] == "mask"
    crop = {"image": picture(0), "mask_image": picture(0, "L"), "num_inference_steps": 1, "padding_mask_crop": 4}
    whole = plain(PROMPT, **{**crop, "padding_mask_crop": 4.0})  # a whole number given as a float
    assert whole.request.padding_mask_crop == 4 and whole.images[0].size == (32, 32)
    for change, message in (
        ({"mask_image": None}, "padding_mask_crop: applies to inpainting only"),
        ({"mask_image": None, "image": None}, "padding_mask_crop: applies to inpainting only"),
        ({"padding_mask_crop": -1}, "padding_mask_crop: must be >= 0"),
        ({"padding_mask_crop": 2.5}, "padding_mask_crop"),
        ({"mask_image": np.ones((1, 1, 32, 32))}, "mask_image: must be a PIL image to inpaint a crop"),
        ({"image": from_pil(picture(0), 32, 32)}, "image: must be a PIL image to inpaint a crop"),
        ({"mask_image": picture(0, "L").resize((16, 16))}, "mask_image: is 16x16; with padding_mask_crop it must"),
        ({"mask_image": Image.new("L", (32, 32))}, r"mask_image: is empty \(all black\)"),
    ):
        with pytest.raises(ValueError, match=message):
            plain(PROMPT, **{**crop, **change})
    with pytest.raises(ValueError, match="output_type 'latent' cannot be pasted back"):
        plain(PROMPT, output_type="latent", **crop)
    with pytest.raises(ValueError, match="paste_back: padding_mask_crop always pastes its box back"):
        plain(PROMPT, paste_back=False, **crop)
    with pytest.raises(ValueError, match="paste_back: applies to inpainting only"):
        plain(PROMPT, paste_back=True, num_inference_steps=1)
    with pytest.raises(ValueError, match="paste_back: must be true or false"):
        plain(PROMPT, paste_back="yes", image=picture(0), mask_image=picture(0, "L"), num_inference_steps=1)
    with pytest.raises(ValueError, match="output_type 'latent' cannot be pasted back.*paste_back needs pil or np"):
        plain(PROMPT, image=picture(0), mask_image=picture(0, "L"), paste_back=True, output_type="latent")


def test_inpainting_from_the_cli_matches_the_api(tiny_inpaint: tuple[Path, Path], tmp_path: Path) -> None:
    from click.testing import CliRunner

    from sd_onnx.runtime.cli import main

    folder = tiny_inpaint[1]
    picture(1).save(tmp_path / "in.png")
    picture(1, "L").convert("RGB").save(tmp_path / "mask.png")  # masks are often saved as RGB
    args = ["prompt", "x", "-m", str(folder), "--image", str(tmp_path / "in.png"), "--steps", "4", "--seed", "2"]
    result = CliRunner().invoke(main, [*args, "--mask", str(tmp_path / "mask.png"), "-o", str(tmp_path / "o.png")])
    assert result.exit_code == 0, result.output
    made = Image.open(tmp_path / "o.png")
    assert "Inpaint: mask" in made.text["parameters"] and "Denoising strength: 1.0" in made.text["parameters"]
    assert "Paste back: True" in made.text["parameters"]  # A1111's overlay, by default on the CLI
    pipe = DiffusionPipeline.from_pretrained(folder)
    settings = {"image": picture(1), "mask_image": picture(1, "L"), "num_inference_steps": 4, "seed": 2}
    expected = pipe("x", paste_back=True, **settings).images[0]
    assert np.array_equal(np.asarray(made), np.asarray(expected))
    result = CliRunner().invoke(
        main, [*args, "--mask", str(tmp_path / "mask.png"), "--no-paste-back", "-o", str(tmp_path / "n.png")]
    )
    assert result.exit_code == 0, result.output
    assert np.array_equal(np.asarray(Image.open(tmp_path / "n.png")), np.asarray(pipe("x", **settings).images[0]))
    result = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "p.png")])
    assert result.exit_code != 0 and "Error: --mask: this is an inpainting model" in result.output
    crop = [*args, "--mask", str(tmp_path / "mask.png"), "--padding-mask-crop", "2", "-o", str(tmp_path / "c.png")]
    result = CliRunner().invoke(main, crop)
    assert result.exit_code == 0, result.output
    expected = pipe("x", image=picture(1), mask_image=picture(1, "L").convert("RGB"), num_inference_steps=4, seed=2,
                    padding_mask_crop=2).images[0]  # fmt: skip
    made = Image.open(tmp_path / "c.png")
    assert (
        np.array_equal(np.asarray(made), np.asarray(expected)) and "Masked area padding: 2" in made.text["parameters"]
    )
    result = CliRunner().invoke(main, [*crop[:-2], "--padding-mask-crop", "-3", "-o", str(tmp_path / "d.png")])
    assert result.exit_code != 0 and "Error: --padding-mask-crop: must be >= 0" in result.output
    result = CliRunner().invoke(main, [*crop[:-2], "--no-paste-back", "-o", str(tmp_path / "e.png")])
    assert result.exit_code != 0 and "Error: --no-paste-back: padding_mask_crop always pastes" in result.output
    (tmp_path / "bad.png").write_bytes(b"not a png")
    result = CliRunner().invoke(main, [*args, "--mask", str(tmp_path / "bad.png"), "-o", str(tmp_path / "q.png")])
    assert result.exit_code != 0 and "--mask" in result.output and "not a readable image" in result.output


@pytest.fixture(scope="module")
def server(tiny_export: Path):
    from .test_server import Server

    srv = Server(tiny_export)
    yield srv
    srv.stop()


def b64_png(image: Image.Image) -> str:
    import base64
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_a1111_inpainting_matches_the_api(server, tiny_export: Path) -> None:
    import base64
    import io

    import httpx
    from PIL import ImageOps

    body = {"prompt": "x", "init_images": [b64_png(picture(3))], "mask": b64_png(picture(3, "L")), "steps": 4,
            "seed": 8, "denoising_strength": 0.7, "mask_blur": 2, "inpainting_mask_invert": 1,
            "inpainting_fill": 2, "inpaint_full_res": False}  # fmt: skip
    r = httpx.post(f"{server.url}/sdapi/v1/img2img", json=body, timeout=60)
    assert r.status_code == 200, r.text
    got = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    assert "Masked content: latent_noise, Mask blur: 2" in got.text["parameters"]
    assert "Paste back: True" in got.text["parameters"]  # A1111 lays the original back in every mode
    pipe = DiffusionPipeline.from_pretrained(tiny_export)
    mask = ImageOps.invert(picture(3, "L"))
    expected = pipe("x", image=picture(3), mask_image=mask, strength=0.7, num_inference_steps=4, seed=8,
                    masked_content="latent_noise", mask_blur=2, paste_back=True).images[0]  # fmt: skip
    assert np.array_equal(np.asarray(got), np.asarray(expected))
    # A hard mask over the whole picture: every unmasked pixel is the original's.
    hard = {**body, "mask": b64_png(box_mask((32, 32), (8, 0, 24, 32))), "mask_blur": 0, "inpainting_mask_invert": 0,
            "denoising_strength": 1.0}  # fmt: skip
    r = httpx.post(f"{server.url}/sdapi/v1/img2img", json=hard, timeout=60)
    assert r.status_code == 200, r.text
    got, kept = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))), np.ones((32, 32), bool)
    kept[:, 8:24] = False
    assert np.array_equal(got[kept], np.asarray(picture(3))[kept]) and not np.array_equal(got, np.asarray(picture(3)))
    # A1111's defaults: "fill" masked content, only the masked area (padding 0), the blurred mask pasting back.
    only_masked = {"prompt": "x", "init_images": [b64_png(picture(3, size=(48, 40)))], "steps": 4, "seed": 8,
                   "mask": b64_png(box_mask((48, 40), (20, 10, 30, 18)))}  # fmt: skip
    r = httpx.post(f"{server.url}/sdapi/v1/img2img", json=only_masked, timeout=60)
    assert r.status_code == 200, r.text
    got = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    assert got.size == (48, 40) and "Inpaint area: Only masked, Masked area padding: 0" in got.text["parameters"]
    expected = pipe("x", image=picture(3, size=(48, 40)), mask_image=box_mask((48, 40), (20, 10, 30, 18)),
                    strength=0.75, num_inference_steps=4, seed=8, masked_content="fill", mask_blur=4,
                    padding_mask_crop=0).images[0]  # fmt: skip
    assert np.array_equal(np.asarray(got), np.asarray(expected))
    # An all-black mask has no box to crop around: the whole picture, as A1111 falls back; a mask of another
    # size is resized to the image, as A1111 does.
    empty = {**only_masked, "mask": b64_png(Image.new("L", (48, 40)))}
    r = httpx.post(f"{server.url}/sdapi/v1/img2img", json=empty, timeout=60)
    assert r.status_code == 200 and "Only masked" not in r.json()["info"], r.text
    small = {**only_masked, "mask": b64_png(box_mask((48, 40), (20, 10, 30, 18)).resize((24, 20)))}
    r = httpx.post(f"{server.url}/sdapi/v1/img2img", json=small, timeout=60)
    assert r.status_code == 200 and "Masked area padding: 0" in r.json()["info"], r.text
    for change, message in (
        ({"mask": "not base64!"}, "mask: not valid base64"),
        ({"inpaint_full_res_padding": -2}, "inpaint_full_res_padding"),
        ({"inpainting_fill": 7}, "inpainting_fill"),
        ({"mask_blur": 65}, "mask_blur: must be <= 64"),
    ):
        r = httpx.post(f"{server.url}/sdapi/v1/img2img", json={**body, **change}, timeout=60)
        assert r.status_code == 422 and message in r.text, (change, r.text)


def test_openai_client_edits_with_a_transparent_mask(server, tiny_export: Path, tmp_path: Path) -> None:
    import base64
    import io

    import httpx
    from openai import OpenAI

    from sd_onnx.runtime.server.openai import transparency_mask

    image = picture(4)
    mask = image.convert("RGBA")
    alpha = np.full((32, 32), 255, np.uint8)
    alpha[4:20, 10:30] = 0  # transparent: edit here
    mask.putalpha(Image.fromarray(alpha))
    image.save(tmp_path / "image.png")
    mask.save(tmp_path / "mask.png")
    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    with open(tmp_path / "image.png", "rb") as f, open(tmp_path / "mask.png", "rb") as m:
        out = client.images.edit(image=f, mask=m, prompt="a cat", n=2, size="32x32", response_format="b64_json",
                                 extra_body={"seed": 11, "steps": 3})  # fmt: skip
    assert len(out.data) == 2
    got = Image.open(io.BytesIO(base64.b64decode(out.data[0].b64_json)))
    pipe = DiffusionPipeline.from_pretrained(tiny_export)
    repaint = transparency_mask(mask)
    assert np.array_equal(np.asarray(repaint) == 255, alpha == 0)
    expected = pipe("a cat", image=image, mask_image=repaint, num_images_per_prompt=2, num_inference_steps=3,
                    seed=11).images[0]  # fmt: skip
    assert np.array_equal(np.asarray(got), np.asarray(expected))
    # The image's own transparency is the mask when none is sent; errors name the field.
    files = {"image": ("image.png", (tmp_path / "mask.png").read_bytes(), "image/png")}
    r = httpx.post(f"{server.url}/v1/images/edits", data={"prompt": "a cat", "steps": "2"}, files=files, timeout=60)
    assert r.status_code == 200, r.text
    opaque = {"image": ("image.png", (tmp_path / "image.png").read_bytes(), "image/png")}
    mask.resize((16, 16)).save(tmp_path / "small.png")
    small_mask = (tmp_path / "small.png").read_bytes()
    for data, sent, message in (
        ({"prompt": "a cat"}, opaque, "image: has no fully transparent pixel"),
        ({"prompt": "a cat"}, {}, "image: a file is required"),
        ({"prompt": "a cat"}, {**opaque, "mask": ("m.png", small_mask, "image/png")}, "mask: is 16x16; it must have"),
        ({"prompt": "a cat", "n": "many"}, files, "n: Input should be a valid integer"),
        ({"n": "1"}, files, "prompt: Field required"),
        ({"prompt": "a cat"}, {"image": ("x.png", b"garbage", "image/png")}, "image: not a readable image"),
    ):
        r = httpx.post(f"{server.url}/v1/images/edits", data=data, files=sent or None, timeout=60)
        assert r.status_code == 422 and message in r.json()["detail"], (data, r.text)


def test_sdxl_inpainting_matches_diffusers(tmp_path: Path) -> None:
    """SDXL's inpainting UNet (9 channels) with its two encoders and size conditioning."""
    from .conftest import build_and_export

    source, folder = build_and_export("tiny-sdxl-inpaint", tmp_path)
    ours = AutoPipelineForInpainting.from_pretrained(folder, provider="cpu")
    assert type(ours).__name__ == "StableDiffusionXLPipeline" and ours.config.inpainting
    import diffusers

    pipe = diffusers.StableDiffusionXLInpaintPipeline.from_pretrained(source)
    pipe.set_progress_bar_config(disable=True)
    for extra in ({"strength": 1.0}, {"strength": 0.7, "negative_prompt": "blurry", "num_images_per_prompt": 2}):
        settings = {"image": picture(6), "mask_image": picture(6, "L"), "num_inference_steps": 5,
                    "guidance_scale": 5.0, **extra}  # fmt: skip
        expected = pipe(PROMPT, generator=torch.Generator().manual_seed(2), output_type="np", **settings).images
        got = ours(PROMPT, seed=2, scheduler="euler", output_type="np", **settings).images
        assert got.shape == expected.shape and np.abs(got - expected).mean() <= 1 / 255, extra
