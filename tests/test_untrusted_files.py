"""Every file the runtime reads is untrusted (issue: model folders, LoRA files, prompt lists): paths stay inside
their folder, reads are bounded, special files are refused, structure and bounds are checked at load, and each
failure is one line naming the file (CLI), a ValueError (API) or a server that refuses to start, never a
traceback. Property-based fuzzing of each reader, with an audit hook on `open`, backs the per-class tests."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sd_onnx.runtime.batch import read_items
from sd_onnx.runtime.cli import main
from sd_onnx.runtime.files import UntrustedFileError, inside, parse_json, read_bytes, read_lines
from sd_onnx.runtime.lora import Lora, read_safetensors
from sd_onnx.runtime.manifest import MANIFEST_NAME, Manifest, ManifestError
from sd_onnx.runtime.pipeline import DiffusionPipeline
from sd_onnx.runtime.request import GenerationRequest
from sd_onnx.runtime.scheduler_config import read_scheduler_config
from sd_onnx.runtime.shipped import shipped_model
from sd_onnx.runtime.tokenizer import CLIPTokenizer

DEEP = "[" * 100_000 + "]" * 100_000
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# Helpers ------------------------------------------------------------------------------------------------------


@pytest.fixture
def model(tmp_path: Path) -> Path:
    """A private copy of the shipped model, free to damage."""
    return Path(shutil.copytree(shipped_model(), tmp_path / "model"))


def edit_json(path: Path, change: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def safetensors(path: Path, header: object, payload: bytes = b"") -> Path:
    """A .safetensors file with any JSON value as its header."""
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + payload)
    return path


def lora_file(path: Path, module: str = "mod", rank: int = 1, width: int = 4) -> Path:
    """A valid LoRA of one low-rank pair for `unet.<module>`."""
    down, up = np.ones((rank, width), np.float32), np.ones((width, rank), np.float32)
    header = {
        f"unet.{module}.lora_A.weight": {"dtype": "F32", "shape": [rank, width], "data_offsets": [0, down.nbytes]},
        f"unet.{module}.lora_B.weight": {
            "dtype": "F32", "shape": [width, rank], "data_offsets": [down.nbytes, down.nbytes + up.nbytes],
        },
    }  # fmt: skip
    return safetensors(path, header, down.tobytes() + up.tobytes())


def lora_map(model: Path, tensor: dict) -> None:
    """A LoRA map for the UNet whose one module's weight lives where `tensor` says."""
    targets = {"modules": {"mod": [{"tensor": "w", "layout": "gemm"}]}, "tensors": {"w": tensor}}
    (model / "unet" / "lora_targets.json").write_text(json.dumps(targets))


def cli_error(*args: str) -> str:
    """Run `sd-run ARGS`, which must fail with exactly one `Error:` line and no traceback; that line."""
    result = CliRunner().invoke(main, list(args))
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert result.exit_code != 0 and len(errors) == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return errors[0]


OPENED: list[str] | None = None


def _audit(event: str, args: tuple) -> None:
    if event == "open" and OPENED is not None and isinstance(args[0], (str, bytes, os.PathLike)):
        OPENED.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)


@contextmanager
def opened_files() -> Iterator[list[str]]:
    """Every path Python opens inside the block (the audit hook's `open` event)."""
    global OPENED
    OPENED = []
    try:
        yield OPENED
    finally:
        OPENED = None


# 1. Paths stay inside their folder ----------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["absolute", "parent", "symlink"])
def test_lora_map_paths_outside_the_folder_are_refused_unread(model: Path, tmp_path: Path, where: str) -> None:
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.ones(16, np.float32).tobytes())
    file = {"absolute": str(secret), "parent": "../../secret.bin", "symlink": "link.bin"}[where]
    if where == "symlink":
        (model / "unet" / "link.bin").symlink_to(secret)
    lora_map(model, {"dtype": "float32", "shape": [4, 4], "file": file, "offset": 0})
    lora = lora_file(tmp_path / "l.safetensors")
    with opened_files() as opened, pytest.raises(ValueError, match="is not a path inside"):
        DiffusionPipeline.from_pretrained(model, provider="cpu", loras=[lora])
    assert str(secret) not in opened and not any(p.endswith("secret.bin") for p in opened)
    assert "is not a path inside" in cli_error("prompt", "x", "-m", str(model), "--lora", str(lora))


