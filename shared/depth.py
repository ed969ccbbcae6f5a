"""Canonical depth handling shared by data preparation, pretraining and detection.

Conventions (``../shared/spec/data_formats.md`` §1, §9, §10):

* depth arrays are float32 (H, W) with **NaN = invalid**, in raw source units (metric ``z``) or raw
  model output (relative disparity);
* :func:`normalize_depth` maps every map to "nearness": invalid pixels exactly 0, valid pixels in
  ``[eps, 1]`` with near = 1, invariant to units and to any positive affine change of the input;
* :func:`downsample_depth` shrinks large maps without mixing foreground and background across depth
  edges (no bilinear/bicubic resampling of depth, which spreads NaNs and blurs edges).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

DepthKind = Literal["metric_z", "rel_disparity"]
NormMode = Literal["nearness", "max"]
DownsampleMethod = Literal["nan_median", "nan_mean", "nearest"]

DEPTH_KINDS: tuple[str, ...] = ("metric_z", "rel_disparity")
MIN_VALID_PIXELS = 16  # fewer valid pixels than this: the percentiles say nothing, map is degenerate


@dataclass(frozen=True)
class DepthNormConfig:
    """Parameters of the canonical normalisation; written into exported encoders (``input_norm``)."""

    mode: NormMode = "nearness"
    eps: float = 0.1
    pct: tuple[float, float] = (0.5, 99.5)

    def to_dict(self) -> dict:
        return {"mode": self.mode, "eps": float(self.eps), "pct": [float(p) for p in self.pct]}

    @classmethod
    def from_dict(cls, d: dict) -> DepthNormConfig:
        return cls(mode=d.get("mode", "nearness"), eps=float(d.get("eps", 0.1)),
                   pct=tuple(float(p) for p in d.get("pct", (0.5, 99.5))))


def valid_mask(depth: np.ndarray, kind: DepthKind = "metric_z") -> np.ndarray:
    """Boolean validity of a raw depth map: finite, and strictly positive for metric z."""
    _check_kind(kind)
    valid = np.isfinite(depth)
    if kind == "metric_z":
        with np.errstate(invalid="ignore"):
            valid &= depth > 0
    return valid


def normalize_depth(
    depth: np.ndarray,
    kind: DepthKind = "metric_z",
    mode: NormMode = "nearness",
    eps: float = 0.1,
    pct: tuple[float, float] = (0.5, 99.5),
    valid_range: tuple[float, float] | None = None,
) -> tuple[np.ndarray, np.ndarray, bool]:
    """Per-image depth normalisation.

    Returns ``(x, valid, degenerate)``: ``x`` float32 (H, W) with invalid pixels exactly 0,
    ``valid`` the boolean mask, ``degenerate`` True when the map has fewer than 16 valid pixels or a
    (numerically) constant valid range, in which case every valid pixel is 1.0 (pretraining skips
    such samples).

    ``mode="nearness"``: robust affine map of the valid values to ``[eps, 1]`` with near = 1, using
    the ``pct`` percentiles (linear interpolation) as the range. For ``metric_z`` near = small z, for
    ``rel_disparity`` near = large value; the affine min-max removes the unknown scale and shift of
    disparity exactly.

    ``mode="max"``: the authors' parity convention, ``x = v / max(v)`` over valid pixels (metric z:
    far = 1). ``detect`` applies it after padding/resizing to reproduce their order exactly.

    ``valid_range``: the ``pct`` percentiles of this very map's valid values, computed beforehand by
    :func:`normalization_range` (shards store them at conversion, :func:`stored_valid_range`), so that
    only the affine map runs here; the output is the same bit for bit.
    """
    depth = np.asarray(depth)
    if depth.ndim != 2:
        raise ValueError(f"depth map must be 2-D (H, W), got shape {depth.shape}")
    if mode not in ("nearness", "max"):
        raise ValueError(f"unknown depth normalisation mode {mode!r}; expected 'nearness' or 'max'")
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"eps must be in [0, 1), got {eps}")
    if len(pct) != 2 or not 0.0 <= pct[0] < pct[1] <= 100.0:
        # out-of-range percentiles would index the partition from the wrong end, silently
        raise ValueError(f"pct must be two percentiles 0 <= lo < hi <= 100, got {tuple(pct)}")
    if depth.dtype.kind not in "biuf":
        raise ValueError(f"depth map must hold real numbers, got dtype {depth.dtype}")
    depth = depth.astype(np.float32, copy=False)
    valid = valid_mask(depth, kind)

    if mode == "max":
        x = np.zeros(depth.shape, dtype=np.float32)
        values = depth[valid]
        vmax = float(values.max()) if values.size else 0.0
        if values.size < MIN_VALID_PIXELS or not vmax > 0:
            x[valid] = 1.0
            return x, valid, True
        x[valid] = (values.astype(np.float64) / vmax).astype(np.float32)
        return x, valid, False

    n_valid = int(np.count_nonzero(valid))
    if n_valid < MIN_VALID_PIXELS:
        return _all_ones(valid), valid, True
    lo, hi = valid_range if valid_range is not None else valid_percentiles(depth, valid, pct, n_valid)
    if hi - lo <= 1e-12 * max(1.0, abs(hi)):
        return _all_ones(valid), valid, True
    # float32 arithmetic (the map is already float32 and the affine map needs no more precision than
    # its input has), in place over the whole map instead of on the gathered valid values plus a
    # scatter: the same operations on every valid pixel; then every invalid pixel (NaN, ±inf, z ≤ 0)
    # becomes exactly +0.0 by clearing its bits.
    scale = np.float32(1.0 / (hi - lo))
    with np.errstate(invalid="ignore", over="ignore"):
        if kind == "metric_z":
            x = np.subtract(np.float32(hi), depth, dtype=np.float32)
        else:
            x = np.subtract(depth, np.float32(lo), dtype=np.float32)
        x *= scale
        np.maximum(x, np.float32(0.0), out=x)  # = np.clip(x, 0, 1) on the valid (finite) pixels
        np.minimum(x, np.float32(1.0), out=x)
        x *= np.float32(1.0 - eps)
        x += np.float32(eps)
    x.view(np.int32)[...] &= -valid.view(np.int8).astype(np.int32)  # bits kept where valid, 0 elsewhere
    return x, valid, False


def normalization_range(depth: np.ndarray, kind: DepthKind = "metric_z",
                        pct: tuple[float, float] = (0.5, 99.5)) -> dict | None:
    """The record shards keep of a stored map's nearness range, ``{"pct": [lo %, hi %], "lo", "hi"}``
    (the ``pct`` percentiles of its valid values, as :func:`normalize_depth` computes them), or None for a
    map with too few valid pixels to normalise."""
    depth = np.asarray(depth).astype(np.float32, copy=False)
    valid = valid_mask(depth, kind)
    n_valid = int(np.count_nonzero(valid))
    if n_valid < MIN_VALID_PIXELS:
        return None
    lo, hi = valid_percentiles(depth, valid, pct, n_valid)
    return {"pct": [float(pct[0]), float(pct[1])], "lo": lo, "hi": hi}


def stored_valid_range(meta: dict, pct: tuple[float, float]) -> tuple[float, float] | None:
    """``valid_range`` for :func:`normalize_depth` from a shard sample's metadata, when it recorded the
    range for the same percentiles (older shards, or other percentiles: None, computed then)."""
    rec = meta.get("norm_range")
    if not isinstance(rec, dict) or [float(v) for v in rec.get("pct", ())] != [float(pct[0]), float(pct[1])]:
        return None
    lo, hi = rec.get("lo"), rec.get("hi")
    if not isinstance(lo, (int, float)) or not isinstance(hi, (int, float)):
        return None
    return float(lo), float(hi)


def _all_ones(valid: np.ndarray) -> np.ndarray:
    x = np.zeros(valid.shape, dtype=np.float32)
    x[valid] = 1.0
    return x


def percentiles(values: np.ndarray, pct: tuple[float, float]) -> tuple[float, float]:
    """Percentiles with linear interpolation (``np.percentile``'s default), via one partition."""
    n = values.size
    pos = np.asarray(pct, dtype=np.float64) / 100.0 * (n - 1)
    below = np.floor(pos).astype(np.int64)
    above = np.minimum(below + 1, n - 1)
    part = np.partition(values, np.unique(np.concatenate([below, above])))
    frac = pos - below
    res = part[below].astype(np.float64) * (1.0 - frac) + part[above].astype(np.float64) * frac
    return float(res[0]), float(res[1])


_SAMPLE_STEP = 16  # every 16th pixel brackets the tails (valid_percentiles)


def valid_percentiles(depth: np.ndarray, valid: np.ndarray, pct: tuple[float, float],
                      n_valid: int | None = None) -> tuple[float, float]:
    """``percentiles(depth[valid], pct)``, exactly, without gathering and partitioning every valid value.

    The percentiles of the normalisation sit in the tails (0.5 % / 99.5 %): a threshold taken from a
    strided sample selects the few valid values at or below it (resp. at or above), and the order
    statistics are read from those alone. That is exact whenever the selection holds at least as many
    values as the rank needs — the selected values are then precisely the smallest (largest) ones,
    ties included — which is checked; otherwise (unlucky sample, small map) the full partition runs.
    """
    flat, vflat = depth.reshape(-1), valid.reshape(-1)
    n = int(np.count_nonzero(vflat)) if n_valid is None else n_valid
    pos = np.asarray(pct, dtype=np.float64) / 100.0 * (n - 1)
    below = np.floor(pos).astype(np.int64)
    above = np.minimum(below + 1, n - 1)
    ranks = sorted({int(r) for r in np.concatenate([below, above])})
    stats = _tail_order_statistics(flat, vflat, n, ranks) if n >= 64 * _SAMPLE_STEP else None
    if stats is None:
        part = np.partition(flat[vflat], ranks)
        stats = {r: part[r] for r in ranks}
    frac = pos - below
    res = [float(np.float64(stats[int(b)]) * (1.0 - f) + np.float64(stats[int(a)]) * f)
           for b, a, f in zip(below, above, frac)]
    return res[0], res[1]


def _tail_order_statistics(flat: np.ndarray, vflat: np.ndarray, n: int, ranks: list[int]) -> dict | None:
    """{rank: value} of the ascending order statistics ``ranks`` of ``flat[vflat]`` (n values) via tail
    selections, or None when a selection turns out too small or too large to pay off."""
    sample = flat[::_SAMPLE_STEP][vflat[::_SAMPLE_STEP]]
    m = sample.size
    if m < 64:
        return None
    low = [r for r in ranks if r < n // 2]
    high = [r for r in ranks if r >= n // 2]
    margin = 1.25
    q_low = min(m - 1, int((max(low) + 1) * m / n * margin) + 8) if low else None
    q_high = max(0, m - 1 - int((n - min(high)) * m / n * margin) - 8) if high else None
    qs = sorted({q for q in (q_low, q_high) if q is not None})
    sample_part = np.partition(sample, qs)
    out: dict = {}
    if low:
        cand = flat[(flat <= sample_part[q_low]) & vflat]  # NaN compares False; invalid masked out
        if cand.size <= max(low) or cand.size > n // 4:
            return None
        part = np.partition(cand, low)
        out.update({r: part[r] for r in low})
    if high:
        need = n - min(high)  # values of rank ≥ min(high)
        cand = flat[(flat >= sample_part[q_high]) & vflat]
        if cand.size < need or cand.size > n // 4:
            return None
        offset = n - cand.size
        part = np.partition(cand, [r - offset for r in high])
        out.update({r: part[r - offset] for r in high})
    return out


def max_normalize(depth_zero_invalid: np.ndarray) -> np.ndarray:
    """The authors' "max" convention on an already padded/resized map with invalid = 0."""
    vmax = float(np.max(depth_zero_invalid)) if depth_zero_invalid.size else 0.0
    if vmax <= 0:
        return np.zeros_like(depth_zero_invalid, dtype=np.float32)
    return (depth_zero_invalid / vmax).astype(np.float32)


def target_size(height: int, width: int, max_side: int) -> tuple[int, int]:
    """Output (h, w) of :func:`downsample_depth`: longest side = ``max_side``, aspect kept."""
    if max_side < 1:
        raise ValueError(f"max_side must be >= 1, got {max_side}")
    if max(height, width) <= max_side or min(height, width) == 0:  # small enough, or no pixel at all
        return height, width
    r = max_side / max(height, width)
    return max(1, round(height * r)), max(1, round(width * r))


def downsample_depth(
    depth: np.ndarray,
    max_side: int = 1024,
    method: DownsampleMethod = "nan_median",
    valid_frac_min: float = 0.5,
) -> np.ndarray:
    """NaN-aware downsampling of a depth map so that its longest side is at most ``max_side``.

    Output pixel (i, j) covers source rows ``[floor(i*H/h), ceil((i+1)*H/h))`` and the matching
    columns. ``nan_median`` takes the (lower) median of the finite values, always an actual sample, so
    it picks one side of a depth edge instead of averaging foreground with background, ``nan_mean`` their float64 mean; either is NaN
    when the finite fraction of the footprint is below ``valid_frac_min``. ``nearest`` samples the
    source pixel at ``floor((i + 1/2) * H / h)``. Maps already small enough are returned unchanged
    (as float32).
    """
    depth = np.asarray(depth, dtype=np.float32)
    if depth.ndim != 2:
        raise ValueError(f"depth map must be 2-D (H, W), got shape {depth.shape}")
    if method not in ("nan_median", "nan_mean", "nearest"):
        raise ValueError(f"unknown downsampling method {method!r}")
    H, W = depth.shape
    h, w = target_size(H, W, max_side)
    if (h, w) == (H, W):
        return depth
    if method == "nearest":
        rows = np.floor((np.arange(h) + 0.5) * H / h).astype(np.int64)
        cols = np.floor((np.arange(w) + 0.5) * W / w).astype(np.int64)
        return depth[np.ix_(rows, cols)]

    r0 = (np.arange(h) * H) // h
    r1 = -((-(np.arange(1, h + 1)) * H) // h)  # ceil((i+1)*H/h) in exact integer arithmetic
    c0 = (np.arange(w) * W) // w
    c1 = -((-(np.arange(1, w + 1)) * W) // w)
    if method == "nan_mean":
        return _footprint_mean(depth, r0, r1, c0, c1, valid_frac_min)
    return _footprint_median(depth, r0, r1, c0, c1, valid_frac_min)


def _footprint_mean(depth, r0, r1, c0, c1, valid_frac_min) -> np.ndarray:
    # Summed-area tables give every (overlapping, variable-size) footprint in O(1).
    finite = np.isfinite(depth)
    vals = np.where(finite, depth, 0.0).astype(np.float64)
    sat_v = np.zeros((vals.shape[0] + 1, vals.shape[1] + 1))
    sat_n = np.zeros_like(sat_v)
    sat_v[1:, 1:] = vals.cumsum(0).cumsum(1)
    sat_n[1:, 1:] = finite.astype(np.float64).cumsum(0).cumsum(1)

    def box(sat):
        return (sat[np.ix_(r1, c1)] - sat[np.ix_(r0, c1)] - sat[np.ix_(r1, c0)] + sat[np.ix_(r0, c0)])

    total = np.outer(r1 - r0, c1 - c0).astype(np.float64)
    count = box(sat_n)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = box(sat_v) / count
    ok = (count > 0) & (count / total >= valid_frac_min)
    return np.where(ok, mean, np.nan).astype(np.float32)


def _footprint_median(depth, r0, r1, c0, c1, valid_frac_min) -> np.ndarray:
    # Footprints come in at most two heights and two widths; each (height, width) group is gathered
    # into one (rows, cols, fh*fw) array and sorted once (NaN sorts last), then the lower median of
    # the finite values is picked per footprint: an actual sample, never the average of a foreground
    # and a background value.
    h, w = len(r0), len(c0)
    out = np.full((h, w), np.nan, dtype=np.float32)
    heights, widths = r1 - r0, c1 - c0
    for fh in np.unique(heights):
        rows = np.nonzero(heights == fh)[0]
        row_idx = r0[rows][:, None] + np.arange(fh)[None, :]  # (nr, fh)
        for fw in np.unique(widths):
            cols = np.nonzero(widths == fw)[0]
            col_idx = c0[cols][:, None] + np.arange(fw)[None, :]  # (nc, fw)
            blocks = depth[row_idx[:, None, :, None], col_idx[None, :, None, :]]  # (nr, nc, fh, fw)
            blocks = np.sort(blocks.reshape(len(rows), len(cols), fh * fw), axis=-1)
            n_finite = np.isfinite(blocks).sum(-1)
            pick = np.maximum(n_finite - 1, 0) // 2
            med = np.take_along_axis(blocks, pick[..., None], axis=-1)[..., 0]
            ok = (n_finite > 0) & (n_finite / (fh * fw) >= valid_frac_min)
            out[np.ix_(rows, cols)] = np.where(ok, med, np.nan)
    return out


def rescale_intrinsics(K: np.ndarray, scale_x: float, scale_y: float) -> np.ndarray:
    """Intrinsics of a resized image, OpenCV integer-centre convention: f' = f s, c' = (c + ½) s − ½."""
    K2 = np.array(K, dtype=np.float64, copy=True)
    K2[0, 0] *= scale_x
    K2[1, 1] *= scale_y
    K2[0, 1] *= scale_x
    K2[0, 2] = (K2[0, 2] + 0.5) * scale_x - 0.5
    K2[1, 2] = (K2[1, 2] + 0.5) * scale_y - 0.5
    return K2


def depth_stats(depth: np.ndarray) -> dict:
    """Summary of the valid (finite) values, for shard metadata and range checks."""
    finite = depth[np.isfinite(depth)]
    if finite.size == 0:
        return {"p0_5": None, "p99_5": None, "min": None, "max": None}
    p_lo, p_hi = np.percentile(finite, (0.5, 99.5))
    return {"p0_5": float(p_lo), "p99_5": float(p_hi), "min": float(finite.min()), "max": float(finite.max())}


def _check_kind(kind: str) -> None:
    if kind not in DEPTH_KINDS:
        raise ValueError(f"unknown depth kind {kind!r}; expected one of {DEPTH_KINDS}")
