"""ControlNet export (`sd-export convert --controlnet SOURCE[:NAME]`, `sd-export controlnet SOURCE MODEL`).

A ControlNet is a conditioning input of the UNet, not another pipeline: its graph `controlnet_<NAME>` maps the
UNet's inputs plus a control image (pixels in [0, 1]) to one residual per skip connection and one for the middle
block, and the UNet graph `unet_control` adds them where diffusers' UNet2DConditionModel does
(`down_block_additional_residuals`, `mid_block_additional_residual`). The runtime scales and sums the residuals
of several ControlNets (diffusers' conditioning scale, guess mode and guidance window are multiplications of
the residuals, so none of them is in a graph).

`unet_control` is derived from the UNet graph as shipped (fp32, fp16 or int8, see derived.py): the UNet's skip
connections are the `Concat`s in its up blocks whose second input comes from outside them, met in the order
of the down blocks reversed; each gets `Add(skip, down_block_res_i)` in front, and the first one's first
input (the middle block's output) `Add(mid, mid_block_res)`. It reads the UNet's weights, so they are stored
once. It is checked against PyTorch's UNet given the same residuals where the export has the UNet's weights
(`convert`), and against the UNet graph itself with zero residuals where it has not (`add_controlnet`).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper

from sd_onnx.runtime.hub import is_hub_id, split_revision
from sd_onnx.runtime.manifest import CONTROL_UNET, Manifest, ModelConfig, controlnet_component
from sd_onnx.runtime.manifest_schema import CONTROLNET_NAME

from .components import IMAGE_AXES, ComponentSpec, Inputs, _unet_inputs
from .derived import derive_folder, load_graph, record, save_graph
from .errors import ExportError
from .validate import compare_outputs, open_session

QDQ = ("QuantizeLinear", "DequantizeLinear")
Log = Callable[[str], None]


@dataclass(frozen=True)
class ControlNetSource:
    """A ControlNet to export: where it is (diffusers folder, .safetensors file or hub id) and its name."""

    source: str
    name: str

    @classmethod
    def parse(cls, text: str) -> ControlNetSource:
        """`SOURCE[:NAME]`; the name defaults to the source's last path part, lower-cased."""
        source, sep, name = text.rpartition(":") if ":" in text and not Path(text).exists() else (text, "", "")
        source = source if sep else text
        name = (name or Path(split_revision(source)[0]).stem).lower().replace(".", "-")
        if not CONTROLNET_NAME.match(name):
            raise ExportError(f"--controlnet: name {name!r} must be 1-64 of a-z, 0-9, _ and - (give SOURCE:NAME)")
        return cls(source, name)


class ControlNetGraph(torch.nn.Module):
    """diffusers' ControlNetModel at conditioning scale 1, its residuals as separate outputs."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
        controlnet_cond: torch.Tensor, *conditions: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:  # fmt: skip
        added = {"text_embeds": conditions[0], "time_ids": conditions[1]} if len(conditions) == 2 else None
        down, mid = self.model(sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale=1.0,
                               added_cond_kwargs=added, return_dict=False)  # fmt: skip
        return (*down, mid)


def load_controlnet(source: str) -> torch.nn.Module:
    """diffusers' ControlNetModel from a folder (config.json + weights), a single .safetensors file, or a hub id;
    ExportError with one line where it cannot be loaded."""
    from diffusers import ControlNetModel

    path = Path(source).expanduser()
    try:
        if path.is_dir():
            return ControlNetModel.from_pretrained(path).eval()
        if path.is_file() and path.suffix == ".safetensors":
            return ControlNetModel.from_single_file(str(path)).eval()
        if path.is_file():
            raise ExportError(f"{source}: a ControlNet is a diffusers folder or a .safetensors file")
        if is_hub_id(source):
            repo, revision = split_revision(source)
            return ControlNetModel.from_pretrained(repo, revision=revision).eval()
    except ExportError:
        raise
    except Exception as exc:  # noqa: BLE001 - a corrupt or unreadable weights file surfaces as many types
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"{source}: cannot load a ControlNet: {reason}") from None
    raise ExportError(f"{source}: no such folder or file")


def check_fit(model: torch.nn.Module, config: ModelConfig, name: str) -> None:
    """ExportError where ControlNet `name` was made for another base than `config`'s (latent channels, text
    width, SDXL's added conditioning)."""
    own = model.config
    sdxl = own.get("addition_embed_type") == "text_time"
    checks = (
        ("latent channels", own.in_channels, config.latent_channels),
        ("pixel-to-latent scale", 2 ** (len(own.conditioning_embedding_out_channels) - 1), config.vae_scale_factor),
        ("text width (cross_attention_dim)", own.cross_attention_dim, config.embedding_dim),
        ("SDXL conditioning", sdxl, config.sdxl),
    )
    for what, theirs, ours in checks:
        if theirs != ours:
            raise ExportError(f"ControlNet {name}: its {what} is {theirs}, the model's {ours}: it fits another base")


