"""Inpainting, as diffusers' StableDiffusionInpaintPipeline does it, for both kinds of UNet.

The mask (white: repaint) is resized like the image, binarized at 0.5, and taken to latent size by nearest
neighbour. An inpainting UNet (latent + 1 + latent input channels, 9 for SD) sees the mask and the latents of
the image with the masked part blacked out beside its input at every step. An ordinary UNet denoises the
whole image and, after each step, the part outside the mask is replaced by the original latents noised to the
next step's level, so only the masked part changes.

With `padding_mask_crop` (A1111's "only masked") only a box around the mask, grown to the output's aspect ratio,
is inpainted at the full output size and pasted back into the untouched original (diffusers' crop and overlay).
Without it, `paste_back` lays the original back over the whole decoded picture outside the mask, as A1111 does in
every inpainting mode (its apply_overlay); diffusers does not, so unmasked pixels keep the VAE's round trip.
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
        mask = blurred(mask, blur)
    if isinstance(mask, Image.Image):
        if mask.size != (width, height):
            mask = mask.resize((width, height), Image.Resampling.LANCZOS)
        values = np.asarray(mask.convert("L"), dtype=np.float32)[None, None] / 255.0
    else:
        values = np.asarray(mask, dtype=np.float32)
    return (values >= 0.5).astype(np.float32)


def blurred(mask: Image.Image, radius: int) -> Image.Image:
    """The mask in grayscale with its edges softened by a Gaussian of `radius` pixels (A1111's mask blur)."""
    return mask.convert("L").filter(ImageFilter.GaussianBlur(radius))


@dataclass
class Inpainting:
    """What each denoising step needs: the latent-sized mask and, per UNet kind, the masked image's latents
    (inpainting UNets) or the original latents and the noise that re-noises them (ordinary UNets)."""

    mask: np.ndarray
    image_latents: np.ndarray | None
    noise: np.ndarray
    # An inpainting denoiser's channels beside its latents (the family's layout of the mask and the masked
    # image's latents); None for an ordinary one.
    denoiser_channels: np.ndarray | None

    @property
    def unet_takes_mask(self) -> bool:
        return self.denoiser_channels is not None

    def unet_input(self, model_input: np.ndarray) -> np.ndarray:
        """The denoiser's input for scaled latents: with the mask and the masked image's latents stacked on the
        channels for an inpainting denoiser (guidance duplicates the whole, as diffusers' batch does)."""
        if not self.unet_takes_mask:
            return model_input
        return np.concatenate([model_input, self.denoiser_channels], axis=1)

    def after_step(self, latents: np.ndarray, sched: Scheduler, timesteps: np.ndarray, i: int) -> np.ndarray:
        """An ordinary UNet's latents with the unmasked part put back: the original, noised to the next step."""
        if self.unet_takes_mask:
            return latents
        original = self.image_latents
        if i < len(timesteps) - 1:
            original = sched.add_noise(original, self.noise, timesteps[i + 1])
        return (1 - self.mask) * original + self.mask * latents


@dataclass
class MaskCrop:
    """The box around the mask that is inpainted, and the original it goes back into."""

    original: Image.Image
    mask: Image.Image  # at the original's size
    box: tuple[int, int, int, int]  # left, top, right, bottom

    @classmethod
    def around(
        cls, image: Image.Image, mask: Image.Image, width: int, height: int, pad: int, blur: int = 0
    ) -> MaskCrop:
        """The box holding every masked pixel plus `pad`, grown to width:height; `blur` softens the mask first
        (its soft edge then blends the pasted result, as A1111 does)."""
        mask = blurred(mask, blur) if blur else mask
        return cls(image, mask, crop_region(mask, width, height, pad))

    def image(self, width: int, height: int) -> Image.Image:
        return resize_fill(self.original.crop(self.box), width, height)

    def mask_image(self, width: int, height: int) -> Image.Image:
        return resize_fill(self.mask.crop(self.box), width, height)

    def paste(self, result: Image.Image) -> Image.Image:
        """The inpainted box scaled back into the original; outside the mask the original's pixels stay."""
        left, top, right, bottom = self.box
        merged = Image.new("RGBA", self.original.size)
        merged.paste(resize_cover(result, right - left, bottom - top), (left, top))
        return overlay(merged, self.original, self.mask)


def paste_back(
    results: list[Image.Image], image: Image.Image | np.ndarray, mask: Image.Image | np.ndarray, blur: int = 0
) -> list[Image.Image]:
    """Whole-picture inpainting's results with the original laid back over them outside the mask, as A1111's
    img2img does (processing.py: `mask_for_overlay` and `apply_overlay`): the init image at the results' size
    (resized with Lanczos, as for the encoder) through the mask blurred at its own size, resized, doubled and
    inverted, so a hard mask keeps every unmasked pixel of the original and a blurred one blends toward it."""
    width, height = results[0].size
    original = original_picture(image, width, height)
    soft = blurred(_mask_picture(mask), blur) if blur else _mask_picture(mask)
    if soft.size != (width, height):
        soft = soft.resize((width, height), Image.Resampling.LANCZOS)
    doubled = Image.fromarray(np.clip(np.asarray(soft, np.float32) * 2, 0, 255).astype(np.uint8), "L")
    return [overlay(result, original, doubled) for result in results]


def overlay(result: Image.Image, original: Image.Image, mask: Image.Image) -> Image.Image:
    """`original` laid over `result` through the inverted `mask` (the original's size): its pixels exactly where
    the mask is 0, the result's where it is 255, blended between (A1111's and diffusers' apply_overlay)."""
    keep = Image.new("RGBa", original.size)
    keep.paste(original.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    merged = result.convert("RGBA")
    merged.alpha_composite(keep.convert("RGBA"))
    return merged.convert("RGB")


def original_picture(image: Image.Image | np.ndarray, width: int, height: int) -> Image.Image:
    """The init image as an RGB picture of the output's size: a PIL image resized as the encoder's input is,
    (1, 3, H, W) pixels in [-1, 1] as they are."""
    if isinstance(image, Image.Image):
        image = image.convert("RGB")
        return image if image.size == (width, height) else image.resize((width, height), Image.Resampling.LANCZOS)
    pixels = np.clip(np.asarray(image, np.float32)[0].transpose(1, 2, 0) / 2 + 0.5, 0, 1)
    return Image.fromarray((pixels * 255).round().astype(np.uint8))


def _mask_picture(mask: Image.Image | np.ndarray) -> Image.Image:
    """A mask as a grayscale picture: a PIL image in "L", (1, 1, H, W) values in [0, 1] scaled to 0-255."""
    if isinstance(mask, Image.Image):
        return mask.convert("L")
    return Image.fromarray((np.asarray(mask, np.float32)[0, 0] * 255).round().astype(np.uint8), "L")


def crop_region(mask: Image.Image, width: int, height: int, pad: int) -> tuple[int, int, int, int]:
    """The smallest box holding the mask's non-zero pixels, padded by `pad` and grown (centred, kept inside the
    mask) to the width:height aspect ratio; diffusers' get_crop_region, to the pixel."""
    bounds = mask.convert("L").getbbox()
    if bounds is None:
        raise ValueError("mask_image: is empty (nothing to repaint), so there is no box to crop around it")
    w, h = mask.size
    x1, y1 = max(bounds[0] - pad, 0), max(bounds[1] - pad, 0)
    x2, y2 = min(bounds[2] + pad, w), min(bounds[3] + pad, h)
    ratio = width / height
    if (x2 - x1) / (y2 - y1) > ratio:
        y1, y2 = _grow(y1, y2, int((x2 - x1) / ratio - (y2 - y1)), h)
    else:
        x1, x2 = _grow(x1, x2, int((y2 - y1) * ratio - (x2 - x1)), w)
    return x1, y1, x2, y2


def _grow(low: int, high: int, by: int, limit: int) -> tuple[int, int]:
    """[low, high) widened by `by` around its centre, shifted back inside [0, limit)."""
    low, high = low - by // 2, high + by - by // 2
    if high >= limit:
        low, high = low - (high - limit), limit
    if low < 0:
        low, high = 0, min(high - low, limit)
    return low, high


def resize_fill(image: Image.Image, width: int, height: int) -> Image.Image:
    """Resized to fit inside width x height keeping its aspect ratio, centred, the bands left over filled by
    stretching its edge rows or columns (diffusers' resize_mode "fill")."""
    ratio, src_ratio = width / height, image.width / image.height
    src_w = width if ratio < src_ratio else image.width * height // image.height
    src_h = height if ratio >= src_ratio else image.height * width // image.width
    resized = image.resize((src_w, src_h), Image.Resampling.LANCZOS)
    out = Image.new("RGB", (width, height))
    out.paste(resized, (width // 2 - src_w // 2, height // 2 - src_h // 2))
    if ratio < src_ratio and (band := height // 2 - src_h // 2) > 0:
        out.paste(resized.resize((width, band), box=(0, 0, width, 0)), (0, 0))
        out.paste(resized.resize((width, band), box=(0, src_h, width, src_h)), (0, band + src_h))
    elif ratio > src_ratio and (band := width // 2 - src_w // 2) > 0:
        out.paste(resized.resize((band, height), box=(0, 0, 0, height)), (0, 0))
        out.paste(resized.resize((band, height), box=(src_w, 0, src_w, height)), (band + src_w, 0))
    return out


def resize_cover(image: Image.Image, width: int, height: int) -> Image.Image:
    """Resized to cover width x height keeping its aspect ratio, centred, the excess cut (diffusers' "crop")."""
    ratio, src_ratio = width / height, image.width / image.height
    src_w = width if ratio > src_ratio else image.width * height // image.height
    src_h = height if ratio <= src_ratio else image.height * width // image.width
    out = Image.new("RGB", (width, height))
    out.paste(
        image.resize((src_w, src_h), Image.Resampling.LANCZOS), (width // 2 - src_w // 2, height // 2 - src_h // 2)
    )
    return out


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


__all__ = [
    "MASKED_CONTENT", "Inpainting", "MaskCrop", "crop_region", "fill_masked", "latent_mask", "mask_pixels", "overlay",
    "paste_back",
]  # fmt: skip
