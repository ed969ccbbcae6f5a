"""Detection and segmentation metrics: I-AUROC, pixel/voxel AUROC and exact PRO / AUPRO in 2D and 3D.

Definitions follow ``../shared/spec/metrics.md``:

* higher score = more anomalous; NaN/inf scores raise;
* I-AUROC = ``sklearn.metrics.roc_auc_score`` over one score per instance (NaN + warning when only one
  label is present);
* pixel/voxel AUROC pools every element of the evaluation domain of every sample;
* the PRO curve is **exact**: every distinct score is a threshold (§4). GT regions are connected
  components with 8-connectivity in 2D and 26-connectivity in 3D (``ones((3,)*ndim)``), labelled on the
  full GT before domain restriction. AUPRO@α integrates PRO over FPR ∈ [0, α] (trapezoid, linear
  interpolation at α) and divides by α.

Everything is vectorised: one ``argsort`` of the pooled scores gives both the ROC and the PRO curve
(:func:`segmentation_metrics`), per-region weights come from ``np.bincount``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

DEFAULT_PRO_LIMITS: tuple[float, ...] = (0.3, 0.1, 0.05, 0.01)

ArrayList = Sequence[np.ndarray] | np.ndarray


# -- input handling --------------------------------------------------------------------------------
def _as_list(arrays: ArrayList | None, what: str) -> list[np.ndarray] | None:
    """A list of per-sample arrays from a list/tuple or a stacked (M, ...) array."""
    if arrays is None:
        return None
    if isinstance(arrays, np.ndarray):
        if arrays.ndim < 2:
            raise ValueError(f"{what}: expected a list of maps/volumes or a stacked (M, ...) array, "
                             f"got shape {arrays.shape}")
        return list(arrays)
    out = [np.asarray(a) for a in arrays]
    if not out:
        raise ValueError(f"{what}: empty input")
    return out


def _check_finite(scores: np.ndarray, what: str) -> None:
    if not np.all(np.isfinite(scores)):
        bad = int(np.size(scores) - np.count_nonzero(np.isfinite(scores)))
        raise ValueError(f"{what} contain {bad} non-finite value(s) (NaN/inf); scores must be finite")


def structure_for(ndim: int, connectivity: int | None = None) -> np.ndarray:
    """Neighbourhood structure for GT labelling: full connectivity by default (8 in 2D, 26 in 3D).

    ``connectivity`` may name the neighbour count (4/8 in 2D, 6/18/26 in 3D) to override it.
    """
    from scipy import ndimage

    if connectivity is None:
        return np.ones((3,) * ndim, dtype=bool)
    by_count = {(2, 4): 1, (2, 8): 2, (3, 6): 1, (3, 18): 2, (3, 26): 3}
    rank = by_count.get((ndim, int(connectivity)))
    if rank is None:
        raise ValueError(f"connectivity {connectivity} is not valid for {ndim}-D data "
                         f"(2-D: 4 or 8; 3-D: 6, 18 or 26)")
    return ndimage.generate_binary_structure(ndim, rank)


def default_connectivity(ndim: int) -> int:
    return 3 ** ndim - 1


@dataclass
class _Pooled:
    """Scores and per-element weights of every sample's evaluation domain, concatenated."""

    scores: np.ndarray  # float64 (E,)
    nominal: np.ndarray  # bool (E,): GT == 0
    anom_weight: np.ndarray  # float64 (A,): 1/|region| of each anomalous element, in element order
    n_ok: int
    n_regions: int
    n_anomalous: int
    connectivity: int


