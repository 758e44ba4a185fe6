"""Exported folders stay readable by Optimum: its ORTStableDiffusionPipeline and ORTStableDiffusionXLPipeline
load them in Optimum's own environment (its pins conflict with ours) and draw the same image as this runtime
from the same latents."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from sd_onnx.runtime import DiffusionPipeline

PROMPT = "a photo of an astronaut riding a horse"
OPTIMUM_SCRIPT = """
import sys, numpy as np, torch
from optimum.onnxruntime import ORTDiffusionPipeline
folder, latents, out = sys.argv[1:4]
pipe = ORTDiffusionPipeline.from_pretrained(folder)
images = pipe(sys.argv[4], num_inference_steps=3, guidance_scale=5.0, latents=torch.from_numpy(np.load(latents)),
              height=32, width=32, output_type="np").images
np.save(out, np.asarray(images))
print(type(pipe).__name__)
"""


@pytest.mark.parametrize("model", ["tiny_export", "tiny_sdxl"])
def test_optimum_loads_the_export_and_draws_the_same_image(
    model: str, optimum_python: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    folder = request.getfixturevalue(model)
    folder = folder[1] if isinstance(folder, tuple) else folder  # tiny_sdxl: (diffusers folder, export)
    latents = np.random.default_rng(0).standard_normal((1, 4, 16, 16)).astype(np.float32)
    np.save(tmp_path / "latents.npy", latents)
    cmd = [optimum_python, "-c", OPTIMUM_SCRIPT, str(folder), str(tmp_path / "latents.npy"), str(tmp_path / "o.npy")]
    result = subprocess.run([*cmd, PROMPT], capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    expected_class = "ORTStableDiffusionXLPipeline" if model == "tiny_sdxl" else "ORTStableDiffusionPipeline"
    assert result.stdout.strip().splitlines()[-1] == expected_class
    ours = DiffusionPipeline.from_pretrained(folder, provider="cpu")
    got = ours(
        PROMPT, num_inference_steps=3, guidance_scale=5.0, latents=latents, height=32, width=32, output_type="np"
    )
    theirs = np.load(tmp_path / "o.npy")
    assert theirs.shape == got.images.shape and np.abs(theirs - got.images).mean() <= 1 / 255
