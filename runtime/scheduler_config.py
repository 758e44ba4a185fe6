"""A model folder's `scheduler/scheduler_config.json`, read as untrusted input: bounded, its types checked and its
values bounded by what the NumPy schedulers allocate from them, before any scheduler is built."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .echo import echo
from .files import inside
from .manifest import ManifestError, read_json
from .schema import Obj, SchemaError, check

CONFIG_FILE = Path("scheduler") / "scheduler_config.json"
MAX_CONFIG_BYTES = 1 << 20  # a few hundred bytes as diffusers writes it; trained_betas make it kilobytes
# Training schedules have 1000 steps; sigma-space samplers hold steps x num_train_timesteps values to map sigmas
# back to timesteps, so 100,000 keeps that to tens of MB.
MAX_TRAIN_TIMESTEPS = 100_000
SCHEMA = Obj(
    {},
    {
        "_class_name": str, "num_train_timesteps": int, "beta_start": float, "beta_end": float,
        "beta_schedule": str, "trained_betas": [float], "prediction_type": str, "timestep_spacing": str,
        "steps_offset": int, "clip_sample": bool, "clip_sample_range": float, "set_alpha_to_one": bool,
        "rescale_betas_zero_snr": bool, "use_karras_sigmas": bool, "skip_prk_steps": bool, "variance_type": str,
        "original_inference_steps": int, "timestep_scaling": float, "lower_order_final": bool,
        "euler_at_final": bool, "final_sigmas_type": str, "algorithm_type": str, "solver_order": int,
        # Flow matching (FlowMatchEulerDiscreteScheduler, SANA's flow_shift, SCMScheduler's sigma_data).
        "shift": float, "flow_shift": float, "use_dynamic_shifting": bool, "base_shift": float, "max_shift": float,
        "base_image_seq_len": int, "max_image_seq_len": int, "invert_sigmas": bool, "shift_terminal": float,
        "use_exponential_sigmas": bool, "use_beta_sigmas": bool, "use_flow_sigmas": bool,
        "time_shift_type": str, "stochastic_sampling": bool, "sigma_data": float,
    },
)  # fmt: skip
# field -> (lowest, highest) allowed; None: num_train_timesteps.
RANGES = {
    "num_train_timesteps": (1, MAX_TRAIN_TIMESTEPS),
    "beta_start": (0.0, 1.0),
    "beta_end": (0.0, 1.0),
    "steps_offset": (0, None),
    "original_inference_steps": (1, None),
    "solver_order": (1, 3),
    "clip_sample_range": (0.0, 1e6),
    "timestep_scaling": (0.0, 1e6),
    "shift_terminal": (0.0, 0.999),
    # The dynamic shift's line through (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift): its mu
    # is exponentiated, so the shifts stay where e^mu is a float32 for any image's token count.
    "base_shift": (-10.0, 10.0),
    "max_shift": (-10.0, 10.0),
    "base_image_seq_len": (1, 1 << 24),
    "max_image_seq_len": (1, 1 << 24),
}
# Fields that must be positive: a zero shift or sigma_data makes a schedule (or its image) of zeros and NaNs.
POSITIVE = ("shift", "flow_shift", "sigma_data")
MAX_POSITIVE = 1_000_000


def read_scheduler_config(folder: Path) -> dict[str, Any]:
    """The folder's scheduler config; ManifestError naming the file and the field when it cannot configure a
    scheduler. Null values mean "the default", as diffusers writes them."""
    path = inside(folder, CONFIG_FILE.as_posix(), folder)
    data = read_json(path, limit=MAX_CONFIG_BYTES)
    config = {key: value for key, value in data.items() if value is not None}
    try:
        check(config, SCHEMA, "", "scheduler config")
        _check_ranges(config)
    except SchemaError as exc:
        raise ManifestError(f"{path}: {exc}") from None
    return config


def _check_ranges(config: dict[str, Any]) -> None:
    trained = config.get("num_train_timesteps", 1000)
    for name, (low, high) in RANGES.items():
        value = config.get(name)
        high = trained if high is None else high
        if value is not None and not low <= value <= high:
            raise SchemaError(f"{name}: must be in {low}..{high}, got {echo(value)}")
    for name in POSITIVE:
        value = config.get(name)
        if value is not None and not 0 < value <= MAX_POSITIVE:
            raise SchemaError(f"{name}: must be > 0 and <= {MAX_POSITIVE}, got {echo(value)}")
    lengths = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)  # diffusers' defaults
    if lengths[0] >= lengths[1]:
        raise SchemaError(f"base_image_seq_len {lengths[0]} must be below max_image_seq_len {lengths[1]}")
    betas = config.get("trained_betas")
    if betas is not None and (len(betas) != trained or not all(0 < beta < 1 for beta in betas)):
        raise SchemaError(f"trained_betas: must be {trained} numbers in (0, 1), one per training timestep")
