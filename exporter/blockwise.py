"""Block-by-block export of a diffusion transformer, for models whose whole trace does not fit in memory or on disk.

Tracing a 4 B-parameter transformer whole holds the module and torch.onnx's copy of every weight at once (FLUX.2
[klein] 4B in bf16: 22.9 GB RSS, and its scratch filled 50 GB of disk). A transformer is mostly a list of alike
blocks (FLUX's double and single stream blocks, Z-Image's refiners and layers, SD3's and SANA's blocks), so:

1. Export pass (the trace inputs): the model runs with each block replaced by a stub that traces its block alone
   on the arguments it receives, into its own graph (one block's weights in flight; bf16 modules keep their
   weights bf16 behind a Cast, lean.py). The stub is called from inside the wrapper's forward, so the patches a
   wrapper applies there (FLUX's traceable rotary embedding) are in force for the block's trace too.
2. Check pass (the validation inputs): the model runs again for the whole-model reference, and each stub checks
   its block's graph against the block's PyTorch output on the arguments it gets there (another batch and size
   than the trace's): an error names the block.
3. Skeleton: the model is traced with each stub recorded as one opaque node (an autograd Function whose symbolic
   is a custom op), so the trace holds only the embedders and the output head.
4. Stitch: each opaque node is replaced by its block's nodes (names prefixed by the block's), and every weight is
   streamed, one tensor at a time, into the one data file of the final graph; each block's files are deleted once
   moved. Peak memory: the module plus one block's trace; peak disk: the graph plus one block.

The stitched graph is the same computation as the whole trace (the tests compare both with PyTorch); the runtime
cannot tell them apart.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx.external_data_helper import uses_external_data
from torch.nn.utils.parametrize import type_before_parametrizations
from torch.utils._pytree import tree_flatten, tree_unflatten

from .components import ComponentSpec, Inputs
from .errors import ExportError
from .lean import widen_graph
from .trace import EXTERNAL_DATA_SUFFIX, append_external, pack_graph, trace_component
from .validate import open_session

BLOCK_DOMAIN = "sd_onnx.block"
Call = Callable[..., tuple[list[torch.Tensor], Any]]


def block_lists(module: torch.nn.Module) -> list[tuple[str, torch.nn.ModuleList]]:
    """The module's lists of repeated blocks: every outermost ModuleList of modules of one class, each
    holding parameters (FLUX's `transformer_blocks` and `single_transformer_blocks`, Z-Image's `layers`...)."""
    found: list[tuple[str, torch.nn.ModuleList]] = []
    for name, child in module.named_modules():
        if not isinstance(child, torch.nn.ModuleList) or not len(child):
            continue
        if any(name.startswith(outer + ".") for outer, _ in found):
            continue
        alike = len({type_before_parametrizations(m) for m in child}) == 1  # float32_compute re-classes modules
        if alike and all(next(m.parameters(), None) is not None for m in child):
            found.append((name, child))
    return found


class _Stub(torch.nn.Module):
    """Stands in for one block. Its block is kept out of the module tree (a plain attribute), so that the
    skeleton's trace records none of the block's weights."""

    def __init__(self, name: str, block: torch.nn.Module, run: _Run) -> None:
        super().__init__()
        object.__setattr__(self, "block", block)
        self.block_name, self.run = name, run
        self.outputs: list[torch.Tensor] = []  # the export pass's tensor outputs: their count, dtypes and ranks
        self.out_leaves: list[Any] = []  # all it returned, flattened (SD3's last block returns a None too)
        self.out_spec: Any = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        leaves, structure = tree_flatten((args, kwargs))
        positions = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]

        def arguments(tensors: tuple[torch.Tensor, ...]) -> tuple[tuple, dict]:
            filled = list(leaves)
            for position, tensor in zip(positions, tensors, strict=True):
                filled[position] = tensor
            return tree_unflatten(filled, structure)

        return self.run.step(self, tuple(leaves[i] for i in positions), arguments)


class _BlockCall(torch.nn.Module):
    """One block as a module of tensors in, tensors out: what its graph is traced from."""

    def __init__(self, block: torch.nn.Module, arguments: Callable[[tuple], tuple[tuple, dict]]) -> None:
        super().__init__()
        self.block = block
        self.arguments = arguments

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        args, kwargs = self.arguments(tensors)
        return _tensors(self.block(*args, **kwargs))


def _tensors(out: Any) -> tuple[torch.Tensor, ...]:
    return tuple(leaf for leaf in tree_flatten(out)[0] if isinstance(leaf, torch.Tensor))


class _Opaque(torch.autograd.Function):
    """A block in the skeleton's trace, recorded as one `sd_onnx.block::Block` node. The skeleton is traced on the
    export pass's inputs, so the block's outputs are the ones that pass computed: given back, not recomputed (the
    tracer records a Function's body too, and a block's would be its whole computation)."""

    @staticmethod
    def forward(ctx: Any, stub: _Stub, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(t.clone() for t in stub.outputs)

    @staticmethod
    def symbolic(g: Any, stub: _Stub, *tensors: Any) -> Any:
        outputs = g.op(f"{BLOCK_DOMAIN}::Block", *tensors, block_s=stub.block_name, outputs=len(stub.outputs))
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        for value, example in zip(outputs, stub.outputs, strict=True):  # dtype and rank; every size left symbolic
            value.setType(torch._C.TensorType.create_from_tensor(example).with_sizes([None] * example.dim()))
        return outputs if len(outputs) > 1 else outputs[0]


class _Run:
    """The pass the stubs are in, and what they leave behind: block graphs and their checks."""

    def __init__(self, scratch: Path, opset: int, narrow: bool, atol: float) -> None:
        self.scratch, self.opset, self.narrow, self.atol = scratch, opset, narrow, atol
        self.mode = "export"
        self.graphs: dict[str, Path] = {}
        self.max_abs_diff: dict[str, float] = {}

    def step(self, stub: _Stub, tensors: tuple[torch.Tensor, ...], arguments: Callable) -> Any:
        if self.mode == "skeleton":
            flat = _Opaque.apply(stub, *tensors)
            computed = iter(flat if isinstance(flat, tuple) else (flat,))
            leaves = [next(computed) if isinstance(leaf, torch.Tensor) else leaf for leaf in stub.out_leaves]
            return tree_unflatten(leaves, stub.out_spec)
        args, kwargs = arguments(tensors)
        out = stub.block(*args, **kwargs)
        if self.mode == "export":
            stub.out_leaves, stub.out_spec = tree_flatten(out)
            stub.outputs = [t.detach() for t in _tensors(out)]
            self.graphs[stub.block_name] = self._export(stub, tensors, arguments)
        else:
            self._check(stub.block_name, tensors, list(_tensors(out)))
        return out

    def _export(self, stub: _Stub, tensors: tuple[torch.Tensor, ...], arguments: Callable) -> Path:
        names = tuple(f"in{i}" for i in range(len(tensors)))
        outputs = tuple(f"out{j}" for j in range(len(stub.outputs)))
        examples = (*tensors, *stub.outputs)  # every axis dynamic: a block's shapes come from the request's
        dynamic = {n: {a: f"{n}_{a}" for a in range(t.dim())} for n, t in zip(names + outputs, examples, strict=True)}
        spec = ComponentSpec(stub.block_name, names, outputs, dynamic, load=None, sample_inputs=None)  # type: ignore[arg-type]
        folder = self.scratch / "blocks" / stub.block_name
        with torch.no_grad():
            traced = trace_component(_BlockCall(stub.block, arguments), spec, tensors, folder / "_trace", self.opset,
                                     fold_constants=not self.narrow)  # fmt: skip
        finish(traced, folder / "model.onnx", self.narrow)
        return folder / "model.onnx"

    def _check(self, name: str, tensors: tuple[torch.Tensor, ...], reference: list[torch.Tensor]) -> None:
        session = open_session(self.graphs[name])
        wanted = {i.name for i in session.get_inputs()}
        feeds = {f"in{i}": t.numpy() for i, t in enumerate(tensors) if f"in{i}" in wanted}
        outputs = session.run(None, feeds)
        diff = max(float(np.max(np.abs(o - r.float().numpy()))) for o, r in zip(outputs, reference, strict=True))
        self.max_abs_diff[name] = diff
        if not np.isfinite(diff) or diff > self.atol:
            raise ExportError(f"block {name}: ONNX output differs from PyTorch by {diff:.3g} (> --atol {self.atol:g})")


def finish(traced: Path, out_file: Path, narrow: bool) -> None:
    """A traced graph moved to `out_file` with its weights in one data file: bf16/fp16 weights kept narrow behind a
    Cast (lean.widen_graph), fp32 ones as they are (trace.pack_graph)."""
    out_file.parent.mkdir(parents=True, exist_ok=True)
    if narrow:
        widen_graph(traced, out_file)
    else:
        pack_graph(traced, out_file)


@contextmanager
def _stubbed(module: torch.nn.Module, run: _Run) -> Iterator[list[_Stub]]:
    """Each block of the module's block lists replaced by a stub for the duration; the blocks put back after."""
    lists = block_lists(module)
    if not lists:
        raise ExportError(f"{type(module).__name__}: has no list of repeated blocks to export one by one")
    stubs = []
    for list_name, blocks in lists:
        for i, block in enumerate(blocks):
            stubs.append(_Stub(f"{list_name}.{i}", block, run))
            blocks[i] = stubs[-1]
    try:
        yield stubs
    finally:
        for _, blocks in lists:
            for i, stub in enumerate(blocks):
                blocks[i] = stub.block


