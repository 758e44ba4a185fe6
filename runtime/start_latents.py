"""Where a run starts: the first latents and the timesteps left to take. txt2img starts from noise (or given
latents); img2img encodes the init image and noises it to the step its strength (or `denoising_start`) enters
the schedule at, as diffusers' img2img pipelines; inpainting also keeps what each step puts back (inpaint.py).
Noise is drawn from the generator in diffusers' order, so seeds give diffusers' pictures."""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from .image import from_pil
from .inpaint import Inpainting, fill_masked, latent_mask, mask_pixels
from .request import GenerationRequest, is_latent_image
from .rng import Generator
from .schedulers import Scheduler


def start_latents(
    pipe: Any,
    request: GenerationRequest,
    sched: Scheduler,
    shape: tuple[int, ...],
    generator: Generator,
    latents: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, Inpainting | None]:
    """(latents, timesteps, inpainting state or None) for a resolved request on a scheduler whose timesteps
    are set; `latents`: txt2img's starting noise given by the caller (diffusers' `latents=`)."""
    timesteps, inpainting = sched.timesteps, None
    if request.image is not None and not pipe.family.reference_images:  # a reference is the family's conditioning
        latents, timesteps, inpainting = _img2img_latents(pipe, request, sched, shape, generator)
    elif latents is None:
        latents = generator.randn(shape) * np.float32(sched.init_noise_sigma)
    else:
        latents = _checked_latents(latents, shape) * np.float32(sched.init_noise_sigma)
    if request.denoising_end is not None:
        timesteps = timesteps[timesteps >= timestep_cutoff(pipe.scheduler_config, request.denoising_end)]
    return latents, timesteps, inpainting


def timestep_cutoff(scheduler_config: dict[str, Any], fraction: float) -> int:
    """The training timestep a fraction of the denoising lies at (diffusers' discrete_timestep_cutoff)."""
    trained = int(scheduler_config.get("num_train_timesteps", 1000))
    return int(round(trained - fraction * trained))


def _img2img_latents(
    pipe: Any,
    request: GenerationRequest,
    sched: Scheduler,
    shape: tuple[int, ...],
    generator: Generator,
) -> tuple[np.ndarray, np.ndarray, Inpainting | None]:
    """Encode the init image (latents are taken as they are) and noise it to the start timestep, as diffusers'
    img2img pipelines; with `denoising_start` the schedule starts there and no noise is added. With a mask,
    the inpainting state too (see inpaint.py)."""
    timesteps = _start(pipe, request, sched)
    image = request.image
    if request.mask_image is not None:
        return _inpaint_latents(pipe, request, sched, timesteps, shape, generator)
    if is_latent_image(image, pipe.config):
        init = np.asarray(image, np.float32)
    elif isinstance(image, Image.Image):
        init = pipe.encode_image(from_pil(image, request.width, request.height), generator, pipe.uses_tiling(request))
    else:
        init = pipe.encode_image(np.asarray(image, np.float32), generator, pipe.uses_tiling(request))
    init = np.concatenate([init] * (shape[0] // init.shape[0]))
    if request.denoising_start is not None:
        return init, timesteps, None
    return sched.add_noise(init, generator.randn(shape), timesteps[0]), timesteps, None


def _inpaint_latents(
    pipe: Any,
    request: GenerationRequest,
    sched: Scheduler,
    timesteps: np.ndarray,
    shape: tuple[int, ...],
    generator: Generator,
) -> tuple[np.ndarray, np.ndarray, Inpainting]:
    """Start latents and inpainting state, drawing from `generator` in diffusers' order: the image's
    latents (when needed), the noise, then the masked image's latents."""
    image = request.image
    pixels = from_pil(image, request.width, request.height) if isinstance(image, Image.Image) else image
    pixels = np.asarray(pixels, np.float32)
    mask = mask_pixels(request.mask_image, request.width, request.height, request.mask_blur)
    full = request.strength == 1.0
    image_latents = None
    if not pipe.config.inpainting or not full or pipe.family.fill_encodes_image:
        start = pixels
        if request.masked_content == "fill":
            start = from_pil(fill_masked(image, request.mask_image), request.width, request.height)
        image_latents = pipe.encode_image(start, generator, pipe.uses_tiling(request))
        image_latents = np.concatenate([image_latents] * (shape[0] // len(image_latents)))
        image_latents = _masked_content(pipe, request, image_latents, mask, generator)
    noise = generator.randn(shape)
    if full:
        latents = noise * np.float32(sched.init_noise_sigma)
    else:
        latents = sched.add_noise(image_latents, noise, timesteps[0])
    masked = pipe.encode_image(pixels * (mask < 0.5), generator, pipe.uses_tiling(request))  # a draw either way
    masked = np.concatenate([masked] * (shape[0] // len(masked)))
    channels = pipe.family.inpaint_channels(mask, masked) if pipe.config.inpainting else None
    state = Inpainting(
        mask=latent_mask(mask, pipe.config.vae_scale_factor, shape[0]),
        image_latents=image_latents,
        noise=noise,
        denoiser_channels=channels,
    )
    return latents, timesteps, state


def _masked_content(
    pipe: Any, request: GenerationRequest, latents: np.ndarray, mask: np.ndarray, generator: Generator
) -> np.ndarray:
    """The original's latents with the masked part replaced by noise or zeros (A1111's latent modes)."""
    if request.masked_content not in ("latent_noise", "latent_nothing"):
        return latents
    small = latent_mask(mask, pipe.config.vae_scale_factor, len(latents))
    fresh = generator.randn(latents.shape) if request.masked_content == "latent_noise" else 0.0
    return (latents * (1 - small) + fresh * small).astype(np.float32)


def _start(pipe: Any, request: GenerationRequest, sched: Scheduler) -> np.ndarray:
    """The timesteps an img2img run takes: from `denoising_start`, else the last `strength` of them."""
    if request.denoising_start is not None:
        remaining = int(np.sum(sched.timesteps < timestep_cutoff(pipe.scheduler_config, request.denoising_start)))
        if sched.order == 2 and remaining % 2 == 0:  # never stop between a second-order step's two halves
            remaining += 1
        start = len(sched.timesteps) - remaining
    else:
        start = pipe.family.first_step(sched.num_inference_steps, request.strength)
    sched.set_begin_index(start)
    return sched.timesteps[start:]


def _checked_latents(latents: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    latents = np.asarray(latents, dtype=np.float32)
    if latents.shape != shape:
        raise ValueError(f"latents must have shape {list(shape)}, got {list(latents.shape)}")
    if not np.isfinite(latents).all():
        raise ValueError("latents has non-finite values")
    return latents
