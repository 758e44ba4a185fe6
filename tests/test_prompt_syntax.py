"""A1111's prompt syntax (runtime/prompt_syntax.py) and clip skip.

References, per test: the parser against the examples A1111 documents in `parse_prompt_attention`'s docstring;
the chunk layout against A1111's `tokenize_line` rules worked out by hand; the encoding of chunks against
PyTorch (transformers' CLIPTextModel on the same ids, with A1111's "Original" emphasis written in torch);
clip skip against diffusers' `clip_skip` end to end. diffusers' own long-prompt handling (cut at 77) is the
`plain` syntax, which the existing parity tests cover.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from sd_onnx.runtime.cli import main
from sd_onnx.runtime.families.clip import encode_inputs
from sd_onnx.runtime.pipeline import DiffusionPipeline
from sd_onnx.runtime.prompt_syntax import SpecialIds, chunk_prompt, emphasize, parse_attention
from sd_onnx.runtime.request import GenerationRequest
from sd_onnx.runtime.tokenizer import CLIPTokenizer

LONG = "a (red:1.3) circle on a [blue] square, " * 12 + "BREAK ((green)) background"


# The parser: A1111's documented examples ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("normal text", [("normal text", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("(unbalanced", [("unbalanced", 1.1)]),
        ("\\(literal\\]", [("(literal]", 1.0)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        (
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            [
                ("a ", 1.0),
                ("house", 1.5730000000000004),
                (" ", 1.1),
                ("on", 1.0),
                (" a ", 1.1),
                ("hill", 0.55),
                (", sun, ", 1.1),
                ("sky", 1.4641000000000006),
                (".", 1.1),
            ],
        ),  # fmt: skip
        ("[x]", [("x", 1 / 1.1)]),
        ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
        ("", [("", 1.0)]),
    ],
)
def test_parser_matches_a1111s_documented_examples(text: str, expected: list) -> None:
    parsed = parse_attention(text)
    assert [t for t, _ in parsed] == [t for t, _ in expected]
    assert [w for _, w in parsed] == pytest.approx([w for _, w in expected], rel=1e-12)


# Chunks -------------------------------------------------------------------------------------------------------

IDS = SpecialIds(start=100, end=101, pad=0, comma=9)


def words(text: str) -> list[int]:
    """A tokenizer for layout tests: each character is one token (',' is the comma)."""
    return [9 if c == "," else ord(c) for c in text if c != " "]


def test_chunks_are_start_tokens_end_padding_with_sd2_pad_after_the_first_end() -> None:
    (chunk,) = chunk_prompt([("ab", 1.0), ("c", 1.5)], words, IDS, length=5)
    assert chunk.tokens == [100, ord("a"), ord("b"), ord("c"), 101, 0, 0]
    assert chunk.weights == [1.0, 1.0, 1.0, 1.5, 1.0, 1.0, 1.0]


def test_long_prompts_continue_in_new_chunks_and_break_starts_one() -> None:
    chunks = chunk_prompt([("abcdefg", 1.0), ("BREAK", -1.0), ("h", 2.0)], words, IDS, length=5)
    assert [c.tokens[1:-1] for c in chunks] == [
        [ord(c) for c in "abcde"], [ord("f"), ord("g"), 101, 0, 0], [ord("h"), 101, 0, 0, 0]
    ]  # fmt: skip
    assert chunks[2].weights[1] == 2.0


def test_a_full_chunk_moves_the_words_after_its_last_comma_to_the_next() -> None:
    chunks = chunk_prompt([("ab,cde", 1.0)], words, IDS, length=5)  # "cd" fills the chunk, "e" would not fit
    assert chunks[0].tokens[1:-1] == [ord("a"), ord("b"), 9, 101, 0]
    assert chunks[1].tokens[1:4] == [ord("c"), ord("d"), ord("e")]


# Encoding: ONNX chunks vs PyTorch with A1111's emphasis -------------------------------------------------------


def torch_emphasis(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111's sd_emphasis.EmphasisOriginal.after_transformers, in torch."""
    original = z.mean()
    z = z * weights.reshape(weights.shape + (1,)).expand(z.shape)
    return z * (original / z.mean())


def test_emphasis_is_a1111s_original_emphasis() -> None:
    rng = np.random.default_rng(0)
    states = (rng.standard_normal((77, 64)) + 0.3).astype(np.float32)  # CLIP states have a clear mean
    weights = rng.choice([1.0, 1.1, 1.21, 0.9, 1.5], 77).astype(np.float32)
    expected = torch_emphasis(torch.tensor(states)[None], torch.tensor(weights)[None])[0].numpy()
    np.testing.assert_allclose(emphasize(states, weights), expected, rtol=1e-5, atol=1e-6)


