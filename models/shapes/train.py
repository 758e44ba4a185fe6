"""Train the shapes model on this machine's CPU: the VAE, the text encoder on its own, the UNet, then the decoder again.

    python -m sd_onnx.models.shapes.train out/shapes-train      # resumes from its last checkpoint

Seeded end to end. Writes `checkpoint.pt` every few hundred steps (an interrupted run resumes there) and,
when done, a diffusers pipeline folder `OUT/pipeline` for `sd-export convert`.
"""

from __future__ import annotations

import copy
import math
import random
import sys
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..build import SD15_SCHEDULER, clip_tokenizer, create_modules, save_pipeline
from . import data

RESOLUTION = 64
RECIPE: dict[str, dict[str, Any]] = {
    "text_encoder": {"hidden_size": 32, "intermediate_size": 128, "num_attention_heads": 4, "num_hidden_layers": 2},
    "unet": {
        "block_out_channels": (32, 64, 64),
        "layers_per_block": 1,
        "sample_size": 16,
        "down_block_types": ("CrossAttnDownBlock2D",) * 3,
        "up_block_types": ("CrossAttnUpBlock2D",) * 3,
        "cross_attention_dim": 32,
        "attention_head_dim": 8,
        "norm_num_groups": 16,
    },
    "vae": {
        "block_out_channels": (16, 32, 64),
        "down_block_types": ("DownEncoderBlock2D",) * 3,
        "up_block_types": ("UpDecoderBlock2D",) * 3,
        "layers_per_block": 1,
        "norm_num_groups": 16,
        "sample_size": RESOLUTION,
    },
}
SEED = 0
VAE_STEPS, VAE_BATCH, VAE_LR, EDGE_WEIGHT = 3_000, 16, 1e-3, 8.0
TEXT_STEPS, TEXT_BATCH, TEXT_LR = 800, 128, 1e-3
DATASET_SIZE = 40_000
UNET_BATCH = 64
# (steps, peak learning rate, warm-up steps) per cosine cycle. The loss was still falling when the first
# cycle's rate reached its floor; a second, lower cycle (a warm restart, as in SGDR) goes on from there.
UNET_CYCLES: tuple[tuple[int, float, int], ...] = ((4_000, 1e-3, 200), (2_000, 3e-4, 50))
EMPTY_CAPTION_P, EMA_DECAY = 0.1, 0.999
DECODER_STEPS, DECODER_BATCH, DECODER_LR, LATENT_NOISE = 1_000, 16, 2e-4, 0.4
CHECKPOINT_EVERY = 250
# Zero terminal SNR (Lin et al. 2023): on SD's schedule the last timestep still leaks the noise's low
# frequencies, and a model learns to take the object's place from them instead of from the caption. With the
# leak closed only the caption can say where; that needs v-prediction and sampling from the last timestep.
NOISE_SCHEDULE = {
    **{k: v for k, v in SD15_SCHEDULER.items() if k not in ("skip_prk_steps", "set_alpha_to_one")},
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True,
}


