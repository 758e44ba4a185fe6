"""The UNet as consecutive stage graphs, so that low-memory mode holds one stage's weights at a time.

A UNet's weights sit mostly at its inner, low-resolution levels and its activations mostly at its outer,
high-resolution ones; holding both whole (SD 1.5 int8: 0.86 GB of weights, 0.5 GB of activations at 512x512)
is what keeps a low-memory run above 1 GB. Cut at the level boundaries, each stage holds either large weights or
large activations, never both: the outer down blocks; the inner down blocks and the middle block; the inner up
blocks; the outer up blocks with the output convolution. The runtime loads a stage, runs it, frees it and loads
the next (runtime/stages.py), passing the tensors that cross each cut.

Every node keeps its stage from its module path (torch.onnx names nodes after modules, and onnxruntime's
fusions keep the name of a node they replace or take the stage of their inputs); a node computed from weights
alone (a DequantizeLinear, a Constant) is copied into every stage that needs it, so no weight ever crosses a cut.
The stages are the UNet graph's own nodes and read the UNet's external-data file, so they are the same
arithmetic on the same weights, stored once; the export checks that chaining them gives the UNet's output.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from sd_onnx.runtime.manifest import STAGE_COMPONENTS, Manifest, read_json

from .derived import Log, derive_folder, load_graph, record, sample_feeds, save_graph
from .errors import ExportError
from .validate import open_session

TOLERANCE = 1e-4  # stages chained vs the UNet, relative to the output's scale: the same nodes, cut apart
BLOCK = re.compile(r"(?:^|[/.])(down_blocks|up_blocks)\.(\d+)[/.]|(?:^|[/.])mid_block[/.]")


def stage_of(node_name: str, levels: int) -> int | None:
    """The stage a node belongs to by its module path, None when the name does not say."""
    match = BLOCK.search(node_name)
    if match is None:
        return None
    kind, index = match.group(1), match.group(2)
    if kind == "down_blocks":
        return 0 if int(index) < levels // 2 else 1
    if kind == "up_blocks":
        return 2 if int(index) < levels - levels // 2 else 3
    return 1  # mid_block


@dataclass
class Stage:
    """One stage graph's nodes (indices into the UNet graph) and the tensors it takes and gives."""

    nodes: list[int]
    inputs: list[str]
    outputs: list[str]


def plan(model: onnx.ModelProto, levels: int) -> list[Stage]:
    """The UNet graph's nodes by stage. A node goes to the stage its module path names, or later if an input comes
    from a later one; weight-only nodes (DequantizeLinear of weights, constants) and the dequantization of an
    activation are copied into every stage that reads them, so what crosses a cut is a weight never and an int8
    activation as int8 (onnxruntime then fuses each stage's DequantizeLinear -> op -> QuantizeLinear exactly as in
    the whole UNet)."""
    graph = model.graph
    constant = {t.name for t in graph.initializer} | {""}
    graph_outputs = {o.name for o in graph.output}
    stage_of_tensor: dict[str, int] = {i.name: 0 for i in graph.input}
    placed: dict[int, int] = {}
    copied: set[int] = set()
    for index, node in enumerate(graph.node):
        if all(name in constant for name in node.input):
            constant.update(node.output)
            copied.add(index)
            continue
        earliest = max((stage_of_tensor.get(name, 0) for name in node.input if name not in constant), default=0)
        stage_of_tensor.update(dict.fromkeys(node.output, earliest))
        if node.op_type == "DequantizeLinear" and not graph_outputs & set(node.output):
            copied.add(index)
            continue
        named = stage_of(node.name, levels)
        placed[index] = max(earliest, named if named is not None else earliest)
        stage_of_tensor.update(dict.fromkeys(node.output, placed[index]))
    producer = {out: i for i, node in enumerate(graph.node) for out in node.output}
    stages = [_closure(model, [i for i, s in placed.items() if s == stage], copied, producer)
              for stage in range(len(STAGE_COMPONENTS))]  # fmt: skip
    for stage, (nodes, reads, produced) in enumerate(stages):
        if not any(i in placed for i in nodes):
            raise ExportError(f"UNet stages: stage {stage} is empty (are the node names torch.onnx's module paths?)")
        inputs = sorted(reads - produced - constant)
        stages[stage] = (nodes, inputs, produced)
    needed_later = [set().union(*(set(s[1]) for s in stages[k + 1 :])) for k in range(len(stages))]
    return [
        Stage(nodes, inputs, sorted(produced & graph_outputs) + sorted((produced & needed_later[k]) - graph_outputs))
        for k, (nodes, inputs, produced) in enumerate(stages)
    ]


def _closure(
    model: onnx.ModelProto, nodes: list[int], copied: set[int], producer: dict[str, int]
) -> tuple[list[int], set[str], set[str]]:
    """`nodes` with the copied nodes they read (transitively): (nodes, tensors read, tensors produced)."""
    graph = model.graph
    found = set(nodes)
    todo = [name for i in nodes for name in graph.node[i].input]
    while todo:
        index = producer.get(todo.pop())
        if index is not None and index in copied and index not in found:
            found.add(index)
            todo.extend(graph.node[index].input)
    reads = {name for i in found for name in graph.node[i].input if name}
    produced = {name for i in found for name in graph.node[i].output}
    return sorted(found), reads, produced


def split(model: onnx.ModelProto, stages: list[Stage], dtypes: dict[str, tuple[int, int]]) -> list[onnx.ModelProto]:
    """The stage graphs of `model` by its plan; `dtypes`: (ONNX element type, rank) of every tensor crossing a cut."""
    return [_stage_graph(model, k, stage.nodes, stage.inputs, stage.outputs, dtypes) for k, stage in enumerate(stages)]


