"""SD3 and FLUX.1 exports (tiny-sd3, tiny-flux = schnell, tiny-flux-dev): the builders make pipelines diffusers
loads and runs; the exporter's graphs, signatures, manifest config, tokenizers and parity with PyTorch."""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from sd_onnx.exporter.components_transformers import flux_image_ids
from sd_onnx.exporter.convert import DEFAULT_ATOL, convert
from sd_onnx.exporter.errors import ExportError
from sd_onnx.exporter.source import inspect_folder
from sd_onnx.runtime.manifest import Manifest, ManifestError, ModelConfig
from sd_onnx.runtime.manifest_schema import check_manifest, check_model_config

MODELS = ("sd3", "flux", "flux_dev")
CLIP_OUTPUTS = ["last_hidden_state", "pooler_output"]
TEXT = ["batch", "sequence"]


def folders(request: pytest.FixtureRequest, model: str) -> tuple[Path, Path]:
    """(diffusers folder, export) of `model`, from the session fixtures in conftest.py."""
    return request.getfixturevalue(f"tiny_{model}_pipeline"), request.getfixturevalue(f"tiny_{model}_export")


def config_of(folder: Path, part: str) -> dict:
    return json.loads((folder / part / "config.json").read_text())


def diffusers_pipeline(folder: Path):
    import diffusers

    index = json.loads((folder / "model_index.json").read_text())
    pipe = getattr(diffusers, index["_class_name"]).from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def signature(info) -> tuple[dict, dict]:
    as_dict = lambda specs: {t.name: (t.dtype, t.shape) for t in specs}  # noqa: E731
    return as_dict(info.inputs), as_dict(info.outputs)


@pytest.mark.parametrize("model", MODELS)
def test_diffusers_loads_and_runs_the_built_pipeline(request: pytest.FixtureRequest, model: str) -> None:
    """The tiny folders are real diffusers pipelines: they load from disk and generate; T5's tokenizer has T5's
    special ids and exactly the encoder's vocabulary."""
    source = request.getfixturevalue(f"tiny_{model}_pipeline")
    pipe = diffusers_pipeline(source)
    suffix = "_3" if model == "sd3" else "_2"  # T5's: SD3's third encoder, FLUX's second
    t5, tokenizer = getattr(pipe, f"text_encoder{suffix}"), getattr(pipe, f"tokenizer{suffix}")
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert len(tokenizer) == t5.config.vocab_size and tokenizer("a cat").input_ids[-1] == 1
    files = sorted(p.name for p in (source / f"tokenizer{suffix}").iterdir())
    assert files == ["tokenizer.json", "tokenizer_config.json"]
    image = pipe("a cat", num_inference_steps=1, height=32, width=32, output_type="np").images
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()


