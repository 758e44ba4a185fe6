"""`StableDiffusionPipeline`: text -> image with onnxruntime, following diffusers' pipeline step for step.

Same call as diffusers' StableDiffusionPipeline (prompt, negative_prompt, num_inference_steps,
guidance_scale, height, width, latents, num_images_per_prompt, eta, output_type) plus `seed=`, which
reproduces diffusers' `torch.Generator("cpu").manual_seed(seed)`, and img2img through `image=`/`strength=`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .image import from_pil, to_pil
from .manifest import MANIFEST_NAME, Manifest, ManifestError, ModelConfig
from .rng import TorchGenerator
from .schedulers import Scheduler, make_scheduler, resolve_name
from .session import OnnxModel, SessionConfig, resolve_providers
from .tokenizer import CLIPTokenizer

StepCallback = Callable[[int, int, np.ndarray], bool | None]
"""Called after each step with (step index, total steps, latents); returning False cancels the run."""


class GenerationCancelled(Exception):
    """The step callback asked to stop."""


@dataclass
class PipelineOutput:
    images: list[Image.Image] | np.ndarray
    parameters: dict[str, Any]


class StableDiffusionPipeline:
    """Load an exported folder once, then generate as often as needed."""

    def __init__(
        self,
        folder: Path,
        manifest: Manifest | None,
        config: ModelConfig,
        scheduler: str | None,
        session_config: SessionConfig,
        low_memory: bool = False,
    ) -> None:
        self.folder = folder
        self.manifest = manifest
        self.config = config
        self.session_config = session_config
        self.low_memory = low_memory
        self.scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        self.scheduler_name = resolve_name(scheduler or self.scheduler_config.get("_class_name", "pndm"))
        self.tokenizer = CLIPTokenizer(folder / "tokenizer", config.max_token_length)
        self._models: dict[str, OnnxModel] = {}
        if not low_memory:
            for name in ("text_encoder", "unet", "vae_decoder"):
                self._model(name)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        provider: str = "auto",
        scheduler: str | None = None,
        threads: int | None = None,
        low_memory: bool = False,
        verify: bool = True,
        optimization: str = "all",
        cache: bool = True,
    ) -> StableDiffusionPipeline:
        """Open an sd-onnx folder (checked against its manifest unless `verify=False`) or a plain
        Optimum/diffusers ONNX folder (sizes read from its configs).

        `optimization` is onnxruntime's graph optimization level ("disabled", "basic", "extended", "all");
        `cache` keeps the optimized CPU graph beside the model so later loads skip that work."""
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise ManifestError(f"{folder}: no such model folder")
        session_config = SessionConfig(tuple(resolve_providers(provider)), threads, optimization, cache)
        if scheduler is not None:
            resolve_name(scheduler)
        if (folder / MANIFEST_NAME).is_file():
            manifest = Manifest.load(folder)
            if verify:
                manifest.verify(folder)
            config = manifest.config
        else:
            manifest, config = None, _config_from_plain_folder(folder)
        return cls(folder, manifest, config, scheduler, session_config, low_memory)

    def _model(self, name: str) -> OnnxModel:
        if name not in self._models:
            info = self.manifest.components.get(name) if self.manifest else None
            file = self.folder / (info.file if info else f"{name}/model.onnx")
            if not file.is_file():
                raise ManifestError(f"{name}: missing model file {file}")
            self._models[name] = OnnxModel(file, info, self.session_config)
        return self._models[name]

    def _release(self, name: str) -> None:
        if self.low_memory:
            self._models.pop(name, None)

    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        seed: int | None = None,
        latents: np.ndarray | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        output_type: str = "pil",
        callback: StepCallback | None = None,
        image: Image.Image | np.ndarray | None = None,
        strength: float = 0.8,
        scheduler: str | None = None,
    ) -> PipelineOutput:
        """Generate images; see diffusers' StableDiffusionPipeline for the meaning of each argument."""
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompt must be a string or a non-empty list of strings")
        guidance_scale = self.config.guidance_scale if guidance_scale is None else guidance_scale
        height = height or self.config.default_resolution
        width = width or self.config.default_resolution
        self._check_settings(height, width, num_inference_steps, num_images_per_prompt, output_type, strength)
        name = resolve_name(scheduler) if scheduler else self.scheduler_name
        sched = make_scheduler(name, self.scheduler_config)
        if name == "ddim":
            sched.eta = eta
        generator = TorchGenerator(seed if seed is not None else int(np.random.SeedSequence().entropy % 2**63))
        do_cfg = guidance_scale > 1.0

        embeddings = self._encode(prompts, negative_prompt, num_images_per_prompt, do_cfg)
        batch = len(prompts) * num_images_per_prompt
        shape = (
            batch,
            self.config.latent_channels,
            height // self.config.vae_scale_factor,
            width // self.config.vae_scale_factor,
        )
        sched.set_timesteps(num_inference_steps)
        timesteps = sched.timesteps
        if image is not None:
            latents, timesteps = self._img2img_latents(image, sched, strength, shape, generator, width, height)
        elif latents is None:
            latents = generator.randn(shape) * np.float32(sched.init_noise_sigma)
        else:
            latents = self._check_latents(latents, shape) * np.float32(sched.init_noise_sigma)

        latents = self._denoise(latents, embeddings, sched, timesteps, guidance_scale, do_cfg, generator, callback)
        self._release("unet")
        images = self._decode(latents)
        self._release("vae_decoder")
        params = {
            "Steps": num_inference_steps,
            "Sampler": name,
            "CFG scale": guidance_scale,
            "Seed": generator.seed,
            "Size": f"{width}x{height}",
            "Model": Path(self.manifest.source).name if self.manifest else self.folder.name,
        }
        if image is not None:
            params["Denoising strength"] = strength
        return PipelineOutput(images=to_pil(images) if output_type == "pil" else images, parameters=params)

    def _check_settings(
        self, height: int, width: int, steps: int, per_prompt: int, output: str, strength: float
    ) -> None:
        factor = self.config.vae_scale_factor
        if height % 8 or width % 8 or height % factor or width % factor:
            raise ValueError(f"height and width must be multiples of {max(8, factor)}, got {width}x{height}")
        if height <= 0 or width <= 0:
            raise ValueError(f"height and width must be positive, got {width}x{height}")
        if int(steps) != steps or steps < 1:
            raise ValueError(f"num_inference_steps must be an integer >= 1, got {steps}")
        if per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be >= 1, got {per_prompt}")
        if output not in ("pil", "np"):
            raise ValueError(f"output_type must be 'pil' or 'np', got {output!r}")
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}")

    @staticmethod
    def _check_latents(latents: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        latents = np.asarray(latents, dtype=np.float32)
        if latents.shape != shape:
            raise ValueError(f"latents must have shape {list(shape)}, got {list(latents.shape)}")
        return latents

    def _encode(
        self, prompts: list[str], negative: str | list[str] | None, per_prompt: int, do_cfg: bool
    ) -> np.ndarray:
        """Text embeddings, repeated per image; with guidance, [unconditional; conditional] in one batch."""
        encoder = self._model("text_encoder")
        ids_type = encoder.input_dtype("input_ids", np.int32)
        cond = encoder(input_ids=self.tokenizer(prompts).astype(ids_type))[0].repeat(per_prompt, axis=0)
        if do_cfg:
            negatives = (
                [""] * len(prompts) if negative is None else ([negative] if isinstance(negative, str) else negative)
            )
            if len(negatives) != len(prompts):
                raise ValueError(f"negative_prompt has {len(negatives)} entries for {len(prompts)} prompts")
            uncond = encoder(input_ids=self.tokenizer(negatives).astype(ids_type))[0].repeat(per_prompt, axis=0)
            cond = np.concatenate([uncond, cond])
        self._release("text_encoder")
        return cond

    def _denoise(
        self,
        latents: np.ndarray,
        embeddings: np.ndarray,
        sched: Scheduler,
        timesteps: np.ndarray,
        guidance_scale: float,
        do_cfg: bool,
        generator: TorchGenerator,
        callback: StepCallback | None,
    ) -> np.ndarray:
        unet = self._model("unet")
        timestep_type = unet.input_dtype("timestep")
        scalar_timestep = unet.input_rank("timestep") == 0  # Optimum's recent exports take a 0-d timestep
        for i, t in enumerate(timesteps):
            model_input = np.concatenate([latents] * 2) if do_cfg else latents
            model_input = sched.scale_model_input(model_input, t)
            timestep = np.array(t, timestep_type) if scalar_timestep else np.full(len(model_input), t, timestep_type)
            noise_pred = unet(sample=model_input, timestep=timestep, encoder_hidden_states=embeddings)[0]
            if do_cfg:
                uncond, cond = np.split(noise_pred, 2)
                noise_pred = uncond + np.float32(guidance_scale) * (cond - uncond)
            latents = sched.step(noise_pred, t, latents, noise=generator)
            if callback is not None and callback(i, len(timesteps), latents) is False:
                raise GenerationCancelled(f"cancelled after step {i + 1} of {len(timesteps)}")
        return latents

    def _decode(self, latents: np.ndarray) -> np.ndarray:
        """Latents -> (N, H, W, 3) floats in [0, 1]; one image at a time keeps VAE memory flat."""
        decoder = self._model("vae_decoder")
        scaled = latents / np.float32(self.config.scaling_factor)
        if self.config.shift_factor:
            scaled = scaled + np.float32(self.config.shift_factor)
        images = np.concatenate([decoder(latent_sample=scaled[i : i + 1])[0] for i in range(len(scaled))])
        return np.clip(images / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)

    def _img2img_latents(
        self,
        image: Image.Image | np.ndarray,
        sched: Scheduler,
        strength: float,
        shape: tuple[int, ...],
        generator: TorchGenerator,
        width: int,
        height: int,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Encode the init image, noise it to the start timestep; as diffusers' img2img pipeline."""
        pixels = from_pil(image, width, height) if isinstance(image, Image.Image) else np.asarray(image, np.float32)
        moments = self._model("vae_encoder")(sample=pixels)[0]
        self._release("vae_encoder")
        mean, logvar = np.split(moments, 2, axis=1)
        std = np.exp(0.5 * np.clip(logvar, -30.0, 20.0))
        init = (mean + std * generator.randn(mean.shape)) * np.float32(self.config.scaling_factor)
        init = np.concatenate([init] * (shape[0] // init.shape[0]))
        n = sched.num_inference_steps
        start = max(n - min(int(n * strength), n), 0)
        sched.set_begin_index(start)
        timesteps = sched.timesteps[start:]
        noise = generator.randn(shape)
        return sched.add_noise(init, noise, timesteps[0]), timesteps


def _config_from_plain_folder(folder: Path) -> ModelConfig:
    """Sizes for an Optimum/diffusers ONNX folder without our manifest, from the configs it carries
    (the embedding width from the text encoder graph when its config is missing)."""

    def read(rel: str) -> dict[str, Any]:
        path = folder / rel
        return json.loads(path.read_text()) if path.is_file() else {}

    if not (folder / "unet" / "model.onnx").is_file():
        raise ManifestError(f"{folder}: not an ONNX Stable Diffusion folder (no unet/model.onnx)")
    vae, unet, text = read("vae_decoder/config.json"), read("unet/config.json"), read("text_encoder/config.json")
    width = text.get("hidden_size")
    if width is None:
        import onnxruntime as ort

        graph = ort.InferenceSession(str(folder / "text_encoder" / "model.onnx"), providers=["CPUExecutionProvider"])
        width = graph.get_outputs()[0].shape[-1]
    levels = len(vae.get("block_out_channels", (128, 256, 512, 512)))
    return ModelConfig(
        embedding_dim=int(width),
        latent_channels=int(vae.get("latent_channels", 4)),
        vae_scale_factor=2 ** (levels - 1),
        scaling_factor=float(vae.get("scaling_factor", 0.18215)),
        sample_size=int(unet.get("sample_size", 64)),
        max_token_length=int(text.get("max_position_embeddings", 77)),
        prediction_type=read("scheduler/scheduler_config.json").get("prediction_type", "epsilon"),
    )


__all__ = ["StableDiffusionPipeline", "PipelineOutput", "GenerationCancelled"]
