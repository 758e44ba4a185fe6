"""The shapes judge and data: the judge must read the renderer's own images perfectly, and the held-out
split must leave every word seen in training."""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image

from sd_onnx.models.shapes import data
from sd_onnx.models.shapes.judge import Verdict, judge, score


def test_judge_scores_every_rendered_scene_right() -> None:
    rng = random.Random(0)
    combos = data.all_combinations()
    for i in range(400):
        color, shape, background = combos[i % len(combos)]
        scene = data.Scene(color, shape, background, rng.choice(data.SIZES), rng.choice(data.POSITIONS))
        verdict = judge(data.render(scene, 64, rng))
        assert all(score(scene, verdict).values()), (scene, verdict)


@pytest.mark.parametrize("resolution", [64, 128])
def test_judge_is_resolution_independent(resolution: int) -> None:
    scene = data.Scene("purple", "triangle", "yellow", "small", "on the right")
    assert all(score(scene, judge(data.render(scene, resolution))).values())


def test_judge_catches_wrong_attributes() -> None:
    drawn = data.render(data.Scene("red", "circle", "blue", "large", "on the left"))
    claimed = data.Scene("green", "square", "white", "small", "on the right")
    assert score(claimed, judge(drawn)) == {
        "color": False,
        "shape": False,
        "background": False,
        "size": False,
        "position": False,
    }


def test_judge_reports_no_object_on_a_plain_image() -> None:
    plain = Image.fromarray(np.full((64, 64, 3), data.COLORS["green"], dtype=np.uint8))
    assert judge(plain) == Verdict("green", None, None, None, None)


def test_optional_words_are_left_out_of_caption_and_score() -> None:
    scene = data.Scene("red", "square", "black")
    assert scene.caption == "a red square on a black background"
    assert set(score(scene, judge(data.render(scene)))) == {"color", "shape", "background"}


def test_captions_parse_back_to_their_scene() -> None:
    rng = random.Random(3)
    for _ in range(200):
        scene = data.random_scene(rng, data.all_combinations())
        assert data.parse_caption(scene.caption) == scene
    with pytest.raises(ValueError, match="not a shapes caption"):
        data.parse_caption("a photo of a cat")
    with pytest.raises(ValueError, match="not a shapes caption"):
        data.parse_caption("a small red on a blue background")


def test_held_out_split_is_fixed_and_composes_seen_words() -> None:
    seen, held = data.split_combinations()
    assert (seen, held) == data.split_combinations()
    assert len(held) == round(0.2 * len(data.all_combinations()))
    assert not set(seen) & set(held)
    for color in data.COLORS:
        assert any(c[0] == color for c in seen) and any(c[2] == color for c in seen)
    for shape in data.SHAPES:
        assert any(c[1] == shape for c in seen)
