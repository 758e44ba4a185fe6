"""AUTOMATIC1111-compatible routes (/sdapi/v1/...): bodies become GenerationRequests, answers come from the
resolved request and its images."""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import time
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np
from fastapi import APIRouter, HTTPException
from PIL import Image, ImageOps

from ..echo import echo
from ..hires import HiresFix
from ..hires_upscalers import ImageResize
from ..image import ImageError, decode_base64_image, parameters_text, png_bytes
from ..request import DEFAULT_STRENGTH, RANDOM_SEED, SEED_RANGE, GenerationRequest
from ..schedulers import ALL_SCHEDULERS, make_scheduler, resolve_name, scheduler_names
from ..upscale import image_resizers
from .a1111_controlnet import control_units
from .a1111_fields import strict_refusal
from .a1111_settings import Applied, apply
from .schemas import HiresTxt2ImgRequest, Img2ImgRequest, Txt2ImgRequest
from .state import ServerState

# GenerationRequest field -> A1111 body field, so 422s name what the client sent.
FIELD_NAMES = {
    "guidance_scale": "cfg_scale",
    "batch": "batch_size",
    "scheduler": "sampler_name",
    "strength": "denoising_strength",
    "image": "init_images",
    "mask_image": "mask",
    "masked_content": "inpainting_fill",
    "mask_blur": "mask_blur",
    "padding_mask_crop": "inpaint_full_res_padding",
    "hires": "enable_hr",
    "controls": "alwayson_scripts.ControlNet",
    "hires_scale": "hr_scale",
    "hires_resize_x": "hr_resize_x",
    "hires_resize_y": "hr_resize_y",
    "hires_upscaler": "hr_upscaler",
    "hires_steps": "hr_second_pass_steps",
    "hires_denoising_strength": "denoising_strength",
    "hires_sampler": "hr_sampler_name",
    "hires_prompt": "hr_prompt",
    "hires_negative_prompt": "hr_negative_prompt",
    "clip_skip": "clip_skip",
}
MASKED_CONTENT = ("fill", "original", "latent_noise", "latent_nothing")  # A1111's inpainting_fill 0..3
# SD 1.x latent -> RGB approximation, for cheap progress previews of 4-channel latents.
PREVIEW_FACTORS = np.array(
    [[0.298, 0.207, 0.208], [0.187, 0.286, 0.173], [-0.158, 0.189, 0.264], [-0.184, -0.271, -0.473]], np.float32
)


def to_request(
    body: Txt2ImgRequest,
    image: Image.Image | list[Image.Image] | None = None,
    mask: Image.Image | None = None,
    upscalers: Mapping[str, ImageResize] | None = None,
) -> GenerationRequest:
    """The request an A1111 body asks for; `upscalers`: the model upscalers a hires fix may name."""
    inpainting = {}
    if mask is not None:  # A1111 defaults: strength 0.75, mask blur 4, only the masked area
        inpainting = {
            "mask_image": mask,
            "masked_content": MASKED_CONTENT[body.inpainting_fill],
            "mask_blur": body.mask_blur,
            # An empty mask has no box to crop around: A1111 then inpaints the whole picture.
            "padding_mask_crop": body.inpaint_full_res_padding if body.inpaint_full_res and mask.getbbox() else None,
            "paste_back": True,  # A1111 lays the original back outside the (blurred) mask in every mode
        }
        if body.denoising_strength is None:
            inpainting["strength"] = DEFAULT_STRENGTH
    return GenerationRequest(
        prompt=body.prompt,
        negative_prompt=body.negative_prompt or None,
        steps=body.steps,
        guidance_scale=body.cfg_scale,
        width=body.width,
        height=body.height,
        seed=body.seed,
        seed_per_image=True,  # A1111: image i from seed + i, so each image's PNG reproduces it alone
        prompt_syntax="a1111",
        clip_skip=body.clip_skip - 1 if isinstance(body.clip_skip, int) and body.clip_skip > 0 else body.clip_skip,
        batch=body.batch_size * body.n_iter,
        scheduler=body.sampler_name or None,
        eta=body.eta,
        image=image,
        guidance_interval=body.guidance_interval,
        vae_tiling=body.vae_tiling,
        deepcache_interval=body.deepcache_interval,
        tome_ratio=body.tome_ratio,
        hires=hires_of(body, upscalers or {}) if image is None else None,
        **{"strength": getattr(body, "denoising_strength", None) if image is not None else None, **inpainting},
    )


