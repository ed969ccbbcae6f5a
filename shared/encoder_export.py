"""Reading the encoder export ``dinodepth.pth`` / ``.safetensors``: the contract between pretraining
and detection.

``pretrain/export.py`` writes the file (format table in its docstring); ``detect`` and anyone else
only need :func:`load_dinodepth`, so it lives here and no downstream stage imports ``pretrain``.
Loading never unpickles code (:func:`shared.checkpoint.load_checkpoint`: ``weights_only=True`` or
safetensors) and checks the ``.sha256`` sidecar when present.

A Hugging Face folder (``python -m pretrain.export --format hf``: ``config.json`` + ``model.safetensors``
+ ``dinodepth.json``) loads the same way: the architecture record and ``input_norm`` come from
``dinodepth.json``; a DINOv2 folder without it is rebuilt from ``config.json`` (transformers'
interpolation settings) with the default depth normalisation and a warning.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import torch

from shared.checkpoint import CheckpointError, file_sha256, load_checkpoint, verify_sha256_sidecar
from shared.vit import (
    DinoVisionTransformer,
    ViTConfig,
    infer_config_from_state_dict,
    load_backbone_weights,
    vit_from_config,
)

DINODEPTH_JSON = "dinodepth.json"  # our record inside an exported Hugging Face folder


def default_depth_input_norm() -> dict:
    from shared.depth import DepthNormConfig

    return {"modality": "depth", **DepthNormConfig().to_dict(), "invalid_value": 0.0}


def load_dinodepth(path: str | os.PathLike, map_location: str | torch.device = "cpu", attn_impl: str | None = None,
                   verify: bool = True) -> tuple[DinoVisionTransformer, dict]:
    """Load an exported DINO-Depth (or image) encoder → (backbone in eval mode, input_norm dict).

    ``path``: the ``.pth`` or ``.safetensors`` export, or a Hugging Face folder. The backbone is rebuilt from the stored
    ``config`` alone and loaded strictly; a ``.sha256`` sidecar, when present, must match
    (``verify=False`` skips the check). ``attn_impl`` overrides the attention kernel
    (``auto``/``sdpa``/``xformers``/``naive``). ``input_norm`` tells how inputs were normalised in
    pretraining (depth: nearness ``mode``/``eps``/``pct``, invalid = 0).
    """
    path = Path(path)
    if path.is_dir():
        model, input_norm = _load_hf_folder(path, attn_impl)
        return model.to(map_location), input_norm
    if verify and verify_sha256_sidecar(path) is False:
        raise CheckpointError(f"{path} does not match its .sha256 sidecar (corrupt or modified file)")
    obj = load_checkpoint(path, map_location="cpu")
    record = obj.get("config") or obj.get("arch")
    if not isinstance(record, dict) or "model" not in obj:
        raise CheckpointError(f"{path} is not a DINO-Depth export (needs 'model' and 'config'); for a training "
                              "checkpoint run `python -m pretrain.export --ckpt ... --out ...` first")
    cfg = ViTConfig.from_dict(record).replace(drop_path_rate=0.0)
    if attn_impl is not None:
        cfg = cfg.replace(attn_impl=attn_impl)
    model = vit_from_config(cfg)
    load_backbone_weights(model, obj["model"], source=str(path))
    model.eval().requires_grad_(False)
    input_norm = obj.get("input_norm") or default_depth_input_norm()
    return model.to(map_location), dict(input_norm)


def _load_hf_folder(folder: Path, attn_impl: str | None) -> tuple[DinoVisionTransformer, dict]:
    from shared.hf_dinov2 import (
        HFDinov2Error,
        hf_dinov2_to_dinov2,
        hf_interpolation,
        read_hf_folder,
        vit_config_from_hf,
    )

    try:
        raw, hf_cfg, _ = read_hf_folder(folder)
        sd = hf_dinov2_to_dinov2(raw)
        record_path = folder / DINODEPTH_JSON
        if record_path.is_file():
            try:
                record = json.loads(record_path.read_text())
                cfg = ViTConfig.from_dict(record["config"])
                input_norm = dict(record.get("input_norm") or default_depth_input_norm())
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{record_path}: not a DINO-Depth record ({exc})") from None
        else:
            cfg = infer_config_from_state_dict(sd, **vit_config_from_hf(hf_cfg, str(folder)),
                                               **hf_interpolation(hf_cfg["model_type"]))
            cfg = cfg.replace(layerscale=float(hf_cfg.get("layerscale_value", 1.0)))
            input_norm = default_depth_input_norm()
            warnings.warn(f"{folder} has no {DINODEPTH_JSON}: the input normalisation is assumed to be the default "
                          f"{input_norm}", stacklevel=3)
    except HFDinov2Error as exc:
        raise CheckpointError(str(exc)) from None
    cfg = cfg.replace(drop_path_rate=0.0)
    if attn_impl is not None:
        cfg = cfg.replace(attn_impl=attn_impl)
    model = vit_from_config(cfg)
    load_backbone_weights(model, sd, source=str(folder))
    return model.eval().requires_grad_(False), input_norm


def export_sha256(path: str | os.PathLike) -> str:
    """Content hash of an export: the file's sha256, or for a folder a hash over the names and sha256 of
    its config and weight files (what identifies the encoder in feature caches and reports)."""
    path = Path(path)
    if not path.is_dir():
        return file_sha256(path)
    digest = hashlib.sha256()
    for f in sorted(p for p in path.iterdir() if p.is_file() and (p.suffix in (".safetensors", ".bin")
                                                                   or p.name in ("config.json", DINODEPTH_JSON))):
        digest.update(f"{f.name}:{file_sha256(f)}\n".encode())
    return digest.hexdigest()


def export_train_meta(path: str | os.PathLike) -> dict:
    """``train_meta`` recorded with an export (file or Hugging Face folder; {} when none is recorded or
    the path is not an export) — what detection reports as the encoder's pretraining data."""
    path = Path(path)
    try:
        if path.is_dir():
            record = json.loads((path / DINODEPTH_JSON).read_text())
        else:
            record = load_checkpoint(path)
    except (OSError, ValueError, CheckpointError):
        return {}
    meta = record.get("train_meta") if isinstance(record, dict) else None
    return dict(meta) if isinstance(meta, dict) else {}


__all__ = ["DINODEPTH_JSON", "default_depth_input_norm", "export_sha256", "export_train_meta", "load_dinodepth"]