def controlnet_spec(name: str, config: ModelConfig, residuals: int) -> ComponentSpec:
    """The ControlNet graph's signature: the UNet's inputs, the control image, one output per residual."""
    extra = ("text_embeds", "time_ids") if config.sdxl else ()
    outputs = (*(f"down_block_res_{i}" for i in range(residuals)), "mid_block_res")
    axes = {
        "sample": IMAGE_AXES,
        "timestep": {0: "steps"},
        "encoder_hidden_states": {0: "batch", 1: "sequence"},
        "controlnet_cond": {0: "batch", 2: "image_height", 3: "image_width"},
        **{n: {0: "batch"} for n in extra},
        **{n: IMAGE_AXES for n in outputs},
    }
    inputs = ("sample", "timestep", "encoder_hidden_states", "controlnet_cond", *extra)
    return ComponentSpec(controlnet_component(name), inputs, outputs, axes, load=None, sample_inputs=None)  # type: ignore[arg-type]


def sample_inputs(config: ModelConfig, batch: int, seed: int) -> Inputs:
    """The UNet's sample inputs (components._unet_inputs) and a control image at the latents' pixel size."""

    class _Source:  # _unet_inputs reads only `.config`
        pass

    source = _Source()
    source.config = replace(config, time_cond_proj_dim=None, unet_in_channels=None)  # type: ignore[attr-defined]
    generator = torch.Generator().manual_seed(seed)
    sample, timestep, context, *conditions = _unet_inputs(source, batch, generator)  # type: ignore[arg-type]
    side = sample.shape[-1] * config.vae_scale_factor
    image = torch.rand(batch, 3, side, side, generator=generator)
    return (sample, timestep, context, image, *conditions)


def residual_count(model: torch.nn.Module) -> int:
    """How many down-block residuals the ControlNet returns: conv_in's, then each down block's layers and
    downsampler (diffusers' controlnet_down_blocks)."""
    return len(model.controlnet_down_blocks)


# --- the UNet with residual inputs -------------------------------------------------------------------------------


def skip_connections(graph: onnx.GraphProto) -> tuple[list[onnx.NodeProto], str]:
    """The UNet's skip-connection Concats in graph order, and the middle block's output (the first one's first
    input); ExportError where the graph has none."""
    producer = {out: node for node in graph.node for out in node.output}

    def origin(tensor: str) -> str:
        node = producer.get(tensor)
        while node is not None and node.op_type in QDQ:  # int8 graphs: the Q/DQ pair in front of a Concat
            node = producer.get(node.input[0])
        return node.name if node is not None else ""

    concats = [n for n in graph.node if n.op_type == "Concat" and "/up_blocks." in n.name and len(n.input) == 2
               and "/up_blocks." not in origin(n.input[1])]  # fmt: skip
    if not concats:
        raise ExportError("the UNet graph has no skip connections in its up blocks (/up_blocks.N/ Concat nodes)")
    return concats, concats[0].input[0]


def control_unet(model: onnx.ModelProto, residuals: int) -> onnx.ModelProto:
    """A copy of the UNet graph `model` with inputs down_block_res_0..N-1 and mid_block_res added to its skip
    connections and its middle block's output."""
    derived = onnx.ModelProto()
    derived.CopyFrom(model)
    graph = derived.graph
    concats, mid = skip_connections(graph)
    if len(concats) != residuals:
        raise ExportError(f"the ControlNet returns {residuals} residuals; the UNet has {len(concats)} skip connections")
    elem_type = next(i.type.tensor_type.elem_type for i in graph.input if i.name == "sample")
    added: list[onnx.NodeProto] = []

    def add_to(tensor: str, name: str) -> str:
        graph.input.append(helper.make_tensor_value_info(name, elem_type, ["batch", f"{name}_c", f"{name}_h",
                                                                         f"{name}_w"]))  # fmt: skip
        added.append(helper.make_node("Add", [tensor, name], [f"{name}/sum"], name=f"/control/{name}/Add"))
        return f"{name}/sum"

    middle = add_to(mid, "mid_block_res")
    for k, concat in enumerate(concats):
        concat.input[1] = add_to(concat.input[1], f"down_block_res_{residuals - 1 - k}")
    concats[0].input[0] = middle
    first = list(graph.node).index(concats[0])
    nodes = list(graph.node)
    graph.ClearField("node")
    graph.node.extend(nodes[:first] + added + nodes[first:])  # every Add after its inputs' producers
    _sort_topologically(graph)
    return derived


