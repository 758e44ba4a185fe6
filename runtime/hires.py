"""The hires fix: a txt2img picture made at the requested size, upscaled, then denoised again at the larger size,
as A1111's txt2img does it (modules/processing.py, `StableDiffusionProcessingTxt2Img`).

1. The first pass runs the request as it is (its size, steps, sampler, seed).
2. Upscale to the target size (`calculate_target_resolution`: `scale` times the first size, or `resize_x` by
   `resize_y`, the latents cropped to the requested aspect when both are given). A latent upscaler interpolates
   the denoised latents (no decode); an image upscaler decodes them, resizes the picture and encodes it again
   (hires_upscalers.py has both kinds, by name).
3. The second pass is img2img on those latents at the target size, with noise from the same seed(s): it runs
   `steps` (0: the first pass's) steps, the last ones of a schedule of int(steps / min(denoising_strength,
   0.999)) steps, which is what A1111's `sample_hr_pass` does (it always hands `setup_img2img_steps` a step
   count, so its `img2img_fix_steps` option does not apply to the hires pass).

`hires_fix` is the Python API; a request carrying `hires=HiresFix(...)` runs it from `generate` too, so the CLI,
the server's workers and Ray replicas run the same code. The settings are checked with the rest of the request
(`GenerationRequest.resolve`), each error naming the HiresFix field as `hires_<field>`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from .echo import echo
from .hires_upscalers import DEFAULT_UPSCALER, ImageResize, Upscaler, find_upscaler, upscaler_names
from .image import from_pil
from .manifest import ModelConfig
from .request import DEFAULT_STRENGTH, GenerationRequest, Limits, RequestError, _integer, _number

if TYPE_CHECKING:
    from .pipeline import PipelineOutput, StableDiffusionPipeline, StepCallback

MAX_STRENGTH_FOR_STEPS = 0.999  # A1111's setup_img2img_steps caps the strength it divides by
MAX_SCALE = 16.0  # A1111's page offers 1-4; past this only an overflow waits, whatever max_pixels allows
SAME_SAMPLER = "Use same sampler"  # what A1111's page sends for "the first pass's sampler"
# Second-pass request field -> the HiresFix field that set it, for errors found when checking that request.
SECOND_PASS_FIELDS = {
    "prompt": "hires_prompt",
    "negative_prompt": "hires_negative_prompt",
    "scheduler": "hires_sampler",
    "steps": "hires_steps",
    "strength": "hires_denoising_strength",
}


@dataclass(frozen=True)
class HiresFix:
    """The hires fix's settings, as A1111's txt2img names them without `hr_`; None or "" (and 0 for `steps`)
    mean "as the first pass"."""

    scale: float = 2.0  # hr_scale: the target is the first pass's size times this...
    resize_x: int = 0  # ...unless hr_resize_x / hr_resize_y give it (one of them: the other keeps the aspect)
    resize_y: int = 0
    upscaler: str | None = None  # hr_upscaler: a latent mode or an image upscaler (hires_upscalers.py); "Latent"
    steps: int = 0  # hr_second_pass_steps
    denoising_strength: float = DEFAULT_STRENGTH  # A1111's txt2img API default
    sampler: str | None = None  # hr_sampler_name
    prompt: str | None = None  # hr_prompt
    negative_prompt: str | None = None  # hr_negative_prompt
    # More image upscalers by name (runtime/upscale.py's models: `image_resizers`), after the built-in ones.
    upscalers: Mapping[str, ImageResize] = field(default_factory=dict, compare=False, repr=False)

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (to a Ray replica; copy.copy too) without `upscalers`: their sessions stay in the process that
        loaded them, so a replica knows the built-in upscalers only."""
        return {**self.__dict__, "upscalers": {}}

    def resolve(
        self,
        first: GenerationRequest,
        config: ModelConfig,
        scheduler_config: dict[str, Any],
        default_scheduler: str,
        limits: Limits,
    ) -> HiresFix:
        """These settings checked against the resolved first pass, the model and `limits` (the target size
        within `max_pixels`, the second pass's steps within `max_steps`), with the upscaler's name spelled as
        it is known; RequestError naming `hires_<field>` otherwise."""
        if first.image is not None:
            raise RequestError("hires", "applies to txt2img only (an init image is given)")
        if first.denoising_end is not None:
            raise RequestError("hires", "cannot be combined with denoising_end (the first pass must finish)")
        trained = int(scheduler_config.get("num_train_timesteps", 1000))
        checked = replace(self, **self._schedule_fields(first.steps, trained, limits), upscaler=self._upscaler().name)
        checked = replace(checked, **checked._size_fields())
        plan = checked.plan(first, config)
        _check_size(plan, checked._size_field(), config, limits)
        # The second pass as a txt2img request of its size and schedule (its latents are not there yet): its
        # prompts, sampler and schedule checked as they will be.
        second = replace(checked.second_pass(first, None, plan), strength=None)
        try:
            second.resolve(config, scheduler_config, default_scheduler, replace(limits, max_steps=2**31))
        except RequestError as exc:
            raise RequestError(SECOND_PASS_FIELDS.get(exc.field, "hires"), exc.reason) from None
        return checked

    def _schedule_fields(self, first_steps: int, trained: int, limits: Limits) -> dict[str, Any]:
        """Steps within max_steps, a strength in (0, 1] whose schedule stays within the training timesteps."""
        steps = _integer("hires_steps", self.steps)
        if not 0 <= steps <= limits.max_steps:
            raise RequestError(
                "hires_steps", f"must be 0 (the first pass's) to max_steps={limits.max_steps}, got {steps}"
            )
        strength = _number("hires_denoising_strength", self.denoising_strength)
        if not 0.0 < strength <= 1.0:
            raise RequestError("hires_denoising_strength", f"must be in (0, 1], got {strength:g}")
        runs = steps or first_steps
        if runs / min(strength, MAX_STRENGTH_FOR_STEPS) > trained:
            raise RequestError(
                "hires_denoising_strength",
                f"{strength:g} runs {runs} steps as the end of a schedule longer than the model's {trained} timesteps",
            )
        return {"steps": steps, "denoising_strength": strength}

    def _upscaler(self) -> Upscaler:
        if self.upscaler is not None and not isinstance(self.upscaler, str):
            raise RequestError("hires_upscaler", f"must be a string, got {type(self.upscaler).__name__}")
        found = find_upscaler(self.upscaler or DEFAULT_UPSCALER, self.upscalers)
        if found is None:
            known = ", ".join([*upscaler_names(), *self.upscalers])
            raise RequestError("hires_upscaler", f"unknown upscaler {echo(self.upscaler)}; known: {known}")
        return found

    def _size_fields(self) -> dict[str, Any]:
        resize_x, resize_y = _integer("hires_resize_x", self.resize_x), _integer("hires_resize_y", self.resize_y)
        for name, value in (("hires_resize_x", resize_x), ("hires_resize_y", resize_y)):
            if value < 0:
                raise RequestError(name, f"must be >= 0 (0: from hires_scale), got {value}")
        scale = self.scale
        if not resize_x and not resize_y:
            scale = _number("hires_scale", scale)
            if not 0 < scale <= MAX_SCALE:
                raise RequestError("hires_scale", f"must be in (0, {MAX_SCALE:g}], got {scale:g}")
        return {"scale": scale, "resize_x": resize_x, "resize_y": resize_y}

    def _size_field(self) -> str:
        """The field that sets the target size, for errors about it."""
        if self.resize_x or self.resize_y:
            return "hires_resize_x" if self.resize_x else "hires_resize_y"
        return "hires_scale"

    def plan(self, first: GenerationRequest, config: ModelConfig) -> HiresPlan:
        """The sizes and the second pass's schedule for a resolved first pass (A1111's
        calculate_target_resolution, with its truncation when both resize sides are given)."""
        width, height, factor = first.width, first.height, config.vae_scale_factor
        crop = (0, 0)
        if not self.resize_x and not self.resize_y:
            upscale = (int(width * self.scale), int(height * self.scale))
        elif not self.resize_y:
            upscale = (self.resize_x, self.resize_x * height // width)
        elif not self.resize_x:
            upscale = (self.resize_y * width // height, self.resize_y)
        else:
            if width / height < self.resize_x / self.resize_y:
                upscale = (self.resize_x, self.resize_x * height // width)
            else:
                upscale = (self.resize_y * width // height, self.resize_y)
            crop = ((upscale[0] - self.resize_x) // factor, (upscale[1] - self.resize_y) // factor)
        steps = self.steps or first.steps
        schedule, strength = second_pass_schedule(steps, self.denoising_strength)
        return HiresPlan(upscale, crop, factor, steps, schedule, strength)

    def second_pass(self, first: GenerationRequest, latents: np.ndarray | None, plan: HiresPlan) -> GenerationRequest:
        """The img2img request of the second pass on the upscaled `latents` (unresolved): the first pass's settings
        at the target size with these prompts, sampler and schedule."""
        prompts = len(first.prompts)
        prompt, negative = first.prompt, first.negative_prompt
        if self.prompt:
            prompt = self.prompt if isinstance(first.prompt, str) else (self.prompt,) * prompts
        if self.negative_prompt:
            negative = self.negative_prompt if isinstance(first.prompt, str) else (self.negative_prompt,) * prompts
        sampler = first.scheduler if self.sampler in (None, "", SAME_SAMPLER) else self.sampler
        width, height = plan.size
        return replace(
            first, prompt=prompt, negative_prompt=negative, steps=plan.schedule, width=width, height=height,
            scheduler=sampler, image=latents, strength=plan.strength, denoising_start=None, denoising_end=None,
            paste_back=None, hires=None, resolved=False,
        )  # fmt: skip

    def parameters(self, first: GenerationRequest) -> dict[str, Any]:
        """A1111's infotext entries of the hires fix (`StableDiffusionProcessingTxt2Img.init`)."""
        params: dict[str, Any] = {"Denoising strength": self.denoising_strength}
        if self.resize_x or self.resize_y:
            params["Hires resize"] = f"{self.resize_x}x{self.resize_y}"
        else:
            params["Hires upscale"] = int(self.scale) if float(self.scale).is_integer() else self.scale
        if self.steps:
            params["Hires steps"] = self.steps
        params["Hires upscaler"] = self.upscaler
        if self.sampler not in (None, "", SAME_SAMPLER, first.scheduler):
            params["Hires sampler"] = self.sampler
        if self.prompt and self.prompt != first.prompt:
            params["Hires prompt"] = self.prompt
        if self.negative_prompt and self.negative_prompt != first.negative_prompt:
            params["Hires negative prompt"] = self.negative_prompt
        return params


@dataclass(frozen=True)
class HiresPlan:
    """Where the second pass runs: the size the first is upscaled to, the latent rows and columns cut from it
    (both sides given: A1111's truncate_x/y, split before and after), and its schedule."""

    upscale: tuple[int, int]  # (width, height) in pixels, A1111's hr_upscale_to_x/y
    crop: tuple[int, int]  # latent columns, rows cut
    factor: int  # pixels per latent
    steps: int  # steps the second pass runs...
    schedule: int  # ...the last ones of a schedule this long
    strength: float  # the img2img strength that runs exactly `steps` of `schedule`

    @property
    def latent_size(self) -> tuple[int, int]:
        """(rows, columns) of the second pass's latents."""
        return self.upscale[1] // self.factor - self.crop[1], self.upscale[0] // self.factor - self.crop[0]

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the result."""
        rows, columns = self.latent_size
        return columns * self.factor, rows * self.factor

    def cropped_latents(self, latents: np.ndarray) -> np.ndarray:
        """Latents at the upscale size cut to the result's, as A1111 slices them."""
        (cut_x, cut_y), (rows, columns) = self.crop, self.latent_size
        return latents[:, :, cut_y // 2 : cut_y // 2 + rows, cut_x // 2 : cut_x // 2 + columns]

    def cropped_image(self, image: Image.Image) -> Image.Image:
        """A picture at the upscale size cut to the result's, at the latent crop's place."""
        (cut_x, cut_y), (width, height) = self.crop, self.size
        left, top = cut_x // 2 * self.factor, cut_y // 2 * self.factor
        return image.crop((left, top, left + width, top + height))


def second_pass_schedule(steps: int, denoising_strength: float) -> tuple[int, float]:
    """(schedule length, img2img strength) that run exactly `steps` steps, the last ones of A1111's hires
    schedule, int(steps / min(denoising_strength, 0.999)) steps long: the pipeline starts img2img at
    n - int(n x strength), so the strength is steps / n, nudged up where float rounding would lose a step."""
    schedule = max(int(steps / min(denoising_strength, MAX_STRENGTH_FOR_STEPS)), steps)
    strength = steps / schedule
    while int(schedule * strength) < steps:
        strength = float(np.nextafter(strength, 2.0))
    return schedule, min(strength, 1.0)


def hires_fix(
    pipe: StableDiffusionPipeline,
    request: GenerationRequest,
    settings: HiresFix | None = None,
    callback: StepCallback | None = None,
    output_type: str = "pil",
    latents: np.ndarray | None = None,
    cancelled: Callable[[], bool] | None = None,
    limits: Limits | None = None,
) -> PipelineOutput:
    """`request` (a txt2img request) with A1111's hires fix: `settings`, or the request's own `hires`. The request
    is resolved here unless it is already (against `limits`, none by default, as `pipe.prepare`); `callback`
    sees the steps of both passes as one run ((step, total, latents), total = both passes' steps), `cancelled`
    is polled as in `generate`, `latents` are the first pass's starting latents. The output's images have the
    target size; its parameters are the first pass's with A1111's hires entries, so the PNG reproduces it.

        from sd_onnx.runtime import StableDiffusionPipeline, GenerationRequest
        from sd_onnx.runtime.hires import HiresFix, hires_fix

        pipe = StableDiffusionPipeline.from_pretrained("out/sd15-int8")
        request = GenerationRequest("a lighthouse", width=512, height=512, steps=20, seed=1)
        out = hires_fix(pipe, request, HiresFix(scale=2, upscaler="Latent", denoising_strength=0.5))
        out.images[0].size  # (1024, 1024)
    """
    if settings is not None:
        request = replace(request, hires=settings, resolved=False)
    request = request if request.resolved else pipe.prepare(request, limits)
    if request.hires is None:
        return pipe.generate(request, callback, output_type, latents, cancelled)
    hires = request.hires
    plan = hires.plan(request, pipe.config)
    upscaler = hires._upscaler()
    progress = _Progress(callback, plan.steps)
    first = replace(request, hires=None)
    out = pipe.generate(first, progress.first, "latent" if upscaler.latent else "pil", latents, cancelled)
    upscaled = _upscaled(pipe, out.images, upscaler, plan, first)
    second = pipe.prepare(hires.second_pass(first, upscaled, plan))
    final = pipe.generate(second, progress.second, output_type, None, cancelled)
    parameters = pipe.parameters(request)
    if pipe.uses_tiling(second):
        parameters["Tiled VAE"] = True
    return replace(final, parameters=parameters, request=request)


def _upscaled(
    pipe: StableDiffusionPipeline, images: Any, upscaler: Upscaler, plan: HiresPlan, first: GenerationRequest
) -> np.ndarray:
    """The second pass's starting latents: the first pass's latents interpolated, or its pictures resized and
    encoded to the posterior's mean (A1111 samples it from its unseeded global generator; the mean keeps the
    result a function of the seed and draws nothing from the second pass's generator)."""
    width, height = plan.upscale
    if upscaler.latent:
        return plan.cropped_latents(upscaler.upscale_latents(images, height // plan.factor, width // plan.factor))
    final_width, final_height = plan.size
    tiled = pipe.uses_tiling(replace(first, width=final_width, height=final_height))
    encoded = []
    for picture in images:
        resized = plan.cropped_image(upscaler.resize(picture, width, height))
        encoded.append(pipe.encode_image(from_pil(resized, final_width, final_height), _PosteriorMean(), tiled))
    return np.concatenate(encoded)


class _PosteriorMean:
    """A generator drawing zeros: `encode_image` with it returns the VAE posterior's mean (diffusers'
    `retrieve_latents(sample_mode="argmax")`)."""

    def randn(self, shape: tuple[int, ...]) -> np.ndarray:
        return np.zeros(shape, np.float32)


class _Progress:
    """One step count over both passes for the caller's callback: the first pass's steps, then the second's,
    out of their sum (the second pass's count is known ahead; the first's is what the first pass reports)."""

    def __init__(self, callback: StepCallback | None, second_steps: int) -> None:
        self.callback, self.second_steps, self.done = callback, second_steps, 0

    def first(self, i: int, total: int, latents: np.ndarray) -> bool | None:
        self.done = total
        return None if self.callback is None else self.callback(i, total + self.second_steps, latents)

    def second(self, i: int, total: int, latents: np.ndarray) -> bool | None:
        return None if self.callback is None else self.callback(self.done + i, self.done + total, latents)


def _check_size(plan: HiresPlan, name: str, config: ModelConfig, limits: Limits) -> None:
    """The result's size: positive multiples of the model's size multiple, within max_pixels."""
    width, height = plan.size
    multiple, most = config.size_multiple, limits.pixels(config)
    if width <= 0 or height <= 0 or width % multiple or height % multiple:
        raise RequestError(
            name, f"makes {width}x{height}; width and height must be positive multiples of {multiple} for this model"
        )
    if width * height > most:
        raise RequestError(name, f"makes {width}x{height}, which exceeds the limit max_pixels={most}")


__all__ = ["HiresFix", "HiresPlan", "hires_fix", "second_pass_schedule"]
