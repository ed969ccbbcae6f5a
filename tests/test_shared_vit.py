"""The shared ViT: architecture numbers, attention kernels, token assembly, weight conversion."""

import math

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from shared.checkpoint import CheckpointError
from shared.vit import (
    XFORMERS_AVAILABLE,
    ViTConfig,
    convert_state_dict,
    create_vit,
    infer_config_from_state_dict,
    load_backbone_weights,
    vit_from_config,
)


def tiny(**kw):
    base = dict(embed_dim=32, depth=2, num_heads=2, img_size=56, in_chans=1)
    base.update(kw)
    return create_vit("vit_small_patch14", **base).eval()


def test_vit_s14_one_channel_parameter_count_matches_spec():
    model = create_vit("vit_small_patch14", in_chans=1)
    assert sum(p.numel() for p in model.parameters()) == 21_478_656
    regs = create_vit("vit_small_patch14", in_chans=1, num_register_tokens=4)
    assert sum(p.numel() for p in regs.parameters()) == 21_478_656 + 1_536
    base = create_vit("vit_base_patch14", in_chans=3)
    assert base.embed_dim == 768 and len(base.blocks) == 12 and base.blocks[0].attn.num_heads == 12


def test_timm_registry_builds_the_same_architecture():
    model = timm.create_model("dinodepth_vit_small_patch14", in_chans=1, reg_tokens=4)
    assert isinstance(model, torch.nn.Module) and model.cfg.in_chans == 1 and model.num_register_tokens == 4
    with pytest.raises(ValueError, match="no download"):
        timm.create_model("dinodepth_vit_small_patch14", pretrained=True)


def test_sdpa_matches_naive_attention():
    torch.manual_seed(0)
    model = tiny()
    naive = tiny(attn_impl="naive")
    naive.load_state_dict(model.state_dict())
    x = torch.randn(3, 1, 56, 84)
    with torch.no_grad():
        a, b = model(x)["x_norm_patchtokens"], naive(x)["x_norm_patchtokens"]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not (XFORMERS_AVAILABLE and torch.cuda.is_available()), reason="xformers + CUDA only")
