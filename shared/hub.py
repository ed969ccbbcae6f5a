"""Model weights given as a local path or as a Hugging Face hub id.

``detect --image-encoder-weights`` and ``--ckpt`` (and anyone else) accept, besides a local file or
folder, a hub id such as ``facebook/dinov2-with-registers-base`` or ``user/dinodepth-vits14``: where
there is internet the repository is downloaded once into the Hugging Face cache and the local snapshot
is used; a snapshot already in the cache is used offline. When the id cannot be resolved (offline
mode — ``HF_HUB_OFFLINE=1`` —, no network, unknown repository) nothing waits and nothing changes: the
caller gets the original string back as a path and fails with its usual "does not exist" message; the
reason is given as a warning.

What counts as a hub id: ``owner/name`` (optionally ``@revision``), with no local file or folder of
that name, whose first component is not an existing local folder and whose name does not end in a
weights-file suffix (``runs/dinodepth.pth`` stays a — missing — local path).
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

# Only what a DINOv2-style model folder needs (no duplicate pytorch_model.bin, no ONNX/TF/Flax files).
ALLOW_PATTERNS = ("*.json", "*.safetensors", "*.pth", "*.md")
_WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt", ".npz", ".json", ".yaml")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*(@[A-Za-z0-9_./-]+)?$")


def looks_like_hub_id(spec: str | os.PathLike) -> bool:
    """True when ``spec`` is meant as a hub id rather than a local path (rules in the module docstring)."""
    text = os.fspath(spec)
    if not isinstance(text, str) or not _HUB_ID.match(text) or Path(text).exists():
        return False
    owner, name = text.split("@", 1)[0].split("/", 1)
    if Path(owner).exists():  # "runs/model": a path in an existing local folder
        return False
    return not name.lower().endswith(_WEIGHT_SUFFIXES)


def hub_offline() -> bool:
    """Offline mode as huggingface_hub / transformers understand it (no network calls at all)."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _snapshot_download(repo_id: str, revision: str | None, local_files_only: bool) -> str:
    """huggingface_hub's download into its cache (the one network call; tests replace it)."""
    from huggingface_hub import snapshot_download

    return snapshot_download(repo_id, revision=revision, allow_patterns=list(ALLOW_PATTERNS),
                             local_files_only=local_files_only)


def weights_in_snapshot(folder: Path) -> Path:
    """The loadable thing inside a downloaded repository: the folder itself when it is a Hugging Face
    model folder (``config.json``), else its single ``.safetensors`` / ``.pth`` weights file."""
    if (folder / "config.json").is_file():
        return folder
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in (".safetensors", ".pth"))
    return files[0] if len(files) == 1 else folder


def resolve_model_path(spec: str | os.PathLike) -> Path:
    """A local path unchanged; a hub id → the local snapshot (cached, or downloaded where there is
    internet); an unresolvable id → ``Path(spec)`` with a warning saying why (the caller's "does not
    exist" error then applies)."""
    path = Path(spec)
    if not looks_like_hub_id(spec):
        return path
    text = os.fspath(spec)
    repo_id, _, revision = text.partition("@")
    offline = hub_offline()
    try:
        folder = _snapshot_download(repo_id, revision or None, local_files_only=offline)
    except Exception as exc:  # noqa: BLE001  (network, auth, missing repo, offline cache miss: all mean "not here")
        where = "in the local Hugging Face cache (offline mode)" if offline else "on the Hugging Face hub"
        warnings.warn(f"{text} looks like a hub id but could not be found {where}: "
                      f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", stacklevel=2)
        return path
    return weights_in_snapshot(Path(folder))


__all__ = ["ALLOW_PATTERNS", "hub_offline", "looks_like_hub_id", "resolve_model_path", "weights_in_snapshot"]
