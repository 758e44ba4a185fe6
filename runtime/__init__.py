"""sd-onnx runtime: Stable Diffusion on onnxruntime with NumPy schedulers; no PyTorch needed."""

from .manifest import Manifest, ManifestError
from .pipeline import GenerationCancelled, PipelineOutput, StableDiffusionPipeline

__all__ = ["StableDiffusionPipeline", "PipelineOutput", "GenerationCancelled", "Manifest", "ManifestError"]
