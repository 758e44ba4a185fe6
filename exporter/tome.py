"""Token merging for Stable Diffusion (ToMe for SD, Bolya & Hoffman 2023), written to trace into ONNX.

Before self-attention in the transformer blocks of the UNet's outermost level, the block's tokens are split into
destinations (the top-left token of every 2x2 cell) and sources (the rest); the `ratio * N` sources most similar
(cosine, on the block's input) to a destination are averaged into it, attention runs on the fewer tokens, and its
output is copied back to every merged position. This is tomesd's `apply_patch(ratio, max_downsample=1, sx=sy=2,
use_rand=False)`: deterministic partitions, self-attention only.

tomesd computes sizes and the number of merged tokens in Python, which a trace would freeze; here they are tensor
operations on the latent size and on a `tome_ratio` input (float64, so floor(N * ratio) is Python's own), so one
graph serves every resolution and every ratio, 0 included (no merge).
"""

from __future__ import annotations

import functools
import io
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from sd_onnx.runtime.manifest import Manifest, read_json

from .derived import Log, derive_folder, load_graph, record, sample_feeds, save_graph, unet_output
from .errors import ExportError
from .validate import open_session

PREFIX = "/tome/"
PARTITION_OUTPUTS = ("src", "dst", "kept", "moved", "into")
TORCH_TYPES = {onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.FLOAT16: torch.float16}


def _positions(count: torch.Tensor, start: torch.Tensor | int = 0) -> torch.Tensor:
    """arange(start, count) that stays a graph operation when the bounds are traced sizes."""
    return torch.arange(start, count, dtype=torch.long)


