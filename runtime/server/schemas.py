"""Request bodies of the A1111 and OpenAI image APIs (the fields this server honours).

Types only: ranges, defaults and limits are checked once, by `GenerationRequest.resolve`, and its errors are
answered 422 naming the field as these bodies spell it. Non-finite numbers are refused here already.

Unknown fields are dropped, except in A1111 bodies: A1111 clients send whole payloads, and the A1111 fields this
server does not implement are kept (`model_extra`) so the answer can say which ones it ignored
(a1111_fields.py); the OpenAI bodies drop theirs, as OpenAI's own API answers no such list.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# Strict types: `true` is not a number and "7" is not a float, as in the Python API.
FINITE = ConfigDict(allow_inf_nan=False, strict=True)
A1111_BODY = ConfigDict(allow_inf_nan=False, strict=True, extra="allow")


class Txt2ImgRequest(BaseModel):
    model_config = A1111_BODY

    prompt: str = ""
    negative_prompt: str = ""
    steps: int | None = Field(None, description="Default: 20 (or the server's max_steps if lower).")
    cfg_scale: float | None = Field(None, description="Default: the model's guidance.")
    distilled_cfg_scale: float | None = Field(
        None,
        description="Forge's: the guidance of a guidance-distilled model (FLUX.1-dev, SANA-Sprint), in place of "
        "cfg_scale; unused by other models.",
    )
    width: int | None = Field(None, description="Default: the model's resolution; a multiple of its size multiple.")
    height: int | None = Field(None, description="Default: the model's resolution; a multiple of its size multiple.")
    seed: int = Field(
        -1, description="Image i of the batch is made from seed + i; -1 draws a random seed (reported in info)."
    )
    subseed: int = Field(
        -1,
        description="Variation seed, as A1111 reports it (subseed + i in info's all_subseeds); variations are not "
        "supported (strength 0), so it changes no pixel. -1 draws one.",
    )
    sampler_name: str | None = None
    sampler_index: str | None = Field(None, description="A1111's older name of sampler_name, used without it.")
    scheduler: str | None = Field(
        None, description="A1111 1.9+ schedule type: Automatic (the sampler's own) or Karras (/sdapi/v1/schedulers)."
    )
    override_settings: dict[str, Any] = Field(
        default_factory=dict,
        description="Settings for this request (/sdapi/v1/options keys): sd_model_checkpoint, "
        "CLIP_stop_at_last_layers, sd_vae; others are listed in info's ignored unless they equal the server's.",
    )
    override_settings_restore_afterwards: bool = Field(
        True, description="false: the override_settings' model stays the current one afterwards, as in A1111."
    )
    batch_size: int = 1
    n_iter: int = 1
    eta: float = 0.0
    clip_skip: int | None = Field(
        None, description="The text encoder's Nth layer from the end, as A1111 counts (1: the last; default 1)."
    )
    # sd-onnx accelerators (off by default).
    guidance_interval: list[float] | None = Field(
        None,
        min_length=2,
        max_length=2,
        description="sd-onnx: guidance only at steps whose sigma is in (lo, hi]; the others skip the negative half.",
    )
    vae_tiling: bool | None = Field(None, description="sd-onnx: decode in overlapping tiles (diffusers' VAE tiling).")
    deepcache_interval: int | None = Field(
        None, description="sd-onnx: DeepCache, the full UNet every N steps and the shallow one between (1: off)."
    )
    tome_ratio: float | None = Field(
        None, description="sd-onnx: token merging, the fraction (0-0.75) of outermost tokens merged (0: off)."
    )


class HiresTxt2ImgRequest(Txt2ImgRequest):
    """The txt2img body: the shared fields and A1111's hires fix, which its img2img does not have."""

    enable_hr: bool = Field(False, description="Hires fix: upscale the picture, then denoise it again at that size.")
    hr_scale: float = Field(2.0, description="Hires fix: the target is width and height times this...")
    hr_resize_x: int = Field(0, description="...unless given here (0: from hr_resize_y keeping the aspect ratio).")
    hr_resize_y: int = Field(0, description="Target height (0: from hr_resize_x keeping the aspect ratio).")
    hr_upscaler: str | None = Field(
        None,
        description="Latent (the default), Latent (antialiased), Latent (bicubic), Latent (bicubic antialiased), "
        "Latent (nearest), Latent (nearest-exact), None, Lanczos or Nearest.",
    )
    hr_second_pass_steps: int = Field(0, description="Steps of the second pass (0: steps).")
    denoising_strength: float | None = Field(None, description="Hires fix: the second pass's strength (0.75).")
    hr_sampler_name: str | None = Field(None, description="The second pass's sampler (default: sampler_name).")
    hr_prompt: str = Field("", description="The second pass's prompt (default: prompt).")
    hr_negative_prompt: str = Field("", description="The second pass's negative prompt (default: negative_prompt).")


