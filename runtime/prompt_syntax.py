"""AUTOMATIC1111's prompt syntax, torch-free: emphasis, BREAK, and prompts of any length in 75-token chunks.

What A1111 documents and does (modules/prompt_parser.py, sd_hijack_clip.py, sd_emphasis.py):
- `(x)` multiplies the weight of x by 1.1, `((x))` by 1.21, `(x:1.5)` sets 1.5 times, `[x]` divides by 1.1;
  `\\(` `\\)` `\\[` `\\]` are literal brackets; an unclosed bracket applies to the end of the prompt.
- The prompt is tokenized without start and end tokens and cut into chunks of 75 tokens (the encoder's length
  minus those two), each encoded alone as start + 75 tokens (padded with end tokens) + end, and the encoded
  chunks are concatenated, so nothing is cut; `BREAK` starts a new chunk; a chunk that fills up within 20
  tokens after a comma moves the words after the comma to the next chunk.
- Weights scale the encoder's output per token, then the chunk is rescaled to keep its original mean
  ("Original" emphasis).

`syntax="plain"` is diffusers' meaning (brackets are text, 77 tokens, the rest cut), the Python API's default.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

SYNTAXES = ("plain", "a1111")
ROUND, SQUARE = 1.1, 1 / 1.1
COMMA_BACKTRACK = 20  # A1111's comma_padding_backtrack default
BREAK = ("BREAK", -1.0)
_ATTENTION = re.compile(
    r"""
\\\(|\\\)|\\\[|\\]|\\\\|\\|   # escapes
\(|\[|                         # openers
:\s*([+-]?[.\d]+)\s*\)|        # a weight closing a round bracket
\)|]|                          # closers
[^\\()\[\]:]+|                 # text
:
""",
    re.X,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_attention(text: str) -> list[tuple[str, float]]:
    """(text, weight) runs of a prompt, neighbours of equal weight merged; `BREAK` as ("BREAK", -1).

    >>> parse_attention("an (important) word")
    [('an ', 1.0), ('important', 1.1), (' word', 1.0)]
    """
    runs: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for run in runs[start:]:
            run[1] *= factor

    for match in _ATTENTION.finditer(text):
        piece, weight = match.group(0), match.group(1)
        if piece.startswith("\\"):
            runs.append([piece[1:], 1.0])
        elif piece == "(":
            round_open.append(len(runs))
        elif piece == "[":
            square_open.append(len(runs))
        elif weight is not None and round_open:
            multiply(round_open.pop(), float(weight))
        elif piece == ")" and round_open:
            multiply(round_open.pop(), ROUND)
        elif piece == "]" and square_open:
            multiply(square_open.pop(), SQUARE)
        else:
            for i, part in enumerate(_BREAK.split(piece)):
                if i > 0:
                    runs.append(list(BREAK))
                runs.append([part, 1.0])
    for start in round_open:
        multiply(start, ROUND)
    for start in square_open:
        multiply(start, SQUARE)
    return _merged(runs or [["", 1.0]])


def _merged(runs: list[list]) -> list[tuple[str, float]]:
    merged = [runs[0]]
    for text, weight in runs[1:]:
        if weight == merged[-1][1]:
            merged[-1][0] += text
        else:
            merged.append([text, weight])
    return [(text, float(weight)) for text, weight in merged]


@dataclass
class Chunk:
    """One encoder input: start token, `length` prompt tokens (padded with end tokens), end token; a weight
    per token."""

    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class SpecialIds:
    start: int
    end: int
    pad: int  # SD 2's OpenCLIP pads with another token than its end token, after the first end
    comma: int | None


def chunk_prompt(
    runs: list[tuple[str, float]], tokenize: Callable[[str], list[int | tuple[int, ...]]], ids: SpecialIds, length: int
) -> list[Chunk]:
    """The chunks of a parsed prompt, as A1111's `tokenize_line` cuts them; each `length` + 2 tokens long.
    `tokenize` gives ids, and an embedding's ids as one tuple, which is never cut across chunks."""
    chunks: list[Chunk] = []
    chunk = Chunk()
    last_comma = -1

    def close() -> Chunk:
        nonlocal last_comma
        padding = length - len(chunk.tokens)
        tokens = [ids.start, *chunk.tokens, *[ids.end] * padding, ids.end]
        end = tokens.index(ids.end)  # the first end token: everything after it is padding
        tokens[end + 1 :] = [ids.pad] * (len(tokens) - end - 1)
        chunks.append(Chunk(tokens, [1.0, *chunk.weights, *[1.0] * (padding + 1)]))
        last_comma = -1
        return Chunk()

    for text, weight in runs:
        if (text, weight) == BREAK:
            chunk = close()
            continue
        for token in tokenize(text):
            if token == ids.comma:
                last_comma = len(chunk.tokens)
            elif len(chunk.tokens) == length and last_comma != -1 and length - last_comma <= COMMA_BACKTRACK:
                moved = Chunk(chunk.tokens[last_comma + 1 :], chunk.weights[last_comma + 1 :])
                chunk.tokens, chunk.weights = chunk.tokens[: last_comma + 1], chunk.weights[: last_comma + 1]
                close()
                chunk = moved
            if len(chunk.tokens) == length:
                chunk = close()
            group = token if isinstance(token, tuple) else (token,)
            if len(chunk.tokens) + len(group) > length:  # an embedding's vectors stay together
                chunk = close()
            chunk.tokens.extend(group)
            chunk.weights.extend([weight] * len(group))
    if chunk.tokens or not chunks:
        close()
    return chunks


def empty_chunk(ids: SpecialIds, length: int) -> Chunk:
    """What A1111 encodes for a prompt with fewer chunks than the others of its batch."""
    return chunk_prompt([("", 1.0)], lambda text: [], ids, length)[0]


def emphasize(states: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """A1111's "Original" emphasis on one chunk's encoder output (tokens x width): scale each token's state
    by its weight, then rescale the whole to its original mean."""
    original = states.mean(dtype=np.float64)
    scaled = states * weights.astype(states.dtype)[:, None]
    return (scaled * np.float32(original / scaled.mean(dtype=np.float64))).astype(states.dtype)
