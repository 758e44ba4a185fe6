"""A small Qwen2-style tokenizer, made offline: byte-level BPE trained on a few hundred words.

Qwen's own tokenizer (151k tokens) lives on the Hugging Face Hub, which the builders cannot reach. This one has
Qwen's layout where it matters to Z-Image's and FLUX.2 [klein]'s pipelines: Qwen2Tokenizer's normalizer, split
pattern and byte-level pre-tokenizer (so any text tokenizes, nothing is unknown), the special tokens after the
BPE vocabulary (`<|endoftext|>` pads, `<|im_end|>` ends a turn), `<think>`/`</think>` as added tokens, and a chat
template that renders system, user and assistant turns and the generation prompt as Qwen3's does (ChatML, with
the empty thinking block when `enable_thinking=False`; tools and reasoning history are left out).
Its words are the most frequent whole words of the CLIP vocabulary shipped in models/clip.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .clip_vocab import clip_vocab_and_merges

QWEN_BPE_SIZE = 480  # byte alphabet (256) + merges; the special and added tokens come after
QWEN_MAX_LENGTH = 32768
TRAINING_WORDS = 400
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
ADDED_TOKENS = ("<think>", "</think>")
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)


def training_words(count: int = TRAINING_WORDS) -> list[str]:
    """Whole words of CLIP's vocabulary in its merge order (roughly by frequency)."""
    vocab, _ = clip_vocab_and_merges()
    words = [t[:-4] for t in vocab if t.endswith("</w>") and len(t) > 5 and t[:-4].isascii() and t[:-4].isalpha()]
    return words[:count]


def qwen_tokenizer(folder: Path | None = None, bpe_size: int = QWEN_BPE_SIZE, max_length: int = QWEN_MAX_LENGTH) -> Any:
    """transformers' Qwen2TokenizerFast over byte-level BPE merges trained on `training_words()`, with Qwen's special
    tokens and the chat template; saved to `folder` when given. Its length is `bpe_size` + 5."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import AddedToken, Qwen2TokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    words = training_words()
    bpe.train_from_iterator([" ".join(words), *words, *(" " + w for w in words)], trainer)
    state = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    tokenizer = Qwen2TokenizerFast(
        vocab=state["vocab"],
        merges=merges,
        unk_token=None,
        eos_token=SPECIAL_TOKENS[0],  # numbered first, as in Qwen's; the end of a turn becomes the eos below
        pad_token=SPECIAL_TOKENS[0],
        model_max_length=max_length,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS[1:])})
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in ADDED_TOKENS])
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    if folder is not None:
        tokenizer.save_pretrained(folder)
    return tokenizer
