"""Skip-layer guidance (SD3.5; diffusers' `skip_guidance_layers`, the model card's [7, 8, 9] for Medium): the
transformer graph with some of its blocks skipped, as `SD3Transformer2DModel(skip_layers=...)` computes it.

Derived from the transformer graph as shipped (fp32 or int8), not traced again: a block is the nodes named under
`/model/transformer_blocks.N/` (torch's scope names, which the block-by-block export keeps); its inputs are the
tensors its nodes read from outside it, its outputs the ones read after it. Skipping it passes each stream
through: every later use of an output reads the input of the same shape instead (a run on sample inputs with
image and text token counts that differ pairs them). The derived graph lives beside the transformer's in
`transformer/` and reads its weights from the same data file, so they are stored once.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx

from sd_onnx.runtime.manifest import Manifest, read_json

from .derived import load_graph, record, save_graph
from .errors import ExportError
from .quantize_weights_folder import held_out_feeds
from .validate import open_session

SKIP = "transformer_skip"
BLOCKS = "/model/transformer_blocks.{}/"
Log = Callable[[str], None]


def parse_layers(text: str) -> tuple[int, ...]:
    """`--skip-layers 7,8,9` as sorted block indices; ExportError naming the option for anything else."""
    try:
        layers = tuple(sorted({int(part) for part in text.split(",") if part.strip()}))
    except ValueError:
        raise ExportError(f"--skip-layers: a comma-separated list of block indices, got {text!r}") from None
    if not layers:
        raise ExportError(f"--skip-layers: a comma-separated list of block indices, got {text!r}")
    if min(layers) < 0:
        raise ExportError(f"--skip-layers: block indices >= 0, got {text!r}")
    return layers


def add_skip_layers(
    folder: Path, manifest: Manifest, layers: tuple[int, ...], reference: Callable | None = None, log: Log = print
) -> Manifest:
    """Add the `transformer_skip` graph with `layers` skipped to the SD3 export in `folder`; `reference(feeds)`,
    when given, is PyTorch's output for those feeds with the same layers skipped, which the graph must match."""
    check_layers(manifest.model_family, folder, layers)
    model, full_file = load_graph(folder, manifest, "transformer")
    feeds = _feeds(manifest)
    skip = _skipped(model, full_file, layers, feeds)
    save_graph(model, full_file)
    validation = _validate(skip, full_file.parent, feeds, reference, manifest.components["transformer"].precision)
    manifest.config.skip_guidance_layers = list(layers)
    record(folder, manifest, SKIP, skip, validation, base="transformer")
    log(f"transformer_skip: blocks {', '.join(map(str, layers))} skipped, {validation}")
    if validation.get("cosine", 1.0) < 0.99:  # a quantized graph: its weights' rounding, reported as int8's is
        log(f"warning: transformer_skip: cosine {validation['cosine']:.4f} against PyTorch is under 0.99")
    return Manifest.load(folder)


def check_layers(family: str, folder: Path, layers: tuple[int, ...]) -> None:
    """ExportError unless `folder` (an export or a diffusers folder: both keep `transformer/config.json`) is an
    SD3 model with blocks `layers`."""
    if family != "sd3":
        raise ExportError(f"--skip-layers: skip-layer guidance is SD3's; this model is {family}")
    count = int(read_json(folder / "transformer" / "config.json").get("num_layers", 0))
    if max(layers) >= count:
        raise ExportError(f"--skip-layers: the transformer has blocks 0..{count - 1}, got {list(layers)}")


def torch_reference(source: Path, layers: tuple[int, ...], dtype: str) -> Callable[[dict], np.ndarray]:
    """PyTorch's transformer of the diffusers folder `source` with `layers` skipped, as a function of the graph's
    feeds (loaded when called, in the export's trace dtype, computing in fp32)."""

    def run(feeds: dict[str, np.ndarray]) -> np.ndarray:
        import torch
        from diffusers import SD3Transformer2DModel

        from .lean import TRACE_DTYPES, float32_compute

        model = SD3Transformer2DModel.from_pretrained(source / "transformer", torch_dtype=TRACE_DTYPES[dtype]).eval()
        inputs = {name: torch.from_numpy(value) for name, value in feeds.items()}
        with torch.no_grad(), float32_compute(model):
            out = model(**inputs, skip_layers=list(layers), return_dict=False)[0]
        return out.float().numpy()

    return run


def _feeds(manifest: Manifest) -> dict[str, np.ndarray]:
    """Sample inputs at the shapes the transformer was validated at (image and text token counts differ)."""
    info = manifest.components["transformer"]
    return held_out_feeds(info.inputs, info.validation["input_shapes"], manifest.config, vocab_size=1, samples=1)[0]


