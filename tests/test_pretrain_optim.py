"""Parameter groups, schedules and the last-layer freeze (dino_depth.md §6, §16)."""

from __future__ import annotations

import math

import pytest
import torch
from test_pretrain_utils import single_thread  # noqa: F401

from pretrain.config import PretrainConfig
from pretrain.heads import DINOHead
from pretrain.optim import (
    apply_schedules,
    build_optimizer,
    build_param_groups,
    load_optimizer_state_by_name,
    optimizer_state_by_name,
    param_multipliers,
)
from pretrain.schedules import Cosine, build_schedules, cosine_value
from pretrain.ssl_model import SSLModel
from shared.config import load_config


def vits_student(separate_ibot: bool = False, narrow: bool = True) -> SSLModel:
    """ViT-S/14 parameter names (12 blocks); ``narrow`` shrinks the widths so that it builds fast."""
    overrides = ["dino.head_n_prototypes=64", "dino.head_hidden_dim=32", "dino.head_bottleneck_dim=16",
                 f"ibot.separate_head={str(separate_ibot).lower()}"]
    if narrow:
        overrides += ["student.embed_dim=48", "student.num_heads=2"]
    cfg = load_config(PretrainConfig, None, overrides)
    return SSLModel(cfg.vit_config(), cfg)


def expected_multipliers(name: str) -> tuple[float, float]:
    """The §6 table written out independently of the implementation."""
    d = 0.9
    if name.startswith("backbone.patch_embed"):
        lr = d**13 * 0.2
    elif name in ("backbone.cls_token", "backbone.pos_embed", "backbone.mask_token", "backbone.register_tokens"):
        lr = d**13
    elif name.startswith("backbone.blocks."):
        i = int(name.split(".")[2])
        lr = d ** (13 - (i + 1))
    else:  # final norm, heads
        lr = 1.0
    short = name.split(".", 1)[1]
    no_wd = name.endswith((".bias", "ls1.gamma", "ls2.gamma")) or "norm" in short
    return lr, 0.0 if no_wd else 1.0


def test_param_group_table_is_exact_for_vit_s14():
    with torch.device("meta"):  # the real ViT-S/14, without paying for its initialisation
        model = vits_student(separate_ibot=True, narrow=False)
    assert sum(p.numel() for p in model.backbone.parameters()) == 21_478_656
    names = [n for n, _ in model.named_parameters()]
    assert "backbone.blocks.11.ls2.gamma" in names and "dino_head.last_layer.weight_g" in names
    for name in names:
        lr_mult, wd_mult, last = param_multipliers(name, depth=12)
        exp_lr, exp_wd = expected_multipliers(name)
        assert lr_mult == pytest.approx(exp_lr, rel=1e-12), name
        assert wd_mult == exp_wd, name
        assert last == (".last_layer." in name), name
    # The spec's rounded values.
    assert round(param_multipliers("backbone.patch_embed.proj.weight", 12)[0], 4) == 0.0508
    assert round(param_multipliers("backbone.cls_token", 12)[0], 3) == 0.254
    assert round(param_multipliers("backbone.blocks.0.attn.qkv.weight", 12)[0], 3) == 0.282
    assert param_multipliers("backbone.blocks.11.mlp.fc1.weight", 12)[0] == pytest.approx(0.9)
    assert param_multipliers("backbone.norm.weight", 12) == (1.0, 0.0, False)
    # Decayed as upstream: positional embedding, tokens, weight-norm parameters of the head.
    for name in ("backbone.pos_embed", "backbone.cls_token", "dino_head.last_layer.weight_g",
                 "dino_head.last_layer.weight_v", "backbone.blocks.3.attn.qkv.weight"):
        assert param_multipliers(name, 12)[1] == 1.0, name
    for name in ("backbone.blocks.3.norm1.weight", "backbone.blocks.3.ls1.gamma", "dino_head.mlp.0.bias"):
        assert param_multipliers(name, 12)[1] == 0.0, name


def test_groups_fuse_by_multipliers_and_cover_every_parameter():
    model = vits_student()
    groups = build_param_groups(model.named_parameters(), depth=12)
    n_params = sum(len(g["params"]) for g in groups)
    assert n_params == len(list(model.parameters()))
    keys = [(g["lr_mult"], g["wd_mult"], g["is_last_layer"]) for g in groups]
    assert len(keys) == len(set(keys))
    last = [g for g in groups if g["is_last_layer"]]
    assert len(last) == 1 and sorted(last[0]["names"]) == ["dino_head.last_layer.weight_g",
                                                            "dino_head.last_layer.weight_v"]


