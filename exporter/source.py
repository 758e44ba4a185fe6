"""Resolve what the user named (local folder, hub id, single-file checkpoint) into a diffusers pipeline folder.

Also reads the model's own configs into the manifest's `ModelConfig`: no size is assumed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from sd_onnx.runtime import configs
from sd_onnx.runtime.hub import fetch_model, is_hub_id, split_revision
from sd_onnx.runtime.manifest import COMPONENTS, LLM_FAMILIES, TINY_VAE_COMPONENTS, ManifestError, ModelConfig

from .errors import ExportError

SUPPORTED_PIPELINES = {
    "StableDiffusionPipeline",
    "StableDiffusionImg2ImgPipeline",
    "StableDiffusionInpaintPipeline",
    "LatentConsistencyModelPipeline",
    "OnnxStableDiffusionPipeline",
    "StableDiffusionXLPipeline",
    "StableDiffusionXLImg2ImgPipeline",
    "StableDiffusionXLInpaintPipeline",
    *configs.PIPELINE_FAMILIES,  # SD3 and FLUX: a transformer instead of a UNet (see runtime/configs.py)
}
# SDXL: the second encoder always; the first is absent from refiners (model_index.json says null).
SDXL_SUBFOLDERS = ("text_encoder_2", "tokenizer_2", "unet", "vae", "scheduler")
LCM_DEFAULT_STEPS, LCM_DEFAULT_GUIDANCE = 4, 8.5
REQUIRED_SUBFOLDERS = ("text_encoder", "tokenizer", "unet", "vae", "scheduler")
# SD3: CLIP-L, CLIP-G and (optional, as in diffusers) T5 as text_encoder_3; FLUX: CLIP-L and T5 as text_encoder_2.
TRANSFORMER_SUBFOLDERS = (
    "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "transformer", "vae", "scheduler",
)  # fmt: skip
T5_FOLDERS = {"sd3": ("text_encoder_3", "tokenizer_3"), "flux": ("text_encoder_2", "tokenizer_2")}
TRANSFORMER_COMPONENTS = (
    "text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "vae_decoder", "vae_encoder",
)  # fmt: skip
TRANSFORMER_ONLY = ("text_encoder_3", "transformer")  # never in a UNet pipeline's components
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
OPEN_CLIP_EMBEDDER = "conditioner.embedders.{}.model.transformer.resblocks."


@dataclass(frozen=True)
class TokenIds:
    """The text encoder's vocabulary size and the tokenizer's special ids: sample inputs are drawn from these."""

    vocab_size: int
    bos_id: int | None
    eos_id: int
    pad_id: int


@dataclass
class PipelineSource:
    """A local diffusers-format folder plus what was read from its configs."""

    folder: Path
    name: str
    pipeline_class: str
    model_family: str
    config: ModelConfig
    tokens: TokenIds
    components: tuple[str, ...]  # what it can export
    t5_tokens: TokenIds | None = None  # SD3/FLUX: the T5 encoder's (sample inputs for text_encoder_3 / FLUX's _2)
    tiny_vae: Path | None = None  # a tiny autoencoder to export beside the VAE (tiny_vae_* components)
    scheduler: str | None = None  # a diffusers scheduler class to record instead of the pipeline's own

    def add_tiny_vae(self, path: str) -> None:
        """Take the AutoencoderTiny folder at `path` as tiny_vae_decoder/tiny_vae_encoder, once checked to
        produce this model's latents (channels and down-sampling factor)."""
        folder = Path(path).expanduser()
        if not folder.exists():
            raise ExportError(f"--vae {path}: no such folder")
        config = _read_json(folder / "config.json") if folder.is_dir() else None
        if config is None or config.get("_class_name") != "AutoencoderTiny":
            raise ExportError(f"--vae {path}: not a diffusers AutoencoderTiny folder (config.json naming it)")
        channels, levels = config.get("latent_channels", 4), len(config.get("decoder_block_out_channels") or ())
        # FLUX.2's sampler latents are the VAE's patchified 2x2 (see configs_llm): a TAEF2 decodes the VAE's own.
        flux2 = self.config.family == "flux2"
        want = (self.config.latent_channels // 4, self.config.vae_scale_factor // 2) if flux2 else (
            self.config.latent_channels, self.config.vae_scale_factor)  # fmt: skip
        if (channels, 2 ** (levels - 1)) != want:
            raise ExportError(
                f"--vae {path}: makes {channels}-channel latents at 1/{2 ** (levels - 1)} scale; this model's VAE "
                f"makes {want[0]}-channel ones at 1/{want[1]}"
            )
        self.tiny_vae = folder
        self.config.tiny_vae_scaling_factor = 1.0 if flux2 else float(config.get("scaling_factor", 1.0))
        shift = None if flux2 else config.get("shift_factor")  # FLUX.2's graph un-normalizes, as its VAE's does
        self.config.tiny_vae_shift_factor = float(shift) if shift else None
        # FLUX.2 [klein] takes no init image: no encoder
        self.components = (*self.components, *(TINY_VAE_COMPONENTS[:1] if flux2 else TINY_VAE_COMPONENTS))


