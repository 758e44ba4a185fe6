"""A small T5-style tokenizer, made offline: a SentencePiece-like Unigram model over a fixed vocabulary.

T5's own tokenizer (32k pieces) lives on the Hugging Face Hub, which the builders cannot reach. This one has
T5's layout where it matters to a pipeline: `<pad>` 0, `</s>` 1, `<unk>` 2, the "▁" word-start marker, an
appended `</s>`, and no extra ids beyond the vocabulary, so its length equals the T5 config's `vocab_size`.
Its words are the most frequent whole words of the CLIP vocabulary shipped in models/clip.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

from .clip_vocab import clip_vocab_and_merges

T5_VOCAB_SIZE = 1024
T5_MAX_LENGTH = 512  # what T5's tokenizer config says (FLUX reads up to 512 tokens, SD3 256)
SPECIALS = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
CHARACTERS = string.ascii_letters + string.digits + string.punctuation


def t5_pieces(size: int = T5_VOCAB_SIZE) -> list[tuple[str, float]]:
    """(piece, log-probability) pairs: the special tokens, every printable ASCII character with and without
    the word-start marker, then whole words in CLIP's merge order (roughly by frequency) until `size`."""
    pieces = list(SPECIALS)
    pieces += [(c, -10.0) for c in CHARACTERS] + [("▁" + c, -9.0) for c in CHARACTERS]
    vocab, _ = clip_vocab_and_merges()
    words = [t[:-4] for t in vocab if t.endswith("</w>") and len(t) > 5 and t[:-4].isascii() and t[:-4].isalpha()]
    if len(pieces) + len(words) < size:
        raise ValueError(f"cannot make {size} T5 pieces from the CLIP vocabulary")
    pieces += [("▁" + w, -3.0 - i / 1000) for i, w in enumerate(words[: size - len(pieces)])]
    return pieces


def t5_tokenizer(folder: Path | None = None, size: int = T5_VOCAB_SIZE, max_length: int = T5_MAX_LENGTH) -> Any:
    """transformers' T5 tokenizer (T5TokenizerFast) over `t5_pieces(size)`; saved to `folder` when given
    (tokenizer.json and tokenizer_config.json)."""
    from transformers import T5TokenizerFast

    tokenizer = T5TokenizerFast(vocab=t5_pieces(size), extra_ids=0, model_max_length=max_length)
    if len(tokenizer) != size:
        raise ValueError(f"T5 tokenizer has {len(tokenizer)} tokens, expected {size}")
    if folder is not None:
        tokenizer.save_pretrained(folder)
    return tokenizer
