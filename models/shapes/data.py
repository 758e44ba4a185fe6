"""Rendered training data for the shapes model: one shape on a plain background, with its caption.

Captions follow the grammar
`a [small|large] {color} {shape} [in the center|on the left|...] on a {color} background`,
size and position being optional (left out, they are drawn at random). A fixed 20 % of the
(color, shape, background) combinations never appear in training, to measure composition.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "orange": (245, 135, 20),
    "purple": (135, 40, 170),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
POSITIONS = ("in the center", "on the left", "on the right", "at the top", "at the bottom")
# Object centre and side as fractions of the image side.
ANCHORS: dict[str, tuple[float, float]] = {
    "in the center": (0.5, 0.5),
    "on the left": (0.25, 0.5),
    "on the right": (0.75, 0.5),
    "at the top": (0.5, 0.25),
    "at the bottom": (0.5, 0.75),
}
SIDE: dict[str, float] = {"small": 0.28, "large": 0.42}
HELD_OUT_FRACTION = 0.2
# Every word the captions use: recorded in the exported manifest, so the runtime can name the words of a prompt
# that this model never saw (it ignores them).
VOCABULARY = sorted({"a", "on", "background", *COLORS, *SHAPES, *SIZES, *" ".join(POSITIONS).split()})
SPLIT_SEED = 7
SUPERSAMPLE = 4


@dataclass(frozen=True)
class Scene:
    """Everything the renderer draws and the caption says (size/position None: not named in the caption)."""

    color: str
    shape: str
    background: str
    size: str | None = None
    position: str | None = None

    @property
    def caption(self) -> str:
        words = ["a"]
        if self.size:
            words.append(self.size)
        words += [self.color, self.shape]
        if self.position:
            words.append(self.position)
        words += ["on a", self.background, "background"]
        return " ".join(words)


def parse_caption(caption: str) -> Scene:
    """The scene a caption of the grammar describes; ValueError for anything else."""
    words = caption.strip().split()
    body = words[1:-4]
    size = body.pop(0) if body and body[0] in SIZES else None
    if len(body) < 2 or words[0] != "a" or words[-4:-2] != ["on", "a"] or words[-1] != "background":
        raise ValueError(f"not a shapes caption: {caption!r}")
    color, shape, position, background = body[0], body[1], " ".join(body[2:]) or None, words[-2]
    if color not in COLORS or shape not in SHAPES or background not in COLORS or position not in (None, *POSITIONS):
        raise ValueError(f"not a shapes caption: {caption!r}")
    return Scene(color, shape, background, size, position)


def all_combinations() -> list[tuple[str, str, str]]:
    """Every (object color, shape, background color) with the object visible on its background."""
    return [(c, s, b) for c in COLORS for s in SHAPES for b in COLORS if b != c]


def split_combinations() -> tuple[list[tuple[str, str, str]], list[tuple[str, str, str]]]:
    """(seen, held_out): a fixed, seeded 20 % of combinations held out, each color and shape still seen
    as object and as background in training so that held-out scenes are new compositions of known words."""
    combos = all_combinations()
    rng = random.Random(SPLIT_SEED)
    shuffled = rng.sample(combos, len(combos))
    n_held = round(HELD_OUT_FRACTION * len(combos))
    held: list[tuple[str, str, str]] = []
    for combo in shuffled:
        rest = [c for c in combos if c not in held and c != combo]
        covered = all(
            any(c[0] == color for c in rest) and any(c[2] == color for c in rest) for color in COLORS
        ) and all(any(c[1] == shape for c in rest) for shape in SHAPES)
        if covered:
            held.append(combo)
        if len(held) == n_held:
            break
    seen = [c for c in combos if c not in held]
    return seen, sorted(held)


def random_scene(
    rng: random.Random, combos: list[tuple[str, str, str]], p_size: float = 0.5, p_pos: float = 0.5
) -> Scene:
    """A scene from one of `combos`; size and position are named in the caption with the given odds."""
    color, shape, background = rng.choice(combos)
    return Scene(
        color,
        shape,
        background,
        size=rng.choice(SIZES) if rng.random() < p_size else None,
        position=rng.choice(POSITIONS) if rng.random() < p_pos else None,
    )


def render(scene: Scene, resolution: int = 64, rng: random.Random | None = None) -> Image.Image:
    """Draw the scene, anti-aliased by supersampling. Unnamed size/position are drawn at random (`rng`)."""
    rng = rng or random.Random(0)
    size = scene.size or rng.choice(SIZES)
    position = scene.position or rng.choice(POSITIONS)
    big = resolution * SUPERSAMPLE
    cx, cy = (f * big for f in ANCHORS[position])
    half = SIDE[size] * big / 2
    jitter = 0.03 * big
    cx += rng.uniform(-jitter, jitter)
    cy += rng.uniform(-jitter, jitter)
    box = (cx - half, cy - half, cx + half, cy + half)
    image = Image.new("RGB", (big, big), COLORS[scene.background])
    draw = ImageDraw.Draw(image)
    fill = COLORS[scene.color]
    if scene.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif scene.shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, box[1]), (box[2], box[3]), (box[0], box[3])], fill=fill)
    return image.resize((resolution, resolution), Image.Resampling.BOX)


def batch(
    rng: random.Random, combos: list[tuple[str, str, str]], size: int, resolution: int = 64
) -> tuple[np.ndarray, list[str]]:
    """`size` rendered scenes as float32 NCHW in [-1, 1] and their captions."""
    scenes = [random_scene(rng, combos) for _ in range(size)]
    pixels = np.stack([np.asarray(render(s, resolution, rng), dtype=np.float32) for s in scenes])
    return (pixels / 127.5 - 1.0).transpose(0, 3, 1, 2), [s.caption for s in scenes]