@pytest.mark.parametrize("model", MODELS)
def test_manifest_signatures(request: pytest.FixtureRequest, model: str) -> None:
    source, export = folders(request, model)
    manifest = Manifest.load(export)
    manifest.verify(export)
    family = "sd3" if model == "sd3" else "flux"
    assert manifest.model_family == family == manifest.config.family
    transformer = config_of(source, "transformer")
    width, pooled = transformer["joint_attention_dim"], transformer["pooled_projection_dim"]
    infos = manifest.components
    if family == "sd3":
        assert list(infos) == ["text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "vae_decoder",
                               "vae_encoder"]  # fmt: skip
        for name in ("text_encoder", "text_encoder_2"):
            clip = config_of(source, name)
            hidden = [f"hidden_states.{i}" for i in range(clip["num_hidden_layers"] + 1)]
            inputs, outputs = signature(infos[name])
            assert inputs == {"input_ids": ("int32", TEXT)}
            assert list(outputs) == ["text_embeds", "last_hidden_state", *hidden]
            assert outputs["text_embeds"] == ("float32", ["batch", clip["projection_dim"]])
            assert outputs[hidden[-2]] == ("float32", [*TEXT, clip["hidden_size"]])
        t5_name = "text_encoder_3"
        latents = ["batch", 16, "height", "width"]
        expected = {
            "hidden_states": ("float32", latents),
            "encoder_hidden_states": ("float32", [*TEXT, width]),
            "pooled_projections": ("float32", ["batch", pooled]),
            "timestep": ("float32", ["batch"]),
        }
        assert signature(infos["transformer"]) == (expected, {"out_hidden_states": ("float32", latents)})
    else:
        assert list(infos) == ["text_encoder", "text_encoder_2", "transformer", "vae_decoder", "vae_encoder"]
        inputs, outputs = signature(infos["text_encoder"])
        assert inputs == {"input_ids": ("int32", TEXT)} and list(outputs) == CLIP_OUTPUTS
        assert outputs["pooler_output"] == ("float32", ["batch", pooled])
        t5_name = "text_encoder_2"
        tokens = ["batch", "image_sequence", transformer["in_channels"]]
        expected = {
            "hidden_states": ("float32", tokens),
            "encoder_hidden_states": ("float32", [*TEXT, width]),
            "pooled_projections": ("float32", ["batch", pooled]),
            "timestep": ("float32", ["batch"]),
            "txt_ids": ("float32", ["sequence", 3]),
            "img_ids": ("float32", ["image_sequence", 3]),
        }
        if model == "flux_dev":
            expected["guidance"] = ("float32", ["batch"])
        assert signature(infos["transformer"]) == (expected, {"out_hidden_states": ("float32", tokens)})
    assert signature(infos[t5_name]) == (
        {"input_ids": ("int32", TEXT)},
        {"last_hidden_state": ("float32", [*TEXT, config_of(source, t5_name)["d_model"]])},
    )
    inputs, outputs = signature(infos["vae_decoder"])
    assert inputs == {"latent_sample": ("float32", ["batch", 16, "height", "width"])}
    for name, info in infos.items():
        assert info.precision == "fp32" and info.validation["reference"] == "torch"
        assert info.validation["max_abs_diff"] <= info.validation["atol"] == DEFAULT_ATOL, name


@pytest.mark.parametrize("model", MODELS)
def test_model_config_is_diffusers(request: pytest.FixtureRequest, model: str) -> None:
    """Each ModelConfig value is what diffusers' own pipeline uses: its configs and its call's defaults."""
    source, export = folders(request, model)
    config = Manifest.load(export).config
    pipe = diffusers_pipeline(source)
    defaults = {k: p.default for k, p in inspect.signature(type(pipe).__call__).parameters.items()}
    transformer, vae = pipe.transformer.config, pipe.vae.config
    packing = 2 if model != "sd3" else transformer.patch_size
    assert config.embedding_dim == transformer.joint_attention_dim
    assert config.pooled_dim == transformer.pooled_projection_dim
    assert config.latent_channels == vae.latent_channels == 16 and config.vae_scale_factor == pipe.vae_scale_factor
    assert (config.scaling_factor, config.shift_factor) == (vae.scaling_factor, vae.shift_factor)
    assert config.sample_size == pipe.default_sample_size and config.max_token_length == pipe.tokenizer_max_length
    assert config.default_resolution == pipe.default_sample_size * pipe.vae_scale_factor
    assert config.patch_size == packing and config.size_multiple == pipe.vae_scale_factor * packing
    assert config.max_sequence_length == defaults["max_sequence_length"] and config.prediction_type == "flow"
    assert config.guidance_embeds == bool(getattr(transformer, "guidance_embeds", False)) == (model == "flux_dev")
    if model == "flux":  # schnell: no guidance at all, 4 steps (the model card's, not FluxPipeline's defaults)
        assert (config.guidance_scale, config.default_steps) == (0.0, 4)
    else:
        assert (config.guidance_scale, config.default_steps) == (
            defaults["guidance_scale"],
            defaults["num_inference_steps"],
        )
    assert not config.sdxl and config.denoiser == "transformer"
    assert config.time_ids_count is None and config.unet_in_channels is None


