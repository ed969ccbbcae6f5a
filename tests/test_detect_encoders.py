"""Encoder loading in every common form, HF/timm parity, token-grid checks (modmap.md §3)."""

import numpy as np
import pytest
import torch

from detect.encoders import (
    EncoderError,
    EncoderInfo,
    FrozenEncoder,
    check_token_grids,
    load_depth_encoder,
    load_image_encoder,
    resample_tokens,
)
from shared.vit import create_vit


def _perturb(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)


@pytest.mark.parametrize("registers", [0, 4])
def test_hugging_face_folder_matches_transformers(tmp_path, registers):
    import transformers

    common = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 70, "patch_size": 14}
    if registers:
        hf = transformers.Dinov2WithRegistersModel(
            transformers.Dinov2WithRegistersConfig(num_register_tokens=registers, **common))
    else:
        hf = transformers.Dinov2Model(transformers.Dinov2Config(**common))
    _perturb(hf)
    hf.eval()
    hf.save_pretrained(tmp_path)
    enc = load_image_encoder("auto", tmp_path)
    # checkpoints written by transformers < 5 (e.g. the hub's facebook/dinov2-*) use the older names
    old_names = {".attention.q_proj.": ".attention.attention.query.", ".attention.k_proj.": ".attention.attention.key.",
                 ".attention.v_proj.": ".attention.attention.value.", ".attention.o_proj.": ".attention.output.dense."}
    legacy = {}
    for key, value in hf.state_dict().items():
        for new, old in old_names.items():
            key = key.replace(new, old)
        legacy[key] = value
    legacy_dir = tmp_path / "legacy"
    legacy_dir.mkdir()
    (legacy_dir / "config.json").write_text((tmp_path / "config.json").read_text())
    torch.save(legacy, legacy_dir / "pytorch_model.bin")
    enc_legacy = load_image_encoder("auto", legacy_dir)
    for a, b in zip(enc.state_dict().values(), enc_legacy.state_dict().values()):
        assert torch.equal(a, b)
    assert enc.backbone.cfg.num_register_tokens == registers
    assert enc.backbone.cfg.num_heads == 4
    torch.manual_seed(0)
    for size in (70, 112):
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            ref = hf(pixel_values=x).last_hidden_state[:, 1 + registers:]
        ours, grid = enc(x)
        assert grid == (size // 14, size // 14)
        if registers or size == 70:
            # native grid, or the register model's interpolation (offset 0 + antialias): identical
            assert (ours - ref).abs().max() < 1e-5
        else:
            # plain model at another size: we keep the official DINOv2 hub interpolation (offset 0.1),
            # transformers resizes to the exact size; with offset 0 the two agree again
            assert (ours - ref).abs().max() > 1e-5
            enc.backbone.cfg.interpolate_offset = 0.0
            enc.backbone._pos_cache.clear()
            ours0, _ = enc(x)
            enc.backbone.cfg.interpolate_offset = 0.1
            assert (ours0 - ref).abs().max() < 1e-5


@pytest.mark.parametrize("name", ["vit_small_patch14_reg4_dinov2", "vit_small_patch14_dinov2"])
def test_timm_checkpoint_matches_timm(tmp_path, name):
    import timm

    model = timm.create_model(name, pretrained=False, img_size=70, depth=2)
    _perturb(model, 1)
    model.eval()
    torch.save(model.state_dict(), tmp_path / "timm.pth")
    enc = load_image_encoder("auto", tmp_path / "timm.pth")
    x = torch.randn(1, 3, 70, 70)
    with torch.no_grad():
        ref = model.forward_features(x)[:, model.num_prefix_tokens:]
    ours, _ = enc(x)
    assert (ours - ref).abs().max() < 1e-5


def test_official_state_dict_and_safetensors(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    vit = create_vit("vit_tiny_patch14", in_chans=3, depth=2, img_size=70, num_register_tokens=4)
    _perturb(vit)
    sd = vit.state_dict()
    torch.save(sd, tmp_path / "official.pth")
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "w.safetensors")
    x = torch.randn(1, 3, 70, 70)
    a, _ = load_image_encoder("auto", tmp_path / "official.pth")(x)
    b, _ = load_image_encoder("auto", tmp_path / "w.safetensors")(x)
    with torch.no_grad():
        ref, _ = vit.eval().get_patch_tokens(x)
    assert torch.equal(a, b) and (a - ref).abs().max() < 1e-6
    enc = load_image_encoder("auto", tmp_path / "official.pth")
    assert enc.backbone.cfg.interpolate_offset == 0.0 and enc.backbone.cfg.interpolate_antialias
    assert not any(p.requires_grad for p in enc.parameters()) and not enc.training
    enc.train()
    assert not enc.backbone.training  # frozen encoders stay in eval mode


def test_named_encoder_checks_the_architecture(tmp_path):
    vit = create_vit("vit_tiny_patch14", in_chans=3, depth=1, img_size=70)
    torch.save(vit.state_dict(), tmp_path / "tiny.pth")
    with pytest.raises(EncoderError, match="ViT-B/14"):
        load_image_encoder("dinov2_vitb14_reg4", tmp_path / "tiny.pth")
    plain = load_image_encoder("auto", tmp_path / "tiny.pth")
    assert plain.backbone.cfg.interpolate_offset == 0.1 and not plain.backbone.cfg.interpolate_antialias


def test_missing_image_weights_explain_how_to_provide_them(tmp_path):
    with pytest.raises(EncoderError, match="--image-encoder-weights"):
        load_image_encoder("dinov2_vitb14_reg4", None)
    with pytest.raises(EncoderError, match="does-not-exist.pth"):
        load_image_encoder("dinov2_vitb14_reg4", tmp_path / "does-not-exist.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(EncoderError, match="junk.pth"):
        load_image_encoder("auto", tmp_path / "junk.pth")


def _export_depth(path, **overrides):
    from pretrain.export import default_depth_input_norm, write_export

    torch.manual_seed(0)
    vit = create_vit("vit_tiny_patch14", **{"in_chans": 1, "depth": 1, **overrides})
    write_export(path, vit.state_dict(), vit.cfg.to_dict(), default_depth_input_norm(), {}, safetensors=False)
    return path


def test_depth_encoder_from_export(tmp_path):
    enc = load_depth_encoder(_export_depth(tmp_path / "dd.pth"))
    assert enc.in_chans == 1 and enc.info.input_norm["mode"] == "nearness"
    tokens, grid = enc(torch.rand(1, 1, 56, 56))
    assert tokens.shape == (1, 16, 192) and grid == (4, 4)


def test_depth_encoder_errors_name_the_expected_architecture(tmp_path):
    with pytest.raises(EncoderError, match="ViT-S/14"):
        load_depth_encoder(tmp_path / "missing.pth")
    with pytest.raises(EncoderError, match="--ckpt"):
        load_depth_encoder(None)
    with pytest.raises(EncoderError, match="1"):
        load_depth_encoder(_export_depth(tmp_path / "rgb.pth", in_chans=3))
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(EncoderError, match="ViT-S/14"):
        load_depth_encoder(tmp_path / "other.pth")


def _frozen(patch: int, in_chans: int = 1) -> FrozenEncoder:
    vit = create_vit("vit_tiny_patch14", in_chans=in_chans, depth=1, patch_size=patch)
    return FrozenEncoder(vit, EncoderInfo(f"p{patch}", "random", "0"))


def test_token_grid_mismatch_is_refused_with_a_fix():
    img, dep16 = _frozen(14, 3), _frozen(16)
    assert check_token_grids(img, _frozen(14), 112, 112) == (8, 8)
    with pytest.raises(EncoderError, match=r"8×8.*7×7.*--depth-input-size 128"):
        check_token_grids(img, dep16, 112, 112)
    assert check_token_grids(img, dep16, 112, 128) == (8, 8)  # 128 / 16 = 8
    assert check_token_grids(img, dep16, 112, 112, "bilinear") == (8, 8)
    with pytest.raises(EncoderError, match="multiple"):
        check_token_grids(img, _frozen(14), 100, 100)


def test_resample_tokens_bilinear():
    t = torch.arange(2 * 49 * 3, dtype=torch.float32).reshape(2, 49, 3)
    out = resample_tokens(t, (7, 7), (8, 8))
    assert out.shape == (2, 64, 3)
    assert torch.equal(resample_tokens(t, (7, 7), (7, 7)), t)


def test_random_encoder_is_marked_and_seeded():
    a = load_image_encoder("random", random_arch="vit_tiny_patch14", random_overrides={"depth": 1}, seed=3)
    b = load_image_encoder("random", random_arch="vit_tiny_patch14", random_overrides={"depth": 1}, seed=3)
    assert a.info.random and a.info.sha256 == b.info.sha256
    x = torch.rand(1, 3, 28, 28)
    assert np.array_equal(a(x)[0].numpy(), b(x)[0].numpy())