def hires_of(body: Txt2ImgRequest, upscalers: Mapping[str, ImageResize]) -> HiresFix | None:
    """A txt2img body's hires fix (A1111 ignores its fields without enable_hr; so does this)."""
    if not getattr(body, "enable_hr", False):
        return None
    strength = DEFAULT_STRENGTH if body.denoising_strength is None else body.denoising_strength
    return HiresFix(
        body.hr_scale, body.hr_resize_x, body.hr_resize_y, body.hr_upscaler, body.hr_second_pass_steps, strength,
        body.hr_sampler_name, body.hr_prompt, body.hr_negative_prompt, upscalers,
    )  # fmt: skip


def add_routes(api: APIRouter, state: ServerState) -> None:
    async def run(applied: Applied, image: Image.Image | None, mask: Image.Image | None = None) -> dict[str, Any]:
        """Generate on the model `applied` names; `info` says which model and which fields were ignored."""
        body = applied.body
        if body.batch_size < 1 or body.n_iter < 1:
            bad = "batch_size" if body.batch_size < 1 else "n_iter"
            raise HTTPException(422, f"{bad}: must be >= 1")
        subseed = _subseed(body.subseed)
        native = applied.pipe.config.default_resolution
        size = (body.width or native, body.height or native)
        init = image if isinstance(image, Image.Image) else None
        limit = state.config.limits.input_pixels(applied.entry.config)
        models = list(applied.entry.config.controlnets)
        controls, guess_mode, ignored = await control_units(applied.extra, init, size, limit, models, state.annotators)
        if state.config.strict and ignored:
            raise HTTPException(422, strict_refusal(ignored))
        applied.ignored.extend(ignored)
        request = to_request(body, image, mask, image_resizers(state.upscalers))
        request = replace(request, controls=controls, guess_mode=guess_mode)
        request = state.prepare(request, {**FIELD_NAMES, **applied.names}, applied.pipe)
        out = await state.generate(request, applied.pipe)
        texts = [parameters_text(request, out.parameters, i) for i in range(len(out.images))]
        images = [base64.b64encode(png_bytes(img, text)).decode() for img, text in zip(out.images, texts, strict=True)]
        info = {**info_of(body, request, subseed), "infotexts": texts, **out.parameters, **applied.info()}
        parameters = body.model_dump(mode="json", exclude={"init_images", "mask"})  # json: NaN in extras -> null
        return {"images": images, "parameters": parameters, "info": json.dumps(info)}

    @api.post("/sdapi/v1/txt2img")
    async def txt2img(body: HiresTxt2ImgRequest) -> dict[str, Any]:
        return await run(await apply(state, body), None)

    @api.post("/sdapi/v1/img2img")
    async def img2img(body: Img2ImgRequest) -> dict[str, Any]:
        applied = await apply(state, body)
        limit = state.config.limits.input_pixels(applied.entry.config)
        images = []
        for i, data in enumerate(body.init_images):
            try:  # decoding can take seconds and hundreds of MB: off the event loop, capped from the header
                images.append(await asyncio.to_thread(decode_base64_image, data, limit))
            except ImageError as exc:
                raise HTTPException(422, f"init_images[{i}]: {exc}") from None
        image = images[0] if len(images) == 1 else images  # several: references (FLUX.2 [klein])
        mask = None
        if body.mask is not None:
            try:
                mask = await asyncio.to_thread(decode_base64_image, body.mask, limit)
            except ImageError as exc:
                raise HTTPException(422, f"mask: {exc}") from None
            mask = ImageOps.invert(mask.convert("L")) if body.inpainting_mask_invert else mask.convert("L")
            mask = mask if mask.size == images[0].size else mask.resize(images[0].size)  # as A1111 does
        return await run(applied, image, mask)

    @api.get("/sdapi/v1/samplers")
    def samplers() -> list[dict[str, Any]]:
        """The samplers the current model can run (a zero-terminal-SNR model refuses some)."""
        scheduler_config = state.current_model().scheduler_config
        names = scheduler_names()
        return [
            {"name": key, "aliases": [n for n in names if n != key and resolve_name(n) == key], "options": {}}
            for key in ALL_SCHEDULERS
            if _runs(key, scheduler_config)
        ]

    @api.get("/sdapi/v1/progress")
    def progress(skip_current_image: bool = False) -> dict[str, Any]:
        pipe, jobs = state.ready()
        job = jobs.current()
        fraction = job.step / job.total if job and job.total else 0.0
        elapsed = time.monotonic() - job.started if job and job.started else 0.0
        eta = elapsed / fraction - elapsed if fraction > 0 else 0.0
        shown = None if skip_current_image or job is None or job.latents is None else job.pipe or pipe  # its model's
        preview = None if shown is None else _preview(shown, job.latents)
        return {
            "progress": fraction,
            "eta_relative": eta,
            "state": {
                "job_count": jobs.depth() + jobs.busy(),
                "sampling_step": job.step if job else 0,
                "sampling_steps": job.total if job else 0,
                "interrupted": bool(job and job.cancelled.is_set()),
            },
            "current_image": preview,
            "textinfo": None,
        }

    @api.post("/sdapi/v1/interrupt")
    def interrupt() -> dict[str, Any]:
        _, jobs = state.ready()
        return {"interrupted": jobs.interrupt()}


