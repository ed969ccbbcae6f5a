"""Canonical depth normalisation and NaN-aware downsampling (data_formats.md §9, §10)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.depth import (
    DepthNormConfig,
    downsample_depth,
    max_normalize,
    normalize_depth,
    rescale_intrinsics,
    target_size,
    valid_mask,
)


def _random_depth(seed: int, shape=(40, 50), holes: float = 0.2) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    depth = (0.5 + 0.001 * xx + 0.002 * yy + 0.01 * rng.standard_normal(shape)).astype(np.float32)
    depth[rng.random(shape) < holes] = np.nan
    return depth


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), scale=st.floats(1e-3, 1e3), shift_factor=st.floats(-20, 20))
def test_disparity_is_invariant_to_unknown_scale_and_shift(seed, scale, shift_factor):
    # The shift is bounded relative to the scale only so that float32 can still resolve the map.
    shift = shift_factor * scale
    disp = _random_depth(seed)
    x1, v1, d1 = normalize_depth(disp, "rel_disparity")
    x2, v2, d2 = normalize_depth((disp.astype(np.float64) * scale + shift).astype(np.float32), "rel_disparity")
    assert not d1 and not d2
    np.testing.assert_array_equal(v1, v2)
    np.testing.assert_allclose(x1, x2, atol=2e-4)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), eps=st.floats(0.0, 0.5), holes=st.floats(0.0, 0.9))
def test_output_range_and_invalid_pixels_exactly_zero(seed, eps, holes):
    depth = _random_depth(seed, holes=holes)
    depth[0, 0] = 0.0  # metric z == 0 is invalid too
    depth[0, 1] = np.inf
    x, valid, degenerate = normalize_depth(depth, "metric_z", eps=eps)
    assert x.dtype == np.float32
    assert np.all(x[~valid] == 0.0)
    assert not valid[0, 0] and not valid[0, 1]
    if not degenerate:
        assert x[valid].min() >= eps - 1e-6 and x[valid].max() <= 1.0 + 1e-6
    assert np.all((x >= 0) & (x <= 1))


def test_metric_near_is_one_and_units_do_not_matter():
    depth = _random_depth(3, holes=0.0)
    x_m, _, _ = normalize_depth(depth, "metric_z")
    x_mm, _, _ = normalize_depth(depth * 1000.0, "metric_z")
    np.testing.assert_allclose(x_m, x_mm, atol=1e-5)
    # smallest z (nearest) maps to 1, largest to eps
    assert x_m.flat[np.argmin(depth)] == pytest.approx(1.0)
    assert x_m.flat[np.argmax(depth)] == pytest.approx(0.1)


def test_metric_and_disparity_agree_to_first_order_for_close_range_scenes():
    z = 0.6 + 0.01 * _random_depth(7, holes=0.0)  # small range relative to the distance
    x_z, _, _ = normalize_depth(z, "metric_z")
    x_d, _, _ = normalize_depth(1.0 / z, "rel_disparity")
    assert np.abs(x_z - x_d).max() < 0.02


def test_percentile_clipping_ignores_outliers():
    depth = np.full((20, 20), 1.0, np.float32) + np.linspace(0, 0.1, 400, dtype=np.float32).reshape(20, 20)
    depth[0, 0] = 100.0  # far outlier
    x, _, _ = normalize_depth(depth, "metric_z")
    assert x[0, 0] == pytest.approx(0.1)  # clipped to eps, does not squash the others
    assert x[10, 10] > 0.4


def test_degenerate_maps_are_flagged():
    few = np.full((10, 10), np.nan, np.float32)
    few[0, :5] = 1.0
    x, valid, degenerate = normalize_depth(few, "metric_z")
    assert degenerate and valid.sum() == 5 and np.all(x[valid] == 1.0) and np.all(x[~valid] == 0)
    flat = np.full((10, 10), 2.0, np.float32)
    x, valid, degenerate = normalize_depth(flat, "metric_z")
    assert degenerate and np.all(x == 1.0)
    empty = np.full((4, 4), np.nan, np.float32)
    x, valid, degenerate = normalize_depth(empty, "rel_disparity")
    assert degenerate and not valid.any() and np.all(x == 0)


def test_max_mode_parity_convention():
    depth = np.array([[1.0, 2.0], [np.nan, 4.0]] * 8, np.float32)
    x, valid, degenerate = normalize_depth(depth, "metric_z", mode="max")
    assert not degenerate
    np.testing.assert_allclose(x[0], [0.25, 0.5])
    assert x[1, 0] == 0 and x[1, 1] == 1.0
    np.testing.assert_allclose(max_normalize(np.array([[0.0, 2.0], [1.0, 4.0]])), [[0, 0.5], [0.25, 1]])


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="2-D"):
        normalize_depth(np.zeros((2, 2, 3), np.float32))
    with pytest.raises(ValueError, match="kind"):
        normalize_depth(np.zeros((2, 2), np.float32), "metres")
    with pytest.raises(ValueError, match="mode"):
        normalize_depth(np.zeros((2, 2), np.float32), mode="minmax")
    assert valid_mask(np.array([[np.nan, -1.0, 1.0]]), "rel_disparity").tolist() == [[False, True, True]]


def test_norm_config_roundtrip():
    cfg = DepthNormConfig(eps=0.2, pct=(1.0, 99.0))
    assert DepthNormConfig.from_dict(cfg.to_dict()) == cfg


# -- downsampling ---------------------------------------------------------------------------------
def _reference_downsample(depth, max_side, method, valid_frac_min):
    H, W = depth.shape
    h, w = target_size(H, W, max_side)
    out = np.full((h, w), np.nan, np.float32)
    for i in range(h):
        for j in range(w):
            if method == "nearest":
                out[i, j] = depth[int(np.floor((i + 0.5) * H / h)), int(np.floor((j + 0.5) * W / w))]
                continue
            r0, r1 = (i * H) // h, -(-(i + 1) * H // h)
            c0, c1 = (j * W) // w, -(-(j + 1) * W // w)
            block = depth[r0:r1, c0:c1]
            finite = block[np.isfinite(block)]
            if finite.size and finite.size / block.size >= valid_frac_min:
                out[i, j] = (np.sort(finite)[(finite.size - 1) // 2] if method == "nan_median"
                             else finite.astype(np.float64).mean())
    return out


@pytest.mark.parametrize("method", ["nan_median", "nan_mean", "nearest"])
@pytest.mark.parametrize("shape,max_side", [((37, 53), 16), ((64, 48), 20), ((30, 31), 29)])
def test_downsample_matches_reference_loops(method, shape, max_side):
    depth = _random_depth(11, shape=shape, holes=0.35)
    fast = downsample_depth(depth, max_side, method)
    ref = _reference_downsample(depth, max_side, method, 0.5)
    assert fast.shape == ref.shape == target_size(*shape, max_side)
    np.testing.assert_array_equal(np.isnan(fast), np.isnan(ref))
    np.testing.assert_allclose(fast[~np.isnan(fast)], ref[~np.isnan(ref)], rtol=1e-6)


def test_downsample_median_keeps_depth_edges_sharp():
    depth = np.full((100, 100), 1.0, np.float32)
    depth[:, 50:] = 2.0  # a step edge: foreground at 1, background at 2
    small = downsample_depth(depth, 33)
    assert set(np.unique(small)) <= {1.0, 2.0}  # never an in-between "flying pixel"


def test_downsample_small_maps_unchanged_and_size_rule():
    depth = _random_depth(1, shape=(20, 30))
    np.testing.assert_array_equal(downsample_depth(depth, 64), depth)
    assert target_size(3000, 4096, 1024) == (750, 1024)
    assert target_size(5, 5000, 10) == (1, 10)


def test_rescale_intrinsics_half_pixel_rule():
    K = np.array([[100.0, 0, 49.5], [0, 100.0, 29.5], [0, 0, 1]])
    K2 = rescale_intrinsics(K, 0.5, 0.5)
    # the image centre stays the image centre: (W-1)/2 of a 100-px image → of a 50-px image
    assert K2[0, 2] == pytest.approx(24.5) and K2[1, 2] == pytest.approx(14.5) and K2[0, 0] == 50.0


def test_stored_normalization_range_gives_the_same_map_bit_for_bit():
    """Shards store the percentiles (JSON round trip); normalising with them equals searching for them."""
    import json

    from shared.depth import normalization_range, normalize_depth, stored_valid_range

    rng = np.random.default_rng(3)
    for _ in range(40):
        h, w = int(rng.integers(4, 120)), int(rng.integers(4, 120))
        depth = rng.normal(0.5, 0.2, (h, w)).astype(np.float32)
        depth[rng.random((h, w)) < 0.2] = np.nan
        depth[rng.random((h, w)) < 0.05] = 0.0  # invalid for metric z
        for kind in ("metric_z", "rel_disparity"):
            meta = json.loads(json.dumps({"norm_range": normalization_range(depth, kind)}))
            ref = normalize_depth(depth, kind)
            rng_ = stored_valid_range(meta, (0.5, 99.5))
            if meta["norm_range"] is None:
                assert rng_ is None and int(np.count_nonzero(ref[1])) < 16
                continue
            got = normalize_depth(depth, kind, valid_range=rng_)
            assert got[0].tobytes() == ref[0].tobytes() and (got[1] == ref[1]).all() and got[2] == ref[2]
    # other percentiles, or older shards without the record: not used
    meta = {"norm_range": normalization_range(depth)}
    assert stored_valid_range(meta, (1.0, 99.0)) is None and stored_valid_range({}, (0.5, 99.5)) is None
