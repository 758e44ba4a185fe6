"""CLIP text conditioning shared by the families that read prompts with CLIP tokenizers: ids for plain or
A1111 syntax (75-token chunks), and A1111's emphasis applied to the encoder's states."""

from __future__ import annotations

import numpy as np

from ..manifest import Manifest
from ..prompt_syntax import emphasize
from ..tokenizer import CLIPTokenizer


def encode_inputs(
    tokenizer: CLIPTokenizer, texts: list[str], syntax: str, least: int = 1
) -> tuple[np.ndarray, np.ndarray | None]:
    """The text encoder's input ids for `texts` and, in A1111's syntax, each token's weight: every text cut
    into the same number of chunks (the longest's; the others padded with empty chunks, as A1111 pads a batch
    and its "pad prompt/negative prompt to the same length" option pads the two halves), chunk rows after
    each other per text; at least `least` chunks (SDXL's second encoder may read other texts)."""
    if syntax == "plain":
        return tokenizer(texts), None
    encoded = [tokenizer.chunks(text) for text in texts]
    count = max(least, *(len(ids) for ids, _ in encoded))
    empty_ids, empty_weights = tokenizer.empty_chunk()
    ids = [np.concatenate([i, *[empty_ids] * (count - len(i))]) for i, _ in encoded]
    weights = [np.concatenate([w, *[empty_weights] * (count - len(w))]) for _, w in encoded]
    return np.concatenate(ids), np.concatenate(weights)


def emphasized(states: np.ndarray, weights: np.ndarray | None, texts: int) -> np.ndarray:
    """The encoder's states of chunked texts with A1111's emphasis applied per chunk, each text's chunks side by
    side: (texts, chunks x tokens, width). Unchunked (`weights` None) states pass unchanged."""
    if weights is None:
        return states
    chunks = np.stack([emphasize(chunk, w) for chunk, w in zip(states, weights, strict=True)])
    return chunks.reshape(texts, -1, chunks.shape[-1])


def run_encoder(encoder: object, ids: np.ndarray) -> dict[str, np.ndarray]:
    """A text encoder graph's outputs by name for int `ids` (int32 or int64, as the graph takes them)."""
    outputs = encoder(input_ids=ids.astype(encoder.input_dtype("input_ids", np.int32)))
    return dict(zip(encoder.output_names, outputs, strict=True))


def clip_skip_layers(manifest: Manifest | None) -> int:
    """How many layers a request may skip: SD 1.x/2.x encoders export `clip_skip.K` (the final layer norm on
    the state K layers before the last), SDXL's every layer's `hidden_states.I` (the penultimate is the
    default, so one fewer can be skipped)."""
    info = manifest.components.get("text_encoder") or manifest.components.get("text_encoder_2") if manifest else None
    names = [spec.name for spec in info.outputs] if info else []
    skips = [int(n.split(".")[1]) for n in names if n.startswith("clip_skip.") and n.split(".")[1].isdigit()]
    hidden = sum(n.startswith("hidden_states.") for n in names)
    return max(skips, default=max(hidden - 2, 0))


def penultimate(outputs: dict[str, np.ndarray], clip_skip: int | None = None) -> np.ndarray:
    """The hidden state SDXL and SD3 condition on: the penultimate layer's, or `clip_skip` more layers before
    the last (diffusers' count)."""
    hidden = sorted((k for k in outputs if k.startswith("hidden_states.")), key=lambda k: int(k.split(".")[1]))
    return outputs[hidden[-2 - (clip_skip or 0)]]


def plain_texts(prompts: list[str], syntax: str) -> list[str]:
    """Prompts for encoders that read text as it is (T5, LLMs): in A1111's syntax the text without its
    emphasis markup and BREAKs (weights are not applied to these encoders)."""
    if syntax != "a1111":
        return list(prompts)
    from ..prompt_syntax import BREAK, parse_attention

    return ["".join(text for text, weight in (parse_attention(p)) if (text, weight) != BREAK) for p in prompts]
