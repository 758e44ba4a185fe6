"""Hugging Face Hub ids as model paths: `from_pretrained("org/name")`, `sd-run prompt -m org/name[@revision]`.

Many ready ONNX Stable Diffusion repositories (Optimum's layout, Olive-optimized ones) live on the Hub. A model
argument that is not an existing folder but reads as a repository id is fetched with huggingface_hub (a
dependency of tokenizers, so the runtime needs nothing more) into its cache, which honours HF_HOME,
HF_HUB_CACHE, HF_ENDPOINT, HF_TOKEN and HF_HUB_OFFLINE. Only what the runtime reads is fetched: graphs, their
weights, configs and tokenizer files, never a repository's PyTorch checkpoints.
"""

from __future__ import annotations

import re
from pathlib import Path

from .manifest import ManifestError

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*(@[\w./-]+)?$")
RUNTIME_FILES = ["*.json", "*.txt", "*.onnx", "*.onnx_data", "*.onnx.data", "*.pb"]


def is_hub_id(text: str | Path) -> bool:
    """Whether `text` names a Hub repository (org/name, optionally @revision) rather than an existing path."""
    return not Path(text).expanduser().exists() and bool(REPO_ID.match(str(text)))


def split_revision(text: str) -> tuple[str, str | None]:
    """ "org/name@rev" -> ("org/name", "rev"); no "@": revision None (the default branch)."""
    repo_id, _, revision = str(text).partition("@")
    return repo_id, revision or None


def fetch_model(repo_id: str, revision: str | None = None, patterns: list[str] | None = None) -> Path:
    """The local folder of `repo_id` at `revision`, downloaded (only `patterns`, default the runtime's files)
    unless already cached; ManifestError with one line saying why when it cannot be had."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{repo_id}@{revision}" if revision else repo_id
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns or RUNTIME_FILES))
    except RevisionNotFoundError:
        raise ManifestError(f"{where}: the Hugging Face Hub repository has no revision {revision!r}") from None
    except RepositoryNotFoundError:
        raise ManifestError(
            f"{where}: no such folder, nor a Hugging Face Hub repository (or it is private: set HF_TOKEN)"
        ) from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        raise ManifestError(
            f"{where}: not in the Hugging Face cache (HF_HOME) and the Hub cannot be reached "
            "(offline, or HF_HUB_OFFLINE=1); download it once online or give a local folder"
        ) from None
    except Exception as exc:  # noqa: BLE001 - network, HTTP and disk errors all mean "could not fetch it"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ManifestError(f"{where}: cannot fetch from the Hugging Face Hub: {reason}") from None


def locate_model(model: str | Path, revision: str | None = None) -> Path:
    """A model argument as a folder: an existing path as it is, a Hub id (with `@revision` or `revision`)
    fetched; ManifestError for anything else."""
    folder = Path(model).expanduser()
    if folder.is_dir():
        return folder
    if not is_hub_id(model):
        raise ManifestError(f"{folder}: no such model folder")
    repo_id, pinned = split_revision(str(model))
    if pinned and revision and pinned != revision:
        raise ManifestError(f"{model}: names revision {pinned!r} but revision={revision!r} was also given")
    return fetch_model(repo_id, pinned or revision)


__all__ = ["fetch_model", "is_hub_id", "locate_model", "split_revision"]