def resolve_source(source: str, config: str | None = None, work_dir: Path | None = None) -> PipelineSource:
    """Turn SOURCE into a checked local diffusers folder.

    `config` (a diffusers folder or hub id) tells the single-file loader which architecture a checkpoint has;
    `work_dir` is where a converted single-file checkpoint is written.
    """
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix not in SINGLE_FILE_SUFFIXES:
            raise ExportError(f"{source}: not a diffusers folder nor a .safetensors/.ckpt checkpoint")
        if work_dir is None:
            raise ExportError("internal: single-file conversion needs a work folder")
        folder = _single_file_to_folder(path, config, work_dir)
    elif path.is_dir():
        folder = path
    elif is_hub_id(source):
        folder = _download(source)
    else:
        raise ExportError(f"{source}: no such folder or file")
    return inspect_folder(folder, name=source)


def inspect_folder(folder: Path, name: str | None = None) -> PipelineSource:
    """Check that `folder` is a supported diffusers pipeline and read its sizes."""
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise ExportError(f"{folder}: not a diffusers pipeline (no model_index.json)")
    index = _read_json(index_path)
    pipeline_class = index.get("_class_name", "?")
    if pipeline_class not in SUPPORTED_PIPELINES:
        supported = ", ".join(sorted(SUPPORTED_PIPELINES))
        raise ExportError(f"{folder}: unsupported model family {pipeline_class} (supported: {supported})")
    family = configs.PIPELINE_FAMILIES.get(pipeline_class)
    if family in configs.SANA_FAMILIES:
        return _inspect_sana_folder(folder, pipeline_class, family, name)
    if family is not None:
        return _inspect_transformer_folder(folder, index, pipeline_class, family, name)
    required = REQUIRED_SUBFOLDERS
    if pipeline_class.startswith("StableDiffusionXL"):
        first = (index.get("text_encoder") or [None])[0] is not None
        required = SDXL_SUBFOLDERS + (("text_encoder", "tokenizer") if first else ())
    missing = [s for s in required if not (folder / s).is_dir()]
    if missing:
        raise ExportError(f"{folder}: incomplete pipeline, missing {', '.join(missing)}")
    config = read_model_config(folder)
    if pipeline_class == "LatentConsistencyModelPipeline":  # diffusers' defaults for this pipeline
        config.default_steps, config.guidance_scale = LCM_DEFAULT_STEPS, LCM_DEFAULT_GUIDANCE
    tokens = read_token_ids(folder, config.max_token_length)
    present = {"text_encoder": (folder / "text_encoder").is_dir(), "text_encoder_2": config.sdxl}
    components = tuple(c for c in COMPONENTS if c not in TRANSFORMER_ONLY and present.get(c, True))
    return PipelineSource(folder, name or str(folder), pipeline_class, _family(config), config, tokens, components)


def _inspect_transformer_folder(
    folder: Path, index: dict, pipeline_class: str, family: str, name: str | None
) -> PipelineSource:
    """An SD3 or FLUX pipeline folder: its sizes, its CLIP and T5 tokenizers' ids, the graphs it has (SD3's T5 is
    optional, as in diffusers: model_index.json then names none)."""
    if family in LLM_FAMILIES:
        return _inspect_llm_folder(folder, pipeline_class, family, name)
    t5, t5_tokenizer = T5_FOLDERS[family]
    required = TRANSFORMER_SUBFOLDERS
    if family == "sd3" and (index.get(t5) or [None])[0] is not None:
        required += (t5, t5_tokenizer)
    missing = [s for s in required if not (folder / s).is_dir()]
    if missing:
        raise ExportError(f"{folder}: incomplete pipeline, missing {', '.join(missing)}")
    for part in required:  # a missing or corrupt config is named as such, not as a reading error
        if not part.startswith(("tokenizer", "scheduler")):
            _read_json(folder / part / "config.json")
    _read_json(folder / "scheduler" / "scheduler_config.json")
    try:
        config = configs.read_model_config(folder)
    except ManifestError as exc:
        raise ExportError(str(exc)) from None
    tokens = read_token_ids(folder, config.max_token_length)
    t5_tokens = read_sequence_token_ids(folder / t5, folder / t5_tokenizer) if (folder / t5).is_dir() else None
    components = tuple(c for c in TRANSFORMER_COMPONENTS if not c.startswith("text_encoder") or (folder / c).is_dir())
    return PipelineSource(folder, name or str(folder), pipeline_class, family, config, tokens, components, t5_tokens)


