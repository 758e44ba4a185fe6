"""sd-onnx runtime: Stable Diffusion on onnxruntime with NumPy schedulers; no PyTorch needed."""

from .manifest import Manifest, ManifestError
from .pipeline import DiffusionPipeline, GenerationCancelled, PipelineOutput, StableDiffusionPipeline
from .pipeline_sdxl import StableDiffusionXLPipeline
from .request import GenerationRequest, Limits, RequestError

__all__ = [
    "DiffusionPipeline",
    "StableDiffusionPipeline",
    "StableDiffusionXLPipeline",
    "GenerationRequest",
    "Limits",
    "RequestError",
    "PipelineOutput",
    "GenerationCancelled",
    "Manifest",
    "ManifestError",
]
