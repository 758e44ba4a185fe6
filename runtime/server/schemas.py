"""Request bodies of the A1111 and OpenAI image APIs (the fields this server honours)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class Txt2ImgRequest(BaseModel):
    prompt: str = ""
    negative_prompt: str = ""
    steps: int = Field(20, ge=1)
    cfg_scale: float | None = Field(None, ge=0.0, le=100.0, description="Default: the model's guidance.")
    width: int | None = Field(None, ge=8)
    height: int | None = Field(None, ge=8)
    seed: int = Field(-1, ge=-1, le=2**63 - 1)
    sampler_name: str | None = None
    batch_size: int = Field(1, ge=1)
    n_iter: int = Field(1, ge=1)


class Img2ImgRequest(Txt2ImgRequest):
    init_images: list[str] = Field(..., min_length=1, max_length=1)
    denoising_strength: float = Field(0.75, gt=0.0, le=1.0)


class OpenAIImageRequest(BaseModel):
    prompt: str = Field(..., max_length=4000)
    n: int = Field(1, ge=1)
    size: str | None = Field(None, pattern=r"^\d{1,5}x\d{1,5}$")
    response_format: Literal["b64_json", "url"] = "b64_json"
    model: str | None = None
    quality: str | None = None
    style: str | None = None
    user: str | None = None
