"""Refusals never echo the input whole (`runtime/echo.py`), and every image of an A1111 batch carries, and is
made from, its own seed (seed + i), through the real server app on the shipped model."""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from sd_onnx.runtime import StableDiffusionPipeline
from sd_onnx.runtime.echo import echo
from sd_onnx.runtime.request import SEED_RANGE, GenerationRequest, RequestError
from sd_onnx.runtime.rng import ImageGenerators, TorchGenerator
from sd_onnx.runtime.schedulers import resolve_name
from sd_onnx.runtime.server.app import ServeConfig, ServerState, create_app
from sd_onnx.runtime.shipped import shipped_model

HUGE = "x" * 9_000_000  # under the default 10 MiB body limit, so it reaches the validation
PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def pipe() -> StableDiffusionPipeline:
    return StableDiffusionPipeline.from_pretrained(shipped_model(), provider="cpu")


@pytest.fixture(scope="module")
def client(pipe: StableDiffusionPipeline) -> Iterator[TestClient]:
    with TestClient(create_app(ServerState(ServeConfig()), loader=lambda: pipe)) as client:
        while client.get("/health").status_code != 200:
            time.sleep(0.05)
        yield client


def pixels(b64: str) -> np.ndarray:
    return np.asarray(png(b64).convert("RGB"))


def png(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def b64png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


INIT = b64png(Image.new("RGB", (64, 64), (200, 40, 40)))


# echo -----------------------------------------------------------------------------------------------------


def test_echo_keeps_short_values_and_cuts_long_ones_with_the_size_of_the_rest() -> None:
    assert echo("euler") == "'euler'" and echo(7) == "7" and echo(None) == "None" and echo([1, 2]) == "[1, 2]"
    cut = echo(HUGE)
    assert cut.startswith("'xxx") and cut.endswith("... (+8.6M characters)") and len(cut) < 120
    assert echo(b"y" * 5000).endswith("... (+4.8k characters)")
    assert echo("z" * 100, limit=10) == "'zzzzzzzzzz... (+90 characters)"
    assert len(echo(10**400)) < 120 and "(+321 characters)" in echo(10**400)
    assert len(echo(list(range(100_000)))) < 120


def test_echo_survives_values_repr_cannot_print() -> None:
    assert echo(10**5000) == "<int>"  # past Python's 4300-digit limit for int -> str
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    assert echo(deep) == "<list>"


def test_scheduler_names_and_request_fields_are_echoed_short(pipe: StableDiffusionPipeline) -> None:
    with pytest.raises(ValueError, match=r"unknown scheduler 'xxx.*\(\+8\.6M characters\)") as caught:
        resolve_name(HUGE)
    assert len(str(caught.value)) < 1024
    for fields, field in (({"scheduler": HUGE}, "scheduler"), ({"steps": 10**400}, "steps"),
                          ({"width": 10**400}, "width"), ({"seed": 10**400}, "seed"),
                          ({"guidance_scale": 10**400}, "guidance_scale")):  # fmt: skip
        with pytest.raises(RequestError) as caught:
            pipe.prepare(GenerationRequest(PROMPT, **fields))
        assert caught.value.field == field and len(str(caught.value)) < 1024, str(caught.value)[:2000]
    with pytest.raises(RequestError, match=r"^scheduler: unknown scheduler") as caught:
        pipe(PROMPT, scheduler=HUGE)
    assert len(str(caught.value)) < 1024
    image, mask = Image.new("RGB", (64, 64)), Image.new("L", (64, 64), 255)
    with pytest.raises(RequestError) as caught:
        pipe.prepare(GenerationRequest(PROMPT, image=image, mask_image=mask, masked_content=HUGE))
    assert caught.value.field == "masked_content" and len(str(caught.value)) < 1024


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/sdapi/v1/txt2img", {"prompt": PROMPT, "sampler_name": HUGE}, "sampler_name"),
        ("/sdapi/v1/img2img", {"prompt": PROMPT, "sampler_name": HUGE, "init_images": [INIT]}, "sampler_name"),
        ("/sdapi/v1/img2img", {"prompt": PROMPT, "init_images": [HUGE]}, "init_images[0]"),
        ("/sdapi/v1/txt2img", {"prompt": PROMPT, "steps": 10**400}, "steps"),
        ("/sdapi/v1/txt2img", {"prompt": PROMPT, "width": 10**400}, "width"),
        ("/sdapi/v1/txt2img", {"prompt": PROMPT, "seed": 10**400}, "seed"),
        ("/sdapi/v1/txt2img", {"prompt": PROMPT, "subseed": 10**400}, "subseed"),
        ("/sdapi/v1/txt2img", {"prompt": PROMPT, "seed": SEED_RANGE[1], "batch_size": 2}, "seed"),
        ("/v1/images/generations", {"prompt": PROMPT, "size": HUGE}, "size"),
        ("/v1/images/generations", {"prompt": PROMPT, "response_format": HUGE}, "response_format"),
        ("/v1/images/generations", {"prompt": HUGE}, "prompt"),
        ("/v1/images/generations", {"prompt": PROMPT, "n": HUGE}, "n"),
    ],
)
def test_huge_values_are_4xx_naming_the_field_in_under_a_kilobyte(
    client: TestClient, path: str, body: dict, field: str
) -> None:
    r = client.post(path, json=body)
    assert 400 <= r.status_code < 500 and len(r.content) < 1024, (r.status_code, r.text[:2000])
    assert r.json()["detail"].startswith(f"{field}: "), r.text