def test_xformers_matches_sdpa_on_gpu():
    model = tiny().cuda()
    xf = tiny(attn_impl="xformers").cuda()
    xf.load_state_dict(model.state_dict())
    x = torch.randn(2, 1, 56, 56, device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(model(x)["x_norm_patchtokens"], xf(x)["x_norm_patchtokens"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("size,grid", [((56, 56), (4, 4)), ((98, 98), (7, 7)), ((28, 70), (2, 5)), ((896, 896), (64, 64))])
def test_patch_tokens_for_any_size_divisible_by_14(size, grid):
    model = tiny(num_register_tokens=3)
    with torch.no_grad():
        tokens, g = model.get_patch_tokens(torch.randn(1, 1, *size))
        out = model(torch.randn(2, 1, *size))
    assert g == grid and tokens.shape == (1, grid[0] * grid[1], 32)
    assert out["x_norm_clstoken"].shape == (2, 32) and out["x_norm_regtokens"].shape == (2, 3, 32)
    assert out["x_prenorm"].shape == (2, 1 + 3 + grid[0] * grid[1], 32)


def test_bad_inputs_are_clear_errors():
    model = tiny()
    with pytest.raises(ValueError, match="not divisible by the patch size 14"):
        model(torch.randn(1, 1, 50, 56))
    with pytest.raises(ValueError, match="in_chans=1"):
        model(torch.randn(1, 3, 56, 56))
    with pytest.raises(ValueError, match="unknown ViT architecture"):
        create_vit("vit_huge_patch99")
    with pytest.raises(ValueError, match="unknown ViT config"):
        create_vit("vit_small_patch14", patchsize=16)


def test_positional_embedding_interpolation_modes():
    torch.manual_seed(0)
    plain = tiny()
    offset = tiny(interpolate_offset=0.1)
    offset.load_state_dict(plain.state_dict())
    with torch.no_grad():
        same_a = plain.interpolate_pos_encoding(4, 4, torch.float32)
        assert torch.equal(same_a, plain.pos_embed)  # stored grid: used as is
        a = plain.interpolate_pos_encoding(8, 6, torch.float32)
        b = offset.interpolate_pos_encoding(8, 6, torch.float32)
    assert a.shape == b.shape == (1, 1 + 48, 32)
    assert torch.equal(a[:, :1], plain.pos_embed[:, :1])  # cls entry unchanged
    assert not torch.allclose(a, b)  # the legacy offset samples other positions


def test_pos_cache_is_invalidated_when_weights_change():
    model = tiny()
    x = torch.randn(1, 1, 98, 98)
    with torch.no_grad():
        first = model(x)["x_norm_patchtokens"]
        new = tiny()
        torch.manual_seed(123)
        new.init_weights()
        model.load_state_dict(new.state_dict())
        second = model(x)["x_norm_patchtokens"]
        expected = new(x)["x_norm_patchtokens"]
    assert not torch.allclose(first, second)
    torch.testing.assert_close(second, expected)


def test_mask_token_replaces_masked_patches_before_positions():
    model = tiny()
    with torch.no_grad():
        model.mask_token.normal_()
        x = torch.randn(2, 1, 56, 56)
        masks = torch.zeros(2, 16, dtype=torch.bool)
        masks[0, 3] = True
        tokens, _ = model.prepare_tokens(x, masks)
        ref, _ = model.prepare_tokens(x)
    pos = model.pos_embed[0, 1 + 3]
    torch.testing.assert_close(tokens[0, 1 + 3], model.mask_token[0] + pos)
    torch.testing.assert_close(tokens[1], ref[1])
    torch.testing.assert_close(tokens[0, 1 + 4], ref[0, 1 + 4])


def test_drop_path_only_in_training():
    model = tiny(drop_path_rate=0.5)
    x = torch.randn(4, 1, 56, 56)
    with torch.no_grad():
        e1, e2 = model(x)["x_norm_clstoken"], model(x)["x_norm_clstoken"]
        model.train()
        torch.manual_seed(0)
        t1 = model(x)["x_norm_clstoken"]
        t2 = model(x)["x_norm_clstoken"]
    assert torch.equal(e1, e2) and not torch.allclose(t1, t2)


@pytest.mark.parametrize("registers", [0, 4])
def test_timm_dinov2_checkpoints_convert_to_identical_features(registers):
    """A timm DINOv2-style model (registers use timm's no_embed_class layout) gives the same features."""
    torch.manual_seed(0)
    ref = VisionTransformer(img_size=56, patch_size=14, in_chans=3, embed_dim=32, depth=2, num_heads=2,
                            init_values=1e-5, reg_tokens=registers, no_embed_class=bool(registers),
                            num_classes=0, global_pool="token").eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.02 * torch.randn_like(p))
    sd = ref.state_dict()
    cfg = infer_config_from_state_dict(sd)
    assert (cfg.embed_dim, cfg.depth, cfg.in_chans, cfg.num_register_tokens, cfg.img_size) == (32, 2, 3, registers, 56)
    ours = vit_from_config(cfg.replace(num_heads=2)).eval()
    load_backbone_weights(ours, sd, "timm checkpoint")
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        want = ref.forward_features(x)[:, ref.num_prefix_tokens:]
        got = ours.get_patch_tokens(x)[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_upstream_teacher_and_chunked_layouts_convert():
    model = tiny()
    sd = model.state_dict()
    chunked = {}
    for k, v in sd.items():
        if k.startswith("blocks."):
            i = int(k.split(".")[1])
            k = f"blocks.{i // 1}.{i}." + k.split(".", 2)[2]
        chunked[f"teacher.backbone.{k}"] = v
    chunked["teacher.dino_head.mlp.0.weight"] = torch.zeros(3)
    converted = convert_state_dict(chunked)
    assert set(converted) == set(sd)
    ddp = {f"module.{k}": v for k, v in sd.items()}
    assert set(convert_state_dict(ddp)) == set(sd)


def test_wrong_weights_give_a_key_level_error():
    model = tiny()
    other = create_vit("vit_small_patch14", embed_dim=32, depth=3, num_heads=2, img_size=56, in_chans=1)
    with pytest.raises(CheckpointError, match="unexpected keys"):
        load_backbone_weights(model, other.state_dict(), "other.pth")


def test_config_record_roundtrip():
    cfg = ViTConfig.from_arch("vit_base_patch14", in_chans=3, num_register_tokens=4, img_size=518,
                              interpolate_antialias=True)
    assert ViTConfig.from_dict(cfg.to_dict()) == cfg and cfg.grid_size == 37
    model = vit_from_config(cfg.to_dict())
    assert model.pos_embed.shape == (1, 1 + 37 * 37, 768)
    assert math.isclose(cfg.mlp_ratio, 4.0)


# -- xformers probe and fallback (issue 21 item 5), simulated on CPU ---------------------------------
@pytest.fixture
def xformers_on_cpu(monkeypatch):
    """Pretend xformers runs on CPU, with a fresh probe cache; yields a setter for its kernel."""
    import shared.vit as vit

    monkeypatch.setattr(vit, "_XFORMERS_DEVICES", ("cpu",))
    monkeypatch.setattr(vit, "_xformers_probes", {})
    monkeypatch.setattr(vit, "_xformers_warned", set())

    def set_kernel(kernel):
        monkeypatch.setattr(vit, "_xformers_attention", kernel)
        monkeypatch.setattr(vit, "XFORMERS_AVAILABLE", kernel is not None)

    return set_kernel


def _sdpa_in_xformers_layout(calls):
    def kernel(q, k, v):  # (B, N, H, D), as xformers.ops.memory_efficient_attention
        calls.append(q.shape)
        out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)
    return kernel


def test_auto_uses_xformers_only_when_the_probe_passes(xformers_on_cpu):
    torch.manual_seed(0)
    reference = tiny(attn_impl="sdpa")
    model = tiny()
    model.load_state_dict(reference.state_dict())
    x = torch.randn(2, 1, 56, 56)
    calls = []
    xformers_on_cpu(_sdpa_in_xformers_layout(calls))
    with torch.no_grad():
        out = model(x)["x_norm_patchtokens"]
    assert len(calls) == 1 + 2  # the probe, then one call per block
    torch.testing.assert_close(out, reference(x)["x_norm_patchtokens"])


def test_auto_falls_back_to_sdpa_when_xformers_is_broken(xformers_on_cpu):
    def broken(q, k, v):  # a build that imports but does not match torch: raises at the first call
        raise RuntimeError("No operator found for `memory_efficient_attention_forward`")

    xformers_on_cpu(broken)
    torch.manual_seed(0)
    reference = tiny(attn_impl="sdpa")
    model = tiny()
    model.load_state_dict(reference.state_dict())
    x = torch.randn(2, 1, 56, 56)
    with pytest.warns(RuntimeWarning, match="not usable.*No operator found"), torch.no_grad():
        out = model(x)["x_norm_patchtokens"]
    torch.testing.assert_close(out, reference(x)["x_norm_patchtokens"])


def test_model_recorded_with_xformers_runs_where_it_is_missing(xformers_on_cpu):
    """An export trained with attn_impl=xformers loads and runs without it: SDPA, with a warning."""
    xformers_on_cpu(None)
    torch.manual_seed(0)
    reference = tiny(attn_impl="sdpa")
    recorded = vit_from_config(reference.cfg.replace(attn_impl="xformers")).eval()
    recorded.load_state_dict(reference.state_dict())
    x = torch.randn(1, 1, 56, 56)
    with pytest.warns(RuntimeWarning, match="xformers is not installed: falling back to SDPA"), torch.no_grad():
        out = recorded(x)["x_norm_patchtokens"]
    torch.testing.assert_close(out, reference(x)["x_norm_patchtokens"])


# -- deterministic positional-embedding interpolation (issue 21 item 3) ------------------------------
@pytest.mark.parametrize("kw", [{}, {"interpolate_offset": 0.1}, {"interpolate_antialias": True}],
                         ids=["default", "offset", "antialias"])
def test_matmul_pos_interpolation_matches_bicubic(kw):
    model = tiny(**kw)
    for hw in ((2, 2), (3, 5), (8, 6)):
        with torch.no_grad():
            bicubic = model.interpolate_pos_encoding(*hw, torch.float32)
            model.pos_interpolation = "matmul"
            matmul = model.interpolate_pos_encoding(*hw, torch.float32)
            model.pos_interpolation = "auto"
        assert bicubic.shape == matmul.shape
        torch.testing.assert_close(matmul, bicubic, atol=2e-7, rtol=1e-5)


def test_default_pos_interpolation_is_still_f_interpolate():
    model = tiny()
    g = model.cfg.grid_size
    patch = model.pos_embed[:, 1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
    with torch.no_grad():
        expected = torch.nn.functional.interpolate(patch, size=(3, 5), mode="bicubic", align_corners=False)
        got = model.interpolate_pos_encoding(3, 5, torch.float32)[:, 1:]
    assert torch.equal(got, expected.permute(0, 2, 3, 1).reshape(1, 15, -1))


def test_deterministic_mode_interpolates_with_a_matmul_and_same_gradients():
    torch.manual_seed(0)
    model = tiny().train()
    x = torch.randn(2, 1, 28, 42)  # a local-crop-like size: the embedding is interpolated
    model(x)["x_norm_clstoken"].sum().backward()
    reference_grad = model.pos_embed.grad.clone()
    model.zero_grad()
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        model(x)["x_norm_clstoken"].sum().backward()
    finally:
        torch.use_deterministic_algorithms(previous)
    assert model._interp_matrices  # the matmul path ran
    torch.testing.assert_close(model.pos_embed.grad, reference_grad, atol=1e-6, rtol=1e-4)
    with pytest.raises(ValueError, match="pos_interpolation"):
        model.pos_interpolation = "nearest"
        model(x)
