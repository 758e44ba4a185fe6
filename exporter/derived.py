"""Graphs derived from the UNet graph as shipped (DeepCache's shallow UNet, the token-merging UNet, the UNet
stages), or from the transformer's (skip-layer guidance).

Each lives beside its base graph (in `unet/`, `transformer/`) and reads its weights from that graph's external-data
file, so the weights are stored once and a derived graph follows the UNet's precision (fp32, fp16, int8) without another
export or calibration. The UNet graph is rewritten first (`share_weights`); the derived graph is then saved with
the same initializer records.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx.external_data_helper import uses_external_data

from sd_onnx.runtime.manifest import STAGE_COMPONENTS, ComponentInfo, Manifest, sha256_file

from .atomic import publish, staging_folder
from .errors import ExportError
from .lora_targets import TARGETS_FILE, write_targets
from .trace import ALIGNMENT, EXTERNAL_DATA_SUFFIX, point_to
from .validate import open_session, signature

MIN_EXTERNAL_BYTES = 1024  # smaller tensors stay inside each graph (scalars, shapes, scales)
DERIVED_FILES = {
    "unet_shallow": "shallow.onnx",
    "transformer_skip": "skip_layers.onnx",
    "unet_tome": "tome.onnx",
    "unet_control": "control.onnx",
    **{name: f"{name.removeprefix('unet_')}.onnx" for name in STAGE_COMPONENTS},
}
Log = Callable[[str], None]


def load_graph(folder: Path, manifest: Manifest, base: str = "unet") -> tuple[onnx.ModelProto, Path]:
    """The `base` graph (the UNet, or the transformer) without its weights' bytes, and its file."""
    full_file = folder / manifest.components[base].file
    return onnx.load(str(full_file), load_external_data=False), full_file


def save_graph(model: onnx.ModelProto, full_file: Path) -> None:
    """Write the (rewritten) base graph with every weight in `<model>_data`, keeping the LoRA map current."""
    share_weights(model, full_file)
    onnx.save_model(model, str(full_file))
    targets = full_file.parent / TARGETS_FILE
    if targets.is_file():  # load-time LoRAs read weights at recorded offsets, which may have moved
        write_targets(json.loads(targets.read_text())["modules"], full_file)


def share_weights(model: onnx.ModelProto, full_file: Path) -> None:
    """Move every weight still inside the graph into `<model>_data` (page-aligned, so onnxruntime can map it), so
    that graphs derived from this one point at the same bytes."""
    data_path = full_file.with_name(full_file.name + EXTERNAL_DATA_SUFFIX)
    inline = [t for t in model.graph.initializer if not uses_external_data(t) and len(t.raw_data) >= MIN_EXTERNAL_BYTES]
    if not inline:
        return
    with open(data_path, "ab") as data:
        for tensor in inline:
            data.write(b"\0" * (-data.tell() % ALIGNMENT))
            offset = data.tell()
            data.write(tensor.raw_data)
            length = len(tensor.raw_data)
            tensor.ClearField("raw_data")
            point_to(tensor, data_path.name, offset, length)


def record(
    folder: Path, manifest: Manifest, name: str, graph: onnx.ModelProto, validation: dict[str, Any], base: str = "unet"
) -> None:
    """Save derived graph `name` beside its `base` graph and write both entries into the manifest."""
    base_info = manifest.components[base]
    full_file = folder / base_info.file
    derived_file = full_file.parent / DERIVED_FILES[name]
    onnx.save_model(graph, str(derived_file))
    others = ("config.json", *DERIVED_FILES.values())
    base_info.files = _hashes(folder, [p for p in full_file.parent.iterdir() if p.is_file() and p.name not in others])
    base_info.inputs, base_info.outputs = signature(open_session(full_file))
    inputs, outputs = signature(open_session(derived_file))
    data = full_file.with_name(full_file.name + EXTERNAL_DATA_SUFFIX)
    manifest.components[name] = ComponentInfo(
        file=derived_file.relative_to(folder).as_posix(),
        files=_hashes(folder, [derived_file, data]),
        inputs=inputs,
        outputs=outputs,
        precision=base_info.precision,
        opset=base_info.opset,
        validation=validation,
        quantization=base_info.quantization,
        optimizations=base_info.optimizations,
    )
    for other in DERIVED_FILES:  # the UNet's data file changed under graphs derived before (and still there)
        if other != name and other in manifest.components and (folder / manifest.components[other].file).is_file():
            manifest.components[other].files = _hashes(folder, [folder / manifest.components[other].file, data])
    manifest.save(folder)


def _hashes(folder: Path, files: list[Path]) -> dict[str, str]:
    return {f.relative_to(folder).as_posix(): sha256_file(f) for f in sorted(files)}


def sample_feeds(session: Any, manifest: Manifest, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Seeded inputs for every UNet input at batch 2 and a small latent size from the model's config (inputs a
    derived graph adds are the caller's)."""
    config = manifest.config
    side = max(config.size_multiple // config.vae_scale_factor, min(config.sample_size, 32))
    dims = {"batch": 2, "steps": 1, "height": side, "width": side, "sequence": config.max_token_length}
    feeds = {}
    for arg in session.get_inputs():
        shape = [d if isinstance(d, int) else dims.get(str(d), 2) for d in arg.shape]
        dtype = np.float16 if arg.type == "tensor(float16)" else np.float32
        value = rng.uniform(1, 999, shape) if arg.name == "timestep" else rng.standard_normal(shape)
        feeds[arg.name] = value.astype(np.int64 if arg.type == "tensor(int64)" else dtype)
    return feeds


def unet_output(session: Any, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return session.run([session.get_outputs()[0].name], feeds)[0]


def derive_folder(
    source: Path, output: Path, add: Callable[[Path, Manifest], Manifest], *, overwrite: bool = False, log: Log = print
) -> Manifest:
    """Copy the export `source` to `output` with `add(folder, manifest)` applied, atomically."""
    source, output = Path(source).expanduser().resolve(), Path(output).expanduser().resolve()
    Manifest.load(source)
    if output.exists() and not overwrite:
        raise ExportError(f"{output} already exists (use --overwrite to replace it)")
    with staging_folder(output) as staging:
        shutil.copytree(source, staging, dirs_exist_ok=True)
        manifest = add(staging, Manifest.load(staging))
        publish(staging, output)
    log(f"wrote {output}")
    return manifest