def test_huge_form_field_of_an_edit_is_4xx_in_under_a_kilobyte(client: TestClient) -> None:
    files = {"image": ("i.png", base64.b64decode(b64png(Image.new("RGBA", (64, 64)))), "image/png")}
    for size, status, detail in (("x" * 900_000, 422, "size: "), (HUGE, 400, "Part exceeded")):  # form parts: 1 MB
        r = client.post("/v1/images/edits", data={"prompt": PROMPT, "size": size}, files=files)
        assert r.status_code == status and len(r.content) < 1024, r.text[:2000]
        assert r.json()["detail"].startswith(detail), r.text


# seeds ----------------------------------------------------------------------------------------------------


def test_per_image_generators_draw_what_a_batch_of_one_draws() -> None:
    batch = ImageGenerators([7, 8, 9]).randn((3, 4, 5, 5))
    for i in range(3):
        np.testing.assert_array_equal(batch[i : i + 1], TorchGenerator(7 + i).randn((1, 4, 5, 5)))
    with pytest.raises(ValueError, match="3 images"):
        ImageGenerators([7, 8, 9]).randn((1, 4))


def test_request_seeds_per_image_or_shared(pipe: StableDiffusionPipeline) -> None:
    shared = pipe.prepare(GenerationRequest(PROMPT, seed=7, batch=3))
    own = pipe.prepare(GenerationRequest(PROMPT, seed=7, batch=3, seed_per_image=True))
    assert shared.image_seeds == [7, 7, 7] and own.image_seeds == [7, 8, 9] and own.seed_per_image is True
    params = own.parameters("m")
    assert [own.image_parameters(params, i)["Seed"] for i in range(3)] == [7, 8, 9]
    assert "Batch pos" not in own.image_parameters(params, 1) and params["Seed"] == 7  # the request's own: intact
    assert shared.image_parameters(params, 2) | {"Seed": 7} == {**params, "Batch size": 3, "Batch pos": 2}
    single = pipe.prepare(GenerationRequest(PROMPT, seed=7))
    assert single.image_parameters(single.parameters("m"), 0) == single.parameters("m")
    with pytest.raises(RequestError, match=r"^seed: .*passes 18446744073709551615"):
        pipe.prepare(GenerationRequest(PROMPT, seed=SEED_RANGE[1] - 1, batch=3, seed_per_image=True))
    assert pipe.prepare(GenerationRequest(PROMPT, seed=SEED_RANGE[1] - 2, batch=3, seed_per_image=True)).resolved
    with pytest.raises(RequestError, match="^seed_per_image: must be true or false"):
        pipe.prepare(GenerationRequest(PROMPT, seed=7, seed_per_image="yes"))


