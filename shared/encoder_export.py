"""Reading the encoder export ``dinodepth.pth`` / ``.safetensors``: the contract between pretraining
and detection.

``pretrain/export.py`` writes the file (format table in its docstring); ``detect`` and anyone else
only need :func:`load_dinodepth`, so it lives here and no downstream stage imports ``pretrain``.
Loading never unpickles code (:func:`shared.checkpoint.load_checkpoint`: ``weights_only=True`` or
safetensors) and checks the ``.sha256`` sidecar when present.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from shared.checkpoint import CheckpointError, load_checkpoint, verify_sha256_sidecar
from shared.vit import DinoVisionTransformer, ViTConfig, load_backbone_weights, vit_from_config


def default_depth_input_norm() -> dict:
    from shared.depth import DepthNormConfig

    return {"modality": "depth", **DepthNormConfig().to_dict(), "invalid_value": 0.0}


def load_dinodepth(path: str | os.PathLike, map_location: str | torch.device = "cpu", attn_impl: str | None = None,
                   verify: bool = True) -> tuple[DinoVisionTransformer, dict]:
    """Load an exported DINO-Depth (or image) encoder → (backbone in eval mode, input_norm dict).

    ``path``: the ``.pth`` or ``.safetensors`` export. The backbone is rebuilt from the stored
    ``config`` alone and loaded strictly; a ``.sha256`` sidecar, when present, must match
    (``verify=False`` skips the check). ``attn_impl`` overrides the attention kernel
    (``auto``/``sdpa``/``xformers``/``naive``). ``input_norm`` tells how inputs were normalised in
    pretraining (depth: nearness ``mode``/``eps``/``pct``, invalid = 0).
    """
    path = Path(path)
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


__all__ = ["default_depth_input_norm", "load_dinodepth"]
