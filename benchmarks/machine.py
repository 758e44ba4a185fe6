"""What a benchmark ran on: CPU model, cores, ISA flags, library versions, install footprints."""

from __future__ import annotations

import os
import platform
import re
from importlib import metadata
from pathlib import Path

ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8")


def machine_info() -> dict[str, object]:
    """CPU model, logical cores and the ISA flags that decide int8/fp32 kernel speed."""
    model, flags = platform.processor() or platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name") and ":" in line:
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and ":" in line:
                flags = set(line.split(":", 1)[1].split())
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "isa": [f for f in ISA_FLAGS if f in flags],
        "python": platform.python_version(),
        "os": platform.platform(),
    }


def versions(packages: tuple[str, ...]) -> dict[str, str]:
    """Installed versions of `packages` in this interpreter ("-" if absent)."""
    found = {}
    for name in packages:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "-"
    return found


def install_footprint_mb(packages: tuple[str, ...]) -> float:
    """Disk size of the named distributions and everything they require, as installed here."""
    seen: set[str] = set()
    todo = list(packages)
    total = 0
    while todo:
        name = todo.pop().lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        for file in dist.files or []:
            path = Path(dist.locate_file(file))
            if path.is_file():
                total += path.stat().st_size
        for req in dist.requires or []:
            if "extra ==" not in req:
                todo.append(re.match(r"[A-Za-z0-9._-]+", req).group(0))
    return total / 1e6


def folder_mb(path: Path) -> float:
    """Size of a model on disk: a folder's files, or a single-file checkpoint."""
    path = Path(path)
    files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
    return sum(f.stat().st_size for f in files) / 1e6