def crossing(model: onnx.ModelProto, stages: list[Stage]) -> list[str]:
    """Names of the tensors that cross a cut (stage inputs that are not graph inputs)."""
    graph_inputs = {i.name for i in model.graph.input}
    return sorted({name for stage in stages for name in stage.inputs} - graph_inputs)


def _stage_graph(
    model: onnx.ModelProto,
    stage: int,
    nodes: list[int],
    inputs: list[str],
    outputs: list[str],
    dtypes: dict[str, tuple[int, int]],
) -> onnx.ModelProto:
    graph = model.graph
    declared = {v.name: v for v in [*graph.input, *graph.output]}

    def value_info(name: str) -> onnx.ValueInfoProto:
        if name in declared:
            return declared[name]
        elem_type, rank = dtypes[name]
        return onnx.helper.make_tensor_value_info(name, elem_type, [f"{name}_{axis}" for axis in range(rank)])

    read = {name for i in nodes for name in graph.node[i].input}
    stage_graph = onnx.helper.make_graph(
        [graph.node[i] for i in nodes],
        f"{graph.name}_stage_{stage}",
        [value_info(n) for n in inputs],
        [value_info(n) for n in outputs],
        initializer=[t for t in graph.initializer if t.name in read],
    )
    stage_model = onnx.helper.make_model(stage_graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    stage_model.producer_name = model.producer_name
    return stage_model


def crossing_dtypes(folder: Path, model: onnx.ModelProto, names: list[str], feeds: dict[str, np.ndarray]) -> dict:
    """(element type, rank) of each tensor in `names`, from one run of the UNet graph that also returns them."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    declared = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in declared)
    probe_file = folder / "unet" / "stages_probe.onnx"
    onnx.save_model(probe, str(probe_file))
    try:
        values = open_session(probe_file).run(names, feeds)
    finally:
        probe_file.unlink()
    return {n: (onnx.helper.np_dtype_to_tensor_dtype(v.dtype), v.ndim) for n, v in zip(names, values, strict=True)}


def add_stages(folder: Path, manifest: Manifest, log: Log = print) -> Manifest:
    """Cut `folder`'s UNet into its stage graphs beside it, check them and record them in the manifest (in place)."""
    model, full_file = load_graph(folder, manifest)
    save_graph(model, full_file)  # every weight in the data file the stages point at
    levels = len(read_json(full_file.parent / "config.json")["block_out_channels"])
    stages = plan(model, levels)
    names = crossing(model, stages)
    feeds = sample_feeds(open_session(full_file), manifest, np.random.default_rng(0))
    graphs = split(model, stages, crossing_dtypes(folder, model, names, feeds))
    manifest.config.unet_stages = len(graphs)
    for name, graph in zip(STAGE_COMPONENTS, graphs, strict=True):
        record(folder, manifest, name, graph, {})
    validation = check_stages(folder, manifest)
    for name in STAGE_COMPONENTS:
        manifest.components[name].validation = validation
    manifest.save(folder)
    sizes = ", ".join(str(len(g.graph.node)) for g in graphs)
    log(f"UNet stages: {sizes} nodes, {len(names)} tensors cross the cuts, max |diff| {validation['max_abs_diff']:.1e}")
    return manifest


def run_stages(sessions: list[Any], feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every tensor the stages produce, given the UNet's feeds (the runtime does the same, loading one at a time)."""
    values = dict(feeds)
    for session in sessions:
        names = [o.name for o in session.get_outputs()]
        feeds = {i.name: values[i.name] for i in session.get_inputs()}
        values.update(zip(names, session.run(names, feeds), strict=True))
    return values


def check_stages(folder: Path, manifest: Manifest) -> dict[str, Any]:
    """The stages chained must give the UNet's outputs: the largest difference over two seeded inputs, ExportError
    above TOLERANCE (relative to the output's scale)."""
    full = open_session(folder / manifest.components["unet"].file)
    sessions = [open_session(folder / manifest.components[name].file) for name in STAGE_COMPONENTS]
    worst, scale = 0.0, 0.0
    for seed in (0, 1):
        feeds = sample_feeds(full, manifest, np.random.default_rng(seed))
        chained = run_stages(sessions, feeds)
        for output, expected in zip(full.get_outputs(), full.run(None, feeds), strict=True):
            worst = max(worst, float(np.abs(expected.astype(np.float64) - chained[output.name]).max()))
            scale = max(scale, float(np.abs(expected).max()))
    if not np.isfinite(worst) or worst > TOLERANCE * max(1.0, scale):
        raise ExportError(f"UNet stages: chained they differ from the UNet by {worst:.3g}")
    return {"max_abs_diff": worst, "reference": "the UNet given the same inputs"}


def refresh_stages(folder: Path, manifest: Manifest, log: Log = print) -> Manifest:
    """Cut the stages again after the UNet graph changed (DeepCache's output, int8), if the folder has them."""
    return add_stages(folder, manifest, log) if manifest.config.unet_stages else manifest


def stages_folder(source: Path, output: Path, *, overwrite: bool = False, log: Log = print) -> Manifest:
    """Copy the export `source` to `output` with the UNet stages added, atomically."""
    if Manifest.load(Path(source).expanduser()).config.unet_stages:
        raise ExportError(f"{source}: already has UNet stages")
    return derive_folder(source, output, lambda folder, m: add_stages(folder, m, log), overwrite=overwrite, log=log)
