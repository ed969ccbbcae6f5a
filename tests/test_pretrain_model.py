"""Heads, attention kernels and the student/teacher model wrapper (dino_depth.md §1, §2, §16)."""

from __future__ import annotations

import pytest
import torch
from test_pretrain_utils import single_thread, tiny_config  # noqa: F401

from pretrain.heads import DINOHead
from pretrain.ssl_model import SSLModel, ema_update
from shared.vit import XFORMERS_AVAILABLE, create_vit


def test_dino_head_structure_and_parameter_count():
    with torch.device("meta"):
        head = DINOHead(384, 65536, nlayers=3, hidden_dim=2048, bottleneck_dim=256)
    assert sum(p.numel() for p in head.parameters()) == 22_352_128
    names = dict(head.named_parameters())
    assert names["last_layer.weight_g"].shape == (65536, 1) and names["last_layer.weight_g"].requires_grad
    assert "last_layer.weight_v" in names and not any("bias" in n for n in names if "last_layer" in n)


def test_dino_head_weight_norm_and_l2_bottleneck():
    torch.manual_seed(0)
    head = DINOHead(12, 20, nlayers=3, hidden_dim=16, bottleneck_dim=8)
    assert torch.equal(head.last_layer.weight_g, torch.ones(20, 1))
    w = head.last_layer.weight
    assert torch.allclose(w.norm(dim=1), torch.ones(20), atol=1e-6)
    x = torch.randn(5, 12) * 100
    logits = head(x)
    assert logits.shape == (5, 20) and logits.abs().max() <= 1.0 + 1e-5  # cosines: |g·v̂·x̂| ≤ g = 1
    logits.sum().backward()
    assert head.last_layer.weight_g.grad is not None
    with torch.no_grad():
        head.last_layer.weight_g.mul_(3)
        assert torch.allclose(head(x), 3 * logits, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(head(torch.zeros(2, 12))).all()  # half-precision normalisation eps


@pytest.mark.parametrize("masked", [False, True])
def test_sdpa_matches_naive_attention(masked):
    torch.manual_seed(0)
    kwargs = {"embed_dim": 48, "depth": 2, "num_heads": 2, "img_size": 56, "in_chans": 1, "layerscale": None}
    sdpa = create_vit("vit_small_patch14", attn_impl="sdpa", **kwargs).eval()
    naive = create_vit("vit_small_patch14", attn_impl="naive", **kwargs).eval()
    naive.load_state_dict(sdpa.state_dict())
    x = torch.rand(3, 1, 56, 56)
    masks = torch.rand(3, 16) < 0.4 if masked else None
    with torch.no_grad():
        a, b = sdpa(x, masks=masks), naive(x, masks=masks)
    for key in ("x_norm_clstoken", "x_norm_patchtokens", "x_prenorm"):
        assert torch.allclose(a[key], b[key], atol=1e-5), key


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and XFORMERS_AVAILABLE), reason="needs CUDA and xformers")
def test_xformers_matches_sdpa_on_gpu():
    torch.manual_seed(0)
    kwargs = {"embed_dim": 384, "depth": 2, "num_heads": 6, "in_chans": 1, "layerscale": None}
    sdpa = create_vit("vit_small_patch14", attn_impl="sdpa", **kwargs).cuda().eval()
    xf = create_vit("vit_small_patch14", attn_impl="xformers", **kwargs).cuda().eval()
    xf.load_state_dict(sdpa.state_dict())
    x = torch.rand(2, 1, 224, 224, device="cuda")
    with torch.no_grad():
        assert torch.allclose(sdpa(x)["x_norm_patchtokens"], xf(x)["x_norm_patchtokens"], atol=1e-4)


def test_ssl_model_shapes_shared_and_separate_heads(tmp_path):
    for separate in ("false", "true"):
        cfg = tiny_config(tmp_path, **{"ibot.separate_head": separate, "ibot.head_n_prototypes": 32})
        model = SSLModel(cfg.vit_config(), cfg)
        B = 3
        g = torch.rand(2 * B, 1, 56, 56)
        loc = torch.rand(8 * B, 1, 28, 28)
        masks = torch.zeros(2 * B, 16, dtype=torch.bool)
        masks[0, :5] = True
        masks[4, 3:6] = True
        idx = masks.flatten().nonzero().squeeze(1)
        out = model(g, loc, masks, idx)
        k_patch = 32 if separate == "true" else 64
        assert out["cls_logits"].shape == (10 * B, 64)
        assert out["patch_logits"].shape == (8, k_patch)
        assert out["cls_global"].shape == (2 * B, 48)
        t_cls, t_patch = model.teacher_logits(g, idx)
        assert t_cls.shape == (2 * B, 64) and t_patch.shape == (8, k_patch) and not t_cls.requires_grad


def test_ema_update():
    torch.manual_seed(0)
    student, teacher = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    expected = [0.9 * t.detach() + 0.1 * s.detach() for t, s in zip(teacher.parameters(), student.parameters())]
    ema_update(teacher, student, 0.9)
    for p, e in zip(teacher.parameters(), expected):
        assert torch.allclose(p, e, atol=1e-7)
