"""`sd-export convert --precision int8|int4` and `sd-export quantize` for transformer models: weight-only
quantization (quantize_weights.py) of the transformer and the T5/LLM text encoders of an export, each measured
against its fp32 graph on held-out inputs and recorded in the manifest."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from sd_onnx.runtime.manifest import Manifest, ModelConfig, TensorSpec

from .errors import ExportError
from .quantize import component_info
from .quantize_weights import SCHEMES, quantize_weights, scheme_for
from .validate import open_session

Log = Callable[[str], None]
HELD_OUT_SEED = 1000  # fidelity inputs: seeds that the exporter's trace (0) and validation (1) never use
# Worst cosine of a quantized graph's outputs against its fp32 graph's on held-out inputs under which the exporter
# warns. Measured on the tiny random models (tests/test_transformer_quantize.py): int8 0.9999-0.99996, int4
# 0.993-0.998; full-size random weights (benchmarks/results/transformer_fullsize_*.json): SD3.5 Medium's transformer
# int8 0.99994, int4 0.9974; T5-XXL, 24 random layers deep, lower (int4 under 0.98: the exporter warns).
MIN_COSINE = {"int8": 0.999, "int4": 0.98}
CLIP_MODEL_TYPES = ("clip_text_model", "clip_text_with_projection", "clip")


def weight_only_components(folder: Path, components: dict[str, Any]) -> tuple[str, ...]:
    """The components weight-only quantization is for: the `transformer` and every text encoder that is not CLIP
    (T5, LLMs; by its config.json's model_type). CLIP runs once per prompt and is small; the VAE is convolutional."""
    chosen = []
    for name in components:
        if name == "transformer":
            chosen.append(name)
        elif name.startswith("text_encoder"):
            model_type = _component_config(folder, name).get("model_type", "")
            if model_type and model_type not in CLIP_MODEL_TYPES:
                chosen.append(name)
    return tuple(chosen)


def quantize_weights_in_place(
    folder: Path, precision: str, components: tuple[str, ...] | None = None, log: Log = print
) -> Manifest:
    """Replace the fp32 graphs of `components` (default: weight_only_components) in `folder` by weight-only
    `precision` ("int8" or "int4") ones and update its manifest."""
    if precision not in SCHEMES:
        raise ExportError(f"weight-only quantization is int8 or int4, not {precision!r}")
    manifest = Manifest.load(folder)
    components = components or weight_only_components(folder, manifest.components)
    missing = [c for c in components if c not in manifest.components]
    if missing:
        raise ExportError(f"{folder}: has no {', '.join(missing)} to quantize")
    for i, name in enumerate(components, 1):
        started = time.perf_counter()
        info = manifest.components[name]
        if info.precision != "fp32":
            raise ExportError(f"{name}: is {info.precision}; weight-only quantization starts from an fp32 export")
        vocab_size = _component_config(folder, name).get("vocab_size", 1000)
        feeds = held_out_feeds(info.inputs, info.validation["input_shapes"], manifest.config, vocab_size)
        fp32_file = folder / info.file
        fp32_copy = folder / f"_{name}_fp32"
        shutil.move(fp32_file.parent, fp32_copy)
        fp32_file.parent.mkdir()
        if (fp32_copy / "config.json").is_file():  # the LoRA map stays behind: quantized weights take no LoRA
            shutil.copy2(fp32_copy / "config.json", fp32_file.parent / "config.json")
        report = quantize_weights(fp32_copy / fp32_file.name, fp32_file, scheme_for(name, precision))
        report["validation"] = fidelity(fp32_copy / fp32_file.name, fp32_file, feeds)
        report["validation"]["min_cosine"] = MIN_COSINE[precision]
        manifest.components[name] = component_info(folder, name, info, precision, report)
        shutil.rmtree(fp32_copy)
        cosine = manifest.components[name].validation["cosine_min"]
        log(
            f"[{i}/{len(components)}] {name}: {precision} weight-only ({report['operator']}), "
            f"{sum(report['quantized_ops'].values())} MatMuls, cosine vs fp32 {cosine:.5f}, "
            f"{time.perf_counter() - started:.1f} s"
        )
        if cosine < MIN_COSINE[precision]:
            log(f"warning: {name}: cosine {cosine:.4f} is under {MIN_COSINE[precision]} (see its manifest entry)")
    manifest.save(folder)
    return manifest


def held_out_feeds(
    inputs: list[TensorSpec], shapes: dict[str, list[int]], config: ModelConfig, vocab_size: int, samples: int = 2
) -> list[dict[str, np.ndarray]]:
    """Seeded random inputs of the shapes the exporter validated the graph at (`shapes`, from the manifest), with
    values that mean something where the name says so: token ids inside the vocabulary, masks all ones,
    timesteps in the family's range (SD3 and SANA: 0..1000 x its timestep_scale, the others 0..1), the guidance
    scale, FLUX's position ids; anything else standard normal."""
    thousand = config.family in ("sd3", "sana")
    feeds = []
    for sample in range(samples):
        rng = np.random.default_rng(HELD_OUT_SEED + sample)
        feed = {}
        for spec in inputs:
            shape = tuple(shapes[spec.name])
            if "mask" in spec.name:
                value = np.ones(shape)
            elif spec.dtype.startswith("int"):
                value = rng.integers(0, vocab_size, shape)
            elif spec.name == "timestep":
                value = rng.random(shape) * (1000.0 * config.timestep_scale if thousand else 1.0)
            elif spec.name == "guidance":
                value = (1 + 4 * rng.random(shape)) * config.guidance_embeds_scale
            elif spec.name in ("txt_ids", "img_ids"):
                value = _position_ids(spec.name, shape)
            else:
                value = rng.standard_normal(shape)
            feed[spec.name] = value.astype(spec.dtype)
        feeds.append(feed)
    return feeds


def _position_ids(name: str, shape: tuple[int, ...]) -> np.ndarray:
    """FLUX's ids: image tokens (0, row, column[, 0]) over a square grid (else one row); text tokens zeros (FLUX.1)
    or (0, 0, 0, index) (FLUX.2's four axes)."""
    tokens, axes = shape
    ids = np.zeros(shape)
    if name == "txt_ids":
        if axes == 4:
            ids[:, 3] = np.arange(tokens)
        return ids
    side = int(round(tokens**0.5))
    columns = side if side * side == tokens else tokens
    ids[:, 1], ids[:, 2] = np.arange(tokens) // columns, np.arange(tokens) % columns
    return ids


def fidelity(float_file: Path, quantized_file: Path, feeds: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    """Quantized vs float graph on held-out inputs, every output of every sample: worst cosine similarity, max and
    mean abs difference. One session at a time, so a full-size model's float graph and its quantized one are never
    in memory together."""
    reference = _outputs(float_file, feeds)
    quantized = _outputs(quantized_file, feeds)
    cosines, max_diffs, mean_diffs = [], [], []
    for want, got in zip(reference, quantized, strict=True):
        for a, b in zip(want, got, strict=True):
            a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
            cosines.append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30)))
            max_diffs.append(float(np.abs(a - b).max()))
            mean_diffs.append(float(np.abs(a - b).mean()))
    return {
        "reference": "fp32 onnx",
        "held_out_samples": len(feeds),
        "held_out_seed": HELD_OUT_SEED,
        "input_shapes": {k: list(v.shape) for k, v in feeds[0].items()},
        "cosine_min": min(cosines),
        "max_abs_diff": max(max_diffs),
        "mean_abs_diff": float(np.mean(mean_diffs)),
    }


def _outputs(model_file: Path, feeds: list[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
    session = open_session(model_file)  # a large graph's weights unpacked: the float reference fits beside nothing
    outputs = [session.run(None, feed) for feed in feeds]
    del session
    return outputs


def _component_config(folder: Path, name: str) -> dict[str, Any]:
    path = folder / name / "config.json"
    return json.loads(path.read_text()) if path.is_file() else {}
