"""The OpenVINO engine (`provider="openvino"`) against onnxruntime's CPU provider on the same graphs, which the other
test modules hold to diffusers: every family and mode, in f32 (exact float layers) the same pixels; int8 and bf16
within measured bounds of fp32; LoRAs applied, not dropped; graphs it cannot run fall back with one log line;
the CLI, the server and the batch take `--provider openvino[:precision]`."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sd_onnx.runtime import DiffusionPipeline, session
from sd_onnx.runtime.openvino_engine import OpenVinoModel, default_precision, openvino_version

from .test_families import lcm  # noqa: F401 - module fixtures reused
from .test_inpaint import picture
from .test_lora import loras  # noqa: F401
from .test_tiny_vae import taesd, with_tiny  # noqa: F401

PROMPT = "a red circle on a blue background"
EXACT = "openvino:f32"


@pytest.fixture(autouse=True)
def auto_may_pick_openvino(monkeypatch: pytest.MonkeyPatch) -> None:
    """This module tests `auto`'s choice: lift conftest's SD_ONNX_AUTO_OPENVINO=0."""
    monkeypatch.delenv("SD_ONNX_AUTO_OPENVINO")


def pixels(folder: Path, provider: str, **call) -> tuple[np.ndarray, DiffusionPipeline]:
    options = {key: call.pop(key) for key in ("low_memory", "loras", "vae", "cache_dir") if key in call}
    pipe = DiffusionPipeline.from_pretrained(folder, provider=provider, **options)
    out = pipe(call.pop("prompt", PROMPT), seed=3, output_type="np", **call)
    return np.asarray(out.images, np.float64), pipe


def assert_same_pixels(folder: Path, **call) -> DiffusionPipeline:
    """OpenVINO in f32 draws what onnxruntime draws (float kernels differ in rounding only), every graph on it."""
    expected, _ = pixels(folder, "cpu", **dict(call))
    got, pipe = pixels(folder, EXACT, **dict(call))
    assert np.abs(got - expected).mean() <= 0.1 / 255 and np.abs(got - expected).max() <= 4 / 255
    for name, model in pipe._models.items():
        assert isinstance(model, OpenVinoModel) and model.provider == "OpenVINO" and model.precision == "f32", name
    return pipe


def test_openvino_is_installed_with_the_dev_extra() -> None:
    assert openvino_version() is not None


@pytest.mark.parametrize("mode", ["txt2img", "img2img", "inpaint", "tiled", "guidance-interval"])
def test_sd_modes_match_the_cpu_provider(tiny_export: Path, mode: str) -> None:
    call = {"num_inference_steps": 4}
    if mode == "img2img":
        call |= {"image": picture(0), "strength": 0.7}
    if mode == "inpaint":
        call |= {"image": picture(0), "mask_image": picture(1, "L")}
    if mode == "tiled":
        call |= {"width": 64, "height": 64, "vae_tiling": True}
    if mode == "guidance-interval":  # batch 2 and batch 1 alternate: two compiled shapes of one graph
        call |= {"guidance_interval": (0.5, float("inf"))}
    assert_same_pixels(tiny_export, **call)


def test_low_memory_mode_frees_each_graph(tiny_export: Path) -> None:
    pipe = assert_same_pixels(tiny_export, num_inference_steps=3, low_memory=True)
    assert pipe.loaded_components == ()


@pytest.mark.parametrize("which", ["sdxl", "refiner", "inpainting-unet", "lcm", "turbo"])
def test_families_match_the_cpu_provider(which, tiny_sdxl, tiny_sdxl_refiner, tiny_inpaint, lcm, tiny_export) -> None:  # noqa: F811
    cases = {
        "sdxl": (tiny_sdxl[1], {"num_inference_steps": 3}),
        "refiner": (tiny_sdxl_refiner[1], {"image": picture(2), "strength": 0.6, "num_inference_steps": 4}),
        "inpainting-unet": (tiny_inpaint[1], {"image": picture(0), "mask_image": picture(1, "L")}),
        "lcm": (lcm[0].parent / "onnx", {"num_inference_steps": 2, "guidance_scale": 4.0}),
        "turbo": (tiny_export, {"num_inference_steps": 1, "guidance_scale": 0.0}),
    }
    folder, call = cases[which]
    assert_same_pixels(folder, num_inference_steps=call.pop("num_inference_steps", 3), **call)


def test_tiny_autoencoder(with_tiny: Path) -> None:  # noqa: F811
    pipe = assert_same_pixels(with_tiny, num_inference_steps=3, vae="tiny")
    assert "tiny_vae_decoder" in pipe.loaded_components


def test_load_time_loras_are_applied(tiny_export: Path, loras) -> None:  # noqa: F811
    applied = [(loras[0], 0.8), (loras[1], 0.5)]
    assert_same_pixels(tiny_export, num_inference_steps=3, loras=applied)
    plain, _ = pixels(tiny_export, EXACT, num_inference_steps=3)
    with_lora, _ = pixels(tiny_export, EXACT, num_inference_steps=3, loras=applied)
    assert np.abs(plain - with_lora).mean() > 5 / 255  # the LoRAs change the picture: not dropped


@pytest.mark.parametrize("accelerator", [{"deepcache_interval": 2}, {"tome_ratio": 0.5}, {"low_memory": True}])
def test_shipped_models_derived_graphs_and_stages(accelerator: dict) -> None:
    """DeepCache's shallow UNet, ToMe's graph and the UNet stages (low-memory) of the shipped model."""
    from sd_onnx.models.shapes import shipped_model

    pipe = assert_same_pixels(shipped_model(), num_inference_steps=4, **accelerator)
    if "low_memory" in accelerator:
        assert pipe.loaded_components == ()


def test_int8_and_bf16_stay_as_close_to_fp32_as_onnxruntime_int8() -> None:
    """OpenVINO rounds int8 its own way (its kernels requantize differently): the bound is the distance from the
    fp32 picture, which may not grow by more than 2/255 against onnxruntime's int8; bf16 likewise."""
    from sd_onnx.models.shapes import shipped_model

    call = {"num_inference_steps": 12}
    fp32, _ = pixels(shipped_model(), "cpu", **call)
    ort_int8, _ = pixels(shipped_model("int8"), "cpu", **call)
    reference = np.abs(ort_int8 - fp32).mean()
    for folder, provider in ((shipped_model("int8"), EXACT), (shipped_model("int8"), "openvino:bf16"),
                             (shipped_model(), "openvino:bf16")):  # fmt: skip
        got, pipe = pixels(folder, provider, **call)
        assert np.abs(got - fp32).mean() <= reference + 2 / 255, (folder.name, provider)
        assert pipe.component("unet").precision == ("bf16" if "bf16" in provider and bf16_cpu() else "f32")


