"""sd-onnx runtime: Stable Diffusion on onnxruntime with NumPy schedulers; no PyTorch needed."""

from .manifest import Manifest, ManifestError
from .pipeline import (
    AutoPipelineForInpainting,
    DiffusionPipeline,
    GenerationCancelled,
    PipelineOutput,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
)
from .pipeline_sdxl import StableDiffusionXLPipeline
from .request import GenerationRequest, Limits, RequestError

__all__ = [
    "AutoPipelineForInpainting",
    "DiffusionPipeline",
    "StableDiffusionPipeline",
    "StableDiffusionInpaintPipeline",
    "StableDiffusionXLPipeline",
    "GenerationRequest",
    "Limits",
    "RequestError",
    "PipelineOutput",
    "GenerationCancelled",
    "Manifest",
    "ManifestError",
]
