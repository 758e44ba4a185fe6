"""DeepCache (Ma et al., CVPR 2024) as two graphs over one set of weights.

DeepCache reuses the UNet's deep features between neighbouring steps: a full step runs the whole UNet and keeps
the hidden state that enters one up-block layer (the "branch"); the steps after it run only the shallow path
around that layer (conv_in, the down layers above the branch, the up layers from the branch on, conv_out) and
take the kept feature in place of everything deeper. Branch b counts (level, layer) pairs from the outermost
level inwards, layer by layer, as the paper and its DeepCacheSDHelper number them (SD: 3 layers per level,
branch 0 = the last layer of the last up block, the cheapest shallow path).

Both graphs come from the UNet graph as it is shipped (fp32, fp16 or int8), not from a second trace: the full
graph gains the kept feature as an output named `deepcache_feature`, and the shallow graph is what
onnx.utils.Extractor cuts from it between the UNet's inputs plus that feature and the UNet's output. It is
therefore the same arithmetic on the same weights, by construction. Both graphs read those weights from one
external-data file beside them, so they are stored once.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from sd_onnx.runtime.manifest import Manifest, read_json

from .derived import Log, derive_folder, load_graph, record, sample_feeds, save_graph
from .errors import ExportError
from .stages import refresh_stages
from .validate import open_session

FEATURE = "deepcache_feature"
SHALLOW = "unet_shallow"
TOLERANCE = 1e-4  # shallow graph given the full graph's own feature vs the full graph: the same computation


def branches(unet_config: dict[str, Any]) -> list[tuple[int, int]]:
    """(up block index, layer index inside it) of every branch, in branch order: level by level from the outermost,
    and inside a level from the last up layer backwards."""
    levels = len(unet_config["block_out_channels"])
    per_block = unet_config.get("layers_per_block", 2)
    per_level = per_block if isinstance(per_block, list) else [per_block] * levels
    return [
        (levels - 1 - level, per_level[level] - layer)
        for level in range(levels)
        for layer in range(per_level[level] + 1)
    ]


def check_branch(unet_config: dict[str, Any], branch: int) -> tuple[int, int]:
    """(up block, layer) of `branch`; ExportError naming the branches this UNet has."""
    positions = branches(unet_config)
    if not 0 <= branch < len(positions):
        raise ExportError(f"--deepcache-branch {branch}: this UNet has branches 0..{len(positions) - 1}")
    return positions[branch]


def feature_tensor(model: onnx.ModelProto, up_block: int, layer: int) -> str:
    """The hidden state entering layer `layer` of up block `up_block`: the first input of the Concat that joins it
    with its skip connection (torch.onnx names nodes after module paths, and exporters keep those names)."""
    scope = re.compile(rf"(^|/)up_blocks\.{up_block}/Concat(_\d+)?$")
    joins = [n for n in model.graph.node if n.op_type == "Concat" and scope.search(n.name) and _joins_channels(n)]
    if len(joins) <= layer:
        raise ExportError(
            f"DeepCache: cannot find the skip-connection joins of up block {up_block} in the UNet graph "
            f"(found {len(joins)}; was it exported by torch.onnx?)"
        )
    return joins[layer].input[0]


def _joins_channels(node: onnx.NodeProto) -> bool:
    axis = next((a.i for a in node.attribute if a.name == "axis"), None)
    return len(node.input) == 2 and axis == 1


def add_deepcache(folder: Path, manifest: Manifest, branch: int, log: Log = print) -> Manifest:
    """Give `folder`'s UNet the DeepCache feature output at `branch`, derive the shallow graph beside it, check it
    and record both in the manifest (in place; `folder` is a staging folder)."""
    model, full_file = load_graph(folder, manifest)
    if FEATURE not in {o.name for o in model.graph.output}:
        _expose(model, feature_tensor(model, *check_branch(read_json(full_file.parent / "config.json"), branch)))
    save_graph(model, full_file)
    extractor = onnx.utils.Extractor(model)
    inputs = [i.name for i in model.graph.input] + [FEATURE]
    shallow = extractor.extract_model(inputs, [model.graph.output[0].name])
    manifest.config.deepcache_branch = branch
    record(folder, manifest, SHALLOW, shallow, {})
    manifest.components[SHALLOW].validation = check_shallow(folder, manifest)
    manifest.save(folder)
    sizes = f"{len(shallow.graph.node)} of {len(model.graph.node)} nodes"
    diff = manifest.components[SHALLOW].validation["max_abs_diff"]
    log(f"DeepCache branch {branch}: shallow UNet {sizes}, max |diff| {diff:.1e}")
    return manifest


def _expose(model: onnx.ModelProto, tensor: str) -> None:
    """Rename `tensor` to FEATURE everywhere and make it a graph output (after the UNet's own output)."""
    for node in model.graph.node:
        node.input[:] = [FEATURE if name == tensor else name for name in node.input]
        node.output[:] = [FEATURE if name == tensor else name for name in node.output]
    for info in model.graph.value_info:
        if info.name == tensor:
            info.name = FEATURE
    elem_type = model.graph.output[0].type.tensor_type.elem_type
    model.graph.output.append(
        onnx.helper.make_tensor_value_info(
            FEATURE, elem_type, ["batch", "feature_channels", "feature_height", "feature_width"]
        )
    )


def check_shallow(folder: Path, manifest: Manifest) -> dict[str, Any]:
    """The shallow graph given the full graph's own feature must give the full graph's output: the largest
    difference over two seeded inputs, ExportError above TOLERANCE (relative to the output's scale)."""
    full = open_session(folder / manifest.components["unet"].file)
    shallow = open_session(folder / manifest.components[SHALLOW].file)
    worst, scale = 0.0, 0.0
    for seed in (0, 1):
        feeds = sample_feeds(full, manifest, np.random.default_rng(seed))
        out, feature = full.run([full.get_outputs()[0].name, FEATURE], feeds)
        again = shallow.run(None, {**feeds, FEATURE: feature})[0]
        worst = max(worst, float(np.abs(out.astype(np.float64) - again).max()))
        scale = max(scale, float(np.abs(out).max()))
    if not np.isfinite(worst) or worst > TOLERANCE * max(1.0, scale):
        raise ExportError(f"DeepCache: the shallow UNet differs from the full one by {worst:.3g}")
    return {"max_abs_diff": worst, "reference": "the full UNet given the same inputs (its own deepcache_feature)"}


def deepcache_folder(source: Path, output: Path, branch: int, *, overwrite: bool = False, log: Log = print) -> Manifest:
    """Copy the export `source` to `output` with DeepCache's graphs added, atomically."""
    manifest = Manifest.load(Path(source).expanduser())
    if manifest.config.deepcache_branch is not None:
        raise ExportError(f"{source}: already has DeepCache graphs (branch {manifest.config.deepcache_branch})")
    check_branch(read_json(Path(source).expanduser() / "unet" / "config.json"), branch)
    return derive_folder(
        source,
        output,
        lambda folder, m: refresh_stages(folder, add_deepcache(folder, m, branch, log), log),
        overwrite=overwrite,
        log=log,
    )