def bf16_cpu() -> bool:
    return bool({"avx512_bf16", "amx_bf16"} & session.cpu_flags())


def test_a_graph_openvino_cannot_read_falls_back_with_one_line(tiny_export, monkeypatch, caplog, tmp_path) -> None:
    import sd_onnx.runtime.openvino_engine as engine

    real = engine._core()

    class Refusing:
        def read_model(self, path: str):
            if "unet" in path:
                raise RuntimeError("OpenVINO does not support the following ONNX operations: Frobnicate\nmore")
            return real.read_model(path)

        def __getattr__(self, name: str):
            return getattr(real, name)

    monkeypatch.setattr(engine, "_core", lambda: Refusing())
    with caplog.at_level(logging.WARNING, logger="sd_onnx"):  # a new cache: nothing compiled before to load
        got, pipe = pixels(tiny_export, EXACT, num_inference_steps=3, cache_dir=tmp_path)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "openvino cannot run unet (OpenVINO does not support the following ONNX operations: Frobnicate); "
        "running it on onnxruntime's CPU provider"
    ]
    assert pipe.component("unet").provider == "CPUExecutionProvider"
    assert pipe.component("text_encoder").provider == "OpenVINO"
    expected, _ = pixels(tiny_export, "cpu", num_inference_steps=3)
    assert np.abs(got - expected).max() <= 4 / 255


