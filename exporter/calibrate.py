"""Calibration data from real pipeline runs: each component's inputs recorded along denoising trajectories.

The fp32 export runs through the runtime's own pipeline (classifier-free guidance, both CFG halves in
each UNet batch, every timestep), so int8 ranges come from the inputs the graphs will actually see.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from sd_onnx.runtime import StableDiffusionPipeline

CALIBRATION_PROMPTS = (
    "a photo of an astronaut riding a horse on mars",
    "a red circle on a blue background",
    "portrait of an old man, oil painting, dramatic light",
    "a bowl of fruit on a wooden table, studio photo",
    "a city street at night in the rain, neon signs",
    "a watercolor landscape with mountains and a lake",
    "a cute cat sleeping on a sofa",
    "an isometric illustration of a small house, pastel colors",
)
HELD_OUT_PROMPTS = ("a green triangle at the top on a white background", "a sailing ship in a storm")


@dataclass
class CalibrationSet:
    """Recorded feeds per component, plus how they were made (for the manifest)."""

    feeds: dict[str, list[dict[str, np.ndarray]]]
    settings: dict[str, Any]


def record(
    model_dir: Path,
    prompts: tuple[str, ...],
    steps: int,
    size: int,
    seed: int = 0,
    guidance: float | None = None,
) -> CalibrationSet:
    """Run the fp32 pipeline on `prompts` and record what each component was fed.

    `guidance` defaults to the model's own (the manifest's): the UNet's inputs along the trajectory, and so
    the ranges calibration measures, depend on it, and users sample at that guidance."""
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, provider="cpu", cache=False)
    guidance = pipe.config.guidance_scale if guidance is None else guidance
    feeds: dict[str, list[dict[str, np.ndarray]]] = {
        "text_encoder": [],
        "unet": [],
        "vae_decoder": [],
        "vae_encoder": [],
    }
    for name in ("text_encoder", "unet", "vae_decoder"):
        sink = feeds[name]
        pipe.component(name).observers.append(lambda run, sink=sink: sink.append({k: v.copy() for k, v in run.items()}))
    images = []
    for i, prompt in enumerate(prompts):
        out = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, height=size, width=size, seed=seed + i,
                   output_type="np")  # fmt: skip
        images.append(out.images[0])
    feeds["vae_encoder"] = [{"sample": (img.transpose(2, 0, 1)[None] * 2 - 1).astype(np.float32)} for img in images]
    settings = {"prompts": len(prompts), "steps": steps, "size": size, "seed": seed, "guidance": guidance}
    settings["samples"] = {name: len(v) for name, v in feeds.items()}
    return CalibrationSet(feeds, settings)


class FeedReader:
    """onnxruntime's CalibrationDataReader protocol over recorded feeds."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self.feeds = feeds
        self._iter: Iterator[dict[str, np.ndarray]] = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._iter, None)

    def rewind(self) -> None:
        self._iter = iter(self.feeds)


SMALL_CONSTANT_BYTES = 64 * 1024


def structure_with_types(model_file: Path) -> onnx.ModelProto:
    """The graph without its weights, every tensor typed by onnxruntime's symbolic shape inference (which knows
    its contrib ops, such as the fused MultiHeadAttention, where onnx's own inference stops)."""
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    model = onnx.load(str(model_file), load_external_data=False)
    for init in model.graph.initializer:  # shape arithmetic reads small constants: bring those in
        length = next((int(e.value) for e in init.external_data if e.key == "length"), None)
        if uses_external_data(init) and length is not None and length <= SMALL_CONSTANT_BYTES:
            load_external_data_for_tensor(init, str(model_file.parent))
            init.data_location = onnx.TensorProto.DEFAULT
            del init.external_data[:]
    return SymbolicShapeInference.infer_shapes(model, auto_merge=True)


def record_ranges(model_file: Path, op_types: tuple[str, ...], feeds: list[dict[str, np.ndarray]], cache: Path) -> None:
    """MinMax ranges of the float inputs and outputs of every `op_types` node over `feeds`, written to `cache` in
    onnxruntime's calibration-cache format, so quantize_static reads them instead of calibrating itself.

    What onnxruntime's MinMaxCalibrater computes, with the weights held once: it loads the graph's weights into
    Python, copies the graph to augment it and opens a session on the copy (three times a 10 GB SDXL UNet, which
    ran out of 24 GB); here only the graph's structure is read, a ReduceMin/ReduceMax pair is added per tensor,
    and onnxruntime alone reads the weights, from the same data file."""
    import onnxruntime as ort
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorsData, save_tensors_data

    model = structure_with_types(model_file)
    graph = model.graph
    infos = {v.name: v for v in (*graph.value_info, *graph.input, *graph.output)}
    weights = {i.name for i in graph.initializer}
    tensors = sorted({
        name
        for node in graph.node
        if node.op_type in op_types
        for name in (*node.input, *node.output)
        if name in infos and name not in weights and infos[name].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    })  # fmt: skip
    for name in tensors:
        for reduce in ("ReduceMin", "ReduceMax"):
            graph.node.append(onnx.helper.make_node(reduce, [name], [f"{name}_{reduce}"], keepdims=0))
            graph.output.append(onnx.helper.make_tensor_value_info(f"{name}_{reduce}", onnx.TensorProto.FLOAT, []))
    augmented = model_file.parent / "_calibration.onnx"  # beside the weights, which it references
    onnx.save_model(model, str(augmented))
    try:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every tensor
        session = ort.InferenceSession(str(augmented), options, providers=["CPUExecutionProvider"])
        outputs = [f"{name}_{reduce}" for name in tensors for reduce in ("ReduceMin", "ReduceMax")]
        lows, highs = np.full(len(tensors), np.inf, np.float32), np.full(len(tensors), -np.inf, np.float32)
        for feed in feeds:
            values = np.asarray(session.run(outputs, feed), np.float32).reshape(-1, 2)
            lows, highs = np.minimum(lows, values[:, 0]), np.maximum(highs, values[:, 1])
        del session
    finally:
        augmented.unlink()
    ranges = {
        n: (np.array([lo], np.float32), np.array([hi], np.float32))
        for n, lo, hi in zip(tensors, lows, highs, strict=True)
    }
    save_tensors_data(TensorsData(CalibrationMethod.MinMax, ranges), cache)