def cosine_lr(step: int, total: int, peak: float, warmup: int = 0) -> float:
    """Linear warm-up then cosine decay to 1 % of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress)))


def cycles_lr(step: int, cycles: tuple[tuple[int, float, int], ...]) -> float:
    """The rate of `step` in consecutive cosine cycles of (steps, peak, warm-up)."""
    for length, peak, warmup in cycles:
        if step < length:
            return cosine_lr(step, length, peak, warmup)
        step -= length
    raise ValueError("step is past the last cycle")


def optimizer_step(opt: torch.optim.Optimizer, loss: torch.Tensor, lr: float, clip: float | None = None) -> None:
    """One step of `opt` on `loss` at learning rate `lr`, the gradient norm clipped to `clip` if given."""
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_([p for group in opt.param_groups for p in group["params"]], clip)
    opt.step()


def reconstruction_loss(recon: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """MSE + 0.5 L1, weighted towards color edges."""
    error = (recon - pixels).pow(2) + 0.5 * (recon - pixels).abs()
    return (edge_weights(pixels) * error).mean()


def edge_weights(pixels: torch.Tensor) -> torch.Tensor:
    """Per-pixel VAE loss weights, 1 + EDGE_WEIGHT within a pixel of a color edge: a shape is told apart by its
    outline (a triangle's tip, a square's corners), a few percent of the pixels that plain MSE lets blur."""
    dx = (pixels[..., :, 1:] - pixels[..., :, :-1]).abs().sum(1, keepdim=True)
    dy = (pixels[..., 1:, :] - pixels[..., :-1, :]).abs().sum(1, keepdim=True)
    edges = F.pad(dx, (0, 1, 0, 0)) + F.pad(dy, (0, 0, 0, 1))
    near_edge = F.max_pool2d(edges, kernel_size=3, stride=1, padding=1) > 0.05
    return 1.0 + EDGE_WEIGHT * near_edge.float()


class AttributeHeads(torch.nn.Module):
    """Linear read-outs of every caption attribute from the text encoder's end-of-text and padding states, the
    tokens that have seen the whole caption and take most of the UNet's cross-attention.

    SD's UNet is trained on a frozen, pretrained CLIP text encoder. Ours starts from random weights, and trained
    jointly with the UNet it never told "left" from "right": the UNet could not use a difference the encoder
    did not make, so the encoder was never asked to make it (measured: position at chance). Pretraining the
    encoder to make every attribute readable breaks that deadlock; the UNet then learns placement within
    100 steps on high-noise inputs."""

    ATTRIBUTES: ClassVar[dict[str, list[str | None]]] = {
        "color": list(data.COLORS),
        "shape": list(data.SHAPES),
        "background": list(data.COLORS),
        "size": [None, *data.SIZES],
        "position": [None, *data.POSITIONS],
    }

    def __init__(self, width: int) -> None:
        super().__init__()
        self.heads = torch.nn.ModuleDict({k: torch.nn.Linear(width, len(v)) for k, v in self.ATTRIBUTES.items()})

    def logits(self, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: head(hidden) for name, head in self.heads.items()}

    @classmethod
    def labels(cls, name: str, scenes: list[data.Scene]) -> torch.Tensor:
        """Class index of attribute `name` for each scene (None: not named in the caption)."""
        return torch.tensor([cls.ATTRIBUTES[name].index(getattr(s, name)) for s in scenes])

    def loss(self, hidden: torch.Tensor, summary: torch.Tensor, scenes: list[data.Scene]) -> torch.Tensor:
        """Cross-entropy of every attribute, averaged over the tokens where `summary` is true."""
        total = hidden.new_zeros(())
        for name, logits in self.logits(hidden).items():
            labels = self.labels(name, scenes)[:, None].expand(-1, hidden.shape[1])
            ce = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
            total = total + (ce * summary).sum() / summary.sum()
        return total


class Trainer:
    """Holds the models, optimisers and progress; `run()` trains whatever is left and saves the pipeline."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.checkpoint = workdir / "checkpoint.pt"
        torch.manual_seed(SEED)
        self.text_encoder, self.unet, self.vae = create_modules(RECIPE)
        self.tokenizer = clip_tokenizer(workdir / "tokenizer")
        self._zero_unused_embeddings()
        self.seen, _ = data.split_combinations()
        self.state: dict[str, Any] = {
            "vae_step": 0,
            "text_step": 0,
            "unet_step": 0,
            "decoder_step": 0,
            "scaling_factor": None,
        }
        self.vae_opt = torch.optim.AdamW(self.vae.parameters(), lr=VAE_LR)
        decoder = [*self.vae.decoder.parameters(), *self.vae.post_quant_conv.parameters()]
        self.decoder_opt = torch.optim.AdamW(decoder, lr=DECODER_LR)
        self.opt = torch.optim.AdamW(self.unet.parameters(), lr=UNET_CYCLES[0][1])
        self.ema_unet = copy.deepcopy(self.unet).requires_grad_(False)
        from diffusers import DDPMScheduler

        self.noise = DDPMScheduler(**NOISE_SCHEDULE)
        if self.checkpoint.exists():
            self._load()

    def _zero_unused_embeddings(self) -> None:
        """Rows of tokens the captions never use stay exactly zero (AdamW keeps zeros at zero): the exported
        text encoder compresses to little, and unknown words map to a neutral embedding."""
        words = {*data.COLORS, *data.SHAPES, *data.SIZES, "a", "on", "background"}
        words |= {w for p in data.POSITIONS for w in p.split()}
        used = set(self.tokenizer(" ".join(sorted(words)), padding="max_length", max_length=77).input_ids)
        used |= {self.tokenizer.bos_token_id, self.tokenizer.eos_token_id, self.tokenizer.pad_token_id}
        emb = self.text_encoder.get_input_embeddings().weight
        mask = torch.ones(emb.shape[0], dtype=torch.bool)
        mask[sorted(used)] = False
        with torch.no_grad():
            emb[mask] = 0.0

    def run(self) -> Path:
        self._train_vae()
        self._pretrain_text()
        latents, ids = self._encode_dataset()
        self._train_unet(latents, ids)
        self._harden_decoder()
        return self._export_pipeline()

    # -- stage 1: VAE reconstruction -------------------------------------------------------------
    def _train_vae(self) -> None:
        rng = random.Random(SEED + self.state["vae_step"])
        bar = tqdm(total=VAE_STEPS, initial=self.state["vae_step"], desc="vae", file=sys.stdout, mininterval=10)
        self.vae.train()
        while self.state["vae_step"] < VAE_STEPS:
            step = self.state["vae_step"]
            pixels, _ = data.batch(rng, data.all_combinations(), VAE_BATCH, RESOLUTION)
            x = torch.from_numpy(pixels)
            # Deterministic (the posterior mean, no KL term): with sampled latents the decoder learns to
            # expect noise and blurs the small shapes; the scaling factor normalises the latents instead.
            recon = self.vae.decode(self.vae.encode(x).latent_dist.mode()).sample
            loss = reconstruction_loss(recon, x)
            optimizer_step(self.vae_opt, loss, cosine_lr(step, VAE_STEPS, VAE_LR, warmup=50))
            self._step_done("vae_step", VAE_STEPS, bar, loss)
        bar.close()

    # -- stage 2: text encoder ------------------------------------------------------------------
    def _pretrain_text(self) -> AttributeHeads | None:
        """Teach the text encoder to make each caption attribute readable (AttributeHeads), then freeze it.
        A short stage (about a minute): an interrupted one reruns from the start, seeded, to the same weights."""
        self.text_encoder.requires_grad_(False).eval()
        if self.state["text_step"] >= TEXT_STEPS:
            return None
        torch.manual_seed(SEED + 3)
        heads = AttributeHeads(self.text_encoder.config.hidden_size)
        self.text_encoder.requires_grad_(True).train()
        opt = torch.optim.AdamW([*self.text_encoder.parameters(), *heads.parameters()], lr=TEXT_LR)
        rng = random.Random(SEED + 3)
        for step in tqdm(range(TEXT_STEPS), desc="text", file=sys.stdout, mininterval=10):
            scenes = [data.random_scene(rng, self.seen) for _ in range(TEXT_BATCH)]
            ids = self._tokens([s.caption for s in scenes])
            loss = heads.loss(self.text_encoder(ids)[0], (ids == self.tokenizer.eos_token_id).float(), scenes)
            optimizer_step(opt, loss, cosine_lr(step, TEXT_STEPS, TEXT_LR, warmup=50))
        self.text_encoder.requires_grad_(False).eval()
        self.state["text_step"] = TEXT_STEPS
        self._save()
        return heads

    def _tokens(self, captions: list[str]) -> torch.Tensor:
        return self.tokenizer(captions, padding="max_length", max_length=77, return_tensors="pt").input_ids

    @torch.no_grad()
    def _encode_dataset(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Render DATASET_SIZE scenes from the seen combinations once; keep their latents and token ids."""
        cache = self.workdir / "dataset.pt"
        if cache.exists():
            saved = torch.load(cache)
            self.state["scaling_factor"] = saved["scaling_factor"]
            return saved["latents"], saved["ids"]
        self.vae.eval()
        rng = random.Random(SEED + 1)
        chunks, captions = [], []
        for _ in tqdm(range(DATASET_SIZE // 250), desc="encode", file=sys.stdout, mininterval=10):
            pixels, caps = data.batch(rng, self.seen, 250, RESOLUTION)
            chunks.append(self.vae.encode(torch.from_numpy(pixels)).latent_dist.mode())
            captions += caps
        latents = torch.cat(chunks)
        scaling_factor = float(1.0 / latents.std())
        ids = self._tokens(captions)
        torch.save({"latents": latents, "ids": ids, "scaling_factor": scaling_factor}, cache)
        self.state["scaling_factor"] = scaling_factor
        return latents, ids

    # -- stage 3: UNet, on the frozen text encoder ------------------------------------------------
    def _train_unet(self, latents: torch.Tensor, ids: torch.Tensor) -> None:
        gen = torch.Generator().manual_seed(SEED + 2 + self.state["unet_step"])
        empty = self._tokens([""])
        scale = self.state["scaling_factor"]
        total = sum(length for length, _, _ in UNET_CYCLES)
        bar = tqdm(total=total, initial=self.state["unet_step"], desc="unet", file=sys.stdout, mininterval=10)
        self.unet.train()
        while self.state["unet_step"] < total:
            step = self.state["unet_step"]
            idx = torch.randint(0, len(latents), (UNET_BATCH,), generator=gen)
            x0 = latents[idx] * scale
            tokens = ids[idx].clone()
            tokens[torch.rand(UNET_BATCH, generator=gen) < EMPTY_CAPTION_P] = empty
            t = torch.randint(0, self.noise.config.num_train_timesteps, (UNET_BATCH,), generator=gen)
            eps = torch.randn(x0.shape, generator=gen)
            noisy = self.noise.add_noise(x0, eps, t)
            with torch.no_grad():
                text = self.text_encoder(tokens)[0]
            pred = self.unet(noisy, t, text).sample
            loss = F.mse_loss(pred, self.noise.get_velocity(x0, eps, t))
            optimizer_step(self.opt, loss, cycles_lr(step, UNET_CYCLES), clip=1.0)
            self._update_ema(min(EMA_DECAY, (1 + step) / (10 + step)))
            self._step_done("unet_step", total, bar, loss)
        bar.close()

    # -- stage 4: a decoder that forgives the UNet's small errors -----------------------------------
    def _harden_decoder(self) -> None:
        """Fine-tune the decoder (the encoder, and so the UNet's latent space, stays as it is) to draw the
        clean image from latents with noise of up to LATENT_NOISE of their spread added.

        Trained on the encoder's exact latents alone, the decoder turned the small deviations in sampled
        latents into wobbly edges: small squares came out with dented sides and were judged circles."""
        rng = random.Random(SEED + 4 + self.state["decoder_step"])
        gen = torch.Generator().manual_seed(SEED + 4 + self.state["decoder_step"])
        spread = 1.0 / self.state["scaling_factor"]
        bar = tqdm(total=DECODER_STEPS, initial=self.state["decoder_step"], desc="decoder", file=sys.stdout,
                   mininterval=10)  # fmt: skip
        self.vae.train()
        while self.state["decoder_step"] < DECODER_STEPS:
            step = self.state["decoder_step"]
            pixels, _ = data.batch(rng, data.all_combinations(), DECODER_BATCH, RESOLUTION)
            x = torch.from_numpy(pixels)
            with torch.no_grad():
                latents = self.vae.encode(x).latent_dist.mode()
            level = LATENT_NOISE * spread * torch.rand(len(x), 1, 1, 1, generator=gen)
            noisy = latents + level * torch.randn(latents.shape, generator=gen)
            loss = reconstruction_loss(self.vae.decode(noisy).sample, x)
            optimizer_step(self.decoder_opt, loss, cosine_lr(step, DECODER_STEPS, DECODER_LR, warmup=50))
            self._step_done("decoder_step", DECODER_STEPS, bar, loss)
        bar.close()

    def _step_done(self, counter: str, total: int, bar: tqdm, loss: torch.Tensor) -> None:
        """Count the step, show it, and checkpoint every CHECKPOINT_EVERY steps and at the stage's end."""
        self.state[counter] += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        if self.state[counter] % CHECKPOINT_EVERY == 0 or self.state[counter] == total:
            self._save()

    @torch.no_grad()
    def _update_ema(self, decay: float) -> None:
        for e, p in zip(self.ema_unet.parameters(), self.unet.parameters(), strict=True):
            e.lerp_(p, 1 - decay)

    # -- checkpoints and output -------------------------------------------------------------------
    def _modules(self) -> dict[str, Any]:
        return {
            "text_encoder": self.text_encoder,
            "unet": self.unet,
            "vae": self.vae,
            "ema_unet": self.ema_unet,
            "vae_opt": self.vae_opt,
            "decoder_opt": self.decoder_opt,
            "opt": self.opt,
        }

    def _save(self) -> None:
        payload = {name: m.state_dict() for name, m in self._modules().items()}
        payload["state"] = dict(self.state, saved_at=time.time())
        tmp = self.checkpoint.with_suffix(".tmp")
        torch.save(payload, tmp)
        tmp.replace(self.checkpoint)

    def _load(self) -> None:
        payload = torch.load(self.checkpoint, weights_only=False)
        for name, module in self._modules().items():
            if name in payload:  # checkpoints from before a stage existed lack its optimiser
                module.load_state_dict(payload[name])
        self.state.update(payload["state"])
        steps = ", ".join(f"{k} {v}" for k, v in self.state.items() if k.endswith("_step"))
        print(f"resumed: {steps}")

    def _export_pipeline(self) -> Path:
        """The EMA UNet as a diffusers pipeline with the DDIM "trailing" sampler its schedule needs; the VAE
        records the scaling factor measured on its latents."""
        from diffusers import DDIMScheduler

        self.vae.register_to_config(scaling_factor=self.state["scaling_factor"])
        out = self.workdir / "pipeline"
        scheduler = DDIMScheduler(
            **NOISE_SCHEDULE, set_alpha_to_one=False, clip_sample=False, timestep_spacing="trailing"
        )
        save_pipeline(self.text_encoder.eval(), self.ema_unet.eval(), self.vae.eval(), out, scheduler)
        return out


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m sd_onnx.models.shapes.train WORKDIR")
    workdir = Path(args[0])
    workdir.mkdir(parents=True, exist_ok=True)
    np.random.seed(SEED)
    started = time.time()
    out = Trainer(workdir).run()
    print(f"pipeline: {out} ({(time.time() - started) / 60:.1f} min this run)")


if __name__ == "__main__":
    main()
