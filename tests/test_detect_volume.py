"""Back-projection, voxelisation and voxel max-aggregation (modmap.md §12)."""

import numpy as np
import pytest

from detect.volume import (
    SparseVolume,
    ViewCalibration,
    VolumeAccumulator,
    bounding_grid,
    resample_to_grid,
    scatter_max_runs,
    voxel_indices,
)
from shared.geometry import VoxelGrid, backproject_depth, look_at_c2w


def _camera(h=24, w=32, f=40.0):
    K = np.array([[f, 0, (w - 1) / 2], [0, f, (h - 1) / 2], [0, 0, 1.0]])
    T = look_at_c2w(np.array([0.3, -0.2, 0.5]), np.zeros(3))
    return K, T


def _wavy_depth(h=24, w=32, seed=0):
    rng = np.random.default_rng(seed)
    v, u = np.mgrid[0:h, 0:w]
    depth = (0.6 + 0.02 * np.sin(u / 3.0) + 0.01 * np.cos(v / 2.0)).astype(np.float32)
    depth[rng.random((h, w)) < 0.1] = np.nan
    return depth


def test_single_pixel_lands_in_its_voxel():
    K, T = _camera()
    depth = _wavy_depth()
    calib = ViewCalibration(K, T)
    pts, pix = backproject_depth(depth, K, T)  # independent implementation (shared.geometry)
    grid = VoxelGrid.bounding(pts, 0.004, margin_voxels=1)
    r, c = 10, 17
    score = np.zeros_like(depth)
    score[r, c] = 0.7
    acc = VolumeAccumulator(grid)
    acc.add_view(depth, calib, score, np.ones(depth.shape, bool))
    expected, inside = grid.index(pts[(pix[:, 0] == r) & (pix[:, 1] == c)])
    assert inside.all()
    vol = acc.volume()
    assert np.argwhere(vol > 0).tolist() == expected.tolist()
    assert vol[tuple(expected[0])] == np.float32(0.7)
    assert acc.instance_score() == pytest.approx(0.7)


@pytest.mark.parametrize("depth_type", ["z", "range"])
def test_voxel_max_equals_brute_force_loop(depth_type):
    K, T = _camera()
    z = _wavy_depth(seed=1)
    pts, pix = backproject_depth(z, K, T)
    if depth_type == "range":  # the same surface stored as ray lengths
        rays = np.stack(np.meshgrid(np.arange(32.0), np.arange(24.0)), -1)
        rays = np.concatenate([rays, np.ones((24, 32, 1))], -1) @ np.linalg.inv(K).T
        depth = (z * np.linalg.norm(rays, axis=-1)).astype(np.float64)
    else:
        depth = z
    grid = VoxelGrid(origin=pts.min(0) + 0.01, voxel_size=0.003, shape=(12, 10, 9))  # some points fall outside
    rng = np.random.default_rng(2)
    score = rng.random(z.shape).astype(np.float32)
    fg = rng.random(z.shape) < 0.8
    acc = VolumeAccumulator(grid)
    acc.add_view(depth, ViewCalibration(K, T, depth_type=depth_type), score, fg)
    brute = np.zeros(grid.shape, np.float32)
    occ = np.zeros(grid.shape, bool)
    dropped = 0
    for (r, c), p in zip(pix, pts):
        idx = np.floor((p - grid.origin) / grid.voxel_size).astype(int)
        ok = np.all(idx >= 0) and np.all(idx < grid.shape)
        if ok:
            occ[tuple(idx)] = True
        if not fg[r, c]:
            continue
        if not ok:
            dropped += 1
            continue
        brute[tuple(idx)] = max(brute[tuple(idx)], score[r, c])
    assert np.array_equal(acc.volume(), brute)
    assert np.array_equal(acc.occupancy(), occ)
    assert acc.dropped == dropped and dropped > 0


def test_scatter_max_runs_matches_maximum_at():
    rng = np.random.default_rng(0)
    idx = np.repeat(rng.integers(0, 50, 300), rng.integers(1, 6, 300))
    vals = rng.random(idx.size).astype(np.float32)
    a = np.zeros(50, np.float32)
    b = np.zeros(50, np.float32)
    scatter_max_runs(a, idx, vals)
    np.maximum.at(b, idx, vals)
    assert np.array_equal(a, b)


def test_stride_and_mask_select_pixels():
    K, T = _camera()
    depth = _wavy_depth()
    grid = bounding_grid([(depth, ViewCalibration(K, T))], 0.002)
    _, inside, flat = voxel_indices(depth, ViewCalibration(K, T), grid, stride=2)
    assert inside.all()
    rows, cols = np.divmod(flat, depth.shape[1])
    assert np.all(rows % 2 == 0) and np.all(cols % 2 == 0)


