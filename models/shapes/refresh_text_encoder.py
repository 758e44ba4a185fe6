"""Re-export the shipped shapes model's text encoder with what newer exporters add (clip skip outputs), without
retraining: the PyTorch CLIPTextModel is rebuilt from the fp32 graph's own weights, exported with the current
exporter (validated against that PyTorch model), and put into both shipped folders with their manifests
updated. Run after an exporter change to the text encoder:

    .venv/bin/python -m sd_onnx.models.shapes.refresh_text_encoder
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from transformers import CLIPTextConfig, CLIPTextModel

from sd_onnx.exporter.convert import DEFAULT_ATOL, export_component
from sd_onnx.exporter.source import inspect_folder
from sd_onnx.runtime.manifest import MANIFEST_NAME

HERE = Path(__file__).parent
FOLDERS = (HERE / "onnx", HERE / "onnx-int8")
PREFIX = "model."  # the exporter's wrapper module holds the CLIPTextModel as `model`


def rebuild_text_encoder(folder: Path) -> CLIPTextModel:
    """The CLIPTextModel whose export `folder/text_encoder/model.onnx` is: named initializers by name, the
    anonymous (transposed) MatMul weights by the node that reads them."""
    graph = onnx.load(str(folder / "text_encoder" / "model.onnx")).graph
    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    state = {name.removeprefix(PREFIX): array for name, array in values.items() if name.startswith(PREFIX)}
    for node in graph.node:
        if node.op_type == "MatMul" and node.input[1] in values and not node.input[1].startswith(PREFIX):
            module = node.name.removeprefix("/model/").removesuffix("/MatMul").replace("/", ".")
            state[f"{module}.weight"] = values[node.input[1]].T
    model = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise SystemExit(f"cannot rebuild the text encoder: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval()


def diffusers_layout(folder: Path, model: CLIPTextModel, work: Path) -> Path:
    """A diffusers-format folder with the rebuilt text encoder and the exported model's configs."""
    source = work / "source"
    model.save_pretrained(source / "text_encoder")
    shutil.copytree(folder / "tokenizer", source / "tokenizer")
    shutil.copytree(folder / "scheduler", source / "scheduler")
    (source / "unet").mkdir()
    (source / "vae").mkdir()
    shutil.copy(folder / "unet" / "config.json", source / "unet" / "config.json")
    shutil.copy(folder / "vae_decoder" / "config.json", source / "vae" / "config.json")
    shutil.copy(folder / "model_index.json", source / "model_index.json")
    return source


def main() -> None:
    model = rebuild_text_encoder(FOLDERS[0])
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        src = inspect_folder(diffusers_layout(FOLDERS[0], model, work))
        staging = work / "staging"
        info = export_component(src, "text_encoder", staging, opset=17, atol=DEFAULT_ATOL)
        for folder in FOLDERS:
            for path in (staging / "text_encoder").iterdir():
                shutil.copy(path, folder / "text_encoder" / path.name)
            manifest_path = folder / MANIFEST_NAME
            manifest = json.loads(manifest_path.read_text())
            entry = manifest["components"]["text_encoder"]
            entry.update(files=info.files, outputs=[vars(t) for t in info.outputs], validation=info.validation,
                         optimizations=info.optimizations)  # fmt: skip
            manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
            print(f"{folder.name}: text_encoder outputs {[t.name for t in info.outputs]}")


if __name__ == "__main__":
    main()