@pytest.mark.parametrize("model", MODELS)
def test_tokenizers_and_configs_copied(request: pytest.FixtureRequest, model: str) -> None:
    """Each text encoder's tokenizer beside it (tokenizer.json always; CLIP's vocab.json/merges.txt too), T5's
    giving the source's ids with the `tokenizers` library alone; the torch configs and model_index.json."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    source, export = folders(request, model)
    t5 = "tokenizer_3" if model == "sd3" else "tokenizer_2"
    clips = ("tokenizer", "tokenizer_2") if model == "sd3" else ("tokenizer",)
    for name in clips:
        assert {"tokenizer.json", "vocab.json", "merges.txt"} <= {p.name for p in (export / name).iterdir()}
    prompt = "a photo of an astronaut riding a horse, 4k"
    ids = Tokenizer.from_file(str(export / t5 / "tokenizer.json")).encode(prompt).ids
    assert ids == AutoTokenizer.from_pretrained(source / t5)(prompt).input_ids and ids[-1] == 1
    index = json.loads((export / "model_index.json").read_text())
    assert index["_class_name"] == json.loads((source / "model_index.json").read_text())["_class_name"]
    assert index[t5] == ["transformers", "T5TokenizerFast"] and index["transformer"] == [
        "diffusers",
        "OnnxRuntimeModel",
    ]
    assert config_of(export, "transformer") == config_of(source, "transformer")
    scheduler = json.loads((export / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "FlowMatchEulerDiscreteScheduler"


def run_both(model: torch.nn.Module, graph: ort.InferenceSession, feeds: dict[str, torch.Tensor]) -> float:
    with torch.no_grad():
        expected = model(**feeds, return_dict=False)[0].numpy()
    got = graph.run(None, {k: v.numpy() for k, v in feeds.items()})[0]
    assert got.shape == expected.shape
    return float(np.abs(got - expected).max())


@pytest.mark.parametrize("model", MODELS)
def test_transformer_matches_torch_at_other_sizes(request: pytest.FixtureRequest, model: str) -> None:
    """Nothing about the size is baked in: fresh inputs at the traced size, a non-square one and another batch
    and prompt length give PyTorch's outputs (SD3's cropped position embedding, FLUX's rotary positions)."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    source, export = folders(request, model)
    config = Manifest.load(export).config
    graph = session(export / "transformer" / "model.onnx")
    gen = torch.Generator().manual_seed(7)
    if model == "sd3":
        torch_model = SD3Transformer2DModel.from_pretrained(source / "transformer").eval()
        for batch, height, width, tokens in ((2, 32, 32, 333), (3, 24, 40, 100)):
            feeds = {
                "hidden_states": torch.randn(batch, 16, height, width, generator=gen),
                "encoder_hidden_states": torch.randn(batch, tokens, config.embedding_dim, generator=gen),
                "pooled_projections": torch.randn(batch, config.pooled_dim, generator=gen),
                "timestep": torch.rand(batch, generator=gen) * 1000,
            }
            assert run_both(torch_model, graph, feeds) < 1e-4
        return
    torch_model = FluxTransformer2DModel.from_pretrained(source / "transformer").eval()
    for batch, rows, columns, tokens in ((2, 16, 16, 512), (3, 6, 10, 77)):
        feeds = {
            "hidden_states": torch.randn(batch, rows * columns, 64, generator=gen),
            "encoder_hidden_states": torch.randn(batch, tokens, config.embedding_dim, generator=gen),
            "pooled_projections": torch.randn(batch, config.pooled_dim, generator=gen),
            "timestep": torch.rand(batch, generator=gen),
            "txt_ids": torch.zeros(tokens, 3),
            "img_ids": flux_image_ids(rows, columns),
        }
        if config.guidance_embeds:
            feeds["guidance"] = torch.full((batch,), 3.5)
        assert run_both(torch_model, graph, feeds) < 1e-4


