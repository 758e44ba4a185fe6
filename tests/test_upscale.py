"""Upscalers: `sd-export upscaler` (RRDBNet and SRVGGNetCompact checkpoints, .pth read weights-only and
.safetensors, validated against PyTorch, int8 kept only when it holds PSNR), the torch-free tiled runtime
(`runtime/upscale.py`: tiled result against untiled PyTorch, A1111's pass-then-Lanczos sizes), `sd-run upscale`,
and the A1111 routes (/sdapi/v1/upscalers, latent-upscale-modes, extra-single-image, extra-batch-images) through
the server app on the shipped model, also with the webuiapi client itself."""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import pickle
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from fastapi.testclient import TestClient
from PIL import Image, PngImagePlugin
from safetensors.torch import save_file

from sd_onnx.exporter import upscaler_int8
from sd_onnx.exporter.cli import main as export_main
from sd_onnx.exporter.errors import ExportError
from sd_onnx.exporter.upscaler import export_upscaler, read_state_dict
from sd_onnx.exporter.upscaler_arch import CompactConfig, RRDBConfig, RRDBNet, SRVGGNetCompact
from sd_onnx.runtime.cli import main as run_main
from sd_onnx.runtime.files import UntrustedFileError
from sd_onnx.runtime.pipeline import StableDiffusionPipeline
from sd_onnx.runtime.server.app import ServeConfig, ServerState, create_app
from sd_onnx.runtime.shipped import shipped_model
from sd_onnx.runtime.upscale import Upscaler, image_resizers, load_upscalers, plan, upscale_image
from sd_onnx.runtime.upscale_tiles import spans, weights

LOG = lambda line: None  # noqa: E731


def rrdb(config: RRDBConfig) -> RRDBNet:
    """A seeded RRDBNet whose output lies mostly inside [0, 1] (random weights alone give a black image)."""
    torch.manual_seed(0)
    model = RRDBNet(config).eval()
    with torch.no_grad():
        model.conv_last.weight.mul_(8)
        model.conv_last.bias.fill_(0.5)
    return model


def compact() -> SRVGGNetCompact:
    torch.manual_seed(1)
    return SRVGGNetCompact(CompactConfig(features=8, convs=2, scale=4)).eval()


def old_layout(state: dict[str, torch.Tensor], blocks: int) -> dict[str, torch.Tensor]:
    """The same weights as the original ESRGAN repository names them (model.N, model.1.sub.N.RDBM.convK.0)."""
    names = {"conv_first": "model.0", "conv_body": f"model.1.sub.{blocks}", "conv_up1": "model.3",
             "conv_up2": "model.6", "conv_hr": "model.8", "conv_last": "model.10"}  # fmt: skip
    out = {}
    for key, value in state.items():
        head, _, tail = key.partition(".")
        if head == "body":
            index, rdb, conv, kind = tail.split(".")
            out[f"model.1.sub.{index}.RDB{rdb[-1]}.{conv}.0.{kind}"] = value
        else:
            out[f"{names[head]}.{tail}"] = value
    return out


def image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth colour field with some texture, as a photo has."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray((rng.random((4, 4, 3)) * 255).astype(np.uint8)).resize((width, height))
    noise = rng.normal(0, 12, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(coarse) + noise, 0, 255).astype(np.uint8))