def _sample_elements(s: np.ndarray, g: np.ndarray, d: np.ndarray | None, connectivity: int | None,
                     need_regions: bool, where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """Domain-restricted (scores float64, nominal, PRO weights of the anomalous elements, n_regions,
    connectivity) of one sample."""
    from scipy import ndimage

    s = np.asarray(s)
    g = np.asarray(g) != 0
    if s.shape != g.shape:
        raise ValueError(f"{where}: score shape {s.shape} != GT shape {g.shape}")
    _check_finite(s, f"scores of {where}")
    structure = structure_for(g.ndim, connectivity)
    conn = int(structure.sum()) - 1
    if need_regions and g.any():
        # Regions are labelled on the full GT, before any domain restriction (metrics.md §7).
        labels, n = ndimage.label(g, structure=structure)
    else:
        labels, n = g.astype(np.int32), 0
    if d is not None:
        d = np.asarray(d).astype(bool, copy=False)
        if d.shape != g.shape:
            raise ValueError(f"{where}: domain shape {d.shape} != GT shape {g.shape}")
        s_flat, lab_flat = s[d], labels[d]
    else:
        s_flat, lab_flat = s.reshape(-1), labels.reshape(-1)
    nominal = lab_flat == 0
    n_regions = 0
    if need_regions and n:
        sizes = np.bincount(lab_flat, minlength=n + 1).astype(np.float64)
        present = sizes[1:] > 0  # a region entirely outside the domain does not count
        inv = np.zeros(n + 1)
        inv[1:][present] = 1.0 / sizes[1:][present]
        weights = inv[lab_flat[~nominal]]
        n_regions = int(present.sum())
    else:
        weights = np.zeros(int(nominal.size - np.count_nonzero(nominal)), dtype=np.float64)
    return s_flat.astype(np.float64, copy=False).reshape(-1), nominal.reshape(-1), weights, n_regions, conn


class SegmentationAccumulator:
    """Collects samples one at a time (only their domain-restricted elements are kept) and computes
    AUROC + exact AUPRO of the pooled set — for volumes that should not all be in memory at once."""

    def __init__(self, connectivity: int | None = None) -> None:
        self.connectivity = connectivity
        self._s: list[np.ndarray] = []
        self._n: list[np.ndarray] = []
        self._w: list[np.ndarray] = []
        self.n_regions = 0
        self.n_samples = 0
        self._conn = -1

    def add(self, scores: np.ndarray, gt: np.ndarray, domain: np.ndarray | None = None) -> None:
        s, n, w, regions, conn = _sample_elements(scores, gt, domain, self.connectivity, True,
                                                  f"sample {self.n_samples}")
        self._s.append(s)
        self._n.append(n)
        self._w.append(w)
        self.n_regions += regions
        self._conn = conn
        self.n_samples += 1

    def pooled(self) -> _Pooled:
        if not self._s:
            raise ValueError("no samples added")
        nominal = np.concatenate(self._n)
        n_ok = int(nominal.sum())
        return _Pooled(np.concatenate(self._s), nominal, np.concatenate(self._w), n_ok, self.n_regions,
                       int(nominal.size - n_ok), self._conn)

    def compute(self, limits: Iterable[float] = DEFAULT_PRO_LIMITS, prefix: str = "voxel") -> dict:
        return _segmentation_from_pooled(self.pooled(), limits, prefix)


def _pool(scores: ArrayList, gts: ArrayList, domains: ArrayList | None, connectivity: int | None,
          need_regions: bool = True) -> _Pooled:
    score_list = _as_list(scores, "scores")
    gt_list = _as_list(gts, "gts")
    domain_list = _as_list(domains, "domains")
    if len(score_list) != len(gt_list):
        raise ValueError(f"got {len(score_list)} score maps but {len(gt_list)} GT maps")
    if domain_list is not None and len(domain_list) != len(gt_list):
        raise ValueError(f"got {len(domain_list)} domain masks for {len(gt_list)} samples")
    parts_s, parts_n, parts_w = [], [], []
    n_regions = 0
    conn = -1
    for i, (s, g) in enumerate(zip(score_list, gt_list)):
        d = domain_list[i] if domain_list is not None else None
        s_flat, nominal, weights, regions, conn = _sample_elements(s, g, d, connectivity, need_regions,
                                                                   f"sample {i}")
        parts_s.append(s_flat)
        parts_n.append(nominal)
        parts_w.append(weights)
        n_regions += regions
    nominal = np.concatenate(parts_n)
    n_ok = int(nominal.sum())
    return _Pooled(np.concatenate(parts_s), nominal, np.concatenate(parts_w), n_ok, n_regions,
                   int(nominal.size - n_ok), conn)


def _sorted_curves(pooled: _Pooled) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative nominal count, anomalous count and PRO mass at the last index of every distinct
    score, scores descending.

    Instead of one ``argsort`` of all scores (slow for tens of millions of voxels), the nominal scores
    are sorted with the (much faster) value sort and the few anomalous ones with a small argsort; a
    stable argsort of the two concatenated sorted runs is then a linear-time timsort merge.
    """
    scores = pooled.scores
    nominal_sorted = np.sort(scores[pooled.nominal])  # ascending
    anom_idx = np.flatnonzero(~pooled.nominal)
    anom_scores = scores[anom_idx]
    anom_order = np.argsort(anom_scores, kind="stable")
    anom_sorted = anom_scores[anom_order]
    anom_weight = pooled.anom_weight[anom_order]
    n_nom = nominal_sorted.size
    merged = np.concatenate([nominal_sorted, anom_sorted])
    del nominal_sorted
    order = np.argsort(merged, kind="stable")[::-1]  # descending; ties are merged below anyway
    s_sorted = merged[order]
    del merged
    is_anom = order >= n_nom
    del order
    tp = np.cumsum(is_anom, dtype=np.int64)
    del is_anom
    # Merge ties: the last index of each run of equal scores holds every change at that threshold.
    keep = np.empty(s_sorted.size, dtype=bool)
    if s_sorted.size:
        np.not_equal(s_sorted[:-1], s_sorted[1:], out=keep[:-1])
        keep[-1] = True
    kept = np.flatnonzero(keep)
    tp = tp[kept]
    fp = kept + 1 - tp
    # Anomalous elements appear in descending order of their sorted position, so the PRO mass after
    # k anomalous elements is the sum of the k largest-score weights.
    pro_mass = np.concatenate([[0.0], np.cumsum(anom_weight[::-1])])[tp]
    return fp, tp, pro_mass


# -- PRO / AUPRO -----------------------------------------------------------------------------------
def pro_curve(scores: ArrayList, gts: ArrayList, domains: ArrayList | None = None,
              connectivity: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact PRO curve ``(fpr, pro)`` (metrics.md §4), starting at (0, 0) and ending at (1, 1).

    ``scores`` and ``gts`` are lists of equally shaped maps (2-D) or volumes (3-D) — shapes may differ
    between samples — or stacked arrays (M, H, W) / (M, X, Y, Z). ``domains`` optionally restricts
    every sample to a boolean mask (the evaluation domain). Returns NaN arrays (with a warning) when
    the set has no GT region or no nominal element.
    """
    pooled = _pool(scores, gts, domains, connectivity)
    return _pro_from_pooled(pooled)


def _pro_from_pooled(pooled: _Pooled, sorted_curves=None, fpr_max: float | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """The closed PRO curve; with ``fpr_max`` only the points up to the first one beyond it are kept
    (all an AUPRO up to ``fpr_max`` needs), which saves work on curves with millions of points."""
    if pooled.n_regions == 0 or pooled.n_ok == 0:
        warnings.warn("PRO undefined: " + ("no anomalous region" if pooled.n_regions == 0 else "no nominal element"),
                      RuntimeWarning, stacklevel=3)
        return np.array([np.nan]), np.array([np.nan])
    fp, _, pro = sorted_curves if sorted_curves is not None else _sorted_curves(pooled)
    if fpr_max is not None:
        stop = int(np.searchsorted(fp, fpr_max * pooled.n_ok, side="right")) + 1
        fp, pro = fp[:stop], pro[:stop]
    fpr = np.minimum(fp / pooled.n_ok, 1.0)
    pro = np.minimum(pro / pooled.n_regions, 1.0)
    fpr = np.concatenate([[0.0], fpr, [1.0]])
    pro = np.concatenate([[0.0], pro, [1.0]])
    return fpr, pro


def area_under_curve(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """(1/limit) · ∫₀^limit y dx by the trapezoid rule, linearly interpolating y at x = limit.

    ``x`` must be non-decreasing (vertical segments allowed).
    """
    if not 0 < limit <= 1:
        raise ValueError(f"integration limit must be in (0, 1], got {limit}")
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.size == 0 or np.isnan(x).any():
        return float("nan")
    n_in = int(np.searchsorted(x, limit, side="right"))  # points with x <= limit
    xs, ys = x[:n_in], y[:n_in]
    if n_in == 0:
        return float("nan")
    if xs[-1] < limit and n_in < x.size:
        x0, y0, x1, y1 = x[n_in - 1], y[n_in - 1], x[n_in], y[n_in]
        y_lim = y0 + (y1 - y0) * (limit - x0) / (x1 - x0) if x1 > x0 else y1
        xs = np.append(xs, limit)
        ys = np.append(ys, y_lim)
    area = float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) * 0.5))
    return area / limit