def test_cosine_helper():
    s = Cosine(1.0, 0.1, total=20, warmup=5, start_warmup=0.2, freeze=3)
    assert len(s) == 20
    assert [s[i] for i in range(3)] == [0.0, 0.0, 0.0]
    assert s[3] == pytest.approx(0.2) and s[7] == pytest.approx(1.0)  # linear 0.2 → 1 over 5
    assert s[8] == pytest.approx(1.0)  # cosine starts at base
    assert s[13] == pytest.approx(cosine_value(1.0, 0.1, 5, 12))
    assert s[19] == pytest.approx(cosine_value(1.0, 0.1, 11, 12))
    assert s[20] == 0.1 and s[10**6] == 0.1  # past the end: final


def test_default_schedules():
    cfg = load_config(PretrainConfig)
    sched = build_schedules(cfg, global_batch_size=256)
    T = 125_000
    assert sched.total_iterations == T
    peak = 1e-3 * math.sqrt(256 / 1024)
    assert sched.peak_lr == pytest.approx(peak)
    assert sched.lr[0] == 0.0 and sched.lr[12_499] == pytest.approx(peak) and sched.lr[T - 1] > 1e-6
    assert sched.lr[T] == 1e-6
    assert sched.wd[0] == pytest.approx(0.04) and sched.wd[T] == pytest.approx(0.4)
    assert sched.momentum[0] == pytest.approx(0.992) and sched.momentum[T] == 1.0
    assert sched.teacher_temp[0] == pytest.approx(0.04)
    assert sched.teacher_temp[37_499] == pytest.approx(0.07) and sched.teacher_temp[60_000] == pytest.approx(0.07)
    assert sched.teacher_temp[18_750] == pytest.approx(0.04 + 0.03 * 18_750 / 37_499)
    # Last layer frozen for the first epoch (1250 iterations), then the lr schedule.
    assert all(sched.last_layer_lr[i] == 0.0 for i in range(1250))
    assert sched.last_layer_lr[1250] == sched.lr[1250] > 0


def test_apply_schedules_sets_group_lr_and_wd_and_freezes_last_layer():
    model = vits_student()
    cfg = load_config(PretrainConfig)
    sched = build_schedules(cfg, 1024)
    opt = build_optimizer(model.named_parameters(), 12, 0.9, 0.2, (0.9, 0.999), torch.device("cpu"))
    apply_schedules(opt, sched, 5000)
    for group in opt.param_groups:
        base = sched.last_layer_lr[5000] if group["is_last_layer"] else sched.lr[5000]
        assert group["lr"] == pytest.approx(base * group["lr_mult"])
        assert group["weight_decay"] == pytest.approx(sched.wd[5000] * group["wd_mult"])
    apply_schedules(opt, sched, 100)
    last = next(g for g in opt.param_groups if g["is_last_layer"])
    assert last["lr"] == 0.0 and any(g["lr"] > 0 for g in opt.param_groups)


def test_frozen_last_layer_does_not_move():
    head = DINOHead(8, 16, nlayers=2, hidden_dim=8, bottleneck_dim=4)
    named = [(f"dino_head.{n}", p) for n, p in head.named_parameters()]
    cfg = load_config(PretrainConfig, None, ["optim.epochs=1", "train.epoch_length=10",
                                             "optim.warmup_epochs=0", "optim.freeze_last_layer_epochs=0.5"])
    sched = build_schedules(cfg, 1024)
    opt = build_optimizer(named, 12, 0.9, 0.2, (0.9, 0.999), torch.device("cpu"))
    before = {n: p.detach().clone() for n, p in named}
    for it in range(5):
        head(torch.randn(4, 8)).square().mean().backward()
        apply_schedules(opt, sched, it)
        opt.step()
        opt.zero_grad()
    for n, p in named:
        moved = not torch.equal(p, before[n])
        assert moved == (".last_layer." not in n), n


def test_optimizer_state_by_name_round_trip():
    model = vits_student()
    opt = build_optimizer(model.named_parameters(), 12, 0.9, 0.2, (0.9, 0.999), torch.device("cpu"))
    head = model.dino_head
    head(torch.randn(2, 48)).sum().backward()
    opt.step()
    saved = optimizer_state_by_name(opt)
    assert "dino_head.mlp.0.weight" in saved["state"]
    opt2 = build_optimizer(model.named_parameters(), 12, 0.9, 0.2, (0.9, 0.999), torch.device("cpu"))
    load_optimizer_state_by_name(opt2, saved)
    p = head.mlp[0].weight
    assert torch.equal(opt2.state[p]["exp_avg"], opt.state[p]["exp_avg"])
