"""`StableDiffusionPipeline`: text -> image with onnxruntime, following diffusers' pipeline step for step.

Same call as diffusers' StableDiffusionPipeline (prompt, negative_prompt, num_inference_steps,
guidance_scale, height, width, latents, num_images_per_prompt, eta, output_type) plus `seed=`, which
reproduces diffusers' `torch.Generator("cpu").manual_seed(seed)`, and img2img through `image=`/`strength=`.
Every call becomes a `GenerationRequest` (request.py), the one place settings are defaulted and checked;
front ends build the request themselves and call `generate`.

What differs between model families (their text encoders, the denoiser's inputs, the schedule) lives in
one small module per family (families/); this class runs any of them: loading, requests, the sampler loop
(sampling.py) with its guidance (guidance.py), img2img and inpainting latents, and decoding. The component
seams (`component`, `conditioning`, `predict_noise`, `decode_latents`, `encode_image`) are public so
calibration, benchmarks and tests drive the same code the pipeline runs.
"""

from __future__ import annotations

import copy
import logging
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .configs import read_model_config
from .controlnet import ControlPlan, control_units
from .deepcache import SHALLOW, DeepCache
from .embeddings import Embedding, gather, table_override, token_table, usable
from .families import Conditioning, Family, family_for
from .families.clip import clip_skip_layers
from .files import inside, regular_file
from .guidance import SKIP_LAYERS, Guidance, skip_layer_scale
from .hires import hires_fix
from .hub import locate_model
from .image import to_pil
from .inpaint import MaskCrop, paste_back
from .lora import Lora, check_loras, read_loras, weight_overrides
from .lora_tags import LoraLibrary, LoraTag, extract_tags
from .manifest import (
    CONTROL_UNET,
    FLOAT_DECODER,
    MANIFEST_NAME,
    STAGE_COMPONENTS,
    Manifest,
    ManifestError,
    ModelConfig,
    read_json,
)
from .openvino_engine import default_precision, openvino_version
from .prompt_syntax import BREAK, parse_attention
from .request import GenerationRequest, Limits, RequestError
from .rng import Generator, ImageGenerators, TorchGenerator
from .sampling import GenerationCancelled, sample
from .scheduler_config import read_scheduler_config
from .schedulers import default_sampler, make_scheduler, resolve_name
from .session import (
    CPU,
    OPENVINO,
    OnnxModel,
    SessionConfig,
    open_model,
    openvino_placement,
    ort_version,
    resolve_providers,
    return_freed_memory,
    runs_on_openvino,
    split_provider,
)
from .shipped import shipped_model
from .stages import StagedUnet
from .start_latents import start_latents
from .tokenizer import CLIPTokenizer
from .vae import VaeChoice, choose_decoder, choose_vae
from .vae_tiling import Tiling

StepCallback = Callable[[int, int, np.ndarray], bool | None]
"""Called after each step with (step index, total steps, latents); returning False cancels the run."""

LOG = logging.getLogger("sd_onnx")
TOKEN_MERGING = "unet_tome"
MAX_LORA_SETS = 2  # pipelines kept per LoRA set picked by <lora:...> tags (each holds its own UNet session)
UNET_GRAPHS = ("unet", SHALLOW, TOKEN_MERGING, CONTROL_UNET)
MAX_WORDS_NAMED, MAX_WORD_CHARS = 8, 24  # the unknown-words warning stays one short line
# GenerationRequest field -> the argument of __call__ that sets it (diffusers' names).
ARGUMENT_NAMES = {"steps": "num_inference_steps", "batch": "num_images_per_prompt", "controls": "control_image"}
OUTPUT_TYPES = ("pil", "np", "latent")  # latent: the denoised latents, not decoded


@dataclass
class PipelineOutput:
    images: list[Image.Image] | np.ndarray
    parameters: dict[str, Any]
    request: GenerationRequest | None = None


