"""Where each LoRA-targetable weight of a component lives in its exported graph, so the torch-free runtime can
add a LoRA's low-rank update to it when a session is created (runtime/lora.py).

The exporter names most weights anonymously (`onnx::MatMul_1624`, stored transposed), so weights are found by
value: every Linear and Conv2d weight of the torch module is digested in each layout a graph can hold it in (a
MatMul's transposed matrix, Gemm's matrix, a Conv kernel) and matched with the graph's float initializers. The
map records, per module path (diffusers' and transformers' names, which LoRA files use), the initializer and
its layout, and for each initializer the file and byte offset of its data, its dtype and shape, so the runtime
reads base weights with NumPy alone.
"""

from __future__ import annotations

import hashlib
import json
import mmap
from contextlib import ExitStack
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import onnx
import torch

from sd_onnx.runtime.lora import TARGETS_FILE

Candidate = tuple[str, str]  # layout, digest
ONNX_DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16"}


def _digest(array: np.ndarray) -> str:
    array = np.ascontiguousarray(array, dtype=np.float32)
    return hashlib.sha1(repr(array.shape).encode() + array.tobytes()).hexdigest()


def weight_candidates(model: torch.nn.Module) -> dict[str, list[Candidate]]:
    """For each Linear and Conv2d of `model` (by module path): the digests of its weight in every layout."""
    found: dict[str, list[Candidate]] = {}
    for path, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            weight = module.weight.detach().float().numpy()
            found[path] = [("matmul", _digest(weight.T)), ("gemm", _digest(weight))]
        elif isinstance(module, torch.nn.Conv2d):
            found[path] = [("conv", _digest(module.weight.detach().float().numpy()))]
    return found


def map_weights(candidates: dict[str, list[Candidate]], model_file: Path) -> dict[str, list[dict[str, Any]]]:
    """Module path -> the initializers holding its weight, found by value in the fp32 graph `model_file`.
    Modules the graph does not hold are left out."""
    by_digest = {digest: name for name, digest in _initializer_digests(model_file).items()}
    modules = {}
    for path, options in candidates.items():
        found = [(layout, by_digest[digest]) for layout, digest in options if digest in by_digest]
        if found:
            modules[path] = [{"tensor": found[0][1], "layout": found[0][0]}]
    return modules


def write_targets(modules: dict[str, list[dict[str, Any]]], model_file: Path) -> Path | None:
    """Write TARGETS_FILE beside `model_file` (the final graph, fp32 or fp16): the module map and where each
    initializer's bytes are. Nothing is written when no module was found."""
    token = _token_embedding(model_file)
    wanted = {part["tensor"] for parts in modules.values() for part in parts} | ({token} if token else set())
    tensors = _locate(model_file, wanted)
    modules = {path: parts for path, parts in modules.items() if all(p["tensor"] in tensors for p in parts)}
    if not modules:
        return None
    targets: dict[str, Any] = {"modules": modules, "tensors": tensors}
    if token in tensors:  # textual-inversion embeddings extend this table at load (runtime/embeddings.py)
        targets["token_embedding"] = token
    out = model_file.parent / TARGETS_FILE
    out.write_text(json.dumps(targets, indent=1, sort_keys=True) + "\n")
    return out


def _token_embedding(model_file: Path) -> str | None:
    """The initializer a text encoder looks its input ids up in: the table of the Gather whose indices come
    from `input_ids` (through casts and reshapes); None for other graphs."""
    graph = onnx.load(str(model_file), load_external_data=False).graph
    initializers = {init.name for init in graph.initializer}
    producer = {output: node for node in graph.node for output in node.output}

    def from_ids(tensor: str, hops: int = 8) -> bool:
        while hops and tensor != "input_ids" and tensor in producer:
            tensor, hops = producer[tensor].input[0], hops - 1
        return tensor == "input_ids"

    for node in graph.node:
        if node.op_type == "Gather" and node.input[0] in initializers and from_ids(node.input[1]):
            return node.input[0]
    return None


def _initializer_digests(model_file: Path) -> dict[str, str]:
    model = onnx.load(str(model_file), load_external_data=False)
    digests = {}
    with ExitStack() as stack:
        files: dict[str, BinaryIO] = {}
        for init in model.graph.initializer:
            if init.data_type != onnx.TensorProto.FLOAT:
                continue
            external = {e.key: e.value for e in init.external_data}
            if external:
                name = external["location"]
                f = files.get(name) or files.setdefault(name, stack.enter_context(open(model_file.parent / name, "rb")))
                f.seek(int(external.get("offset", 0)))
                raw = f.read(int(external["length"]))
            else:
                raw = init.raw_data or np.asarray(init.float_data, np.float32).tobytes()
            digests[init.name] = _digest(np.frombuffer(raw, np.float32).reshape(tuple(init.dims)))
    return digests


def _locate(model_file: Path, names: set[str]) -> dict[str, dict[str, Any]]:
    """File, byte offset, dtype and shape of each named float initializer's data. Weights stored inside the
    .onnx file are found by their bytes, which protobuf writes contiguously, searching forward in the order the
    initializers are serialized (a copy of the same bytes elsewhere would hold the same values)."""
    model = onnx.load(str(model_file), load_external_data=False)
    located: dict[str, dict[str, Any]] = {}
    with open(model_file, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        cursor = 0
        for init in model.graph.initializer:
            if init.name not in names or init.data_type not in ONNX_DTYPES:
                continue
            entry = {"dtype": ONNX_DTYPES[init.data_type], "shape": list(init.dims)}
            external = {e.key: e.value for e in init.external_data}
            if external:
                located[init.name] = {**entry, "file": external["location"], "offset": int(external.get("offset", 0))}
            elif init.raw_data:
                found = data.find(init.raw_data, cursor)
                if found >= 0:
                    cursor = found + len(init.raw_data)
                    located[init.name] = {**entry, "file": model_file.name, "offset": found}
    return located
