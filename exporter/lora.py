"""LoRAs fused into the weights before tracing, with diffusers' own loaders (diffusers/PEFT and kohya/A1111
`.safetensors` layouts, UNet and text encoders), so the exported graphs are the fused model's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sd_onnx.runtime.lora import parse_lora_option
from sd_onnx.runtime.manifest import sha256_file
from sd_onnx.runtime.request import RequestError

from .errors import ExportError


def parse_lora(text: str) -> tuple[Path, float]:
    """ "FILE[:SCALE]" -> (file, scale), checked before any work: an existing .safetensors file and a number in
    -10..10 (default 1; a Windows drive colon is not a scale)."""
    try:
        file, scale = parse_lora_option(text)
    except RequestError as exc:
        raise ExportError(f"--lora {exc.reason}") from None
    check_lora(file, scale)
    return file, scale


def check_lora(file: Path, scale: float) -> None:
    if not file.is_file():
        raise ExportError(f"--lora {file}: no such file")
    if file.suffix != ".safetensors":
        raise ExportError(f"--lora {file}: not a .safetensors file")
    if not -10.0 <= scale <= 10.0:
        raise ExportError(f"--lora {file}: scale {scale:g} is outside -10..10")


def loader_reason(exc: Exception) -> str:
    """A loader's error in one line: its first line, and when that only introduces a list ("Error(s) in loading
    state_dict for FluxTransformer2DModel:", as torch words a LoRA for another model), the list's first item and
    how many more there are."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if not lines[0].endswith(":") or len(lines) == 1:
        return lines[0]
    more = f" (+{len(lines) - 2} more)" if len(lines) > 2 else ""
    return f"{lines[0]} {lines[1]}{more}"


def fuse_loras(folder: Path, loras: list[tuple[Path, float]], out: Path) -> list[dict[str, Any]]:
    """Load the diffusers pipeline in `folder`, fuse `loras` (each at its scale) into its weights and save the
    result as a pipeline folder at `out`; returns what the manifest records of each LoRA."""
    import diffusers

    for file, scale in loras:
        check_lora(file, scale)
    pipe = diffusers.DiffusionPipeline.from_pretrained(folder)
    names = [f"lora_{i}" for i in range(len(loras))]
    for name, (file, _) in zip(names, loras, strict=True):
        try:
            pipe.load_lora_weights(str(file), adapter_name=name)
        except Exception as exc:  # noqa: BLE001 - loaders fail in many ways on foreign files; all mean "unusable"
            raise ExportError(f"--lora {file}: cannot apply it to this model: {loader_reason(exc)}") from None
        if not any(name in adapters for adapters in pipe.get_list_adapters().values()):
            raise ExportError(f"--lora {file}: cannot apply it to this model: it holds no weights of its modules")
    pipe.set_adapters(names, adapter_weights=[scale for _, scale in loras])
    pipe.fuse_lora(adapter_names=names)
    pipe.unload_lora_weights()
    pipe.save_pretrained(out, safe_serialization=True)
    return [{"file": file.name, "sha256": sha256_file(file), "scale": scale} for file, scale in loras]
