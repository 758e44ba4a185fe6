"""A small Gemma-style tokenizer, made offline: a byte-fallback BPE trained (deterministically) on whole words.

Gemma's own tokenizer (256k pieces) lives on the Hugging Face Hub, which the builders cannot reach. This one has
Gemma's layout where it matters to SANA's pipelines: `<pad>` 0, `<eos>` 1, `<bos>` 2, `<unk>` 3, `<mask>` 4,
spaces as the "▁" word-start marker (no pre-tokenizer splits), a `<bos>` put before every text and nothing
after it, and exactly as many tokens as the Gemma config's `vocab_size`. Its words are the most frequent whole
words of the CLIP vocabulary shipped in models/clip; every printable ASCII character and the newline (SANA's
complex human instruction has some) are in its alphabet.
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any

from .clip_vocab import clip_vocab_and_merges

GEMMA_VOCAB_SIZE = 1024
GEMMA_MAX_LENGTH = 8192  # what Gemma-2's tokenizer config says
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
ALPHABET = ["▁", "\n", *string.ascii_letters, *string.digits, *string.punctuation]
TRAINING_WORDS = 3000


def gemma_vocab_and_merges(size: int = GEMMA_VOCAB_SIZE) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A BPE vocabulary of `size` tokens and its merges in rank order, trained by the `tokenizers` library on
    CLIP's whole words, each preceded by a space (the result is the same on every run)."""
    from tokenizers import Tokenizer, models, normalizers, trainers

    vocab, _ = clip_vocab_and_merges()
    words = [t[:-4] for t in vocab if t.endswith("</w>") and t[:-4].isascii() and t[:-4].isalpha()]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    trainer = trainers.BpeTrainer(
        vocab_size=size,
        special_tokens=SPECIALS,
        initial_alphabet=ALPHABET,
        limit_alphabet=len(ALPHABET),
        show_progress=False,
    )
    tokenizer.train_from_iterator([" " + w for w in words[:TRAINING_WORDS]], trainer)
    model = json.loads(tokenizer.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return model["vocab"], merges


def gemma_tokenizer(folder: Path | None = None, size: int = GEMMA_VOCAB_SIZE) -> Any:
    """transformers' GemmaTokenizerFast over `gemma_vocab_and_merges(size)`, adding `<bos>` as Gemma's does;
    saved to `folder` when given (tokenizer.json and tokenizer_config.json)."""
    from transformers import GemmaTokenizerFast

    vocab, merges = gemma_vocab_and_merges(size)
    tokenizer = GemmaTokenizerFast(
        vocab=vocab, merges=merges, add_bos_token=True, add_eos_token=False, model_max_length=GEMMA_MAX_LENGTH
    )
    if len(tokenizer) != size:
        raise ValueError(f"Gemma tokenizer has {len(tokenizer)} tokens, expected {size}")
    if folder is not None:
        tokenizer.save_pretrained(folder)
    return tokenizer