def test_python_api_batch_keeps_diffusers_one_generator(pipe: StableDiffusionPipeline) -> None:
    """pipe(num_images_per_prompt=3, seed=7) draws the batch's latents from one generator, as diffusers does."""
    settings = {"num_images_per_prompt": 3, "num_inference_steps": 2, "scheduler": "ddim", "output_type": "np"}
    shape = (3, *pipe.latent_shape(pipe.prepare(GenerationRequest(PROMPT)))[1:])
    seeded = pipe(PROMPT, seed=7, **settings)
    given = pipe(PROMPT, latents=TorchGenerator(7).randn(shape), **settings)  # DDIM, eta 0: no noise after these
    np.testing.assert_array_equal(seeded.images, given.images)


@pytest.mark.parametrize("sampler", ["DDIM", "Euler a"])
def test_a1111_batch_image_i_is_the_single_image_of_seed_plus_i(client: TestClient, sampler: str) -> None:
    body = {"prompt": PROMPT, "negative_prompt": "green", "steps": 4, "sampler_name": sampler, "subseed": 100}
    r = client.post("/sdapi/v1/txt2img", json={**body, "seed": 7, "batch_size": 3})
    assert r.status_code == 200, r.text
    batch, info = r.json()["images"], json.loads(r.json()["info"])
    assert info["seed"] == 7 and info["all_seeds"] == [7, 8, 9] and info["all_subseeds"] == [100, 101, 102]
    assert info["all_prompts"] == [PROMPT] * 3 and info["all_negative_prompts"] == ["green"] * 3
    for i, image in enumerate(batch):
        text = png(image).text["parameters"]
        assert f", Seed: {7 + i}," in text and "Batch" not in text and info["infotexts"][i] == text
        single = client.post("/sdapi/v1/txt2img", json={**body, "seed": 7 + i}).json()
        np.testing.assert_array_equal(pixels(image), pixels(single["images"][0]))
        assert png(single["images"][0]).text["parameters"] == text


def test_a1111_n_iter_continues_the_seeds(client: TestClient) -> None:
    body = {"prompt": PROMPT, "steps": 3, "sampler_name": "Euler a"}
    r = client.post("/sdapi/v1/txt2img", json={**body, "seed": 20, "batch_size": 2, "n_iter": 2}).json()
    assert json.loads(r["info"])["all_seeds"] == [20, 21, 22, 23]
    last = client.post("/sdapi/v1/txt2img", json={**body, "seed": 23}).json()
    np.testing.assert_array_equal(pixels(r["images"][3]), pixels(last["images"][0]))


@pytest.mark.parametrize(
    "extra",
    [
        {"sampler_name": "Euler a"},
        {"mask": "MASK", "inpainting_fill": 2, "inpaint_full_res": False},  # latent noise in the masked part
        {"mask": "MASK", "inpainting_fill": 1},  # only the masked area, pasted back
    ],
    ids=["img2img", "inpaint-latent-noise", "inpaint-only-masked"],
)
def test_a1111_img2img_batch_image_i_is_the_single_image_of_seed_plus_i(client: TestClient, extra: dict) -> None:
    init = Image.new("RGB", (64, 64), (200, 40, 40))
    init.paste((30, 30, 220), (16, 16, 48, 48))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (8, 8, 40, 40))
    if "mask" in extra:
        extra = {**extra, "mask": b64png(mask)}
    body = {"prompt": PROMPT, "steps": 5, "denoising_strength": 0.6, "init_images": [b64png(init)], **extra}
    r = client.post("/sdapi/v1/img2img", json={**body, "seed": 31, "batch_size": 3})
    assert r.status_code == 200, r.text
    assert json.loads(r.json()["info"])["all_seeds"] == [31, 32, 33]
    images = [pixels(image) for image in r.json()["images"]]
    assert not np.array_equal(images[0], images[1])  # each image its own noise
    for i, image in enumerate(images):
        single = client.post("/sdapi/v1/img2img", json={**body, "seed": 31 + i}).json()["images"][0]
        np.testing.assert_array_equal(image, pixels(single))
        assert f"Seed: {31 + i}," in png(single).text["parameters"]


