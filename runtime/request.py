"""`GenerationRequest`: every generation setting, its default and its limits, validated in one place.

The CLI, both server APIs and `StableDiffusionPipeline.__call__` all build one and call `resolve`, which fills
the defaults from the model (guidance, size, sampler), draws the seed, and checks every field against what the
model can run (its size multiple, its noise schedule) and against `Limits`. A bad field raises `RequestError`
(a ValueError) naming the field, so each front end only renames the field into its own vocabulary.
PNG parameters and server answers are derived from the resolved request.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from .echo import echo
from .inpaint import MASKED_CONTENT
from .manifest import ModelConfig
from .prompt_syntax import SYNTAXES, parse_attention
from .schedulers import make_scheduler, resolve_name, sampler_for

if TYPE_CHECKING:
    from .hires import HiresFix

DEFAULT_STEPS = 20
DEFAULT_STRENGTH = 0.75
# Guidance beyond this is no longer guidance: the difference of the two predictions overflows float32 into a
# black image well before 1e39 (useful values are 1-20).
MAX_GUIDANCE = 100.0
MAX_TOME_RATIO = 0.75  # every source token of a 2x2 cell merged into its destination
MAX_DEEPCACHE_INTERVAL = 1000  # the timesteps of a training schedule; more is the same as one full step
MAX_MASK_BLUR = 64
SEED_RANGE = (0, 2**64 - 1)  # what torch.Generator.manual_seed accepts for non-negative seeds
RANDOM_SEED = -1  # A1111's convention; the seed actually drawn is recorded


class RequestError(ValueError):
    """A generation setting is invalid; `field` is the GenerationRequest field it concerns."""

    def __init__(self, field_name: str, reason: str) -> None:
        super().__init__(f"{field_name}: {reason}")
        self.field = field_name
        self.reason = reason


@dataclass(frozen=True)
class Limits:
    """What one deployment allows per request; the CLI and the server share these defaults.

    `max_pixels` None means four times the model's native image (1024x1024 for SD 1.5, 128x128 for the shipped
    model): attention grows with the square of the pixel count, so a fixed figure would be either useless for
    small models or minutes per step for large ones. docs/serving.md has measured times against the timeout."""

    max_steps: int = 50
    max_pixels: int | None = None
    max_batch: int = 4
    # The text encoder reads 77 tokens or so; a longer prompt is cut, and echoing megabytes back in answers
    # and PNG chunks helps no one.
    max_prompt_chars: int = 10_000

    @classmethod
    def none(cls) -> Limits:
        """No limits: the Python API's default, like diffusers."""
        return cls(max_steps=2**31, max_pixels=2**62, max_batch=2**31, max_prompt_chars=2**62)

    def pixels(self, config: ModelConfig) -> int:
        """The pixel limit for this model."""
        return self.max_pixels if self.max_pixels is not None else 4 * config.default_resolution**2

    def input_pixels(self, config: ModelConfig) -> int:
        """Largest init image accepted (decoded, before resizing): four times the output limit."""
        return 4 * self.pixels(config)


