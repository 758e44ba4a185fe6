"""`sd-export annotator NETWORK FILE OUT`: a ControlNet preprocessor's network to a validated ONNX folder that the
torch-free runtime runs (runtime/annotator_models.py): `model.onnx` (height and width dynamic) and
`annotator.json`.

The architectures are controlnet-aux's own, the package A1111's ControlNet extension and diffusers' examples
take their preprocessors from. Its `__init__` imports every detector, and some import torchvision, which has no
wheel here that imports beside the CPU torch; so the package is loaded without running its `__init__`, and only
the network's own module is imported (it needs einops and OpenCV besides torch). Install it with
`pip install --no-deps controlnet-aux==0.0.10 einops` for the same reason.

The network's post-processing that is arithmetic on its outputs goes into the graph, so that the runtime gets
the map itself: for HED, each side output bilinearly resized to the input's size (as controlnet-aux's
cv2.resize(INTER_LINEAR)), their mean and a sigmoid. The checkpoint is untrusted: it is read weights-only
(upscaler.read_state_dict) and must fit the architecture's state dict exactly.
"""

from __future__ import annotations

import importlib.util
import sys
import time
import types
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from sd_onnx.runtime.annotator_models import FORMAT_VERSION, GRAPH, NETWORKS, AnnotatorManifest
from sd_onnx.runtime.manifest import sha256_file

from .atomic import publish, staging_folder
from .components import ComponentSpec
from .errors import ExportError
from .trace import pack_graph, trace_component
from .upscaler import read_state_dict
from .validate import compare_outputs, open_session, signature

Log = Callable[[str], None]
INSTALL = "pip install --no-deps controlnet-aux==0.0.10 einops"
TRACE_SIZE, CHECK_SIZE = (64, 80), (72, 96)  # (height, width); different, so the dynamic axes are exercised
SPEC = ComponentSpec(
    "annotator",
    ("image",),
    ("edge",),
    {"image": {0: "batch", 2: "height", 3: "width"}, "edge": {0: "batch", 2: "height", 3: "width"}},
    load=lambda folder: None,  # the module comes from the checkpoint
    sample_inputs=lambda source, batch, generator: (),
)


def controlnet_aux_module(name: str) -> types.ModuleType:
    """controlnet-aux's submodule `name` ("hed"), imported without the package's `__init__` (see the module
    docstring); ExportError naming the install command when the package is missing."""
    package = sys.modules.get("controlnet_aux")
    if package is None:
        spec = importlib.util.find_spec("controlnet_aux")
        if spec is None or not spec.submodule_search_locations:
            raise ExportError(f"sd-export annotator needs controlnet-aux's architectures: {INSTALL}")
        package = types.ModuleType("controlnet_aux")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["controlnet_aux"] = package
    try:
        return importlib.import_module(f"controlnet_aux.{name}")
    except ImportError as exc:
        raise ExportError(f"controlnet-aux's {name} network cannot be imported ({exc}): {INSTALL}") from None


class HedEdges(torch.nn.Module):
    """controlnet-aux's HED network (ControlNetHED_Apache2) and its arithmetic after it: (N, 3, H, W) RGB pixels
    in 0..255 -> (N, 1, H, W) edge probability, the sigmoid of the mean of its five side outputs resized to the
    input's size."""

    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        size = image.shape[-2:]
        sides = [
            torch.nn.functional.interpolate(side, size=size, mode="bilinear", align_corners=False)
            for side in self.network(image)
        ]
        return torch.sigmoid(torch.stack(sides).mean(dim=0))


def build_network(network: str, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The graph's module for `network` with the checkpoint's weights (ExportError when they do not fit)."""
    if network != "hed":
        raise ExportError(f"no annotator network {network!r} (known: {', '.join(NETWORKS)})")
    hed = controlnet_aux_module("hed").ControlNetHED_Apache2()
    try:
        hed.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise ExportError(f"the checkpoint is not ControlNetHED_Apache2's ({(lines[1:] or lines)[0][:300]})") from None
    broken = [name for name, tensor in state.items() if not torch.isfinite(tensor).all()]
    if broken:
        raise ExportError(f"the checkpoint holds NaN or infinite weights ({', '.join(broken[:3])})")
    return HedEdges(hed.float().eval()).eval()


def export_annotator(
    network: str, file: Path, output: Path, *, opset: int = 17, atol: float = 1e-4, overwrite: bool = False,
    log: Log = print,
) -> AnnotatorManifest:  # fmt: skip
    """Export `network`'s checkpoint `file` to the folder `output` (written atomically), checked against PyTorch
    on a seeded random image of another size than the traced one."""
    file, output = Path(file).expanduser(), Path(output).expanduser()
    if output.exists() and not overwrite:
        raise ExportError(f"{output} already exists (use --overwrite to replace it)")
    module = build_network(network, read_state_dict(file, "annotator"))
    started = time.perf_counter()
    with staging_folder(output) as staging:
        validation, inputs, outputs = _export_graph(module, staging, opset, atol)
        log(f"{network}: exported and validated in {time.perf_counter() - started:.1f} s, max |onnx - torch| "
            f"{validation['max_abs_diff']:.2e}")  # fmt: skip
        manifest = AnnotatorManifest(
            network=network,
            graph=GRAPH,
            sha256=sha256_file(staging / GRAPH),
            inputs=inputs,
            outputs=outputs,
            format_version=FORMAT_VERSION,
            source={"file": file.name, "sha256": sha256_file(file), "architecture": "controlnet_aux"},
            validation=validation,
        )
        manifest.save(staging)
        publish(staging, output)
    log(f"wrote {output}")
    return manifest


def _export_graph(module: torch.nn.Module, folder: Path, opset: int, atol: float) -> tuple[dict, list, list]:
    generator = torch.Generator().manual_seed(0)
    trace = torch.rand(1, 3, *TRACE_SIZE, generator=generator) * 255
    check = torch.rand(1, 3, *CHECK_SIZE, generator=generator) * 255
    with torch.no_grad():
        reference = [module(check).numpy()]
    traced = trace_component(module, SPEC, (trace,), folder / "_trace", opset)
    pack_graph(traced, folder / GRAPH)
    session = open_session(folder / GRAPH)
    validation = compare_outputs("annotator", session, {"image": check.numpy()}, reference, atol)
    inputs, outputs = signature(session)
    return validation, [asdict(s) for s in inputs], [asdict(s) for s in outputs]