class StableDiffusionPipeline:
    """Load an exported folder once, then generate as often as needed: any family's (see families/);
    `from_pretrained` returns the class diffusers names for it."""

    def __init__(
        self,
        folder: Path,
        manifest: Manifest | None,
        config: ModelConfig,
        scheduler: str | None,
        session_config: SessionConfig,
        low_memory: bool = False,
        vae: str = "auto",
        loras: tuple[Lora, ...] = (),
        embeddings: tuple[list[Embedding], dict[str, str]] = ([], {}),
        lora_dir: str | Path | None = None,
    ) -> None:
        self.folder = folder
        self.manifest = manifest
        self.config = config
        self.session_config = session_config
        self.low_memory = low_memory
        components = tuple(manifest.components) if manifest else ()
        on_openvino = runs_on_openvino(session_config, FLOAT_DECODER)
        self.vae = choose_decoder(choose_vae(vae, config, folder), components, on_openvino, low_memory)
        self.tiling = _vae_tiling(folder, self.vae, config.vae_scale_factor)
        self.family: Family = family_for(config)(folder, config, manifest)
        self.components_used = (*self.family.components, self.vae.decoder)
        self.scheduler_config = read_scheduler_config(folder)
        self.scheduler_name = resolve_name(scheduler) if scheduler else default_sampler(self.scheduler_config)
        make_scheduler(self.scheduler_name, self.scheduler_config)  # one that cannot run this schedule fails now
        config.clip_skip_layers = clip_skip_layers(manifest)
        check_loras(folder, list(loras), list(manifest.components) if manifest else None)
        self.loras = tuple(loras)
        self.embeddings, self.skipped_embeddings = self._add_embeddings(*embeddings)
        self.lora_library = LoraLibrary(lora_dir) if lora_dir is not None else None
        self._variants: OrderedDict[tuple, StableDiffusionPipeline] = OrderedDict()  # by LoRA set (with_loras)
        self._variants_lock = threading.Lock()
        self._models: dict[str, OnnxModel] = {}
        if not low_memory:
            for name in self.components_used:
                self.component(name)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path | None = None,
        provider: str = "auto",
        scheduler: str | None = None,
        threads: int | None = None,
        low_memory: bool = False,
        verify: bool = True,
        optimization: str = "all",
        cache: bool = True,
        cache_dir: str | Path | None = None,
        revision: str | None = None,
        vae: str = "auto",
        loras: list[tuple[str | Path, float] | str | Path] | None = None,
        precision: str = "auto",
        embeddings: str | Path | list | None = None,
        lora_dir: str | Path | None = None,
    ) -> StableDiffusionPipeline:
        """Open an sd-onnx folder (checked against its manifest unless `verify=False`) or a plain
        Optimum/diffusers ONNX folder (sizes read from its configs); no path opens the shipped shapes model.
        A path that is no folder but a Hugging Face Hub id ("org/name", "org/name@revision" or `revision=`) is
        fetched into the Hub's cache first (see hub.py). `vae`: "tiny" decodes (and encodes) with the tiny
        autoencoder exported beside the VAE (`sd-export convert --vae`), "full" with the model's own, "auto" the
        model's own. `loras`: LoRA files (or (file, scale) pairs) added to the weights as the sessions are
        created, without PyTorch (see lora.py; fp32/fp16 exports only). `embeddings`: a folder of textual-inversion
        embeddings, or a list of files (or (file, word) pairs); each file's name is its trigger word (see
        embeddings.py). `lora_dir`: a folder of LoRA files that prompts in A1111's syntax pick with `<lora:NAME:W>`
        (see lora_tags.py).

        `optimization` is onnxruntime's graph optimization level ("disabled", "basic", "extended", "all");
        `cache` keeps the optimized CPU graph in `cache_dir` (default: the user cache directory, see
        session.cache_root) so later loads skip that work. `provider="openvino"` runs the same graphs on OpenVINO
        (`pip install 'sd-onnx[openvino]'`), whose float layers run in `precision` ("auto": OpenVINO's default for
        the CPU, bf16 where it has bf16 instructions; "f32"; "bf16")."""
        folder = locate_model(path, revision) if path is not None else shipped_model()
        cache_root = Path(cache_dir).expanduser() if cache_dir is not None else None
        providers = tuple(resolve_providers(provider))
        named = split_provider(provider)[1]
        if named and precision not in ("auto", named):
            raise ValueError(f"provider {provider!r} and precision={precision!r} disagree: give the precision once")
        precision = named or precision
        if os.path.lexists(folder / MANIFEST_NAME):  # a manifest that is no regular file is refused, not skipped
            manifest = Manifest.load(folder)
            if verify:
                manifest.verify(folder)
            config = manifest.config
        else:
            manifest, config = None, _config_from_plain_folder(folder)
        placement = openvino_placement(provider, config.family)
        session_config = SessionConfig(
            providers, threads, optimization, cache, cache_root, not low_memory, precision, placement
        )
        if cls is StableDiffusionPipeline:  # the class diffusers names for the folder's family
            cls = pipeline_class(config)
        return cls(
            folder,
            manifest,
            config,
            scheduler,
            session_config,
            low_memory,
            vae,
            read_loras(loras),
            gather(embeddings),
            lora_dir,
        )

    @property
    def model_name(self) -> str:
        """The name images and servers report: the manifest's, else the folder's."""
        return self.manifest.name if self.manifest else self.folder.name

    # Components -------------------------------------------------------------------------------------------

    @property
    def tokenizer(self) -> CLIPTokenizer | None:
        """The first text encoder's tokenizer (None for an SDXL refiner, which has the second only)."""
        return self.family.tokenizers.get("text_encoder")

    @property
    def tokenizer_2(self) -> CLIPTokenizer | None:
        return self.family.tokenizers.get("text_encoder_2")

    def component(self, name: str) -> OnnxModel | StagedUnet:
        """The onnxruntime session of `name` ("text_encoder", "unet", "transformer", "vae_decoder", ...), loaded
        once. In low-memory mode a model with UNet stages gets a StagedUnet for "unet", which loads them in turn."""
        if name not in self._models:
            if name == "unet" and self.low_memory and self.config.unet_stages and not self.loras:
                unet = self.manifest.components["unet"]
                self._models[name] = StagedUnet(unet, STAGE_COMPONENTS, lambda stage: self.open_graph(stage))
            else:
                self._models[name] = self.open_graph(name)
        return self._models[name]

    def open_graph(self, name: str) -> OnnxModel:
        """A new session of graph `name` (with the pipeline's LoRAs), held by the caller only."""
        info = self.manifest.components.get(name) if self.manifest else None
        file = inside(self.folder, info.file if info else f"{name}/model.onnx", self.folder / MANIFEST_NAME)
        regular_file(file, f"{name} model file")
        overrides = weight_overrides(file.parent, list(self.loras)) if self.loras else {}
        if name in self.text_encoders():
            overrides.update(table_override(file.parent, self.embeddings))
        # Low-memory mode: the VAE's activations (0.4-1 GB at 512x512 for SD) go back as they die, not with the arena.
        arena = not (self.low_memory and name.startswith(("vae", "tiny_vae")))
        # A float graph's bf16-stored weights read unfolded (session.lean_options) where it runs once per image, or
        # in low-memory mode: a fraction of the load time and memory, for slower calls. Quantized graphs keep
        # onnxruntime's optimizations: their int8 MatMuls fuse, and MatMulNBits runs fast only prepacked (Gemma-2
        # 2B 8-bit, unpacked: 11.7 s a call against 8.6 s for the lean fp32 graph).
        narrow = info is not None and info.narrow_weights and info.precision == "fp32"
        lean = narrow and (name in self.text_encoders() or self.low_memory)
        return open_model(file, info, self.session_config, overrides or None, arena=arena, lean=lean)

    def text_encoders(self) -> dict[str, CLIPTokenizer]:
        """Each text encoder this pipeline runs -> its tokenizer."""
        return dict(self.family.tokenizers)

    def _add_embeddings(
        self, embeddings: list[Embedding], skipped: dict[str, str]
    ) -> tuple[list[Embedding], dict[str, str]]:
        """The embeddings that fit this model, their words added to the tokenizers (see embeddings.py), and why
        the others were skipped."""
        if not embeddings:
            return [], dict(skipped)
        fit, unfit = [], {}
        if self.family.name not in ("sd", "sdxl"):  # CLIP-only conditioning is what the files are trained for
            reason = f"textual-inversion embeddings apply to SD 1.x/2.x and SDXL, not {self.family.label}"
            unfit = {embedding.name: reason for embedding in embeddings}
        else:
            tables = {name: token_table(self.folder / name) for name in self.text_encoders()}
            fit, unfit = usable(embeddings, {name: width for name, (_, width) in tables.items()})
            for name, tokenizer in self.text_encoders().items():
                tokenizer.add_embeddings(fit, tables[name][0])
        for name, reason in {**skipped, **unfit}.items():
            LOG.warning("embedding %s skipped: %s", name, reason)
        return fit, {**skipped, **unfit}

    @property
    def loaded_components(self) -> tuple[str, ...]:
        return tuple(self._models)

    def release(self, name: str) -> None:
        """Free a component's session in low-memory mode (a no-op otherwise)."""
        if self.low_memory and self._models.pop(name, None) is not None:
            return_freed_memory()

    # Requests ---------------------------------------------------------------------------------------------

    def prepare(self, request: GenerationRequest, limits: Limits | None = None) -> GenerationRequest:
        """`request` with this model's defaults filled in, checked against the model and `limits` (none: no
        limits, as diffusers); RequestError (a ValueError) naming the bad field."""
        resolved = request.resolve(self.config, self.scheduler_config, self.scheduler_name, limits or Limits.none())
        self.family.check_request(resolved)
        if resolved.vae_tiling and self.tiling is None:
            raise RequestError("vae_tiling", f"this model's autoencoder ({self.vae.decoder}) has no tiled decoding")
        self.lora_tags(resolved)
        return resolved

    def lora_tags(self, request: GenerationRequest) -> list[LoraTag]:
        """The `<lora:...>` tags of the request's prompts (A1111's syntax only), each in the LoRA folder."""
        if request.prompt_syntax != "a1111" or not any("<" in p for p in request.prompts):
            return []
        tags = [tag for prompt in request.prompts for tag in extract_tags(prompt)[1]]
        if tags and self.lora_library is None:
            raise RequestError("prompt", "<lora:...> tags need a LoRA folder (sd-run --lora-dir, lora_dir=)")
        if tags:
            self.lora_library.check(tags)
        return tags

    def with_loras(self, loras: tuple[Lora, ...]) -> StableDiffusionPipeline:
        """This pipeline with `loras` added to its own: new sessions for the graphs they change, the others
        shared. The last MAX_LORA_SETS such pipelines are kept, so a repeated set costs nothing."""
        key = tuple((str(lora.file), lora.scale, tuple(sorted(lora.modules))) for lora in loras)
        with self._variants_lock:
            if key in self._variants:
                self._variants.move_to_end(key)
                return self._variants[key]
            check_loras(self.folder, [*self.loras, *loras], list(self.manifest.components) if self.manifest else None)
            touched = {component for lora in loras for component in lora.modules}
            variant = copy.copy(self)
            variant.loras = (*self.loras, *loras)
            variant._models = {n: m for n, m in self._models.items() if not n.startswith(tuple(touched))}
            variant._variants, variant._variants_lock = OrderedDict(), threading.Lock()
            if not self.low_memory:
                for name in variant.components_used:
                    variant.component(name)
            self._variants[key] = variant
            while len(self._variants) > MAX_LORA_SETS:
                self._variants.popitem(last=False)
            return variant

    def _generate_with_tags(self, request: GenerationRequest, tags: list[LoraTag], *args: Any) -> PipelineOutput:
        """A request whose prompts pick LoRAs: run without the tags on the pipeline with those LoRAs; the
        parameters keep the prompts as written and name the LoRAs, as A1111's infotext does."""
        prompts = tuple(extract_tags(p)[0] for p in request.prompts)
        clean = replace(request, prompt=prompts[0] if isinstance(request.prompt, str) else prompts)
        out = self.with_loras(self.lora_library.resolve(tags)).generate(clean, *args)
        names = ", ".join(dict.fromkeys(tag.name for tag in tags))
        return replace(out, parameters={**self.parameters(request), "Lora": names}, request=request)

    def self_test(self) -> None:
        """Generate one image in one step at the model's defaults (its size, guidance and sampler; a gray image
        and a full mask for an inpainting model), so that a folder whose graphs load but cannot run together
        (a size a graph does not take, a token length past the encoder's positions, a broken graph) fails here
        with one line, not on a server's first request. Also warms the sessions up."""
        image = mask = None
        if self.config.inpainting:
            side = self.config.default_resolution
            image, mask = Image.new("RGB", (side, side), (128, 128, 128)), Image.new("L", (side, side), 255)
        request = GenerationRequest(prompt="", steps=1, seed=0, image=image, mask_image=mask)
        try:
            self.generate(self.prepare(request), output_type="np")
        except Exception as exc:  # noqa: BLE001 - onnxruntime and OpenVINO raise their own types for a graph that fails
            reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise ManifestError(f"{self.folder}: cannot generate an image at the model's defaults ({reason})") from None

    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        seed: int | None = None,
        latents: np.ndarray | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        output_type: str = "pil",
        callback: StepCallback | None = None,
        image: Image.Image | np.ndarray | None = None,
        strength: float | None = None,
        scheduler: str | None = None,
        mask_image: Image.Image | np.ndarray | None = None,
        masked_content: str = "original",
        mask_blur: int = 0,
        padding_mask_crop: int | None = None,
        prompt_2: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        max_sequence_length: int | None = None,
        original_size: tuple[int, int] | None = None,
        target_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_target_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] | None = None,
        aesthetic_score: float | None = None,
        negative_aesthetic_score: float | None = None,
        denoising_end: float | None = None,
        denoising_start: float | None = None,
        guidance_interval: tuple[float, float] | None = None,
        vae_tiling: bool | None = None,
        deepcache_interval: int | None = None,
        tome_ratio: float | None = None,
        paste_back: bool | None = None,
        clip_skip: int | None = None,
        prompt_syntax: str = "plain",
        skip_guidance_layers: list[int] | None = None,
        skip_layer_guidance_scale: float | None = None,
        skip_layer_guidance_start: float | None = None,
        skip_layer_guidance_stop: float | None = None,
        control_image: Image.Image | np.ndarray | list | None = None,
        controlnet: str | list[str | None] | None = None,
        controlnet_conditioning_scale: float | list[float] = 1.0,
        control_guidance_start: float | list[float] = 0.0,
        control_guidance_end: float | list[float] = 1.0,
        guess_mode: bool = False,
    ) -> PipelineOutput:
        """Generate images; see diffusers' StableDiffusionPipeline (and StableDiffusionXLPipeline for the
        arguments after `scheduler`, SDXL models only) for the meaning of each argument (steps default to the
        model's or request.DEFAULT_STEPS, guidance and size to the model's, seed to a random one).

        Accelerators, off by default: `guidance_interval=(lo, hi)` applies classifier-free guidance only at
        steps whose sigma lies in (lo, hi] and skips the unconditional half elsewhere; `vae_tiling=True`
        decodes and encodes in overlapping tiles (diffusers' `enable_tiling`), so memory follows the tile
        rather than the image (None: on in low-memory mode above the VAE's tile size); `deepcache_interval=N`
        runs the full UNet every N steps and its shallow path on the cached deep features between (DeepCache;
        the model needs its DeepCache graphs, see `sd-export convert --deepcache-branch`); `tome_ratio=R` merges
        that fraction of the outermost level's tokens before self-attention (ToMe for SD; needs `--tome` at
        export).

        `paste_back=True` (inpainting) lays the original back over the decoded picture outside the mask, as A1111
        does; by default, as in diffusers, only a `padding_mask_crop` box is pasted back. `clip_skip=K` skips K
        text encoder layers from the end (diffusers' count: A1111's "Clip skip" N is K = N - 1);
        `prompt_syntax="a1111"` reads A1111's emphasis, BREAK and long prompts (default "plain": diffusers'
        reading). `max_sequence_length` (SD3, FLUX.1, FLUX.2, Z-Image): the T5/LLM text tokens read, as diffusers
        takes it (default: the model's, e.g. 256 for FLUX.1-schnell, 512 for dev). `skip_guidance_layers` and the
        `skip_layer_guidance_*` arguments: SD3's skip-layer guidance as diffusers', on an export made with
        `sd-export convert --skip-layers` (the layers must be its). The hires fix: `hires.hires_fix`.

        ControlNet (a model exported with `--controlnet`): `control_image`, one or a list (diffusers' ControlNet
        pipelines' `image` in txt2img, `control_image` in img2img and inpainting), read by the ControlNets named in
        `controlnet` (default: the model's, in order), with diffusers' `controlnet_conditioning_scale`,
        `control_guidance_start`/`_end` (one value or one per image) and `guess_mode`."""
        try:
            controls = control_units(control_image, controlnet, controlnet_conditioning_scale,
                                     control_guidance_start, control_guidance_end)  # fmt: skip
        except RequestError as exc:
            raise RequestError("control_image", exc.reason) from None
        request = GenerationRequest(
            prompt=prompt if isinstance(prompt, str) else tuple(prompt) if isinstance(prompt, list) else prompt,
            negative_prompt=tuple(negative_prompt) if isinstance(negative_prompt, list) else negative_prompt,
            steps=num_inference_steps,
            guidance_scale=guidance_scale,
            width=width,
            height=height,
            seed=seed,
            batch=num_images_per_prompt,
            scheduler=scheduler,
            eta=eta,
            image=image,
            strength=strength,
            mask_image=mask_image,
            masked_content=masked_content,
            mask_blur=mask_blur,
            padding_mask_crop=padding_mask_crop,
            prompt_2=tuple(prompt_2) if isinstance(prompt_2, list) else prompt_2,
            negative_prompt_2=tuple(negative_prompt_2) if isinstance(negative_prompt_2, list) else negative_prompt_2,
            max_sequence_length=max_sequence_length,
            original_size=original_size,
            target_size=target_size,
            crops_coords_top_left=crops_coords_top_left,
            negative_original_size=negative_original_size,
            negative_target_size=negative_target_size,
            negative_crops_coords_top_left=negative_crops_coords_top_left,
            aesthetic_score=aesthetic_score,
            negative_aesthetic_score=negative_aesthetic_score,
            denoising_end=denoising_end,
            denoising_start=denoising_start,
            guidance_interval=guidance_interval,
            vae_tiling=vae_tiling,
            deepcache_interval=deepcache_interval,
            tome_ratio=tome_ratio,
            paste_back=paste_back,
            clip_skip=clip_skip,
            prompt_syntax=prompt_syntax,
            skip_guidance_layers=skip_guidance_layers,
            skip_layer_guidance_scale=skip_layer_guidance_scale,
            skip_layer_guidance_start=skip_layer_guidance_start,
            skip_layer_guidance_stop=skip_layer_guidance_stop,
            controls=controls,
            guess_mode=guess_mode,
        )
        try:
            request = self.prepare(request)
        except RequestError as exc:  # name the argument as this call spells it
            raise RequestError(ARGUMENT_NAMES.get(exc.field, exc.field), exc.reason) from None
        return self.generate(request, callback=callback, output_type=output_type, latents=latents)

    def generate(
        self,
        request: GenerationRequest,
        callback: StepCallback | None = None,
        output_type: str = "pil",
        latents: np.ndarray | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> PipelineOutput:
        """Run one request (resolved here if it is not yet). `cancelled` is polled between steps and between
        decoded images; `callback` after each step. Raises GenerationCancelled when either asks to stop."""
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        if callback is not None and not callable(callback):
            raise ValueError(f"callback must be callable, got {type(callback).__name__}")
        request = self.prepare(request) if not request.resolved else request
        tags = self.lora_tags(request)
        if tags:
            return self._generate_with_tags(request, tags, callback, output_type, latents, cancelled)
        if request.hires is not None:
            return hires_fix(self, request, None, callback, output_type, latents, cancelled)
        if request.padding_mask_crop is not None:
            return self._inpaint_crop(request, callback, output_type, latents, cancelled)
        if request.paste_back and output_type == "latent":
            raise ValueError("output_type 'latent' cannot be pasted back into the image; paste_back needs pil or np")
        self._warn_unknown_words(request.prompts, request.prompt_syntax)
        sched = make_scheduler(request.scheduler, self.scheduler_config, eta=request.eta)
        generator = noise_source(request)
        do_cfg = self.family.uses_cfg(request.guidance_scale)
        cond = self.conditioning(request, do_cfg)
        shape = self.latent_shape(request)
        self.family.set_timesteps(sched, request)
        latents, timesteps, inpainting = start_latents(self, request, sched, shape, generator, latents)
        scale = self.family.cfg_scale(request.guidance_scale)
        guidance = Guidance.plan(scale, do_cfg, request.guidance_interval, sched.sigma_at(timesteps))
        unguided = guidance.unguided(cond)
        cache = DeepCache(request.deepcache_interval) if (request.deepcache_interval or 1) > 1 else None
        control = ControlPlan.prepare(request.controls, request.width, request.height, request.guess_mode)

        def predict(model_input: np.ndarray, i: int, t: float) -> np.ndarray:
            denoiser_input = inpainting.unet_input(model_input) if inpainting is not None else model_input
            step_cond = guidance.conditioning_at(i, cond, unguided)
            skip = skip_layer_scale(request, i, len(timesteps)) if step_cond is cond and do_cfg else None
            residuals = control.residuals(self, model_input, t, step_cond, i, len(timesteps))
            prediction = self.predict_noise(denoiser_input, t, step_cond, guidance, cache, request.tome_ratio, skip,
                                            residuals)  # fmt: skip
            return self.family.sampler_prediction(sched, prediction, model_input, t)

        after_step = None
        if inpainting is not None:
            after_step = lambda x, i: inpainting.after_step(x, sched, timesteps, i)  # noqa: E731
        latents = sample(predict, sched, latents, timesteps, generator, after_step, _stop_check(callback, cancelled))
        latents = self.family.final_latents(sched, latents)
        for name in (*UNET_GRAPHS, self.family.denoiser, SKIP_LAYERS):
            self.release(name)
        params = self.parameters(request)
        if output_type == "latent":  # for a refiner's `image`, as diffusers' output_type="latent"
            return PipelineOutput(latents, params, request)
        images = self.decode_latents(latents, cancelled, tiled=self.uses_tiling(request))
        self.release(self.vae.decoder)
        if request.paste_back:  # whole-picture inpainting; a crop is pasted back by _inpaint_crop
            pasted = paste_back(to_pil(images), request.image, request.mask_image, request.mask_blur)
            return PipelineOutput(pasted if output_type == "pil" else _as_array(pasted), params, request)
        return PipelineOutput(to_pil(images) if output_type == "pil" else images, params, request)

    def _inpaint_crop(
        self,
        request: GenerationRequest,
        callback: StepCallback | None,
        output_type: str,
        latents: np.ndarray | None,
        cancelled: Callable[[], bool] | None,
    ) -> PipelineOutput:
        """Inpaint the box around the mask at the full output size, then paste it back into the original (whose
        size the images keep), as diffusers' `padding_mask_crop` and A1111's "only masked" do."""
        if output_type == "latent":
            raise ValueError(
                "output_type 'latent' cannot be pasted back into the image; padding_mask_crop needs pil or np"
            )
        crop = MaskCrop.around(
            request.image,
            request.mask_image,
            request.width,
            request.height,
            request.padding_mask_crop,
            request.mask_blur,
        )
        inner = replace(
            request,
            image=crop.image(request.width, request.height),
            mask_image=crop.mask_image(request.width, request.height),
            mask_blur=0,
            padding_mask_crop=None,
            paste_back=False,  # the box goes back into the original below, not into itself
        )
        out = self.generate(inner, callback, "pil", latents, cancelled)
        images = [crop.paste(image) for image in out.images]
        return PipelineOutput(images if output_type == "pil" else _as_array(images), self.parameters(request), request)

    def parameters(self, request: GenerationRequest) -> dict[str, Any]:
        """The generation parameters images carry: the request's, and the LoRAs applied at load time."""
        params = request.parameters(self.model_name)
        applied = [f"{lora.file.name}:{lora.scale:g}" for lora in self.loras if lora.scale]
        if applied:
            params["Lora"] = ", ".join(applied)
        if (request.deepcache_interval or 1) > 1:
            params["DeepCache"] = f"interval {request.deepcache_interval}, branch {self.config.deepcache_branch}"
        if request.tome_ratio:
            params["ToMe ratio"] = request.tome_ratio
        if self.uses_tiling(request):
            params["Tiled VAE"] = True  # tiles move pixels a little: part of what reproduces the image
        if self.engine.startswith("OpenVINO"):
            params["Engine"] = self.engine  # so do OpenVINO's kernels and bf16
        return params

    @property
    def engine(self) -> str:
        """What runs the graphs: "onnxruntime 1.32.0 CPUExecutionProvider", "OpenVINO 2026.4.1 bf16", or with
        `auto`'s placement "OpenVINO 2026.4.1 bf16 for unet, onnxruntime 1.32.0 CPUExecutionProvider for the rest"."""
        config = self.session_config
        placed = config.openvino_components
        placed = placed if placed is None else [name for name in placed if name in self.components_used]
        if config.providers[0] != OPENVINO or placed == []:  # `auto` may place nothing this family runs
            return f"onnxruntime {ort_version()} {config.providers[0] if placed is None else CPU}"
        precision = default_precision() if config.precision == "auto" else config.precision
        openvino = f"OpenVINO {openvino_version()} {precision}"
        if placed is None:
            return openvino
        return f"{openvino} for {', '.join(placed)}, onnxruntime {ort_version()} {CPU} for the rest"

    def latent_shape(self, request: GenerationRequest) -> tuple[int, int, int, int]:
        factor = self.config.vae_scale_factor
        return (request.image_count, self.config.latent_channels, request.height // factor, request.width // factor)

    # Steps --------------------------------------------------------------------------------------------------

    def conditioning(self, request: GenerationRequest, do_cfg: bool) -> Conditioning:
        """What the denoiser is conditioned on for `request` (the family's text encoders and extra inputs;
        with guidance, unconditional then conditional rows)."""
        return self.family.conditioning(self, request, do_cfg)

    def predict_noise(
        self,
        model_input: np.ndarray,
        t: float,
        cond: Conditioning,
        guidance: Guidance,
        cache: DeepCache | None = None,
        tome_ratio: float | None = None,
        skip_scale: float | None = None,
        residuals: dict[str, np.ndarray] | None = None,
    ) -> np.ndarray:
        """One guided denoiser call on scaled latents: with classifier-free guidance (conditioning twice the
        latents' rows) the unconditional and conditional halves run as one batch and are combined. `cache`:
        DeepCache's state for this generation, which picks the full or the shallow UNet (see deepcache.py);
        `tome_ratio` > 0 runs the token-merging UNet at that ratio; `skip_scale` adds skip-layer guidance (SD3): that
        weight times the conditional prediction minus the `transformer_skip` graph's on the conditional half;
        `residuals` (ControlNets', by input name) run the UNet that adds them (see controlnet.py)."""
        rows = len(cond.text) // len(model_input)
        batch = np.concatenate([model_input] * rows) if rows > 1 else model_input
        name = self.family.denoiser
        if name == "unet":
            name = TOKEN_MERGING if tome_ratio else "unet"
            if cache is not None and cache.reuses(len(batch)):
                name = SHALLOW
            if residuals:
                name = CONTROL_UNET
            for other in set(UNET_GRAPHS) - {name}:  # low-memory mode: one UNet graph at a time
                self.release(other)
        denoiser = self.component(name)
        feeds = self.family.denoiser_feeds(denoiser, batch, t, cond)
        if tome_ratio:
            feeds["tome_ratio"] = np.array(tome_ratio, np.float64)
        feeds.update(residuals or {})
        output = denoiser(**feeds)[0] if cache is None else cache.run(denoiser, denoiser, feeds)  # the graph it picks
        prediction = self.family.denoiser_output(output, batch)
        guided = guidance.combine(prediction, rows)
        if skip_scale is None:
            return guided
        self.release(name)  # low-memory mode: one transformer graph at a time
        skipping = self.component(SKIP_LAYERS)
        feeds = self.family.denoiser_feeds(skipping, model_input, t, cond.conditional_half())
        skipped = self.family.denoiser_output(skipping(**feeds)[0], model_input)
        self.release(SKIP_LAYERS)
        return guided + np.float32(skip_scale) * (np.split(prediction, rows)[-1] - skipped)

    def decode_latents(
        self, latents: np.ndarray, cancelled: Callable[[], bool] | None = None, tiled: bool = False
    ) -> np.ndarray:
        """Latents -> (N, H, W, 3) floats in [0, 1]; one image at a time keeps VAE memory flat, and `tiled`
        one tile at a time (see `tiling`)."""
        decoder = self.component(self.vae.decoder)
        tiling = self.tiling if tiled else None
        scaled = latents / np.float32(self.vae.scaling_factor)
        if self.vae.shift_factor:
            scaled = scaled + np.float32(self.vae.shift_factor)
        images = []
        for i in range(len(scaled)):
            if cancelled is not None and cancelled():
                raise GenerationCancelled(f"cancelled while decoding image {i + 1} of {len(scaled)}")
            one = scaled[i : i + 1]
            images.append(
                tiling.decode(lambda z: decoder(latent_sample=z)[0], one) if tiling else decoder(latent_sample=one)[0]
            )
        return np.clip(np.concatenate(images) / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)

    def uses_tiling(self, request: GenerationRequest) -> bool:
        """Whether `request` decodes in tiles: as it asks, else in low-memory mode when the image is larger
        than one tile."""
        tiling = self.tiling
        if tiling is None or request.vae_tiling is False:
            return False
        return bool(request.vae_tiling) or (self.low_memory and max(request.width, request.height) > tiling.sample)

    @property
    def has_tiny_vae(self) -> bool:
        return self.config.tiny_vae_scaling_factor is not None or self.config.vae_kind == "tiny"

    def preview(self, latents: np.ndarray) -> Image.Image:
        """The first image of `latents` (mid-denoising) through the tiny autoencoder: a cheap look at a running
        generation (ValueError when the folder has none; see `has_tiny_vae`)."""
        if not self.has_tiny_vae:
            raise ValueError(f"{self.folder}: has no tiny autoencoder to preview with")
        tiny = choose_vae("tiny", self.config, self.folder)
        scaled = latents[:1] / np.float32(tiny.scaling_factor) + np.float32(tiny.shift_factor or 0.0)
        pixels = self.component(tiny.decoder)(latent_sample=scaled)[0]
        return to_pil(np.clip(pixels / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1))[0]

    def encode_image(self, pixels: np.ndarray, generator: Generator, tiled: bool = False) -> np.ndarray:
        """(1, 3, H, W) pixels in [-1, 1] -> scaled latents, sampled from the VAE posterior with `generator`
        (a tiny autoencoder's and a DC-AE's are deterministic and draw nothing; per-image generators sample one
        latent per image, as a batch of one with each seed would); `tiled`: in tiles (see `tiling`)."""
        encoder = self.component(self.vae.encoder)
        tiling = self.tiling if tiled else None
        encoded = tiling.encode(lambda x: encoder(sample=x)[0], pixels) if tiling else encoder(sample=pixels)[0]
        self.release(self.vae.encoder)
        if self.vae.deterministic:
            latents = encoded
        else:
            mean, logvar = np.split(encoded, 2, axis=1)
            std = np.exp(0.5 * np.clip(logvar, -30.0, 20.0))
            if isinstance(generator, ImageGenerators):  # a posterior sample per image, each from its own seed
                mean, std = (np.concatenate([a] * (len(generator) // len(a))) for a in (mean, std))
            latents = mean + std * generator.randn(mean.shape)
        if self.vae.shift_factor:  # SD3, FLUX: latents are shifted before they are scaled
            latents = latents - np.float32(self.vae.shift_factor)
        return (latents * np.float32(self.vae.scaling_factor)).astype(np.float32)

    def _warn_unknown_words(self, prompts: list[str], syntax: str = "plain") -> None:
        """Models that know their vocabulary (the shapes model) say which words they will ignore (in A1111's
        syntax, of the text itself: BREAK and weights are not words)."""
        vocabulary = self.manifest.vocabulary if self.manifest else None
        if not vocabulary:
            return
        if syntax == "a1111":
            prompts = [" ".join(text for text, w in parse_attention(p) if (text, w) != BREAK) for p in prompts]
        known = {w.lower() for w in vocabulary} | {e.name.lower() for e in self.embeddings}
        unknown = sorted({w for p in prompts for w in re.findall(r"[^\W\d_]+", p.lower())} - known)
        if unknown:
            shown = [w if len(w) <= MAX_WORD_CHARS else w[:MAX_WORD_CHARS] + "..." for w in unknown[:MAX_WORDS_NAMED]]
            named = ", ".join(shown) + (" ..." if len(unknown) > MAX_WORDS_NAMED else "")
            LOG.warning("%s does not know these words, which it will ignore: %s", self.model_name, named)


def noise_source(request: GenerationRequest) -> Generator:
    """Where a resolved request's noise comes from: one generator seeded `seed` for the whole batch (diffusers'
    `generator=`), or with `seed_per_image` one per image, seeded seed + i (A1111's batches)."""
    if request.seed_per_image and request.image_count > 1:
        return ImageGenerators(request.image_seeds)
    return TorchGenerator(request.seed)


def _vae_tiling(folder: Path, vae: VaeChoice, factor: int) -> Tiling | None:
    """Tile sizes of the full VAE, from its diffusers config beside the graph, its latent tile in the graph's
    latents (`factor` times smaller than pixels: the VAE's own, or FLUX.2's patchified ones, half those); None for
    a tiny autoencoder (cheap enough whole), a DC-AE (whose tiles this does not know) or a folder without that
    config."""
    config = folder / vae.decoder / "config.json"
    if vae.deterministic or not os.path.lexists(config):
        return None
    try:
        tiling = Tiling.from_vae_config(read_json(inside(folder, f"{vae.decoder}/config.json", folder)))
        return Tiling(tiling.sample, tiling.sample // factor)
    except ManifestError:
        raise
    except ValueError as exc:
        raise ManifestError(f"{config}: {exc}") from None


def _stop_check(
    callback: StepCallback | None, cancelled: Callable[[], bool] | None
) -> Callable[[int, int, np.ndarray], bool]:
    def should_stop(i: int, total: int, latents: np.ndarray) -> bool:
        if callback is not None and callback(i, total, latents) is False:
            return True
        return cancelled is not None and cancelled()

    return should_stop


def _as_array(images: list[Image.Image]) -> np.ndarray:
    """Pictures as output_type "np" gives them: (N, H, W, 3) floats in [0, 1]."""
    return np.stack([np.asarray(image, np.float32) / 255.0 for image in images])


def _config_from_plain_folder(folder: Path) -> ModelConfig:
    """Sizes for an Optimum/diffusers ONNX folder without our manifest, from the configs it carries
    (the embedding width from the text encoder graph when its config is missing)."""
    if not (folder / "unet" / "model.onnx").is_file():
        raise ManifestError(f"{folder}: not an ONNX Stable Diffusion folder (no unet/model.onnx)")
    width = None
    if not (folder / "text_encoder" / "config.json").is_file():
        import onnxruntime as ort

        graph = ort.InferenceSession(str(folder / "text_encoder" / "model.onnx"), providers=["CPUExecutionProvider"])
        width = graph.get_outputs()[0].shape[-1]
    return read_model_config(folder, vae="vae_decoder", text_width=width)


class StableDiffusionInpaintPipeline(StableDiffusionPipeline):
    """SD models whose UNet takes the mask and the masked image's latents (diffusers'
    StableDiffusionInpaintPipeline): `image=` and `mask_image=` on every call. Every other pipeline inpaints
    too, given a mask, the way diffusers does with an ordinary UNet (see inpaint.py)."""


class StableDiffusionXLPipeline(StableDiffusionPipeline):
    """SDXL base or refiner (families/sdxl.py): txt2img, img2img and inpainting; `prompt_2` defaults to the
    prompt. A refiner is meant for img2img on a base model's output, as diffusers'
    StableDiffusionXLImg2ImgPipeline runs it."""


class StableDiffusion3Pipeline(StableDiffusionPipeline):
    """Stable Diffusion 3 / 3.5 (families/sd3.py): txt2img and img2img; `prompt_2` goes to CLIP-G."""


class FluxPipeline(StableDiffusionPipeline):
    """FLUX.1 schnell and dev (families/flux.py): txt2img and img2img; `guidance_scale` is dev's embedded
    guidance (no classifier-free guidance, no negative prompt)."""


class FluxFillPipeline(FluxPipeline):
    """FLUX.1 Fill (families/flux.py, a transformer that also takes the masked image's latents and the mask):
    inpainting and outpainting, `image=` and `mask_image=` required, as diffusers' FluxFillPipeline."""


class ZImagePipeline(StableDiffusionPipeline):
    """Z-Image and Z-Image-Turbo (families/z_image.py): txt2img and img2img; guidance as diffusers' ZImagePipeline
    defines it (classifier-free above 0; the Turbo's default is 0, none)."""


class Flux2KleinPipeline(StableDiffusionPipeline):
    """FLUX.2 [klein] (families/flux2.py): txt2img; classifier-free guidance above 1 for the base models, none for
    the step-distilled ones. output_type="latent" gives the sampler's latents (patchified and normalized), which
    the vae_decoder graph takes."""


class SanaPipeline(StableDiffusionPipeline):
    """SANA (families/sana.py): txt2img and img2img; prompts read behind SANA's complex human instruction."""


class SanaSprintPipeline(StableDiffusionPipeline):
    """SANA-Sprint (families/sana.py): txt2img and img2img in 1-4 sCM steps; `guidance_scale` is embedded (no
    classifier-free guidance, no negative prompt)."""


# The class `from_pretrained` returns for each family's pipeline_class (an inpainting UNet: its own name).
PIPELINE_CLASSES: dict[str, type[StableDiffusionPipeline]] = {
    cls.__name__: cls
    for cls in (
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        StableDiffusion3Pipeline,
        FluxPipeline,
        FluxFillPipeline,
        ZImagePipeline,
        Flux2KleinPipeline,
        SanaPipeline,
        SanaSprintPipeline,
    )
}


def pipeline_class(config: ModelConfig) -> type[StableDiffusionPipeline]:
    """The pipeline class diffusers names for a model with `config`."""
    if config.inpainting and family_for(config).name == "sd":
        return StableDiffusionInpaintPipeline
    if config.inpainting and family_for(config).name == "flux":
        return FluxFillPipeline
    return PIPELINE_CLASSES.get(family_for(config).pipeline_class, StableDiffusionPipeline)


class DiffusionPipeline:
    """diffusers' entry point: `DiffusionPipeline.from_pretrained(folder)` returns the pipeline the folder's
    manifest (or configs) calls for: `StableDiffusionPipeline` (SD 1.x/2.x, LCM, Turbo),
    `StableDiffusionInpaintPipeline`, `StableDiffusionXLPipeline`, ... (see families/)."""

    @staticmethod
    def from_pretrained(path: str | Path | None = None, **options: Any) -> StableDiffusionPipeline:
        return StableDiffusionPipeline.from_pretrained(path, **options)


class AutoPipelineForInpainting(DiffusionPipeline):
    """diffusers' AutoPipelineForInpainting: the folder's pipeline; all of them take `image=` and `mask_image=`."""


__all__ = [
    "StableDiffusionPipeline",
    "StableDiffusionInpaintPipeline",
    "StableDiffusionXLPipeline",
    "StableDiffusion3Pipeline",
    "FluxPipeline",
    "FluxFillPipeline",
    "ZImagePipeline",
    "Flux2KleinPipeline",
    "SanaPipeline",
    "SanaSprintPipeline",
    "DiffusionPipeline",
    "AutoPipelineForInpainting",
    "PipelineOutput",
    "GenerationCancelled",
]
