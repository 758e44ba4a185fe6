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

import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx.external_data_helper import uses_external_data

from sd_onnx.runtime.manifest import ComponentInfo, Manifest, read_json, sha256_file

from .atomic import publish, staging_folder
from .errors import ExportError
from .lora_targets import TARGETS_FILE, write_targets
from .trace import ALIGNMENT, EXTERNAL_DATA_SUFFIX, point_to
from .validate import open_session, signature

FEATURE = "deepcache_feature"
SHALLOW = "unet_shallow"
SHALLOW_FILE = "shallow.onnx"
MIN_EXTERNAL_BYTES = 1024  # smaller tensors stay inside each graph (scalars, shapes, scales)
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


def add_deepcache(folder: Path, manifest: Manifest, branch: int, log: Any = print) -> Manifest:
    """Give `folder`'s UNet the DeepCache feature output at `branch`, derive the shallow graph beside it, check it
    and record both in the manifest (in place; `folder` is a staging folder)."""
    unet_dir = folder / "unet"
    full_file = folder / manifest.components["unet"].file
    model = onnx.load(str(full_file), load_external_data=False)
    if FEATURE not in {o.name for o in model.graph.output}:
        _expose(model, feature_tensor(model, *check_branch(read_json(unet_dir / "config.json"), branch)))
    _share_weights(model, full_file)
    onnx.save_model(model, str(full_file))
    targets = unet_dir / TARGETS_FILE
    if targets.is_file():  # load-time LoRAs read weights at recorded offsets, which moved
        write_targets(json.loads(targets.read_text())["modules"], full_file)
    extractor = onnx.utils.Extractor(model)
    inputs = [i.name for i in model.graph.input] + [FEATURE]
    shallow = extractor.extract_model(inputs, [model.graph.output[0].name])
    onnx.save_model(shallow, str(unet_dir / SHALLOW_FILE))
    validation = check_shallow(full_file, unet_dir / SHALLOW_FILE, manifest)
    manifest.components["unet"] = _updated(manifest.components["unet"], full_file, folder)
    manifest.components[SHALLOW] = _shallow_info(
        manifest.components["unet"], unet_dir / SHALLOW_FILE, folder, validation
    )
    manifest.config.deepcache_branch = branch
    manifest.save(folder)
    sizes = f"{len(shallow.graph.node)} of {len(model.graph.node)} nodes"
    log(f"DeepCache branch {branch}: shallow UNet {sizes}, max |diff| {validation['max_abs_diff']:.1e}")
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


def _share_weights(model: onnx.ModelProto, full_file: Path) -> None:
    """Move every weight still inside the graph into `<model>_data` (page-aligned, so onnxruntime can map it), so
    that the shallow graph, cut from this one, points at the same bytes."""
    data_path = full_file.with_name(full_file.name + EXTERNAL_DATA_SUFFIX)
    inline = [t for t in model.graph.initializer if not uses_external_data(t) and len(t.raw_data) >= MIN_EXTERNAL_BYTES]
    if not inline:
        return
    with open(data_path, "ab") as data:
        for tensor in inline:
            data.write(b"\0" * (-data.tell() % ALIGNMENT))
            offset = data.tell()
            data.write(tensor.raw_data)
            length = len(tensor.raw_data)
            tensor.ClearField("raw_data")
            point_to(tensor, data_path.name, offset, length)


def check_shallow(full_file: Path, shallow_file: Path, manifest: Manifest) -> dict[str, Any]:
    """The shallow graph given the full graph's own feature must give the full graph's output: the largest
    difference over two seeded inputs, ExportError above TOLERANCE (relative to the output's scale)."""
    full, shallow = open_session(full_file), open_session(shallow_file)
    worst, scale = 0.0, 0.0
    for seed in (0, 1):
        feeds = sample_feeds(full, manifest, np.random.default_rng(seed))
        out, feature = full.run(
            ["out_sample" if _has(full, "out_sample") else full.get_outputs()[0].name, FEATURE], feeds
        )
        again = shallow.run(None, {**feeds, FEATURE: feature})[0]
        worst = max(worst, float(np.abs(out.astype(np.float64) - again).max()))
        scale = max(scale, float(np.abs(out).max()))
    if not np.isfinite(worst) or worst > TOLERANCE * max(1.0, scale):
        raise ExportError(f"DeepCache: the shallow UNet differs from the full one by {worst:.3g}")
    return {"max_abs_diff": worst, "reference": "the full UNet given the same inputs (its own deepcache_feature)"}


def sample_feeds(session: Any, manifest: Manifest, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Seeded inputs for every UNet input at batch 2 and a small latent size from the model's config."""
    config = manifest.config
    side = max(config.size_multiple // config.vae_scale_factor, min(config.sample_size, 32))
    dims = {"batch": 2, "steps": 1, "height": side, "width": side, "sequence": config.max_token_length}
    feeds = {}
    for arg in session.get_inputs():
        shape = [d if isinstance(d, int) else dims.get(str(d), 2) for d in arg.shape]
        dtype = np.float16 if arg.type == "tensor(float16)" else np.float32
        value = rng.uniform(1, 999, shape) if arg.name == "timestep" else rng.standard_normal(shape)
        feeds[arg.name] = value.astype(np.int64 if arg.type == "tensor(int64)" else dtype)
    return feeds


def _has(session: Any, output: str) -> bool:
    return any(o.name == output for o in session.get_outputs())


def _files(folder: Path, files: list[Path]) -> dict[str, str]:
    return {f.relative_to(folder).as_posix(): sha256_file(f) for f in sorted(files)}


def _updated(info: ComponentInfo, full_file: Path, folder: Path) -> ComponentInfo:
    """The UNet's entry after the rewrite: its files (graph, shared weights, LoRA map) and the added output."""
    inputs, outputs = signature(open_session(full_file))
    skipped = ("config.json", SHALLOW_FILE)
    info.files = _files(folder, [p for p in full_file.parent.iterdir() if p.is_file() and p.name not in skipped])
    info.inputs, info.outputs = inputs, outputs
    return info


def _shallow_info(unet: ComponentInfo, shallow_file: Path, folder: Path, validation: dict[str, Any]) -> ComponentInfo:
    inputs, outputs = signature(open_session(shallow_file))
    data = folder / unet.file
    return ComponentInfo(
        file=str(shallow_file.relative_to(folder)),
        files=_files(folder, [shallow_file, data.with_name(data.name + EXTERNAL_DATA_SUFFIX)]),
        inputs=inputs,
        outputs=outputs,
        precision=unet.precision,
        opset=unet.opset,
        validation=validation,
        quantization=unet.quantization,
        optimizations=unet.optimizations,
    )


def deepcache_folder(source: Path, output: Path, branch: int, *, overwrite: bool = False, log: Any = print) -> Manifest:
    """Copy the export `source` to `output` with DeepCache's graphs added, atomically."""
    source, output = Path(source).expanduser().resolve(), Path(output).expanduser().resolve()
    manifest = Manifest.load(source)
    if manifest.config.deepcache_branch is not None:
        raise ExportError(f"{source}: already has DeepCache graphs (branch {manifest.config.deepcache_branch})")
    check_branch(read_json(source / "unet" / "config.json"), branch)
    if output.exists() and not overwrite:
        raise ExportError(f"{output} already exists (use --overwrite to replace it)")
    with staging_folder(output) as staging:
        shutil.copytree(source, staging, dirs_exist_ok=True)
        manifest = add_deepcache(staging, Manifest.load(staging), branch, log)
        publish(staging, output)
    log(f"wrote {output}")
    return manifest