def torch_upscale(model: torch.nn.Module, picture: Image.Image) -> np.ndarray:
    """The untiled PyTorch result as 8-bit pixels, rounded as the runtime rounds."""
    x = torch.from_numpy(np.asarray(picture, np.float32) / 255).permute(2, 0, 1)[None]
    with torch.no_grad():
        y = model(x)[0].permute(1, 2, 0).numpy()
    return (np.clip(y, 0, 1) * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    model = rrdb(RRDBConfig(features=8, blocks=1, growth=32))
    files = {"rrdb_pth": root / "rrdb.pth", "rrdb_st": root / "rrdb.safetensors", "old": root / "old-esrgan.pth",
             "compact": root / "compact.safetensors", "x2": root / "x2.pth"}  # fmt: skip
    torch.save({"params_ema": model.state_dict()}, files["rrdb_pth"])  # Real-ESRGAN's wrapper
    save_file(model.state_dict(), str(files["rrdb_st"]))
    torch.save(old_layout(model.state_dict(), blocks=1), files["old"])
    save_file(compact().state_dict(), str(files["compact"]))
    torch.save(rrdb(RRDBConfig(features=8, blocks=1, unshuffle=2)).state_dict(), files["x2"])
    return files


@pytest.fixture(scope="module")
def upscalers_dir(tmp_path_factory: pytest.TempPathFactory, checkpoints: dict[str, Path]) -> Path:
    root = tmp_path_factory.mktemp("upscalers")
    export_upscaler(checkpoints["rrdb_pth"], root / "RRDB-x4", tile=64, log=LOG)
    export_upscaler(checkpoints["compact"], root / "Compact-x4", tile=64, log=LOG)
    (root / ".RRDB-x4.partial-abc").mkdir()  # an export in progress is not an upscaler
    return root


# Export ---------------------------------------------------------------------------------------------------


def test_export_writes_a_validated_manifest(upscalers_dir: Path, checkpoints: dict[str, Path]) -> None:
    manifest = json.loads((upscalers_dir / "RRDB-x4" / "upscaler.json").read_text())
    assert manifest["architecture"] == "RRDBNet" and manifest["scale"] == 4 and manifest["channels"] == 3
    assert manifest["tile"] == 64 and manifest["tile_overlap"] == 16 and manifest["precision"] == "fp32"
    assert manifest["inputs"] == [{"name": "image", "shape": ["batch", 3, "height", "width"], "dtype": "float32"}]
    assert manifest["outputs"][0]["shape"] == ["batch", 3, "out_height", "out_width"]
    assert manifest["validation"]["max_abs_diff"] < 1e-4 and manifest["validation"]["input_shapes"]["image"] == [
        1, 3, 40, 48]  # fmt: skip
    assert manifest["source"]["file"] == "rrdb.pth" and manifest["hyperparameters"]["blocks"] == 1
    upscaler = Upscaler(upscalers_dir / "RRDB-x4")
    assert upscaler.manifest.sha256 == manifest["sha256"] and upscaler.name == "rrdb"


@pytest.mark.parametrize("key", ["rrdb_st", "old"])
def test_safetensors_and_the_original_esrgan_layout_load_the_same_network(
    key: str, checkpoints: dict[str, Path], upscalers_dir: Path, tmp_path: Path
) -> None:
    export_upscaler(checkpoints[key], tmp_path / "out", tile=64, log=LOG)
    picture = image(40, 24)
    reference = Upscaler(upscalers_dir / "RRDB-x4").run(picture)
    assert np.array_equal(np.asarray(Upscaler(tmp_path / "out").run(picture)), np.asarray(reference))


def test_real_esrgan_x2_unshuffles_and_the_runtime_pads_odd_sizes(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    manifest = export_upscaler(checkpoints["x2"], tmp_path / "x2", tile=64, log=LOG)
    assert manifest.scale == 2 and manifest.input_multiple == 2 and manifest.hyperparameters["unshuffle"] == 2
    assert Upscaler(tmp_path / "x2").run(image(33, 21)).size == (66, 42)


SPANDREL = textwrap.dedent(
    """
    import sys, numpy as np, torch
    try:
        import spandrel
    except (ImportError, RuntimeError):
        # spandrel imports torchvision (for LaMa and RestoreFormer only); where the installed torchvision does not
        # match torch, its import fails. Those two architectures are not loaded here: placeholders let spandrel
        # import, in this process only.
        import types
        for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional"):
            sys.modules[name] = types.ModuleType(name)
        functional = sys.modules["torchvision.transforms.functional"]
        functional.InterpolationMode = type("InterpolationMode", (), {})
        functional.rotate = functional.normalize = None
        import spandrel
    x = torch.from_numpy(np.load(sys.argv[1]))
    for i, path in enumerate(sys.argv[2:]):
        model = spandrel.ModelLoader().load_from_file(path).model.eval()
        with torch.no_grad():
            np.save(f"{sys.argv[1]}.{i}.npy", model(x).numpy())
    """
)


@pytest.mark.skipif(importlib.util.find_spec("spandrel") is None, reason="spandrel is not installed")
def test_graphs_match_spandrel(checkpoints: dict[str, Path], upscalers_dir: Path, tmp_path: Path) -> None:
    """spandrel (the loader A1111 and ComfyUI use) runs the same files; our graphs give its outputs."""
    x = np.random.default_rng(0).random((1, 3, 20, 28), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    files = [checkpoints["rrdb_pth"], checkpoints["old"], checkpoints["compact"]]
    subprocess.run([sys.executable, "-c", SPANDREL, str(tmp_path / "x.npy"), *map(str, files)], check=True)
    for i, folder in enumerate(("RRDB-x4", "RRDB-x4", "Compact-x4")):
        ours = Upscaler(upscalers_dir / folder).session()(image=x)[0]
        assert np.abs(ours - np.load(tmp_path / f"x.npy.{i}.npy")).max() < 1e-5


def test_a_pickle_that_is_not_weights_only_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self) -> tuple:
            return (open, (str(marker), "w"))  # what an attacker's file would run on load

    hostile = tmp_path / "4x-hostile.pth"
    hostile.write_bytes(pickle.dumps({"params_ema": Payload()}, protocol=2))
    result = CliRunner().invoke(export_main, ["upscaler", str(hostile), str(tmp_path / "out")])
    assert result.exit_code == 1 and not marker.exists() and not (tmp_path / "out").exists()
    assert result.output.startswith("Error: ") and result.output.count("\n") == 1
    assert "refused: not a weights-only checkpoint (Unsupported global: GLOBAL io.open); only tensors" in result.output


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"not a zip or a pickle", "refused: not a weights-only checkpoint (Unsupported operand 110)"),
        (b"PK\x03\x04 a broken zip", "not a readable PyTorch checkpoint"),
        ({"conv.weight": torch.zeros(4, 3, 3, 3)}, "not an ESRGAN (RRDBNet) or Real-ESRGAN compact"),
        ({"model.0.weight": torch.zeros(8, 3, 3, 3)}, "without its trunk"),
        ([1, 2, 3], "holds no state dict of tensors"),
    ],
)
def test_unusable_checkpoints_are_one_line_errors(content: object, message: str, tmp_path: Path) -> None:
    file = tmp_path / "model.pth"
    file.write_bytes(content) if isinstance(content, bytes) else torch.save(content, file)
    result = CliRunner().invoke(export_main, ["upscaler", str(file), str(tmp_path / "out")])
    assert result.exit_code == 1 and message in result.output and result.output.count("\n") == 1, result.output


