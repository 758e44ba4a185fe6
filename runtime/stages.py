"""The UNet run stage by stage: low-memory mode's way of never holding all of its weights at once.

An export with `unet_stages` carries the UNet also as consecutive stage graphs over the same weights (see
sd_onnx.exporter.stages): the outer down blocks, the inner down blocks with the middle block, the inner up
blocks, the outer up blocks. Each call loads a stage, runs it on the tensors it needs, frees it and moves on, so
at most one stage's weights and the activations of its levels are in memory; the cost is loading every stage
once per UNet call (SD 1.5 int8: about 2 s of session creation per step on two cores).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .manifest import ComponentInfo
from .session import OnnxModel, return_freed_memory


class StagedUnet:
    """Runs like the UNet's OnnxModel (same feeds, same outputs in the same order), one stage session at a time."""

    def __init__(self, unet: ComponentInfo, stages: tuple[str, ...], load: Callable[[str], OnnxModel]) -> None:
        self.name = "unet"
        self.info = unet
        self.stages = stages
        self.load = load
        self.output_names = [o.name for o in unet.outputs]
        self.specs = {i.name: i for i in unet.inputs}

    def __call__(self, **feeds: np.ndarray) -> list[np.ndarray]:
        values = dict(feeds)
        for name in self.stages:
            stage = self.load(name)
            # Copies: an output array keeps its session's whole arena alive, which would hold every stage's at once.
            produced = [np.array(value) for value in stage(**{n: values[n] for n in stage.graph_inputs})]
            values.update(zip(stage.output_names, produced, strict=True))
            del stage, produced
            return_freed_memory()
        return [values[name] for name in self.output_names]

    def input_dtype(self, name: str, default: type = np.float32) -> type:
        spec = self.specs.get(name)
        return np.dtype(spec.dtype).type if spec else default

    def input_rank(self, name: str) -> int:
        return len(self.specs[name].shape)