@dataclass(frozen=True)
class GenerationRequest:
    """One generation: prompts and settings; `None` means "the model's default" until `resolve`."""

    prompt: str | tuple[str, ...]
    negative_prompt: str | tuple[str, ...] | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    batch: int = 1
    scheduler: str | None = None
    eta: float = 0.0
    # An init image (PIL, pixels or latents); for families that edit from references (FLUX.2 [klein]) one or a
    # list of PIL images.
    image: Image.Image | np.ndarray | list[Image.Image] | None = field(default=None, compare=False, repr=False)
    strength: float | None = None
    # Inpainting: white (>= 0.5) where `image` is repainted; a PIL image, or (1, 1, H, W) floats in [0, 1].
    mask_image: Image.Image | np.ndarray | None = field(default=None, compare=False, repr=False)
    masked_content: str = "original"  # inpaint.MASKED_CONTENT
    mask_blur: int = 0  # Gaussian blur radius (pixels) applied to the mask first, as A1111's "Mask blur"
    # Inpaint only a box around the mask with this many pixels of context, at full size (A1111's "only masked").
    padding_mask_crop: int | None = None
    # SDXL only, as diffusers names them: the second encoder's prompts (default: the prompts) and the
    # (height, width) sizes and crop corner its UNet is conditioned on (default: the output size, no crop).
    prompt_2: str | tuple[str, ...] | None = None
    negative_prompt_2: str | tuple[str, ...] | None = None
    # T5/LLM-conditioned models (SD3, FLUX.1, FLUX.2, Z-Image): the text tokens read (default: the model's).
    max_sequence_length: int | None = None
    original_size: tuple[int, int] | None = None
    target_size: tuple[int, int] | None = None
    crops_coords_top_left: tuple[int, int] | None = None
    # ...and the sizes the negative half is conditioned on (default: the ones above).
    negative_original_size: tuple[int, int] | None = None
    negative_target_size: tuple[int, int] | None = None
    negative_crops_coords_top_left: tuple[int, int] | None = None
    # SDXL refiners: the aesthetic score conditioning the prompt and the negative prompt (diffusers: 6 and 2.5).
    aesthetic_score: float | None = None
    negative_aesthetic_score: float | None = None
    # SDXL ensembles of experts: the base stops at this fraction of the schedule (with output_type "latent"),
    # a refiner given those latents as `image` starts there, adding no noise.
    denoising_end: float | None = None
    denoising_start: float | None = None
    # Accelerators (off by default). Guidance interval (Kynkaanniemi et al. 2024): classifier-free guidance
    # only at steps whose sigma lies in (lo, hi]. Tiled VAE: decode and encode in overlapping tiles (None:
    # the pipeline decides, on in low-memory mode above the VAE's own tile size).
    guidance_interval: tuple[float, float] | None = None
    vae_tiling: bool | None = None
    # DeepCache (Ma et al. 2024): a full UNet call every N steps, the shallow UNet on the cached deep feature
    # in between (None or 1: off); needs a model exported with its DeepCache graphs.
    deepcache_interval: int | None = None
    # Token merging (ToMe for SD, Bolya & Hoffman 2023): this fraction of the outermost level's tokens merged
    # before self-attention (None or 0: off); needs a model exported with its token-merging UNet.
    tome_ratio: float | None = None
    # SD3 skip-layer guidance (diffusers' names): with classifier-free guidance, steps i with start < i/N < stop add
    # scale x (conditional - the prediction with these transformer blocks skipped); needs the export's
    # `transformer_skip` graph (sd-export convert --skip-layers), whose blocks these must be.
    skip_guidance_layers: tuple[int, ...] | None = None
    skip_layer_guidance_scale: float | None = None
    skip_layer_guidance_start: float | None = None
    skip_layer_guidance_stop: float | None = None
    # Image i of the batch from its own seed, seed + i, as A1111 does (so each PNG's seed reproduces it alone);
    # False: every image from one generator seeded `seed`, as diffusers' `generator=` (the Python API's meaning).
    # Last but `resolved`: front ends pass the fields above by position.
    seed_per_image: bool = False
    # How the prompt is read (prompt_syntax.py): "plain" is diffusers' (brackets are text, 77 tokens, the rest
    # cut), "a1111" is A1111's (emphasis, BREAK, any length in 75-token chunks; the A1111 routes and the CLI).
    prompt_syntax: str = "plain"
    # Text encoder layers skipped from the end, as diffusers counts (0: the last layer; A1111's "Clip skip" N
    # is N - 1 here); needs a text encoder exported with its earlier layers' states.
    clip_skip: int | None = None
    # Inpainting: paste the original back outside the (blurred) mask after decoding, as A1111 does (its
    # apply_overlay; the A1111 routes and the CLI); None: diffusers' way, which pastes back only a crop
    # (padding_mask_crop) and otherwise keeps the decoded pixels, so even unmasked ones pass through the VAE.
    paste_back: bool | None = None
    # A1111's hires fix on a txt2img request (hires.py): upscale the result and denoise it again at that size.
    hires: HiresFix | None = None
    # ControlNet units (controlnet.ControlUnit: image, model, scale, start, end), for a model exported with
    # ControlNets; `guess_mode` (diffusers'): the ControlNets see the conditional half only, residuals ramped.
    controls: tuple[Any, ...] = field(default=(), compare=False, repr=False)
    guess_mode: bool = False
    resolved: bool = field(default=False, compare=False, repr=False)

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    @property
    def negative_prompts(self) -> list[str] | None:
        """One negative prompt per prompt, or None when none was given."""
        if self.negative_prompt is None:
            return None
        if isinstance(self.negative_prompt, str):
            return [self.negative_prompt] * len(self.prompts)
        return list(self.negative_prompt)

    @property
    def image_count(self) -> int:
        return len(self.prompts) * self.batch

    @property
    def image_seeds(self) -> list[int]:
        """Each image's own seed (seed + i) with `seed_per_image`; otherwise the one seed all images share."""
        if not self.resolved:
            raise ValueError("image_seeds needs a resolved request")
        return [self.seed + i if self.seed_per_image else self.seed for i in range(self.image_count)]

    def image_parameters(self, parameters: dict[str, Any], index: int) -> dict[str, Any]:
        """`parameters` (the request's, see `parameters`) as image `index` carries them: its own seed, or where
        the batch shares one generator its size and position, without which its seed does not reproduce it."""
        params = {**parameters, "Seed": self.image_seeds[index]}
        if not self.seed_per_image and self.image_count > 1:
            params["Batch size"], params["Batch pos"] = self.image_count, index
        return params

    def resolve(
        self, config: ModelConfig, scheduler_config: dict[str, Any], default_scheduler: str, limits: Limits
    ) -> GenerationRequest:
        """A copy with every default filled in and every field checked; RequestError on the first bad one."""
        prompt = _prompts("prompt", self.prompt, limits.max_prompt_chars)
        negative = self.negative_prompt
        negative = None if negative is None else _prompts("negative_prompt", negative, limits.max_prompt_chars)
        if isinstance(negative, tuple) and len(negative) != len(_as_tuple(prompt)):
            raise RequestError("negative_prompt", f"has {len(negative)} entries for {len(_as_tuple(prompt))} prompts")
        trained = int(scheduler_config.get("num_train_timesteps", 1000))
        default_steps = min(config.default_steps or DEFAULT_STEPS, limits.max_steps, trained)
        steps = _integer("steps", default_steps if self.steps is None else self.steps)
        _in_range("steps", steps, 1, limits.max_steps)
        if steps > trained:
            raise RequestError("steps", f"must be <= {trained}, the timesteps the model was trained on, got {steps}")
        guidance = config.guidance_scale if self.guidance_scale is None else self.guidance_scale
        guidance = _number("guidance_scale", guidance)
        _in_range("guidance_scale", guidance, 0.0, MAX_GUIDANCE)
        width, height = self._size(config, limits)
        batch = _integer("batch", self.batch)
        _in_range("batch", batch, 1, None)
        images = len(_as_tuple(prompt)) * batch
        if images > limits.max_batch:
            raise RequestError("batch", f"{images} images exceeds the limit max_batch={limits.max_batch}")
        scheduler = self._scheduler(scheduler_config, default_scheduler, steps, trained)
        per_image = bool(_optional_bool("seed_per_image", self.seed_per_image))
        seed = _seed(self.seed, images if per_image else 1)
        eta = _number("eta", self.eta)
        _in_range("eta", eta, 0.0, 1.0)
        strength = self._strength(steps, config, images, (width, height))
        resolved = replace(
            self,
            **self._family_fields(config, prompt, limits),
            prompt=prompt,
            negative_prompt=negative,
            steps=steps,
            guidance_scale=guidance,
            width=width,
            height=height,
            seed=seed,
            seed_per_image=per_image,
            prompt_syntax=_choice("prompt_syntax", self.prompt_syntax, SYNTAXES),
            clip_skip=self._clip_skip(config),
            batch=batch,
            scheduler=scheduler,
            eta=eta,
            strength=strength,
            padding_mask_crop=None if self.padding_mask_crop is None else int(self.padding_mask_crop),
            guidance_interval=_interval(self.guidance_interval),
            vae_tiling=_optional_bool("vae_tiling", self.vae_tiling),
            deepcache_interval=self._deepcache(config),
            tome_ratio=self._tome(config),
            paste_back=self._paste_back(),
            controls=self._controls(config, (width, height)),
            guess_mode=bool(_optional_bool("guess_mode", self.guess_mode)),
            resolved=True,
        )
        if self.hires is None:
            return resolved
        if not callable(getattr(self.hires, "resolve", None)):
            raise RequestError("hires", f"must be a HiresFix (sd_onnx.runtime.hires), got {type(self.hires).__name__}")
        hires = self.hires.resolve(resolved, config, scheduler_config, default_scheduler, limits)
        return replace(resolved, hires=hires)

    def _controls(self, config: ModelConfig, size: tuple[int, int]) -> tuple[Any, ...]:
        from .controlnet import resolve_controls

        exclusive = {"deepcache_interval": (self.deepcache_interval or 1) > 1, "tome_ratio": bool(self.tome_ratio),
                     "hires": self.hires is not None}  # fmt: skip
        return resolve_controls(self.controls, config, size, exclusive)

    def _paste_back(self) -> bool:
        """Whether the original is laid back over the result outside the mask; a crop is always pasted back."""
        paste = _optional_bool("paste_back", self.paste_back)
        if self.mask_image is None:
            if paste:
                raise RequestError("paste_back", "applies to inpainting only: give a mask_image too")
            return False
        if self.padding_mask_crop is not None:
            if paste is False:
                raise RequestError(
                    "paste_back", "padding_mask_crop always pastes its box back through the mask; leave it on"
                )
            return True
        return bool(paste)

    def _clip_skip(self, config: ModelConfig) -> int | None:
        if self.clip_skip is None or self.clip_skip == 0:
            return None
        skip = _integer("clip_skip", self.clip_skip)
        _in_range("clip_skip", skip, 0, None)
        if skip > config.clip_skip_layers:
            most = config.clip_skip_layers
            reason = (
                f"this model's text encoder can skip at most {most} layers (A1111's clip skip {most + 1}; "
                f"asked: {skip} skipped, clip skip {skip + 1})"
                if most
                else "this model's text encoder was exported without its earlier layers' states; re-export it "
                "with this version of sd-export to use clip skip"
            )
            raise RequestError("clip_skip", reason)
        return skip

    def _deepcache(self, config: ModelConfig) -> int | None:
        if self.deepcache_interval is None:
            return None
        interval = _integer("deepcache_interval", self.deepcache_interval)
        _in_range("deepcache_interval", interval, 1, MAX_DEEPCACHE_INTERVAL)
        if interval > 1 and config.deepcache_branch is None:
            raise RequestError(
                "deepcache_interval",
                "this model has no DeepCache graphs (export them: sd-export convert --deepcache-branch 0, "
                "or sd-export deepcache for an exported folder)",
            )
        return interval

    def _tome(self, config: ModelConfig) -> float | None:
        if self.tome_ratio is None:
            return None
        ratio = _number("tome_ratio", self.tome_ratio)
        _in_range("tome_ratio", ratio, 0.0, MAX_TOME_RATIO)
        if ratio > 0 and not config.token_merging:
            raise RequestError(
                "tome_ratio", "this model has no token-merging UNet (export it: sd-export convert --tome)"
            )
        if ratio > 0 and (self.deepcache_interval or 1) > 1:
            raise RequestError("tome_ratio", "cannot be combined with deepcache_interval (each runs its own UNet)")
        return ratio

    def _size(self, config: ModelConfig, limits: Limits) -> tuple[int, int]:
        from .families import family_for

        multiple = config.size_multiple
        implied = _array_image_size(self.image, config)  # an init image given as an array fixes the size
        defaults = (config.default_resolution,) * 2 if implied is None else implied
        reference = self.image is not None and family_for(config).reference_images
        if reference:  # the first reference's size, by default
            _check_references(reference_list(self.image), config)
            implied, defaults = None, family_for(config).reference_size(reference_list(self.image)[0], config)
        sides = []
        for i, name in enumerate(("width", "height")):
            value = getattr(self, name)
            default = defaults[i]
            value = default if value is None else _integer(name, value)
            if value <= 0 or value % multiple:
                raise RequestError(
                    name,
                    f"must be a positive multiple of {multiple} for this model (its size multiple), got {echo(value)}",
                )
            if implied is not None and value != implied[i]:
                raise RequestError(name, f"is {echo(value)} but the image array makes it {implied[i]}")
            sides.append(value)
        width, height = sides
        own_size = reference and self.width is None and self.height is None  # the size a reference set
        if own_size and width * height > limits.pixels(config):
            raise RequestError(
                "image",
                f"the reference makes the output {width}x{height}, over the limit max_pixels="
                f"{limits.pixels(config)}; give a smaller width and height",
            )
        if width * height > limits.pixels(config):
            native = config.default_resolution
            raise RequestError(
                "width",
                f"{echo(width)}x{echo(height)} exceeds the limit max_pixels={limits.pixels(config)} (this model makes "
                f"{native}x{native}; a larger limit is --max-pixels)",
            )
        return width, height

    def _family_fields(self, config: ModelConfig, prompt: str | tuple[str, ...], limits: Limits) -> dict[str, Any]:
        """The fields only some families take, checked (refused on other models rather than silently ignored)."""
        from .families import FAMILIES, family_for

        given = {name: getattr(self, name) for name in FAMILY_FIELDS if getattr(self, name) is not None}
        family = family_for(config)
        refused = next((name for name in given if name not in family.request_fields), None)
        if refused is not None:
            takers = [family.label for family in reversed(FAMILIES) if refused in family.request_fields]
            raise RequestError(refused, f"applies to {', '.join(takers)} models only")
        checked: dict[str, Any] = {}
        if "max_sequence_length" in given:
            checked["max_sequence_length"] = _integer("max_sequence_length", given["max_sequence_length"])
            _in_range("max_sequence_length", checked["max_sequence_length"], 1, family.max_sequence_limit)
        for name in ("prompt_2", "negative_prompt_2"):
            if name in given:
                checked[name] = _prompts(name, given[name], limits.max_prompt_chars)
                if len(_as_tuple(checked[name])) not in (1, len(_as_tuple(prompt))):
                    raise RequestError(name, f"has {len(_as_tuple(checked[name]))} entries for the prompts' count")
        for name in SIZE_FIELDS:
            if name in given:
                checked[name] = _pair(name, given[name], low=0 if name.endswith("crops_coords_top_left") else 1)
        for name in ("aesthetic_score", "negative_aesthetic_score"):
            if name in given:
                checked[name] = _number(name, given[name])
                _in_range(name, checked[name], 0.0, 10.0)
        for name in ("denoising_end", "denoising_start"):
            if name in given:
                checked[name] = _number(name, given[name])
                if not 0.0 < checked[name] < 1.0:
                    raise RequestError(name, f"must be a fraction in (0, 1), got {checked[name]:g}")
        checked.update(_skip_layer_guidance(given, config))
        start, end = checked.get("denoising_start"), checked.get("denoising_end")
        if start is not None and self.image is None:
            raise RequestError("denoising_start", "continues a denoising: give the latents (or an image) as image")
        if start is not None and end is not None and start >= end:
            raise RequestError("denoising_start", f"{start:g} must be below denoising_end {end:g}")
        return checked

    def _scheduler(self, scheduler_config: dict[str, Any], default: str, steps: int, trained: int) -> str:
        """The sampler's name, once a scratch instance shows it can run this model's noise schedule and that its
        timesteps for `steps` stay inside the training ones ("leading" spacing with an offset can step past)."""
        name = default if self.scheduler is None else self.scheduler
        if not isinstance(name, str):
            raise RequestError("scheduler", f"must be a string, got {type(name).__name__}")
        try:
            name = sampler_for(resolve_name(name), scheduler_config)
            sampler = make_scheduler(name, scheduler_config)
        except ValueError as exc:
            raise RequestError("scheduler", str(exc)) from None
        if sampler.family != "ddpm":  # flow samplers' timesteps are sigmas x 1000: they start at the last one
            return name
        sampler.set_timesteps(steps)
        if len(sampler.timesteps) and float(np.max(sampler.timesteps)) >= trained:
            raise RequestError("steps", f"{steps} steps reach past the model's {trained} timesteps with {name}")
        return name

    def _strength(self, steps: int, config: ModelConfig, images: int, size: tuple[int, int]) -> float | None:
        from .families import family_for

        if self.image is not None and family_for(config).reference_images:
            for name in ("mask_image", "strength", "denoising_start"):
                if getattr(self, name) is not None:
                    label = family_for(config).label
                    raise RequestError(name, f"{label} reads `image` as a reference to edit from, not an img2img start")
            return None
        if self.image is None:
            if self.strength is not None:
                raise RequestError("strength", "applies to img2img only: give an init image too")
            if self.mask_image is not None:
                raise RequestError("mask_image", "masks an init image: give the image to inpaint too")
            if self.padding_mask_crop is not None:
                raise RequestError("padding_mask_crop", "applies to inpainting only: give an image and a mask_image")
            if config.inpainting:
                raise RequestError("image", "this is an inpainting model: give an image and a mask_image")
            return None
        _check_image(self.image, config)
        if is_latent_image(self.image, config) and len(self.image) not in (1, images):
            raise RequestError("image", f"has {len(self.image)} latents for {images} images (give 1 or {images})")
        self._check_mask(config, size)
        # Inpainting repaints the masked part from pure noise unless told otherwise, as diffusers does.
        default = DEFAULT_STRENGTH if self.mask_image is None else 1.0
        strength = _number("strength", default if self.strength is None else self.strength)
        if not 0.0 < strength <= 1.0:
            raise RequestError("strength", f"must be in (0, 1], got {strength:g}")
        taken = steps - family_for(config).first_step(steps, strength)  # the family's rounding
        if taken < 1 and self.denoising_start is None:  # denoising_start overrides strength
            raise RequestError(
                "strength", f"{strength:g} x {steps} steps leaves no denoising step; raise steps or strength"
            )
        return strength

    def _check_mask(self, config: ModelConfig, size: tuple[int, int]) -> None:
        if self.masked_content not in MASKED_CONTENT:
            raise RequestError(
                "masked_content", f"must be one of {', '.join(MASKED_CONTENT)}, got {echo(self.masked_content)}"
            )
        if self.mask_image is None:
            if config.inpainting:
                raise RequestError("mask_image", "this is an inpainting model: give a mask_image with the image")
            if self.masked_content != "original":
                raise RequestError("masked_content", "applies to inpainting only: give a mask_image too")
            if self.padding_mask_crop is not None:
                raise RequestError("padding_mask_crop", "applies to inpainting only: give a mask_image too")
            return
        _in_range("mask_blur", _integer("mask_blur", self.mask_blur), 0, MAX_MASK_BLUR)
        if self.padding_mask_crop is not None:
            self._check_mask_crop()
        if self.masked_content == "fill" and not isinstance(self.image, Image.Image):
            raise RequestError("masked_content", "fill paints a PIL image; give the image as one")
        if is_latent_image(self.image, config):
            raise RequestError("image", "inpainting needs the image's pixels, not latents")
        mask = self.mask_image
        if isinstance(mask, Image.Image):
            return
        if not isinstance(mask, np.ndarray) or mask.ndim != 4 or mask.shape[:2] != (1, 1):
            shape = f" of shape {list(mask.shape)}" if isinstance(mask, np.ndarray) else ""
            raise RequestError(
                "mask_image", f"must be a PIL image or a (1, 1, H, W) array, got {type(mask).__name__}{shape}"
            )
        if (mask.shape[3], mask.shape[2]) != size:
            raise RequestError(
                "mask_image", f"is {mask.shape[3]}x{mask.shape[2]}, not the output's {size[0]}x{size[1]}"
            )
        if not np.isfinite(mask).all() or mask.min() < 0 or mask.max() > 1:
            raise RequestError("mask_image", "values must be finite and in [0, 1]")

    def _check_mask_crop(self) -> None:
        """A box can be cut around the mask only when image and mask are pictures of one size, the mask not empty."""
        _in_range("padding_mask_crop", _integer("padding_mask_crop", self.padding_mask_crop), 0, None)
        for name in ("image", "mask_image"):
            if not isinstance(getattr(self, name), Image.Image):
                raise RequestError(name, "must be a PIL image to inpaint a crop around the mask (padding_mask_crop)")
        if self.mask_image.size != self.image.size:
            raise RequestError(
                "mask_image", f"is {self.mask_image.width}x{self.mask_image.height}; with padding_mask_crop it must "
                f"have the image's size, {self.image.width}x{self.image.height}"
            )  # fmt: skip
        if self.mask_image.convert("L").getbbox() is None:
            raise RequestError("mask_image", "is empty (all black): nothing to repaint, no box to crop around it")

    def parameters(self, model_name: str) -> dict[str, Any]:
        """A1111-style generation parameters of a resolved request (PNG "parameters" chunk, server info)."""
        if not self.resolved:
            raise ValueError("parameters() needs a resolved request")
        params: dict[str, Any] = {
            "Steps": self.steps,
            "Sampler": self.scheduler,
            "CFG scale": self.guidance_scale,
            "Seed": self.seed,
            "Size": f"{self.width}x{self.height}",
            "Model": model_name,
        }
        if self.strength is not None:
            params["Denoising strength"] = self.strength
        if self.skip_guidance_layers:  # as Forge's and ComfyUI's SLG nodes name it
            params["SLG"] = (f"layers {','.join(map(str, self.skip_guidance_layers))}, scale "
                             f"{self.skip_layer_guidance_scale:g}, steps {self.skip_layer_guidance_start:g}-"
                             f"{self.skip_layer_guidance_stop:g}")  # fmt: skip
        if self.mask_image is not None:
            params["Inpaint"] = "mask"
            params["Masked content"] = self.masked_content
            params["Mask blur"] = self.mask_blur
            if self.padding_mask_crop is not None:
                params["Inpaint area"] = "Only masked"
                params["Masked area padding"] = self.padding_mask_crop
        if self.eta:
            params["Eta"] = self.eta
        if self.clip_skip:
            params["Clip skip"] = self.clip_skip + 1  # A1111 counts the last layer as 1
        texts = [*self.prompts, *(self.negative_prompts or [])]
        if self.prompt_syntax == "plain" and any(parse_attention(t) != [(t, 1.0)] for t in texts):
            params["Prompt syntax"] = "plain"  # A1111 would read these brackets (or BREAK) as emphasis
        if self.guidance_interval is not None:
            params["Guidance interval"] = f"{self.guidance_interval[0]:g}-{self.guidance_interval[1]:g}"
        if self.denoising_start is not None:
            params["Denoising start"] = self.denoising_start
        if self.denoising_end is not None:
            params["Denoising end"] = self.denoising_end
        if self.paste_back and self.padding_mask_crop is None:
            params["Paste back"] = True  # a crop is always pasted back; the whole picture only when asked
        if self.controls:
            from .controlnet import infotext

            for i, unit in enumerate(self.controls):  # as A1111's ControlNet extension records its units
                params[f"ControlNet {i}"] = infotext(unit, self.guess_mode)
        if self.hires is not None:
            params.update(self.hires.parameters(self))
        return params

    def as_dict(self) -> dict[str, Any]:
        """The settings as plain JSON-able values (no image)."""
        skipped = ("image", "mask_image", "resolved")
        settings = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skipped}
        hires = settings["hires"]
        settings["hires"] = None if hires is None else {f.name: getattr(hires, f.name) for f in fields(hires)
                                                        if f.name != "upscalers"}  # fmt: skip
        return settings


