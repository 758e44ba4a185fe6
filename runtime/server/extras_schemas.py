"""Request bodies of A1111's extras routes (/sdapi/v1/extra-single-image, /sdapi/v1/extra-batch-images), with
A1111's field names, defaults and ranges (modules/api/models.py), strict types as on the other A1111 bodies.

Face restoration (GFPGAN, CodeFormer) is not implemented: its fields are accepted so whole A1111 payloads pass,
and a visibility above 0 is named in the answer's html_info. Unknown fields are kept (`model_extra`) and named
there too, never silently dropped.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

EXTRAS_BODY = ConfigDict(allow_inf_nan=False, strict=True, extra="allow")


class ExtrasRequest(BaseModel):
    model_config = EXTRAS_BODY

    resize_mode: Literal[0, 1] = Field(
        0, description="0: upscale by upscaling_resize; 1: to upscaling_resize_w x upscaling_resize_h."
    )
    show_extras_results: bool = Field(True, description="Accepted for A1111 payloads; results are always returned.")
    gfpgan_visibility: float = Field(
        0, ge=0, le=1, description="Face restoration is not implemented: must be 0 to apply."
    )
    codeformer_visibility: float = Field(0, ge=0, le=1, description="Face restoration is not implemented.")
    codeformer_weight: float = Field(0, ge=0, le=1, description="Face restoration is not implemented.")
    upscaling_resize: float = Field(2, ge=1, le=8, description="Scale factor (resize_mode 0).")
    upscaling_resize_w: int = Field(512, ge=1, description="Target width (resize_mode 1).")
    upscaling_resize_h: int = Field(512, ge=1, description="Target height (resize_mode 1).")
    upscaling_crop: bool = Field(True, description="resize_mode 1: crop to the exact target size, centred.")
    upscaler_1: str = Field("None", description="A name from /sdapi/v1/upscalers; None: no upscaling.")
    upscaler_2: str = Field("None", description="A second upscaler blended in at extras_upscaler_2_visibility.")
    extras_upscaler_2_visibility: float = Field(0, ge=0, le=1)
    upscale_first: bool = Field(False, description="Order of face restoration and upscaling (no face restoration).")


class ExtrasSingleImageRequest(ExtrasRequest):
    image: str = Field("", description="Base64 image or data URL.")


class FileData(BaseModel):
    model_config = ConfigDict(strict=True)

    data: str = Field(..., description="Base64 image or data URL.")
    name: str = Field(..., description="File name (not used: answers keep the list's order).")


class ExtrasBatchImagesRequest(ExtrasRequest):
    imageList: list[FileData] = Field(..., min_length=1, description="The images, in the order of the answer.")  # noqa: N815
