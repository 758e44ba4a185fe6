"""The shapes model shipped in the package draws what it is told, in fp32 and int8, from the API and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from sd_onnx.models.shapes import shipped_model
from sd_onnx.models.shapes.data import parse_caption
from sd_onnx.models.shapes.judge import judge, score
from sd_onnx.runtime import StableDiffusionPipeline
from sd_onnx.runtime.cli import main as sd_run

PROMPTS = (
    "a red circle on a blue background",
    "a large yellow square in the center on a black background",
    "a small white triangle on the left on a green background",
    "a green circle at the top on a white background",
    "a purple square on the right on a yellow background",
    "a large orange triangle at the bottom on a blue background",
)


@pytest.fixture(scope="module", params=["fp32", "int8"])
def shipped(request: pytest.FixtureRequest) -> StableDiffusionPipeline:
    return StableDiffusionPipeline.from_pretrained(shipped_model(request.param), cache=False)


# Judged right on >= 99.5 % of 400 prompts in models/shapes/scores_*.json, so asserted on every image.
LEARNED = ("color", "background", "size", "position")
# Shape is right on 88-89 % (fp32) and 84-86 % (int8) of those prompts, so asserted on most images, not all.
MIN_SHAPES_RIGHT = 5


def test_shipped_model_draws_what_it_is_told(shipped: StableDiffusionPipeline) -> None:
    images = shipped(list(PROMPTS), num_inference_steps=20, seed=0).images
    shapes_right = 0
    for prompt, image in zip(PROMPTS, images, strict=True):
        verdict = score(parse_caption(prompt), judge(image))
        assert all(verdict[attr] for attr in LEARNED if attr in verdict), (prompt, verdict)
        shapes_right += verdict["shape"]
    assert shapes_right >= MIN_SHAPES_RIGHT


def test_shipped_model_sizes_come_from_its_configs() -> None:
    manifest = json.loads((shipped_model() / "sd_onnx.json").read_text())
    config = manifest["config"]
    assert (config["vae_scale_factor"], config["sample_size"], config["embedding_dim"]) == (4, 16, 32)
    image = StableDiffusionPipeline.from_pretrained(shipped_model(), cache=False)("a red circle on a blue background")
    assert image.images[0].size == (64, 64)
    assert image.parameters["CFG scale"] == config["guidance_scale"] == 2.0


def test_sd_run_without_model_uses_the_shipped_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SD_ONNX_MODEL", raising=False)
    out = tmp_path / "demo.png"
    result = CliRunner().invoke(sd_run, ["prompt", "a red circle on a blue background", "-o", str(out), "--seed", "3"])
    assert result.exit_code == 0, result.output
    image = Image.open(out)
    assert "a red circle on a blue background" in image.text["parameters"]
    verdict = score(parse_caption("a red circle on a blue background"), judge(image))
    assert verdict["color"] and verdict["background"], verdict


def test_from_pretrained_without_a_path_opens_the_shipped_model() -> None:
    pipe = StableDiffusionPipeline.from_pretrained(cache=False)
    assert pipe.folder == shipped_model() and pipe.model_name == "shapes"
    assert pipe.manifest.vocabulary and "circle" in pipe.manifest.vocabulary


def test_a_sampler_that_cannot_run_the_models_schedule_fails_at_load() -> None:
    with pytest.raises(ValueError, match="lms cannot follow this model's zero-terminal-SNR noise schedule"):
        StableDiffusionPipeline.from_pretrained(scheduler="lms", cache=False)


def test_unknown_words_warning_stays_short(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    pipe = StableDiffusionPipeline.from_pretrained(cache=False)
    with caplog.at_level(logging.WARNING, logger="sd_onnx"):
        pipe("a red circle " + "q" * 100_000, num_inference_steps=1)
    lines = caplog.text.splitlines()  # the unknown word, and the cut (the prompt is far past 77 tokens)
    assert len(lines) == 2 and all(len(line) < 250 for line in lines) and "qqq..." in lines[0]


def test_shipped_model_follows_its_outline_controlnet(shipped: StableDiffusionPipeline) -> None:
    """The shipped outline ControlNet (models/shapes/controlnet.py): given the Canny outline of a scene, the
    object is drawn where and as large as the outline says, though the caption names neither (without it,
    position is right by chance). fp32 here; int8 scored the same on 50 scenes (scores_controlnet.json)."""
    if shipped.manifest.components["unet"].precision == "int8":
        pytest.skip("the int8 export's ControlNet is the fp32 one; its UNet is covered by the test above")
    from sd_onnx.models.shapes.evaluate import control_accuracy
    from sd_onnx.runtime.controlnet import ControlUnit
    from sd_onnx.runtime.request import GenerationRequest, RequestError

    report = control_accuracy(shipped, "outline", count=8, steps=10)
    assert report["with"]["position"] >= 7 / 8 and report["with"]["size"] >= 7 / 8, report
    assert report["without"]["position"] <= 0.5, report
    unit = ControlUnit(Image.new("RGB", (64, 64)))
    for field, value in (("deepcache_interval", 3), ("tome_ratio", 0.3)):  # graphs that take no residuals
        with pytest.raises(RequestError, match=f"^{field}: cannot be combined with a ControlNet"):
            shipped.prepare(GenerationRequest("a red circle", controls=(unit,), **{field: value}))
