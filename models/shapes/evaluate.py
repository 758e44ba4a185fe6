"""Score an exported shapes model with the judge: accuracy per attribute on seen and held-out combinations.

    python -m sd_onnx.models.shapes.evaluate MODEL_DIR [--prompts 200] [--json scores.json] [--grid grid.png]
        [--reference FP32_DIR] [--provider openvino] [--reference-provider cpu]

With --reference, the same prompts and seeds also run through the reference export (say, fp32 for an int8
model, or the same model on another engine: --provider openvino --reference MODEL_DIR) and the images are
compared: PSNR and mean abs difference (0-255).

Every prompt names all five attributes (size, color, shape, position, background), so each attribute is
judged on every image. Uses only the runtime (no torch).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ...runtime.pipeline import StableDiffusionPipeline
from .data import Scene, random_scene, render, split_combinations
from .judge import judge, score

EVAL_SEED = 1234
STEPS = 20
BATCH = 25
GRID_PROMPTS = (
    "a red circle on a blue background",
    "a large yellow square in the center on a black background",
    "a small white triangle on the left on a green background",
    "a green circle at the top on a white background",
    "a purple square on the right on a yellow background",
    "a large orange triangle at the bottom on a blue background",
    "a small black circle in the center on a orange background",
    "a blue triangle on the left on a red background",
)


def eval_scenes(count: int) -> dict[str, list[Scene]]:
    """`count` fully specified scenes from the seen combinations and `count` from the held-out ones."""
    seen, held = split_combinations()
    rng = random.Random(EVAL_SEED)
    return {
        "seen": [random_scene(rng, seen, 1.0, 1.0) for _ in range(count)],
        "held_out": [random_scene(rng, held, 1.0, 1.0) for _ in range(count)],
    }


def generate(pipe: StableDiffusionPipeline, prompts: list[str], seed: int, **kwargs: object) -> list[Image.Image]:
    """Images for `prompts` in batches of BATCH (seed + batch index, so runs are reproducible)."""
    images: list[Image.Image] = []
    for start in range(0, len(prompts), BATCH):
        out = pipe(prompts[start : start + BATCH], num_inference_steps=STEPS, seed=seed + start, **kwargs)
        images += out.images
    return images


def accuracy(scenes: list[Scene], images: list[Image.Image]) -> dict[str, float]:
    """Fraction of images the judge finds right, per attribute and for all attributes at once."""
    verdicts = [score(s, judge(img)) for s, img in zip(scenes, images, strict=True)]
    result = {attr: sum(v[attr] for v in verdicts) / len(verdicts) for attr in verdicts[0]}
    result["all"] = sum(all(v.values()) for v in verdicts) / len(verdicts)
    return result


def image_difference(images: list[Image.Image], reference: list[Image.Image]) -> dict[str, float]:
    """Mean PSNR (dB) and mean abs difference (0-255) of `images` against `reference`, pairwise."""
    a = np.stack([np.asarray(i, dtype=np.float64) for i in images])
    b = np.stack([np.asarray(i, dtype=np.float64) for i in reference])
    mse = np.maximum(((a - b) ** 2).mean(axis=(1, 2, 3)), 1e-10)
    return {
        "psnr_db": round(float(np.mean(10 * np.log10(255.0**2 / mse))), 2),
        "mean_abs_diff": round(float(np.abs(a - b).mean()), 3),
    }


def control_accuracy(pipe: StableDiffusionPipeline, controlnet: str, count: int, steps: int = STEPS) -> dict:
    """Whether images follow a ControlNet's outline: for `count` scenes whose caption names colour, shape and
    background only, the judge's position and size of the object drawn with the outline of the scene rendered
    at a position and size (as the `outline` trainer's control images are made), and without it (chance)."""
    from ...runtime.annotators import canny

    seen, _ = split_combinations()
    rng = random.Random(EVAL_SEED + 1)
    scenes = [random_scene(rng, seen, 1.0, 1.0) for _ in range(count)]
    report = {}
    for name, control in (("with", True), ("without", False)):
        hits = {"position": 0, "size": 0, "shape": 0}
        for i, scene in enumerate(scenes):
            caption = Scene(scene.color, scene.shape, scene.background).caption
            kwargs = {}
            if control:
                picture = render(scene, pipe.config.default_resolution, random.Random(i))
                edges = Image.fromarray(canny(np.asarray(picture), 100, 200)).convert("RGB")
                kwargs = {"control_image": edges, "controlnet": controlnet}
            image = pipe(caption, num_inference_steps=steps, seed=EVAL_SEED + i, **kwargs).images[0]
            verdict = judge(image)
            hits = {k: v + (getattr(verdict, k) == getattr(scene, k)) for k, v in hits.items()}
        report[name] = {k: v / count for k, v in hits.items()}
    return report


def sample_grid(pipe: StableDiffusionPipeline, prompts: tuple[str, ...] = GRID_PROMPTS, zoom: int = 2) -> Image.Image:
    """One image per prompt, upscaled `zoom` times, with the prompt under it."""
    images = generate(pipe, list(prompts), EVAL_SEED)
    tile = images[0].width * zoom
    caption_h, cols = 40, 4
    rows = (len(images) + cols - 1) // cols
    width = max(tile, 200)
    grid = Image.new("RGB", (cols * width, rows * (tile + caption_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (prompt, image) in enumerate(zip(prompts, images, strict=True)):
        x, y = (i % cols) * width, (i // cols) * (tile + caption_h)
        grid.paste(image.resize((tile, tile), Image.Resampling.NEAREST), (x + (width - tile) // 2, y))
        words = prompt.split(" on a ")
        draw.text((x + 4, y + tile + 2), words[0], fill="black")
        draw.text((x + 4, y + tile + 16), "on a " + words[1], fill="black")
    return grid


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--guidance", type=float, default=None, help="Default: the model's own.")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--grid", type=Path, default=None)
    parser.add_argument("--reference", type=Path, default=None, help="Export to compare images with (same seeds).")
    parser.add_argument("--provider", default="auto", help="Engine of MODEL, as sd-run --provider takes it.")
    parser.add_argument("--reference-provider", default="cpu", help="Engine of the reference.")
    args = parser.parse_args(argv)
    pipe = StableDiffusionPipeline.from_pretrained(args.model, provider=args.provider)
    reference = None
    if args.reference:
        reference = StableDiffusionPipeline.from_pretrained(args.reference, provider=args.reference_provider)
    started = time.time()
    report = {
        "model": args.model.name,
        "steps": STEPS,
        "guidance_scale": args.guidance or pipe.config.guidance_scale,
        "scheduler": pipe.scheduler_name,
        "prompts_per_split": args.prompts,
        "reference": args.reference.name if args.reference else None,
        "engine": pipe.engine,
        "reference_engine": reference.engine if reference else None,
    }
    for split, scenes in eval_scenes(args.prompts).items():
        prompts = [s.caption for s in scenes]
        images = generate(pipe, prompts, EVAL_SEED, guidance_scale=args.guidance)
        report[split] = accuracy(scenes, images)
        if reference:
            expected = generate(reference, prompts, EVAL_SEED, guidance_scale=args.guidance)
            report[split]["vs_reference"] = image_difference(images, expected)
        print(split, json.dumps(report[split]), file=sys.stderr)
    report["seconds"] = round(time.time() - started, 1)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.grid:
        sample_grid(pipe).save(args.grid)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
