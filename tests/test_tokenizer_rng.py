"""Tokenizer parity with transformers' CLIPTokenizer, and the NumPy RNG against torch's CPU generator."""

from __future__ import annotations

import itertools
import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from sd_onnx.runtime.rng import TorchGenerator
from sd_onnx.runtime.tokenizer import CLIPTokenizer

WORDS = [
    "a",
    "photo",
    "of",
    "an",
    "astronaut",
    "riding",
    "horse",
    "on",
    "mars",
    "red",
    "blue",
    "circle",
    "cat",
    "dog",
    "oil",
    "painting",
    "by",
    "greg",
    "rutkowski",
]
EXTRAS = [
    "",
    "   ",
    "ÉCOLE café naïve",
    "東京の夜景",
    "🐱🚀 emoji cat",
    "don't stop!!! (masterpiece:1.2), [bad hands]",
    "4k, 8K, 1920x1080, f/1.8",
    "tab\tand\nnewline",
    "UPPER lower MiXeD",
    "a,b;c:d-e_f+g=h",
    "https://example.com/path?q=1",
    "the " * 100,
]


def corpus(n: int = 1000) -> list[str]:
    rng = random.Random(0)
    prompts = list(EXTRAS)
    while len(prompts) < n:
        words = rng.choices(WORDS + [e for e in EXTRAS if e.strip()], k=rng.randint(1, 40))
        sep = rng.choice([" ", ", ", " | ", "  "])
        prompts.append(sep.join(words))
    return prompts


def test_tokenizer_matches_transformers_on_1000_prompts(tiny_export: Path, tiny_pipeline: Path) -> None:
    from transformers import CLIPTokenizer as Reference

    reference = Reference.from_pretrained(tiny_pipeline / "tokenizer")
    ours = CLIPTokenizer(tiny_export / "tokenizer", 77)
    prompts = corpus()
    expected = reference(prompts, padding="max_length", max_length=77, truncation=True).input_ids
    got = ours(prompts)  # the long prompts in the corpus are cut, as transformers cuts them
    assert got.shape == (len(prompts), 77) and got.dtype == np.int32
    mismatches = [p for p, g, e in zip(prompts, got.tolist(), expected, strict=True) if g != e]
    assert not mismatches, mismatches[:5]


def test_long_prompt_is_truncated_logging_a_bounded_excerpt(
    tiny_export: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ours = CLIPTokenizer(tiny_export / "tokenizer", 77)
    prompt = "cat " * 75 + "dog elephant"
    with caplog.at_level(logging.WARNING, logger="sd_onnx"):
        ids = ours.encode(prompt)
    assert len(ids) == 77 and ids[-1] == ours.eos_id
    assert "2 tokens were cut, starting 'dog elephant'" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sd_onnx"):
        ours.encode("cat " * 75 + "zebra " * 200_000)  # a 1.2 MB prompt: one short line, no registry growth
    assert len(caplog.records) == 1 and len(caplog.text) < 300 and "200000 tokens were cut" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sd_onnx"):
        ours.encode("cat " * 75 + "w28 w29 日本語の文章")  # the excerpt is the prompt's own text, not BPE pieces
    assert "starting 'w28 w29 日本語の文章'" in caplog.text


@pytest.mark.parametrize(
    ("seed", "shape"), [(0, (1, 4, 64, 64)), (42, (2, 4, 9, 9)), (2**40 + 7, (3, 5, 7)), (123, (5,)), (9, (3,))]
)
def test_randn_is_bit_identical_to_torch_cpu_generator(seed: int, shape: tuple[int, ...]) -> None:
    """Same stream and the same bits as torch for successive draws of several sizes (both code paths)."""
    reference, ours = torch.Generator().manual_seed(seed), TorchGenerator(seed)
    for draw_shape in itertools.islice(itertools.cycle([shape, (7,), shape]), 5):
        expected = torch.randn(draw_shape, generator=reference).numpy()
        got = ours.randn(draw_shape)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, expected)


def test_randn_bit_identical_over_many_seeds() -> None:
    for seed in range(100):
        expected = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(seed)).numpy()
        np.testing.assert_array_equal(TorchGenerator(seed).randn((2, 4, 32, 32)), expected)