def test_manifest_file_symlinked_outside_is_not_hashed_or_loaded(model: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere.onnx"
    shutil.move(model / "vae_decoder" / "model.onnx", outside)
    (model / "vae_decoder" / "model.onnx").symlink_to(outside)
    with opened_files() as opened, pytest.raises(ManifestError, match="is not a path inside"):
        DiffusionPipeline.from_pretrained(model, provider="cpu")
    assert str(outside) not in opened
    with pytest.raises(ValueError, match="is not a path inside"):  # unverified loads are confined too
        DiffusionPipeline.from_pretrained(model, provider="cpu", verify=False)


@pytest.mark.parametrize("relative", ["/etc/passwd", "../x", "a/../../x", "C:x", "", "a\x00b", ".", "a/.."])
def test_inside_refuses_every_way_out(tmp_path: Path, relative: str) -> None:
    with pytest.raises(UntrustedFileError):
        inside(tmp_path, relative, "map.json")


def test_batch_resume_ignores_records_naming_files_elsewhere(tmp_path: Path) -> None:
    from sd_onnx.runtime.batch import BatchOutput

    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "victim.png").write_bytes(b"x")
    record = {"id": "a", "status": "ok", "file": "../victim.png"}
    (out / "results.jsonl").write_text(json.dumps(record) + "\n")
    assert BatchOutput(out).start(resume=True) == set()


# 2. Structure is checked --------------------------------------------------------------------------------------


@pytest.mark.parametrize("header", ["abc", None, 123, [1, 2], {"t": "x"}, {"t": {"dtype": "F32"}}, b"[" * 5000])
def test_safetensors_headers_of_the_wrong_shape_are_one_line_errors(tmp_path: Path, header: object) -> None:
    path = safetensors(tmp_path / "l.safetensors", header)
    with pytest.raises(ValueError, match=r"l\.safetensors: (not a readable \.safetensors file|JSON nested)") as caught:
        Lora.read(path)
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 400


def test_deep_json_everywhere_is_one_line(model: Path, tmp_path: Path) -> None:
    (model / MANIFEST_NAME).write_text(DEEP)
    assert "nested deeper than" in cli_error("info", str(model))
    deep_header = safetensors(tmp_path / "d.safetensors", DEEP.encode())
    with pytest.raises(ValueError, match="nested deeper than"):
        Lora.read(deep_header)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a cat"}\n{"prompt": ' + "[" * 5000 + "]" * 5000 + "}\n")
    items = read_items(prompts)
    assert items[0].error is None and items[1].error == "nested too deeply"


@pytest.mark.parametrize("targets", [[], "x", {"modules": []}, {"modules": {}, "tensors": {"w": 1}}])
def test_lora_maps_of_the_wrong_shape_are_refused(model: Path, tmp_path: Path, targets: object) -> None:
    (model / "unet" / "lora_targets.json").write_text(json.dumps(targets))
    lora = lora_file(tmp_path / "l.safetensors")
    with pytest.raises(ValueError, match="lora_targets.json") as caught:
        DiffusionPipeline.from_pretrained(model, provider="cpu", loras=[lora])
    assert "\n" not in str(caught.value)


def test_lora_map_weights_past_the_file_end_are_refused(model: Path, tmp_path: Path) -> None:
    lora_map(model, {"dtype": "float32", "shape": [4, 4], "file": "model.onnx", "offset": 2**40})
    with pytest.raises(ValueError, match="shorter than its LoRA map says"):
        DiffusionPipeline.from_pretrained(model, provider="cpu", loras=[lora_file(tmp_path / "l.safetensors")])


