"""`sd-run prompt` and `sd-run info`: image, PNG metadata, and one-line errors."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from sd_onnx.runtime.cli import main


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def test_prompt_writes_png_with_a1111_parameters(tiny_export: Path, tmp_path: Path) -> None:
    out = tmp_path / "img.png"
    code, output = run(
        "prompt", "a red circle", "-m", str(tiny_export), "-o", str(out), "--negative", "blue",
        "--steps", "3", "--seed", "7", "--scheduler", "Euler a", "--width", "24", "--height", "16",
    )  # fmt: skip
    assert code == 0, output
    assert str(out) in output
    image = Image.open(out)
    assert image.size == (24, 16)
    params = image.text["parameters"]
    assert params.startswith("a red circle\nNegative prompt: blue\nSteps: 3, Sampler: euler_a, CFG scale: 7.5, Seed: 7")


def test_batch_writes_one_file_per_image(tiny_export: Path, tmp_path: Path) -> None:
    code, output = run(
        "prompt", "x", "-m", str(tiny_export), "-o", str(tmp_path / "b.png"), "--steps", "2", "--batch", "2"
    )
    assert code == 0, output
    assert (tmp_path / "b-0.png").is_file() and (tmp_path / "b-1.png").is_file()


def test_info_prints_manifest_and_providers(tiny_export: Path) -> None:
    code, output = run("info", str(tiny_export))
    assert code == 0
    assert "unet: unet/model.onnx fp32 opset 17" in output and "CPUExecutionProvider" in output


def corrupt_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    with open(dst / "unet" / "model.onnx", "r+b") as f:
        f.write(b"garbage")
    return dst


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--width", "30"], "--width: must be a positive multiple of 4 for this model"),
        (["--steps", "0"], "--steps: must be >= 1"),
        (["--scheduler", "heun"], "unknown scheduler 'heun'"),
        (["--provider", "tpu"], "unknown provider 'tpu'"),
        (["-m", "/nonexistent/model"], "no such model folder"),
    ],
)
def test_user_errors_are_one_line(tiny_export: Path, tmp_path: Path, args: list[str], message: str) -> None:
    base = ["prompt", "x", "-m", str(tiny_export), "-o", str(tmp_path / "o.png"), "--steps", "2"]
    code, output = run(*base, *args)
    errors = [line for line in output.splitlines() if line.startswith("Error")]
    assert code != 0 and len(errors) == 1 and message in errors[0], output
    assert "Traceback" not in output and not (tmp_path / "o.png").exists()


def test_corrupt_and_missing_model_files(tiny_export: Path, tmp_path: Path) -> None:
    folder = corrupt_copy(tiny_export, tmp_path / "corrupt")
    code, output = run("prompt", "x", "-m", str(folder), "--steps", "1", "-o", str(tmp_path / "o.png"))
    assert code != 0 and "sha256 mismatch" in output
    (folder / "unet" / "model.onnx").unlink()
    code, output = run("prompt", "x", "-m", str(folder), "--steps", "1", "-o", str(tmp_path / "o.png"))
    assert code != 0 and "missing model file" in output


def test_unavailable_provider_falls_back_to_cpu_with_warning(tiny_export: Path, tmp_path: Path) -> None:
    out = tmp_path / "cuda.png"
    code, output = run("prompt", "x", "-m", str(tiny_export), "-o", str(out), "--steps", "1", "--provider", "cuda")
    assert code == 0 and out.is_file()
    assert "falling back to CPU" in output


def errors_of(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("Error")]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--guidance", "nan"], "--guidance: must be a finite number, got nan"),
        (["--guidance", "-1"], "--guidance: must be >= 0"),
        (["--seed", str(2**64)], "--seed: must be in [0, 18446744073709551615] or -1 for a random seed"),
        (["--seed", "-5"], "--seed: must be in [0, 18446744073709551615]"),
        (["--width", "100000", "--height", "64"], "--width: 100000x64 exceeds the limit max_pixels=4096"),
        (["--width", "64", "--max-pixels", "1000"], "--width: 64x32 exceeds the limit max_pixels=1000"),
        (["--steps", "51"], "--steps: 51 exceeds the limit max_steps=50"),
        (["--batch", "5"], "--batch: 5 images exceeds the limit max_batch=4"),
    ],
)
def test_bad_numbers_are_one_line_errors_before_any_work(
    tiny_export: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    code, output = run("prompt", "x", "-m", str(tiny_export), "-o", str(tmp_path / "o.png"), "--height", "32", *args)
    errors = errors_of(output)
    assert code != 0 and len(errors) == 1 and errors[0].startswith(f"Error: {message}"), output
    assert "denoising" not in output and not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "target", ["dir", "dir/", "file.png/x.png", "/proc/x.png", "/dev/null", "new/x.jpg", "new/deeper/x", ""]
)
def test_unusable_output_path_fails_before_loading_anything(tmp_path: Path, target: str) -> None:
    """Checked before the model is even opened (the model named here does not exist), nothing left behind."""
    (tmp_path / "dir").mkdir()
    (tmp_path / "file.png").write_bytes(b"not a folder")
    out = target if target.startswith("/") else str(tmp_path / target)
    before = sorted(tmp_path.rglob("*"))
    code, output = run("prompt", "x", "-m", str(tmp_path / "no-model"), "-o", out)
    assert code != 0 and len(errors_of(output)) == 1, output
    assert "no such model folder" not in output and "Traceback" not in output
    assert sorted(tmp_path.rglob("*")) == before  # not even the folders of the path were created
    assert Path("/dev/null").is_char_device()


def test_invalid_utf8_prompt_is_a_one_line_error(tiny_export: Path, tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "sd_onnx.runtime.cli", "prompt", b"a \xff\xfe circle", "-m", str(tiny_export),
           "-o", str(tmp_path / "o.png"), "--steps", "1"]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "Error: TEXT: is not valid Unicode text" in result.stderr


def test_random_seed_is_recorded_and_model_named(tmp_path: Path) -> None:
    """The shipped model: `Model: shapes` (not its source folder), the seed actually drawn in the PNG."""
    code, output = run("prompt", "a red circle on a blue background", "-o", str(tmp_path / "a.png"), "--steps", "2")
    assert code == 0, output
    params = Image.open(tmp_path / "a.png").text["parameters"]
    assert "Model: shapes" in params and "Seed: -1" not in params
    seed = int(params.split("Seed: ")[1].split(",")[0])
    code, output = run("prompt", "a red circle on a blue background", "-o", str(tmp_path / "b.png"),
                       "--steps", "2", "--seed", str(seed))  # fmt: skip
    assert code == 0 and (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def test_unknown_words_warn_once_naming_them(tmp_path: Path) -> None:
    code, output = run("prompt", "a photo of a cat, a red circle", "-o", str(tmp_path / "c.png"), "--steps", "1")
    warnings = [line for line in output.splitlines() if "does not know" in line]
    assert code == 0 and warnings == ["warning: shapes does not know these words, which it will ignore: cat, of, photo"]


def test_readme_sampler_example_and_help_list_every_name(tmp_path: Path) -> None:
    code, output = run("prompt", "x", "-o", str(tmp_path / "k.png"), "--steps", "1", "--scheduler", "DPM++ 2M Karras")
    assert code != 0 and "Karras sigmas are numerically unstable" in errors_of(output)[0]
    code, output = run("prompt", "--help")
    flat = " ".join(output.split())
    for name in ("lms_karras", "LMS Karras", "DPM++ 2M Karras", "euler_a", "LCMScheduler"):
        assert name in flat


def test_img2img_from_the_cli_matches_the_api(tiny_export: Path, tmp_path: Path) -> None:
    from sd_onnx.runtime import StableDiffusionPipeline

    init = tmp_path / "init.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(init)
    settings = ["--strength", "0.6", "--steps", "5", "--seed", "3", "--width", "32", "--height", "32"]
    code, output = run(
        "prompt", "x", "-m", str(tiny_export), "-o", str(tmp_path / "i.png"), "--image", str(init), *settings
    )
    assert code == 0, output
    made = Image.open(tmp_path / "i.png")
    assert "Denoising strength: 0.6" in made.text["parameters"]
    pipe = StableDiffusionPipeline.from_pretrained(tiny_export)
    expected = pipe("x", image=Image.open(init), strength=0.6, num_inference_steps=5, seed=3, width=32, height=32)
    assert np.array_equal(np.asarray(made), np.asarray(expected.images[0]))
    code, output = run("prompt", "x", "-m", str(tiny_export), "-o", str(tmp_path / "j.png"), "--image", str(init),
                       "--strength", "0.1", "--steps", "5")  # fmt: skip
    assert code != 0 and "--strength: 0.1 x 5 steps leaves no denoising step" in output


def test_info_takes_the_folder_either_way_and_fails_on_damage(tiny_export: Path, tmp_path: Path) -> None:
    for args in (["info", str(tiny_export)], ["info", "-m", str(tiny_export)]):
        code, output = run(*args)
        assert code == 0 and "multiples of 4" in output and "all sha256 match" in output, output
    folder = corrupt_copy(tiny_export, tmp_path / "damaged")
    code, output = run("info", "-m", str(folder))
    assert code != 0 and "sha256 mismatch" in output and "1 file(s) missing or modified" in output


def test_default_steps_never_exceed_the_step_limit(tiny_export: Path, tmp_path: Path) -> None:
    code, output = run("prompt", "x", "-m", str(tiny_export), "-o", str(tmp_path / "s.png"), "--max-steps", "2")
    assert code == 0, output
    assert "Steps: 2," in Image.open(tmp_path / "s.png").text["parameters"]


def test_output_through_a_link_replaces_the_file_it_points_to(tiny_export: Path, tmp_path: Path) -> None:
    (tmp_path / "real.png").write_bytes(b"old")
    (tmp_path / "link.png").symlink_to(tmp_path / "real.png")
    code, output = run("prompt", "x", "-m", str(tiny_export), "-o", str(tmp_path / "link.png"), "--steps", "1")
    assert code == 0, output
    assert (tmp_path / "link.png").is_symlink() and Image.open(tmp_path / "real.png").size == (32, 32)


@pytest.mark.parametrize("source", ["/dev/zero", "missing.png", "folder"])
def test_init_image_that_is_not_a_regular_file_is_refused_without_reading_it(
    tiny_export: Path, tmp_path: Path, source: str
) -> None:
    (tmp_path / "folder").mkdir()
    path = source if source.startswith("/") else str(tmp_path / source)
    code, output = run("prompt", "x", "-m", str(tiny_export), "-o", str(tmp_path / "o.png"), "--image", path)
    errors = errors_of(output)
    assert code != 0 and len(errors) == 1 and "--image" in errors[0], output


def test_output_link_loop_is_a_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "loop.png").symlink_to(tmp_path / "loop.png")
    code, output = run("prompt", "x", "-o", str(tmp_path / "loop.png"), "--steps", "1")
    assert code != 0 and len(errors_of(output)) == 1 and "-o" in errors_of(output)[0], output


ORT_OOM = (
    "[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running MatMul node. Name:'/attn/MatMul' "
    "Status Message: /onnxruntime_src/onnxruntime/core/framework/bfc_arena.cc:360 void* "
    "onnxruntime::BFCArena::AllocateRawInternal(size_t, bool, onnxruntime::Stream*) Failed to allocate memory for "
    "requested buffer of size 34359738368"
)


def test_a_graph_that_fails_while_running_is_a_one_line_error(tmp_path: Path, monkeypatch) -> None:
    """onnxruntime failing inside a run (memory, most often: a tiny Z-Image at its 1024 px default asked for 34 GB)
    ends in one `Error:` line naming the graph and the node, not a traceback."""
    import onnxruntime as ort

    def fail(self, *args, **kwargs):
        raise RuntimeError(ORT_OOM)

    monkeypatch.setattr(ort.InferenceSession, "run", fail)
    code, output = run("prompt", "a red circle", "-o", str(tmp_path / "a.png"), "--steps", "1", "--provider", "cpu")
    assert code != 0 and "Traceback" not in output and len(errors_of(output)) == 1, output
    assert errors_of(output)[0].startswith("Error: text_encoder: onnxruntime could not run the graph (MatMul node "
                                           "/attn/MatMul: Failed to allocate memory for requested buffer of size "
                                           "34359738368: out of memory"), output  # fmt: skip