def trace_by_blocks(
    module: torch.nn.Module,
    spec: ComponentSpec,
    trace_inputs: Inputs,
    check_inputs: Inputs,
    scratch: Path,
    out_file: Path,
    opset: int,
    atol: float,
    narrow: bool,
) -> tuple[list[np.ndarray], dict[str, Any]]:
    """Export `module` to `out_file` block by block (see the module docstring); returns the whole module's
    reference outputs on `check_inputs` and the per-block validation (largest difference and where)."""
    run = _Run(scratch, opset, narrow, atol)
    with torch.no_grad(), _stubbed(module, run) as stubs:
        module(*trace_inputs)
        run.mode = "check"
        reference = module(*check_inputs)
        run.mode = "skeleton"
        skeleton = trace_component(module, spec, trace_inputs, scratch / "skeleton" / "_trace", opset,
                                   fold_constants=not narrow)  # fmt: skip
    finish(skeleton, scratch / "skeleton" / "model.onnx", narrow)
    stitch(scratch / "skeleton" / "model.onnx", run.graphs, out_file)
    shutil.rmtree(scratch)
    reference = [t.float().numpy() for t in (reference if isinstance(reference, tuple) else (reference,))]
    worst = max(run.max_abs_diff, key=run.max_abs_diff.__getitem__)
    return reference, {"count": len(stubs), "max_abs_diff": run.max_abs_diff[worst], "worst": worst}