def test_bounding_grid_contains_every_point_and_is_aligned():
    K, T = _camera()
    depth = _wavy_depth()
    grid = bounding_grid([(depth, ViewCalibration(K, T))], 0.002)
    pts, _ = backproject_depth(depth, K, T)
    _, inside = grid.index(pts)
    assert inside.all()
    assert np.allclose(grid.origin / 0.002, np.round(grid.origin / 0.002))


def test_npz_roundtrip_and_resampling(tmp_path):
    grid = VoxelGrid(origin=np.zeros(3), voxel_size=0.01, shape=(4, 5, 6))
    acc = VolumeAccumulator(grid)
    acc.scores[[3, 50, 77]] = [0.5, 0.25, 1.0]
    acc.hit[[3, 50, 77]] = True
    acc.occupied[[3, 50, 77, 80]] = True
    path = acc.save_npz(tmp_path / "v.npz", label=np.int64(1))
    vol = SparseVolume.load(path)
    assert np.array_equal(vol.dense(), acc.volume())
    assert np.array_equal(vol.occupancy(), acc.occupancy())
    assert int(vol.meta["label"]) == 1
    # same grid: identity; a coarser grid: max over the voxels whose centres fall inside
    assert np.array_equal(resample_to_grid(vol.dense(), grid, grid), vol.dense())
    coarse = VoxelGrid(origin=np.zeros(3), voxel_size=0.02, shape=(2, 3, 3))
    out = resample_to_grid(vol.dense(), grid, coarse)
    assert out.max() == 1.0 and out.sum() == pytest.approx(1.75)
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        SparseVolume.load(tmp_path / "missing.npz")


@pytest.fixture(scope="module")
def tiny_benchmark(tmp_path_factory):
    from data_prep.synthetic import SynthConfig, generate_benchmark

    root = tmp_path_factory.mktemp("synth")
    generate_benchmark(root, SynthConfig(classes=("vase",), n_views=4, width=64, height=48, n_test=2,
                                         setups=("real2real",)), progress=False)
    return root


def test_synthetic_instance_projects_onto_its_gt_surface(tiny_benchmark):
    from detect.data.sim3d import SiM3DClass

    ds = SiM3DClass(tiny_benchmark, "vase")
    record = next(r for r in ds.test_records if r.label == 1)
    gt = ds.load_gt(record)
    acc = VolumeAccumulator(gt.grid)
    for i in range(ds.n_views):
        v = ds.load_view(record, i)
        score = np.zeros(v.depth.shape, np.float32)
        if v.mask is not None:
            score[v.mask] = 1.0  # the 2D GT of this view
        acc.add_view(v.depth, v.calib, score, None)
    occupied = acc.occupancy()
    # known surface points (every valid depth pixel) land on the GT object surface (±1 voxel)
    from scipy import ndimage

    near_surface = ndimage.binary_dilation(gt.occupancy, np.ones((3, 3, 3), bool))
    assert occupied.sum() > 50
    assert (occupied & near_surface).sum() / occupied.sum() > 0.97
    assert acc.dropped == 0
    # the 2D GT masks, back-projected, hit the anomalous GT voxels
    hit = acc.volume() > 0
    if hit.any():
        near_anomaly = ndimage.binary_dilation(gt.labels, np.ones((3, 3, 3), bool), iterations=2)
        assert (hit & near_anomaly).sum() / hit.sum() > 0.9


def test_add_points_scatters_into_the_plain_tier():
    """Scores moved to other 3D points (detect.geometry.see_through: a hole's rim) land in those points' voxels
    as maxima, points outside the grid are counted as dropped, and occupancy stays the views'."""
    grid = VoxelGrid(np.zeros(3), 0.01, (4, 4, 4))
    acc = VolumeAccumulator(grid)
    acc.add_points(np.array([[0.015, 0.005, 0.035], [0.019, 0.001, 0.031], [0.5, 0.0, 0.0]]),
                   np.array([0.3, 0.6, 0.9], np.float32))
    vol = acc.volume()
    assert vol[1, 0, 3] == np.float32(0.6) and np.count_nonzero(vol) == 1
    assert acc.dropped == 1 and not acc.occupied.any()
    with pytest.raises(ValueError, match="2 points but 1 scores"):
        acc.add_points(np.zeros((2, 3)), np.zeros(1))
    with pytest.raises(ValueError, match="needs view_aggregation 'max' or 'second'"):
        VolumeAccumulator(grid, "mean").add_points(np.zeros((1, 3)), np.zeros(1))
