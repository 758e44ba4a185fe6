"""CLIP tokenization with the `tokenizers` library only: ids identical to transformers' CLIPTokenizer with
padding="max_length" and truncation to the model's token length (77 for SD)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from .echo import echo
from .embeddings import Embedding
from .files import inside, read_text
from .manifest import ManifestError, read_json
from .prompt_syntax import Chunk, SpecialIds, chunk_prompt, empty_chunk, parse_attention

LOG = logging.getLogger("sd_onnx")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
MAX_TOKENIZER_BYTES = 64 << 20  # CLIP's tokenizer.json is 3.6 MB, Gemma's 34 MB
# A cut prompt is logged as a bounded excerpt of its own text: a 1 MB prompt must not become a 1 MB log line.
EXCERPT_CHARS = 80


class CLIPTokenizer:
    """Tokenize prompts to fixed-length id arrays; over-long prompts are cut, logging how much and where."""

    def __init__(self, folder: Path, max_length: int, vocab_size: int | None = None) -> None:
        """Read the tokenizer files in `folder` (bounded, see files.py); `vocab_size`, when the text encoder's
        config gives it, is checked against the tokenizer's ids so that no prompt can index past the encoder's
        embedding table. ManifestError naming the file for anything unusable."""
        folder = Path(folder)
        self.tokenizer = load_tokenizer_file(folder)
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        # Only used to show the cut part of a long prompt; some exports lack a decoder that knows CLIP's </w>.
        self.tokenizer.decoder = decoders.BPEDecoder(suffix="</w>")
        self.max_length = max_length
        self.words: list[tuple[tuple[int, ...], tuple[int, ...]]] = []  # embedding word's tokens -> its ids
        tokens = {key: special_token(folder, key) for key in ("pad_token", "eos_token", "bos_token")}
        self.pad_id = self._id(folder, tokens["pad_token"] or "<|endoftext|>")
        self.eos_id = self._id(folder, tokens["eos_token"] or "<|endoftext|>")
        self.bos_id = self._id(folder, tokens["bos_token"] or "<|startoftext|>")
        largest = max(self.tokenizer.get_vocab(with_added_tokens=True).values(), default=0)
        if vocab_size is not None and largest >= vocab_size:
            raise ManifestError(
                f"{folder}: the tokenizer has ids up to {largest}, the text encoder only {vocab_size} tokens"
            )

    def chunks(self, prompt: str) -> tuple[np.ndarray, np.ndarray]:
        """A prompt in A1111's syntax (see prompt_syntax.py): int32 ids and float32 weights, each
        (chunks, max_length), with nothing cut."""
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
        runs = parse_attention(prompt)
        chunks = chunk_prompt(runs, self._tokenize, self.special_ids, self.max_length - 2)
        return _arrays(chunks)

    def empty_chunk(self) -> tuple[np.ndarray, np.ndarray]:
        """The chunk A1111 encodes where a prompt has fewer chunks than the longest of its batch."""
        return _arrays([empty_chunk(self.special_ids, self.max_length - 2)])

    @property
    def special_ids(self) -> SpecialIds:
        return SpecialIds(self.bos_id, self.eos_id, self.pad_id, self.tokenizer.token_to_id(",</w>"))

    def _tokenize(self, text: str) -> list[int | tuple[int, ...]]:
        return self._with_embeddings(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def add_embeddings(self, embeddings: list[Embedding], rows: int) -> None:
        """Read each embedding's word as its vectors: the word's tokens become the ids `rows`, `rows + 1`, ... of
        the encoder's token table once the embeddings' vectors are appended to its `rows` rows, in this order
        (embeddings.table_override). Words are found by their tokens, as A1111 finds them, longest first."""
        for embedding in embeddings:
            word = tuple(self.tokenizer.encode(embedding.name, add_special_tokens=False).ids)
            if word:
                self.words.append((word, tuple(range(rows, rows + embedding.count))))
            rows += embedding.count
        self.words.sort(key=lambda entry: -len(entry[0]))

    def _with_embeddings(self, ids: list[int]) -> list[int | tuple[int, ...]]:
        """`ids` with each embedding word's tokens replaced by the tuple of its vectors' ids."""
        if not self.words:
            return list(ids)
        found: list[int | tuple[int, ...]] = []
        position = 0
        while position < len(ids):
            match = next((e for e in self.words if tuple(ids[position : position + len(e[0])]) == e[0]), None)
            found.append(ids[position] if match is None else match[1])
            position += 1 if match is None else len(match[0])
        return found

    def _expand(self, ids: list[int]) -> list[int]:
        """`ids` with each embedding word's tokens replaced by its vectors' ids."""
        return [i for unit in self._with_embeddings(ids) for i in (unit if isinstance(unit, tuple) else (unit,))]

    def _id(self, folder: Path, token: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise ManifestError(f"{folder}: the tokenizer has no {echo(token)} token")
        return token_id

    def __call__(self, prompts: list[str]) -> np.ndarray:
        """int32 array (len(prompts), max_length)."""
        return np.array([self.encode(p) for p in prompts], dtype=np.int32)

    def encode(self, prompt: str) -> list[int]:
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
        encoding = self.tokenizer.encode(prompt)
        ids = self._expand(encoding.ids)
        if len(ids) > self.max_length:
            cut = len(ids) - self.max_length  # the last id is the end-of-text token, kept
            # Where the first cut token begins in the prompt (about, after an embedding's extra ids).
            start = encoding.offsets[min(self.max_length, len(encoding.offsets)) - 1][0]
            excerpt = prompt[start : start + EXCERPT_CHARS]
            more = " ..." if len(prompt) - start > EXCERPT_CHARS else ""
            LOG.warning(
                "prompt is longer than %d tokens; %d tokens were cut, starting %r%s",
                self.max_length, cut, excerpt, more,
            )  # fmt: skip
            ids = ids[: self.max_length - 1] + [self.eos_id]
        return ids + [self.pad_id] * (self.max_length - len(ids))


def _arrays(chunks: list[Chunk]) -> tuple[np.ndarray, np.ndarray]:
    return np.array([c.tokens for c in chunks], np.int32), np.array([c.weights for c in chunks], np.float32)


def load_tokenizer_file(folder: Path) -> Tokenizer:
    """tokenizer.json, else CLIP's vocab.json + merges.txt, read within bounds; the tokenizers library's own
    errors become one line naming the file."""
    if os.path.lexists(folder / "tokenizer.json"):
        path = folder / "tokenizer.json"
        text = read_text(path, MAX_TOKENIZER_BYTES, "tokenizer file")
        try:
            return Tokenizer.from_str(text)
        except Exception as exc:  # noqa: BLE001 - the library raises a bare Exception for any malformed file
            raise ManifestError(
                f"{path}: not a tokenizer file ({echo(str(exc).splitlines()[0] if str(exc) else exc)})"
            ) from None
    if os.path.lexists(folder / "vocab.json") and os.path.lexists(folder / "merges.txt"):
        return clip_tokenizer_from_vocab(folder / "vocab.json", folder / "merges.txt")
    raise ManifestError(f"{folder}: no tokenizer.json (nor vocab.json + merges.txt)")


def special_token(folder: Path, key: str) -> str | None:
    """A special token from tokenizer_config.json or special_tokens_map.json (string or AddedToken dict)."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = folder / name
        if os.path.lexists(path):
            value = read_json(path).get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if value is not None and not isinstance(value, str):
                raise ManifestError(f"{path}: {key} must be a string, got {type(value).__name__}")
            if value:
                return value
    return None


