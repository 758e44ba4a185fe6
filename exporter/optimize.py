"""Graph rewrites for CPUs, made at export before each graph is validated against PyTorch: attention fusion,
the GEGLU split (see `split_geglu`) and, in VAE graphs, group norms by channel chunks (see
`chunk_group_norms`).

Attention fusion: scaled-dot-product attention, as torch's exporter decomposes it, becomes one
onnxruntime `MultiHeadAttention` (com.microsoft) node with separate Q, K, V inputs.

Why our own pass: onnxruntime's transformer optimizer fuses UNet self-attention into the `Attention`
operator (QKV weights inside it, so they can no longer be int8) or into packed-QKV `MultiHeadAttention`,
which its CPU provider does not implement; and on SD 1.5 its fused fp32 UNet was no faster here
(7.2-7.4 s vs 7.0-8.1 s per step). `MultiHeadAttention` with separate Q/K/V runs on CPU with a tiled
(flash-style) kernel: 0.23 s against 0.37 s for the decomposed MatMul-Softmax-MatMul at SD 1.5's 64x64
level (4,096 tokens), and the Q/K/V/out projections stay ordinary MatMuls that int8 can quantize.

The pattern (per attention, drawn from the export):

    q = MatMul(x, Wq) -> Reshape[B,S,H,d] -> Transpose(0,2,1,3) -> Mul(sqrt(scale)) --.
    k = MatMul(c, Wk) -> Reshape[B,T,H,d] -> Transpose(0,2,3,1) -> Mul(sqrt(scale)) --MatMul -> Softmax --.
    v = MatMul(c, Wv) -> Reshape[B,T,H,d] -> Transpose(0,2,1,3) ---------------------------------------MatMul
        -> Transpose(0,2,1,3) -> Reshape[B,S,H*d]

is replaced by MultiHeadAttention(q, k, v, num_heads=H); its default scale 1/sqrt(d) is SDPA's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

MS_DOMAIN = "com.microsoft"


class _Graph:
    """Producer/consumer maps over a graph's nodes."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.initializers = {init.name: init for init in graph.initializer}
        self.dims = {name: list(init.dims) for name, init in self.initializers.items()}
        self.producer = {out: node for node in graph.node for out in node.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)

    def parent(self, node: onnx.NodeProto, index: int, op_type: str) -> onnx.NodeProto | None:
        found = self.producer.get(node.input[index]) if index < len(node.input) else None
        return found if found is not None and found.op_type == op_type else None

    def only_child(self, node: onnx.NodeProto, op_type: str) -> onnx.NodeProto | None:
        children = self.consumers.get(node.output[0], [])
        return children[0] if len(children) == 1 and children[0].op_type == op_type else None

    def array(self, name: str) -> np.ndarray | None:
        """The value of an initializer or Constant output (or an Identity of one, as torch shares equal weights),
        None for a computed tensor."""
        node = self.producer.get(name)
        if node is not None and node.op_type == "Identity":
            return self.array(node.input[0])
        if node is not None:
            return numpy_helper.to_array(node.attribute[0].t) if node.op_type == "Constant" else None
        init = self.initializers.get(name)
        if init is None or init.data_location == onnx.TensorProto.EXTERNAL:  # weights left on disk: not read here
            return None
        return numpy_helper.to_array(init)

    def constant(self, name: str) -> int | None:
        value = self.array(name)
        return int(value.reshape(-1)[0]) if value is not None else None


def _perm(node: onnx.NodeProto | None, perm: list[int]) -> bool:
    return node is not None and list(helper.get_attribute_value(node.attribute[0])) == perm


