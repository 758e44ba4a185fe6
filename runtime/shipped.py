"""Where the model shipped in the package lies: the runtime's default model.

The files live in `models/shapes/` (package data of `sd_onnx.models.shapes`); this module finds them without
importing any code of the models package, so `models` (which uses the runtime to evaluate its model) and the
runtime never import each other.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

PRECISIONS = {"fp32": "onnx", "int8": "onnx-int8"}


def shipped_model(precision: str = "fp32") -> Path:
    """Folder of the exported shapes model bundled with the package ("fp32" or "int8")."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    spec = importlib.util.find_spec("sd_onnx.models.shapes")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the shipped model is not installed (sd_onnx.models.shapes is missing)")
    return Path(next(iter(spec.submodule_search_locations))) / PRECISIONS[precision]