def stitch(skeleton_file: Path, blocks: dict[str, Path], out_file: Path) -> None:
    """Replace each Block node of the skeleton by its block's graph and stream every weight into `out_file`'s one
    data file, deleting each block's folder once its weights are moved."""
    model = onnx.load(str(skeleton_file), load_external_data=False)
    data_name = out_file.name + EXTERNAL_DATA_SUFFIX
    nodes: list[onnx.NodeProto] = []
    initializers: list[onnx.TensorProto] = []
    with open(out_file.parent / data_name, "wb") as data:
        for tensor in model.graph.initializer:
            initializers.append(_move(tensor, skeleton_file.parent, data, data_name))
        for node in model.graph.node:
            if node.domain != BLOCK_DOMAIN:
                nodes.append(node)
                continue
            name = onnx.helper.get_attribute_value(node.attribute[0]).decode()
            block = onnx.load(str(blocks[name]), load_external_data=False)
            inline, weights = _inline(block.graph, node, name)
            nodes += inline
            initializers += [_move(t, blocks[name].parent, data, data_name) for t in weights]
            shutil.rmtree(blocks[name].parent)
    model.graph.ClearField("node")
    model.graph.node.extend(nodes)
    model.graph.ClearField("initializer")
    model.graph.initializer.extend(initializers)
    model.graph.ClearField("value_info")  # the skeleton's types around the Block nodes: onnxruntime infers them
    kept = [o for o in model.opset_import if o.domain != BLOCK_DOMAIN]
    model.ClearField("opset_import")
    model.opset_import.extend(kept)
    onnx.save_model(model, str(out_file))
    if not (out_file.parent / data_name).stat().st_size:
        (out_file.parent / data_name).unlink()


def _inline(graph: onnx.GraphProto, call: onnx.NodeProto, prefix: str) -> tuple[list[onnx.NodeProto], list]:
    """The block graph's nodes and weights, renamed into the caller's graph: its inputs `in{i}` are the Block
    node's inputs, its outputs `out{j}` the node's outputs, every other tensor prefixed by the block's name, and
    its nodes named as a whole trace names them (`/model/transformer_blocks.1/...`)."""
    scope = node_scope(prefix)
    renamed = {f"in{i}": name for i, name in enumerate(call.input)}
    renamed.update({f"out{j}": name for j, name in enumerate(call.output)})

    def name_of(value: str) -> str:
        return renamed.get(value, f"{prefix}/{value}") if value else value

    nodes = []
    for node in graph.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise ExportError(f"block {prefix}: has control flow ({node.op_type}), which blocks cannot inline")
        node.input[:] = [name_of(v) for v in node.input]
        node.output[:] = [name_of(v) for v in node.output]
        inner = node.name.removeprefix("/block") if node.name.startswith("/block/") else f"/{node.name}"
        node.name = scope + inner
        nodes.append(node)
    weights = list(graph.initializer)
    for tensor in weights:
        tensor.name = name_of(tensor.name)
    return nodes, weights


def node_scope(module_path: str) -> str:
    """A module's path as torch.onnx names the nodes under it: `model.transformer_blocks.1` ->
    `/model/transformer_blocks.1` (a whole trace's node names; derived graphs find a block by them)."""
    parts: list[str] = []
    for part in module_path.split("."):
        if part.isdigit() and parts:
            parts[-1] += f".{part}"
        else:
            parts.append(part)
    return "/" + "/".join(parts)


def _move(tensor: onnx.TensorProto, folder: Path, data: Any, location: str) -> onnx.TensorProto:
    """`tensor`, its bytes appended to `data` if they lie in a file in `folder`."""
    if uses_external_data(tensor):
        append_external(tensor, folder, data, location)
    return tensor
