"""Peers' own model files, made in the peer's environment from the same weights as every other engine:
`python -m sd_onnx.benchmarks.peer_exports PEER MODE SOURCE OUT [PROMPT ...]`.

Optimum (MODE `ort`): its ONNX export of a diffusers folder, as `optimum-cli export onnx` makes it.

OpenVINO (optimum-intel and NNCF, offline), SOURCE a diffusers folder:
- `fp32`: the IR with fp32 weights (what FastSD CPU loads);
- `int8`: data-free 8-bit weight compression of every component;
- `hybrid-int8`: weights compressed to 8 bits everywhere and the UNet's activations quantized too, calibrated
  on UNet inputs recorded while the pipeline runs the given prompts (no dataset can be downloaded).

stable-diffusion.cpp, SOURCE an LDM single-file checkpoint: MODE is a GGML weight type (`f16`, `q8_0`,
`q4_0`, ...) and OUT the GGUF file its own converter writes, as users download them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# UNet inputs recorded for hybrid calibration: optimum-intel runs the pipeline at its default 50 steps, so
# this is one prompt's whole trajectory (each further prompt costs minutes on two cores at 512x512).
HYBRID_SAMPLES = 50


def export_optimum(source: Path, out: Path) -> None:
    from optimum.exporters.onnx import main_export

    main_export(str(source), str(out), task="text-to-image")


def export_openvino(mode: str, source: Path, out: Path, prompts: list[str]) -> None:
    from optimum.intel import OVDiffusionPipeline, OVWeightQuantizationConfig

    if mode == "fp32":
        options: dict = {"load_in_8bit": False}
    elif mode == "int8":
        options = {"quantization_config": OVWeightQuantizationConfig(bits=8)}
    elif mode == "hybrid-int8":
        if not prompts:
            raise ValueError("hybrid-int8 needs calibration prompts")
        config = OVWeightQuantizationConfig(bits=8, dataset=prompts, num_samples=HYBRID_SAMPLES)
        options = {"quantization_config": config}
    else:
        raise ValueError(f"unknown OpenVINO mode {mode!r} (fp32, int8, hybrid-int8)")
    if (source / "transformer").is_dir():  # full-size transformer models: loaded in bf16, as sd-export traces them
        import torch

        options["torch_dtype"] = torch.bfloat16  # (in fp32 SANA-Sprint 0.6B's export was killed at 24 GB)
    pipe = OVDiffusionPipeline.from_pretrained(str(source), export=True, compile=False, **options)
    pipe.save_pretrained(str(out))


def export_sdcpp(weight_type: str, source: Path, out: Path) -> None:
    import stable_diffusion_cpp as sd_cpp
    from stable_diffusion_cpp.stable_diffusion import GGML_TYPE_MAP

    if weight_type not in GGML_TYPE_MAP:
        raise ValueError(f"unknown GGML weight type {weight_type!r}")
    if not sd_cpp.convert(str(source).encode(), b"", str(out).encode(), GGML_TYPE_MAP[weight_type], b"", True):
        raise RuntimeError(f"stable-diffusion.cpp could not convert {source} to {weight_type}")


def main() -> None:
    """Run one export, then print its peak RSS as the last line (JSON) for the report."""
    from .engines import peak_rss_mb

    peer, mode, source, out, *prompts = sys.argv[1:]
    if peer == "optimum":
        export_optimum(Path(source), Path(out))
    elif peer == "openvino":
        export_openvino(mode, Path(source), Path(out), prompts)
    else:
        export_sdcpp(mode, Path(source), Path(out))
    print(json.dumps({"peak_rss_mb": round(peak_rss_mb())}))


if __name__ == "__main__":
    main()