def aupro(score_maps: ArrayList, gt_masks: ArrayList, fpr_limit: float | Sequence[float] = 0.3,
          domains: ArrayList | None = None,
          *, limits: Iterable[float] | None = None, connectivity: int | None = None,
          pro_variant: str = "exact", num_thresholds: int = 99) -> float | dict[float, float]:
    """Normalised area under the exact PRO curve up to ``fpr_limit`` (metrics.md §5).

    2-D maps (M, H, W) use 8-connectivity, 3-D volumes (M, X, Y, Z) 26-connectivity. V-AUPRO@1% is
    ``aupro(volumes, gts, fpr_limit=0.01, domains=...)``. With several limits (``limits=(0.3, 0.1, ...)``,
    or a sequence as ``fpr_limit``) the curve is computed once and a dict ``{limit: value}`` is returned.

    ``pro_variant="sampled"`` reproduces the biased threshold-sampled PRO of 3D-ADS/M3DM/CFM code bases
    (metrics.md §6) — only for comparisons with their numbers.
    """
    if limits is None and isinstance(fpr_limit, (list, tuple, np.ndarray)):
        limits = fpr_limit  # aupro(scores, gts, (0.3, 0.1, ...)) as in metrics.md §9
    lims = [float(a) for a in limits] if limits is not None else [float(fpr_limit)]
    if pro_variant == "exact":
        fpr, pro = _pro_from_pooled(_pool(score_maps, gt_masks, domains, connectivity), fpr_max=max(lims))
    elif pro_variant == "sampled":
        fpr, pro = sampled_pro_curve(score_maps, gt_masks, domains, connectivity, num_thresholds)
    else:
        raise ValueError(f"unknown pro_variant {pro_variant!r}; expected 'exact' or 'sampled'")
    if limits is not None or isinstance(fpr_limit, (list, tuple, np.ndarray)):
        return {float(a): area_under_curve(fpr, pro, float(a)) for a in lims}
    return area_under_curve(fpr, pro, float(fpr_limit))


def sampled_pro_curve(scores: ArrayList, gts: ArrayList, domains: ArrayList | None = None,
                      connectivity: int | None = None, num_thresholds: int = 99) -> tuple[np.ndarray, np.ndarray]:
    """The threshold-sampled PRO curve of 3D-ADS-derived code (metrics.md §6; biased at small α).

    Thresholds are the sorted nominal scores at integer positions ``linspace(0, n_ok - 1, T)``;
    FPR = 1 − (pos + 1)/n_ok, PRO = mean over regions of the fraction of the region with score **>**
    the threshold. Sorted by FPR and closed with (0, 0) and (1, 1) like the exact curve.
    """
    pooled = _pool(scores, gts, domains, connectivity)
    if pooled.n_regions == 0 or pooled.n_ok == 0:
        warnings.warn("PRO undefined (no region or no nominal element)", RuntimeWarning, stacklevel=2)
        return np.array([np.nan]), np.array([np.nan])
    nominal_sorted = np.sort(pooled.scores[pooled.nominal])
    pos = np.linspace(0, pooled.n_ok - 1, num_thresholds).astype(np.int64)
    thresholds = nominal_sorted[pos]
    fpr = 1.0 - (pos + 1) / pooled.n_ok
    # PRO(>thr): weights of anomalous elements with score strictly above the threshold.
    anom = ~pooled.nominal
    a_scores = pooled.scores[anom]
    a_order = np.argsort(a_scores, kind="stable")
    a_sorted = a_scores[a_order]
    w_cum = np.concatenate([[0.0], np.cumsum(pooled.anom_weight[a_order])])
    total = w_cum[-1]
    n_le = np.searchsorted(a_sorted, thresholds, side="right")
    pro = (total - w_cum[n_le]) / pooled.n_regions
    order = np.argsort(fpr, kind="stable")
    fpr, pro = np.minimum(fpr[order], 1.0), np.minimum(pro[order], 1.0)
    return np.concatenate([[0.0], fpr, [1.0]]), np.concatenate([[0.0], pro, [1.0]])