def partition(
    metric: torch.Tensor, height: torch.Tensor, width: torch.Tensor, ratio: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """Which tokens of a `height` x `width` grid (row-major) merge where: (src, dst, kept, moved, into), where
    `src`/`dst` are the grid positions of sources and destinations, `kept`/`moved` index `src` (the sources left
    alone, the floor(N * ratio) merged ones) and `into` indexes `dst` for each moved source."""
    tokens = metric.shape[1]
    cells_y, cells_x = height // 2, width // 2
    dst_count = cells_y * cells_x
    cells = (_positions(cells_y)[:, None] * 2 * width + _positions(cells_x)[None, :] * 2).reshape(-1)
    is_dst = torch.zeros(tokens, dtype=torch.long).scatter(0, cells, torch.ones_like(cells))
    order = torch.argsort(_positions(tokens) - tokens * is_dst)  # destinations, then sources, each in order
    dst, src = order.index_select(0, _positions(dst_count)), order.index_select(0, _positions(tokens, dst_count))
    src_count = tokens - dst_count
    merged = torch.clamp((tokens * ratio.double()).floor().long().reshape(()), max=src_count)
    unit = metric.float() / metric.float().norm(dim=-1, keepdim=True)  # fp16 graphs: similarities in fp32
    scores = unit.index_select(1, src) @ unit.index_select(1, dst).transpose(-1, -2)
    best, best_dst = scores.max(dim=-1)
    ranked = torch.argsort(best, dim=-1, descending=True)
    moved = ranked.index_select(1, _positions(merged))
    return src, dst, ranked.index_select(1, _positions(src_count, merged)), moved, best_dst.gather(1, moved)


def _expand(index: torch.Tensor, channels: int) -> torch.Tensor:
    return index[..., None].expand(-1, -1, channels)


def merge_tokens(x: torch.Tensor, *where: torch.Tensor) -> torch.Tensor:
    """Kept sources, then every destination averaged with the sources moved into it (tomesd's "mean")."""
    src_pos, dst_pos, kept, moved, into = where
    channels = x.shape[-1]
    src, dst = x.index_select(1, src_pos), x.index_select(1, dst_pos)
    summed = dst.scatter_add(1, _expand(into, channels), src.gather(1, _expand(moved, channels)))
    ones = torch.ones_like(into[..., None], dtype=x.dtype)
    counts = torch.ones_like(dst[..., :1]).scatter_add(1, into[..., None], ones)
    return torch.cat([src.gather(1, _expand(kept, channels)), summed / counts], dim=1)


def unmerge_tokens(y: torch.Tensor, grid: torch.Tensor, *where: torch.Tensor) -> torch.Tensor:
    """Back to the grid of `grid`'s shape: each destination's value to itself and to the sources merged into it."""
    src_pos, dst_pos, kept, moved, into = where
    batch, tokens, channels = y.shape[0], grid.shape[1], y.shape[-1]
    kept_count, dst_count = kept.shape[1], dst_pos.shape[0]
    unm = y.index_select(1, _positions(kept_count))
    dst = y.index_select(1, _positions(kept_count + dst_count, kept_count))
    out = torch.zeros(batch, tokens, channels, dtype=y.dtype)
    out = out.scatter(1, _expand(dst_pos.expand(batch, -1), channels), dst)
    out = out.scatter(1, _expand(src_pos[kept], channels), unm)
    return out.scatter(1, _expand(src_pos[moved], channels), dst.gather(1, _expand(into, channels)))


TOKEN_MERGING = "unet_tome"
RATIO = "tome_ratio"
TOLERANCE = 1e-5  # at ratio 0 the added nodes only permute tokens and put them back


def add_token_merging(folder: Path, manifest: Manifest, log: Log = print) -> Manifest:
    """Grow the token-merging graph from `folder`'s UNet graph, check it and record it (in place; `folder` is a
    staging folder)."""
    model, full_file = load_graph(folder, manifest)
    save_graph(model, full_file)
    config = read_json(full_file.parent / "config.json")
    blocks = outer_blocks(model, len(config["block_out_channels"]))
    grown = grow(model, blocks)
    manifest.config.token_merging = True
    record(folder, manifest, TOKEN_MERGING, grown, {})
    manifest.components[TOKEN_MERGING].validation = check_token_merging(folder, manifest)
    manifest.save(folder)
    log(f"token merging: {len(blocks)} self-attention blocks at the outermost level merge tokens")
    return manifest


def outer_blocks(model: onnx.ModelProto, levels: int) -> list[tuple[onnx.NodeProto, onnx.NodeProto]]:
    """(norm1, residual add) of every transformer block in down block 0 and the last up block: the LayerNorm whose
    output feeds self-attention, and the Add that puts self-attention's output onto the block's input."""
    outer = rf"(down_blocks\.0|up_blocks\.{levels - 1})/attentions\.\d+/transformer_blocks\.\d+"
    norm = re.compile(rf"(^|/){outer}/norm1/LayerNormalization$")
    blocks = []
    for node in model.graph.node:
        if node.op_type == "LayerNormalization" and norm.search(node.name):
            scope = node.name[: -len("norm1/LayerNormalization")]
            add = next((n for n in model.graph.node if n.name == scope + "Add" and node.input[0] in n.input), None)
            if add is None:
                raise ExportError(f"token merging: cannot find the self-attention residual of {scope}")
            blocks.append((node, add))
    if not blocks:
        raise ExportError(
            "token merging: the UNet has no self-attention at its outermost level (SDXL's has none), "
            "so ToMe for SD would change nothing"
        )
    return blocks


def grow(model: onnx.ModelProto, blocks: list[tuple[onnx.NodeProto, onnx.NodeProto]]) -> onnx.ModelProto:
    """A copy of `model` with `tome_ratio` as an input and, in every block, self-attention run on merged tokens:
    the partition computed from the block's input, its norm1 output merged, attention's output unmerged."""
    grown = onnx.ModelProto()
    grown.CopyFrom(model)
    graph = grown.graph
    opset = next(o.version for o in grown.opset_import if o.domain in ("", "ai.onnx"))
    dtype = TORCH_TYPES[graph.input[0].type.tensor_type.elem_type]
    pieces = _pieces(opset, dtype)
    graph.input.append(onnx.helper.make_tensor_value_info(RATIO, onnx.TensorProto.DOUBLE, []))
    nodes, size = _grid_size(graph.input[0].name)
    by_norm = {norm.name: i for i, (norm, _) in enumerate(blocks)}
    by_add = {add.name: i for i, (_, add) in enumerate(blocks)}
    merged_inputs, partitions = {}, {}
    for node in graph.node:
        if node.name in by_add:  # (after its block's norm1: graphs are topologically sorted)
            i = by_add[node.name]
            block_input = blocks[i][0].input[0]
            attention = next(name for name in node.input if name != block_input)
            inputs = [attention, block_input, *partitions[i]]
            unmerge, (restored,) = _splice(pieces["unmerge"], f"{PREFIX}{i}/unmerge/", inputs)
            nodes += unmerge
            node.input[list(node.input).index(attention)] = restored
        nodes.append(node)
        if node.name in by_norm:
            i = by_norm[node.name]
            partition_nodes, partitions[i] = _splice(
                pieces["partition"], f"{PREFIX}{i}/partition/", [node.input[0], *size, RATIO]
            )
            merge, (merged,) = _splice(pieces["merge"], f"{PREFIX}{i}/merge/", [node.output[0], *partitions[i]])
            nodes += partition_nodes + merge
            merged_inputs[node.output[0]] = merged
    for node in nodes:  # self-attention (and nothing else) reads the merged tokens
        if not node.name.startswith(PREFIX):
            node.input[:] = [merged_inputs.get(name, name) for name in node.input]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]  # recorded shapes (int8 graphs carry them) no longer hold for merged tokens
    return grown


