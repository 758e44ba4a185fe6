"""The model folder's manifest (`sd_onnx.json`): the one place component files, shapes, dtypes and hashes live.

Written by the exporter, read by the runtime and the tests. Plain dataclasses and JSON, so the runtime
needs nothing beyond the standard library to read it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .files import MAX_JSON_BYTES, UntrustedFileError, inside, regular_file
from .files import read_json as read_untrusted_json

MANIFEST_NAME = "sd_onnx.json"
# A graph's weights file: FLUX's fp32 transformer is 48 GB; hashing a larger (or a sparse 1 TB) file would hang.
MAX_MODEL_FILE_BYTES = 64 << 30
FORMAT_VERSION = 1
# SD3's and FLUX's denoiser is a `transformer`; SD3's third text encoder (T5) is `text_encoder_3`, FLUX's T5 is
# its `text_encoder_2` (diffusers' names).
COMPONENTS = ("text_encoder", "text_encoder_2", "text_encoder_3", "unet", "transformer", "vae_decoder", "vae_encoder")
# Families whose denoiser is a transformer over latent patches (config.family); the others have a `unet`.
TRANSFORMER_FAMILIES = ("sd3", "flux", "sana", "sana_sprint", "z_image", "flux2")
# Transformer families conditioned on one LLM text encoder (Qwen3) alone: Z-Image, FLUX.2 [klein].
LLM_FAMILIES = ("z_image", "flux2")
FAMILIES = ("", "sd", "sdxl", *TRANSFORMER_FAMILIES)
# A tiny autoencoder (TAESD) exported beside the model's own VAE (`sd-export convert --vae`).
TINY_VAE_COMPONENTS = ("tiny_vae_decoder", "tiny_vae_encoder")
# The fp32 VAE decoder an int8 export keeps beside its int8 one, for OpenVINO (see vae.choose_decoder).
FLOAT_DECODER = "vae_decoder_float"
# DeepCache's shallow UNet, cut from the UNet graph and sharing its weights (`sd-export convert --deepcache-branch`).
DEEPCACHE_COMPONENTS = ("unet_shallow",)
# The UNet with token merging before self-attention, its ratio an input (`sd-export convert --tome`).
TOME_COMPONENTS = ("unet_tome",)
# The UNet cut into consecutive stage graphs over its weights, for low-memory mode (`sd-export stages`).
STAGE_COMPONENTS = ("unet_stage_0", "unet_stage_1", "unet_stage_2", "unet_stage_3")
# SD3's transformer with some blocks skipped, for skip-layer guidance (`sd-export convert --skip-layers 7,8,9`).
SKIP_LAYER_COMPONENTS = ("transformer_skip",)
# The UNet that adds ControlNet residuals to its skip connections (`sd-export convert --controlnet`); each
# ControlNet is the component controlnet_<name> (see `controlnet_component`).
CONTROL_UNET = "unet_control"
ALL_COMPONENTS = (
    COMPONENTS
    + TINY_VAE_COMPONENTS
    + (FLOAT_DECODER,)
    + DEEPCACHE_COMPONENTS
    + TOME_COMPONENTS
    + STAGE_COMPONENTS
    + SKIP_LAYER_COMPONENTS
    + (CONTROL_UNET,)
)


def controlnet_component(name: str) -> str:
    """The component name of the ControlNet a model folder lists as `name` (config.controlnets)."""
    return f"controlnet_{name}"


class ManifestError(UntrustedFileError):
    """A model folder is missing, incomplete, corrupt or does not match its manifest."""


@dataclass
class TensorSpec:
    """One graph input or output; symbolic dimensions are strings such as "batch"."""

    name: str
    shape: list[int | str]
    dtype: str


@dataclass
class ComponentInfo:
    """One exported graph: its files (path relative to the folder -> sha256), signature and validation."""

    file: str
    files: dict[str, str]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    precision: str = "fp32"
    opset: int = 17
    validation: dict[str, Any] = field(default_factory=dict)
    quantization: dict[str, Any] = field(default_factory=dict)
    optimizations: dict[str, Any] = field(default_factory=dict)

    @property
    def narrow_weights(self) -> bool:
        """Whether the graph stores its weights bf16/fp16 behind Casts (`sd-export --trace-dtype bf16`)."""
        return "narrow_weights" in self.optimizations

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ComponentInfo:
        data = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        data["inputs"] = [TensorSpec(t["name"], t["shape"], t["dtype"]) for t in data["inputs"]]
        data["outputs"] = [TensorSpec(t["name"], t["shape"], t["dtype"]) for t in data["outputs"]]
        return cls(**data)


@dataclass
class ModelConfig:
    """Sizes read from the source model's own configs; nothing in the runtime assumes SD 1.5's.

    For SD3/FLUX: `embedding_dim` is the transformer's `joint_attention_dim` (T5's width), `sample_size` the
    default latent side (SD3: the transformer's; FLUX: diffusers' default_sample_size 128), `max_token_length`
    CLIP's, and `prediction_type` "flow" (the transformer predicts the flow-matching velocity). SANA: `embedding_dim`
    is Gemma's width (the transformer's `caption_channels`), `sample_size` the transformer's, `max_token_length`
    the Gemma tokens the transformer reads (as `max_sequence_length`)."""

    embedding_dim: int
    latent_channels: int
    vae_scale_factor: int
    scaling_factor: float
    sample_size: int
    max_token_length: int
    prediction_type: str = "epsilon"
    shift_factor: float | None = None
    # The classifier-free guidance the model was made for (SD: 7.5); used when a caller gives none.
    guidance_scale: float = 7.5
    # Pixel sides must be multiples of this: VAE factor x 2 per UNet down-sampling level (configs.size_multiple).
    size_multiple: int = 0
    # Width of the guidance embedding a distilled UNet takes instead of classifier-free guidance (LCM); None: none.
    time_cond_proj_dim: int | None = None
    # Denoising steps the model was made for (LCM: 4, Turbo: 1); None: request.DEFAULT_STEPS.
    default_steps: int | None = None
    # Width of the pooled text vector the denoiser takes (SDXL: the second encoder's pooled projection; SD3: both
    # CLIP projections side by side; FLUX: CLIP-L's pooled output), and SDXL's number of size/crop "time ids"
    # the UNet takes beside it (6 for a base model); None for SD 1.x/2.x.
    pooled_dim: int | None = None
    time_ids_count: int | None = None
    # SDXL: an absent negative prompt is zeros rather than the encoding of "" (model_index.json's flag).
    force_zeros_for_empty_prompt: bool = False
    # Input channels of an inpainting UNet (latents, mask, masked image's latents: 9 for SD); None: the latents'.
    unet_in_channels: int | None = None
    # "tiny" when the model's own VAE is a tiny autoencoder (TAESD: deterministic encoder, no posterior); "dc" for a
    # deep-compression autoencoder (SANA's DC-AE: its encoder returns the latents too, no posterior).
    vae_kind: str = "full"
    # Scaling factor of the tiny autoencoder exported beside the VAE; None: there is none.
    tiny_vae_scaling_factor: float | None = None
    # Its shift factor (TAESD3, TAEF1: the latents are shifted before they are scaled, as the model's own VAE's).
    tiny_vae_shift_factor: float | None = None
    # DeepCache: the branch whose feature the UNet also returns and the shallow UNet takes; None: not exported.
    deepcache_branch: int | None = None
    # Whether the folder has the token-merging UNet (`unet_tome`).
    token_merging: bool = False
    # How many stage graphs the UNet is also cut into (`unet_stage_*`, run one at a time in low-memory mode); 0: none.
    unet_stages: int = 0
    # The transformer blocks `transformer_skip` skips (SD3's skip-layer guidance); None: not exported.
    skip_guidance_layers: list[int] | None = None
    # The ControlNets exported with the model, by name: {"residuals": N, "conditioning": "canny" or None (what its
    # source's name says it reads), "source": what it was exported from}; each is the graph controlnet_<name>.
    controlnets: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Text encoder layers a request may skip (clip_skip): what the text encoder graph's outputs allow, set by the
    # pipeline from them (0: the graph has the last layer's states only).
    clip_skip_layers: int = 0
    # The architecture: "sd" (SD 1.x/2.x UNets), "sdxl", "sd3" (SD3/3.5: MMDiT `transformer`, CLIP-L + CLIP-G + T5),
    # "flux" (FLUX.1: `transformer`, CLIP-L + T5), "sana" / "sana_sprint" (SANA, SANA-Sprint: linear-attention DiT
    # `transformer` on DC-AE latents, Gemma-2). "" in manifests written before this field: a UNet model, SDXL
    # when `pooled_dim` is set (see `sdxl`).
    family: str = ""
    # SD3/FLUX: the T5 prompt length the pipeline encodes by default (diffusers: SD3 256, FLUX 512, at most the T5
    # tokenizer's model_max_length); an SD3 folder without T5: CLIP's length, that of the zeros diffusers puts in
    # T5's place. SANA: the Gemma tokens the transformer reads (300). None: no transformer model.
    max_sequence_length: int | None = None
    # SD3: the transformer's patch side (2). FLUX: the 2x2 packing of latents into tokens that the pipeline does
    # before the transformer (whose own patch_size is 1), so 2 as well. Latent sides must be multiples of it.
    patch_size: int | None = None
    # FLUX.1-dev, SANA-Sprint: the transformer takes the (distilled) guidance scale as an input, `guidance`; no CFG.
    guidance_embeds: bool = False
    # SANA: what diffusers' SanaPipeline multiplies the sampler's timesteps by for the transformer (its config's
    # `timestep_scale`). SANA-Sprint: what the guidance scale is multiplied by for `guidance` (its
    # `guidance_embeds_scale`, 0.1). 1 for the other families.
    timestep_scale: float = 1.0
    guidance_embeds_scale: float = 1.0

    @property
    def sdxl(self) -> bool:
        """Whether this is an SDXL UNet model (base, refiner or inpainting): by family, or, in manifests that
        predate `family`, by the second encoder's pooled projection."""
        return self.family == "sdxl" or (not self.family and bool(self.pooled_dim))

    @property
    def denoiser(self) -> str:
        """The denoising graph's component name: `transformer` for SD3/FLUX, `unet` otherwise."""
        return "transformer" if self.family in TRANSFORMER_FAMILIES else "unet"

    @property
    def mask_channels(self) -> int:
        """The mask's channels beside an inpainting denoiser's latents: one for UNets; for FLUX.1 Fill each latent
        pixel's factor x factor mask pixels."""
        return self.vae_scale_factor**2 if self.family == "flux" else 1

    @property
    def inpainting(self) -> bool:
        """Whether the denoiser takes a mask and the masked image's latents beside its latents (inpainting UNets,
        FLUX.1 Fill)."""
        return self.unet_in_channels == 2 * self.latent_channels + self.mask_channels

    @property
    def default_resolution(self) -> int:
        return self.sample_size * self.vae_scale_factor


