"""Graph optimization for CPUs: onnxruntime's transformer optimizer (UNet attention fusion to the
`MultiHeadAttention` contrib operator, LayerNorm fusions), restricted to fusions the CPU provider runs.

Two fixes make the route work on today's exports: `FusionAttentionUnet.get_num_heads` converts a
1-element array with `int()`, which NumPy >= 2.4 refuses (patched below to `.item()`), and the
CUDA-only fusions (GroupNorm, SkipGroupNorm, BiasSplitGelu, BiasAdd, NhwcConv, packed QKV/KV) are switched
off, since a graph containing them fails to load on the CPU provider.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
from onnxruntime.transformers import fusion_attention_unet, optimizer
from onnxruntime.transformers.fusion_options import FusionOptions

CUDA_ONLY_FUSIONS = (
    "enable_group_norm",
    "enable_skip_group_norm",
    "enable_bias_splitgelu",
    "enable_bias_add",
    "enable_nhwc_conv",
    "enable_packed_qkv",
    "enable_packed_kv",
)


def _get_num_heads(self: fusion_attention_unet.FusionAttentionUnet, reshape_q, is_torch2: bool = False) -> int:
    """Upstream logic, with the NumPy 2.4-safe scalar conversion."""
    num_heads = 0
    if is_torch2:
        parent = self.model.get_parent(reshape_q, 1)
        if parent and parent.op_type == "Concat" and len(parent.input) == 4:
            value = self.model.get_constant_value(parent.input[2])
            if isinstance(value, np.ndarray) and value.size == 1:
                num_heads = int(value.reshape(-1)[0])
    else:
        value = self.model.get_constant_value(reshape_q.input[1])
        if isinstance(value, np.ndarray) and list(value.shape) == [4]:
            num_heads = int(value[2])
    return num_heads if num_heads > 0 else 0


def _patch() -> None:
    # onnxruntime's transformer tools import each other as top-level modules (a sys.path insert), so the
    # class exists twice; patch whichever copies are loaded.
    import sys

    for name in ("fusion_attention_unet", "onnxruntime.transformers.fusion_attention_unet"):
        module = sys.modules.get(name)
        if module is not None:
            module.FusionAttentionUnet.get_num_heads = _get_num_heads


_patch()


def optimize_unet(src: Path, dst: Path, big: bool) -> dict[str, int]:
    """Fuse attention (MultiHeadAttention) and LayerNorms in a UNet graph; returns fused-op counts."""
    options = FusionOptions("unet")
    for flag in CUDA_ONLY_FUSIONS:
        setattr(options, flag, False)
    model = optimizer.optimize_model(
        str(src), model_type="unet", num_heads=0, hidden_size=0, optimization_options=options, opt_level=0, use_gpu=False
    )
    model.save_model_to_file(str(dst), use_external_data_format=big, all_tensors_to_one_file=True)
    counts = Counter(n.op_type for n in model.model.graph.node)
    return {op: counts[op] for op in ("MultiHeadAttention", "Attention", "LayerNormalization", "SkipLayerNormalization")}