# 3. Bounds that memory allows ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("sample_size", 65536, "config.sample_size: a default image of 262144x262144 pixels"),
        ("max_token_length", 65536, "config.max_token_length: 65536 tokens, at most 4096"),
        ("max_token_length", 78, "config.max_token_length is 78, but text_encoder has 77 positions"),
        ("sample_size", 15, "no multiple of 16"),
    ],
)
def test_manifest_sizes_that_cannot_run_are_refused_at_load(model: Path, field: str, value: int, message: str):
    edit_json(model / MANIFEST_NAME, lambda m: m["config"].update({field: value}))
    with pytest.raises(ManifestError, match=message):
        DiffusionPipeline.from_pretrained(model, provider="cpu")
    assert message in cli_error("prompt", "x", "-m", str(model), "-o", str(model / "x.png"))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"num_train_timesteps": 1e12}, "num_train_timesteps: expected an integer, got a number"),
        ({"num_train_timesteps": 10**9}, "num_train_timesteps: must be in 1..100000"),
        ({"beta_start": "0.1"}, "beta_start: expected a number, got a string"),
        ({"trained_betas": [0.5] * 3}, "trained_betas: must be 1000 numbers"),
        ({"steps_offset": 5000}, "steps_offset: must be in 0..1000"),
        ({"solver_order": 40}, "solver_order: must be in 1..3"),
        # Flow-matching fields (SD3, FLUX, SANA, Z-Image, FLUX.2; sCM's sigma_data)
        ({"shift": "x"}, "shift: expected a number, got a string"),
        ({"use_dynamic_shifting": "maybe"}, "use_dynamic_shifting: expected a boolean, got a string"),
        ({"shift": 0}, "shift: must be > 0 and <= 1000000, got 0"),
        ({"sigma_data": 0}, "sigma_data: must be > 0 and <= 1000000, got 0"),
        ({"base_image_seq_len": 256, "max_image_seq_len": 256}, "base_image_seq_len 256 must be below"),
        ({"max_shift": 1e9}, "max_shift: must be in -10.0..10.0"),
        ({"shift_terminal": 1.0}, "shift_terminal: must be in 0.0..0.999"),
    ],
)
def test_scheduler_configs_are_checked_before_any_array(model: Path, change: dict, message: str) -> None:
    edit_json(model / "scheduler" / "scheduler_config.json", lambda c: c.update(change))
    with pytest.raises(ManifestError, match=message):
        read_scheduler_config(model)
    assert message in cli_error("prompt", "x", "-m", str(model), "-o", str(model / "x.png"))


