"""Bootstrap intervals over instances and paired differences (detect/metrics.py, issue 18)."""

import warnings

import numpy as np
import pytest

from detect import metrics as M


def _maps(seed: int, n_inst: int = 12, views: int = 2, shift: float = 0.6, rounding: int = 2):
    """Per instance a few maps; odd instances carry a GT block whose scores are raised by ``shift``."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n_inst):
        for v in range(views):
            g = np.zeros((20, 24), bool)
            if i % 2:
                g[3:9, 4 + v:12] = True
                g[14:17, 18:22] = True  # a second region
            s = np.round(rng.random(g.shape) + shift * g, rounding)
            out.append((i, s, g))
    return out


def _elements(maps) -> M.InstanceElements:
    acc = M.InstanceElements()
    for i, s, g in maps:
        acc.add(i, s, g)
    return acc


def test_point_estimate_is_the_exact_metric_and_inside_its_interval():
    maps = _maps(0)
    res = _elements(maps).metrics((0.3, 0.01), "pixel", n_boot=300, seed=1)
    exact = M.segmentation_metrics([s for _, s, _ in maps], [g for _, _, g in maps], limits=(0.3, 0.01),
                                   prefix="pixel")
    assert res["pixel_auroc"].value == pytest.approx(exact["pixel_auroc"], abs=1e-12)
    for a in (0.3, 0.01):
        iv = res["pixel_aupro"][a]
        assert iv.value == pytest.approx(exact["pixel_aupro"][a], abs=1e-12)
        assert iv.low <= iv.value <= iv.high and iv.high - iv.low > 0
    assert res["n_instances"] == 12 and res["bootstrap"]["thresholds"] == "all distinct scores"


def test_every_replicate_equals_the_exact_metric_of_its_resampled_instances():
    maps = _maps(2)
    acc = _elements(maps)
    counts = M.bootstrap_counts(acc.labels(), n_boot=5, seed=3)
    auroc, aupro = M._replicate_metrics(acc._curves(M.DEFAULT_MAX_THRESHOLDS, 0.04), counts, (0.3, 0.01))
    for b in range(5):
        chosen = [(s, g) for i, s, g in maps for _ in range(int(counts[b, i]))]
        exact = M.segmentation_metrics([s for s, _ in chosen], [g for _, g in chosen], limits=(0.3, 0.01))
        assert auroc[b] == pytest.approx(exact["voxel_auroc"], abs=1e-10)
        assert aupro[0.01][b] == pytest.approx(exact["voxel_aupro"][0.01], abs=1e-10)
        assert aupro[0.3][b] == pytest.approx(exact["voxel_aupro"][0.3], abs=1e-10)


def test_bootstrap_is_stratified_and_seeded():
    labels = np.array([0] * 5 + [1] * 7)
    c = M.bootstrap_counts(labels, n_boot=50, seed=4)
    assert (c[:, :5].sum(axis=1) == 5).all() and (c[:, 5:].sum(axis=1) == 7).all()
    assert (c == M.bootstrap_counts(labels, n_boot=50, seed=4)).all()
    assert not (c == M.bootstrap_counts(labels, n_boot=50, seed=5)).all()
    acc = _elements(_maps(5))
    a = acc.metrics(n_boot=200, seed=7)["voxel_aupro"][0.01]
    assert a == acc.metrics(n_boot=200, seed=7)["voxel_aupro"][0.01]


def test_quantile_grid_approximates_the_exact_replicates():
    """With more distinct scores than ``max_thresholds`` the replicates use a quantile grid."""
    maps = _maps(6, rounding=8)
    acc = _elements(maps)
    counts = M.bootstrap_counts(acc.labels(), n_boot=20, seed=0)
    exact = M._replicate_metrics(acc._curves(10 ** 7, 0.04), counts, (0.01, 0.3))
    curves = acc._curves(512, 0.04)
    assert not curves.exact
    approx = M._replicate_metrics(curves, counts, (0.01, 0.3))
    assert np.abs(approx[0] - exact[0]).max() < 2e-3
    assert np.abs(approx[1][0.3] - exact[1][0.3]).max() < 5e-3
    assert np.abs(approx[1][0.01] - exact[1][0.01]).max() < 0.05


def test_paired_difference():
    base = _maps(8, shift=0.3)
    acc_a = _elements(base)
    same = M.paired_difference(acc_a, _elements(base), n_boot=200)
    iv = same["voxel_aupro"][0.01]
    assert iv.value == 0.0 and iv.low == 0.0 and iv.high == 0.0
    better = _elements([(i, s + 0.5 * g, g) for i, s, g in base])  # same instances, stronger signal
    diff = M.paired_difference(better, acc_a, n_boot=300)
    assert diff["voxel_auroc"].low > 0 and diff["voxel_aupro"][0.3].low > 0
    shuffled = M.InstanceElements()  # instance order does not matter, keys do
    for i, s, g in reversed(base):
        shuffled.add(i, s + 0.5 * g, g)
    assert M.paired_difference(shuffled, acc_a, n_boot=300)["voxel_auroc"] == diff["voxel_auroc"]
    other = _elements(_maps(9, n_inst=10))
    with pytest.raises(ValueError, match="same instances"):
        M.paired_difference(acc_a, other)


def test_instance_auroc_interval_and_paired_difference():
    rng = np.random.default_rng(0)
    labels = np.arange(24) % 2
    scores = rng.random(24) + 0.4 * labels
    iv = M.instance_auroc_interval(scores, labels, n_boot=500, seed=0)
    assert iv.value == pytest.approx(M.instance_auroc(scores, labels))
    assert iv.low < iv.value < iv.high and iv.n_undefined == 0  # stratified: both labels in every replicate
    assert "[" in iv.format() and iv.to_dict()["n_boot"] == 500
    d = M.paired_instance_auroc_difference(scores, scores, labels, n_boot=100)
    assert (d.value, d.low, d.high) == (0.0, 0.0, 0.0)
    perfect = labels + 0.01 * rng.random(24)
    d = M.paired_instance_auroc_difference(perfect, scores, labels, n_boot=500)
    assert d.value == pytest.approx(1.0 - iv.value) and d.low >= 0.0


def test_all_pixel_auroc_differs_from_the_object_foreground_one():
    """Background pixels scored 0 inflate the all-pixel P-AUROC; the object domain removes them."""
    rng = np.random.default_rng(1)
    depth = np.full((30, 40), np.inf, np.float32)
    depth[5:25, 8:32] = 0.5
    fg = M.object_pixel_domain(depth)
    assert fg.sum() == 20 * 24
    acc_all, acc_obj = M.InstanceElements(regions=False), M.InstanceElements()
    for i in range(10):
        gt = np.zeros((30, 40), bool)
        if i % 2:
            gt[10:14, 10:14] = True
        s = np.where(fg, rng.random((30, 40)), 0.0)  # uninformative on the object, 0 on the background
        acc_all.add(i, s, gt)
        acc_obj.add(i, s, gt, M.object_pixel_domain(depth, gt))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        all_px = acc_all.metrics((), "pixel", n_boot=100)["pixel_auroc"].value
        obj_px = acc_obj.metrics((0.3,), "pixel", n_boot=100)["pixel_auroc"].value
    assert all_px > 0.7 and abs(obj_px - 0.5) < 0.1
    assert "pixel_aupro" not in acc_all.metrics((0.3,), "pixel", n_boot=10)
