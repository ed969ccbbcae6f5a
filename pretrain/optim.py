"""Parameter groups, AdamW and per-iteration hyper-parameters (``../shared/spec/dino_depth.md`` §6).

lr_mult (layer-wise decay d = 0.9, patch-embed ×0.2): layer_id 0 for ``patch_embed``, ``cls_token``,
``pos_embed``, ``mask_token``, ``register_tokens``; i + 1 for ``blocks.i``; depth + 1 for everything
else (final norm, heads); lr_mult = d^(depth + 1 − layer_id), × patch_embed_lr_mult for
``patch_embed``. wd_mult: 0 for biases, norms and LayerScale gammas, else 1. The prototype layer
(``last_layer``) follows the last-layer lr schedule (0 while frozen, which also stops its decoupled
decay).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable

import torch
from torch import nn

from pretrain.schedules import Schedules

_TOKEN_PARAMS = ("cls_token", "pos_embed", "mask_token", "register_tokens")


def backbone_layer_id(name: str, depth: int) -> int:
    """Layer id of a backbone parameter name (without the ``backbone.`` prefix)."""
    if name.startswith("patch_embed") or name in _TOKEN_PARAMS:
        return 0
    m = re.match(r"blocks\.(\d+)\.", name)
    if m:
        return int(m.group(1)) + 1
    return depth + 1


def param_multipliers(name: str, depth: int, layerwise_decay: float = 0.9, patch_embed_lr_mult: float = 0.2
                      ) -> tuple[float, float, bool]:
    """(lr_mult, wd_mult, is_last_layer) of a student parameter.

    ``name`` is the full student name (``backbone.blocks.3.attn.qkv.weight``, ``dino_head.mlp.0.bias``,
    ``ibot_head.last_layer.weight_g``, …).
    """
    if name.startswith("backbone."):
        short = name[len("backbone."):]
        layer_id = backbone_layer_id(short, depth)
    else:
        short, layer_id = name, depth + 1
    lr_mult = layerwise_decay ** (depth + 1 - layer_id)
    if short.startswith("patch_embed"):
        lr_mult *= patch_embed_lr_mult
    no_decay = name.endswith(".bias") or "norm" in short or re.search(r"(^|\.)ls\d\.gamma$", short) is not None \
        or short.endswith(".gamma")
    wd_mult = 0.0 if no_decay else 1.0
    is_last_layer = "last_layer" in name
    return lr_mult, wd_mult, is_last_layer


def build_param_groups(named_parameters: Iterable[tuple[str, nn.Parameter]], depth: int,
                       layerwise_decay: float = 0.9, patch_embed_lr_mult: float = 0.2) -> list[dict]:
    """Parameter groups fused by (lr_mult, wd_mult, is_last_layer); each keeps its parameter names."""
    groups: dict[tuple, dict] = defaultdict(lambda: {"params": [], "names": []})
    for name, param in named_parameters:
        if not param.requires_grad:
            continue
        lr_mult, wd_mult, last = param_multipliers(name, depth, layerwise_decay, patch_embed_lr_mult)
        group = groups[(lr_mult, wd_mult, last)]
        group.update(lr_mult=lr_mult, wd_mult=wd_mult, is_last_layer=last)
        group["params"].append(param)
        group["names"].append(name)
    # Deterministic order (matters for the optimizer state layout).
    return [groups[key] for key in sorted(groups)]


def build_optimizer(named_parameters: Iterable[tuple[str, nn.Parameter]], depth: int, layerwise_decay: float,
                    patch_embed_lr_mult: float, betas: tuple[float, float], device: torch.device,
                    eps: float = 1e-8, fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW over the §6 groups (fused kernel on CUDA, or where ``fused``: it skips a step on the device
    through ``found_inf``). lr and wd are set every iteration."""
    groups = build_param_groups(named_parameters, depth, layerwise_decay, patch_embed_lr_mult)
    kwargs = {"fused": True} if (device.type == "cuda" if fused is None else fused) else {}
    return torch.optim.AdamW(groups, lr=0.0, betas=betas, eps=eps, weight_decay=0.0, **kwargs)


def apply_schedules(optimizer: torch.optim.Optimizer, schedules: Schedules, iteration: int) -> None:
    """lr = sched_lr[it]·lr_mult (last layer: sched_last_layer_lr[it]·lr_mult), wd = sched_wd[it]·wd_mult."""
    lr, last_lr, wd = schedules.lr[iteration], schedules.last_layer_lr[iteration], schedules.wd[iteration]
    for group in optimizer.param_groups:
        group["lr"] = (last_lr if group["is_last_layer"] else lr) * group["lr_mult"]
        group["weight_decay"] = wd * group["wd_mult"]


def optimizer_state_by_name(optimizer: torch.optim.Optimizer) -> dict:
    """Optimizer state keyed by parameter **name** (portable across wrappers and world sizes)."""
    sd = optimizer.state_dict()
    index_to_name = {}
    for group_sd, group in zip(sd["param_groups"], optimizer.param_groups):
        for index, name in zip(group_sd["params"], group["names"]):
            index_to_name[index] = name
    state = {index_to_name[i]: value for i, value in sd["state"].items()}
    groups = [{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]]
    return {"state": state, "param_groups": groups}


def load_optimizer_state_by_name(optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """Inverse of :func:`optimizer_state_by_name`; every name must exist (clear error otherwise)."""
    current = optimizer.state_dict()
    name_to_index: dict[str, int] = {}
    for group_sd, group in zip(current["param_groups"], optimizer.param_groups):
        for index, name in zip(group_sd["params"], group["names"]):
            name_to_index[name] = index
    unknown = sorted(set(saved["state"]) - set(name_to_index))
    if unknown:
        raise ValueError(f"optimizer state has parameters the model lacks: {unknown[:8]}")
    if len(saved["param_groups"]) != len(current["param_groups"]):
        raise ValueError("optimizer parameter groups differ from the checkpoint's (model or lr-mult settings changed)")
    groups = []
    for saved_group, group_sd in zip(saved["param_groups"], current["param_groups"]):
        merged = dict(saved_group)
        merged["params"] = group_sd["params"]
        groups.append(merged)
    state = {name_to_index[name]: value for name, value in saved["state"].items()}
    optimizer.load_state_dict({"state": state, "param_groups": groups})
