"""Metrics against the reference vectors of metrics.md §10 and brute-force definitions."""

import warnings

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from detect.metrics import (
    SegmentationAccumulator,
    area_under_curve,
    aupro,
    instance_auroc,
    pixel_auroc,
    pro_curve,
    segmentation_metrics,
    voxel_auroc,
)


def _column_case(columns):
    scores = (np.arange(2800) / 2800).reshape(400, 7)
    gt = np.zeros((400, 7))
    gt[:, columns] = 1
    return scores, gt


def test_anomalib_single_column():
    s, g = _column_case([3])
    assert aupro([s], [g], fpr_limit=1 / 3) == pytest.approx(0.1666656, abs=1e-6)
    assert aupro([s], [g], 1 / 3, pro_variant="sampled") == pytest.approx(0.1668495, abs=1e-6)


def test_anomalib_three_columns():
    s, g = _column_case([1, 3, 5])
    assert aupro([s], [g], fpr_limit=1 / 3) == pytest.approx(0.1666661, abs=1e-6)
    assert aupro([s], [g], 1 / 3, pro_variant="sampled") == pytest.approx(0.1669946, abs=1e-6)


@pytest.fixture(scope="module")
def mvtec_toy():
    np.random.seed(1338)  # the official toy generator's legacy global RandomState
    maps, gts = [], []
    for _ in range(200):
        maps.append(np.random.random((300, 500)))
        gt = np.zeros((300, 500))
        gt[0:10, 0:10] = 1
        gts.append(gt)
    return maps, gts


def test_mvtec_toy_exact_and_as_volumes(mvtec_toy):
    maps, gts = mvtec_toy
    got = aupro(maps, gts, (0.3, 0.1, 0.05, 0.01))  # several limits: one curve, a dict
    assert got[0.3] == pytest.approx(0.151019, abs=1e-6)
    assert got[0.1] == pytest.approx(0.049731, abs=1e-6)
    assert got[0.05] == pytest.approx(0.024867, abs=1e-6)
    assert got[0.01] == pytest.approx(0.004510, abs=1e-6)



def test_toy_pairs_as_one_slice_volumes_give_the_2d_values(mvtec_toy):
    maps, gts = mvtec_toy[0][:40], mvtec_toy[1][:40]
    flat = aupro(maps, gts, limits=(0.3, 0.01))
    # (1, H, W) volumes through the 3-D (26-connectivity) path: exactly the 2-D values
    vol = aupro([m[None] for m in maps], [g[None] for g in gts], limits=(0.3, 0.01))
    assert vol == flat


def test_mvtec_toy_sampled_variant_bias(mvtec_toy):
    maps, gts = mvtec_toy
    sampled = aupro(maps, gts, limits=(0.3, 0.01), pro_variant="sampled", num_thresholds=99)
    assert sampled[0.3] == pytest.approx(0.151064, abs=1e-6)
    assert sampled[0.01] == pytest.approx(0.004924, abs=1e-6)


def _brute_force_aupro(scores, gts, limit, structure):
    """Direct definition: for every distinct threshold, FPR and mean per-region overlap."""
    flat_s = np.concatenate([s.ravel() for s in scores])
    regions = []
    nominal = []
    for s, g in zip(scores, gts):
        lab, n = ndimage.label(g, structure=structure)
        for k in range(1, n + 1):
            regions.append(s[lab == k])
        nominal.append(s[g == 0])
    nominal = np.concatenate(nominal)
    fprs, pros = [0.0], [0.0]
    for thr in np.unique(flat_s)[::-1]:
        fprs.append(np.mean(nominal >= thr))
        pros.append(np.mean([np.mean(r >= thr) for r in regions]))
    fprs.append(1.0)
    pros.append(1.0)
    return area_under_curve(np.array(fprs), np.array(pros), limit)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_aupro_matches_brute_force_on_small_volumes(seed):
    rng = np.random.default_rng(seed)
    scores, gts = [], []
    for _ in range(3):
        shape = tuple(rng.integers(3, 7, size=3))
        g = rng.random(shape) < 0.12
        s = np.round(rng.random(shape) + 0.5 * g, 2)  # rounding creates ties
        scores.append(s)
        gts.append(g)
    for limit in (0.3, 0.1, 0.05):
        expected = _brute_force_aupro(scores, gts, limit, np.ones((3, 3, 3)))
        assert aupro(scores, gts, fpr_limit=limit) == pytest.approx(expected, abs=1e-12)


def test_3d_uses_26_connectivity_and_2d_uses_8():
    g3 = np.zeros((3, 3, 3), bool)
    g3[0, 0, 0] = g3[1, 1, 1] = True  # corner-touching: one region with 26-connectivity
    assert segmentation_metrics([np.random.rand(3, 3, 3)], [g3])["n_regions"] == 1
    assert segmentation_metrics([np.random.rand(3, 3, 3)], [g3], connectivity=6)["n_regions"] == 2
    g2 = np.eye(3, dtype=bool)
    assert segmentation_metrics([np.random.rand(3, 3)], [g2])["n_regions"] == 1
    assert segmentation_metrics([np.random.rand(3, 3)], [g2], connectivity=4)["n_regions"] == 3


