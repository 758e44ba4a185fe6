"""LoRAs fused at export against diffusers running the same LoRAs unfused: diffusers/PEFT and kohya layouts,
UNet and text encoder, several at their scales; LCM-LoRA's recipe recorded as the model's defaults."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sd_onnx.exporter.convert import convert
from sd_onnx.exporter.errors import ExportError
from sd_onnx.runtime import DiffusionPipeline, Manifest
from sd_onnx.runtime.manifest import sha256_file

from .lora_files import write_diffusers_lora, write_kohya_lora

PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def loras(tiny_pipeline: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("loras")
    return (
        write_diffusers_lora(tiny_pipeline, root / "style.safetensors", seed=1),
        write_kohya_lora(tiny_pipeline, root / "kohya.safetensors", seed=2),
    )


def reference(folder: Path, loras: list[tuple[Path, float]]):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    names = []
    for i, (file, _) in enumerate(loras):
        pipe.load_lora_weights(str(file), adapter_name=f"ref_{i}")
        names.append(f"ref_{i}")
    if names:
        pipe.set_adapters(names, adapter_weights=[scale for _, scale in loras])
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("which", ["diffusers", "kohya", "both"])
def test_fused_loras_match_diffusers(which: str, loras, tiny_pipeline: Path, tiny_export: Path, tmp_path: Path) -> None:
    """Fused at export vs diffusers; then the same LoRAs added at load time to the plain export, without
    PyTorch, vs the export that fused them."""
    chosen = {"diffusers": [(loras[0], 0.8)], "kohya": [(loras[1], 1.0)], "both": [(loras[0], 0.5), (loras[1], 0.7)]}
    applied = chosen[which]
    manifest = convert(str(tiny_pipeline), tmp_path / "onnx", loras=applied, log=lambda line: None)
    assert manifest.loras == [{"file": f.name, "sha256": sha256_file(f), "scale": s} for f, s in applied]
    assert Manifest.load(tmp_path / "onnx").loras == manifest.loras and not (tmp_path / "onnx" / "_lora_fused").exists()
    ours = DiffusionPipeline.from_pretrained(tmp_path / "onnx", provider="cpu")
    settings = {"num_inference_steps": 4, "guidance_scale": 6.0, "output_type": "np"}
    expected = reference(tiny_pipeline, applied)(PROMPT, generator=torch.Generator().manual_seed(1), **settings).images
    got = ours(PROMPT, seed=1, **settings).images
    assert np.abs(got - expected).mean() <= 1 / 255
    plain = reference(tiny_pipeline, [])(PROMPT, generator=torch.Generator().manual_seed(1), **settings).images
    assert np.abs(plain - expected).mean() > 1 / 255  # the LoRA changes the picture
    at_load = DiffusionPipeline.from_pretrained(tiny_export, provider="cpu", loras=applied)
    assert set(at_load.loaded_components) >= {"text_encoder", "unet"}
    assert np.abs(at_load(PROMPT, seed=1, **settings).images - got).max() <= 1e-4


def respelled(key: str, down: str, up: str) -> str:
    """A LoRA tensor name with its pair suffix in another tool's spelling."""
    from sd_onnx.runtime.lora import PARTS

    suffix = next(s for s in PARTS if key.endswith(s))
    return key[: -len(suffix)] + {"down": down, "up": up, "alpha": suffix}[PARTS[suffix]]


