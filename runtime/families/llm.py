"""LLM text conditioning shared by the families that read prompts with a Qwen3 encoder (Z-Image, FLUX.2 [klein]):
the prompts' chat turns through the text encoder graph, which takes their attention mask."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..chat_template import ChatPrompts


def encode_outputs(
    pipe: Any, prompts: ChatPrompts, texts: list[str], max_length: int | None = None
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The text encoder graph's outputs by name (the hidden states the family conditions on) and the attention
    mask, for `texts` as chat turns of at most `max_length` tokens (None: the model's)."""
    ids, mask = prompts.encode(texts, max_length)
    encoder = pipe.component("text_encoder")
    outputs = encoder(
        input_ids=ids.astype(encoder.input_dtype("input_ids", np.int32)),
        attention_mask=mask.astype(encoder.input_dtype("attention_mask", np.int32)),
    )
    pipe.release("text_encoder")
    return {name: np.asarray(o, np.float32) for name, o in zip(encoder.output_names, outputs, strict=True)}, mask
