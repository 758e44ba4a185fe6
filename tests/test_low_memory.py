"""Low-memory mode holds one graph at a time: a session counter (the pipeline's loaded components, checked at
every component request and every step) for txt2img, img2img, inpainting, SDXL and tiled decoding, with
the same pixels as the default mode. Peak RSS itself is measured in benchmarks, not here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sd_onnx.runtime import StableDiffusionPipeline


class SessionCounter:
    """Fails the test if a component is requested while another one is still loaded."""

    def __init__(self, pipe: StableDiffusionPipeline, monkeypatch: pytest.MonkeyPatch) -> None:
        self.requested: list[str] = []
        self.most = 0
        component = pipe.component

        def counted(name: str):
            others = set(pipe.loaded_components) - {name}
            assert not others, f"{name} requested while {sorted(others)} still loaded"
            self.requested.append(name)
            model = component(name)
            self.most = max(self.most, len(pipe.loaded_components))
            return model

        monkeypatch.setattr(pipe, "component", counted)


def steps_see_only_the_unet(pipe: StableDiffusionPipeline):
    def on_step(i: int, total: int, latents: np.ndarray) -> None:
        assert pipe.loaded_components == ("unet",), pipe.loaded_components

    return on_step


def image(size: int, seed: int) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((size, size, 3)) * 255).astype(np.uint8))


@pytest.mark.parametrize("mode", ["txt2img", "img2img", "tiled"])
def test_one_session_at_a_time_and_the_same_pixels(tiny_export: Path, mode: str, monkeypatch) -> None:
    low = StableDiffusionPipeline.from_pretrained(tiny_export, provider="cpu", low_memory=True)
    assert low.loaded_components == ()
    counter = SessionCounter(low, monkeypatch)
    settings = {"seed": 2, "num_inference_steps": 3, "output_type": "np"}
    if mode == "img2img":
        settings |= {"image": image(32, 0), "strength": 0.7}
    if mode == "tiled":
        settings |= {"width": 64, "height": 64}  # above one 32-pixel tile: low-memory mode tiles by itself
    got = low("a cat", callback=steps_see_only_the_unet(low), **settings)
    assert counter.most == 1 and low.loaded_components == ()
    order = [name for i, name in enumerate(counter.requested) if i == 0 or counter.requested[i - 1] != name]
    encoder = ["vae_encoder"] if mode == "img2img" else []
    assert order == ["text_encoder", *encoder, "unet", "vae_decoder"]
    default = StableDiffusionPipeline.from_pretrained(tiny_export, provider="cpu")
    expected = default("a cat", vae_tiling=mode == "tiled", **settings)
    np.testing.assert_array_equal(got.images, expected.images)


def test_inpainting_and_sdxl_hold_one_session_at_a_time(tiny_inpaint, tiny_sdxl, monkeypatch) -> None:
    for folder, extra in ((tiny_inpaint[1], {"image": image(32, 1), "mask_image": image(32, 2).convert("L")}),
                          (tiny_sdxl[1], {})):  # fmt: skip
        pipe = StableDiffusionPipeline.from_pretrained(folder, provider="cpu", low_memory=True)
        counter = SessionCounter(pipe, monkeypatch)
        pipe("a cat", seed=1, num_inference_steps=2, callback=steps_see_only_the_unet(pipe), **extra)
        assert counter.most == 1 and pipe.loaded_components == ()


def test_low_memory_vae_frees_each_tensor_as_it_dies(tiny_export: Path) -> None:
    """Without an arena and without onnxruntime's buffer reuse (which keeps a dead tensor's buffer for a later
    one): what that saves is measured by `sd-bench memory`; here, that low-memory mode asks for it and default
    mode does not."""
    low = StableDiffusionPipeline.from_pretrained(tiny_export, provider="cpu", low_memory=True)
    default = StableDiffusionPipeline.from_pretrained(tiny_export, provider="cpu")
    for pipe, lean in ((low, True), (default, False)):
        for name in ("vae_decoder", "text_encoder"):
            options = pipe.component(name).session.get_session_options()
            per_tensor = name == "vae_decoder" and lean
            assert options.enable_cpu_mem_arena is not per_tensor and options.enable_mem_reuse is not per_tensor
            pipe.release(name)