# -- AUROC -----------------------------------------------------------------------------------------
def instance_auroc(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray) -> float:
    """I-AUROC: ``roc_auc_score(labels, scores)`` over instances; NaN + warning with one label only."""
    from sklearn.metrics import roc_auc_score

    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = (np.asarray(labels).reshape(-1) != 0).astype(np.int64)
    if scores.shape != labels.shape:
        raise ValueError(f"{scores.size} scores but {labels.size} labels")
    _check_finite(scores, "instance scores")
    if labels.min(initial=1) == labels.max(initial=0):
        warnings.warn("I-AUROC undefined: only one label present", RuntimeWarning, stacklevel=2)
        return float("nan")
    return float(roc_auc_score(labels, scores))


def _roc_auc_from_counts(fp: np.ndarray, tp: np.ndarray, n_neg: int, n_pos: int) -> float:
    """Exact AUROC (ties count ½) from cumulative counts at distinct thresholds."""
    fpr = np.concatenate([[0.0], fp / n_neg])
    tpr = np.concatenate([[0.0], tp / n_pos])
    return float(np.sum((fpr[1:] - fpr[:-1]) * (tpr[1:] + tpr[:-1]) * 0.5))


def _element_auroc(scores: ArrayList, gts: ArrayList, domains: ArrayList | None, what: str) -> float:
    pooled = _pool(scores, gts, domains, None, need_regions=False)
    if pooled.n_ok == 0 or pooled.n_anomalous == 0:
        warnings.warn(f"{what} undefined: only one class of elements", RuntimeWarning, stacklevel=3)
        return float("nan")
    fp, tp, _ = _sorted_curves(pooled)
    return _roc_auc_from_counts(fp, tp, pooled.n_ok, pooled.n_anomalous)


def pixel_auroc(score_maps: ArrayList, gt_masks: ArrayList, domains: ArrayList | None = None) -> float:
    """P-AUROC over all pixels (or the ``domains`` pixels) of all maps; equals sklearn's value."""
    return _element_auroc(score_maps, gt_masks, domains, "pixel AUROC")


def voxel_auroc(volumes: ArrayList, gt_volumes: ArrayList, domains: ArrayList | None = None) -> float:
    """V-AUROC over the voxels of the evaluation domain (metrics.md §3, §7)."""
    return _element_auroc(volumes, gt_volumes, domains, "voxel AUROC")


def segmentation_metrics(scores: ArrayList, gts: ArrayList, domains: ArrayList | None = None,
                         limits: Iterable[float] = DEFAULT_PRO_LIMITS, connectivity: int | None = None,
                         prefix: str = "voxel") -> dict:
    """AUROC and exact AUPRO at several limits from a single sort of the pooled scores.

    Returns ``{f"{prefix}_auroc": .., f"{prefix}_aupro": {limit: ..}, "connectivity": ..,
    "pro_variant": "exact", "n_elements": .., "n_regions": ..}``.
    """
    return _segmentation_from_pooled(_pool(scores, gts, domains, connectivity), limits, prefix)


def _segmentation_from_pooled(pooled: _Pooled, limits: Iterable[float], prefix: str) -> dict:
    limits = tuple(float(a) for a in limits)
    out: dict = {"pro_variant": "exact", "connectivity": pooled.connectivity,
                 "n_elements": int(pooled.scores.size), "n_regions": pooled.n_regions}
    if pooled.scores.size == 0:
        out[f"{prefix}_auroc"] = float("nan")
        out[f"{prefix}_aupro"] = {a: float("nan") for a in limits}
        return out
    curves = _sorted_curves(pooled)
    if pooled.n_ok and pooled.n_anomalous:
        out[f"{prefix}_auroc"] = _roc_auc_from_counts(curves[0], curves[1], pooled.n_ok, pooled.n_anomalous)
    else:
        warnings.warn(f"{prefix} AUROC undefined: only one class of elements", RuntimeWarning, stacklevel=3)
        out[f"{prefix}_auroc"] = float("nan")
    fpr, pro = _pro_from_pooled(pooled, curves, fpr_max=max(limits, default=1.0))
    out[f"{prefix}_aupro"] = {a: area_under_curve(fpr, pro, a) for a in limits}
    return out


# -- 95 % bootstrap intervals over instances (issue 18) ---------------------------------------------
#
# Every reported metric carries a percentile bootstrap interval over *instances*: a replicate draws the
# instances with replacement (stratified by label, so every replicate keeps the numbers of normal and
# anomalous instances and I-AUROC stays defined) and recomputes the pooled metric with each element
# weighted by its instance's multiplicity. Pooled metrics are linear in those multiplicities at every
# threshold, so per instance the cumulative nominal / anomalous / PRO-mass counts at a grid of
# thresholds are computed once, and all replicates follow from one matrix product
# (replicates × instances) @ (instances × thresholds) — seconds for 1000 replicates of millions of
# voxels. The grid is every distinct score when there are at most ``max_thresholds`` of them (then a
# replicate equals the exact metric of its resampled set); otherwise quantiles of the nominal scores,
# dense at small FPR, and of the anomalous scores. Point estimates are always the exact metrics above.

