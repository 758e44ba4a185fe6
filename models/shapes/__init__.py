"""The "shapes" model: a tiny Stable Diffusion trained offline on images the project renders itself.

Its exports ship inside the package (`onnx/` fp32, `onnx-int8/`) and are the default model of `sd-run`.
"""

from __future__ import annotations

from pathlib import Path

PRECISIONS = {"fp32": "onnx", "int8": "onnx-int8"}


def shipped_model(precision: str = "fp32") -> Path:
    """Folder of the exported shapes model bundled with the package."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    return Path(__file__).parent / PRECISIONS[precision]