def test_a_shape_openvino_cannot_compile_falls_back_at_the_call(tiny_export: Path, monkeypatch, caplog) -> None:
    pipe = DiffusionPipeline.from_pretrained(tiny_export, provider=EXACT)
    decoder = pipe.component("vae_decoder")

    def refuse(feeds):
        raise session.EngineUnavailable("Cannot compile Convolution: kernel not found")

    monkeypatch.setattr(decoder, "_compiled_for", refuse)
    with caplog.at_level(logging.WARNING, logger="sd_onnx"):
        got = np.asarray(pipe(PROMPT, seed=3, num_inference_steps=3, output_type="np").images)
        again = np.asarray(pipe(PROMPT, seed=3, num_inference_steps=3, output_type="np").images)
    assert [r.getMessage() for r in caplog.records] == [
        "openvino cannot run vae_decoder (Cannot compile Convolution: kernel not found); "
        "running it on onnxruntime's CPU provider"
    ]  # once, not per call
    assert decoder.provider == "CPUExecutionProvider" and np.array_equal(got, again)


def test_without_openvino_the_cpu_provider_runs(tiny_export: Path, monkeypatch) -> None:
    monkeypatch.setattr(session, "openvino_version", lambda: None)
    with pytest.warns(UserWarning, match=r"openvino is not installed \(pip install 'sd-onnx\[openvino\]'\)"):
        pipe = DiffusionPipeline.from_pretrained(tiny_export, provider="openvino")
    assert pipe.component("unet").provider == "CPUExecutionProvider"
    assert session.resolve_providers("auto") == ["CPUExecutionProvider"]


AMX = {"amx_bf16", "amx_int8", "amx_tile", "avx512_bf16", "avx512_vnni"}


@pytest.mark.parametrize("flags", [{"avx512_vnni", "avx512_bf16"}, {"avx512_vnni"}, {"avx2"}])
def test_auto_puts_the_unet_on_openvino_where_measured_faster(flags: set[str], tiny_export: Path, monkeypatch) -> None:
    """AVX-512 bf16 without AMX: the UNet's graphs on OpenVINO, the rest on onnxruntime; without bf16 all on
    onnxruntime (AMX: test_auto_puts_every_graph_on_openvino_with_amx)."""
    monkeypatch.setattr(session, "cpu_flags", lambda: frozenset(flags))
    faster = bool({"amx_int8", "avx512_bf16"} & flags)
    assert session.resolve_providers("auto") == (
        ["OpenVINO", "CPUExecutionProvider"] if faster else ["CPUExecutionProvider"]
    )
    pipe = DiffusionPipeline.from_pretrained(tiny_export, provider="auto", low_memory=True)
    for name in ("text_encoder", "unet", "vae_decoder"):
        expected = "OpenVINO" if faster and name == "unet" else "CPUExecutionProvider"
        assert pipe.component(name).provider == expected, name
    out = pipe(PROMPT, num_inference_steps=2, seed=1)
    engine = f"OpenVINO {openvino_version()} {default_precision()} for unet, onnxruntime "
    assert (out.parameters.get("Engine", "").startswith(engine)) == faster, out.parameters


