"""`<lora:name:weight>` in a prompt, as A1111 reads it: LoRAs picked per request from a folder of files.

A1111's extra-network syntax: `<lora:NAME>` (weight 1), `<lora:NAME:W>`, `<lora:NAME:TE:UNET>` (separate weights
for the text encoders and the UNet); `<lyco:...>` is the same. Tags are taken out of the prompt before it is
encoded, as A1111 does; the PNG keeps the prompt as written. NAME is a file's name without `.safetensors`
anywhere under the LoRA folder (`sd-run serve --lora-dir`, `from_pretrained(lora_dir=)`), matched without
regard to case; a name that is not there is a RequestError naming the prompt, never a silent skip. The
weights are added when sessions are made (lora.py), so a pipeline per LoRA set is kept (pipeline.with_loras).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .echo import echo
from .lora import Lora
from .request import RequestError

TAG = re.compile(r"<(?:lora|lyco):([^:<>]+)((?::[^:<>]*){0,3})>", re.IGNORECASE)
MAX_FILES = 10_000
MAX_TAGS = 8
READ_CACHE = 8  # LoRA files kept read (a few MB each for SD 1.5)


@dataclass(frozen=True)
class LoraTag:
    name: str
    text_weight: float
    unet_weight: float


def extract_tags(prompt: str) -> tuple[str, list[LoraTag]]:
    """The prompt without its LoRA tags, and the tags in order; RequestError naming `prompt` for a bad weight."""
    tags = []
    for match in TAG.finditer(prompt):
        numbers = [p for p in match.group(2).split(":")[1:] if "=" not in p]  # named arguments are not weights
        try:
            weights = [float(n) for n in numbers[:2]]
        except ValueError:
            raise RequestError("prompt", f"{echo(match.group(0))}: the weight must be a number") from None
        text = weights[0] if weights else 1.0
        tags.append(LoraTag(match.group(1).strip(), text, weights[1] if len(weights) > 1 else text))
    if len(tags) > MAX_TAGS:
        raise RequestError("prompt", f"at most {MAX_TAGS} <lora:...> tags per request, got {len(tags)}")
    return TAG.sub("", prompt), tags


class LoraLibrary:
    """The LoRA files under one folder, by name; files are read on first use and a few kept."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder).expanduser()
        if not self.folder.is_dir():
            raise RequestError("lora_dir", f"{self.folder}: no such folder")
        files = sorted(p for p in self.folder.rglob("*.safetensors") if p.is_file())
        if len(files) > MAX_FILES:
            raise RequestError("lora_dir", f"{self.folder}: more than {MAX_FILES} LoRA files")
        self.files: dict[str, Path] = {}
        for path in files:
            self.files.setdefault(path.stem.lower(), path)  # the first of two with one name, in path order
        self._read: OrderedDict[Path, Lora] = OrderedDict()

    def resolve(self, tags: list[LoraTag]) -> tuple[Lora, ...]:
        """The LoRAs the tags name, each split into its text encoder and UNet parts at their weights."""
        loras = []
        for tag in tags:
            lora = self._lora(tag.name)
            for weight, keep in ((tag.text_weight, lambda c: c != "unet"), (tag.unet_weight, lambda c: c == "unet")):
                modules = {c: m for c, m in lora.modules.items() if keep(c)}
                if modules and weight:
                    loras.append(Lora(lora.file, _scale(tag, weight), modules))
        return tuple(loras)

    def check(self, tags: list[LoraTag]) -> None:
        """RequestError naming the prompt for a tag whose LoRA is not in the folder."""
        for tag in tags:
            if tag.name.lower() not in self.files:
                known = ", ".join(sorted(self.files)[:10]) or "none"
                raise RequestError(
                    "prompt", f"<lora:{tag.name[:80]}>: no such LoRA in the LoRA folder (known: {known})"
                )

    def describe(self) -> list[dict[str, Any]]:
        """A1111's `GET /sdapi/v1/loras` answer."""
        return [{"name": p.stem, "alias": p.stem, "path": str(p), "metadata": {}} for p in self.files.values()]

    def _lora(self, name: str) -> Lora:
        self.check([LoraTag(name, 1.0, 1.0)])
        path = self.files[name.lower()]
        if path not in self._read:
            self._read[path] = Lora.read(path, 1.0)
            while len(self._read) > READ_CACHE:
                self._read.popitem(last=False)
        self._read.move_to_end(path)
        return self._read[path]


def _scale(tag: LoraTag, weight: float) -> float:
    if not -10.0 <= weight <= 10.0:
        raise RequestError("prompt", f"<lora:{tag.name[:80]}>: weight must be in -10..10, got {weight:g}")
    return weight