def _inspect_llm_folder(folder: Path, pipeline_class: str, family: str, name: str | None) -> PipelineSource:
    """A Z-Image or FLUX.2 [klein] folder: one LLM text encoder (Qwen3) with its tokenizer, a transformer, a VAE."""
    config, _ = _read_one_encoder_folder(folder)
    tokens = read_sequence_token_ids(folder / "text_encoder", folder / "tokenizer")
    components = ("text_encoder", "transformer", "vae_decoder", "vae_encoder")  # FLUX.2's: for reference images
    return PipelineSource(folder, name or str(folder), pipeline_class, family, config, tokens, components)


def read_sequence_token_ids(encoder: Path, tokenizer_folder: Path, start: bool = False) -> TokenIds:
    """A T5 or LLM tokenizer's end and padding ids (and with `start` its start id: Gemma's; T5 has none), checked
    against its encoder's vocabulary."""
    from transformers import AutoTokenizer

    vocab_size = _read_json(encoder / "config.json").get("vocab_size")
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    except Exception as exc:  # noqa: BLE001 - any failure here means the tokenizer files are unusable
        raise ExportError(f"{tokenizer_folder}: unreadable tokenizer ({exc})") from None
    if not isinstance(vocab_size, int) or vocab_size < 1:
        raise ExportError(f"{encoder}: config.json has no vocab_size")
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if eos is None or pad is None or len(tokenizer) > vocab_size:
        raise ExportError(
            f"{tokenizer_folder}: no end/padding token, or more than the {vocab_size} tokens {encoder} knows"
        )
    return TokenIds(vocab_size, tokenizer.bos_token_id if start else None, eos, pad)


def read_token_ids(folder: Path, max_length: int) -> TokenIds:
    """Special token ids from the pipeline's own tokenizer, checked against its text encoder's vocabulary."""
    from sd_onnx.runtime.tokenizer import CLIPTokenizer

    suffix = "" if (folder / "text_encoder").is_dir() else "_2"  # an SDXL refiner has the second encoder only
    vocab_size = _read_json(folder / f"text_encoder{suffix}" / "config.json").get("vocab_size")
    try:
        tokenizer = CLIPTokenizer(folder / f"tokenizer{suffix}", max_length)
    except ValueError as exc:
        raise ExportError(f"{folder / f'tokenizer{suffix}'}: unreadable tokenizer ({exc})") from None
    if not isinstance(vocab_size, int) or vocab_size < 1:
        raise ExportError(f"{folder / f'text_encoder{suffix}'}: config.json has no vocab_size")
    ids = {"eos": tokenizer.eos_id, "pad": tokenizer.pad_id, "bos": tokenizer.bos_id}
    for role, value in ids.items():
        if value is not None and not 0 <= value < vocab_size:
            raise ExportError(
                f"{folder}: the tokenizer's {role} token id {value} is outside the text encoder's "
                f"vocabulary of {vocab_size} (tokenizer and text encoder do not match)"
            )
    if tokenizer.eos_id is None or tokenizer.pad_id is None:
        raise ExportError(f"{folder / f'tokenizer{suffix}'}: no end-of-text / padding token")
    return TokenIds(vocab_size, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)


def read_model_config(folder: Path) -> ModelConfig:
    """The model's sizes from its own configs (the runtime's reader), refusing UNets this exporter cannot run."""
    unet = _read_json(folder / "unet" / "config.json")
    vae = _read_json(folder / "vae" / "config.json")
    for encoder in ("text_encoder", "text_encoder_2"):
        if (folder / encoder).is_dir():
            _read_json(folder / encoder / "config.json")
    _read_json(folder / "scheduler" / "scheduler_config.json")
    latent = vae.get("latent_channels", 4)
    if unet.get("in_channels") not in (latent, 2 * latent + 1):
        raise ExportError(
            f"{folder}: unsupported model family: UNet takes {unet.get('in_channels')} channels but the VAE has "
            f"{latent} latent channels (supported: {latent}, or {2 * latent + 1} for inpainting)"
        )
    try:
        return configs.read_model_config(folder)
    except ManifestError as exc:
        raise ExportError(str(exc)) from None


