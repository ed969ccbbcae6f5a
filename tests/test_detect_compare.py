"""Paired comparisons of runs (detect/pipeline/compare.py): intervals of every metric and of every
difference, per class and for the mean over classes; the ablation tables and the demo report show them
(issue 18)."""

import numpy as np
import pytest

from detect import metrics as M
from detect.experiments.ablation import TABLES, Row, TableStats, render_table
from detect.pipeline.compare import ClassEvidence, compare_runs


def _class(seed: int, signal: float, n_inst: int = 12, flip: int = 0) -> ClassEvidence:
    """Tiny evidence of one class: one score per instance and per-instance voxel maps; odd instances are
    anomalous, ``signal`` raises their scores and their GT voxels. ``flip`` instances get their image
    score inverted (a known I-AUROC loss)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n_inst) % 2
    scores = rng.random(n_inst) + signal * labels
    scores[:flip] = -scores[:flip] + 2 * signal * (1 - labels[:flip])
    vox = M.InstanceElements()
    pix = M.InstanceElements()
    for i in range(n_inst):
        g = np.zeros((6, 6, 4), bool)
        if labels[i]:
            g[1:4, 1:4, 1:3] = True
        vox.add(f"i{i}", np.round(np.random.default_rng(100 + i).random(g.shape), 3) + signal * g, g, label=int(labels[i]))
        m = g[:, :, 1]
        pix.add(f"i{i}", np.random.default_rng(200 + i).random(m.shape) + signal * m, m, label=int(labels[i]))
    return ClassEvidence(M.instance_score_elements(scores, labels, [f"i{i}" for i in range(n_inst)]), vox, pix)


def _run(signal: float, flip: int = 0) -> dict[str, ClassEvidence]:
    return {"vase": _class(0, signal, flip=flip), "stool": _class(1, signal, flip=flip)}


def test_values_carry_intervals_that_contain_the_point_estimate():
    res = compare_runs(_run(0.5), n_boot=300, seed=0)
    assert set(res) == {"I-AUROC", "V-AUPRO@1%", "O-P-AUROC"}
    for metric, per in res.items():
        assert set(per) == {"vase", "stool", "mean"}
        for iv in per.values():
            assert iv.low <= iv.value <= iv.high, metric
        assert per["mean"].value == pytest.approx((per["vase"].value + per["stool"].value) / 2)
    # the per-class value is the exact metric (I-AUROC of the scores)
    rng = np.random.default_rng(0)
    labels = np.arange(12) % 2
    assert res["I-AUROC"]["vase"].value == pytest.approx(M.instance_auroc(rng.random(12) + 0.5 * labels, labels))


def test_a_known_difference_is_detected_and_no_difference_is_zero():
    strong, weak = _run(0.8), _run(0.15)
    diff = compare_runs(strong, weak, n_boot=400, seed=0)
    for metric in ("I-AUROC", "V-AUPRO@1%", "O-P-AUROC"):
        for key in ("vase", "stool", "mean"):
            iv = diff[metric][key]
            assert iv.low <= iv.value <= iv.high
        assert diff[metric]["mean"].low > 0, metric  # the stronger variant is better, not by chance
    same = compare_runs(strong, _run(0.8), n_boot=100, seed=0)
    assert all((iv.value, iv.low, iv.high) == (0.0, 0.0, 0.0) for per in same.values() for iv in per.values())
    # a paired difference is tighter than the unpaired spread of two noisy, correlated variants
    slight = compare_runs(_run(0.8, flip=2), strong, n_boot=400, seed=0)["I-AUROC"]["mean"]
    assert slight.value < 0 and slight.low <= slight.value <= slight.high


def test_excludes_zero_needs_a_real_interval():
    assert M.Interval(0.1, 0.02, 0.2).excludes(0.0) and M.Interval(-0.1, -0.2, -0.01).excludes(0.0)
    assert not M.Interval(0.1, -0.02, 0.2).excludes(0.0)
    assert not M.Interval(-1.0, -1.0, -1.0).excludes(0.0)  # one instance per label: every replicate equal
    assert not M.Interval(float("nan"), float("nan"), float("nan")).excludes(0.0)


def test_the_mean_interval_is_that_of_the_class_replicates():
    parts = [(0.5, np.array([0.4, 0.5, 0.6, np.nan])), (0.7, np.array([0.6, 0.7, 0.8, 0.7]))]
    iv = M.mean_interval(parts)
    assert iv.value == pytest.approx(0.6) and iv.n_undefined == 1
    assert iv.low == pytest.approx(np.percentile([0.5, 0.6, 0.7], 2.5))
    with pytest.raises(ValueError):
        M.mean_interval([])


def test_missing_evidence_leaves_the_metric_out_and_classes_must_match():
    a, b = _run(0.5), _run(0.3)
    b["vase"].object_pixels = None  # the reference saved no maps
    res = compare_runs(a, b, n_boot=50)
    assert "O-P-AUROC" not in res and "V-AUPRO@1%" in res
    with pytest.raises(ValueError, match="different classes"):
        compare_runs(a, {"vase": b["vase"]}, n_boot=50)


def test_ablation_table_shows_intervals_and_paired_differences():
    spec = TABLES["aggregation"]  # reference: the first row (max)
    rows = [(Row("max", {}), "a"), (Row("min", {}), "b")]
    runs = {"a": _run(0.8), "b": _run(0.15)}
    data = {}
    stats = TableStats()
    for name, ev in runs.items():
        vals = compare_runs(ev, n_boot=200)
        data[name] = {"results": {"real2real": {c: {"image_auroc": vals["I-AUROC"][c].value,
                                                    "voxel_aupro": {"0.01": vals["V-AUPRO@1%"][c].value}}
                                                for c in ev}}}
        stats.values.setdefault("real2real", {})[name] = vals
    stats.diffs[("aggregation", "real2real")] = {"b": compare_runs(runs["b"], runs["a"], n_boot=200)}
    # a difference of the same run against another table's reference is not this table's
    stats.diffs[("cross_view", "real2real")] = {"b": compare_runs(runs["a"], runs["a"], n_boot=200)}
    md, records = render_table(spec, rows, data, ["real2real"], stats)
    iv = stats.values["real2real"]["a"]["I-AUROC"]["mean"]
    assert f"{iv.value:.3f}** [{iv.low:.2f}, {iv.high:.2f}]" in md  # the best value in bold, then its interval
    assert "Paired differences, row − **max**" in md
    line = next(x for x in md.splitlines() if x.startswith("| min |") and "*" in x and "[" in x and "-0." in x)
    d = stats.diffs[("aggregation", "real2real")]["b"]["V-AUPRO@1%"]["mean"]
    assert f"{d.value:+.3f} [{d.low:.2f}, {d.high:.2f}]*" in line  # a known loss, marked as not chance
    diff_recs = [r for r in records if r["metric"].endswith("- reference")]
    assert {r["metric"] for r in diff_recs} == {"I-AUROC - reference", "V-AUPRO@1% - reference"}
    assert all(r["reference"] == "max" and r["mean_ci95_low"] <= r["mean"] <= r["mean_ci95_high"] for r in diff_recs)
    val = next(r for r in records if r["row"] == "max" and r["metric"] == "I-AUROC")
    assert val["mean_ci95_low"] <= val["mean"] <= val["mean_ci95_high"]
    # without statistics the table is the plain one (no intervals, no differences)
    plain, _ = render_table(spec, rows, data, ["real2real"])
    assert "[" not in plain and "Paired differences" not in plain


def test_reference_rows_of_the_tables():
    labels = lambda t, rows: [r.label for r in rows][TABLES[t].reference(rows)]  # noqa: E731
    rows = [Row("PatchCore", {}), Row("CFM", {}), Row("ModMap", {})]
    assert labels("cross_view", rows) == "ModMap"
    assert labels("aggregation", [Row("max", {}), Row("min", {})]) == "max"
    assert labels("view_subsampling", [Row("6", {}), Row("all", {})]) == "all"
    assert labels("multi_class", [Row("Class-specific", {}), Row("Multi-class", {})]) == "Class-specific"
