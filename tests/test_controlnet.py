"""ControlNet: export (graphs vs PyTorch, the UNet that takes residuals), parity with diffusers' ControlNet
pipelines (one and two ControlNets, guess mode, guidance windows, img2img), request checks, the CLIs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sd_onnx.exporter.errors import ExportError
from sd_onnx.runtime.controlnet import ControlUnit
from sd_onnx.runtime.manifest import Manifest
from sd_onnx.runtime.pipeline import DiffusionPipeline
from sd_onnx.runtime.request import GenerationRequest, RequestError

TOLERANCE = 1 / 255
PROMPT = "a red circle"
COMMON = {"num_inference_steps": 3, "height": 64, "width": 64}


@pytest.fixture(scope="module")
def controlnets(tiny_pipeline: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from sd_onnx.models.build import build_controlnet

    root = tmp_path_factory.mktemp("controlnets")
    return {name: build_controlnet(tiny_pipeline, root / f"control_{name}", seed) for name, seed in
            (("canny", 1), ("depth", 2))}  # fmt: skip


@pytest.fixture(scope="module")
def export(tiny_pipeline: Path, controlnets: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sd_onnx.exporter.controlnet import ControlNetSource
    from sd_onnx.exporter.convert import convert

    out = tmp_path_factory.mktemp("controlnet_export") / "tiny-control"
    sources = [ControlNetSource.parse(f"{path}:{name}") for name, path in controlnets.items()]
    convert(str(tiny_pipeline), out, controlnets=sources, log=lambda line: None)
    return out


@pytest.fixture(scope="module")
def ours(export: Path):
    return DiffusionPipeline.from_pretrained(export, provider="cpu")  # fp32 (auto may pick OpenVINO's bf16)


def control_images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)) for _ in range(2)]  # resized to 64


def diffusers_images(pipeline_class, tiny_pipeline: Path, controlnets: list[Path], seed: int, **kwargs) -> np.ndarray:
    from diffusers import ControlNetModel

    models = [ControlNetModel.from_pretrained(path) for path in controlnets]
    pipe = pipeline_class.from_pretrained(tiny_pipeline, controlnet=models if len(models) > 1 else models[0],
                                          safety_checker=None, requires_safety_checker=False)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe(generator=torch.Generator().manual_seed(seed), output_type="np", **kwargs).images


def mean_abs(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(np.asarray(a, np.float64) - b).mean())


def test_export_records_controlnets_and_checks_the_control_unet_against_pytorch(export: Path) -> None:
    manifest = Manifest.load(export)
    assert list(manifest.config.controlnets) == ["canny", "depth"]
    assert manifest.config.controlnets["canny"]["conditioning"] == "canny"  # from its source's name
    residuals = manifest.config.controlnets["canny"]["residuals"]
    graph = manifest.components["controlnet_canny"]
    assert [t.name for t in graph.inputs] == ["sample", "timestep", "encoder_hidden_states", "controlnet_cond"]
    assert [t.name for t in graph.outputs] == [*(f"down_block_res_{i}" for i in range(residuals)), "mid_block_res"]
    assert graph.validation["max_abs_diff"] <= 1e-4
    control = manifest.components["unet_control"]
    assert control.validation["reference"] == "torch" and control.validation["max_abs_diff"] <= 1e-4
    assert {t.name for t in control.inputs} >= {"sample", "mid_block_res", f"down_block_res_{residuals - 1}"}
    assert control.file == "unet/control.onnx" and "unet/model.onnx_data" in control.files  # the UNet's weights


@pytest.mark.parametrize(
    "settings",
    [
        {"controlnet": "canny", "index": [0]},
        {"index": [0, 1], "controlnet_conditioning_scale": [0.7, 1.3], "control_guidance_end": [1.0, 0.5]},
        {"controlnet": "depth", "index": [1], "guess_mode": True, "guidance_scale": 5.0},
    ],
    ids=["one", "two-with-window", "guess-mode"],
)
def test_txt2img_matches_diffusers(ours, tiny_pipeline: Path, controlnets: dict[str, Path], settings: dict) -> None:
    """diffusers' StableDiffusionControlNetPipeline (MultiControlNetModel for two) on the same weights and seed;
    the control is visible: without it the image is farther from theirs than ours is."""
    from diffusers import StableDiffusionControlNetPipeline

    settings = dict(settings)
    index = settings.pop("index")
    images = [control_images()[i] for i in index]
    names = [list(controlnets)[i] for i in index]
    image = images if len(images) > 1 else images[0]
    got = ours(PROMPT, seed=3, output_type="np", control_image=image, **COMMON, **settings).images
    kwargs = {k: v for k, v in settings.items() if k != "controlnet"}
    want = diffusers_images(StableDiffusionControlNetPipeline, tiny_pipeline, [controlnets[n] for n in names], 3,
                            prompt=PROMPT, image=image, **COMMON, **kwargs)  # fmt: skip
    difference = mean_abs(got, want)
    assert difference <= TOLERANCE
    plain = ours(PROMPT, seed=3, output_type="np", guidance_scale=settings.get("guidance_scale"), **COMMON).images
    assert mean_abs(plain, want) > 5 * difference


def test_lcm_sampling_matches_diffusers(ours, tiny_pipeline: Path, controlnets: dict[str, Path]) -> None:
    """The few-step path (LCM's sampler, no guidance) with a ControlNet: diffusers' ControlNet pipeline with its
    LCMScheduler, same weights and seed."""
    from diffusers import ControlNetModel, LCMScheduler, StableDiffusionControlNetPipeline

    control = control_images()[0]
    settings = {"num_inference_steps": 2, "guidance_scale": 1.0, "height": 64, "width": 64}
    got = ours(PROMPT, control_image=control, controlnet="canny", scheduler="lcm", seed=6, output_type="np",
               **settings).images  # fmt: skip
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        tiny_pipeline, controlnet=ControlNetModel.from_pretrained(controlnets["canny"]), safety_checker=None,
        requires_safety_checker=False,
    )  # fmt: skip
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        want = pipe(PROMPT, image=control, generator=torch.Generator().manual_seed(6), output_type="np",
                    **settings).images  # fmt: skip
    assert mean_abs(got, want) <= TOLERANCE


def test_img2img_matches_diffusers(ours, tiny_pipeline: Path, controlnets: dict[str, Path]) -> None:
    from diffusers import StableDiffusionControlNetImg2ImgPipeline

    init = Image.fromarray(np.random.default_rng(4).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    control = control_images()[0]
    settings = {"num_inference_steps": 4, "strength": 0.6, "controlnet_conditioning_scale": 0.8}
    settings.update(height=64, width=64)  # diffusers' img2img ControlNet pipeline takes the control image's otherwise
    got = ours(PROMPT, image=init, control_image=control, controlnet="canny", seed=5, output_type="np",
               **settings).images  # fmt: skip
    want = diffusers_images(StableDiffusionControlNetImg2ImgPipeline, tiny_pipeline, [controlnets["canny"]], 5,
                            prompt=PROMPT, image=init, control_image=control, **settings)  # fmt: skip
    assert mean_abs(got, want) <= TOLERANCE


def test_low_memory_makes_the_same_pixels_and_the_png_records_the_units(export: Path, ours) -> None:
    request = GenerationRequest(PROMPT, steps=2, seed=1, controls=(ControlUnit(control_images()[0], "depth", 0.5),))
    want = ours.generate(request, output_type="np").images
    lean = DiffusionPipeline.from_pretrained(export, low_memory=True, provider="cpu")
    out = lean.generate(request)
    assert np.abs(np.asarray(out.images[0], np.float64) / 255 - want[0]).max() <= 1 / 255 + 1e-6
    assert out.parameters["ControlNet 0"] == (
        "Module: none, Model: depth, Weight: 0.5, Resize Mode: Just Resize, Guidance Start: 0, Guidance End: 1, "
        "Control Mode: Balanced"
    )
    assert lean.loaded_components == ()  # each graph released after its use


@pytest.mark.parametrize(
    ("controls", "extra", "field", "message"),
    [
        ((ControlUnit(Image.new("RGB", (8, 8))),), {}, "controls", "name the ControlNet: this model has canny, depth"),
        ((ControlUnit(Image.new("RGB", (8, 8)), "pose"),), {}, "controls", "no ControlNet named 'pose'"),
        ((ControlUnit(Image.new("RGB", (8, 8)), "canny", float("nan")),), {}, "controls", "scale must be a finite"),
        ((ControlUnit(Image.new("RGB", (8, 8)), "canny", 11.0),), {}, "controls", "scale must be in [0, 10]"),
        ((ControlUnit(Image.new("RGB", (8, 8)), "canny", 1.0, 0.6, 0.4),), {}, "controls", "start 0.6 must be below"),
        ((ControlUnit(np.zeros((1, 3, 8, 8), np.float32), "canny"),), {}, "controls", "must be (1, 3, 32, 32)"),
        ((ControlUnit("control.png", "canny"),), {}, "controls", "must be a PIL image or a (1, 3, H, W) array"),
        ((ControlUnit(Image.new("RGB", (8, 8)), "canny"),) * 5, {}, "controls", "5 units exceeds the limit of 4"),
        (("control.png",), {}, "controls", "each unit must be a ControlUnit, got str"),
        ((ControlUnit(Image.new("RGB", (8, 8)), ["canny"]),), {}, "controls", "model must be a ControlNet's name"),
        ((ControlUnit(Image.new("RGB", (8, 8)), "canny", resize_mode=[1]),), {}, "controls", "resize_mode must be"),
    ],
)
def test_bad_units_are_request_errors(ours, controls, extra: dict, field: str, message: str) -> None:
    with pytest.raises(RequestError) as caught:
        ours.prepare(GenerationRequest(PROMPT, controls=controls, **extra))
    assert caught.value.field == field and message in caught.value.reason


def test_models_without_controlnets_refuse_them(tiny_export: Path) -> None:
    pipe = DiffusionPipeline.from_pretrained(tiny_export)
    with pytest.raises(RequestError, match="^controls: this model has no ControlNet"):
        pipe.prepare(GenerationRequest(PROMPT, controls=(ControlUnit(Image.new("RGB", (8, 8))),)))
    with pytest.raises(RequestError, match="^control_image: controlnet_conditioning_scale has 2 values for 1"):
        pipe(PROMPT, control_image=Image.new("RGB", (8, 8)), controlnet_conditioning_scale=[1.0, 2.0])


def test_sd_export_controlnet_adds_one_and_refuses_another_base(
    tiny_pipeline: Path, export: Path, controlnets: dict[str, Path], tmp_path: Path
) -> None:
    """`sd-export controlnet SOURCE[:NAME] MODEL OUTPUT` adds a ControlNet to an export (the control UNet kept);
    one made for another base (here: SD 1.5's 8x pixel scale on a 2x model) is refused with one line."""
    from click.testing import CliRunner
    from diffusers import ControlNetModel, UNet2DConditionModel

    from sd_onnx.exporter.cli import main

    result = CliRunner().invoke(main, ["controlnet", f"{controlnets['canny']}:edges", str(export), str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    manifest = Manifest.load(tmp_path / "o")
    assert list(manifest.config.controlnets) == ["canny", "depth", "edges"]
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "o", provider="cpu")
    units = lambda name: (ControlUnit(control_images()[0], name),)  # noqa: E731
    same = [pipe.generate(GenerationRequest(PROMPT, steps=2, seed=1, controls=units(n)), output_type="np").images
            for n in ("canny", "edges")]  # fmt: skip
    assert np.array_equal(same[0], same[1])  # the same weights under two names
    other = ControlNetModel.from_unet(UNet2DConditionModel.from_pretrained(tiny_pipeline / "unet"))
    other.save_pretrained(tmp_path / "sd15-scale")
    result = CliRunner().invoke(main, ["controlnet", str(tmp_path / "sd15-scale"), str(export), str(tmp_path / "x")])
    assert result.exit_code == 1 and not (tmp_path / "x").exists()
    assert result.output == (
        "Error: ControlNet sd15-scale: its pixel-to-latent scale is 8, the model's 2: it fits another base\n"
    )
    with pytest.raises(ExportError, match="--controlnet: name 'bad name' must be"):
        from sd_onnx.exporter.controlnet import ControlNetSource

        ControlNetSource.parse("folder:bad name")


def test_cli_runs_controlnets_with_a_preprocessor(export: Path, ours, tmp_path: Path, annotators_dir: Path) -> None:
    """`sd-run prompt --control IMAGE:NAME:WEIGHT --control-preprocess canny`: the API's image for the same units
    (the control image made by the canny annotator), and likewise softedge_hed with the exported HED network from
    --annotators-dir; an unknown ControlNet is one line naming --control, a network not given one line too."""
    from click.testing import CliRunner

    from sd_onnx.runtime.annotator_models import load_annotators
    from sd_onnx.runtime.annotators import annotate
    from sd_onnx.runtime.cli import main

    picture = drawing().resize((96, 72))  # under the tiny model's input limit (4x its 32x32 pixels)
    picture.save(tmp_path / "picture.png")
    common = ["prompt", PROMPT, "-m", str(export), "--steps", "2", "--seed", "4", "--control-preprocess", "canny",
              "--provider", "cpu"]  # fmt: skip
    out = tmp_path / "out.png"
    result = CliRunner().invoke(main, [*common, "--control", f"{tmp_path / 'picture.png'}:depth:0.8",
                                       "--control-end", "0.5", "-o", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    unit = ControlUnit(annotate(picture, "canny"), "depth", 0.8, 0.0, 0.5)
    want = ours.generate(GenerationRequest(PROMPT, steps=2, seed=4, controls=(unit,)), output_type="np").images[0]
    assert np.abs(np.asarray(Image.open(out), np.float64) / 255 - want).max() <= 1 / 255 + 1e-6
    assert "ControlNet 0" in Image.open(out).text["parameters"]
    assert "Module: canny, Model: depth, Weight: 0.8" in Image.open(out).text["parameters"]
    picture_file = f"{tmp_path / 'picture.png'}:canny"
    hed = [*common[:-4], "--control-preprocess", "softedge_hed", *common[-2:], "--control", picture_file]
    result = CliRunner().invoke(main, [*hed, "--annotators-dir", str(annotators_dir), "-o", str(out)])
    assert result.exit_code == 0, result.output
    networks = load_annotators(annotators_dir)
    unit = ControlUnit(annotate(picture, "softedge_hed", networks=networks), "canny", 1.0, module="softedge_hed")
    want = ours.generate(GenerationRequest(PROMPT, steps=2, seed=4, controls=(unit,)), output_type="np").images[0]
    assert np.abs(np.asarray(Image.open(out), np.float64) / 255 - want).max() <= 1 / 255 + 1e-6
    assert "Module: softedge_hed" in Image.open(out).text["parameters"]
    result = CliRunner().invoke(main, hed)
    assert result.exit_code == 1 and "softedge_hed runs the hed network, which is not loaded" in result.output
    result = CliRunner().invoke(main, [*common, "--control", f"{tmp_path / 'picture.png'}:pose"])
    assert result.exit_code == 1 and "Error: --control: no ControlNet named 'pose'" in result.output
    result = CliRunner().invoke(main, [*common, "--control", f"{tmp_path / 'picture.png'}:depth:heavy"])
    assert result.exit_code == 2 and "WEIGHT 'heavy' is not a number" in result.output
    result = CliRunner().invoke(main, common)  # a preprocessor without a control image
    assert (
        result.exit_code == 2 and "--control-preprocess" in result.output and "give one with --control" in result.output
    )


def drawing() -> Image.Image:
    """Shapes in several colours, with noise: edges for Canny to find and weak ones for its hysteresis."""
    from PIL import ImageDraw

    rng = np.random.default_rng(7)
    picture = Image.new("RGB", (160, 120), (20, 30, 40))
    draw = ImageDraw.Draw(picture)
    for _ in range(10):
        x, y = int(rng.integers(0, 120)), int(rng.integers(0, 90))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        draw.ellipse([x, y, x + int(rng.integers(5, 80)), y + int(rng.integers(5, 60))], outline=colour, width=2)
    noisy = np.asarray(picture) + rng.normal(0, 12, (120, 160, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


@pytest.mark.parametrize(("low", "high"), [(100, 200), (20, 60), (50.5, 51.7)])
def test_canny_is_opencvs_pixel_for_pixel(low: float, high: float) -> None:
    cv2 = pytest.importorskip("cv2")
    from sd_onnx.runtime.annotators import canny

    pixels = np.asarray(drawing())
    for image in (pixels, pixels[..., 1].copy()):  # colour: the strongest channel's gradient; grey
        want = cv2.Canny(image, low, high)
        assert want.any() and np.array_equal(canny(image, low, high), want)


def test_annotators_follow_a1111s_modules() -> None:
    from sd_onnx.runtime.annotators import annotate

    picture = drawing()
    pixels = np.asarray(picture)
    assert annotate(picture, "none") is picture
    assert np.array_equal(np.asarray(annotate(picture, "invert")), 255 - pixels)
    assert np.array_equal(np.asarray(annotate(picture, "threshold", threshold_a=100)),
                          np.where(pixels.min(axis=2) > 100, 255, 0)[..., None].repeat(3, axis=2))  # fmt: skip
    assert annotate(picture, "canny", resolution=240).size == (320, 240)  # the short side made 240
    assert annotate(picture, "tile_resample", threshold_a=2.0).size == (80, 60)
    refused = (({"module": "depth_midas"}, "^module: no preprocessor 'depth_midas'"),
               ({"module": "canny", "threshold_a": -1}, "^threshold_a: must be a number in 0..1024"),
               ({"module": "canny", "resolution": 10}, "^resolution: must be an integer in 64.."))  # fmt: skip
    for kwargs, message in refused:
        with pytest.raises(RequestError, match=message):
            annotate(picture, **kwargs)


def test_a1111_controlnet_units_through_webuiapi(export: Path, ours, tmp_path: Path, annotators_dir: Path) -> None:
    """webuiapi's ControlNetUnit in `alwayson_scripts` (its request as sent: Resize and Fill, thresholds 64/64,
    processor_res 512): the API's image for the same unit; the extension's routes list the model's ControlNets
    and the modules, and /controlnet/detect runs a module alone; bad units are 422s naming the field."""
    import base64
    import io
    import threading

    import httpx
    import uvicorn
    import webuiapi

    from sd_onnx.runtime.annotator_models import load_annotators
    from sd_onnx.runtime.annotators import annotate
    from sd_onnx.runtime.controlnet import ControlUnit
    from sd_onnx.runtime.server.app import ServeConfig, ServerState, create_app

    app = create_app(ServerState(ServeConfig(annotators_dir=annotators_dir)), loader=lambda: ours)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        threading.Event().wait(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        while httpx.get(f"http://127.0.0.1:{port}/health").status_code != 200:
            threading.Event().wait(0.05)
        api = webuiapi.WebUIApi(host="127.0.0.1", port=port)
        assert api.controlnet_model_list() == ["canny", "depth"]
        assert {"canny", "softedge_hed", "softedge_hedsafe"} <= set(api.controlnet_module_list())
        picture = drawing().resize((96, 72))
        unit = webuiapi.ControlNetUnit(image=picture, module="canny", model="depth [0123abcd]", weight=0.9,
                                       threshold_a=50, threshold_b=120, guidance_end=0.6, processor_res=64)  # fmt: skip
        result = api.txt2img(prompt=PROMPT, steps=2, seed=6, width=64, height=64, cfg_scale=7.5,
                             controlnet_units=[unit], sampler_name="Euler")  # fmt: skip
        control = annotate(picture, "canny", 64, 50, 120)
        want = ControlUnit(control, "depth", 0.9, 0.0, 0.6, "resize_and_fill", "canny")
        request = GenerationRequest(PROMPT, steps=2, seed=6, width=64, height=64, scheduler="Euler",
                                    controls=(want,), seed_per_image=True, prompt_syntax="a1111")  # fmt: skip
        expected = ours.generate(request, output_type="np").images[0]
        assert np.abs(np.asarray(result.image, np.float64) / 255 - expected).max() <= 1 / 255 + 1e-6
        assert (
            'ControlNet 0: "Module: canny, Model: depth, Weight: 0.9, Resize Mode: Resize and Fill'
            in (result.info["infotexts"][0])
        )
        detected = api.controlnet_detect([picture], module="canny", processor_res=64, threshold_a=50, threshold_b=120)
        got = detected.image  # webuiapi decodes the answer's first image
        assert np.array_equal(np.asarray(got), np.asarray(control))
        detected = api.controlnet_detect([picture], module="softedge_hed", processor_res=64)
        networks = load_annotators(annotators_dir)
        assert np.array_equal(np.asarray(detected.image), np.asarray(annotate(picture, "softedge_hed", 64,
                                                                              networks=networks)))  # fmt: skip
        body = {"prompt": PROMPT, "steps": 1, "width": 64, "height": 64}
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        encoded = base64.b64encode(buffer.getvalue()).decode()
        refusals = (
            ({"image": encoded, "module": "depth_midas"}, "args[0].module: no preprocessor 'depth_midas'"),
            ({"image": encoded, "model": "pose"}, "args[0].model: no ControlNet named 'pose'; this model has canny"),
            ({"image": encoded, "model": ["x"]}, "args[0].model: must be a ControlNet's name, got list"),
            ({"image": encoded, "guidance_start": 0.9, "guidance_end": 0.1}, "args[0].guidance_start: 0.9 must be"),
            ({"image": encoded, "resize_mode": "Stretch"}, "args[0].resize_mode: must be one of"),
            ({"image": encoded, "weight": "heavy"}, "args[0].weight: must be a number"),
            ({"module": "canny", "model": "canny"}, "args[0].image: required (a base64 image) on txt2img"),
            ({"image": "not base64!", "model": "canny"}, "args[0].image: not valid base64"),
        )
        for unit_fields, message in refusals:
            scripts = {"ControlNet": {"args": [unit_fields]}}
            r = httpx.post(f"http://127.0.0.1:{port}/sdapi/v1/txt2img", json={**body, "alwayson_scripts": scripts},
                           timeout=60)  # fmt: skip
            assert r.status_code == 422 and message in r.json()["detail"], (unit_fields, r.text)
        for scripts in ({"ControlNet": [{"image": encoded}]}, {"controlnet": {}}):  # not {"args": [...]}: refused
            r = httpx.post(f"http://127.0.0.1:{port}/sdapi/v1/txt2img", json={**body, "alwayson_scripts": scripts})
            assert r.status_code == 422 and "must be an object with args" in r.json()["detail"], r.text
        r = httpx.post(f"http://127.0.0.1:{port}/controlnet/detect",
                       json={"controlnet_module": "depth", "controlnet_input_images": [encoded]})  # fmt: skip
        assert r.status_code == 422 and r.json()["detail"].startswith("controlnet_module: no preprocessor 'depth'")
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_batch_lines_take_controls_inside_their_folder(
    export: Path, ours, tmp_path: Path, annotators_dir: Path
) -> None:
    """`sd-run batch` lines with `controls` (images inside the prompts file's folder): the API's image; a path
    that leaves the folder and an unknown key are that line's error records, the rest goes on."""
    import json

    from click.testing import CliRunner

    from sd_onnx.runtime.annotator_models import load_annotators
    from sd_onnx.runtime.annotators import annotate
    from sd_onnx.runtime.cli import main

    picture = drawing().resize((64, 48))
    (tmp_path / "edges").mkdir()
    picture.save(tmp_path / "edges" / "a.png")
    picture.save(tmp_path.parent / "outside.png")
    unit = {"image": "edges/a.png", "model": "canny", "weight": 0.7, "module": "canny"}
    unit["resize_mode"] = "crop_and_resize"
    lines = [
        {"id": "ok", "prompt": PROMPT, "steps": 2, "seed": 2, "controls": [unit]},
        {"id": "leaves", "prompt": PROMPT, "controls": [{**unit, "image": "../outside.png"}]},
        {"id": "unknown", "prompt": PROMPT, "controls": [{**unit, "mask": "edges/a.png"}]},
        {"id": "hed", "prompt": PROMPT, "steps": 2, "seed": 2, "controls": [{**unit, "module": "softedge_hed"}]},
    ]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = CliRunner().invoke(main, ["batch", str(tmp_path / "prompts.jsonl"), str(tmp_path / "out"),
                                       "-m", str(export), "--provider", "cpu", "--annotators-dir",
                                       str(annotators_dir)])  # fmt: skip
    assert result.exit_code == 1, result.output  # some lines failed
    records = {r["id"]: r for r in map(json.loads, (tmp_path / "out" / "results.jsonl").read_text().splitlines())}
    assert records["ok"]["status"] == "ok"
    assert records["leaves"]["status"] == "error" and "controls[0].image:" in records["leaves"]["error"]
    assert "is not a path inside" in records["leaves"]["error"]
    assert records["unknown"]["error"].startswith("controls[0]: must be an object with image and any of")
    control = ControlUnit(annotate(picture, "canny"), "canny", 0.7, resize_mode="crop_and_resize", module="canny")
    request = GenerationRequest(PROMPT, steps=2, seed=2, controls=(control,), prompt_syntax="a1111")
    want = ours.generate(request, output_type="np").images[0]
    got = np.asarray(Image.open(tmp_path / "out" / "ok.png"), np.float64) / 255
    assert np.abs(got - want).max() <= 1 / 255 + 1e-6
    assert records["hed"]["status"] == "ok"
    soft = annotate(picture, "softedge_hed", networks=load_annotators(annotators_dir))
    control = ControlUnit(soft, "canny", 0.7, resize_mode="crop_and_resize", module="softedge_hed")
    request = GenerationRequest(PROMPT, steps=2, seed=2, controls=(control,), prompt_syntax="a1111")
    want = ours.generate(request, output_type="np").images[0]
    got = np.asarray(Image.open(tmp_path / "out" / "hed.png"), np.float64) / 255
    assert np.abs(got - want).max() <= 1 / 255 + 1e-6


def test_sdxl_controlnet_matches_diffusers(tiny_sdxl: tuple[Path, Path], tmp_path: Path) -> None:
    """An SDXL ControlNet (pooled text embedding and time ids as inputs), exported with its base and checked
    against PyTorch, in parity with diffusers' StableDiffusionXLControlNetPipeline."""
    from diffusers import StableDiffusionXLControlNetPipeline

    from sd_onnx.exporter.controlnet import ControlNetSource
    from sd_onnx.exporter.convert import convert
    from sd_onnx.models.build import build_controlnet

    source, _ = tiny_sdxl
    controlnet = build_controlnet(source, tmp_path / "control_xl", seed=3)
    out = tmp_path / "export"
    convert(str(source), out, controlnets=[ControlNetSource.parse(f"{controlnet}:xl")], log=lambda line: None)
    manifest = Manifest.load(out)
    assert [t.name for t in manifest.components["controlnet_xl"].inputs][-2:] == ["text_embeds", "time_ids"]
    assert manifest.components["unet_control"].validation["reference"] == "torch"
    pipe = DiffusionPipeline.from_pretrained(out, provider="cpu")
    control = control_images()[0]
    settings = {"num_inference_steps": 3, "controlnet_conditioning_scale": 0.9, "height": 64, "width": 64,
                "guidance_scale": 5.0}  # fmt: skip
    got = pipe(PROMPT, control_image=control, seed=2, output_type="np", **settings).images
    want = diffusers_images(StableDiffusionXLControlNetPipeline, source, [controlnet], 2, prompt=PROMPT, image=control,
                            **settings)  # fmt: skip
    difference = mean_abs(got, want)
    plain = pipe(
        PROMPT, seed=2, output_type="np", num_inference_steps=3, height=64, width=64, guidance_scale=5.0
    ).images
    assert difference <= TOLERANCE and mean_abs(plain, want) > 5 * difference


def test_int8_quantizes_each_controlnet_with_its_unet(tiny_pipeline: Path, controlnets: dict[str, Path], ours,
                                                      tmp_path: Path) -> None:  # fmt: skip
    """`--precision int8`: the ControlNet calibrated on the UNet's recorded inputs beside outline images, its
    residuals' cosine to fp32 measured on held-out ones; the control UNet cut again from the int8 UNet."""
    from sd_onnx.exporter.controlnet import ControlNetSource
    from sd_onnx.exporter.convert import convert

    out = tmp_path / "int8"
    source = ControlNetSource.parse(f"{controlnets['canny']}:canny")
    convert(str(tiny_pipeline), out, precision="int8", controlnets=[source], log=lambda line: None)
    manifest = Manifest.load(out)
    graph = manifest.components["controlnet_canny"]
    assert graph.precision == "int8" and graph.validation["cosine_min"] > 0.95
    assert graph.quantization["calibration"]["ranges_file"] == "quantization/controlnet_canny_ranges.json"
    assert manifest.components["unet_control"].validation["reference"] == "unet graph"
    assert manifest.components["unet_control"].precision == "int8"
    request = GenerationRequest(PROMPT, steps=3, seed=1, controls=(ControlUnit(control_images()[0], "canny"),))
    quantized = DiffusionPipeline.from_pretrained(out, provider="cpu").generate(request, output_type="np").images
    assert mean_abs(quantized, ours.generate(request, output_type="np").images) < 0.05


def test_inpainting_matches_diffusers(ours, tiny_pipeline: Path, controlnets: dict[str, Path]) -> None:
    """diffusers' StableDiffusionControlNetInpaintPipeline on the (4-channel) UNet: the masked latents blended
    back each step, the ControlNet on the latents alone (its conditioning scale given: that pipeline's default
    is 0.5, the others' 1)."""
    from diffusers import StableDiffusionControlNetInpaintPipeline

    rng = np.random.default_rng(6)
    init = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    mask = Image.new("L", (64, 64))
    mask.paste(255, (16, 8, 48, 40))
    control = control_images()[1]
    settings = {
        "num_inference_steps": 4,
        "strength": 1.0,
        "height": 64,
        "width": 64,
        "controlnet_conditioning_scale": 1.0,
    }
    got = ours(PROMPT, image=init, mask_image=mask, control_image=control, controlnet="depth", seed=7,
               output_type="np", **settings).images  # fmt: skip
    want = diffusers_images(StableDiffusionControlNetInpaintPipeline, tiny_pipeline, [controlnets["depth"]], 7,
                            prompt=PROMPT, image=init, mask_image=mask, control_image=control, **settings)  # fmt: skip
    assert mean_abs(got, want) <= TOLERANCE