def test_auto_puts_every_graph_on_openvino_with_amx(tiny_export: Path, monkeypatch) -> None:
    monkeypatch.setattr(session, "cpu_flags", lambda: frozenset(AMX))
    assert session.auto_openvino_components() is None
    for family in ("sd3", "flux", "flux2", "sana", "z_image"):  # measured on onnxruntime only: they stay there
        assert session.openvino_placement("auto", family) == ("unet",)
    pipe = DiffusionPipeline.from_pretrained(tiny_export, provider="auto", low_memory=True)
    assert all(pipe.component(name).provider == "OpenVINO" for name in ("text_encoder", "unet", "vae_decoder"))
    assert session.describe_engines()["auto"].startswith("OpenVINO for every graph (the CPU has amx_bf16")
    engine = pipe(PROMPT, num_inference_steps=2, seed=1).parameters["Engine"]
    assert engine == f"OpenVINO {openvino_version()} {default_precision()}"
    monkeypatch.setenv("SD_ONNX_AUTO_OPENVINO", "0")  # the same engine on every CPU class, when asked
    assert session.resolve_providers("auto") == ["CPUExecutionProvider"]
    assert session.describe_engines()["auto"] == "CPUExecutionProvider (SD_ONNX_AUTO_OPENVINO=0)"


def test_provider_strings(tiny_export: Path) -> None:
    assert session.split_provider("openvino:bf16") == ("openvino", "bf16")
    assert session.split_provider("CPUExecutionProvider") == ("CPUExecutionProvider", None)
    for bad, message in (("openvino:f64", "unknown precision 'f64'"), ("cpu:f32", "only openvino takes a precision"),
                         ("openvino:", "unknown precision ''")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            DiffusionPipeline.from_pretrained(tiny_export, provider=bad)
    with pytest.raises(ValueError, match="unknown precision 'int4'"):
        DiffusionPipeline.from_pretrained(tiny_export, provider="openvino", precision="int4")
    with pytest.raises(ValueError, match="'openvino:f32' and precision='bf16' disagree"):
        DiffusionPipeline.from_pretrained(tiny_export, provider="openvino:f32", precision="bf16")
    assert session.split_provider("OpenVINO:F32") == ("OpenVINO", "f32")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "sd_onnx.runtime.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_cli_prompt_info_and_batch(tiny_export: Path, tmp_path: Path) -> None:
    expected, _ = pixels(tiny_export, EXACT, num_inference_steps=3)
    run = run_cli("prompt", PROMPT, "-m", str(tiny_export), "--steps", "3", "--seed", "3",
                  "--provider", EXACT, "-o", str(tmp_path / "a.png"))  # fmt: skip
    assert run.returncode == 0, run.stderr
    made = Image.open(tmp_path / "a.png")
    assert np.array_equal(np.asarray(made), (expected[0] * 255).round().astype(np.uint8))
    assert f"Engine: OpenVINO {openvino_version()} f32" in made.text["parameters"]
    bad = run_cli("prompt", PROMPT, "-m", str(tiny_export), "--provider", "openvino:f64", "-o", str(tmp_path / "b.png"))
    last = bad.stderr.strip().splitlines()[-1]
    assert (
        bad.returncode == 1
        and last == "Error: provider 'openvino:f64': unknown precision 'f64' (known: auto, f32, bf16)"
    )
    info = run_cli("info", str(tiny_export))
    assert info.returncode == 0, info.stderr
    assert f"openvino: {openvino_version()} (CPU; float layers in {default_precision()} unless openvino:f32)" in (
        info.stdout
    )
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"prompt": PROMPT, "seed": 3, "steps": 3, "id": "a"}) + "\n")
    run = run_cli("batch", str(tmp_path / "prompts.jsonl"), str(tmp_path / "out"), "-m", str(tiny_export),
                  "--provider", EXACT)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "a.png")), np.asarray(made))


def test_server(tiny_export: Path) -> None:
    import base64
    import io

    import httpx

    from .test_server import Server

    expected, _ = pixels(tiny_export, EXACT, num_inference_steps=3)
    server = Server(tiny_export, "--provider", EXACT)
    try:
        r = httpx.post(f"{server.url}/sdapi/v1/txt2img", json={"prompt": PROMPT, "steps": 3, "seed": 3}, timeout=60)
        assert r.status_code == 200, r.text
        got = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
        assert np.array_equal(np.asarray(got), (expected[0] * 255).round().astype(np.uint8))
    finally:
        server.stop()