def test_a_server_never_gets_ready_on_a_folder_it_cannot_serve(model: Path) -> None:
    """The graphs load and every static check passes, but the text encoder has no config to say its positions:
    the self-test at load finds that 100 tokens cannot run, and the server exits instead of saying ready."""
    (model / "text_encoder" / "config.json").unlink()
    edit_json(model / MANIFEST_NAME, lambda m: m["config"].update({"max_token_length": 100}))
    pipe = DiffusionPipeline.from_pretrained(model, provider="cpu")
    with pytest.raises(ManifestError, match="cannot generate an image at the model's defaults"):
        pipe.self_test()
    run = subprocess.run(
        [sys.executable, "-m", "sd_onnx.runtime.cli", "serve", "-m", str(model), "--port", "0"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    lines = run.stderr.splitlines()
    assert run.returncode == 1 and not any(line.startswith("ready") for line in lines), run.stderr
    assert "Traceback" not in run.stderr
    assert "cannot generate an image at the model's defaults" in run.stderr


# 4. Bounded reads, no special files ---------------------------------------------------------------------------


def test_special_files_are_refused_without_blocking(model: Path, tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path in (fifo, Path("/dev/zero")):
        with pytest.raises(UntrustedFileError, match="is a device, FIFO or socket"):
            read_bytes(path, 100)
        with pytest.raises(UntrustedFileError, match="is a device, FIFO or socket"):
            list(read_lines(path, 100, 100))
    (model / "tokenizer" / "tokenizer.json").unlink()
    os.mkfifo(model / "tokenizer" / "tokenizer.json")
    assert "is a device, FIFO or socket" in cli_error("prompt", "x", "-m", str(model))


def test_oversized_files_are_refused_before_reading(model: Path) -> None:
    with open(model / "tokenizer" / "tokenizer.json", "r+b") as f:
        f.truncate(65 << 20)  # sparse: no disk used
    with pytest.raises(UntrustedFileError, match="larger than 64 MiB"):
        CLIPTokenizer(model / "tokenizer", 77)


def test_prompt_lines_are_read_one_bounded_line_at_a_time(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    with open(path, "w") as f:
        f.write('{"prompt": "a"}\n' + "x" * 300_000 + "\n" + '{"prompt": "b"}\n')
    with open(path, "ab") as f:
        f.write(b'{"prompt": "\xff"}\n{"prompt": "c"}\n')
    items = read_items(path)
    assert [i.error for i in items] == [
        None,
        "line is longer than 20000 characters",
        None,
        "not UTF-8 text (byte 12)",
        None,
    ]


# 5. Tokenizer files -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("content", ["garbage", "{}", '{"model": 5}', "[]", DEEP])
def test_garbage_tokenizer_files_are_one_line(model: Path, content: str) -> None:
    (model / "tokenizer" / "tokenizer.json").write_text(content)
    with pytest.raises(ManifestError, match="tokenizer.json"):
        CLIPTokenizer(model / "tokenizer", 77)
    assert "tokenizer.json" in cli_error("prompt", "x", "-m", str(model))


def test_tokenizer_ids_past_the_encoders_vocabulary_are_refused(model: Path) -> None:
    edit_json(model / "text_encoder" / "config.json", lambda c: c.update({"vocab_size": 1000}))
    with pytest.raises(ManifestError, match="the tokenizer has ids up to 49407, the text encoder only 1000 tokens"):
        DiffusionPipeline.from_pretrained(model, provider="cpu", verify=False)


def test_special_tokens_that_are_not_strings_are_refused(model: Path) -> None:
    edit_json(model / "tokenizer" / "tokenizer_config.json", lambda c: c.update({"pad_token": 5}))
    with pytest.raises(ManifestError, match="pad_token must be a string"):
        CLIPTokenizer(model / "tokenizer", 77)


# Fuzzing: every reader, any bytes -> success or a one-line ValueError naming the file -------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20,
)


def one_line_or_success(read: Callable[[], object], name: str, folder: Path) -> None:
    """`read()` succeeds or raises a ValueError of one line naming `name`; it opens nothing outside `folder`
    (but the Python and library files it imports)."""
    with opened_files() as opened:
        try:
            read()
        except ValueError as exc:
            assert "\n" not in str(exc).strip() and len(str(exc)) < 1000, str(exc)
            assert name in str(exc) or "loras" in str(exc), str(exc)
    strays = [p for p in opened if not p.startswith((str(folder), sys.prefix, sys.base_prefix)) and ".py" not in p]
    assert not strays


def damage(value: object, path: list, replacement: object) -> object:
    """`value` with the item at `path` (keys/indices, as far as they exist) replaced."""
    if not path or not isinstance(value, (dict, list)) or not value:
        return replacement
    key = path[0] % len(value) if isinstance(value, list) else sorted(value)[path[0] % len(value)]
    copy = value.copy()
    copy[key] = damage(value[key], path[1:], replacement)
    return copy


DAMAGE = st.tuples(st.lists(st.integers(0, 50), max_size=4), JSON_VALUES)


@FUZZ
@given(DAMAGE)
def test_fuzz_manifest(model: Path, change: tuple) -> None:
    original = json.loads((shipped_model() / MANIFEST_NAME).read_text())
    (model / MANIFEST_NAME).write_text(json.dumps(damage(original, *change)))
    one_line_or_success(lambda: Manifest.load(model), MANIFEST_NAME, model)


@FUZZ
@given(DAMAGE)
def test_fuzz_scheduler_config(model: Path, change: tuple) -> None:
    original = json.loads((shipped_model() / "scheduler" / "scheduler_config.json").read_text())
    path = model / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps(damage(original, *change)))

    def read_and_build() -> None:
        from sd_onnx.runtime.schedulers import make_scheduler

        config = read_scheduler_config(model)
        try:
            make_scheduler("euler", config).set_timesteps(4)
        except ValueError as exc:  # a schedule the sampler refuses: still one line, named by the sampler
            raise ValueError(f"scheduler_config.json: {exc}") from None

    one_line_or_success(read_and_build, "scheduler_config.json", model)


@FUZZ
@given(st.binary(max_size=300) | JSON_VALUES.map(lambda v: json.dumps(v).encode()))
def test_fuzz_safetensors_header(tmp_path: Path, header: bytes) -> None:
    path = safetensors(tmp_path / "f.safetensors", header, b"\0" * 64)
    one_line_or_success(lambda: read_safetensors(path), "f.safetensors", tmp_path)
    one_line_or_success(lambda: Lora.read(path), "f.safetensors", tmp_path)


def test_keys_that_are_not_plain_text_are_echoed_in_one_line() -> None:
    """A file's own key (a newline in it, or megabytes) appears in a schema message as its short repr (a newline in a
    lora_targets.json key made a two-line error; found by test_fuzz_lora_map)."""
    from sd_onnx.runtime.schema import Obj, SchemaError, check

    for key, shown in (("\n", "'\\n'"), ("a b", "'a b'"), ("k" * 5000, "(+4.8k characters)")):
        with pytest.raises(SchemaError) as info:
            check({"modules": {key: None}}, Obj({"modules": {"": [str]}}), root="lora_targets.json")
        assert "\n" not in str(info.value) and shown in str(info.value) and len(str(info.value)) < 200
    with pytest.raises(SchemaError, match=r"^modules\.to_q: expected a list, got null$"):
        check({"modules": {"to_q": None}}, Obj({"modules": {"": [str]}}))


@FUZZ
@given(DAMAGE)
def test_fuzz_lora_map(model: Path, change: tuple) -> None:
    good = {
        "modules": {"mod": [{"tensor": "w", "layout": "gemm"}]},
        "tensors": {"w": {"dtype": "float32", "shape": [4, 4], "file": "model.onnx", "offset": 0}},
    }
    (model / "unet" / "lora_targets.json").write_text(json.dumps(damage(good, *change)))
    lora = lora_file(model.parent / "l.safetensors")

    def apply() -> None:
        from sd_onnx.runtime.lora import check_loras, weight_overrides

        loaded = [Lora.read(lora)]
        check_loras(model, loaded)
        weight_overrides(model / "unet", loaded)

    one_line_or_success(apply, "lora", model.parent)


@FUZZ
@given(st.binary(max_size=400))
def test_fuzz_tokenizer_file(model: Path, content: bytes) -> None:
    (model / "tokenizer" / "tokenizer.json").write_bytes(content)
    one_line_or_success(lambda: CLIPTokenizer(model / "tokenizer", 77), "tokenizer", model)


@FUZZ
@given(st.lists(st.binary(max_size=80) | JSON_VALUES.map(json.dumps).map(str.encode), min_size=1, max_size=6))
def test_fuzz_batch_file(tmp_path: Path, lines: list[bytes]) -> None:
    path = tmp_path / "p.jsonl"
    path.write_bytes(b"\n".join(line.replace(b"\n", b" ") for line in lines))
    one_line_or_success(lambda: read_items(path), "p.jsonl", tmp_path)


def test_parse_json_limits() -> None:
    assert parse_json("[" * 64 + "]" * 64, "x") is not None
    for text, message in (("[" * 65 + "]" * 65, "nested deeper than 64"), ("[NaN]", "NaN"), ("[1e999]", "range")):
        with pytest.raises(UntrustedFileError, match=message):
            parse_json(text, "x")


# Found by a hostile trial ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("relative", [MANIFEST_NAME, "scheduler/scheduler_config.json", "tokenizer/tokenizer.json",
                                      "vae_decoder/config.json", "text_encoder/config.json"])  # fmt: skip