def _sort_topologically(graph: onnx.GraphProto) -> None:
    """Order the nodes so that each comes after the producers of its inputs (the Adds were put before the first
    skip Concat, and later skips' tensors are made after it)."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise ExportError("internal: the control UNet graph has a cycle")
        for node in ready:
            available.update(node.output)
        ordered += ready
        ready_ids = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in ready_ids]
    graph.ClearField("node")
    graph.node.extend(ordered)


# --- adding ControlNets to an export -----------------------------------------------------------------------------

UnetReference = Callable[[dict[str, np.ndarray]], np.ndarray]


def export_controlnets(
    sources: list[ControlNetSource], folder: Path, manifest: Manifest, opset: int, atol: float,
    unet_reference: UnetReference | None = None, log: Log = print,
) -> Manifest:  # fmt: skip
    """Export each ControlNet into the model folder `folder` (checked against PyTorch) and derive `unet_control`
    once; `unet_reference(feeds)` is PyTorch's UNet given the residuals in `feeds`, where the caller has it."""
    from .convert import export_module

    unet = manifest.components.get("unet")
    if manifest.config.denoiser != "unet" or unet is None:
        raise ExportError(
            f"ControlNets are for UNet models (SD 1.x/2.x, SDXL); this one has a {manifest.config.denoiser}"
        )
    if unet.precision == "fp16":
        raise ExportError("ControlNets: this UNet is fp16; add them to an fp32 or int8 export")
    names = [s.name for s in sources]
    taken = sorted({n for n in names if names.count(n) > 1} | (set(names) & set(manifest.config.controlnets)))
    if taken:
        raise ExportError(f"ControlNet {taken[0]}: the name is given twice (name them with SOURCE:NAME)")
    control = manifest.components.get(CONTROL_UNET)  # an earlier ControlNet's: its residual inputs are fixed
    residuals = sum(t.name.startswith("down_block_res_") for t in control.inputs) if control else None
    for source in sources:
        model = load_controlnet(source.source)
        check_fit(model, manifest.config, source.name)
        count = residual_count(model)
        if residuals not in (None, count):
            raise ExportError(f"ControlNet {source.name}: {count} residuals, not the UNet's skip connections")
        residuals = count
        spec = controlnet_spec(source.name, manifest.config, count)
        info = export_module(lambda m=model: ControlNetGraph(m), spec, sample_inputs(manifest.config, 1, 0),
                             sample_inputs(manifest.config, 2, 1), folder, opset, atol)  # fmt: skip
        manifest.components[spec.name] = info
        manifest.config.controlnets[source.name] = {
            "residuals": count,
            "conditioning": _conditioning_type(source.source),
            "source": source.source,
        }
        log(f"controlnet {source.name}: max |onnx - torch| {info.validation['max_abs_diff']:.2e}")
        del model
    manifest.save(folder)
    if control is None and residuals is not None:
        manifest = add_control_unet(folder, manifest, residuals, sources[0].name, atol, unet_reference, log)
    return manifest


def controlnet_folder(
    source: ControlNetSource, model: Path, output: Path, opset: int, atol: float, *, overwrite: bool = False,
    log: Log = print,
) -> Manifest:  # fmt: skip
    """Copy the export `model` to `output` with ControlNet `source` added (`sd-export controlnet`)."""
    add = lambda folder, manifest: export_controlnets([source], folder, manifest, opset, atol, None, log)  # noqa: E731
    return derive_folder(model, output, add, overwrite=overwrite, log=log)