def test_an_existing_output_needs_overwrite(checkpoints: dict[str, Path], upscalers_dir: Path) -> None:
    with pytest.raises(ExportError, match="already exists"):
        export_upscaler(checkpoints["compact"], upscalers_dir / "Compact-x4", log=LOG)
    with pytest.raises(ExportError, match="no such checkpoint"):
        read_state_dict(upscalers_dir / "missing.pth")


def test_int8_is_kept_only_when_it_holds_psnr(
    checkpoints: dict[str, Path], upscalers_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lines: list[str] = []
    manifest = export_upscaler(checkpoints["compact"], tmp_path / "int8", int8=True, tile=64, log=lines.append)
    record = manifest.quantization
    assert manifest.precision == "int8" and record["kept"] and record["psnr_min_db"] >= record["min_psnr_db"] == 35
    assert record["quantized_nodes"] == 2 and any(line.startswith("int8: kept") for line in lines)  # 4 convs, 2 kept
    picture = image(40, 24)
    int8 = np.asarray(Upscaler(tmp_path / "int8").run(picture), np.float64)
    fp32 = np.asarray(Upscaler(upscalers_dir / "Compact-x4").run(picture), np.float64)
    assert 10 * np.log10(255**2 / np.mean((int8 - fp32) ** 2)) > 30
    monkeypatch.setattr(upscaler_int8, "MIN_PSNR_DB", 200.0)
    lines.clear()
    manifest = export_upscaler(checkpoints["compact"], tmp_path / "fp32", int8=True, tile=64, log=lines.append)
    assert manifest.precision == "fp32" and not manifest.quantization["kept"]
    assert any("int8: skipped" in line and "fp32 graph is kept" in line for line in lines)
    assert np.array_equal(np.asarray(Upscaler(tmp_path / "fp32").run(picture), np.float64), fp32)


# Runtime --------------------------------------------------------------------------------------------------


def test_tiled_result_equals_untiled_pytorch_beyond_the_receptive_field(checkpoints: dict[str, Path], tmp_path: Path):
    """Tiles weight nothing within a quarter of their shared band of an edge, so with an overlap of four times
    the receptive radius (about 18 input pixels for one RRDB block) every pixel is exact: at most 1 of 255 apart,
    where float rounding crosses a half (measured: 1e-5 of the values)."""
    export_upscaler(checkpoints["rrdb_pth"], tmp_path / "rrdb", tile=320, log=LOG)
    upscaler, picture = Upscaler(tmp_path / "rrdb"), image(250, 170, seed=3)
    reference = torch_upscale(rrdb(RRDBConfig(features=8, blocks=1, growth=32)), picture).astype(np.int16)
    tiled = np.asarray(upscaler.run(picture, tile=160, overlap=80), np.int16)
    assert len(spans(250, 160, 80)) == len(spans(170, 160, 80)) + 1 == 3 and tiled.shape == (680, 1000, 3)
    assert np.abs(tiled - reference).max() <= 1 and np.mean(tiled != reference) < 1e-4
    # Small tiles (64 pixels, 16 shared) cut inside the receptive field; this model's far weights are small.
    small = np.abs(np.asarray(upscaler.run(picture, tile=64, overlap=16), np.int16) - reference)
    assert small.max() <= 2 and small.mean() < 1e-3


def test_compact_tiles_are_exact_at_the_default_overlap(upscalers_dir: Path) -> None:
    """SRVGGNetCompact with 4 convolutions sees 4 pixels around: 16 shared pixels are enough."""
    picture = image(150, 100, seed=5)
    tiled = np.asarray(Upscaler(upscalers_dir / "Compact-x4").run(picture), np.int16)
    assert np.abs(tiled - torch_upscale(compact(), picture)).max() <= 1


def test_blend_weights_sum_to_one_and_stay_off_tile_edges() -> None:
    for length, tile, overlap in ((300, 160, 80), (1000, 64, 16), (65, 64, 16), (181, 100, 20)):
        axis = spans(length, tile, overlap)
        assert axis[0][0] == 0 and axis[-1][1] == length and all(b - a == min(tile, length) for a, b in axis)
        total = np.zeros(length * 2)
        for i, (a, b) in enumerate(axis):
            w = weights(axis, i, 2)
            total[a * 2 : b * 2] += w
            if i > 0:  # nothing from the outer quarter of the band shared with the previous tile
                assert not w[: (axis[i - 1][1] - a) // 4 * 2].any()
        assert np.all(total > 0.999) and np.all(total < 1.001)


def test_upscale_image_follows_a1111(upscalers_dir: Path) -> None:
    ups = load_upscalers(upscalers_dir)
    assert list(ups) == ["Compact-x4", "RRDB-x4"]
    picture = image(40, 30)
    assert upscale_image(picture, "Lanczos", 2.0, ups).tobytes() == picture.resize((80, 60), Image.LANCZOS).tobytes()
    assert upscale_image(picture, "None", (50, 20), ups).size == (50, 20)
    assert upscale_image(picture, "Nearest", 3, ups).tobytes() == picture.resize((120, 90), Image.NEAREST).tobytes()
    assert plan((40, 30), "RRDB-x4", 2.0, ups) == ((80, 60), [(160, 120)])  # one x4 pass, then Lanczos down
    assert plan((40, 30), "RRDB-x4", 8.0, ups) == ((320, 240), [(160, 120), (640, 480)])
    assert plan((40, 30), "RRDB-x4", 1.0, ups) == ((40, 30), [(160, 120)])  # x1: the model once (restoration)
    assert plan((40, 30), "RRDB-x4", 0.5, ups) == ((20, 15), [])  # a smaller target: Lanczos only
    once = np.asarray(ups["RRDB-x4"].run(picture).resize((80, 60), Image.LANCZOS))
    assert np.array_equal(np.asarray(upscale_image(picture, "RRDB-x4", 2.0, ups)), once)
    assert upscale_image(picture, "RRDB-x4", (100, 100), ups).size == (100, 100)
    resize = image_resizers(ups)["Compact-x4"]  # hires fix's (picture, width, height) form
    assert resize(picture, 96, 72).size == (96, 72)
    with pytest.raises(ValueError, match=r"unknown upscaler 'ESRGAN_4x' \(known: None, Lanczos, Nearest, Compact"):
        upscale_image(picture, "ESRGAN_4x", 2.0, ups)
    with pytest.raises(ValueError, match="makes a 640x480 image, over the limit of 100000 pixels"):
        upscale_image(picture, "RRDB-x4", 8.0, ups, max_pixels=100_000)
    for bad in (float("nan"), 0, -1, 100.0, True, (0, 5), (1.5, 2)):
        with pytest.raises(ValueError):
            upscale_image(picture, "Lanczos", bad, ups)


def test_transparency_is_kept_beside_an_rgb_model(upscalers_dir: Path) -> None:
    picture = image(24, 16).convert("RGBA")
    picture.putalpha(Image.new("L", picture.size, 128))
    out = Upscaler(upscalers_dir / "Compact-x4").run(picture)
    assert out.mode == "RGBA" and out.size == (96, 64) and out.getchannel("A").getextrema() == (128, 128)


def test_damaged_or_hostile_folders_are_refused(upscalers_dir: Path, tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(upscalers_dir / "Compact-x4", folder)
    with open(folder / "model.onnx", "ab") as graph:
        graph.write(b"\0")
    with pytest.raises(UntrustedFileError, match="sha256 differs"):
        Upscaler(folder)
    manifest = json.loads((folder / "upscaler.json").read_text())
    hostile = (("graph", "../../etc/passwd", "is not a path inside"), ("scale", 99, "scale: 99"),
               ("tile_overlap", 64, "tile_overlap"), ("channels", "3", "expected an integer"))  # fmt: skip
    for field, value, message in hostile:
        (folder / "upscaler.json").write_text(json.dumps({**manifest, field: value}))
        with pytest.raises(UntrustedFileError, match=message):
            Upscaler(folder)
    (tmp_path / "Lanczos").mkdir()
    with pytest.raises(UntrustedFileError, match="name of a built-in upscaler"):
        load_upscalers(tmp_path)


# sd-run upscale -------------------------------------------------------------------------------------------


def test_cli_upscales_and_records_the_upscale_in_the_png(upscalers_dir: Path, tmp_path: Path) -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a red circle\nSteps: 20, Seed: 7")
    image(40, 30).save(tmp_path / "in.png", pnginfo=info)
    out = tmp_path / "out" / "big.png"
    args = ["upscale", str(tmp_path / "in.png"), "-o", str(out), "--model", str(upscalers_dir / "RRDB-x4")]
    result = CliRunner().invoke(run_main, [*args, "--tile", "32"])
    assert result.exit_code == 0, result.output
    written = Image.open(out)
    assert written.size == (160, 120) and written.text["parameters"] == "a red circle\nSteps: 20, Seed: 7"
    assert written.text["postprocessing"] == "Postprocess upscale by: 4, Postprocess upscaler: rrdb"
    result = CliRunner().invoke(run_main, [*args[:-2], "--model", "Lanczos", "--scale", "1.5"])
    assert result.exit_code == 0 and Image.open(out).size == (60, 45)
    assert Image.open(out).text["postprocessing"] == "Postprocess upscale by: 1.5, Postprocess upscaler: Lanczos"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"--model": "{tmp}/none"}, "Error: --model: {tmp}/none: no such upscaler folder (or name a resampler: None"),
        ({"--model": "{ckpt}"}, "Error: --model: {ckpt}: is a file; export it first: sd-export upscaler {ckpt}"),
        ({"IMAGE": "{tmp}/bad.png"}, "Error: IMAGE: {tmp}/bad.png: not a readable image"),
        ({"IMAGE": "{tmp}/missing.png"}, "Error: IMAGE: {tmp}/missing.png: not a regular file"),
        ({"--scale": "nan"}, "Error: --scale: must be a number in (0, 64], got nan"),
        (
            {"IMAGE": "{tmp}/big.png", "--scale": "64"},
            "Error: --scale: upscaling 160x120 to 10240x7680 with rrdb "
            "makes a 10240x7680 image, over the limit of 67108864 pixels",
        ),  # fmt: skip
        ({"--tile": "8"}, "Error: --tile: must be in 32..8192, got 8"),
        ({"-o": "{tmp}/out.jpg"}, "Error: {tmp}/out.jpg: sd-run writes PNG files"),
    ],
)
def test_cli_errors_are_one_line(
    change: dict, message: str, upscalers_dir: Path, checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    image(40, 30).save(tmp_path / "in.png")
    image(160, 120).save(tmp_path / "big.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    fill = {"{tmp}": str(tmp_path), "{ckpt}": str(checkpoints["compact"])}
    options = {"IMAGE": "{tmp}/in.png", "-o": "{tmp}/out.png", "--model": str(upscalers_dir / "RRDB-x4"), **change}
    for placeholder, value in fill.items():
        options = {k: v.replace(placeholder, value) for k, v in options.items()}
        message = message.replace(placeholder, value)
    args = ["upscale", options.pop("IMAGE")] + [item for pair in options.items() for item in pair]
    result = CliRunner().invoke(run_main, args)
    assert result.exit_code == 1 and result.output.count("\n") == 1 and result.output.startswith(message), result.output
    assert not (tmp_path / "out.png").exists()


def test_serve_refuses_a_bad_upscalers_dir_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(run_main, ["serve", "--upscalers-dir", str(tmp_path / "missing")])
    assert result.exit_code == 1 and result.output == f"Error: {tmp_path / 'missing'}: no such folder of upscalers\n"
    result = CliRunner().invoke(run_main, ["serve", "--upscalers-dir", str(tmp_path)])
    assert result.exit_code == 1 and "empty: has no upscaler.json" in result.output


# Server ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe() -> StableDiffusionPipeline:
    return StableDiffusionPipeline.from_pretrained(shipped_model(), provider="cpu")


def app_client(pipe: StableDiffusionPipeline, config: ServeConfig) -> Iterator[TestClient]:
    with TestClient(create_app(ServerState(config), loader=lambda: pipe)) as client:
        while client.get("/health").status_code != 200:
            time.sleep(0.05)
        yield client


@pytest.fixture(scope="module")
def client(pipe: StableDiffusionPipeline, upscalers_dir: Path) -> Iterator[TestClient]:
    yield from app_client(pipe, ServeConfig(upscalers_dir=upscalers_dir))


def b64(picture: Image.Image, data_url: bool = True) -> str:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    text = base64.b64encode(buffer.getvalue()).decode()
    return "data:image/png;base64," + text if data_url else text


def png(text: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(text)))


def test_upscaler_lists_have_a1111_shapes(client: TestClient) -> None:
    upscalers = client.get("/sdapi/v1/upscalers").json()
    assert [u["name"] for u in upscalers] == ["None", "Lanczos", "Nearest", "Compact-x4", "RRDB-x4"]
    assert upscalers[0] == {"name": "None", "model_name": None, "model_path": None, "model_url": None, "scale": 4}
    assert upscalers[4] == {"name": "RRDB-x4", "model_name": "rrdb", "model_path": "RRDB-x4", "model_url": None,
                            "scale": 4}  # fmt: skip
    assert client.get("/sdapi/v1/latent-upscale-modes").json() == [
        {"name": "Latent"}, {"name": "Latent (antialiased)"}, {"name": "Latent (bicubic)"},
        {"name": "Latent (bicubic antialiased)"}, {"name": "Latent (nearest)"}, {"name": "Latent (nearest-exact)"},
    ]  # fmt: skip


def test_webuiapi_client_upscales(client: TestClient) -> None:
    webuiapi = pytest.importorskip("webuiapi")
    api = webuiapi.WebUIApi(baseurl="http://testserver/sdapi/v1")
    api.session = client  # the package's own requests, answered by the app in process
    assert "RRDB-x4" in [u["name"] for u in api.get_upscalers()]
    picture = image(41, 30)
    single = api.extra_single_image(picture, upscaler_1="RRDB-x4", upscaling_resize=2)
    assert single.image.size == (80, 56)  # A1111 rounds 82x60 down to multiples of 8
    assert single.info == "<p>Postprocess upscale by: 2, Postprocess upscaler: RRDB-x4</p>"
    assert single.image.text["postprocessing"] == "Postprocess upscale by: 2, Postprocess upscaler: RRDB-x4"
    batch = api.extra_batch_images([picture, image(16, 16, 1)], upscaler_1="Compact-x4", upscaler_2="Lanczos",
                                   extras_upscaler_2_visibility=0.5, upscaling_resize=4)  # fmt: skip
    assert [i.size for i in batch.images] == [(160, 120), (64, 64)]
    assert "Postprocess upscaler 2: Lanczos" in batch.info


def test_extra_single_image_resize_to_with_crop_and_unimplemented_fields(client: TestClient) -> None:
    body = {"image": b64(image(40, 30), data_url=False), "resize_mode": 1, "upscaling_resize_w": 100,
            "upscaling_resize_h": 60, "upscaler_1": "Nearest", "gfpgan_visibility": 0.5, "hr_fix": 1}  # fmt: skip
    r = client.post("/sdapi/v1/extra-single-image", json=body)
    assert r.status_code == 200, r.text
    assert png(r.json()["image"]).size == (100, 60)
    assert r.json()["html_info"] == (
        "<p>Postprocess upscale to: 100x60, Postprocess upscaler: Nearest, Postprocess crop to: 100x60<br>\n"
        "Not applied (not implemented here): gfpgan_visibility=0.5, hr_fix</p>"
    )
    body.update(upscaling_crop=False)
    assert png(client.post("/sdapi/v1/extra-single-image", json=body).json()["image"]).size == (96, 72)
    body = {"image": b64(image(40, 30)), "upscaler_1": "None", "upscaling_resize": 4}
    r = client.post("/sdapi/v1/extra-single-image", json=body)
    assert png(r.json()["image"]).size == (40, 30) and r.json()["html_info"] == "<p></p>"  # A1111: no upscale


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        ({"upscaler_1": "4x-UltraSharp"}, "upscaler_1: unknown upscaler '4x-UltraSharp' (known: None, Lanczos"),
        ({"upscaler_2": 3}, "upscaler_2: Input should be a valid string"),
        ({"upscaling_resize": 9}, "upscaling_resize: Input should be less than or equal to 8"),
        ({"upscaling_resize": "2"}, "upscaling_resize: Input should be a valid number"),
        ({"image": "not base64!"}, "image: not valid base64"),
        ({"image": base64.b64encode(b"GIF89a...").decode()}, "image: not a readable image"),
        (
            {"upscaler_1": "RRDB-x4", "upscaling_resize": 8},
            "upscaling_resize: upscaling 40x30 to 320x240 with "
            "RRDB-x4 makes a 640x480 image, over the limit of 262144 pixels",
        ),  # fmt: skip
        ({"resize_mode": 1, "upscaling_resize_w": 4, "upscaling_resize_h": 3}, "upscaling_resize_w: 40x30 scaled by"),
    ],
)
def test_extras_refusals_name_the_field(client: TestClient, body: dict, detail: str) -> None:
    r = client.post("/sdapi/v1/extra-single-image", json={"image": b64(image(40, 30)), "upscaler_1": "Lanczos", **body})
    assert r.status_code == 422 and r.json()["detail"].startswith(detail), r.text