def test_fixed_name_files_linked_out_of_the_folder_are_refused_unread(model: Path, tmp_path: Path, relative: str):
    outside = tmp_path / "outside.json"
    shutil.move(model / relative, outside)
    (model / relative).symlink_to(outside)
    with opened_files() as opened, pytest.raises(ValueError, match="is not a path inside"):
        DiffusionPipeline.from_pretrained(model, provider="cpu")
    assert str(outside) not in opened


def test_a_manifest_that_is_no_regular_file_is_refused_not_skipped(model: Path) -> None:
    (model / MANIFEST_NAME).unlink()
    os.mkfifo(model / MANIFEST_NAME)
    assert "is a device, FIFO or socket" in cli_error("prompt", "x", "-m", str(model), "-o", str(model / "x.png"))


def test_tokenizer_ids_beyond_the_table_are_refused(model: Path) -> None:
    path = model / "tokenizer" / "tokenizer.json"
    tokenizer = json.loads(path.read_text())
    tokenizer["model"]["vocab"] = {k: i + 100_000 if i < 49406 else i for k, i in tokenizer["model"]["vocab"].items()}
    path.write_text(json.dumps(tokenizer))
    assert "the tokenizer has ids up to" in cli_error("prompt", "a red circle", "-m", str(model))


def test_a_tiny_lora_declaring_a_huge_update_is_refused_before_the_product(model: Path, tmp_path: Path) -> None:
    lora_map(model, {"dtype": "float32", "shape": [4, 4], "file": "model.onnx", "offset": 0})
    lora = lora_file(tmp_path / "big.safetensors", width=300_000)  # 2.4 MB; the update would be 335 GiB
    with pytest.raises(ValueError, match=r"is \[300000, 300000\] in this LoRA but has 16 values in the model"):
        DiffusionPipeline.from_pretrained(model, provider="cpu", loras=[lora])