def add_control_unet(
    folder: Path, manifest: Manifest, residuals: int, controlnet: str, atol: float,
    unet_reference: UnetReference | None, log: Log = print,
) -> Manifest:  # fmt: skip
    """Derive and record `unet_control`, checked on the residuals ControlNet `controlnet`'s graph makes."""
    model, full_file = load_graph(folder, manifest)
    derived = control_unet(model, residuals)
    save_graph(model, full_file)
    feeds = _check_feeds(folder, manifest, controlnet)
    derived_file = full_file.parent / "control.onnx"
    onnx.save_model(derived, str(derived_file))
    session = open_session(derived_file)
    unet = manifest.components["unet"]
    exact = unet.precision == "fp32" and not unet.quantization and len(unet.outputs) == 1  # DeepCache's: two
    if unet_reference is not None and exact:
        validation = compare_outputs(CONTROL_UNET, session, feeds, [unet_reference(feeds)], atol)
    else:  # int8, or no PyTorch UNet at hand: with zero residuals it is the UNet graph, every output
        zeros = {k: np.zeros_like(v) if _is_residual(k) else v for k, v in feeds.items()}
        reference = open_session(full_file).run(None, {k: v for k, v in feeds.items() if not _is_residual(k)})
        validation = {**compare_outputs(CONTROL_UNET, session, zeros, reference, 1e-5), "reference": "unet graph"}
    del session
    record(folder, manifest, CONTROL_UNET, derived, validation)
    log(f"{CONTROL_UNET}: max |onnx - reference| {validation['max_abs_diff']:.2e}")
    return manifest


def _is_residual(name: str) -> bool:
    return name.startswith("down_block_res_") or name == "mid_block_res"


def _check_feeds(folder: Path, manifest: Manifest, controlnet: str) -> dict[str, np.ndarray]:
    """The UNet's sample inputs at batch 2 and the residuals ControlNet `controlnet`'s graph makes from them."""
    config = manifest.config
    sample, timestep, context, image, *conditions = (t.numpy() for t in sample_inputs(config, 2, 7))
    unet = {"sample": sample, "timestep": timestep, "encoder_hidden_states": context}
    if config.sdxl:
        unet.update(text_embeds=conditions[0], time_ids=conditions[1])
    graph = open_session(folder / manifest.components[controlnet_component(controlnet)].file)
    outputs = graph.run(None, {**unet, "controlnet_cond": image})
    names = [o.name for o in graph.get_outputs()]
    return {**unet, **dict(zip(names, outputs, strict=True))}


def calibration_feeds(manifest: Manifest, component: str, unet_feeds: list[dict], seed: int) -> list[dict]:
    """The ControlNet `component`'s inputs for int8 calibration: each recorded UNet input (both guidance halves,
    every step) with control images beside it, the Canny outlines of rendered shapes (line art like the edge,
    scribble and line maps most ControlNets read; depth-like ControlNets see other images in use)."""
    from sd_onnx.models.shapes.data import all_combinations, random_scene, render
    from sd_onnx.runtime.annotators import canny

    wanted = {t.name for t in manifest.components[component].inputs}
    rng, combos, factor = random.Random(seed), all_combinations(), manifest.config.vae_scale_factor
    feeds = []
    for feed in unet_feeds:
        rows, _, height, width = feed["sample"].shape
        pictures = [render(random_scene(rng, combos), max(height, width) * factor, rng) for _ in range(rows)]
        edges = [canny(np.asarray(p.resize((width * factor, height * factor))), 100, 200) for p in pictures]
        images = np.stack([np.repeat(e[None], 3, axis=0) for e in edges]).astype(np.float32) / 255
        feeds.append({**{k: v for k, v in feed.items() if k in wanted}, "controlnet_cond": images})
    return feeds


def torch_unet_reference(source: Path, sdxl: bool) -> UnetReference:
    """PyTorch's UNet of the diffusers folder `source` given the residuals in the feeds."""

    def run(feeds: dict[str, np.ndarray]) -> np.ndarray:
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(source / "unet").eval()
        t = {k: torch.from_numpy(v) for k, v in feeds.items()}
        down = [t[f"down_block_res_{i}"] for i in range(sum(1 for k in t if k.startswith("down_block_res_")))]
        added = {"text_embeds": t["text_embeds"], "time_ids": t["time_ids"]} if sdxl else None
        with torch.no_grad():
            out = unet(t["sample"], t["timestep"], t["encoder_hidden_states"], added_cond_kwargs=added,
                       down_block_additional_residuals=down, mid_block_additional_residual=t["mid_block_res"],
                       return_dict=False)[0]  # fmt: skip
        return out.numpy()

    return run


def _conditioning_type(source: str) -> str | None:
    """What the ControlNet is conditioned on, where its source's name says it (lllyasviel's naming:
    control_v11p_sd15_canny, controlnet-canny-sdxl-1.0)."""
    known = ("canny", "depth", "openpose", "pose", "scribble", "softedge", "hed", "lineart", "mlsd", "normal",
             "seg", "tile", "inpaint", "shuffle", "ip2p", "qrcode")  # fmt: skip
    words = set(re.split(r"[^a-z0-9]+", Path(source).name.lower()))
    return next((k for k in known if k in words), None)
