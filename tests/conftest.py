"""Shared fixtures: the tiny seeded pipeline (diffusers format) and its ONNX export, built once per session."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Optimized graphs go to the user cache directory by default; tests (and the servers they start) use their own,
# removed when the run ends.
if "SD_ONNX_CACHE" not in os.environ:
    os.environ["SD_ONNX_CACHE"] = tempfile.mkdtemp(prefix="sd-onnx-test-cache-")
    atexit.register(shutil.rmtree, os.environ["SD_ONNX_CACHE"], True)


# `auto` on onnxruntime everywhere (its OpenVINO choice depends on the CPU class): the same engine, pixels and
# speed on every CI machine; the tests of that choice (test_openvino.py) lift it.
os.environ["SD_ONNX_AUTO_OPENVINO"] = "0"


def peer_python_or_skip(name: str) -> str:
    """$SD_ONNX_<NAME>_PYTHON, else peer `name`'s `sd-bench peers setup` environment (made if missing); the
    test is skipped where no package index can be reached to make it."""
    from sd_onnx.benchmarks.peers import PeerSetupError, setup_peer

    given = os.environ.get(f"SD_ONNX_{name.upper()}_PYTHON")
    if given:
        return given
    try:
        return str(setup_peer(name, log=lambda line: None))
    except PeerSetupError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def optimum_python() -> str:
    return peer_python_or_skip("optimum")


@pytest.fixture(scope="session")
def openvino_python() -> str:
    """About a minute from wheels the first time."""
    return peer_python_or_skip("openvino")


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sd_onnx.models.build import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "tiny-sd", seed=0)


@pytest.fixture(scope="session")
def reference_pipe(tiny_pipeline: Path):
    """diffusers' own StableDiffusionPipeline on the tiny weights (tests that change its scheduler restore it)."""
    from diffusers import StableDiffusionPipeline as DiffusersPipeline

    pipe = DiffusersPipeline.from_pretrained(tiny_pipeline, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def tiny_export(tiny_pipeline: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sd_onnx.exporter.convert import convert

    out = tmp_path_factory.mktemp("export") / "tiny-onnx"
    convert(str(tiny_pipeline), out, log=lambda line: None)
    return out


def build_and_export(recipe_name: str, root: Path) -> tuple[Path, Path]:
    """(diffusers folder, ONNX export) of a models.build recipe with seed 0, under `root`."""
    from sd_onnx.exporter.convert import convert
    from sd_onnx.models.build import RECIPES, build_pipeline

    source = build_pipeline(RECIPES[recipe_name], root / "pipeline", seed=0)
    convert(str(source), root / "onnx", log=lambda line: None)
    return source, root / "onnx"


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny SDXL base: its diffusers folder and its export."""
    return build_and_export("tiny-sdxl", tmp_path_factory.mktemp("sdxl"))


@pytest.fixture(scope="session")
def tiny_sdxl_refiner(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny SDXL refiner: its diffusers folder and its export."""
    return build_and_export("tiny-sdxl-refiner", tmp_path_factory.mktemp("refiner"))


@pytest.fixture(scope="session")
def tiny_inpaint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny SD inpainting pipeline (9-channel UNet): its diffusers folder and its export."""
    return build_and_export("tiny-inpaint", tmp_path_factory.mktemp("inpaint"))


def built(recipe: str, factory: pytest.TempPathFactory) -> Path:
    """The diffusers folder of a models.build recipe with seed 0."""
    from sd_onnx.models.build import RECIPES, build_pipeline

    return build_pipeline(RECIPES[recipe], factory.mktemp(recipe) / recipe, seed=0)


def exported(pipeline: Path, factory: pytest.TempPathFactory) -> Path:
    """The fp32 export of a diffusers folder."""
    from sd_onnx.exporter.convert import convert

    out = factory.mktemp(f"{pipeline.name}-export") / f"{pipeline.name}-onnx"
    convert(str(pipeline), out, log=lambda line: None)
    return out


# The transformer families at test size (models/build.py's tiny-sd3, tiny-flux (schnell), tiny-flux-dev,
# tiny-z-image, tiny-flux2-klein (a base model)): each diffusers folder and its fp32 export, built once per session.
@pytest.fixture(scope="session")
def tiny_sd3_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return built("tiny-sd3", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_sd3_export(tiny_sd3_pipeline: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return exported(tiny_sd3_pipeline, tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_flux_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return built("tiny-flux", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_flux_export(tiny_flux_pipeline: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return exported(tiny_flux_pipeline, tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_flux_dev_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return built("tiny-flux-dev", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_flux_dev_export(tiny_flux_dev_pipeline: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return exported(tiny_flux_dev_pipeline, tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_z_image_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return built("tiny-z-image", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_z_image_export(tiny_z_image_pipeline: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return exported(tiny_z_image_pipeline, tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_flux2_klein_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return built("tiny-flux2-klein", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_flux2_klein_export(tiny_flux2_klein_pipeline: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return exported(tiny_flux2_klein_pipeline, tmp_path_factory)


@pytest.fixture(scope="session")
def hed_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """controlnet-aux's HED network with seeded random weights, scaled so that its edge map spans many levels
    (default initialization leaves it near one level everywhere), saved as ControlNetHED.pth."""
    import torch

    from sd_onnx.exporter.annotator import controlnet_aux_module

    torch.manual_seed(0)
    network = controlnet_aux_module("hed").ControlNetHED_Apache2()
    probe = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(1)) * 255
    with torch.no_grad():
        network.norm.fill_(127.0)
        network.block1.convs[0].weight.mul_(1 / 64)
        blocks = (network.block1, network.block2, network.block3, network.block4, network.block5)
        for block, side in zip(blocks, network(probe), strict=True):
            block.projection.weight.mul_(2 / side.std())
            block.projection.bias.zero_()
        for block, side in zip(blocks, network(probe), strict=True):
            block.projection.bias.fill_(-side.mean())  # centred: sigmoid's whole range
    path = tmp_path_factory.mktemp("hed") / "ControlNetHED.pth"
    torch.save(network.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def annotators_dir(hed_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder for --annotators-dir holding the HED network exported by `sd-export annotator`."""
    from click.testing import CliRunner

    from sd_onnx.exporter.cli import main

    root = tmp_path_factory.mktemp("annotators")
    result = CliRunner().invoke(main, ["annotator", "hed", str(hed_checkpoint), str(root / "hed")])
    assert result.exit_code == 0, result.output
    return root