def _grid_size(sample: str) -> tuple[list[onnx.NodeProto], list[str]]:
    """Nodes giving the latent height and width (0-d int64) from the UNet's `sample` input."""
    names = [f"{PREFIX}height", f"{PREFIX}width"]
    nodes = [onnx.helper.make_node("Shape", [sample], [f"{PREFIX}shape"], name=f"{PREFIX}Shape")]
    for axis, name in zip((2, 3), names, strict=True):
        index = onnx.helper.make_tensor(f"{name}_axis", onnx.TensorProto.INT64, [], [axis])
        nodes.append(onnx.helper.make_node("Constant", [], [f"{name}_axis"], name=f"{name}_axis", value=index))
        nodes.append(onnx.helper.make_node("Gather", [f"{PREFIX}shape", f"{name}_axis"], [name], name=name, axis=0))
    return nodes, names


def _splice(piece: onnx.GraphProto, prefix: str, inputs: list[str]) -> tuple[list[onnx.NodeProto], list[str]]:
    """`piece`'s nodes with its inputs bound to `inputs` and every other name under `prefix`; its outputs' names."""
    names = {p.name: actual for p, actual in zip(piece.input, inputs, strict=True)}

    def rename(name: str) -> str:
        return name if not name else names.setdefault(name, prefix + name)

    nodes = []
    for tensor in piece.initializer:  # constants the exporter folded: Constant nodes, so the piece is nodes only
        value = onnx.TensorProto()
        value.CopyFrom(tensor)
        nodes.append(
            onnx.helper.make_node("Constant", [], [rename(tensor.name)], name=prefix + tensor.name, value=value)
        )
    for node in piece.node:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.input[:] = [rename(n) for n in node.input]
        copy.output[:] = [rename(n) for n in node.output]
        copy.name = prefix + (node.name or node.output[0])
        nodes.append(copy)
    return nodes, [rename(o.name) for o in piece.output]


class _Function(torch.nn.Module):
    def __init__(self, function: Callable[..., object]) -> None:
        super().__init__()
        self.function = function

    def forward(self, *args: torch.Tensor) -> object:
        return self.function(*args)