def test_safetensors_tensors_may_not_share_bytes(tmp_path: Path) -> None:
    spec = {"dtype": "F32", "shape": [1, 4], "data_offsets": [0, 16]}
    path = safetensors(tmp_path / "o.safetensors", {f"unet.m{i}.lora_A.weight": spec for i in range(50)}, bytes(16))
    with pytest.raises(ValueError, match="tensors overlap"):
        Lora.read(path)


@pytest.mark.parametrize("alpha", [np.zeros(0, np.float32), np.array([np.nan], np.float32)])
def test_lora_alphas_must_be_one_finite_number(tmp_path: Path, alpha: np.ndarray) -> None:
    down, up = np.ones((1, 4), np.float32), np.ones((4, 1), np.float32)
    header = {
        "unet.m.lora_A.weight": {"dtype": "F32", "shape": [1, 4], "data_offsets": [0, 16]},
        "unet.m.lora_B.weight": {"dtype": "F32", "shape": [4, 1], "data_offsets": [16, 32]},
        "unet.m.alpha": {"dtype": "F32", "shape": list(alpha.shape), "data_offsets": [32, 32 + alpha.nbytes]},
    }
    path = safetensors(tmp_path / "a.safetensors", header, down.tobytes() + up.tobytes() + alpha.tobytes())
    with pytest.raises(ValueError, match="unet.m.alpha must be one finite number"):
        Lora.read(path)


def test_default_steps_fit_a_schedule_shorter_than_them(model: Path) -> None:
    edit_json(model / "scheduler" / "scheduler_config.json", lambda c: c.update({"num_train_timesteps": 10}))
    pipe = DiffusionPipeline.from_pretrained(model, provider="cpu")
    assert pipe.prepare(GenerationRequest("x")).steps == 10


def test_resume_records_without_their_ids_file_are_not_done(tmp_path: Path) -> None:
    from sd_onnx.runtime.batch import BatchOutput

    out = tmp_path / "out"
    out.mkdir()
    (out / "c.png").write_bytes(b"x")
    records = [{"id": "d", "status": "ok"}, {"id": "e", "status": "ok", "file": "c.png"}, {"id": "c", "status": "ok",
               "file": "c.png"}]  # fmt: skip
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert BatchOutput(out).start(resume=True) == {"c"}
