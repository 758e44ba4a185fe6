"""Write the real CLIP tokenizer files (vocab.json, merges.txt) from the vocabulary shipped in models/clip.

The id layout follows OpenAI's `simple_tokenizer.py`, which is the layout of the Hugging Face
`openai/clip-vit-large-patch14` tokenizer used by Stable Diffusion 1.x.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

VOCAB_GZ = Path(__file__).parent / "clip" / "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2


def _bytes_to_unicode() -> list[str]:
    """GPT-2 style byte characters, in the order CLIP numbers them (printable bytes first)."""
    printable = list(range(ord("!"), ord("~") + 1))
    printable += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """Return CLIP's token->id map and its BPE merges, in rank order."""
    with gzip.open(VOCAB_GZ, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = lines[1 : NUM_MERGES + 1]
    byte_chars = _bytes_to_unicode()
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    tokens += ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_clip_tokenizer_files(folder: Path) -> None:
    """Write vocab.json, merges.txt, special_tokens_map.json and tokenizer_config.json for CLIPTokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_and_merges()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
    }
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True, **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