@functools.cache
def _pieces(opset: int, dtype: torch.dtype) -> dict[str, onnx.GraphProto]:
    """The partition, merge and unmerge functions as ONNX graphs (every size dynamic), traced once."""
    tokens = torch.randn(2, 64, 8, dtype=dtype)
    grid, ratio = (torch.tensor(8), torch.tensor(8)), torch.tensor(0.5, dtype=torch.float64)
    where = partition(tokens, *grid, ratio)
    merged = merge_tokens(tokens, *where)
    axes_3d = {0: "batch", 1: "tokens", 2: "channels"}
    index_axes = {"src": {0: "n"}, "dst": {0: "n"}, **{k: {0: "batch", 1: "n"} for k in ("kept", "moved", "into")}}
    specs = {
        "partition": (partition, (tokens, *grid, ratio), ["x", "height", "width", "ratio"], list(PARTITION_OUTPUTS)),
        "merge": (merge_tokens, (tokens, *where), ["x", *PARTITION_OUTPUTS], ["merged"]),
        "unmerge": (unmerge_tokens, (merged, tokens, *where), ["y", "grid", *PARTITION_OUTPUTS], ["restored"]),
    }
    pieces = {}
    for name, (function, args, inputs, outputs) in specs.items():
        axes = {n: axes_3d for n in ("x", "y", "grid", "merged", "restored")}
        buffer = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                _Function(function),
                args, buffer, dynamo=False, opset_version=opset, input_names=inputs, output_names=outputs,
                dynamic_axes={**axes, **index_axes},
            )  # fmt: skip
        pieces[name] = onnx.load_from_string(buffer.getvalue()).graph
    return pieces


def check_token_merging(folder: Path, manifest: Manifest) -> dict[str, Any]:
    """At ratio 0 the token-merging graph must give the UNet's output (ExportError otherwise); at 0.5 it must
    differ from it. Returns both measurements.

    int8 graphs are held to finite outputs only: at ratio 0 the merge still reorders tokens, attention then sums
    in another order, and a last-bit change can flip an int8 rounding that a badly conditioned (random-weight)
    UNet amplifies: SD 1.5 with random weights moves by as much as its own int8 error. The grafting itself is
    held to the tight check on the fp32 graph it was grown from in the same way."""
    unet = open_session(folder / manifest.components["unet"].file)
    feeds = sample_feeds(unet, manifest, np.random.default_rng(0))
    expected = unet_output(unet, feeds).astype(np.float64)
    try:
        grown = open_session(folder / manifest.components[TOKEN_MERGING].file)
        at_zero = unet_output(grown, {**feeds, RATIO: np.array(0.0)})
        at_half = unet_output(grown, {**feeds, RATIO: np.array(0.5)})
    except Exception as exc:  # noqa: BLE001 - onnxruntime reports a graph it cannot run as several types
        raise ExportError(f"token merging: the grown graph does not run: {str(exc).strip().splitlines()[0]}") from exc
    diff, change = float(np.abs(at_zero - expected).max()), float(np.abs(at_half - expected).mean())
    strict = manifest.components["unet"].precision != "int8"
    if not np.isfinite(diff) or (strict and diff > TOLERANCE * max(1.0, float(np.abs(expected).max()))):
        raise ExportError(f"token merging: at ratio 0 the graph differs from the UNet by {diff:.3g}")
    if not change > 0:
        raise ExportError("token merging: at ratio 0.5 the graph gives the UNet's output; nothing was merged")
    return {
        "ratio_0_max_abs_diff": diff,
        "ratio_0.5_mean_abs_change": change,
        "reference": "the UNet graph",
        "ratio_0_checked": strict,
    }


def token_merging_folder(source: Path, output: Path, *, overwrite: bool = False, log: Log = print) -> Manifest:
    """Copy the export `source` to `output` with the token-merging UNet added, atomically."""
    if Manifest.load(Path(source).expanduser()).config.token_merging:
        raise ExportError(f"{source}: already has the token-merging UNet")
    return derive_folder(
        source, output, lambda folder, m: add_token_merging(folder, m, log), overwrite=overwrite, log=log
    )