@dataclass
class Manifest:
    """Everything the runtime needs to know about an exported model folder."""

    source: str
    model_family: str
    pipeline_class: str
    config: ModelConfig
    components: dict[str, ComponentInfo]
    tools: dict[str, str] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    # The model's display name (PNG parameters, /sdapi/v1/sd-models); the source's last path part by default.
    name: str = ""
    # Words the text encoder was trained on, when the model knows them (the shapes model does): the runtime
    # warns about words outside it. None: any text.
    vocabulary: list[str] | None = None
    # LoRAs fused into the weights at export: file name, sha256 and scale of each, in the order applied.
    loras: list[dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        if not self.name:
            self.name = self.source.replace("\\", "/").rstrip("/").split("/")[-1] or "model"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["config"]["default_resolution"] = self.config.default_resolution
        return data

    def save(self, folder: Path) -> Path:
        path = Path(folder) / MANIFEST_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def from_dict(cls, data: Any, folder: Path | None = None) -> Manifest:
        """Check `data` against the manifest schema (ManifestError naming the first bad field), then build.

        A manifest written before `size_multiple` existed gets it from `folder`/unet/config.json."""
        from .manifest_schema import check_manifest, check_model_config

        check_manifest(data)
        if data["format_version"] != FORMAT_VERSION:
            raise ManifestError(f"unsupported manifest format_version {data['format_version']!r}")
        config = {k: v for k, v in data["config"].items() if k in ModelConfig.__dataclass_fields__}
        if "size_multiple" not in config:
            config["size_multiple"] = _size_multiple_from_unet_config(folder, config["vae_scale_factor"])
        model_config = ModelConfig(**config)
        check_model_config(model_config)
        return cls(
            source=data["source"],
            model_family=data["model_family"],
            pipeline_class=data["pipeline_class"],
            config=model_config,
            components={k: ComponentInfo.from_dict(v) for k, v in data["components"].items()},
            tools=data.get("tools") or {},
            name=data.get("name") or "",
            vocabulary=data.get("vocabulary"),
            loras=data.get("loras"),
        )

    @classmethod
    def load(cls, folder: Path) -> Manifest:
        if not os.path.lexists(Path(folder) / MANIFEST_NAME):
            raise ManifestError(f"{folder}: no {MANIFEST_NAME}; not an sd-onnx model folder")
        path = inside(folder, MANIFEST_NAME, folder)  # a link out of the folder is not its manifest
        data = read_json(path, expect_object=False)  # the schema check names what is wrong with its shape
        try:
            return cls.from_dict(data, Path(folder))
        except ManifestError as exc:
            raise ManifestError(f"{path}: {exc}") from None

    def verify(self, folder: Path, components: tuple[str, ...] | None = None) -> None:
        """Check that every file of the named components exists and has the recorded sha256."""
        problems = self.problems(folder, components)
        if problems:
            raise ManifestError(problems[0])

    def problems(self, folder: Path, components: tuple[str, ...] | None = None) -> list[str]:
        """Every missing or modified file of the named components, one line each (empty: all intact). Paths
        resolve inside `folder` (symlinks followed) or are refused; only regular files are hashed."""
        found: list[str] = []
        hashed: dict[Path, str] = {}  # a weights file several graphs share is read once
        for name in components or tuple(self.components):
            for rel, expected in self.components[name].files.items():
                try:
                    path = inside(folder, rel, Path(folder) / MANIFEST_NAME)
                    if not os.path.exists(path):
                        found.append(f"{name}: missing model file {path}")
                        continue
                    if regular_file(path, "model file").st_size > MAX_MODEL_FILE_BYTES:
                        raise UntrustedFileError(f"{path}: larger than {MAX_MODEL_FILE_BYTES >> 30} GiB")
                except UntrustedFileError as exc:
                    found.append(f"{name}: {exc}")
                    continue
                if path not in hashed:
                    hashed[path] = sha256_file(path)
                if hashed[path] != expected:
                    found.append(f"{name}: sha256 mismatch for {path} (corrupt or modified file)")
        return found


def read_json(path: Path, expect_object: bool = True, limit: int = MAX_JSON_BYTES) -> Any:
    """JSON from a model folder's file (bounded in size and depth, see files.py); ManifestError naming the file
    when it is missing, corrupt or (with `expect_object`) not a JSON object."""
    path = Path(path)
    if not os.path.lexists(path):
        raise ManifestError(f"{path.parent}: incomplete model, missing {path.name}")
    try:
        data = read_untrusted_json(path, limit)
    except UntrustedFileError as exc:
        raise ManifestError(str(exc)) from None
    if expect_object and not isinstance(data, dict):
        raise ManifestError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _size_multiple_from_unet_config(folder: Path | None, vae_scale_factor: int) -> int:
    from .configs import size_multiple

    if folder is None or not (Path(folder) / "unet" / "config.json").is_file():
        raise ManifestError("config.size_multiple: missing, and no unet/config.json to compute it from")
    return size_multiple(vae_scale_factor, read_json(inside(folder, "unet/config.json", folder)))


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks so multi-GB weights need no memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