def test_t5_encoder_takes_any_length(tiny_sd3_pipeline: Path, tiny_sd3_export: Path) -> None:
    from transformers import T5EncoderModel

    t5 = T5EncoderModel.from_pretrained(tiny_sd3_pipeline / "text_encoder_3").eval()
    graph = session(tiny_sd3_export / "text_encoder_3" / "model.onnx")
    ids = torch.randint(0, t5.config.vocab_size, (3, 19), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = t5(ids).last_hidden_state.numpy()
    assert np.abs(graph.run(None, {"input_ids": ids.int().numpy()})[0] - expected).max() < 1e-4


def test_sd3_without_t5(tiny_sd3_pipeline: Path, tmp_path: Path) -> None:
    """SD3's T5 is optional in diffusers: without it there is no text_encoder_3 to export, and the T5 slot of
    the prompt is CLIP's length (the zeros diffusers puts there)."""
    folder = tmp_path / "no-t5"
    shutil.copytree(tiny_sd3_pipeline, folder, ignore=shutil.ignore_patterns("text_encoder_3", "tokenizer_3"))
    index = json.loads((folder / "model_index.json").read_text())
    index["text_encoder_3"] = index["tokenizer_3"] = [None, None]
    (folder / "model_index.json").write_text(json.dumps(index))
    src = inspect_folder(folder)
    assert "text_encoder_3" not in src.components and src.t5_tokens is None
    assert src.config.max_sequence_length == src.config.max_token_length == 77


@pytest.mark.parametrize(
    ("options", "given"), [({"tome": True}, "--tome"), ({"unet_stages": True}, "--unet-stages")]
)  # --precision int8/int4 quantize a transformer's weights instead (tests/test_transformer_quantize.py)
def test_unet_options_refused_for_transformers(tiny_flux_pipeline: Path, tmp_path: Path, options, given) -> None:
    with pytest.raises(ExportError, match=f"{given}: for UNet models"):
        convert(str(tiny_flux_pipeline), tmp_path / "out", **options, log=lambda line: None)
    assert not (tmp_path / "out").exists()


def test_schema_bounds_the_new_fields(tiny_flux_dev_export: Path) -> None:
    data = json.loads((tiny_flux_dev_export / "sd_onnx.json").read_text())
    config = Manifest.from_dict(data).config
    cases = {
        "max_sequence_length": (5000, "at most 4096"),
        "patch_size": (32, "must be in 1..16"),
        "family": ("sd4", "config.family: must be one of"),
    }
    for key, (value, message) in cases.items():
        with pytest.raises(ManifestError, match=message):
            check_model_config(ModelConfig(**{**config.__dict__, key: value}))
    with pytest.raises(ManifestError, match="guidance_embeds: only FLUX"):
        check_model_config(ModelConfig(**{**config.__dict__, "family": "sd3"}))
    with pytest.raises(ManifestError, match="max_sequence_length: a flux model needs one"):
        check_model_config(ModelConfig(**{**config.__dict__, "max_sequence_length": None}))
    with pytest.raises(ManifestError, match="components: no transformer"):
        check_manifest({**data, "components": {k: v for k, v in data["components"].items() if k != "transformer"}})
    # A manifest from before these fields: a UNet model, SDXL by its pooled projection as before.
    old = {k: v for k, v in config.__dict__.items() if k not in ("family", "max_sequence_length", "patch_size",
                                                                  "guidance_embeds")}  # fmt: skip
    assert ModelConfig(**old).family == "" and ModelConfig(**old).sdxl and ModelConfig(**old).denoiser == "unet"


def test_sd35_transformer(tmp_path: Path) -> None:
    """SD3.5's MMDiT (RMS-normed queries and keys, dual attention in its first block) exports and validates too."""
    from sd_onnx.models.build import RECIPES, build_pipeline

    source = build_pipeline(RECIPES["tiny-sd35"], tmp_path / "tiny-sd35", seed=0)
    manifest = convert(str(source), tmp_path / "onnx", components=("transformer",), log=lambda line: None)
    assert manifest.config.family == "sd3" and list(manifest.components) == ["transformer"]
    assert manifest.components["transformer"].validation["max_abs_diff"] <= DEFAULT_ATOL