def test_long_prompts_encode_chunk_by_chunk_as_a1111_does(tiny_pipeline: Path, tiny_export: Path) -> None:
    """Each chunk through the encoder alone (PyTorch on the same ids), side by side; A1111's emphasis on top.
    (The tiny model's states average to about 0, where the mean-restoring ratio is ill-conditioned, so the
    emphasis is compared on states with a real mean above.)"""
    from transformers import CLIPTextModel

    pipe = DiffusionPipeline.from_pretrained(tiny_export, provider="cpu")
    ids, weights = encode_inputs(pipe.tokenizer, [LONG], "a1111")
    assert (
        ids.shape == (3, 77)
        and weights.max() == pytest.approx(1.3)
        and np.isclose(weights, 1.21).any()
        and weights.min() == pytest.approx(1 / 1.1)
    )
    ours = pipe.family.encode_prompt(pipe, [LONG], None, do_cfg=False, syntax="a1111")
    assert ours.shape == (1, 3 * 77, pipe.config.embedding_dim)
    model = CLIPTextModel.from_pretrained(tiny_pipeline / "text_encoder").eval()
    with torch.no_grad():
        states = [model(torch.tensor(i[None], dtype=torch.long)).last_hidden_state[0].numpy() for i in ids]
    for chunk, state, weight in zip(np.split(ours[0], 3), states, weights, strict=True):
        scaled = state * weight[:, None]  # the weights per token; the mean-restoring factor is one scalar
        factor = float(chunk.ravel() @ scaled.ravel() / (scaled.ravel() @ scaled.ravel()))
        np.testing.assert_allclose(chunk, factor * scaled, atol=1e-4 * max(1.0, abs(factor)))
    unweighted = pipe.family.encode_prompt(pipe, ["a red circle, " * 10], None, do_cfg=False, syntax="a1111")
    ids, _ = encode_inputs(pipe.tokenizer, ["a red circle, " * 10], "a1111")
    with torch.no_grad():
        reference = np.concatenate([model(torch.tensor(i[None], dtype=torch.long)).last_hidden_state[0] for i in ids])
    np.testing.assert_allclose(unweighted[0], reference, atol=2e-5)


def test_plain_text_reads_the_same_in_both_syntaxes(tiny_export: Path) -> None:
    pipe = DiffusionPipeline.from_pretrained(tiny_export, provider="cpu")
    settings = {"steps": 3, "seed": 4}
    plain = pipe.generate(GenerationRequest("a red circle", **settings), output_type="np").images
    a1111 = pipe.generate(GenerationRequest("a red circle", **settings, prompt_syntax="a1111"), output_type="np")
    np.testing.assert_array_equal(plain, a1111.images)
    emphasized = pipe.generate(GenerationRequest("a (red:1.5) circle", **settings, prompt_syntax="a1111"))
    assert np.abs(np.asarray(emphasized.images[0], np.float32) - plain[0] * 255).mean() > 0.5


def test_negative_and_positive_of_different_lengths(tiny_export: Path) -> None:
    pipe = DiffusionPipeline.from_pretrained(tiny_export, provider="cpu")
    out = pipe.generate(GenerationRequest(LONG, negative_prompt="blurry", steps=2, seed=1, prompt_syntax="a1111"))
    assert out.images[0].size == (pipe.config.default_resolution,) * 2


def test_sdxl_reads_a1111_syntax_with_both_encoders(tiny_sdxl: tuple[Path, Path]) -> None:
    pipe = DiffusionPipeline.from_pretrained(tiny_sdxl[1], provider="cpu")
    embeddings, pooled = pipe.family.encode_prompts(pipe, [LONG, "x"], [LONG, "x"], "a1111")
    assert embeddings.shape[:2] == (2, 3 * 77) and pooled.shape[0] == 2
    first_chunk, _ = pipe.family.encode_prompts(pipe, ["a (red:1.3) circle on a [blue] square,"], ["x"], "a1111")
    assert first_chunk.shape[1] == 77
    out = pipe.generate(GenerationRequest(LONG, steps=2, seed=1, prompt_syntax="a1111"))
    assert len(out.images) == 1


# Clip skip: parity with diffusers ------------------------------------------------------------------------------


def clip_skip_embeddings(tiny_pipeline: Path, prompts: list[str], skip: int) -> torch.Tensor:
    """diffusers' `clip_skip` (StableDiffusionPipeline.encode_prompt): the final layer norm on hidden state
    -(skip + 1). Written out because diffusers' own path reads `text_model`, which transformers 5's CLIP lacks."""
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_pipeline / "tokenizer")
    model = CLIPTextModel.from_pretrained(tiny_pipeline / "text_encoder").eval()
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids  # fmt: skip
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states[-(skip + 1)]
        return getattr(model, "text_model", model).final_layer_norm(hidden)


