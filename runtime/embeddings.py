"""Textual-inversion embeddings, torch-free: trigger words whose learned vectors join the text encoder's table.

Files are read as A1111 and diffusers write them, `.safetensors` only: A1111's `emb_params` (vectors x width),
SDXL's `clip_l` and `clip_g` (one set per encoder), diffusers' `learned_embeds` (one tensor named after its
token, width or vectors x width). Pickled `.pt` / `.bin` files are refused: reading one runs code it holds.
The trigger word is the file's name, as in A1111 (diffusers' `token=` in the Python API).

Each embedding's vectors are appended to the encoder's token table (an initializer override handed to
onnxruntime when the session is made, as LoRAs are; the exporter records the table in the LoRA map), and
its word is added to the tokenizer with one id per vector (`word`, `word_1`, ... as diffusers names them), so a
prompt that says the word reads its vectors. In A1111's syntax an embedding is never cut across chunks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .echo import echo
from .files import UntrustedFileError
from .lora import TARGETS_FILE, base_weight, read_safetensors, read_targets
from .request import RequestError

LOG = logging.getLogger("sd_onnx")
MAX_EMBEDDINGS = 1000
MAX_VECTORS = 75  # one chunk: A1111 keeps an embedding in one
PICKLED = (".pt", ".bin", ".ckpt", ".pth")
SDXL_KEYS = {"clip_l": "text_encoder", "clip_g": "text_encoder_2"}


@dataclass(frozen=True)
class Embedding:
    """One trigger word and its vectors per text encoder (component -> vectors x width, float32)."""

    name: str
    file: Path
    vectors: dict[str, np.ndarray]

    @property
    def count(self) -> int:
        return len(next(iter(self.vectors.values())))


def read_embedding(file: str | Path, name: str | None = None) -> Embedding:
    """An embedding file; RequestError (field `embeddings`) naming the file when it cannot be one."""
    file = Path(file).expanduser()
    if file.suffix.lower() in PICKLED:
        raise RequestError("embeddings", f"{file.name}: pickled; only .safetensors embeddings are read")
    try:
        tensors, _ = read_safetensors(file)
    except UntrustedFileError as exc:
        raise RequestError("embeddings", str(exc)) from None
    vectors = _vectors(file, tensors)
    word = (name or file.stem).strip()
    if not word or any(c.isspace() for c in word) or len(word) > 100:
        raise RequestError("embeddings", f"{file.name}: the trigger word must be one word of 1-100 characters")
    counts = {len(v) for v in vectors.values()}
    if len(counts) != 1 or not 1 <= counts.pop() <= MAX_VECTORS:
        raise RequestError("embeddings", f"{file.name}: needs 1-{MAX_VECTORS} vectors, the same for each encoder")
    return Embedding(word, file, vectors)


def _vectors(file: Path, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    if "emb_params" in tensors:
        found = {"text_encoder": tensors["emb_params"]}
    elif set(SDXL_KEYS) <= set(tensors):
        found = {component: tensors[key] for key, component in SDXL_KEYS.items()}
    elif len(tensors) == 1:
        found = {"text_encoder": next(iter(tensors.values()))}
    else:
        raise RequestError("embeddings", f"{file.name}: holds no embedding (emb_params, clip_l/clip_g, or one tensor)")
    vectors = {}
    for component, array in found.items():
        array = np.asarray(array, np.float32)
        array = array[None] if array.ndim == 1 else array
        if array.ndim != 2 or not np.isfinite(array).all():
            raise RequestError("embeddings", f"{file.name}: vectors must be a finite (vectors x width) array")
        vectors[component] = array
    return vectors


def read_embeddings(folder: str | Path) -> tuple[list[Embedding], dict[str, str]]:
    """Every embedding in `folder` (not recursive), and why each other file was skipped (name -> reason)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise RequestError("embeddings", f"{folder}: no such folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".safetensors", *PICKLED))
    if len(files) > MAX_EMBEDDINGS:
        raise RequestError("embeddings", f"{folder}: more than {MAX_EMBEDDINGS} embedding files")
    loaded, skipped = [], {}
    for file in files:
        try:
            loaded.append(read_embedding(file))
        except RequestError as exc:
            skipped[file.stem] = exc.reason
    return loaded, skipped


def usable(embeddings: list[Embedding], widths: dict[str, int]) -> tuple[list[Embedding], dict[str, str]]:
    """The embeddings that fit this model (a vector set for each of its encoders, of its width), and why the
    others do not; a repeated word keeps its first file."""
    fit, skipped, seen = [], {}, set()
    for embedding in embeddings:
        wrong = {c: w for c, w in widths.items() if c not in embedding.vectors or embedding.vectors[c].shape[1] != w}
        if embedding.name.lower() in seen:
            skipped[embedding.name] = "another file has the same trigger word"
        elif wrong:
            skipped[embedding.name] = f"made for another model (this one's encoders are {widths})"
        else:
            fit.append(embedding)
            seen.add(embedding.name.lower())
    return fit, skipped


def table_override(component_dir: Path, embeddings: list[Embedding]) -> dict[str, np.ndarray]:
    """The encoder's token table with every embedding's vectors appended, in order, by its initializer name;
    empty without embeddings."""
    if not embeddings:
        return {}
    name, where = _table_entry(component_dir)
    rows = [e.vectors[component_dir.name] for e in embeddings]
    return {name: np.concatenate([base_weight(component_dir, where), *rows]).astype(where["dtype"])}


def describe(embeddings: list[Embedding], skipped: dict[str, str]) -> dict[str, Any]:
    """A1111's `GET /sdapi/v1/embeddings` answer."""
    loaded = {
        e.name: {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                 "shape": next(iter(e.vectors.values())).shape[1], "vectors": e.count}
        for e in embeddings
    }  # fmt: skip
    return {"loaded": loaded, "skipped": {name: {"reason": reason} for name, reason in skipped.items()}}


def token_table(component_dir: Path) -> tuple[int, int]:
    """(rows, width) of an encoder's token table, from its LoRA map; RequestError when it is not recorded."""
    rows, width = _table_entry(component_dir)[1]["shape"]
    return rows, width


def _table_entry(component_dir: Path) -> tuple[str, dict[str, Any]]:
    """The token table's initializer name and where its data is (LoRA map entry); RequestError when the
    export does not record a 2-D table."""
    targets = read_targets(component_dir) if (component_dir / TARGETS_FILE).is_file() else {}
    name = targets.get("token_embedding")
    where = targets.get("tensors", {}).get(name) if isinstance(name, str) else None
    if not where or len(where["shape"]) != 2:
        raise RequestError(
            "embeddings",
            f"{component_dir.name}: this export does not record its token table; re-export it with this version "
            "of sd-export to use embeddings",
        )
    return name, where


def gather(source: str | Path | list | tuple | None) -> tuple[list[Embedding], dict[str, str]]:
    """`from_pretrained(embeddings=...)`: a folder of embedding files, or a list of files (or (file, word)
    pairs); the embeddings read and why other files in a folder were skipped."""
    if source is None:
        return [], {}
    if isinstance(source, (str, Path)):
        return read_embeddings(source)
    if not isinstance(source, (list, tuple)):
        raise RequestError("embeddings", "must be a folder, or a list of files or (file, word) pairs")
    read = []
    for entry in source:
        if isinstance(entry, (str, Path)):
            read.append(read_embedding(entry))
        elif isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[1], str):
            read.append(read_embedding(entry[0], entry[1]))
        else:
            raise RequestError("embeddings", f"{echo(entry)} is neither a file nor a (file, word) pair")
    return read, {}