SIZE_FIELDS = (
    "original_size", "target_size", "crops_coords_top_left", "negative_original_size", "negative_target_size",
    "negative_crops_coords_top_left",
)  # fmt: skip
SDXL_FIELDS = (
    "prompt_2", "negative_prompt_2", *SIZE_FIELDS, "aesthetic_score", "negative_aesthetic_score", "denoising_end",
    "denoising_start",
)  # fmt: skip
SKIP_LAYER_FIELDS = (
    "skip_guidance_layers", "skip_layer_guidance_scale", "skip_layer_guidance_start", "skip_layer_guidance_stop"
)  # fmt: skip
SKIP_LAYER_DEFAULTS = {"skip_layer_guidance_scale": 2.8, "skip_layer_guidance_start": 0.01,
                       "skip_layer_guidance_stop": 0.2}  # fmt: skip  # diffusers' StableDiffusion3Pipeline
FAMILY_FIELDS = (*SDXL_FIELDS, "max_sequence_length", *SKIP_LAYER_FIELDS)  # fields only some families take


def _skip_layer_guidance(given: dict[str, Any], config: ModelConfig) -> dict[str, Any]:
    """The skip-layer guidance fields, checked: the layers must be the ones the export's graph skips, the scale a
    guidance weight, start < stop fractions of the steps; the others default to diffusers' values."""
    if not any(name in given for name in SKIP_LAYER_FIELDS):
        return {}
    if "skip_guidance_layers" not in given:
        name = next(name for name in SKIP_LAYER_FIELDS if name in given)
        raise RequestError(name, "applies with skip_guidance_layers (the blocks skip-layer guidance skips)")
    layers = given["skip_guidance_layers"]
    exported = config.skip_guidance_layers
    if isinstance(layers, (str, bytes)) or not isinstance(layers, (list, tuple)):
        raise RequestError("skip_guidance_layers", f"must be a list of block indices, got {echo(layers)}")
    layers = tuple(sorted({_integer("skip_guidance_layers", layer) for layer in layers}))
    if exported is None:
        raise RequestError("skip_guidance_layers", "this export has no skip-layer graph (sd-export convert "
                           "--skip-layers, e.g. 7,8,9 for SD3.5 Medium)")  # fmt: skip
    if list(layers) != list(exported):
        raise RequestError("skip_guidance_layers", f"this export skips blocks {exported}, got {list(layers)}")
    checked: dict[str, Any] = {"skip_guidance_layers": layers}
    for name, default in SKIP_LAYER_DEFAULTS.items():
        checked[name] = _number(name, given.get(name, default))
    _in_range("skip_layer_guidance_scale", checked["skip_layer_guidance_scale"], 0.0, MAX_GUIDANCE)
    for name in ("skip_layer_guidance_start", "skip_layer_guidance_stop"):
        _in_range(name, checked[name], 0.0, 1.0)
    if checked["skip_layer_guidance_start"] >= checked["skip_layer_guidance_stop"]:
        raise RequestError("skip_layer_guidance_start", "must be below skip_layer_guidance_stop")
    return checked