def info_of(body: Txt2ImgRequest, request: GenerationRequest, subseed: int) -> dict[str, Any]:
    """A1111's per-image lists of a resolved request: image i's prompt, negative prompt, seed and subseed."""
    count = request.image_count
    negatives = request.negative_prompts or [""] * len(request.prompts)
    return {
        "prompt": body.prompt,
        "all_prompts": [request.prompts[i // request.batch] for i in range(count)],
        "negative_prompt": body.negative_prompt,
        "all_negative_prompts": [negatives[i // request.batch] for i in range(count)],
        "seed": request.seed,
        "all_seeds": request.image_seeds,
        "subseed": subseed,
        "all_subseeds": [subseed + i for i in range(count)],
        "subseed_strength": 0,
        "batch_size": body.batch_size,
        "index_of_first_image": 0,
    }


def _subseed(value: int) -> int:
    """The variation seed A1111 reports (drawn when -1, as A1111 does); no pixel depends on it."""
    if value == RANDOM_SEED:
        return secrets.randbits(32)
    low, high = SEED_RANGE
    if not low <= value <= high:
        raise HTTPException(422, f"subseed: must be in [{low}, {high}] or {RANDOM_SEED}, got {echo(value)}")
    return value


def _runs(sampler: str, scheduler_config: dict[str, Any]) -> bool:
    try:
        make_scheduler(sampler, scheduler_config)
    except ValueError:
        return False
    return True


def _preview(pipe: Any, latents: np.ndarray) -> str | None:
    """The running image through the model's tiny autoencoder when it has one, else a linear guess of RGB."""
    if pipe.has_tiny_vae:
        image = pipe.preview(latents)
    elif latents.shape[1] == PREVIEW_FACTORS.shape[0]:
        rgb = np.einsum("chw,cr->hwr", latents[0], PREVIEW_FACTORS)
        image = Image.fromarray(((rgb + 1) / 2 * 255).clip(0, 255).astype(np.uint8))
    else:
        return None
    return base64.b64encode(png_bytes(image)).decode()
