"""Tokenizers of T5 and LLM text encoders (SD3's and FLUX's T5, Gemma, Qwen), from `tokenizer.json` alone with
the `tokenizers` library: the file's own normalizer and special tokens, cut to the model's token length
(keeping the closing special token, as transformers' truncation does) and padded with the pad token."""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from .echo import echo
from .files import inside
from .manifest import ManifestError, read_json
from .tokenizer import EXCERPT_CHARS, TOKENIZER_FILES, load_tokenizer_file, special_token

LOG = logging.getLogger("sd_onnx")
MAX_LENGTH_VARIANTS = 8  # tokenizers kept for requests' own lengths (each a copy of the vocabulary)


class SequenceTokenizer:
    """Prompts -> (batch, max_length) int32 ids and their attention mask (1 for tokens, 0 for padding)."""

    def __init__(
        self, folder: Path, max_length: int, vocab_size: int | None = None, pad_to_longest: bool = False
    ) -> None:
        folder = Path(folder)
        self.tokenizer = load_tokenizer_file(folder)
        pad = special_token(folder, "pad_token")
        if pad is None:
            raise ManifestError(f"{folder}: the tokenizer names no pad_token (tokenizer_config.json)")
        self.pad_id = self.tokenizer.token_to_id(pad)
        if self.pad_id is None:
            raise ManifestError(f"{folder}: the tokenizer has no {echo(pad)} token")
        self.pad_to_longest = pad_to_longest
        self._set_length(max_length)
        self._lengths: dict[int, SequenceTokenizer] = {max_length: self}
        largest = max(self.tokenizer.get_vocab(with_added_tokens=True).values(), default=0)
        if vocab_size is not None and largest >= vocab_size:
            raise ManifestError(
                f"{folder}: the tokenizer has ids up to {largest}, the text encoder only {vocab_size} tokens"
            )

    def _set_length(self, max_length: int) -> None:
        """Cut to `max_length` tokens and pad to it (with `pad_to_longest`, to the batch's longest)."""
        self.max_length = max_length
        self.tokenizer.enable_truncation(max_length)
        pad = self.tokenizer.id_to_token(self.pad_id)
        length = None if self.pad_to_longest else max_length
        self.tokenizer.enable_padding(length=length, pad_id=self.pad_id, pad_token=pad)

    def with_length(self, max_length: int | None) -> SequenceTokenizer:
        """This tokenizer cutting and padding to `max_length` tokens instead (a request's max_sequence_length;
        None: its own), made once per length from a copy, so that requests of other lengths never share state."""
        if max_length is None:
            return self
        if max_length not in self._lengths:
            if len(self._lengths) > MAX_LENGTH_VARIANTS:
                self._lengths = {self.max_length: self}
            variant = copy.copy(self)
            variant.tokenizer = Tokenizer.from_str(self.tokenizer.to_str())
            variant._set_length(max_length)
            self._lengths[max_length] = variant
        return self._lengths[max_length]

    def encode(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """int32 ids and attention mask, each (len(prompts), max_length); a cut prompt is logged."""
        for prompt in prompts:
            if not isinstance(prompt, str):
                raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
        encodings = self.tokenizer.encode_batch(list(prompts))
        for prompt, encoding in zip(prompts, encodings, strict=True):
            if encoding.overflowing:
                start = encoding.offsets[-2][1] if len(encoding.offsets) > 1 else 0
                LOG.warning(
                    "prompt is longer than %d tokens; the rest was cut, starting %r",
                    self.max_length, prompt[start : start + EXCERPT_CHARS],
                )  # fmt: skip
        ids = np.array([e.ids for e in encodings], np.int32)
        mask = np.array([e.attention_mask for e in encodings], np.int32)
        return ids, mask

    def __call__(self, prompts: list[str]) -> np.ndarray:
        return self.encode(prompts)[0]


def sequence_tokenizer_for(
    folder: Path, name: str, encoder: str, max_length: int, pad_to_longest: bool = False
) -> SequenceTokenizer:
    """The tokenizer in `folder/name` for the text encoder graph `folder/encoder`, its ids checked against the
    encoder's `vocab_size` when its config is there (files confined to the model folder)."""
    for file in (*TOKENIZER_FILES, f"../{encoder}/config.json"):
        inside(folder, f"{name}/{file}", folder)
    path = Path(folder) / encoder / "config.json"
    config = read_json(path) if os.path.lexists(path) else {}
    vocab = config.get("vocab_size")
    if vocab is not None and (not isinstance(vocab, int) or isinstance(vocab, bool) or vocab < 1):
        raise ManifestError(f"{path}: vocab_size must be a positive integer, got {echo(vocab)}")
    return SequenceTokenizer(Path(folder) / name, max_length, vocab, pad_to_longest)