@pytest.mark.parametrize("skip", [1])
def test_clip_skip_matches_diffusers(reference_pipe, tiny_pipeline: Path, tiny_export: Path, skip: int) -> None:
    pipe = DiffusionPipeline.from_pretrained(tiny_export, provider="cpu", scheduler="euler")
    assert pipe.config.clip_skip_layers == 1  # two layers: the first can be reached
    from diffusers import EulerDiscreteScheduler

    original = reference_pipe.scheduler
    reference_pipe.scheduler = EulerDiscreteScheduler.from_config(original.config)
    try:
        expected = reference_pipe(
            prompt_embeds=clip_skip_embeddings(tiny_pipeline, ["a red circle"], skip),
            negative_prompt_embeds=clip_skip_embeddings(tiny_pipeline, [""], skip),
            num_inference_steps=3, generator=torch.Generator().manual_seed(2), output_type="np",
        ).images  # fmt: skip
    finally:
        reference_pipe.scheduler = original
    ours = pipe.generate(GenerationRequest("a red circle", steps=3, seed=2, clip_skip=skip), output_type="np")
    assert np.abs(ours.images - expected).mean() <= 1 / 255
    assert ours.parameters["Clip skip"] == skip + 1
    called = pipe("a red circle", num_inference_steps=3, seed=2, clip_skip=skip, output_type="np")  # the API's
    assert np.array_equal(called.images, ours.images)
    plain = pipe.generate(GenerationRequest("a red circle", steps=3, seed=2), output_type="np")
    assert np.abs(plain.images - expected).mean() > 1 / 255  # the skip changes the image


def test_clip_skip_beyond_the_encoder_is_refused(tiny_export: Path) -> None:
    pipe = DiffusionPipeline.from_pretrained(tiny_export, provider="cpu")
    with pytest.raises(ValueError, match="clip_skip: this model's text encoder can skip at most"):
        pipe.generate(GenerationRequest("x", steps=1, clip_skip=50))
    with pytest.raises(ValueError, match="clip_skip: this model's text encoder can skip at most"):
        pipe("x", num_inference_steps=1, clip_skip=50)


def test_the_python_api_takes_prompt_syntax(tiny_export: Path) -> None:
    """`pipe(..., prompt_syntax="a1111")`, as the README documents it: A1111's reading, plain by default."""
    pipe = DiffusionPipeline.from_pretrained(tiny_export, provider="cpu")
    for syntax in ("a1111", "plain"):
        request = GenerationRequest("a (red:1.5) circle", steps=2, seed=1, prompt_syntax=syntax)
        want = pipe.generate(request, output_type="np")
        got = pipe("a (red:1.5) circle", num_inference_steps=2, seed=1, prompt_syntax=syntax, output_type="np")
        assert np.array_equal(got.images, want.images)
    plain = pipe("a (red:1.5) circle", num_inference_steps=2, seed=1, output_type="np")
    assert np.array_equal(plain.images, got.images)  # plain is the default
    with pytest.raises(ValueError, match="prompt_syntax"):
        pipe("x", num_inference_steps=1, prompt_syntax="comfy")


# Front ends ---------------------------------------------------------------------------------------------------


def test_cli_reads_a1111_syntax_by_default_and_keeps_the_prompt_as_written(tiny_export: Path, tmp_path: Path):
    prompt = "a (red:1.4) circle BREAK [blue]"
    for syntax in ("a1111", "plain"):
        args = [
            "prompt",
            prompt,
            "-m",
            str(tiny_export),
            "--steps",
            "2",
            "--seed",
            "3",
            "-o",
            str(tmp_path / f"{syntax}.png"),
        ]
        if syntax == "plain":
            args += ["--prompt-syntax", "plain", "--clip-skip", "2"]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
    a1111, plain = Image.open(tmp_path / "a1111.png"), Image.open(tmp_path / "plain.png")
    assert a1111.text["parameters"].startswith(prompt + "\n")
    assert "Prompt syntax" not in a1111.text["parameters"]
    assert "Prompt syntax: plain" in plain.text["parameters"] and "Clip skip: 2" in plain.text["parameters"]
    pipe = DiffusionPipeline.from_pretrained(tiny_export)  # the CLI's default provider
    api = pipe.generate(GenerationRequest(prompt, steps=2, seed=3, prompt_syntax="a1111")).images[0]
    assert np.array_equal(np.asarray(a1111.convert("RGB")), np.asarray(api))


def test_tokenizer_chunks_use_the_models_ids(tiny_export: Path) -> None:
    tokenizer = CLIPTokenizer(tiny_export / "tokenizer", 77)
    ids, weights = tokenizer.chunks("(a:2), b")
    assert ids[0, 0] == tokenizer.bos_id and weights[0, 1] == 2.0 and ids.dtype == np.int32
    assert tokenizer.special_ids.comma == tokenizer.tokenizer.token_to_id(",</w>")


def test_batch_lines_default_to_the_commands_syntax(tiny_export: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "p.jsonl"
    line = {"prompt": "a (red) circle", "steps": 1, "seed": 1}
    lines = [{"id": "a", **line}, {"id": "b", **line, "prompt_syntax": "a1111"}]
    prompts.write_text("".join(json.dumps(x) + "\n" for x in lines))
    for syntax in ("a1111", "plain"):
        out = tmp_path / syntax
        args = ["batch", str(prompts), str(out), "-m", str(tiny_export), "--prompt-syntax", syntax]
        assert CliRunner().invoke(main, args).exit_code == 0
    read = {(s, i): Image.open(tmp_path / s / f"{i}.png").text["parameters"] for s in ("a1111", "plain") for i in "ab"}
    assert "Prompt syntax: plain" in read["plain", "a"]
    assert all("Prompt syntax" not in read[key] for key in (("a1111", "a"), ("a1111", "b"), ("plain", "b")))
