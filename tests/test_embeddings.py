"""Textual-inversion embeddings (runtime/embeddings.py), torch-free at run time: parity with diffusers'
`load_textual_inversion` on the tiny model (the reference for how the vectors enter the encoder), A1111 and
diffusers file layouts, SDXL's two sets, refusals, the CLI and A1111's chunk rule."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from sd_onnx.runtime.cli import main
from sd_onnx.runtime.embeddings import read_embeddings
from sd_onnx.runtime.families.clip import encode_inputs
from sd_onnx.runtime.pipeline import DiffusionPipeline
from sd_onnx.runtime.request import GenerationRequest

PROMPT = "a photo of mycat on a square"
ENCODERS = ("text_encoder", "text_encoder_2")


def safetensors(path: Path, tensors: dict[str, np.ndarray]) -> Path:
    header, blobs, offset = {}, [], 0
    for name, array in tensors.items():
        data = np.ascontiguousarray(array, np.float32).tobytes()
        header[name] = {"dtype": "F32", "shape": list(array.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))
    return path


def vectors(count: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, width)).astype(np.float32)


@pytest.mark.parametrize("count", [1, 3])
def test_embeddings_match_diffusers_load_textual_inversion(tiny_pipeline: Path, tiny_export: Path, tmp_path: Path,
                                                           count: int) -> None:  # fmt: skip
    from diffusers import StableDiffusionPipeline

    learned = vectors(count, 32, seed=count)
    file = safetensors(tmp_path / "learned_embeds.safetensors", {"<mycat>": learned})
    reference = StableDiffusionPipeline.from_pretrained(tiny_pipeline, safety_checker=None)
    reference.set_progress_bar_config(disable=True)
    reference.load_textual_inversion(str(file), token="mycat")
    expected = reference(PROMPT, num_inference_steps=3, generator=torch.Generator().manual_seed(5),
                         output_type="np").images  # fmt: skip
    pipe = DiffusionPipeline.from_pretrained(tiny_export, provider="cpu", embeddings=[(file, "mycat")])
    ours = pipe.generate(GenerationRequest(PROMPT, steps=3, seed=5), output_type="np").images
    assert np.abs(ours - expected).mean() <= 1 / 255
    without = DiffusionPipeline.from_pretrained(tiny_export, provider="cpu")
    other = without.generate(GenerationRequest(PROMPT, steps=3, seed=5), output_type="np").images
    assert np.abs(other - ours).mean() > 1 / 255


def test_a1111_folders_name_each_embedding_after_its_file(tiny_export: Path, tmp_path: Path) -> None:
    folder = tmp_path / "embeddings"
    folder.mkdir()
    safetensors(folder / "mycat.safetensors", {"emb_params": vectors(2, 32, 1)})
    safetensors(folder / "wide.safetensors", {"emb_params": vectors(1, 768, 2)})  # made for SD 1.5
    (folder / "pickled.pt").write_bytes(b"\x80\x04 not read")
    loaded, skipped = read_embeddings(folder)
    assert [e.name for e in loaded] == ["mycat", "wide"] and "pickled" in skipped
    assert "only .safetensors" in skipped["pickled"]
    pipe = DiffusionPipeline.from_pretrained(tiny_export, provider="cpu", embeddings=folder)
    assert [e.name for e in pipe.embeddings] == ["mycat"]
    assert set(pipe.skipped_embeddings) == {"wide", "pickled"}
    ids, _ = encode_inputs(pipe.tokenizer, ["a MyCat"], "plain")
    first = ids[0][2]
    assert first == pipe.tokenizer.tokenizer.get_vocab_size() and ids[0][3] == first + 1  # both vectors; any case
    out = tmp_path / "x.png"
    result = CliRunner().invoke(main, ["prompt", "a mycat", "-m", str(tiny_export), "--embeddings", str(folder),
                                       "--steps", "2", "--seed", "1", "-o", str(out)])  # fmt: skip
    assert result.exit_code == 0 and "embedding wide skipped" in result.output, result.output
    api = pipe.generate(GenerationRequest("a mycat", steps=2, seed=1, prompt_syntax="a1111")).images[0]
    cli = np.asarray(Image.open(out).convert("RGB"), np.float32)
    assert np.abs(cli - np.asarray(api, np.float32)).mean() < 1.0  # the CLI's default provider may differ a little


def test_an_embedding_stays_in_one_chunk(tiny_export: Path, tmp_path: Path) -> None:
    file = safetensors(tmp_path / "big.safetensors", {"emb_params": vectors(10, 32, 3)})
    pipe = DiffusionPipeline.from_pretrained(tiny_export, provider="cpu", embeddings=[file])
    ids, _ = encode_inputs(pipe.tokenizer, ["x " * 70 + "big"], "a1111")
    first = pipe.tokenizer.words[0][1][0]  # "big" is also a word of CLIP's vocabulary: the embedding wins
    assert len(ids) == 2 and first not in ids[0] and list(ids[1][1:11]) == list(range(first, first + 10))


def test_sdxl_embeddings_carry_a_set_per_encoder(tiny_sdxl: tuple[Path, Path], tmp_path: Path) -> None:
    widths = [json.loads((tiny_sdxl[1] / n / "config.json").read_text())["hidden_size"] for n in ENCODERS]
    sets = {"clip_l": vectors(2, widths[0], 4), "clip_g": vectors(2, widths[1], 5)}
    file = safetensors(tmp_path / "xlcat.safetensors", sets)
    one_set = safetensors(tmp_path / "sd1.safetensors", {"emb_params": vectors(2, widths[0], 6)})
    pipe = DiffusionPipeline.from_pretrained(tiny_sdxl[1], provider="cpu", embeddings=[file, one_set])
    assert [e.name for e in pipe.embeddings] == ["xlcat"] and "sd1" in pipe.skipped_embeddings
    with_word = pipe.generate(GenerationRequest("a xlcat", steps=2, seed=1), output_type="np").images
    plain = pipe.generate(GenerationRequest("a cat", steps=2, seed=1), output_type="np").images
    assert np.abs(with_word - plain).mean() > 0


@pytest.mark.parametrize(
    ("name", "tensors", "message"),
    [
        ("x.pt", None, "pickled; only .safetensors"),
        ("x.safetensors", {"a": np.ones((2, 32)), "b": np.ones((2, 32))}, "holds no embedding"),
        ("x.safetensors", {"emb_params": np.full((2, 32), np.nan)}, "finite"),
        ("x.safetensors", {"emb_params": np.ones((80, 32))}, "needs 1-75 vectors"),
    ],
)
def test_unusable_embedding_files_are_refused(tiny_export: Path, tmp_path: Path, name: str, tensors, message: str):
    path = tmp_path / name
    if tensors is None:
        path.write_bytes(b"pickle")
    else:
        safetensors(path, tensors)
    with pytest.raises(ValueError, match=message):
        DiffusionPipeline.from_pretrained(tiny_export, provider="cpu", embeddings=[path])


def test_a1111_route_lists_loaded_and_skipped_embeddings(tiny_export: Path, tmp_path: Path) -> None:
    import time

    from fastapi.testclient import TestClient

    from sd_onnx.runtime.server.app import ServeConfig, ServerState, create_app

    folder = tmp_path / "emb"
    folder.mkdir()
    safetensors(folder / "mycat.safetensors", {"emb_params": vectors(2, 32, 1)})
    (folder / "old.pt").write_bytes(b"pickle")
    state = ServerState(ServeConfig())
    app = create_app(state, lambda: DiffusionPipeline.from_pretrained(tiny_export, provider="cpu", embeddings=folder))
    with TestClient(app) as client:
        while client.get("/health").status_code != 200:
            time.sleep(0.1)
        listed = client.get("/sdapi/v1/embeddings").json()
        assert listed["loaded"]["mycat"]["vectors"] == 2 and listed["loaded"]["mycat"]["shape"] == 32
        assert "only .safetensors" in listed["skipped"]["old"]["reason"]
        answer = client.post("/sdapi/v1/txt2img", json={"prompt": "a (mycat:1.2)", "steps": 2, "seed": 1})
        assert answer.status_code == 200
