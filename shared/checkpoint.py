"""Checkpoint files: atomic writes, safe loads, safetensors, and an architecture record.

* Writes go to a temp file in the destination folder, are fsynced and renamed (:mod:`shared.io`):
  a crash or a full disk never leaves a truncated checkpoint under the final name.
* Loads use ``torch.load(weights_only=True)``: tensors, containers and plain Python values only.
  A file that needs arbitrary unpickling (a crafted or foreign pickle) is refused with
  :class:`CheckpointError`; nothing in it is executed. Checkpoints must therefore hold no numpy
  arrays or custom objects (convert RNG states to tensors/lists before saving).
* Model files carry an ``arch`` record (e.g. :meth:`shared.vit.ViTConfig.to_dict`) so a loader
  rebuilds the model without guessing; :func:`check_state_dict_compat` explains mismatches by key.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from shared.io import atomic_open, atomic_write_bytes, atomic_write_text

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read safely, or does not fit the model it is loaded into."""


def save_checkpoint(obj: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """``torch.save`` ``obj`` atomically to ``path`` (previous file intact on any failure)."""
    path = Path(path)
    try:
        with atomic_open(path, "wb") as handle:
            torch.save(dict(obj), handle)
    except RuntimeError as exc:
        # torch's zip writer replaces a failed write (a full disk) by its own "unexpected pos" error:
        # report the file-system error itself.
        cause = exc.__context__
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__context__
        if cause is None:
            raise
        raise OSError(cause.errno, cause.strerror or str(cause), str(path)) from exc
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a ``.pth``/``.pt`` checkpoint or a ``.safetensors`` file without executing pickled code.

    A ``.safetensors`` file returns ``{"model": state_dict, **metadata}`` (JSON metadata decoded).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        state_dict, metadata = load_safetensors(path, device=str(map_location))
        return {"model": state_dict, **metadata}
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"refusing to load {path}: it is not a plain weights file (torch.load(weights_only=True) "
            f"rejected it: {str(exc).splitlines()[0]}). Loading it would execute arbitrary code; "
            "re-export it from a trusted environment with plain tensors/containers, or use safetensors."
        ) from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(f"checkpoint {path} is unreadable or truncated: {exc}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, expected a dict")
    return obj


def save_safetensors(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike,
                     metadata: Mapping[str, Any] | None = None) -> Path:
    """Write tensors as safetensors; ``metadata`` values are stored JSON-encoded (safetensors keeps str→str)."""
    from safetensors.torch import save as st_save

    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    meta = {k: json.dumps(v) for k, v in (metadata or {}).items()}
    path = Path(path)
    atomic_write_bytes(path, st_save(tensors, metadata=meta))
    return path


def load_safetensors(path: str | os.PathLike, device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device=device) as handle:
            raw_meta = handle.metadata() or {}
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"safetensors file {path} is unreadable or truncated: {exc}") from None
    meta = {}
    for key, value in raw_meta.items():
        try:
            meta[key] = json.loads(value)
        except json.JSONDecodeError:
            meta[key] = value
    return tensors, meta


def save_model(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike, arch: Mapping[str, Any],
               **metadata: Any) -> Path:
    """Save model weights with their architecture record; format chosen by suffix (.safetensors or .pth)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return save_safetensors(state_dict, path, {"arch": dict(arch), "format_version": FORMAT_VERSION, **metadata})
    obj = {"model": {k: v.detach().cpu() for k, v in state_dict.items()}, "arch": dict(arch),
           "format_version": FORMAT_VERSION, **metadata}
    return save_checkpoint(obj, path)


def check_state_dict_compat(expected: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor],
                            source: str = "checkpoint") -> None:
    """Raise :class:`CheckpointError` listing missing keys, unexpected keys and shape mismatches."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    mismatched = sorted(
        f"{k}: checkpoint {tuple(got[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(got)
        if tuple(expected[k].shape) != tuple(got[k].shape)
    )
    if missing or unexpected or mismatched:
        parts = [f"{source} does not fit the model architecture:"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                             ("shape mismatches", mismatched)):
            if items:
                shown = ", ".join(items[:12]) + (f", … (+{len(items) - 12} more)" if len(items) > 12 else "")
                parts.append(f"  {title} ({len(items)}): {shown}")
        raise CheckpointError("\n".join(parts))


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_sha256_sidecar(path: str | os.PathLike) -> Path:
    """Write ``<path>.sha256`` in the ``sha256sum`` format."""
    path = Path(path)
    sidecar = path.with_name(path.name + ".sha256")
    atomic_write_text(sidecar, f"{file_sha256(path)}  {path.name}\n")
    return sidecar


def verify_sha256_sidecar(path: str | os.PathLike) -> bool | None:
    """True/False if a sidecar exists and matches/does not; None without a sidecar."""
    path = Path(path)
    sidecar = path.with_name(path.name + ".sha256")
    if not sidecar.is_file():
        return None
    expected = sidecar.read_text().split()[0]
    return expected == file_sha256(path)


def tensor_bytes(obj: Any) -> bytes:
    """Serialise with torch.save into memory (used for hashing/fingerprints of small objects)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()