def test_constant_map_gives_the_diagonal():
    g = np.zeros((5, 5))
    g[1:3, 1:3] = 1
    fpr, pro = pro_curve([np.ones((5, 5))], [g])
    assert fpr.tolist() == [0.0, 1.0, 1.0] and pro.tolist() == [0.0, 1.0, 1.0]
    assert aupro([np.ones((5, 5))], [g], fpr_limit=0.3) == pytest.approx(0.15)  # (1/α)∫₀^α x dx = α/2


def test_curve_starts_at_origin_and_is_monotone():
    rng = np.random.default_rng(0)
    g = rng.random((20, 20)) < 0.1
    fpr, pro = pro_curve([rng.random((20, 20))], [g])
    assert (fpr[0], pro[0]) == (0.0, 0.0) and (fpr[-1], pro[-1]) == (1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(pro) >= 0)


def test_limit_on_a_grid_point_needs_no_interpolation():
    x = np.array([0.0, 0.25, 0.5, 1.0])
    y = np.array([0.0, 0.5, 1.0, 1.0])
    assert area_under_curve(x, y, 0.5) == pytest.approx((0.25 * 0.25 + 0.25 * 0.75) / 0.5)
    assert area_under_curve(x, y, 0.375) == pytest.approx((0.0625 + 0.125 * (0.5 + 0.75) / 2) / 0.375)


def test_mixed_shapes_and_domains():
    rng = np.random.default_rng(3)
    a, b = rng.random((6, 7)), rng.random((4, 9))
    ga, gb = np.zeros((6, 7), bool), np.zeros((4, 9), bool)
    ga[1:3, 1:3] = True
    gb[0, :3] = True
    value = aupro([a, b], [ga, gb], fpr_limit=0.3)
    assert 0.0 <= value <= 1.0
    # a full domain changes nothing; restricting the domain drops elements
    full = aupro([a, b], [ga, gb], 0.3, domains=[np.ones_like(ga), np.ones_like(gb)])
    assert full == value
    dom_a = np.zeros_like(ga)
    dom_a[:4] = True
    restricted = segmentation_metrics([a, b], [ga, gb], domains=[dom_a, np.ones_like(gb)])
    assert restricted["n_elements"] == 4 * 7 + 36


def test_nan_scores_raise():
    g = np.zeros((3, 3))
    g[0, 0] = 1
    s = np.zeros((3, 3))
    s[1, 1] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        aupro([s], [g])
    with pytest.raises(ValueError, match="non-finite"):
        instance_auroc([0.1, np.inf], [0, 1])


def test_undefined_cases_return_nan_with_warning():
    with pytest.warns(RuntimeWarning):
        assert np.isnan(aupro([np.random.rand(4, 4)], [np.zeros((4, 4))]))
    with pytest.warns(RuntimeWarning):
        assert np.isnan(instance_auroc([0.1, 0.2], [1, 1]))


def test_auroc_agrees_with_sklearn():
    rng = np.random.default_rng(0)
    maps = [np.round(rng.random((15, 12)), 2) for _ in range(4)]
    gts = [rng.random((15, 12)) < 0.2 for _ in range(4)]
    expected = roc_auc_score(np.concatenate([g.ravel() for g in gts]), np.concatenate([m.ravel() for m in maps]))
    assert pixel_auroc(maps, gts) == pytest.approx(expected, abs=1e-12)
    vols = [m.reshape(3, 5, 12) for m in maps]
    gvols = [g.reshape(3, 5, 12) for g in gts]
    assert voxel_auroc(vols, gvols) == pytest.approx(expected, abs=1e-12)
    scores, labels = rng.random(30), rng.integers(0, 2, 30)
    assert instance_auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores))


def test_accumulator_equals_one_shot_call():
    rng = np.random.default_rng(5)
    vols = [rng.random((5, 6, 4)).astype(np.float32) for _ in range(3)]
    gts = [rng.random((5, 6, 4)) < 0.1 for _ in range(3)]
    doms = [(rng.random((5, 6, 4)) < 0.7) | g for g in gts]
    acc = SegmentationAccumulator()
    for v, g, d in zip(vols, gts, doms):
        acc.add(v, g, d)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a = acc.compute((0.3, 0.01))
    b = segmentation_metrics(vols, gts, doms, limits=(0.3, 0.01))
    assert a["voxel_auroc"] == b["voxel_auroc"] and a["voxel_aupro"] == b["voxel_aupro"]
    assert a["voxel_aupro"][0.3] == aupro(vols, gts, 0.3, doms)


def test_random_scorer_is_about_half_alpha():
    rng = np.random.default_rng(0)
    maps = [rng.random((60, 60)) for _ in range(100)]
    gts = []
    for _ in range(100):
        g = np.zeros((60, 60))
        g[10:20, 10:20] = 1
        gts.append(g)
    assert aupro(maps, gts, 0.3) == pytest.approx(0.15, abs=0.015)
