"""Non-graph parts of the model folder: tokenizer (with a `tokenizers` tokenizer.json), scheduler, model_index."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from sd_onnx.runtime.manifest import COMPONENTS, TINY_VAE_COMPONENTS

from .errors import ExportError

TOKENIZER_JSON = "tokenizer.json"


def copy_tokenizer(source: Path, out: Path, name: str = "tokenizer") -> None:
    """Copy a tokenizer folder and make sure both formats are among its files: a `tokenizers` tokenizer.json
    (what the runtime reads) and the vocab.json + merges.txt pair (what transformers 4.x, and so Optimum, reads;
    transformers 5 saves only tokenizer.json)."""
    shutil.copytree(source / name, out / name)
    if not (out / name / TOKENIZER_JSON).is_file():
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(source / name, use_fast=True)
            tokenizer.backend_tokenizer.save(str(out / name / TOKENIZER_JSON))
        except Exception as exc:  # noqa: BLE001 - any failure here means the tokenizer files are unusable
            raise ExportError(f"{source / name}: cannot build tokenizer.json ({exc})") from exc
    if not (out / name / "vocab.json").is_file() or not (out / name / "merges.txt").is_file():
        write_bpe_files(out / name / TOKENIZER_JSON, out / name)


def write_bpe_files(tokenizer_json: Path, folder: Path) -> None:
    """vocab.json and merges.txt of a BPE tokenizer.json, as transformers' slow CLIPTokenizer saves them."""
    model = json.loads(tokenizer_json.read_text(encoding="utf-8"))["model"]
    if model.get("type") != "BPE":
        return  # not a CLIP-style tokenizer: nothing a slow CLIPTokenizer could read
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (folder / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def copy_scheduler(source: Path, out: Path, class_name: str | None = None) -> None:
    """The pipeline's scheduler config as standard JSON; with `class_name`, recorded as that sampler (the runtime's
    default). diffusers writes infinities as `-Infinity` (SANA's `lambda_min_clipped`), which is not JSON and which
    the runtime's reader refuses: such keys are dropped, their diffusers defaults being those same infinities."""
    shutil.copytree(source / "scheduler", out / "scheduler")
    path = out / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    config = {k: v for k, v in config.items() if not (isinstance(v, float) and not math.isfinite(v))}
    if class_name is not None:
        config["_class_name"] = class_name
    path.write_text(json.dumps(config, indent=2, allow_nan=False) + "\n")


CONFIG_SOURCES = {
    "text_encoder": "text_encoder",
    "text_encoder_2": "text_encoder_2",
    "text_encoder_3": "text_encoder_3",
    "unet": "unet",
    "transformer": "transformer",
    "vae_decoder": "vae",
    "vae_encoder": "vae",
}


def copy_component_configs(source: Path, out: Path, components: list[str], tiny_vae: Path | None = None) -> None:
    """Each graph's folder gets its torch model's config.json, which Optimum's ONNX pipeline requires."""
    for name in components:
        origin = tiny_vae if name in TINY_VAE_COMPONENTS else source / CONFIG_SOURCES[name]
        shutil.copy2(origin / "config.json", out / name / "config.json")


def write_model_index(source: Path, out: Path, components: list[str]) -> None:
    """model_index.json in the layout of diffusers' ONNX pipelines, which Optimum also reads. The class stays the
    source's diffusers class, as in Optimum's exports: Optimum's ORTDiffusionPipeline dispatches on it."""
    index = json.loads((source / "model_index.json").read_text())
    class_name = index.get("_class_name", "StableDiffusionPipeline")
    onnx_index = {
        "_class_name": "StableDiffusionPipeline" if class_name == "OnnxStableDiffusionPipeline" else class_name,
        "_diffusers_version": index.get("_diffusers_version", ""),
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": index["scheduler"],
        "tokenizer": index["tokenizer"],
    }
    if "transformer" in components:  # SD3 and FLUX pipelines have no safety checker slots
        for key in ("feature_extractor", "requires_safety_checker", "safety_checker"):
            del onnx_index[key]
    # SDXL's second tokenizer and flags; SD3's CLIP-G and T5 tokenizers, FLUX's T5 tokenizer; FLUX.2 [klein]'s
    # step-distilled flag (no classifier-free guidance).
    keys = ("tokenizer_2", "tokenizer_3", "force_zeros_for_empty_prompt", "requires_aesthetics_score", "is_distilled")
    for key in keys:
        if key in index:
            onnx_index[key] = index[key]
    # Optimum's and diffusers' pipelines know the standard components only; a tiny VAE beside is ours.
    onnx_index.update({name: ["diffusers", "OnnxRuntimeModel"] for name in components if name in COMPONENTS})
    (out / "model_index.json").write_text(json.dumps(onnx_index, indent=2) + "\n")