DEFAULT_N_BOOT = 1000
DEFAULT_MAX_THRESHOLDS = 8192


@dataclass(frozen=True)
class Interval:
    """A metric on all instances with its bootstrap interval ``[low, high]`` at ``level``."""

    value: float
    low: float
    high: float
    level: float = 0.95
    n_boot: int = 0
    n_undefined: int = 0  # replicates where the metric was undefined (left out of the percentiles)

    def to_dict(self) -> dict:
        return {"value": self.value, "low": self.low, "high": self.high, "level": self.level,
                "n_boot": self.n_boot, "n_undefined": self.n_undefined}

    def excludes(self, x: float = 0.0) -> bool:
        """Whether the interval lies entirely above or below ``x`` (for a difference: the ordering is not
        chance). A zero-width interval (every replicate the same: one instance per label) says nothing."""
        ok = np.isfinite(self.low) and np.isfinite(self.high) and self.low < self.high
        return bool(ok and (self.low > x or self.high < x))

    def format(self, digits: int = 3) -> str:
        """``0.812 [0.751, 0.866]`` (the interval in brackets)."""
        if np.isnan(self.value):
            return "n/a"
        return f"{self.value:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


def bootstrap_counts(strata: Sequence[int] | np.ndarray, n_boot: int = DEFAULT_N_BOOT, seed: int = 0
                     ) -> np.ndarray:
    """(n_boot, n) float64 multiplicities of n instances in ``n_boot`` stratified bootstrap replicates:
    within each stratum (e.g. label) as many draws with replacement as it has instances. Seeded."""
    strata = np.asarray(strata).reshape(-1)
    n = strata.size
    if n == 0:
        raise ValueError("bootstrap over zero instances")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    rng = np.random.default_rng(seed)
    counts = np.zeros((n_boot, n), dtype=np.float64)
    for value in np.unique(strata):
        idx = np.flatnonzero(strata == value)
        draws = rng.integers(0, idx.size, size=(n_boot, idx.size))
        flat = (draws + np.arange(n_boot)[:, None] * idx.size).ravel()
        counts[:, idx] = np.bincount(flat, minlength=n_boot * idx.size).reshape(n_boot, idx.size)
    return counts


@dataclass
class _InstanceCurves:
    """Per instance, counts at every grid threshold (descending): elements with score ≥ threshold."""

    fp: np.ndarray  # (n_inst, K) nominal
    tp: np.ndarray  # (n_inst, K) anomalous
    pro: np.ndarray  # (n_inst, K) PRO mass (Σ 1/|region|)
    n_ok: np.ndarray  # (n_inst,)
    n_anom: np.ndarray  # (n_inst,)
    n_regions: np.ndarray  # (n_inst,)
    exact: bool  # the grid holds every distinct score


