"""sd-onnx runtime: Stable Diffusion on onnxruntime with NumPy schedulers; no PyTorch needed."""

from .hires import HiresFix, hires_fix
from .manifest import Manifest, ManifestError
from .pipeline import (
    AutoPipelineForInpainting,
    DiffusionPipeline,
    Flux2KleinPipeline,
    FluxFillPipeline,
    FluxPipeline,
    GenerationCancelled,
    PipelineOutput,
    SanaPipeline,
    SanaSprintPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    ZImagePipeline,
)
from .request import GenerationRequest, Limits, RequestError

__all__ = [
    "AutoPipelineForInpainting",
    "DiffusionPipeline",
    "StableDiffusionPipeline",
    "StableDiffusionInpaintPipeline",
    "StableDiffusionXLPipeline",
    "StableDiffusion3Pipeline",
    "FluxFillPipeline",
    "FluxPipeline",
    "SanaPipeline",
    "SanaSprintPipeline",
    "ZImagePipeline",
    "Flux2KleinPipeline",
    "GenerationRequest",
    "HiresFix",
    "hires_fix",
    "Limits",
    "RequestError",
    "PipelineOutput",
    "GenerationCancelled",
    "Manifest",
    "ManifestError",
]