def _scaled_scores(g: _Graph, softmax: onnx.NodeProto) -> tuple[onnx.NodeProto, ...] | None:
    """Around `softmax`: the scores MatMul, the MatMul mixing the values by it, and the scale Muls on the query
    and key sides (None where a side has none); None when `softmax` is not between two MatMuls."""
    scores = g.parent(softmax, 0, "MatMul")
    mixed = g.only_child(softmax, "MatMul")
    if scores is None or mixed is None or mixed.input[0] != softmax.output[0]:
        return None
    return scores, mixed, g.parent(scores, 0, "Mul"), g.parent(scores, 1, "Mul")


def _match(g: _Graph, softmax: onnx.NodeProto) -> tuple[list[onnx.NodeProto], onnx.NodeProto] | None:
    """The nodes of one decomposed attention around `softmax`, and its MultiHeadAttention replacement."""
    around = _scaled_scores(g, softmax)
    if around is None:
        return None
    scores, mixed, mul_q, mul_k = around
    t_q = mul_q and g.parent(mul_q, 0, "Transpose")
    t_k = mul_k and g.parent(mul_k, 0, "Transpose")
    t_v = g.parent(mixed, 1, "Transpose")
    if not (_perm(t_q, [0, 2, 1, 3]) and _perm(t_k, [0, 2, 3, 1]) and _perm(t_v, [0, 2, 1, 3])):
        return None
    r_q, r_k, r_v = (g.parent(t, 0, "Reshape") for t in (t_q, t_k, t_v))
    t_out = g.only_child(mixed, "Transpose")
    r_out = t_out and g.only_child(t_out, "Reshape")
    if None in (r_q, r_k, r_v, r_out) or not _perm(t_out, [0, 2, 1, 3]):
        return None
    shape = g.producer.get(r_q.input[1])
    heads = g.constant(shape.input[2]) if shape is not None and shape.op_type == "Concat" else None
    if not heads:
        return None
    fused = helper.make_node(
        "MultiHeadAttention",
        [r_q.input[0], r_k.input[0], r_v.input[0]],
        [r_out.output[0]],
        name=softmax.name.replace("Softmax", "MultiHeadAttention"),
        domain=MS_DOMAIN,
        num_heads=heads,
    )
    return [r_q, t_q, mul_q, r_k, t_k, mul_k, r_v, t_v, scores, softmax, mixed, t_out, r_out], fused


def _match_heads_first(
    g: _Graph, softmax: onnx.NodeProto
) -> tuple[list[onnx.NodeProto], list[onnx.NodeProto], list[onnx.TensorProto]] | None:
    """Scaled-dot-product attention on [B, heads, S, d] tensors, however they were made (the transformers' query/key
    norms, rotary embeddings, text and image tokens concatenated; the head count often left -1 in the graph):

        Softmax(MatMul(Mul(q, s), Mul(Transpose(x, P), s))) @ v,   with Transpose(x, P) = k transposed to [B, h, d, L]

    becomes MultiHeadAttention with one head over batch x heads: q, k, v reshaped to [B x heads, S, d], the output
    reshaped to q's shape. The scores, Softmax and scale arithmetic are removed."""
    around = _scaled_scores(g, softmax)
    if around is None:
        return None
    scores, mixed, mul_q, mul_k = around
    t_k = mul_k and g.parent(mul_k, 0, "Transpose")
    if mul_q is None or t_k is None:
        return None
    perm = list(helper.get_attribute_value(t_k.attribute[0]))
    if len(perm) != 4:
        return None
    removed = [mul_q, t_k, mul_k, scores, softmax]
    if any(len(g.consumers.get(n.output[0], [])) != 1 for n in removed):
        return None
    name = softmax.name.replace("Softmax", "MultiHeadAttention") or f"MultiHeadAttention_{softmax.output[0]}"
    constants = [numpy_helper.from_array(np.array(v, np.int64), f"{name}/{n}") for n, v in
                 (("minus_one", [-1]), ("two", [2]), ("four", [4]))]  # fmt: skip
    nodes, k = [], t_k.input[0]
    keys_first = [perm[0], perm[1], perm[3], perm[2]]  # k as [B, heads, L, d]: P with its last two axes swapped
    if keys_first != [0, 1, 2, 3]:
        k = f"{name}/k_heads_first"
        nodes.append(helper.make_node("Transpose", [t_k.input[0]], [k], perm=keys_first))
    flat = []
    for x, heads_first in (("q", mul_q.input[0]), ("k", k), ("v", mixed.input[1])):
        shape, sd, target, out = (f"{name}/{x}_{part}" for part in ("shape", "sd", "target", "flat"))
        nodes += [
            helper.make_node("Shape", [heads_first], [shape]),
            helper.make_node("Slice", [shape, f"{name}/two", f"{name}/four"], [sd]),
            helper.make_node("Concat", [f"{name}/minus_one", sd], [target], axis=0),
            helper.make_node("Reshape", [heads_first, target], [out]),
        ]
        flat.append(out)
    nodes.append(helper.make_node("MultiHeadAttention", flat, [f"{name}/out"], name=name, domain=MS_DOMAIN,
                                  num_heads=1))  # fmt: skip
    nodes.append(helper.make_node("Reshape", [f"{name}/out", f"{name}/q_shape"], [mixed.output[0]]))
    for node in nodes:  # named under the attention's scope, as derived graphs find a block's nodes by name
        node.name = node.name or f"{name}/{node.output[0].rsplit('/', 1)[-1]}_{node.op_type}"
    return [*removed, mixed], nodes, constants


