"""CLIP tokenization with the `tokenizers` library only: ids identical to transformers' CLIPTokenizer with
padding="max_length" and truncation to the model's token length (77 for SD)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

LOG = logging.getLogger("sd_onnx")
# A cut prompt is logged as a bounded excerpt of its own text: a 1 MB prompt must not become a 1 MB log line.
EXCERPT_CHARS = 80


class CLIPTokenizer:
    """Tokenize prompts to fixed-length id arrays; over-long prompts are cut, logging how much and where."""

    def __init__(self, folder: Path, max_length: int) -> None:
        folder = Path(folder)
        if (folder / "tokenizer.json").is_file():
            self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            self.tokenizer = clip_tokenizer_from_vocab(folder / "vocab.json", folder / "merges.txt")
        else:
            raise ValueError(f"{folder}: no tokenizer.json (nor vocab.json + merges.txt)")
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        # Only used to show the cut part of a long prompt; some exports lack a decoder that knows CLIP's </w>.
        self.tokenizer.decoder = decoders.BPEDecoder(suffix="</w>")
        self.max_length = max_length
        pad_token = _special_token(folder, "pad_token") or "<|endoftext|>"
        eos_token = _special_token(folder, "eos_token") or "<|endoftext|>"
        bos_token = _special_token(folder, "bos_token") or "<|startoftext|>"
        self.pad_id = self.tokenizer.token_to_id(pad_token)
        self.eos_id = self.tokenizer.token_to_id(eos_token)
        self.bos_id = self.tokenizer.token_to_id(bos_token)

    def __call__(self, prompts: list[str]) -> np.ndarray:
        """int32 array (len(prompts), max_length)."""
        return np.array([self.encode(p) for p in prompts], dtype=np.int32)

    def encode(self, prompt: str) -> list[int]:
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
        encoding = self.tokenizer.encode(prompt)
        ids = encoding.ids
        if len(ids) > self.max_length:
            cut = len(ids) - self.max_length  # the last id is the end-of-text token, kept
            start = encoding.offsets[self.max_length - 1][0]  # where the first cut token begins in the prompt
            excerpt = prompt[start : start + EXCERPT_CHARS]
            more = " ..." if len(prompt) - start > EXCERPT_CHARS else ""
            LOG.warning(
                "prompt is longer than %d tokens; %d tokens were cut, starting %r%s",
                self.max_length, cut, excerpt, more,
            )  # fmt: skip
            ids = ids[: self.max_length - 1] + [self.eos_id]
        return ids + [self.pad_id] * (self.max_length - len(ids))


def _special_token(folder: Path, key: str) -> str | None:
    """A special token from tokenizer_config.json or special_tokens_map.json (string or AddedToken dict)."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = folder / name
        if path.is_file():
            value = json.loads(path.read_text()).get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if value:
                return value
    return None


def clip_tokenizer_from_vocab(vocab: Path, merges: Path) -> Tokenizer:
    """CLIP's tokenizer built from slow-tokenizer files (as Optimum and older diffusers folders ship them),
    with the normalizer, pre-tokenizer and post-processor transformers' CLIP converter uses."""
    bpe = models.BPE.from_file(
        str(vocab), str(merges), continuing_subword_prefix="", end_of_word_suffix="</w>", unk_token="<|endoftext|>"
    )
    tokenizer = Tokenizer(bpe)
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    words = Regex(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(words, behavior="removed", invert=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    bos, eos = "<|startoftext|>", "<|endoftext|>"
    tokenizer.post_processor = processors.RobertaProcessing(
        (eos, tokenizer.token_to_id(eos)),
        (bos, tokenizer.token_to_id(bos)),
        add_prefix_space=False,
        trim_offsets=False,
    )
    return tokenizer
