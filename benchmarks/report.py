"""Turn a benchmark JSON into a Markdown table with ratios and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

COLUMNS = [
    ("unet_step_median_s", "UNet/transformer step (s)"),
    ("vae_decode_s", "VAE decode (s)"),
    ("end_to_end_s", "end to end (s)"),
    ("cold_first_image_s", "cold 1st image (s)"),
    ("peak_rss_mb", "peak RSS (MB)"),
    ("model_mb", "model (MB)"),
    ("install_mb", "install (MB)"),
    ("setup_s", "setup (s)"),
    ("load_first_s", "load 1st (s)"),
    ("load_second_s", "load 2nd (s)"),
    ("text_encoder_s", "text enc (s)"),
    ("first_step_s", "1st step (s)"),
]
RATIO_KEYS = ("unet_step_median_s", "vae_decode_s", "end_to_end_s", "cold_first_image_s", "peak_rss_mb")
OURS = "sd-onnx-int8"
# The goal (issue 19): our int8 at most this fraction of the best peer's figure, per column.
GOAL = {"unet_step_median_s": 0.8, "end_to_end_s": 0.8, "peak_rss_mb": 1.0}


def markdown(report: dict[str, Any], references: tuple[str, ...] = (OURS, "diffusers-pytorch")) -> str:
    """A table of every engine's figures, the goal against the best peer, then ratios against each of
    `references` that ran (lower is better)."""
    engines = report["engines"]
    machine = report["machine"]
    settings = report["settings"]
    lines = [
        f"# sd-bench report ({report['date']})",
        "",
        f"Model: {settings['model_label']}; {settings['size']}x{settings['size']}, {settings['steps']} steps, "
        f"guidance {settings['guidance']}, {settings['threads']} threads.",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, ISA {', '.join(machine['isa'])}.",
        f"Command: `{report['command']}`",
        "",
        "| engine | " + " | ".join(title for _, title in COLUMNS) + " |",
        "|---|" + "---|" * len(COLUMNS),
    ]
    for name, rec in engines.items():
        cells = [_fmt(rec.get(key)) for key, _ in COLUMNS] if "error" not in rec else [f"failed: {rec['error']}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for name, reason in report.get("skipped", {}).items():
        lines.append(f"| {name} | skipped: {reason} |")
    lines += _goal(engines)
    for ref in references:
        if ref not in engines or "error" in engines[ref]:
            continue
        lines += ["", f"Ratios against {ref} (lower is better):", ""]
        lines.append("| engine | " + " | ".join(dict(COLUMNS)[k] for k in RATIO_KEYS) + " |")
        lines.append("|---|" + "---|" * len(RATIO_KEYS))
        for name, rec in engines.items():
            ratios = [_ratio(rec.get(k), engines[ref].get(k)) for k in RATIO_KEYS]
            lines.append(f"| {name} | " + " | ".join(ratios) + " |")
    if report.get("notes"):
        lines += ["", "## Notes", "", report["notes"].strip()]
    lines += ["", "Library versions per engine:", ""]
    for name, rec in engines.items():
        extras = [f"{k} {rec[k]}" for k in ("engine", "inference_precision", "weight_type") if rec.get(k)]
        versions = ", ".join(f"{k} {v}" for k, v in rec.get("versions", {}).items())
        lines.append(f"- {name}: {versions}" + (f" ({'; '.join(extras)})" if extras else ""))
    return "\n".join(lines) + "\n"


def _goal(engines: dict[str, dict]) -> list[str]:
    """Our int8 against the best peer per goal column: any engine that is not sd-onnx and draws whole images
    (the openvino-onnx rows time our graphs' components: a diagnosis, not something a user runs)."""
    peers = {
        n: r for n, r in engines.items() if not n.startswith("sd-onnx") and "error" not in r and r.get("end_to_end_s")
    }
    ours = engines.get(OURS, {})
    if not peers or "error" in ours or not ours:
        return []
    lines = ["", f"Goal: {OURS} against the best peer in each column:", ""]
    lines += ["| column | best peer | its figure | ours | ratio | goal |", "|---|---|---|---|---|---|"]
    for key, limit in GOAL.items():
        ranked = sorted((r[key], n) for n, r in peers.items() if r.get(key))
        if not ranked or not ours.get(key):
            continue
        best, name = ranked[0]
        ratio = ours[key] / best
        verdict = f"met (<= {limit}x)" if ratio <= limit else f"missed by {ratio / limit:.2f}x (<= {limit}x)"
        lines.append(f"| {dict(COLUMNS)[key]} | {name} | {_fmt(best)} | {_fmt(ours[key])} | {ratio:.2f}x | {verdict} |")
    return lines


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

    engines = {n: r for n, r in report["engines"].items() if "error" not in r and r.get("end_to_end_s")}
    names = list(engines)
    steps = report["settings"]["steps"]
    text = [engines[n].get("text_encoder_s") or 0.0 for n in names]
    vae = [engines[n].get("vae_decode_s") or 0.0 for n in names]
    parts = {
        "text encoder": text,
        f"denoising ({steps} steps)": [
            engines[n]["end_to_end_s"] - t - v for n, t, v in zip(names, text, vae, strict=True)
        ],
        "VAE decode": vae,
    }
    width = max(7.0, 0.75 * len(names))
    fig, ax = plt.subplots(figsize=(width, 4))
    bottom = [0.0] * len(names)
    for label, values in parts.items():
        ax.bar(names, values, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set_ylabel("seconds per image")
    ax.set_title("Where one image's time goes")
    ax.tick_params(axis="x", labelrotation=30)
    ax.legend()
    fig.tight_layout()
    time_png = out_dir / f"{prefix}time_per_component.png"
    fig.savefig(time_png, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(width, 4))
    ax.bar(names, [engines[n]["peak_rss_mb"] / 1024 for n in names], color="tab:purple")
    ax.tick_params(axis="x", labelrotation=30)
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
