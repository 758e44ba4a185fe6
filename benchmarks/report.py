"""Turn a benchmark JSON into a Markdown table with ratios and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

COLUMNS = [
    ("load_first_s", "load 1st (s)"),
    ("load_second_s", "load 2nd (s)"),
    ("text_encoder_s", "text enc (s)"),
    ("first_step_s", "1st step (s)"),
    ("unet_step_median_s", "UNet step (s)"),
    ("vae_decode_s", "VAE decode (s)"),
    ("end_to_end_s", "end to end (s)"),
    ("peak_rss_mb", "peak RSS (MB)"),
    ("model_mb", "model (MB)"),
    ("install_mb", "install (MB)"),
]
RATIO_KEYS = ("unet_step_median_s", "vae_decode_s", "end_to_end_s", "peak_rss_mb")


def markdown(report: dict[str, Any], baseline: str = "diffusers-pytorch", second: str = "optimum-ort") -> str:
    """A table of every engine's figures, then ratios against `baseline` and `second` (lower is better)."""
    engines = report["engines"]
    machine = report["machine"]
    lines = [
        f"# sd-bench report ({report['date']})",
        "",
        f"Model: {report['settings']['model_label']}; {report['settings']['size']}x{report['settings']['size']}, "
        f"{report['settings']['steps']} steps, guidance {report['settings']['guidance']}, "
        f"{report['settings']['threads']} threads.",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, ISA {', '.join(machine['isa'])}.",
        f"Command: `{report['command']}`",
        "",
        "| engine | " + " | ".join(title for _, title in COLUMNS) + " |",
        "|---|" + "---|" * len(COLUMNS),
    ]
    for name, rec in engines.items():
        cells = [_fmt(rec.get(key)) for key, _ in COLUMNS] if "error" not in rec else [f"failed: {rec['error']}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for ref in (baseline, second):
        if ref not in engines or "error" in engines[ref]:
            continue
        lines += ["", f"Ratios against {ref} (lower is better):", ""]
        lines.append("| engine | " + " | ".join(dict(COLUMNS)[k] for k in RATIO_KEYS) + " |")
        lines.append("|---|" + "---|" * len(RATIO_KEYS))
        for name, rec in engines.items():
            ratios = [_ratio(rec.get(k), engines[ref].get(k)) for k in RATIO_KEYS]
            lines.append(f"| {name} | " + " | ".join(ratios) + " |")
    lines += ["", "Library versions per engine:", ""]
    for name, rec in engines.items():
        lines.append(f"- {name}: " + ", ".join(f"{k} {v}" for k, v in rec.get("versions", {}).items()))
    return "\n".join(lines) + "\n"


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if value >= 100 else f"{value:.2f}"


def _ratio(value: Any, reference: Any) -> str:
    return "-" if not value or not reference else f"{value / reference:.2f}x"


def plots(report: dict[str, Any], out_dir: Path, prefix: str = "") -> list[Path]:
    """Per-component time (stacked) and peak RSS bar charts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    engines = {name: rec for name, rec in report["engines"].items() if "error" not in rec}
    names = list(engines)
    steps = report["settings"]["steps"]
    parts = {
        "text encoder": [engines[n]["text_encoder_s"] for n in names],
        f"denoising ({steps} steps)": [
            engines[n]["end_to_end_s"] - engines[n]["text_encoder_s"] - engines[n]["vae_decode_s"] for n in names
        ],
        "VAE decode": [engines[n]["vae_decode_s"] for n in names],
    }
    fig, ax = plt.subplots(figsize=(7, 3.5))
    bottom = [0.0] * len(names)
    for label, values in parts.items():
        ax.bar(names, values, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set_ylabel("seconds per image")
    ax.set_title("Where one image's time goes")
    ax.legend()
    fig.tight_layout()
    time_png = out_dir / f"{prefix}time_per_component.png"
    fig.savefig(time_png, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(names, [engines[n]["peak_rss_mb"] / 1024 for n in names], color="tab:purple")
    ax.set_ylabel("peak RSS (GiB)")
    ax.set_title("Peak memory of one generation")
    fig.tight_layout()
    rss_png = out_dir / f"{prefix}peak_rss.png"
    fig.savefig(rss_png, dpi=110)
    plt.close(fig)
    return [time_png, rss_png]


def write_report(report: dict[str, Any], out_dir: Path, with_plots: bool = True, name: str = "benchmark") -> list[Path]:
    """NAME.json, NAME.md and (optionally) the plots (prefixed with NAME_ unless NAME is the default) into
    `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / f"{name}.json", out_dir / f"{name}.md"]
    written[0].write_text(json.dumps(report, indent=2) + "\n")
    written[1].write_text(markdown(report))
    prefix = "" if name == "benchmark" else f"{name}_"
    return written + (plots(report, out_dir, prefix) if with_plots else [])
