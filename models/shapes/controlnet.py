"""Train the shapes model's outline ControlNet on this machine's CPU, from the shipped ONNX model alone:

    python -m sd_onnx.models.shapes.controlnet out/shapes-outline [STEPS]

The control image is the Canny outline (runtime/annotators.py, thresholds 100/200) of a rendered scene: the
ControlNet learns to put the caption's shape where the outline is and with its outline's shape and size. The
frozen UNet is the shipped fp32 graph's weights read back into diffusers' UNet2DConditionModel (checked
against the graph); prompts are encoded and pictures encoded to latents by the shipped graphs. The ControlNet
starts as diffusers' ControlNetModel.from_unet (the UNet's encoder, zero convolutions); seeded end to end.
Writes OUT/controlnet (a diffusers folder for `sd-export controlnet OUT/controlnet:outline MODEL MODEL`).
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from PIL import Image

from sd_onnx.exporter.blockwise import node_scope
from sd_onnx.runtime.annotators import canny
from sd_onnx.runtime.tokenizer import CLIPTokenizer

from . import data, shipped_model

BATCH = 32
LEARNING_RATE = 2e-4
OUTLINE = (100.0, 200.0)  # Canny's thresholds (A1111's defaults)


def unet_from_onnx(folder: Path) -> torch.nn.Module:
    """The UNet of the exported fp32 model `folder` as diffusers' module: each weight found in the graph by the
    node its module's scope names (Linear weights stored transposed behind a MatMul, GroupNorm affine weights as
    the Mul and Add after the normalization), checked against the graph on random inputs."""
    from diffusers import UNet2DConditionModel

    config = json.loads((folder / "unet" / "config.json").read_text())
    unet = UNet2DConditionModel.from_config(config)
    graph = onnx.load(str(folder / "unet" / "model.onnx"))
    weights = {t.name: numpy_helper.to_array(t) for t in graph.graph.initializer}
    by_node = {n.name: [i for i in n.input if i in weights] for n in graph.graph.node}
    state = {}
    for name, parameter in unet.state_dict().items():
        module, kind = name.rsplit(".", 1)
        scope = node_scope(f"model.{module}")
        if f"model.{name}" in weights:
            value = weights[f"model.{name}"]
        elif kind == "weight" and parameter.dim() == 2:
            value = weights[by_node[f"{scope}/MatMul"][0]].T
        else:  # GroupNorm's scale and shift, (C, 1, 1) after the normalization
            value = weights[by_node[f"{scope}/{'Mul' if kind == 'weight' else 'Add'}"][0]]
        state[name] = torch.from_numpy(np.array(value).reshape(parameter.shape))
    unet.load_state_dict(state)
    _check_against_graph(unet.eval(), folder / "unet" / "model.onnx", config)
    return unet


def _check_against_graph(unet: torch.nn.Module, graph: Path, config: dict) -> None:
    rng = np.random.default_rng(0)
    side = config["sample_size"]
    feeds = {
        "sample": rng.standard_normal((2, config["in_channels"], side, side)).astype(np.float32),
        "timestep": np.array([500.0, 500.0], np.float32),
        "encoder_hidden_states": rng.standard_normal((2, 77, config["cross_attention_dim"])).astype(np.float32),
    }
    want = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    with torch.no_grad():
        got = unet(*(torch.from_numpy(v) for v in feeds.values()), return_dict=False)[0].numpy()
    if not np.abs(got - want).max() < 1e-4:
        raise RuntimeError(f"the UNet read back from {graph} differs from it by {np.abs(got - want).max():.3g}")


class Encoders:
    """The shipped text encoder and VAE encoder graphs, run by onnxruntime."""

    def __init__(self, folder: Path) -> None:
        def session(name: str) -> ort.InferenceSession:
            return ort.InferenceSession(str(folder / name / "model.onnx"), providers=["CPUExecutionProvider"])

        self.text, self.vae = session("text_encoder"), session("vae_encoder")
        self.tokenizer = CLIPTokenizer(folder / "tokenizer", max_length=77)
        self.scaling = json.loads((folder / "sd_onnx.json").read_text())["config"]["scaling_factor"]

    def prompts(self, captions: list[str]) -> torch.Tensor:
        return torch.from_numpy(self.text.run(None, {"input_ids": self.tokenizer(captions)})[0])

    def latents(self, pixels: np.ndarray) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] -> the posterior's mean, scaled as the UNet takes latents."""
        moments = self.vae.run(None, {"sample": pixels.astype(np.float32)})[0]
        return torch.from_numpy(moments[:, : moments.shape[1] // 2] * self.scaling)


def outline(picture: Image.Image) -> np.ndarray:
    """The control image of a picture: its Canny edges as (3, H, W) floats in [0, 1]."""
    edges = canny(np.asarray(picture.convert("RGB")), *OUTLINE).astype(np.float32) / 255
    return np.repeat(edges[None], 3, axis=0)


def batch(rng: random.Random, encoders: Encoders, combos: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded training scenes of `combos`: latents, prompt states, outlines."""
    scenes = [data.random_scene(rng, combos) for _ in range(BATCH)]
    pictures = [data.render(scene, rng=rng) for scene in scenes]
    pixels = np.stack([np.asarray(p, np.float32).transpose(2, 0, 1) / 127.5 - 1 for p in pictures])
    control = torch.from_numpy(np.stack([outline(p) for p in pictures]))
    return encoders.latents(pixels), encoders.prompts([s.caption for s in scenes]), control


def train(out: Path, steps: int, seed: int = 0) -> Path:
    from diffusers import ControlNetModel, DDIMScheduler

    folder = shipped_model("fp32")
    torch.manual_seed(seed)
    rng = random.Random(seed)
    unet = unet_from_onnx(folder).requires_grad_(False)
    encoders = Encoders(folder)
    scheduler = DDIMScheduler.from_pretrained(folder / "scheduler")
    levels = len(json.loads((folder / "vae_decoder" / "config.json").read_text())["block_out_channels"])
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32, 96, 256)[:levels])
    optimizer = torch.optim.AdamW(controlnet.parameters(), lr=LEARNING_RATE, weight_decay=0.0)
    alphas = scheduler.alphas_cumprod
    combos, _ = data.split_combinations()  # the held-out combinations stay unseen here too
    started = time.perf_counter()
    for step in range(steps):
        latents, states, control = batch(rng, encoders, combos)
        noise = torch.randn_like(latents)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (BATCH,))
        noisy = scheduler.add_noise(latents, noise, t)
        target = alphas[t].sqrt().view(-1, 1, 1, 1) * noise - (1 - alphas[t]).sqrt().view(-1, 1, 1, 1) * latents
        down, mid = controlnet(noisy, t, states, control, return_dict=False)
        prediction = unet(noisy, t, states, down_block_additional_residuals=down,
                          mid_block_additional_residual=mid, return_dict=False)[0]  # fmt: skip
        loss = F.mse_loss(prediction, target)  # v-prediction, as the UNet was trained
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step}/{steps} loss {loss.item():.4f} {time.perf_counter() - started:.0f} s", flush=True)
        if (step + 1) % 250 == 0:  # usable (and inspectable) before the end
            controlnet.save_pretrained(out / "controlnet")
    controlnet.save_pretrained(out / "controlnet")
    return out / "controlnet"


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        raise SystemExit("usage: python -m sd_onnx.models.shapes.controlnet OUT [STEPS]")
    print(train(Path(args[0]), int(args[1]) if len(args) > 1 else 1250))


if __name__ == "__main__":
    main()