def fuse_attention(model: onnx.ModelProto) -> int:
    """Replace every decomposed attention in `model` (in place); returns how many were fused."""
    g = _Graph(model.graph)
    replaced: set[int] = set()
    inserted: dict[int, list[onnx.NodeProto]] = {}
    for node in list(model.graph.node):
        if node.op_type != "Softmax":
            continue
        found = _match(g, node)
        if found is not None:
            old, new = found
            replaced.update(id(n) for n in old)
            inserted[id(old[-1])] = [new]  # where the attention's output used to be produced
            continue
        general = _match_heads_first(g, node)
        if general is not None:
            old, nodes, shapes = general
            replaced.update(id(n) for n in old)
            inserted[id(old[-1])] = nodes
            model.graph.initializer.extend(shapes)
    if inserted:
        _rewrite(model.graph, replaced, inserted)
        if not any(o.domain == MS_DOMAIN for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return len(inserted)


def _geglu_halves(g: _Graph, add: onnx.NodeProto) -> tuple[onnx.NodeProto, int, list[onnx.NodeProto]] | None:
    """For `add` = MatMul(x, W) + b whose output only feeds (besides Shape) two last-axis Slices, as GEGLU's
    `chunk(2, dim=-1)` exports: (the MatMul, b's input index, [first-half Slice, second-half Slice])."""
    bias_index = next((i for i, name in enumerate(add.input) if len(g.dims.get(name, [])) == 1), None)
    matmul = g.parent(add, 1 - bias_index, "MatMul") if bias_index is not None else None
    if matmul is None or len(g.dims.get(matmul.input[1], [])) != 2 or len(g.consumers[matmul.output[0]]) != 1:
        return None
    width = g.dims[matmul.input[1]][1]
    users = [n for n in g.consumers.get(add.output[0], []) if n.op_type != "Shape"]
    if width % 2 or len(users) != 2 or any(n.op_type != "Slice" or n.input[0] != add.output[0] for n in users):
        return None
    if any(len(n.input) < 4 or g.constant(n.input[3]) != -1 for n in users):
        return None
    starts = [g.constant(n.input[1]) for n in users]
    if 0 not in starts:
        return None
    first = users[starts.index(0)]
    second = users[1 - starts.index(0)]
    # chunk(2) computes the middle from the shape at run time; where it is a constant, it must be the middle.
    if g.constant(first.input[2]) not in (None, width // 2) or g.constant(second.input[1]) not in (None, width // 2):
        return None
    return matmul, bias_index, [first, second]


def split_geglu(model: onnx.ModelProto) -> int:
    """Give each GEGLU projection two MatMuls, one per half, in place; returns how many were split.

    GEGLU projects to twice the width and chunks the result into value and gate: two Slices that copy the
    whole projection once more (64 Slices, 0.15 s of a 4 s SD 1.5 int8 step). Slicing the weight and bias
    instead (constants: onnxruntime folds them at load, and the quantizer sees two ordinary weight MatMuls)
    computes the same halves directly; the gate's bias Add then fuses with its Gelu into onnxruntime's BiasGelu.
    """
    g = _Graph(model.graph)
    replaced: set[int] = set()
    inserted: dict[int, list[onnx.NodeProto]] = {}
    for add in list(model.graph.node):
        found = _geglu_halves(g, add) if add.op_type == "Add" else None
        if found is None:
            continue
        matmul, bias_index, slices = found
        weight, bias = matmul.input[1], add.input[bias_index]
        width = g.dims[weight][1]
        halves = ((0, width // 2), (width // 2, width))
        nodes = []
        for half, (piece, (start, end)) in enumerate(zip(slices, halves, strict=True)):
            tag = f"{matmul.name}_half{half}"
            bounds = [
                numpy_helper.from_array(np.array([v], np.int64), f"{tag}_{k}")
                for k, v in (("start", start), ("end", end), ("axis", -1))
            ]
            model.graph.initializer.extend(bounds)
            nodes += [
                helper.make_node("Slice", [weight, *(b.name for b in bounds)], [f"{tag}_weight"], name=f"{tag}_weight"),
                helper.make_node("Slice", [bias, *(b.name for b in bounds)], [f"{tag}_bias"], name=f"{tag}_bias"),
                helper.make_node("MatMul", [matmul.input[0], f"{tag}_weight"], [f"{tag}_out"], name=tag),
                helper.make_node("Add", [f"{tag}_out", f"{tag}_bias"], [piece.output[0]], name=f"{tag}_add"),
            ]
        replaced.update(id(n) for n in (matmul, add, *slices))
        inserted[id(add)] = nodes
    if inserted:
        _rewrite(model.graph, replaced, inserted)
    return len(inserted)


@dataclass
class _GroupNorm:
    """One group norm as torch exports it, with the SiLU that follows if any, and the constants it reads."""

    nodes: list[onnx.NodeProto]
    groups: int
    gamma: np.ndarray  # (C, 1, ...)
    beta: np.ndarray
    epsilon: float


def _group_norm(g: _Graph, norm: onnx.NodeProto) -> _GroupNorm | None:
    """The group norm around `norm`: Reshape[0, G, -1] -> InstanceNormalization -> Reshape(Shape(x)) -> Mul(gamma)
    -> Add(beta) [-> Sigmoid, Mul]."""
    reshape = g.parent(norm, 0, "Reshape")
    target = g.array(reshape.input[1]) if reshape is not None else None
    if target is None or len(target) != 3 or target.tolist()[::2] != [0, -1]:
        return None
    back = g.only_child(norm, "Reshape")
    scale = back and g.only_child(back, "Mul")
    shift = scale and g.only_child(scale, "Add")
    gamma = g.array(scale.input[1]) if shift is not None else None
    beta = g.array(shift.input[1]) if shift is not None else None
    per_channel = gamma is not None and gamma.ndim >= 2 and gamma.size == gamma.shape[0]
    if not per_channel or beta is None or beta.shape != gamma.shape:
        return None
    nodes = [reshape, norm, back, scale, shift]
    users = g.consumers.get(shift.output[0], [])
    sigmoid = next((n for n in users if n.op_type == "Sigmoid"), None)
    silu = sigmoid and g.only_child(sigmoid, "Mul")
    if len(users) == 2 and silu in users and set(silu.input) == {shift.output[0], sigmoid.output[0]}:
        nodes += [sigmoid, silu]
    epsilon = next((a.f for a in norm.attribute if a.name == "epsilon"), 1e-5)
    return _GroupNorm(nodes, int(target[1]), gamma, beta, epsilon)


def _chunk_nodes(norm: _GroupNorm, parts: int) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """`norm` computed on `parts` channel slices and concatenated: (nodes, new initializers)."""
    groups, width = norm.groups // parts, norm.gamma.shape[0] // parts
    x = norm.nodes[0].input[0]
    tag = norm.nodes[1].name.rsplit("/", 1)[0] + "/chunk"
    arrays = {
        f"{tag}_axis": np.array([1], np.int64),
        f"{tag}_shape": np.array([0, groups, -1], np.int64),
        f"{tag}_ones": np.ones(groups, np.float32),
        f"{tag}_zeros": np.zeros(groups, np.float32),
    }
    nodes, pieces = [], []
    for i in range(parts):
        p = f"{tag}{i}"
        channels = slice(i * width, (i + 1) * width)
        arrays |= {
            f"{p}_start": np.array([i * width], np.int64),
            f"{p}_end": np.array([(i + 1) * width], np.int64),
            f"{p}_gamma": norm.gamma[channels],
            f"{p}_beta": norm.beta[channels],
        }
        nodes += [
            helper.make_node("Slice", [x, f"{p}_start", f"{p}_end", f"{tag}_axis"], [f"{p}_x"], name=f"{p}/Slice"),
            helper.make_node("Reshape", [f"{p}_x", f"{tag}_shape"], [f"{p}_grouped"], name=f"{p}/Reshape"),
            helper.make_node(
                "InstanceNormalization",
                [f"{p}_grouped", f"{tag}_ones", f"{tag}_zeros"],
                [f"{p}_normed"],
                name=f"{p}/InstanceNormalization",
                epsilon=norm.epsilon,
            ),
            helper.make_node("Shape", [f"{p}_x"], [f"{p}_shape"], name=f"{p}/Shape"),
            helper.make_node("Reshape", [f"{p}_normed", f"{p}_shape"], [f"{p}_back"], name=f"{p}/Reshape_1"),
            helper.make_node("Mul", [f"{p}_back", f"{p}_gamma"], [f"{p}_scaled"], name=f"{p}/Mul"),
            helper.make_node("Add", [f"{p}_scaled", f"{p}_beta"], [f"{p}_y"], name=f"{p}/Add"),
        ]
        if len(norm.nodes) > 5:  # SiLU
            nodes += [
                helper.make_node("Sigmoid", [f"{p}_y"], [f"{p}_gate"], name=f"{p}/Sigmoid"),
                helper.make_node("Mul", [f"{p}_y", f"{p}_gate"], [f"{p}_silu"], name=f"{p}/SiLU"),
            ]
        pieces.append(nodes[-1].output[0])
    nodes.append(helper.make_node("Concat", pieces, [norm.nodes[-1].output[0]], name=f"{tag}/Concat", axis=1))
    return nodes, [numpy_helper.from_array(np.asarray(v), k) for k, v in arrays.items()]


def chunk_group_norms(model: onnx.ModelProto, parts: int = 4) -> int:
    """Compute each group norm (and the SiLU after it) on `parts` channel slices, in place; returns how many.

    A VAE decoder's full-resolution group norms hold their input, the normalized tensor and its SiLU at once
    (256 MB each for SD 1.5 at 512x512, 256 channels); by slices, only one slice's temporaries live beside the
    input. A group norm's statistics are per group, and the slices hold whole groups, so every value is computed
    from the same numbers: the output is bit for bit the same (SD 1.5's int8 decoder at 512x512: max difference
    0), up to float rounding where a group's start lands differently against the vector width. onnxruntime
    runs each slice's chain to its end before the next (it orders nodes depth-first from the outputs). The int8
    recipe then quantizes each slice before the Concat (`quantize_before_concat`), so the full tensor exists
    only in 8 bits.
    """
    g = _Graph(model.graph)
    replaced: set[int] = set()
    inserted: dict[int, list[onnx.NodeProto]] = {}
    for node in list(model.graph.node):
        norm = _group_norm(g, node) if node.op_type == "InstanceNormalization" else None
        count = next((k for k in range(parts, 1, -1) if norm.groups % k == 0), 1) if norm else 1
        if count == 1:
            continue
        nodes, arrays = _chunk_nodes(norm, count)
        model.graph.initializer.extend(arrays)
        replaced.update(id(n) for n in norm.nodes)
        inserted[id(norm.nodes[-1])] = nodes
    if inserted:
        _rewrite(model.graph, replaced, inserted)
        _remove_unused_initializers(model.graph)  # the whole-width gammas and betas
    return len(inserted)


def unchunk_group_norms(model: onnx.ModelProto) -> int:
    """Undo `chunk_group_norms` in place: each chunked group norm computed whole again, as torch exports it;
    returns how many. The chunks save memory on onnxruntime, but OpenVINO runs a whole group norm as one fused
    kernel, and the chunked one costs it 1.45x in an SD 1.5 decoder on an AMD Zen and 4.7x on a Xeon with AMX
    (docs/performance.md), so the float decoder
    kept for OpenVINO beside the int8 one (quantize_folder.keep_float_decoder) is whole again."""
    g = _Graph(model.graph)
    replaced: set[int] = set()
    inserted: dict[int, list[onnx.NodeProto]] = {}
    for concat in list(model.graph.node):
        if concat.op_type != "Concat" or not concat.name.endswith("/chunk/Concat"):
            continue
        tag = concat.name.removesuffix("/Concat")
        pieces = [n for n in model.graph.node if n.name.startswith(tag) and n is not concat]
        arrays = [g.array(f"{tag}{i}_{k}") for i in range(len(concat.input)) for k in ("gamma", "beta")]
        shape, norm = g.array(f"{tag}_shape"), next((n for n in pieces if n.op_type == "InstanceNormalization"), None)
        if shape is None or norm is None or any(a is None for a in arrays):
            continue
        parts, name = len(concat.input), tag.removesuffix("/chunk")
        groups = int(shape[1]) * parts
        constants = {
            f"{name}/whole_shape": np.array([0, groups, -1], np.int64),
            f"{name}/whole_ones": np.ones(groups, np.float32),
            f"{name}/whole_zeros": np.zeros(groups, np.float32),
            f"{name}/whole_gamma": np.concatenate(arrays[0::2]),
            f"{name}/whole_beta": np.concatenate(arrays[1::2]),
        }
        model.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in constants.items())
        first = next(n for n in pieces if n.name == f"{tag}0/Slice")
        x, epsilon = first.input[0], next((a.f for a in norm.attribute if a.name == "epsilon"), 1e-5)
        silu = any(n.name.endswith("/SiLU") for n in pieces)
        affine = f"{name}/whole_affine" if silu else concat.output[0]
        nodes = [
            helper.make_node(
                "Reshape", [x, f"{name}/whole_shape"], [f"{name}/whole_grouped"], name=f"{name}/whole/Reshape"
            ),
            helper.make_node(
                "InstanceNormalization",
                [f"{name}/whole_grouped", f"{name}/whole_ones", f"{name}/whole_zeros"],
                [f"{name}/whole_normed"],
                name=f"{name}/whole/InstanceNormalization",
                epsilon=epsilon,
            ),
            helper.make_node("Shape", [x], [f"{name}/whole_shape_x"], name=f"{name}/whole/Shape"),
            helper.make_node(
                "Reshape",
                [f"{name}/whole_normed", f"{name}/whole_shape_x"],
                [f"{name}/whole_back"],
                name=f"{name}/whole/Reshape_1",
            ),  # fmt: skip
            helper.make_node(
                "Mul", [f"{name}/whole_back", f"{name}/whole_gamma"], [f"{name}/whole_scaled"], name=f"{name}/whole/Mul"
            ),  # fmt: skip
            helper.make_node("Add", [f"{name}/whole_scaled", f"{name}/whole_beta"], [affine], name=f"{name}/whole/Add"),
        ]
        if silu:
            nodes += [
                helper.make_node("Sigmoid", [affine], [f"{name}/whole_gate"], name=f"{name}/whole/Sigmoid"),
                helper.make_node("Mul", [affine, f"{name}/whole_gate"], [concat.output[0]], name=f"{name}/whole/SiLU"),
            ]
        replaced.update(id(n) for n in (*pieces, concat))
        inserted[id(concat)] = nodes
    if inserted:
        _rewrite(model.graph, replaced, inserted)
        _remove_unused_initializers(model.graph)
    return len(inserted)


def quantize_before_concat(model: onnx.ModelProto) -> int:
    """Where a Concat's only reader is a per-tensor QuantizeLinear, quantize each input instead, in place;
    returns how many. Quantizing is element by element, so the int8 result is the same, and the float tensor
    is never whole (see `chunk_group_norms`)."""
    g = _Graph(model.graph)
    outputs = {o.name for o in model.graph.output}
    replaced: set[int] = set()
    inserted: dict[int, list[onnx.NodeProto]] = {}
    for concat in list(model.graph.node):
        quantize = g.only_child(concat, "QuantizeLinear") if concat.op_type == "Concat" else None
        scale = g.array(quantize.input[1]) if quantize is not None else None
        if scale is None or scale.size != 1 or concat.output[0] in outputs:
            continue
        nodes = [
            helper.make_node("QuantizeLinear", [x, *quantize.input[1:]], [f"{x}_quantized"], name=f"{x}_QuantizeLinear")
            for x in concat.input
        ]
        joined = helper.make_node("Concat", [n.output[0] for n in nodes], [quantize.output[0]], name=concat.name)
        joined.attribute.extend(concat.attribute)
        nodes.append(joined)
        replaced.update({id(concat), id(quantize)})
        inserted[id(quantize)] = nodes
    if inserted:
        _rewrite(model.graph, replaced, inserted)
    return len(inserted)


def _rewrite(graph: onnx.GraphProto, replaced: set[int], inserted: dict[int, list[onnx.NodeProto]]) -> None:
    """Drop the `replaced` nodes, put each `inserted` list where its key node was, then drop what died."""
    kept = []
    for node in graph.node:
        kept.extend(inserted.get(id(node), []))
        if id(node) not in replaced:
            kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)
    _remove_dead_nodes(graph)


def _remove_dead_nodes(graph: onnx.GraphProto) -> None:
    """Drop nodes none of whose outputs is used (the scale arithmetic the fusion left behind)."""
    outputs = {o.name for o in graph.output}
    while True:
        used = {name for node in graph.node for name in node.input} | outputs
        alive = [n for n in graph.node if any(o in used for o in n.output)]
        if len(alive) == len(graph.node):
            return
        del graph.node[:]
        graph.node.extend(alive)


def _remove_unused_initializers(graph: onnx.GraphProto) -> None:
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    kept = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def optimize_file(src: Path, dst: Path, chunk_norms: bool = False) -> dict[str, int]:
    """Fuse attention, split GEGLU projections and, with `chunk_norms`, chunk group norms in an ONNX file; weights
    stay in (and keep pointing at) the external data beside it. Returns how many of each were rewritten."""
    model = onnx.load(str(src), load_external_data=False)
    counts = {"attention_fused": fuse_attention(model), "geglu_split": split_geglu(model)}
    if chunk_norms:
        counts["group_norms_chunked"] = chunk_group_norms(model)
    onnx.save_model(model, str(dst))
    return counts