class Img2ImgRequest(Txt2ImgRequest):
    init_images: list[str] = Field(
        ...,
        min_length=1,
        max_length=8,
        description="Base64 images or data URLs: one init image, or the references of a model that edits from "
        "several (FLUX.2 [klein]: up to 4).",
    )
    denoising_strength: float | None = Field(None, description="Default: 0.75.")
    # Inpainting, as A1111 names it: white in `mask` is repainted.
    mask: str | None = Field(None, description="Base64 mask image or data URL; white is repainted.")
    mask_blur: int = Field(4, description="Gaussian blur radius applied to the mask, in pixels (0-64).")
    inpainting_mask_invert: Literal[0, 1] = Field(0, description="1: repaint the black part instead.")
    # A1111's API defaults: masked content "fill", only the masked area inpainted, no padding.
    inpainting_fill: Literal[0, 1, 2, 3] = Field(
        0, description="Masked content: 0 fill (blurred surroundings), 1 original, 2 latent noise, 3 latent nothing."
    )
    inpaint_full_res: bool = Field(
        True, description="Inpaint only a box around the mask at the full width x height, pasted back (only masked)."
    )
    inpaint_full_res_padding: int = Field(0, ge=0, le=4096, description="Pixels of context around the mask's box.")


class OpenAIImageRequest(BaseModel):
    model_config = FINITE

    prompt: str = Field(..., max_length=4000)
    n: int = 1
    size: str | None = Field(None, pattern=r"^([0-9]{1,5}x[0-9]{1,5}|auto)$", description="WIDTHxHEIGHT or auto.")
    response_format: Literal["b64_json", "url"] = "b64_json"
    model: str | None = None
    quality: str | None = None
    style: str | None = None
    user: str | None = None
    # Extensions (the official client sends them with extra_body=...): reproducible images.
    seed: int = Field(-1, description="sd-onnx extension; -1 draws a random seed.")
    steps: int | None = Field(None, description="sd-onnx extension.")
    negative_prompt: str | None = Field(None, description="sd-onnx extension.")
    guidance_scale: float | None = Field(None, description="sd-onnx extension.")
    guidance_interval: list[float] | None = Field(
        None, min_length=2, max_length=2, description="sd-onnx extension, as on txt2img."
    )
    vae_tiling: bool | None = Field(None, description="sd-onnx extension, as on txt2img.")
    deepcache_interval: int | None = Field(None, description="sd-onnx extension, as on txt2img.")
    tome_ratio: float | None = Field(None, description="sd-onnx extension, as on txt2img.")


class OpenAIImageEditFields(BaseModel):
    """The text fields of POST /v1/images/edits (multipart form: strings, so converted, not strict)."""

    model_config = ConfigDict(allow_inf_nan=False, extra="ignore")

    prompt: str = Field(..., max_length=4000)
    n: int = 1
    size: str | None = Field(None, pattern=r"^([0-9]{1,5}x[0-9]{1,5}|auto)$", description="WIDTHxHEIGHT or auto.")
    response_format: Literal["b64_json", "url"] = "b64_json"
    model: str | None = None
    user: str | None = None
    # Extensions, as on /v1/images/generations.
    seed: int = -1
    steps: int | None = None
    negative_prompt: str | None = None
    guidance_scale: float | None = None
    strength: float | None = Field(None, description="sd-onnx extension; default 1 (repaint the masked part).")