def _inspect_sana_folder(folder: Path, pipeline_class: str, family: str, name: str | None) -> PipelineSource:
    """A SANA or SANA-Sprint folder: Gemma-2 with its tokenizer, the transformer, the DC-AE (SANA's published
    scheduler, DPM-Solver in flow mode, is the runtime's `dpmpp_2m_flow`)."""
    config, _ = _read_one_encoder_folder(folder)
    tokens = read_sequence_token_ids(folder / "text_encoder", folder / "tokenizer", start=True)
    components = ("text_encoder", "transformer", "vae_decoder", "vae_encoder")
    source = PipelineSource(folder, name or str(folder), pipeline_class, config.family, config, tokens, components)
    return source


def _read_one_encoder_folder(folder: Path) -> tuple[ModelConfig, dict]:
    """The sizes and scheduler config of a transformer folder with one text encoder (SANA, Z-Image, FLUX.2
    [klein]); a missing part or config is named as such."""
    required = ("text_encoder", "tokenizer", "transformer", "vae", "scheduler")
    missing = [s for s in required if not (folder / s).is_dir()]
    if missing:
        raise ExportError(f"{folder}: incomplete pipeline, missing {', '.join(missing)}")
    for part in ("text_encoder", "transformer", "vae"):
        _read_json(folder / part / "config.json")
    scheduler = _read_json(folder / "scheduler" / "scheduler_config.json")
    try:
        return configs.read_model_config(folder), scheduler
    except ManifestError as exc:
        raise ExportError(str(exc)) from None


def _family(config: ModelConfig) -> str:
    if config.sdxl:
        return "sdxl"
    return {768: "sd1", 1024: "sd2"}.get(config.embedding_dim, "sd-custom")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ExportError(f"{path.parent}: incomplete pipeline, missing {path.name}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ExportError(f"{path}: corrupt JSON ({exc.msg} at line {exc.lineno})") from exc


def _download(repo_id: str) -> Path:
    """Fetch a diffusers pipeline's configs, tokenizers and safetensors weights from the Hugging Face Hub."""
    try:
        return fetch_model(*split_revision(repo_id), patterns=["*.json", "*.txt", "*.safetensors", "tokenizer*/*"])
    except ManifestError as exc:
        raise ExportError(str(exc)) from None


def _single_file_to_folder(path: Path, config: str | None, work_dir: Path) -> Path:
    """Load a .safetensors/.ckpt checkpoint with diffusers' single-file loader and save it as a folder."""
    import diffusers

    pipeline_class = getattr(diffusers, single_file_pipeline_class(path, config))
    kwargs = {"config": config} if config else {}
    if pipeline_class is diffusers.StableDiffusionPipeline:
        kwargs["safety_checker"] = None
    try:
        pipe = pipeline_class.from_single_file(str(path), **kwargs)
    except Exception as exc:  # noqa: BLE001 - loader errors are many and all mean "cannot read this file"
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ExportError(f"{path}: cannot load single-file checkpoint: {reason}") from exc
    folder = work_dir / "_single_file_pipeline"
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def single_file_pipeline_class(path: Path, config: str | None) -> str:
    """The diffusers pipeline a checkpoint loads into: the one its `config` folder names, else an SDXL base or
    refiner when the checkpoint holds an OpenCLIP text encoder where those keep it (a .safetensors header is
    read, not its weights), else StableDiffusionPipeline."""
    index = Path(config).expanduser() / "model_index.json" if config else None
    if index is not None and index.is_file():
        name = _read_json(index).get("_class_name")
        if name in SUPPORTED_PIPELINES and name != "OnnxStableDiffusionPipeline":
            return name
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), "np") as checkpoint:
                keys = list(checkpoint.keys())
        except Exception as exc:  # noqa: BLE001 - a damaged header surfaces as several error types
            raise ExportError(f"{path}: not a readable .safetensors file: {exc}") from None
        # SDXL's OpenCLIP encoder: second of two embedders in a base, the only one in a refiner.
        if any(k.startswith(OPEN_CLIP_EMBEDDER.format(1)) for k in keys):
            return "StableDiffusionXLPipeline"
        if any(k.startswith(OPEN_CLIP_EMBEDDER.format(0)) for k in keys):
            return "StableDiffusionXLImg2ImgPipeline"
    return "StableDiffusionPipeline"