def test_openai_batch_keeps_one_generator_and_says_so(client: TestClient, pipe: StableDiffusionPipeline) -> None:
    """The OpenAI route's n images come from one generator seeded `seed`, as before (and as the Python API); each
    PNG says the batch's size and its position, without which that seed does not reproduce it."""
    r = client.post("/v1/images/generations", json={"prompt": PROMPT, "n": 2, "seed": 5, "steps": 3})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    api = pipe(PROMPT, num_images_per_prompt=2, seed=5, num_inference_steps=3)
    for i, item in enumerate(data):
        np.testing.assert_array_equal(pixels(item["b64_json"]), np.asarray(api.images[i]))
        assert png(item["b64_json"]).text["parameters"].endswith(f"Batch size: 2, Batch pos: {i}")
        assert ", Seed: 5," in png(item["b64_json"]).text["parameters"]
    one = client.post("/v1/images/generations", json={"prompt": PROMPT, "seed": 5, "steps": 3}).json()["data"][0]
    assert "Batch" not in png(one["b64_json"]).text["parameters"]


@pytest.mark.parametrize("scheduler", ["euler_a", "ddim"])
def test_seed_per_image_is_diffusers_list_of_generators(reference_pipe, tiny_export, scheduler: str) -> None:
    """seed_per_image is diffusers' `generator=[Generator().manual_seed(seed + i) ...]`, one per image."""
    torch = pytest.importorskip("torch")
    from .test_pipeline import NEGATIVE, diffusers_images

    generators = [torch.Generator().manual_seed(1234 + i) for i in range(3)]
    settings = {"num_inference_steps": 5, "guidance_scale": 6.0}
    expected = diffusers_images(reference_pipe, scheduler, generator=generators, num_images_per_prompt=3, **settings)
    ours = StableDiffusionPipeline.from_pretrained(tiny_export, provider="cpu")
    request = GenerationRequest(
        "a photo of an astronaut riding a horse", NEGATIVE, steps=5, guidance_scale=6.0, seed=1234, batch=3,
        scheduler=scheduler, seed_per_image=True,
    )  # fmt: skip
    got = ours.generate(request, output_type="np").images
    assert got.shape == expected.shape == (3, 32, 32, 3)
    assert np.abs(got - expected).mean() <= 1 / 255


def test_img2img_seed_per_image_is_diffusers_list_of_generators(tiny_pipeline, tiny_export) -> None:
    torch = pytest.importorskip("torch")
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(
        tiny_pipeline, safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    init = Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8))
    generators = [torch.Generator().manual_seed(9 + i) for i in range(2)]
    expected = pipe(PROMPT, image=init, generator=generators, num_images_per_prompt=2, num_inference_steps=10,
                    strength=0.6, output_type="np").images  # fmt: skip
    ours = StableDiffusionPipeline.from_pretrained(tiny_export, provider="cpu")
    request = GenerationRequest(PROMPT, image=init, steps=10, strength=0.6, seed=9, batch=2, seed_per_image=True,
                                scheduler="pndm")  # fmt: skip
    got = ours.generate(request, output_type="np").images
    assert np.abs(got - expected).mean() <= 1 / 255
    assert np.abs(got[0] - got[1]).mean() > 10 / 255  # each its own posterior sample and noise