def write_bf16(tensors: dict[str, np.ndarray], out: Path) -> Path:
    """A .safetensors file of bfloat16 tensors (NumPy has no bfloat16: the upper halves of the float32 bits)."""
    header, blobs, offset = {}, [], 0
    for name, value in tensors.items():
        blob = (np.ascontiguousarray(value, np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()
        header[name] = {"dtype": "BF16", "shape": list(value.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header).encode()
    out.write_bytes(len(text).to_bytes(8, "little") + text + b"".join(blobs))
    return out


def test_load_time_loras_in_every_layout(loras, tiny_export: Path, tmp_path: Path) -> None:
    """The same LoRA written in the layouts found in the wild gives the same picture: PEFT's lora_A/lora_B with
    transformers 4's `text_model.` module level, alphas in diffusers' adapter metadata, bfloat16 tensors; a
    scale of 0 gives the plain model's."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(loras[0]))
    settings = {"num_inference_steps": 3, "guidance_scale": 5.0, "output_type": "np", "seed": 2}

    def run(*applied: tuple[Path, float]):
        return DiffusionPipeline.from_pretrained(tiny_export, provider="cpu", loras=list(applied))(PROMPT, **settings)

    base = run((loras[0], 0.6))
    peft = {respelled(k, ".lora_A.weight", ".lora_B.weight").replace("text_encoder.", "text_encoder.text_model."): v
            for k, v in tensors.items()}  # fmt: skip
    save_file(peft, str(tmp_path / "peft.safetensors"))
    metadata = {"lora_adapter_metadata": json.dumps({"unet.lora_alpha": 8, "text_encoder.lora_alpha": 8})}
    save_file(tensors, str(tmp_path / "alpha.safetensors"), metadata=metadata)  # alpha 2r: twice the update
    for file, scale in ((tmp_path / "peft.safetensors", 0.6), (tmp_path / "alpha.safetensors", 0.3)):
        assert np.abs(run((file, scale)).images - base.images).max() <= 1e-4, file.name
    bf16 = run((write_bf16(tensors, tmp_path / "bf16.safetensors"), 0.6))
    assert np.abs(bf16.images - base.images).mean() <= 1 / 255
    plain, zero = run().images, run((loras[0], 0.0))
    assert np.abs(zero.images - plain).max() <= 1e-6 and np.abs(base.images - plain).mean() > 1 / 255
    assert base.parameters["Lora"] == "style.safetensors:0.6" and "Lora" not in zero.parameters


def test_load_time_lora_errors(loras, tiny_export: Path, tmp_path: Path) -> None:
    from safetensors.numpy import load_file, save_file

    from sd_onnx.exporter.quantize_folder import quantize_folder

    tensors = load_file(str(loras[0]))
    cases = {
        "loha.safetensors": ({"unet.down_blocks.0.hada_w1_a": np.ones((2, 2), np.float32)}, "LoHa/LoKr/DoRA"),
        "half.safetensors": ({k: v for k, v in tensors.items() if ".up." not in k}, "has no up \\(lora_B\\)"),
        "other.safetensors": ({"unet.mid_block.nothing.lora_A.weight": np.ones((4, 8), np.float32),
                               "unet.mid_block.nothing.lora_B.weight": np.ones((8, 4), np.float32)},
                              "targets unet module 'mid_block.nothing', which this export cannot change"),
        "xl.safetensors": ({"text_encoder_2.x.lora_A.weight": np.ones((4, 8), np.float32),
                            "text_encoder_2.x.lora_B.weight": np.ones((8, 4), np.float32)},
                           "targets text_encoder_2, which this model does not have"),
        "nan.safetensors": ({k: np.full_like(v, np.nan) for k, v in tensors.items()}, "NaN or infinite"),
        "shape.safetensors": ({k: (v[:, :2] if ".down." in k else v) for k, v in tensors.items()},
                              "no low-rank pair|in this LoRA but"),
    }  # fmt: skip
    for name, (content, message) in cases.items():
        save_file(content, str(tmp_path / name))
        with pytest.raises(ValueError, match=message):
            DiffusionPipeline.from_pretrained(tiny_export, provider="cpu", loras=[(tmp_path / name, 1.0)])
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    for loras_arg, message in (
        ([(tmp_path / "junk.safetensors", 1.0)], "junk.safetensors: not a readable .safetensors file"),
        ([(tmp_path / "none.safetensors", 1.0)], "no such .safetensors file"),
        ([(loras[0], 11.0)], "scale must be a number in -10..10"),
        ([(loras[0], "x")], "scale must be a number"),
        (str(loras[0]), "must be a list of files or"),
        ([(loras[0], 1.0, 2)], "neither a file nor a \\(file, scale\\) pair"),
    ):
        with pytest.raises(ValueError, match=message):
            DiffusionPipeline.from_pretrained(tiny_export, provider="cpu", loras=loras_arg)
    quantize_folder(tiny_export, tmp_path / "int8", log=lambda line: None, steps=2)
    refusal = r"unet has no LoRA map .* int8 graphs \(and int4 weights\) cannot take a LoRA at load time"
    with pytest.raises(ValueError, match=refusal):
        DiffusionPipeline.from_pretrained(tmp_path / "int8", provider="cpu", loras=[(loras[0], 1.0)])


def test_lcm_lora_recipe_becomes_the_models_defaults(loras, tiny_pipeline: Path, tmp_path: Path) -> None:
    """`convert --lora LCM_LORA --scheduler lcm --steps 4 --guidance-scale 1`: a plain `sd-run prompt` then runs
    4 LCM steps without guidance, as diffusers does with LCMScheduler and the fused LoRA."""
    from click.testing import CliRunner
    from diffusers import LCMScheduler
    from PIL import Image

    from sd_onnx.exporter.cli import main as export_cli
    from sd_onnx.runtime.cli import main as run_cli

    args = ["convert", str(tiny_pipeline), str(tmp_path / "lcm"), "--lora", f"{loras[0]}:0.9", "--scheduler", "lcm",
            "--steps", "4", "--guidance-scale", "1"]  # fmt: skip
    result = CliRunner().invoke(export_cli, args)
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "lcm" / "scheduler" / "scheduler_config.json").read_text())
    assert config["_class_name"] == "LCMScheduler"
    result = CliRunner().invoke(run_cli, ["prompt", PROMPT, "-m", str(tmp_path / "lcm"), "--seed", "3",
                                          "-o", str(tmp_path / "x.png")])  # fmt: skip
    assert result.exit_code == 0, result.output
    made = Image.open(tmp_path / "x.png")
    assert "Steps: 4, Sampler: lcm, CFG scale: 1.0" in made.text["parameters"]
    pipe = reference(tiny_pipeline, [(loras[0], 0.9)])
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    expected = pipe(PROMPT, num_inference_steps=4, guidance_scale=1.0, generator=torch.Generator().manual_seed(3),
                    output_type="np").images[0]  # fmt: skip
    assert np.abs(np.asarray(made, np.float32) / 255 - expected).mean() <= 1 / 255


def test_lora_errors(tiny_pipeline: Path, tmp_path: Path) -> None:
    from sd_onnx.exporter.lora import parse_lora

    (tmp_path / "a.safetensors").write_bytes(b"")
    (tmp_path / "c:d.safetensors").write_bytes(b"")  # a colon in the name is not a scale
    assert parse_lora(f"{tmp_path}/a.safetensors:0.5") == (tmp_path / "a.safetensors", 0.5)
    assert parse_lora(f"{tmp_path}/a.safetensors") == (tmp_path / "a.safetensors", 1.0)
    assert parse_lora(f"{tmp_path}/c:d.safetensors") == (tmp_path / "c:d.safetensors", 1.0)
    with pytest.raises(ExportError, match="'abc' is not a scale"):
        parse_lora(f"{tmp_path}/a.safetensors:abc")
    with pytest.raises(ExportError, match="scale 11 is outside -10..10"):
        parse_lora(f"{tmp_path}/a.safetensors:11")
    with pytest.raises(ExportError, match="none.safetensors: no such file"):
        convert(str(tiny_pipeline), tmp_path / "a", loras=[(tmp_path / "none.safetensors", 1.0)], log=print)
    (tmp_path / "junk.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(ExportError, match="junk.safetensors: cannot apply it to this model"):
        convert(str(tiny_pipeline), tmp_path / "b", loras=[(tmp_path / "junk.safetensors", 1.0)], log=print)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_load_time_loras_from_the_cli_and_the_server(loras, tiny_export: Path, tmp_path: Path) -> None:
    """`sd-run prompt --lora FILE:SCALE` and `sd-run serve --lora FILE:SCALE` draw what the API draws."""
    import base64
    import io

    import httpx
    from click.testing import CliRunner
    from PIL import Image

    from sd_onnx.runtime.cli import main

    from .test_server import Server

    applied = [(loras[0], 0.5), (loras[1], 0.7)]
    pipe = DiffusionPipeline.from_pretrained(tiny_export, loras=applied)
    expected = np.asarray(pipe(PROMPT, num_inference_steps=3, seed=4).images[0])
    flags = ["--lora", f"{loras[0]}:0.5", "--lora", f"{loras[1]}:0.7"]
    args = ["prompt", PROMPT, "-m", str(tiny_export), "--steps", "3", "--seed", "4", *flags]
    result = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "a.png")])
    assert result.exit_code == 0, result.output
    made = Image.open(tmp_path / "a.png")
    assert np.array_equal(np.asarray(made), expected)
    assert 'Lora: "style.safetensors:0.5, kohya.safetensors:0.7"' in made.text["parameters"]
    for bad, message in (
        (f"{loras[0]}:strong", "Error: --lora: " + f"{loras[0]}:strong: no such file, and 'strong' is not a scale"),
        (f"{loras[0]}:20", "Error: --lora: style.safetensors: scale must be a number in -10..10"),
        (str(tmp_path / "none.safetensors"), "Error: --lora: " + f"{tmp_path / 'none.safetensors'}: no such"),
    ):
        result = CliRunner().invoke(main, [*args[:-4], "--lora", bad, "-o", str(tmp_path / "b.png")])
        assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output, result.output
    server = Server(tiny_export, *flags)
    try:
        r = httpx.post(f"{server.url}/sdapi/v1/txt2img", json={"prompt": PROMPT, "steps": 3, "seed": 4}, timeout=60)
        assert r.status_code == 200, r.text
        got = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
        assert np.array_equal(np.asarray(got), expected)
    finally:
        server.stop()


def test_lora_load_benchmark(loras, tiny_export: Path, tmp_path: Path) -> None:
    """`sd-bench lora` times the three UNet sessions interleaved and sizes the overrides it built."""
    from click.testing import CliRunner

    from sd_onnx.benchmarks.cli import main

    out = tmp_path / "lora.json"
    args = ["lora", str(tiny_export), str(loras[1]), "--size", "32", "--rounds", "1", "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert set(report["unet_step_median_s"]) == {"all", "extended", "lora"} and report["ratio_vs_all"]["all"] == 1
    assert report["lora"]["modules"] == report["overridden_initializers"] > 0 and report["overridden_mb"] > 0
    assert report["settings"] == {"size": 32, "threads": 2, "rounds": 1}


def test_load_time_lora_on_sdxl_matches_export_time_fusion(tiny_sdxl: tuple[Path, Path], tmp_path: Path) -> None:
    """SDXL: UNet and both text encoders changed at load time draw what the export that fused them draws."""
    from .lora_files import write_sdxl_lora

    source, folder = tiny_sdxl
    lora = write_sdxl_lora(source, tmp_path / "sdxl.safetensors", seed=6)
    convert(str(source), tmp_path / "fused", loras=[(lora, 0.7)], log=lambda line: None)
    settings = {"num_inference_steps": 3, "guidance_scale": 5.0, "output_type": "np", "seed": 3}
    expected = DiffusionPipeline.from_pretrained(tmp_path / "fused", provider="cpu")(PROMPT, **settings).images
    at_load = DiffusionPipeline.from_pretrained(folder, provider="cpu", loras=[(lora, 0.7)])
    assert {"text_encoder", "text_encoder_2"} <= {c for lora in at_load.loras for c in lora.modules}
    assert np.abs(at_load(PROMPT, **settings).images - expected).max() <= 1e-4
    plain = DiffusionPipeline.from_pretrained(folder, provider="cpu")(PROMPT, **settings).images
    assert np.abs(plain - expected).mean() > 1 / 255
