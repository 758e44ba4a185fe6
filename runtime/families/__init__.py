"""Model families: one small module each, registered here. The pipeline asks `family_for` which family a
folder's config belongs to and runs that family's pieces in the shared loop (see base.py)."""

from __future__ import annotations

from ..manifest import ManifestError, ModelConfig
from .base import Conditioning, Family
from .flux import Flux
from .flux2 import Flux2
from .sana import Sana, SanaSprint
from .sd import StableDiffusion
from .sd3 import StableDiffusion3
from .sdxl import StableDiffusionXL
from .z_image import ZImage

# Most specific first: a config is the first family's that recognizes it.
FAMILIES: tuple[type[Family], ...] = (
    StableDiffusion3,
    Flux,
    ZImage,
    Flux2,
    SanaSprint,
    Sana,
    StableDiffusionXL,
    StableDiffusion,
)


def family_for(config: ModelConfig) -> type[Family]:
    """The family of a model with `config`; ManifestError naming the known ones otherwise."""
    for family in FAMILIES:
        if family.recognizes(config):
            return family
    known = ", ".join(f.name for f in FAMILIES)
    raise ManifestError(f"model family {config.family!r} is not supported by this runtime (known: {known})")


__all__ = ["FAMILIES", "Conditioning", "Family", "family_for"]