def _pair(name: str, value: Any, low: int) -> tuple[int, int]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise RequestError(name, "must be a (height, width) pair of integers")
    pair = (_integer(name, value[0]), _integer(name, value[1]))
    if min(pair) < low or max(pair) > 1 << 16:
        raise RequestError(name, f"must be integers in {low}..{1 << 16}, got {echo(list(pair))}")
    return pair


def _as_tuple(prompt: str | tuple[str, ...]) -> tuple[str, ...]:
    return (prompt,) if isinstance(prompt, str) else prompt


def _prompts(name: str, value: Any, max_chars: int) -> str | tuple[str, ...]:
    if isinstance(value, str):
        _text(name, value, max_chars)
        return value
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(p, str) for p in value):
        raise RequestError(name, "must be a string or a non-empty list of strings")
    for p in value:
        _text(name, p, max_chars)
    return tuple(value)


def _text(name: str, value: str, max_chars: int) -> None:
    if len(value) > max_chars:
        raise RequestError(name, f"{len(value)} characters exceeds the limit max_prompt_chars={max_chars}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RequestError(name, f"is not valid Unicode text (character {exc.start} is a lone surrogate)") from None


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise RequestError(name, f"must be one of {', '.join(choices)}, got {echo(value)}")
    return value


def _integer(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise RequestError(name, f"must be an integer, got {echo(value)}")
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(value) or value != int(value):
            raise RequestError(name, f"must be an integer, got {echo(value)}")
        return int(value)
    if not isinstance(value, (int, np.integer)):
        raise RequestError(name, f"must be an integer, got {type(value).__name__}")
    return int(value)


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise RequestError(name, f"must be a number, got {type(value).__name__}")
    try:
        number = float(value)
    except OverflowError:  # an integer beyond float range
        raise RequestError(name, f"must be a finite number, got {echo(value)}") from None
    if not math.isfinite(number):
        raise RequestError(name, f"must be a finite number, got {echo(value)}")
    return number


def _interval(value: Any) -> tuple[float, float] | None:
    """A guidance interval (lo, hi) of sigmas with 0 <= lo < hi; hi may be infinite."""
    if value is None:
        return None
    numbers = isinstance(value, (tuple, list)) and len(value) == 2
    numbers = numbers and all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
                              for v in value)  # fmt: skip
    if not numbers:
        raise RequestError("guidance_interval", f"must be two numbers (lo, hi), got {type(value).__name__}")
    low, high = float(value[0]), float(value[1])
    if not (math.isfinite(low) and 0 <= low < high):  # NaN fails every comparison
        raise RequestError("guidance_interval", f"needs 0 <= lo < hi (sigmas; hi may be inf), got ({low:g}, {high:g})")
    return low, high


def _optional_bool(name: str, value: Any) -> bool | None:
    if value is not None and not isinstance(value, (bool, np.bool_)):
        raise RequestError(name, f"must be true or false, got {type(value).__name__}")
    return None if value is None else bool(value)


def _in_range(name: str, value: float, low: float, high: float | None) -> None:
    if value < low:
        raise RequestError(name, f"must be >= {low:g}, got {_shown(value)}")
    if high is not None and value > high:
        if name == "steps":
            raise RequestError(name, f"{_shown(value)} exceeds the limit max_steps={high:g}")
        raise RequestError(name, f"must be <= {high:g}, got {_shown(value)}")


def _shown(value: float) -> str:
    """A number as an error names it: floats to 10 digits, integers through `echo` (one of a million digits
    would neither convert to a float nor belong in an answer)."""
    return f"{value:.10g}" if isinstance(value, float) else echo(value)


RESIZE_NAMES = {
    "just_resize": "Just Resize",
    "crop_and_resize": "Crop and Resize",
    "resize_and_fill": "Resize and Fill",
}


def reference_list(image: Any) -> list[Any]:
    """A request's reference image(s) as a list (one image or a list/tuple of them)."""
    return list(image) if isinstance(image, (list, tuple)) else [image]


def _check_references(images: list[Any], config: ModelConfig) -> None:
    """1 to the family's max_references images, each one the family can encode (RequestError naming image)."""
    from .families import family_for

    family = family_for(config)
    if not 1 <= len(images) <= family.max_references:
        raise RequestError("image", f"{len(images)} references: {family.label} takes 1 to {family.max_references}")
    for image in images:
        family.reference_size(image, config)


def _check_image(image: Any, config: ModelConfig) -> None:
    """An init image: a PIL image, pixels as the VAE encoder takes them ((1, 3, H, W) floats in [-1, 1]), or
    latents as the UNet takes them ((N, latent channels, h, w), e.g. a base model's output for a refiner)."""
    if isinstance(image, Image.Image):
        return
    if isinstance(image, (list, tuple)):
        raise RequestError("image", "takes one image (a list is references, for families that edit from several)")
    if _array_image_size(image, config) is not None:
        if not np.isfinite(image).all():
            raise RequestError("image", "has non-finite values")
        return
    shape = f" of shape {list(image.shape)}" if isinstance(image, np.ndarray) else ""
    raise RequestError(
        "image",
        f"must be a PIL image, a (1, 3, H, W) pixel array or an (N, {config.latent_channels}, h, w) latent array, "
        f"got {type(image).__name__}{shape}",
    )


def is_latent_image(image: Any, config: ModelConfig) -> bool:
    """Whether an init image is latents rather than pixels (diffusers tells them apart by channel count)."""
    return isinstance(image, np.ndarray) and image.ndim == 4 and image.shape[1] == config.latent_channels != 3


def _array_image_size(image: Any, config: ModelConfig) -> tuple[int, int] | None:
    """(width, height) of the output an array init image implies; None for other images."""
    if is_latent_image(image, config):
        return image.shape[3] * config.vae_scale_factor, image.shape[2] * config.vae_scale_factor
    if isinstance(image, np.ndarray) and image.ndim == 4 and image.shape[:2] == (1, 3):
        return image.shape[3], image.shape[2]
    return None


def _seed(seed: Any, count: int) -> int:
    """The seed, drawn when random; `count` images seeded seed..seed + count - 1 must all stay in SEED_RANGE."""
    if seed is None or (not isinstance(seed, bool) and isinstance(seed, (int, np.integer)) and seed == RANDOM_SEED):
        return secrets.randbits(32)
    seed = _integer("seed", seed)
    low, high = SEED_RANGE
    if not low <= seed <= high:
        raise RequestError("seed", f"must be in [{low}, {high}] or {RANDOM_SEED} for a random seed, got {echo(seed)}")
    if seed + count - 1 > high:
        raise RequestError("seed", f"{seed} + {count - 1}: the last of {count} images' seeds (seed + i) passes {high}")
    return seed


__all__ = ["GenerationRequest", "Limits", "RequestError", "DEFAULT_STEPS", "DEFAULT_STRENGTH", "SEED_RANGE"]