def _boundary(graph: onnx.GraphProto, layer: int) -> tuple[list[str], list[str], set[int]]:
    """A block's input tensors, output tensors and node positions, from its nodes' scope names."""
    prefix = BLOCKS.format(layer)
    nodes = list(graph.node)
    positions = {i for i, n in enumerate(nodes) if n.name.startswith(prefix)}
    if not positions:
        raise ExportError(f"transformer: no nodes named {prefix}... (a graph traced by this exporter has them)")
    inside = [nodes[i] for i in sorted(positions)]
    produced = {o for n in inside for o in n.output}
    fixed = {t.name for t in graph.initializer} | {o for n in nodes if n.op_type == "Constant" for o in n.output}
    inputs = list(dict.fromkeys(i for n in inside for i in n.input if i and i not in produced and i not in fixed))
    used_after = {i for k, n in enumerate(nodes) if k not in positions for i in n.input}
    used_after |= {o.name for o in graph.output}
    outputs = [o for n in inside for o in n.output if o in used_after]
    return inputs, outputs, positions


def _skipped(
    model: onnx.ModelProto, full_file: Path, layers: tuple[int, ...], feeds: dict[str, np.ndarray]
) -> onnx.ModelProto:
    """A copy of `model` without the blocks `layers`: each output's uses read the same-shaped input instead."""
    boundaries = {layer: _boundary(model.graph, layer) for layer in layers}
    edges = [t for inputs, outputs, _ in boundaries.values() for t in inputs + outputs]
    shapes = _shapes(model, full_file, edges, feeds)
    replaced: dict[str, str] = {}
    dropped: set[int] = set()
    for layer, (inputs, outputs, ids) in boundaries.items():
        for output in outputs:
            same = [i for i in inputs if shapes[i] == shapes[output]]
            if len(same) != 1:
                raise ExportError(f"transformer: block {layer}'s output {output} has {len(same)} inputs of its shape")
            replaced[output] = same[0]
        dropped |= ids
    skip = onnx.ModelProto()
    skip.CopyFrom(model)
    kept = [n for k, n in enumerate(model.graph.node) if k not in dropped]
    skip.graph.ClearField("node")
    skip.graph.node.extend(kept)
    for node in skip.graph.node:
        node.input[:] = [_follow(replaced, name) for name in node.input]
    for output in skip.graph.output:
        if output.name in replaced:
            raise ExportError("transformer: a skipped block's output is the graph's output")
    used = {i for n in skip.graph.node for i in n.input}
    skip.graph.ClearField("initializer")
    skip.graph.initializer.extend(t for t in model.graph.initializer if t.name in used)
    skip.graph.ClearField("value_info")
    return skip


def _follow(replaced: dict[str, str], name: str) -> str:
    """Through consecutive skipped blocks: an output replaced by an input that is itself a skipped output."""
    while name in replaced:
        name = replaced[name]
    return name


def _shapes(
    model: onnx.ModelProto, full_file: Path, tensors: list[str], feeds: dict[str, np.ndarray]
) -> dict[str, tuple[int, ...]]:
    """The shapes `tensors` take on `feeds`: the graph run once with them as extra outputs."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(name) for name in dict.fromkeys(tensors))
    with tempfile.NamedTemporaryFile(suffix=".onnx", dir=full_file.parent) as scratch:
        onnx.save_model(probe, scratch.name)  # beside the graph: its weights' locations resolve
        session = open_session(Path(scratch.name))
        names = [o.name for o in session.get_outputs()]
        values = session.run(None, feeds)
    return {name: tuple(value.shape) for name, value in zip(names, values, strict=True)}


def _validate(
    skip: onnx.ModelProto, folder: Path, feeds: dict[str, np.ndarray], reference: Callable | None, precision: str
) -> dict[str, object]:
    """The derived graph against PyTorch's skipping forward: max abs difference and cosine; above 1e-3 an fp32
    graph is an error (a quantized one differs by its weights' rounding)."""
    with tempfile.NamedTemporaryFile(suffix=".onnx", dir=folder) as scratch:
        onnx.save_model(skip, scratch.name)
        got = open_session(Path(scratch.name)).run(None, feeds)[0]
    if reference is None:
        return {"reference": "none (derived from an existing export)"}
    want = reference(feeds)
    cosine = float(np.dot(got.ravel(), want.ravel()) / (np.linalg.norm(got) * np.linalg.norm(want)))
    result = {"reference": "torch, skip_layers", "max_abs_diff": float(np.max(np.abs(got - want))), "cosine": cosine}
    if precision == "fp32" and not result["max_abs_diff"] <= 1e-3:
        raise ExportError(f"transformer_skip: differs from PyTorch's skip_layers forward ({result})")
    return result
