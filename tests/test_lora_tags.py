"""`<lora:name:weight>` tags (runtime/lora_tags.py): the same pixels as the load-time LoRA machinery given the
same files and weights (which test_lora.py holds against diffusers), separate text encoder / UNet weights,
pipelines kept per LoRA set, refusals naming the prompt, the CLI, and the A1111 routes."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from PIL import Image

from sd_onnx.runtime.cli import main
from sd_onnx.runtime.lora_tags import extract_tags
from sd_onnx.runtime.pipeline import DiffusionPipeline
from sd_onnx.runtime.request import GenerationRequest

from .lora_files import write_diffusers_lora, write_kohya_lora

SETTINGS = {"steps": 3, "seed": 7, "prompt_syntax": "a1111"}


@pytest.fixture(scope="module")
def lora_dir(tiny_pipeline: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lora-dir")
    write_diffusers_lora(tiny_pipeline, root / "Style.safetensors", seed=1)
    (root / "sub").mkdir()
    write_kohya_lora(tiny_pipeline, root / "sub" / "kohya.safetensors", seed=2)
    return root


@pytest.fixture(scope="module")
def pipe(tiny_export: Path, lora_dir: Path):
    return DiffusionPipeline.from_pretrained(tiny_export, provider="cpu", lora_dir=lora_dir)


def images(pipe, prompt: str) -> np.ndarray:
    return pipe.generate(GenerationRequest(prompt, **SETTINGS), output_type="np").images


def test_tags_parse_as_a1111_writes_them() -> None:
    text, tags = extract_tags("a cat <lora:style:0.8>, <LORA:kohya> <lyco:x:0.5:0.25> <lora:y:1:unet=2>")
    assert text == "a cat , " + "  "
    assert [(t.name, t.text_weight, t.unet_weight) for t in tags] == [
        ("style", 0.8, 0.8), ("kohya", 1.0, 1.0), ("x", 0.5, 0.25), ("y", 1.0, 1.0)
    ]  # fmt: skip


def test_a_tag_equals_the_same_lora_given_at_load(pipe, tiny_export: Path, lora_dir: Path) -> None:
    tagged = images(pipe, "a red circle <lora:style:0.8>")
    loaded = DiffusionPipeline.from_pretrained(
        tiny_export, provider="cpu", loras=[(lora_dir / "Style.safetensors", 0.8)]
    )
    np.testing.assert_array_equal(tagged, images(loaded, "a red circle "))
    assert np.abs(tagged - images(pipe, "a red circle ")).mean() > 1 / 255


def test_separate_text_and_unet_weights(pipe) -> None:
    both = images(pipe, "a red circle <lora:kohya:0.7>")
    unet_only = images(pipe, "a red circle <lora:kohya:0:0.7>")
    text_only = images(pipe, "a red circle <lora:kohya:0.7:0>")
    assert len({both.tobytes(), unet_only.tobytes(), text_only.tobytes()}) == 3


def test_a_repeated_set_reuses_its_sessions(pipe) -> None:
    images(pipe, "x <lora:style:0.5>")
    started = time.perf_counter()
    variant = pipe.with_loras(pipe.lora_library.resolve(extract_tags("<lora:style:0.5>")[1]))
    assert time.perf_counter() - started < 0.05 and variant is pipe._variants[next(reversed(pipe._variants))]
    assert variant.component("vae_decoder") is pipe.component("vae_decoder")  # untouched graphs are shared
    assert variant.component("unet") is not pipe.component("unet")


def test_parameters_keep_the_prompt_and_name_the_loras(pipe) -> None:
    out = pipe.generate(GenerationRequest("a <lora:style:0.5> circle", **SETTINGS))
    assert out.parameters["Lora"] == "style" and out.request.prompt == "a <lora:style:0.5> circle"


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ("a <lora:nothere:1>", "prompt: <lora:nothere>: no such LoRA in the LoRA folder"),
        ("a <lora:style:abc>", "the weight must be a number"),
        ("a <lora:style:50>", "weight must be in -10..10"),
    ],
)
def test_bad_tags_are_refused_naming_the_prompt(pipe, prompt: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        pipe.generate(GenerationRequest(prompt, **SETTINGS))


def test_tags_without_a_lora_folder_are_refused_and_plain_syntax_reads_them_as_text(tiny_export: Path) -> None:
    bare = DiffusionPipeline.from_pretrained(tiny_export, provider="cpu")
    with pytest.raises(ValueError, match="need a LoRA folder"):
        bare.generate(GenerationRequest("a <lora:style:1>", **SETTINGS))
    bare.generate(GenerationRequest("a <lora:style:1>", steps=1))  # diffusers' reading: just text


def test_cli_lora_dir(tiny_export: Path, lora_dir: Path, tmp_path: Path, pipe) -> None:
    out = tmp_path / "x.png"
    args = ["prompt", "a red circle <lora:style:0.8>", "-m", str(tiny_export), "--lora-dir", str(lora_dir),
            "--steps", "3", "--seed", "7", "-o", str(out)]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    image = Image.open(out)
    assert (
        image.text["parameters"].startswith("a red circle <lora:style:0.8>\n")
        and "Lora: style" in image.text["parameters"]
    )
    result = CliRunner().invoke(main, [*args[:-2], "-o", str(tmp_path / "y.png"), "--prompt-syntax", "a1111"])
    missing = CliRunner().invoke(main, ["prompt", "a <lora:nope>", "-m", str(tiny_export), "--lora-dir", str(lora_dir),
                                        "-o", str(tmp_path / "z.png")])  # fmt: skip
    assert missing.exit_code != 0 and "Error: TEXT: <lora:nope>: no such LoRA" in missing.output


def test_a1111_routes_list_and_apply_loras(tiny_export: Path, lora_dir: Path) -> None:
    from sd_onnx.runtime.server.app import ServeConfig, ServerState, create_app

    state = ServerState(ServeConfig())
    app = create_app(state, lambda: DiffusionPipeline.from_pretrained(tiny_export, provider="cpu", lora_dir=lora_dir))
    with TestClient(app) as client:
        while client.get("/health").status_code != 200:
            time.sleep(0.1)
        listed = client.get("/sdapi/v1/loras").json()
        assert sorted(entry["name"] for entry in listed) == ["Style", "kohya"]
        answer = client.post("/sdapi/v1/txt2img", json={"prompt": "a <lora:style:0.8> circle", "steps": 2, "seed": 3})
        assert answer.status_code == 200 and "Lora: style" in answer.json()["info"]
        refused = client.post("/sdapi/v1/txt2img", json={"prompt": "a <lora:nope:1>", "steps": 2})
        assert refused.status_code == 422 and refused.json()["detail"].startswith("prompt: <lora:nope>")
