"""Inpainting, as diffusers' StableDiffusionInpaintPipeline does it, for both kinds of UNet.

The mask (white: repaint) is resized like the image, binarized at 0.5, and taken to latent size by nearest
neighbour. An inpainting UNet (latent + 1 + latent input channels, 9 for SD) sees the mask and the latents of
the image with the masked part blacked out beside its input at every step. An ordinary UNet denoises the
whole image and, after each step, the part outside the mask is replaced by the original latents noised to the
next step's level, so only the masked part changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from .schedulers import Scheduler

# What the masked part starts from when strength < 1: the original, A1111's blurred-surroundings fill, or latent
# noise / zeros in place of the original's latents.
MASKED_CONTENT = ("original", "fill", "latent_noise", "latent_nothing")


def mask_pixels(mask: Image.Image | np.ndarray, width: int, height: int, blur: int = 0) -> np.ndarray:
    """(1, 1, H, W) float32 of 0 and 1, 1 where the image is repainted: a PIL mask is resized (Lanczos) and then
    made grayscale, as diffusers' mask processor does; an array is taken as it is. `blur` first softens the
    mask's edges at its own size (A1111's mask blur). Binarized at 0.5."""
    if blur:
        if not isinstance(mask, Image.Image):
            mask = Image.fromarray((np.asarray(mask)[0, 0] * 255).round().astype(np.uint8), "L")
        mask = mask.convert("L").filter(ImageFilter.GaussianBlur(blur))
    if isinstance(mask, Image.Image):
        if mask.size != (width, height):
            mask = mask.resize((width, height), Image.Resampling.LANCZOS)
        values = np.asarray(mask.convert("L"), dtype=np.float32)[None, None] / 255.0
    else:
        values = np.asarray(mask, dtype=np.float32)
    return (values >= 0.5).astype(np.float32)


@dataclass
class Inpainting:
    """What each denoising step needs: the latent-sized mask and, per UNet kind, the masked image's latents
    (inpainting UNets) or the original latents and the noise that re-noises them (ordinary UNets)."""

    mask: np.ndarray
    masked_latents: np.ndarray
    image_latents: np.ndarray | None
    noise: np.ndarray
    unet_takes_mask: bool

    def unet_input(self, model_input: np.ndarray) -> np.ndarray:
        """The UNet's input for scaled latents: with the mask and the masked image's latents stacked on the
        channels for an inpainting UNet (guidance duplicates the whole, as diffusers' batch does)."""
        if not self.unet_takes_mask:
            return model_input
        return np.concatenate([model_input, self.mask, self.masked_latents], axis=1)

    def after_step(self, latents: np.ndarray, sched: Scheduler, timesteps: np.ndarray, i: int) -> np.ndarray:
        """An ordinary UNet's latents with the unmasked part put back: the original, noised to the next step."""
        if self.unet_takes_mask:
            return latents
        original = self.image_latents
        if i < len(timesteps) - 1:
            original = sched.add_noise(original, self.noise, timesteps[i + 1])
        return (1 - self.mask) * original + self.mask * latents


def latent_mask(mask: np.ndarray, factor: int, count: int) -> np.ndarray:
    """The pixel mask at latent size (torch's nearest interpolation by an integer factor), one per image."""
    small = mask[:, :, ::factor, ::factor]
    return np.concatenate([small] * (count // len(small))).astype(np.float32)


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """The image with its masked part painted over by ever finer blurs of the rest (A1111's "fill" masked
    content): a start with the surroundings' colours and no trace of what was masked."""
    keep = ImageOps.invert(mask.convert("L").resize(image.size))
    masked = Image.new("RGBa", image.size)
    masked.paste(image.convert("RGBA").convert("RGBa"), mask=keep)
    filled = Image.new("RGBA", image.size)
    for radius, repeats in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        blurred = masked.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            filled.alpha_composite(blurred)
    return filled.convert("RGB")


__all__ = ["MASKED_CONTENT", "Inpainting", "fill_masked", "latent_mask", "mask_pixels"]
