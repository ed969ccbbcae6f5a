"""Spatial-only depth augmentation (dino_depth.md §8, §16) and the image-mode path."""

from __future__ import annotations

import numpy as np
import pytest
from test_pretrain_utils import single_thread, synthetic_depth  # noqa: F401

from pretrain.augment import (
    CropParams,
    depth_multicrop,
    image_multicrop,
    image_to_float,
    make_crop,
    sample_crop_params,
    sample_rrc_window,
    warp_crop,
)
from pretrain.config import AugConfig, CropsConfig, ImageAugConfig
from shared.depth import normalize_depth

EPS = 0.1


def normalized(seed: int = 0):
    x, valid, degenerate = normalize_depth(synthetic_depth(seed), "metric_z", eps=EPS)
    assert not degenerate
    return x, valid


def test_values_stay_in_zero_or_eps_to_one_and_invalid_is_zero():
    crops = CropsConfig(global_crops_size=56, local_crops_size=28, local_crops_number=4)
    for seed in range(6):
        x, valid = normalized(seed)
        out = depth_multicrop(x, valid, crops, AugConfig(), np.random.default_rng(seed))
        for values, ok in ((out.global_crops, out.global_valid), (out.local_crops, out.local_valid)):
            v = values[:, 0]
            assert values.dtype == np.float32
            assert np.all((v == 0) | ((v >= EPS) & (v <= 1.0)))
            assert np.all(v[~ok] == 0) and np.all(v[ok] >= EPS)
        assert out.global_crops.shape == (2, 1, 56, 56) and out.local_crops.shape == (4, 1, 28, 28)


def test_rot90_is_exact():
    x, valid = normalized(1)
    values = x[None]
    # Quarter turns permute the output grid after the flips: clockwise on the un-flipped crop, and
    # (mirror) counter-clockwise when exactly one flip is applied.
    for hflip, vflip, direction in ((False, False, -1), (True, False, 1), (False, True, 1), (True, True, -1)):
        base = CropParams(cy=40.0, cx=50.0, h=48.0, w=60.0, hflip=hflip, vflip=vflip)
        ref, ref_valid = warp_crop(values, valid, base, 32)
        for k in (1, 2, 3):
            params = CropParams(base.cy, base.cx, base.h, base.w, rot90_k=k, hflip=hflip, vflip=vflip)
            out, out_valid = warp_crop(values, valid, params, 32)
            assert np.array_equal(out[0], np.rot90(ref[0], direction * k))
            assert np.array_equal(out_valid, np.rot90(ref_valid, direction * k))


def test_rot90_option_samples_quarter_turns_without_fill():
    aug = AugConfig(rot_p=1.0, rot90=True)
    rng = np.random.default_rng(0)
    full = np.ones((1, 50, 70), np.float32)
    for _ in range(30):
        params = sample_crop_params(50, 70, (0.3, 1.0), aug, rng)
        assert params.angle_deg == 0.0 and params.rot90_k in (1, 2, 3)
        _, ok = warp_crop(full, np.ones((50, 70), bool), params, 28)
        assert ok.all()


def test_shrink_never_fills():
    aug = AugConfig(rot_p=1.0, rot_fill="shrink", rot_max_deg=180)
    rng = np.random.default_rng(1)
    H, W = 60, 90
    full_valid = np.ones((H, W), bool)
    values = np.full((1, H, W), 0.5, np.float32)
    for scale in ((0.32, 1.0), (0.05, 0.32)):
        for _ in range(40):
            params = sample_crop_params(H, W, scale, aug, rng)
            out, ok = warp_crop(values, full_valid, params, 28)
            assert ok.all() and np.all(out == 0.5)


def test_invalid_fill_marks_outside_as_invalid():
    aug = AugConfig(rot_p=1.0, rot_fill="invalid")
    H, W = 60, 90
    values = np.full((1, H, W), 0.5, np.float32)
    rng = np.random.default_rng(2)
    filled = 0
    for _ in range(20):
        params = sample_crop_params(H, W, (0.8, 1.0), aug, rng)
        out, ok = warp_crop(values, np.ones((H, W), bool), params, 28)
        assert np.all(out[0][~ok] == 0) and np.all(out[0][ok] == 0.5)
        filled += int((~ok).sum())
    assert filled > 0  # large rotated windows do leave the map