def clip_tokenizer_from_vocab(vocab: Path, merges: Path) -> Tokenizer:
    """CLIP's tokenizer built from slow-tokenizer files (as Optimum and older diffusers folders ship them),
    with the normalizer, pre-tokenizer and post-processor transformers' CLIP converter uses."""
    words = read_json(vocab, limit=MAX_TOKENIZER_BYTES)
    if not all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in words.items()):
        raise ManifestError(f"{vocab}: must map each token to an integer id")
    lines = read_text(merges, MAX_TOKENIZER_BYTES, "merges file").splitlines()
    pairs = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
    if not all(len(pair) == 2 for pair in pairs):
        raise ManifestError(f"{merges}: each line must be two tokens separated by one space")
    try:
        bpe = models.BPE(
            words, pairs, continuing_subword_prefix="", end_of_word_suffix="</w>", unk_token="<|endoftext|>"
        )
    except Exception as exc:  # noqa: BLE001 - the library raises a bare Exception (a merge of unknown tokens)
        raise ManifestError(f"{merges}: not a BPE merges file for {vocab.name} ({echo(str(exc))})") from None
    tokenizer = Tokenizer(bpe)
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    split = Regex(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(split, behavior="removed", invert=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    bos, eos = "<|startoftext|>", "<|endoftext|>"
    tokenizer.post_processor = processors.RobertaProcessing(
        (eos, tokenizer.token_to_id(eos)),
        (bos, tokenizer.token_to_id(bos)),
        add_prefix_space=False,
        trim_offsets=False,
    )
    return tokenizer


def tokenizer_for(folder: Path, name: str, encoder: str, max_length: int) -> CLIPTokenizer:
    """The tokenizer in `folder/name` for the text encoder in `folder/encoder`, checked against that encoder's
    config when it has one: `max_length` tokens fit its position table and every id fits its vocabulary, so no
    prompt can fail inside the graph."""
    for file in (*TOKENIZER_FILES, f"../{encoder}/config.json"):  # none may link out of the model folder
        inside(folder, f"{name}/{file}", folder)
    path = Path(folder) / encoder / "config.json"
    config = read_json(path) if os.path.lexists(path) else {}
    limits = {key: config.get(key) for key in ("max_position_embeddings", "vocab_size")}
    for key, value in limits.items():
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ManifestError(f"{path}: {key} must be a positive integer, got {echo(value)}")
    positions = limits["max_position_embeddings"]
    if positions is not None and max_length > positions:
        raise ManifestError(
            f"{folder}: config.max_token_length is {max_length}, but {encoder} has {positions} positions ({path})"
        )
    return CLIPTokenizer(Path(folder) / name, max_length, limits["vocab_size"])
