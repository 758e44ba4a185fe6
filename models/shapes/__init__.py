"""The "shapes" model: a tiny Stable Diffusion trained offline on images the project renders itself.

Its exports ship inside the package (`onnx/` fp32, `onnx-int8/`) and are the default model of `sd-run`.
Torch-free here and in `data`, `judge` and `evaluate` (which use the runtime); `train` needs torch.
"""

from sd_onnx.runtime.shipped import PRECISIONS, shipped_model

__all__ = ["PRECISIONS", "shipped_model"]