def _threshold_grid(scores: np.ndarray, nominal: np.ndarray, max_thresholds: int, fpr_focus: float
                    ) -> tuple[np.ndarray, bool]:
    """Ascending thresholds: all distinct scores if few enough, else quantiles (see the section note)."""
    uniq = np.unique(scores)
    if uniq.size <= max_thresholds:
        return uniq, True
    nom = np.sort(scores[nominal])
    anom = np.sort(scores[~nominal])
    parts = [uniq[[0, -1]]]
    if nom.size:
        focus = np.linspace(0.0, min(1.0, fpr_focus), max_thresholds // 2)
        spread = np.linspace(0.0, 1.0, max_thresholds // 4)
        pos = np.clip(nom.size - 1 - np.round(np.concatenate([focus, spread]) * nom.size).astype(np.int64),
                      0, nom.size - 1)
        parts.append(nom[pos])
    if anom.size:
        parts.append(anom[np.linspace(0, anom.size - 1, max_thresholds // 4).astype(np.int64)])
    return np.unique(np.concatenate(parts)), False


def _instance_curves(scores: np.ndarray, nominal: np.ndarray, pro_weight: np.ndarray, inst: np.ndarray,
                     n_inst: int, n_regions: np.ndarray, max_thresholds: int, fpr_focus: float) -> _InstanceCurves:
    thr, exact = _threshold_grid(scores, nominal, max_thresholds, fpr_focus)
    k = thr.size
    j = np.searchsorted(thr, scores, side="right") - 1  # largest threshold ≤ score (-1: below the grid)
    ok = j >= 0
    flat = inst[ok].astype(np.int64) * k + j[ok]
    size = n_inst * k

    def cum(weights: np.ndarray) -> np.ndarray:
        hist = np.bincount(flat, weights=weights[ok], minlength=size).reshape(n_inst, k)
        return np.cumsum(hist[:, ::-1], axis=1)  # descending thresholds: count of score ≥ threshold

    nom_w = nominal.astype(np.float64)
    n_ok = np.bincount(inst, weights=nom_w, minlength=n_inst)
    n_all = np.bincount(inst, minlength=n_inst).astype(np.float64)
    return _InstanceCurves(cum(nom_w), cum(1.0 - nom_w), cum(pro_weight), n_ok, n_all - n_ok,
                           np.asarray(n_regions, dtype=np.float64), exact)


def _clipped_area(x: np.ndarray, y: np.ndarray, limit: float) -> np.ndarray:
    """Row-wise (1/limit)·∫₀^limit y dx of piecewise-linear curves (B, P), x non-decreasing: the
    trapezoid rule with linear interpolation at ``limit`` (as :func:`area_under_curve`)."""
    x0, x1, y0, y1 = x[:, :-1], x[:, 1:], y[:, :-1], y[:, 1:]
    xc0, xc1 = np.minimum(x0, limit), np.minimum(x1, limit)
    dx = x1 - x0
    with np.errstate(invalid="ignore", divide="ignore"):
        y_end = np.where(dx > 0, y0 + (y1 - y0) * (xc1 - x0) / np.where(dx > 0, dx, 1.0), y1)
    return np.sum((xc1 - xc0) * (y0 + y_end) * 0.5, axis=1) / limit


def _replicate_metrics(curves: _InstanceCurves, counts: np.ndarray, limits: Sequence[float],
                       need_auroc: bool = True) -> tuple[np.ndarray, dict[float, np.ndarray]]:
    """AUROC (B,) and AUPRO@α (B,) of the weighted sets ``counts`` (B, n_inst); NaN where undefined."""
    b = counts.shape[0]
    k = curves.fp.shape[1]
    chunk = max(1, 4_000_000 // max(k, 1))
    auroc = np.full(b, np.nan)
    aupro = {a: np.full(b, np.nan) for a in limits}
    for lo in range(0, b, chunk):
        c = counts[lo:lo + chunk]
        n_ok, n_anom, n_reg = c @ curves.n_ok, c @ curves.n_anom, c @ curves.n_regions
        zeros, ones = np.zeros((c.shape[0], 1)), np.ones((c.shape[0], 1))
        with np.errstate(invalid="ignore", divide="ignore"):
            fpr = np.concatenate([zeros, np.minimum((c @ curves.fp) / n_ok[:, None], 1.0), ones], axis=1)
            if need_auroc:
                tpr = np.concatenate([zeros, np.minimum((c @ curves.tp) / n_anom[:, None], 1.0), ones], axis=1)
                val = np.sum((fpr[:, 1:] - fpr[:, :-1]) * (tpr[:, 1:] + tpr[:, :-1]) * 0.5, axis=1)
                auroc[lo:lo + chunk] = np.where((n_ok > 0) & (n_anom > 0), val, np.nan)
            if limits:
                pro = np.concatenate([zeros, np.minimum((c @ curves.pro) / n_reg[:, None], 1.0), ones], axis=1)
                defined = (n_ok > 0) & (n_reg > 0)
                for a in limits:
                    aupro[a][lo:lo + chunk] = np.where(defined, _clipped_area(fpr, pro, a), np.nan)
    return auroc, aupro


def _interval(value: float, replicates: np.ndarray, level: float) -> Interval:
    good = replicates[np.isfinite(replicates)]
    if good.size == 0 or not np.isfinite(value):
        return Interval(float(value), float("nan"), float("nan"), level, int(replicates.size),
                        int(replicates.size - good.size))
    tail = 50.0 * (1.0 - level)
    low, high = np.percentile(good, [tail, 100.0 - tail])
    return Interval(float(value), float(low), float(high), level, int(replicates.size),
                    int(replicates.size - good.size))


class InstanceElements:
    """Scored elements (pixels of an instance's views, or its voxels) grouped by instance, for pooled
    AUROC / exact AUPRO with bootstrap intervals over instances and paired differences of variants.

    ``add(instance, scores, gt, domain)`` may be called several times per instance (one call per view
    map); GT regions are labelled per call (8-connectivity in 2D, 26 in 3D), restricted to ``domain``.
    Only the domain's elements are kept (float64 score, nominal flag, PRO weight, instance index).
    """

    def __init__(self, connectivity: int | None = None, regions: bool = True) -> None:
        self.connectivity = connectivity
        self.regions = regions  # False: AUROC only (no PRO weights, e.g. the all-pixel P-AUROC)
        self._acc = SegmentationAccumulator(connectivity)
        self._inst: list[np.ndarray] = []
        self.keys: list = []
        self._index: dict = {}
        self._labels: list[int | None] = []
        self._n_regions: list[int] = []

    def add(self, instance, scores: np.ndarray, gt: np.ndarray, domain: np.ndarray | None = None,
            label: int | None = None) -> None:
        """Add one map/volume of ``instance`` (any hashable key); ``label`` (0/1) of the instance
        stratifies the bootstrap (default: 1 iff any of its elements is anomalous)."""
        i = self._index.get(instance)
        if i is None:
            i = self._index[instance] = len(self.keys)
            self.keys.append(instance)
            self._labels.append(None)
            self._n_regions.append(0)
        if label is not None:
            self._labels[i] = int(label != 0)
        where = f"instance {instance!r}"
        s, n, w, regions, conn = _sample_elements(scores, gt, domain, self.connectivity, self.regions, where)
        acc = self._acc
        acc._s.append(s)
        acc._n.append(n)
        acc._w.append(w)
        acc.n_regions += regions
        acc._conn = conn
        acc.n_samples += 1
        self._n_regions[i] += regions
        self._inst.append(np.full(s.size, i, dtype=np.int32))

    def bootstrap_counts(self, n_boot: int, seed: int) -> np.ndarray:
        """(n_boot, n_instances) multiplicities, columns in this set's instance order; the draws are made
        in the order of the sorted instance keys, so they do not depend on the order of ``add`` calls."""
        order = sorted(range(self.n_instances), key=lambda i: repr(self.keys[i]))
        canonical = bootstrap_counts(self.labels()[order], n_boot, seed)
        counts = np.empty_like(canonical)
        counts[:, order] = canonical
        return counts

    @property
    def n_instances(self) -> int:
        return len(self.keys)

    def labels(self) -> np.ndarray:
        inst = np.concatenate(self._inst) if self._inst else np.zeros(0, np.int32)
        nominal = np.concatenate(self._acc._n) if self._acc._n else np.zeros(0, bool)
        has_anom = np.bincount(inst[~nominal], minlength=self.n_instances) > 0
        return np.array([lab if lab is not None else int(has_anom[i]) for i, lab in enumerate(self._labels)])

    def _curves(self, max_thresholds: int, fpr_focus: float, order: Sequence[int] | None = None) -> _InstanceCurves:
        pooled = self._acc.pooled()
        inst = np.concatenate(self._inst)
        if order is not None:  # renumber instances (align with another set's keys)
            remap = np.empty(self.n_instances, dtype=np.int32)
            remap[np.asarray(order)] = np.arange(self.n_instances, dtype=np.int32)
            inst = remap[inst]
            n_regions = np.asarray(self._n_regions)[np.asarray(order)]
        else:
            n_regions = np.asarray(self._n_regions)
        weight = np.zeros(pooled.scores.size)
        weight[~pooled.nominal] = pooled.anom_weight
        return _instance_curves(pooled.scores, pooled.nominal, weight, inst, self.n_instances, n_regions,
                                max_thresholds, fpr_focus)

    def exact(self, limits: Iterable[float] = (0.3, 0.01), prefix: str = "voxel") -> dict:
        """The exact metrics of all instances (:func:`segmentation_metrics`' dict)."""
        return _segmentation_from_pooled(self._acc.pooled(), limits if self.regions else (), prefix)

    def metrics(self, limits: Iterable[float] = (0.3, 0.01), prefix: str = "voxel", n_boot: int = DEFAULT_N_BOOT,
                seed: int = 0, level: float = 0.95, max_thresholds: int = DEFAULT_MAX_THRESHOLDS,
                replicates: bool = False) -> dict:
        """``{f"{prefix}_auroc": Interval, f"{prefix}_aupro": {α: Interval}, "n_instances", "bootstrap"}``;
        ``replicates``: also ``"replicates": {key: (exact value, replicates)}`` under the keys of
        :func:`metric_replicates` (e.g. for :func:`mean_interval` over classes)."""
        limits = tuple(float(a) for a in limits) if self.regions else ()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            point = self.exact(limits, prefix)
        counts = self.bootstrap_counts(n_boot, seed)
        curves = self._curves(max_thresholds, 4.0 * max(limits, default=0.01))
        auroc, aupro = _replicate_metrics(curves, counts, limits)
        out: dict = {f"{prefix}_auroc": _interval(point[f"{prefix}_auroc"], auroc, level)}
        if self.regions:
            out[f"{prefix}_aupro"] = {a: _interval(point[f"{prefix}_aupro"][a], aupro[a], level) for a in limits}
        out["n_instances"] = self.n_instances
        out["bootstrap"] = _bootstrap_meta(n_boot, seed, level, curves.exact)
        if replicates:
            out["replicates"] = {f"{prefix}_auroc": (point[f"{prefix}_auroc"], auroc),
                                 **{f"{prefix}_aupro@{a:g}": (point[f"{prefix}_aupro"][a], aupro[a]) for a in limits}}
        return out


def _bootstrap_meta(n_boot: int, seed: int, level: float, exact: bool) -> dict:
    return {"over": "instances", "stratified_by": "label", "n_boot": n_boot, "seed": seed, "level": level,
            "thresholds": "all distinct scores" if exact else "quantile grid"}


def metric_replicates(a: InstanceElements, b: InstanceElements | None = None, limits: Iterable[float] = (0.3, 0.01),
                      prefix: str = "voxel", n_boot: int = DEFAULT_N_BOOT, seed: int = 0,
                      max_thresholds: int = DEFAULT_MAX_THRESHOLDS) -> dict[str, tuple[float, np.ndarray]]:
    """Exact value and ``n_boot`` bootstrap replicates (over instances, stratified by label) of every metric
    of ``a`` — or, given ``b``, of ``a`` minus ``b`` on the same instances, both evaluated on the same
    resampled instances in every replicate (paired). Keys ``f"{prefix}_auroc"`` and
    ``f"{prefix}_aupro@{α}"``; NaN replicates where a metric is undefined. The replicates let callers
    combine metrics (e.g. the mean over classes, :func:`mean_interval`) before taking percentiles."""
    sets = [a] if b is None else [a, b]
    limits = tuple(float(x) for x in limits) if all(s.regions for s in sets) else ()
    if b is not None and (sorted(map(repr, a.keys)) != sorted(map(repr, b.keys)) or a.n_instances != b.n_instances):
        raise ValueError("paired difference needs the same instances in both variants")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        points = [s.exact(limits, prefix) for s in sets]
    counts = a.bootstrap_counts(n_boot, seed)
    focus = 4.0 * max(limits, default=0.01)
    curves = [a._curves(max_thresholds, focus)]
    if b is not None:
        pos = {k: i for i, k in enumerate(b.keys)}
        curves.append(b._curves(max_thresholds, focus, order=[pos[k] for k in a.keys]))  # b's index of a's i-th
    reps = [_replicate_metrics(c, counts, limits) for c in curves]
    sign = [1.0, -1.0]
    out = {f"{prefix}_auroc": (sum(sg * p[f"{prefix}_auroc"] for sg, p in zip(sign, points)),
                               sum(sg * r[0] for sg, r in zip(sign, reps)))}
    for x in limits:
        out[f"{prefix}_aupro@{x:g}"] = (sum(sg * p[f"{prefix}_aupro"][x] for sg, p in zip(sign, points)),
                                        sum(sg * r[1][x] for sg, r in zip(sign, reps)))
    out["exact_thresholds"] = all(c.exact for c in curves)  # type: ignore[assignment]
    return out


def interval_from_replicates(value: float, replicates: np.ndarray, level: float = 0.95) -> Interval:
    """The percentile interval of ``replicates`` (NaN replicates left out and counted) around ``value``."""
    return _interval(float(value), np.asarray(replicates, dtype=np.float64), level)


def class_seed(seed: int, group: str) -> int:
    """The bootstrap seed of one group (class) of a run: groups are resampled independently, which
    :func:`mean_interval` needs; stable across processes."""
    import zlib

    return (seed * 1_000_003 + zlib.crc32(group.encode())) % (2 ** 32)


def mean_interval(parts: Sequence[tuple[float, np.ndarray]], level: float = 0.95) -> Interval:
    """Mean over groups (e.g. classes) of a metric with its bootstrap interval: replicate k of the mean is
    the mean of the groups' replicates k. Valid when the groups were resampled independently (different
    seeds per group); a replicate where any group is undefined is undefined."""
    if not parts:
        raise ValueError("mean over zero groups")
    value = float(np.mean([v for v, _ in parts]))
    reps = np.mean(np.stack([np.asarray(r, dtype=np.float64) for _, r in parts]), axis=0)
    return _interval(value, reps, level)


def paired_difference(a: InstanceElements, b: InstanceElements, limits: Iterable[float] = (0.3, 0.01),
                      prefix: str = "voxel", n_boot: int = DEFAULT_N_BOOT, seed: int = 0, level: float = 0.95,
                      max_thresholds: int = DEFAULT_MAX_THRESHOLDS) -> dict:
    """Metric of ``a`` minus metric of ``b`` on the same instances, with the paired bootstrap interval
    (both evaluated on the same resampled instances in every replicate). Same keys as
    :meth:`InstanceElements.metrics`; an interval excluding 0 means the ordering is not chance."""
    reps = metric_replicates(a, b, limits, prefix, n_boot, seed, max_thresholds)
    exact = bool(reps.pop("exact_thresholds"))
    out: dict = {f"{prefix}_auroc": _interval(*reps.pop(f"{prefix}_auroc"), level)}
    if reps:
        out[f"{prefix}_aupro"] = {float(k.split("@", 1)[1]): _interval(*v, level) for k, v in reps.items()}
    out["n_instances"] = a.n_instances
    out["bootstrap"] = _bootstrap_meta(n_boot, seed, level, exact)
    return out


def instance_score_elements(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray,
                            keys: Sequence | None = None) -> InstanceElements:
    """One score per instance (keys: ``keys`` or 0, 1, ...) as an :class:`InstanceElements` set whose
    ``image`` AUROC is the I-AUROC: for intervals and paired differences of instance scores."""
    return _instance_set(scores, labels, keys)


def _instance_set(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray,
                  keys: Sequence | None = None) -> InstanceElements:
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = (np.asarray(labels).reshape(-1) != 0).astype(np.int64)
    if scores.shape != labels.shape:
        raise ValueError(f"{scores.size} scores but {labels.size} labels")
    keys = list(range(scores.size)) if keys is None else list(keys)
    if len(keys) != scores.size:
        raise ValueError(f"{scores.size} scores but {len(keys)} instance keys")
    _check_finite(scores, "instance scores")
    out = InstanceElements(regions=False)
    for key, s, lab in zip(keys, scores, labels):
        out.add(key, s.reshape(1, 1), lab.reshape(1, 1), label=int(lab))
    return out


def instance_auroc_interval(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray,
                            n_boot: int = DEFAULT_N_BOOT, seed: int = 0, level: float = 0.95) -> Interval:
    """I-AUROC (:func:`instance_auroc`) with its stratified bootstrap interval over instances."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        value = instance_auroc(scores, labels)
    res = _instance_set(scores, labels).metrics((), "image", n_boot, seed, level)
    return Interval(value, res["image_auroc"].low, res["image_auroc"].high, level, n_boot,
                    res["image_auroc"].n_undefined)


def paired_instance_auroc_difference(scores_a: Sequence[float] | np.ndarray, scores_b: Sequence[float] | np.ndarray,
                                     labels: Sequence[int] | np.ndarray, n_boot: int = DEFAULT_N_BOOT,
                                     seed: int = 0, level: float = 0.95) -> Interval:
    """I-AUROC(a) − I-AUROC(b) on the same instances with the paired bootstrap interval."""
    res = paired_difference(_instance_set(scores_a, labels), _instance_set(scores_b, labels), (), "image",
                            n_boot, seed, level)
    return res["image_auroc"]


def object_pixel_domain(depth: np.ndarray, gt_mask: np.ndarray | None = None) -> np.ndarray:
    """The object-foreground pixels of a multiview view: valid depth (the scanner measures only the
    object), plus every GT-anomalous pixel (anomalous elements always belong to the domain)."""
    depth = np.asarray(depth)
    dom = np.isfinite(depth) & (depth > 0)
    if gt_mask is not None:
        dom |= np.asarray(gt_mask) != 0
    return dom