def test_batch_refusals_name_the_image(client: TestClient) -> None:
    good = {"data": b64(image(8, 8)), "name": "a.png"}
    r = client.post("/sdapi/v1/extra-batch-images", json={"imageList": [good, {"data": "eA==", "name": "b"}]})
    assert r.status_code == 422 and r.json()["detail"].startswith("imageList[1].data: not a readable image")
    r = client.post("/sdapi/v1/extra-batch-images", json={"imageList": []})
    assert r.status_code == 422 and r.json()["detail"].startswith("imageList:")
    r = client.post("/sdapi/v1/extra-batch-images", json={"imageList": [good] * 5})
    assert r.status_code == 422 and r.json()["detail"] == "imageList: at most 4 images (--max-batch)"


def test_an_upscale_past_the_timeout_is_answered_504_and_stopped(pipe: StableDiffusionPipeline, upscalers_dir: Path):
    for client in app_client(pipe, ServeConfig(upscalers_dir=upscalers_dir, timeout_s=0.01)):
        body = {"image": b64(image(100, 75)), "upscaler_1": "RRDB-x4", "upscaling_resize": 2}
        r = client.post("/sdapi/v1/extra-single-image", json=body)
        assert r.status_code == 504 and r.json()["detail"] == "upscaling exceeded the limit timeout_s=0.01"