def test_unet_fidelity_bounds_on_the_shipped_model(tmp_path: Path) -> None:
    """The bounds on a trained model: the int8 UNet on OpenVINO keeps a mean cosine >= 0.99 against fp32 on
    onnxruntime and loses at most 0.005 against onnxruntime's int8 at its worst input; fp32 in bf16 stays within
    0.001 (at 20 steps the worst int8 input is near 0.97 on both engines: benchmarks/results)."""
    from click.testing import CliRunner

    from sd_onnx.benchmarks.cli import main
    from sd_onnx.models.shapes import shipped_model

    out = tmp_path / "fidelity.json"
    args = ["engine-fidelity", str(shipped_model()), str(shipped_model("int8")), "--size", "64", "--steps", "4"]
    result = CliRunner().invoke(main, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["rows"]
    assert set(rows) == {"int8@cpu", "int8@openvino", "int8@openvino:f32", "fp32@openvino"}
    for name in ("int8@openvino", "int8@openvino:f32"):
        assert rows[name]["cosine_mean"] >= 0.99, (name, rows)
        assert rows[name]["cosine_min"] >= rows["int8@cpu"]["cosine_min"] - 0.005, (name, rows)
    assert rows["fp32@openvino"]["cosine_min"] >= 0.999 and rows["int8@cpu"]["cosine_min"] < 1.0


def test_compiled_models_are_kept_on_disk_and_mapped_on_the_next_load(tiny_export, monkeypatch, tmp_path) -> None:
    import sd_onnx.runtime.openvino_engine as engine

    first, _ = pixels(tiny_export, EXACT, num_inference_steps=2, cache_dir=tmp_path)
    blobs = sorted((tmp_path / "openvino").glob("*.blob"))
    assert blobs and not list((tmp_path / "openvino").glob("*.partial"))
    real, reads = engine._core(), []

    class Counting:
        def read_model(self, path: str):
            reads.append(Path(path).parent.name)
            return real.read_model(path)

        def __getattr__(self, name: str):
            return getattr(real, name)

    monkeypatch.setattr(engine, "_core", lambda: Counting())
    again, _ = pixels(tiny_export, EXACT, num_inference_steps=2, cache_dir=tmp_path)
    assert reads == [] and np.array_equal(first, again)  # every graph imported from its compiled file
    biggest = max(blobs, key=lambda p: p.stat().st_size)
    biggest.write_bytes(b"truncated")  # a damaged file is compiled anew and rewritten, not trusted
    damaged, _ = pixels(tiny_export, EXACT, num_inference_steps=2, cache_dir=tmp_path)
    assert len(reads) == 1 and np.array_equal(first, damaged) and biggest.stat().st_size > 100
    smallest = min(blobs, key=lambda p: p.stat().st_size)
    smallest.write_bytes(biggest.read_bytes())  # a valid compiled file, but another graph's
    swapped, _ = pixels(tiny_export, EXACT, num_inference_steps=2, cache_dir=tmp_path)
    assert len(reads) == 2 and np.array_equal(first, swapped)
    sizes = [64, 56, 48, 40, 32]  # five shapes of the UNet: the oldest compiled file goes
    for size in sizes:
        pixels(tiny_export, EXACT, num_inference_steps=1, width=size, height=size, cache_dir=tmp_path)
    unet = engine.BlobCache(
        tmp_path / "openvino",
        DiffusionPipeline.from_pretrained(tiny_export).manifest.components["unet"],
        {"INFERENCE_PRECISION_HINT": "f32"},
    )
    assert len(list((tmp_path / "openvino").glob(f"{unet.prefix}-*.blob"))) == engine.BLOBS_KEPT