def test_identity_warp_is_exact_and_propagates_validity():
    x, valid = normalized(2)
    H, W = x.shape
    side = min(H, W)
    crop = x[:side, :side]
    crop_valid = valid[:side, :side]
    params = CropParams(cy=side / 2, cx=side / 2, h=side, w=side)
    for interp in ("masked_bilinear", "nearest"):
        out, ok = warp_crop(x[None], valid, params, side, interp)
        assert np.array_equal(ok, crop_valid)
        assert np.array_equal(out[0], np.where(crop_valid, crop, 0))


def test_masked_bilinear_never_mixes_across_depth_edges_or_with_invalid():
    H, W = 40, 40
    values = np.full((1, H, W), 0.2, np.float32)
    values[:, :, 20:] = 0.9  # a 0.7 step: > edge_thresh
    valid = np.ones((H, W), bool)
    valid[10:20, 5:15] = False
    values[:, ~valid] = 0.0
    aug = AugConfig(rot_p=1.0)
    rng = np.random.default_rng(3)
    for _ in range(30):
        params = sample_crop_params(H, W, (0.1, 1.0), aug, rng)
        out, ok = warp_crop(values, valid, params, 33)
        assert set(np.unique(out[0][ok]).tolist()) <= {np.float32(0.2), np.float32(0.9)}
        assert np.all(out[0][~ok] == 0)
    # A smooth ramp (neighbour span < edge_thresh) is interpolated: values stay inside the ramp.
    ramp = np.broadcast_to(np.linspace(0.3, 0.4, W, dtype=np.float32), (H, W))[None].copy()
    out, ok = warp_crop(ramp, np.ones((H, W), bool), CropParams(20.0, 20.0, 30.0, 30.0, angle_deg=33.0), 45)
    v = out[0][ok]
    assert len(np.unique(v)) > W and v.min() >= 0.3 and v.max() <= 0.4


def test_rrc_windows_follow_scale_and_ratio():
    rng = np.random.default_rng(4)
    H, W = 120, 160
    for _ in range(200):
        cy, cx, h, w = sample_rrc_window(H, W, (0.05, 0.32), (3 / 4, 4 / 3), rng)
        assert 0 <= cy - h / 2 and cy + h / 2 <= H and 0 <= cx - w / 2 and cx + w / 2 <= W
        assert 0.04 <= h * w / (H * W) <= 0.34
        assert 0.7 <= w / h <= 1.4


def test_min_crop_valid_redraws():
    H, W = 80, 80
    values = np.zeros((1, H, W), np.float32)
    valid = np.zeros((H, W), bool)
    valid[:8, :8] = True  # 1 % valid, in one corner
    values[0, valid] = 0.5
    aug = AugConfig(rot_p=0.0, min_crop_valid=0.5)
    crop, _, _ = make_crop(values, valid, 16, (0.01, 0.02), aug, np.random.default_rng(0), "masked_bilinear", 0.05)
    assert crop.shape == (1, 16, 16)  # accepted after ≤ 10 tries even if never valid enough


def test_crops_are_deterministic_given_the_generator():
    x, valid = normalized(5)
    crops = CropsConfig(global_crops_size=28, local_crops_size=14, local_crops_number=2)
    a = depth_multicrop(x, valid, crops, AugConfig(), np.random.default_rng(42))
    b = depth_multicrop(x, valid, crops, AugConfig(), np.random.default_rng(42))
    assert np.array_equal(a.global_crops, b.global_crops) and np.array_equal(a.local_crops, b.local_crops)


@pytest.mark.parametrize("in_chans", [1, 3])
def test_image_mode_photometric_path(in_chans):
    rng = np.random.default_rng(0)
    image = (rng.random((70, 90, 3)) * 255).astype(np.uint8)
    x = image_to_float(image, in_chans, max_normalize=True)
    assert x.shape == (in_chans, 70, 90) and x.max() == pytest.approx(1.0)
    cfg = ImageAugConfig(mean=[0.5], std=[0.25])
    crops = CropsConfig(global_crops_size=28, local_crops_size=14, local_crops_number=3)
    out = image_multicrop(x, crops, AugConfig(), cfg, np.random.default_rng(1))
    assert out.global_crops.shape == (2, in_chans, 28, 28) and out.local_crops.shape == (3, in_chans, 14, 14)
    assert np.isfinite(out.global_crops).all()
    lo, hi = (0 - 0.5) / 0.25, (1 - 0.5) / 0.25
    assert out.global_crops.min() >= lo - 1e-5 and out.global_crops.max() <= hi + 1e-5
