"""Non-graph parts of the model folder: tokenizer (with a `tokenizers` tokenizer.json), scheduler, model_index."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .errors import ExportError

TOKENIZER_JSON = "tokenizer.json"


def copy_tokenizer(source: Path, out: Path, name: str = "tokenizer") -> None:
    """Copy a tokenizer folder and make sure a `tokenizers`-format tokenizer.json is among its files."""
    shutil.copytree(source / name, out / name)
    if (out / name / TOKENIZER_JSON).is_file():
        return
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(source / name, use_fast=True)
        tokenizer.backend_tokenizer.save(str(out / name / TOKENIZER_JSON))
    except Exception as exc:  # noqa: BLE001 - any failure here means the tokenizer files are unusable
        raise ExportError(f"{source / name}: cannot build tokenizer.json ({exc})") from exc


def copy_scheduler(source: Path, out: Path) -> None:
    shutil.copytree(source / "scheduler", out / "scheduler")


CONFIG_SOURCES = {
    "text_encoder": "text_encoder",
    "text_encoder_2": "text_encoder_2",
    "unet": "unet",
    "vae_decoder": "vae",
    "vae_encoder": "vae",
}


def copy_component_configs(source: Path, out: Path, components: list[str]) -> None:
    """Each graph's folder gets its torch model's config.json, which Optimum's ONNX pipeline requires."""
    for name in components:
        shutil.copy2(source / CONFIG_SOURCES[name] / "config.json", out / name / "config.json")


def write_model_index(source: Path, out: Path, components: list[str]) -> None:
    """model_index.json in the layout of diffusers' OnnxStableDiffusionPipeline, which Optimum also reads."""
    index = json.loads((source / "model_index.json").read_text())
    onnx_index = {
        "_class_name": "OnnxStableDiffusionPipeline",
        "_diffusers_version": index.get("_diffusers_version", ""),
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": index["scheduler"],
        "tokenizer": index["tokenizer"],
    }
    for key in ("tokenizer_2", "force_zeros_for_empty_prompt", "requires_aesthetics_score"):  # SDXL
        if key in index:
            onnx_index[key] = index[key]
    onnx_index.update({name: ["diffusers", "OnnxRuntimeModel"] for name in components})
    (out / "model_index.json").write_text(json.dumps(onnx_index, indent=2) + "\n")
