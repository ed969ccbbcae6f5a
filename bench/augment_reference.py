"""The per-sample loader work as it was before the benchmark-driven rewrites of issue 13, kept verbatim
as the reference ``bench_augment`` times the current code against and checks it bit for bit against:
the straightforward numpy depth crops (:mod:`pretrain.augment`) and the nearness normalisation
(:func:`shared.depth.normalize_depth`, gather the valid values, one partition, scatter back).
Not used by training.
"""

from __future__ import annotations

import math

import numpy as np

from pretrain.augment import _MAX_CROP_TRIES, CropParams, MultiCrop, _stack, sample_crop_params
from pretrain.config import AugConfig, CropsConfig
from shared.depth import MIN_VALID_PIXELS, percentiles, valid_mask

__all__ = ["depth_multicrop", "make_crop", "normalize_depth", "resample", "source_coordinates", "warp_crop",
           "MultiCrop"]


def normalize_depth(depth: np.ndarray, kind: str = "metric_z", mode: str = "nearness", eps: float = 0.1,
                    pct: tuple[float, float] = (0.5, 99.5), valid_range: tuple[float, float] | None = None
                    ) -> tuple[np.ndarray, np.ndarray, bool]:
    """The nearness / max normalisation as it was (argument checks left out). ``valid_range`` (the
    percentiles newer shards record) is ignored: the previous loader always searched for them."""
    depth = np.asarray(depth).astype(np.float32, copy=False)
    valid = valid_mask(depth, kind)
    x = np.zeros(depth.shape, dtype=np.float32)
    values = depth[valid]
    n_valid = values.size
    if mode == "max":
        vmax = float(values.max()) if n_valid else 0.0
        if n_valid < MIN_VALID_PIXELS or not vmax > 0:
            x[valid] = 1.0
            return x, valid, True
        x[valid] = (values.astype(np.float64) / vmax).astype(np.float32)
        return x, valid, False
    if n_valid < MIN_VALID_PIXELS:
        x[valid] = 1.0
        return x, valid, True
    lo, hi = percentiles(values, pct)
    if hi - lo <= 1e-12 * max(1.0, abs(hi)):
        x[valid] = 1.0
        return x, valid, True
    scale = np.float32(1.0 / (hi - lo))
    if kind == "metric_z":
        t = (np.float32(hi) - values) * scale
    else:
        t = (values - np.float32(lo)) * scale
    np.clip(t, 0.0, 1.0, out=t)
    x[valid] = np.float32(eps) + np.float32(1.0 - eps) * t
    return x, valid, False


def source_coordinates(params: CropParams, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Source positions (y, x) in edge coordinates of every output pixel centre, each (size, size).

    Flips and quarter turns act on centred output coordinates, which they permute exactly (so a
    rot90 crop equals ``np.rot90`` of the unrotated crop bit for bit).
    """
    centred = np.arange(size, dtype=np.float64) + 0.5 - size / 2
    b, a = np.meshgrid(centred, centred, indexing="ij")  # b: rows (y), a: columns (x)
    if params.hflip:
        a = -a
    if params.vflip:
        b = -b
    for _ in range(params.rot90_k % 4):  # quarter turn of the output grid
        a, b = b, -a
    x = a * (params.w / size)
    y = b * (params.h / size)
    if params.angle_deg:
        theta = math.radians(params.angle_deg)
        cos, sin = math.cos(theta), math.sin(theta)
        x, y = cos * x - sin * y, sin * x + cos * y
    return y + params.cy, x + params.cx


def resample(values: np.ndarray, valid: np.ndarray | None, ys: np.ndarray, xs: np.ndarray,
             interp: str = "masked_bilinear", edge_thresh: float | None = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Sample ``values`` (C, H, W) at edge coordinates (ys, xs) → (out (C, h, w) float32, valid (h, w)).

    Positions outside [0, H]×[0, W] are invalid (value 0). ``masked_bilinear``: bilinear weights w_i
    restricted to valid neighbours, v = Σ w_i m_i v_i / Σ w_i m_i, valid iff Σ w_i m_i ≥ 0.5; if the
    valid neighbours span more than ``edge_thresh`` the nearest valid neighbour (largest weight) is
    taken instead (no flying pixels across depth edges); the result is clamped to the span of the
    valid neighbours (exactly convex despite rounding). ``edge_thresh=None`` disables the edge rule
    (images). ``nearest``: the source pixel containing the position.
    """
    C, H, W = values.shape
    shape = ys.shape
    ys, xs = ys.ravel(), xs.ravel()
    inside = (ys >= 0) & (ys <= H) & (xs >= 0) & (xs <= W)
    flat_values = values.reshape(C, H * W)
    flat_valid = np.ones(H * W, dtype=bool) if valid is None else valid.reshape(H * W)
    if interp == "nearest":
        index = (np.clip(np.floor(ys), 0, H - 1).astype(np.intp) * W
                 + np.clip(np.floor(xs), 0, W - 1).astype(np.intp))
        ok = inside & flat_valid[index]
        out = np.where(ok, flat_values[:, index], 0).astype(np.float32)
        return out.reshape(C, *shape), ok.reshape(shape)
    if interp != "masked_bilinear":
        raise ValueError(f"unknown interpolation {interp!r}: use 'masked_bilinear' or 'nearest' (never bicubic on depth)")
    yc, xc = ys - 0.5, xs - 0.5  # pixel-centre coordinates
    y0f, x0f = np.floor(yc), np.floor(xc)
    fy, fx = (yc - y0f).astype(np.float32), (xc - x0f).astype(np.float32)
    row0 = np.clip(y0f, 0, H - 1).astype(np.intp) * W
    row1 = np.clip(y0f + 1, 0, H - 1).astype(np.intp) * W
    col0 = np.clip(x0f, 0, W - 1).astype(np.intp)
    col1 = np.clip(x0f + 1, 0, W - 1).astype(np.intp)
    taps = (row0 + col0, row0 + col1, row1 + col0, row1 + col1)
    gy, gx = 1 - fy, 1 - fx
    weights = (gy * gx, gy * fx, fy * gx, fy * fx)
    masks = [flat_valid[t] for t in taps]
    wm = [w * m for w, m in zip(weights, masks)]  # bilinear weights of the valid taps
    wsum = wm[0] + wm[1] + wm[2] + wm[3]
    ok = inside & (wsum >= 0.5)
    out = np.zeros((C, ys.size), dtype=np.float32)
    safe = np.where(wsum > 0, wsum, 1)
    tap_valid = np.stack(masks)  # (4, n)
    big = np.float32(np.inf)
    for c in range(C):
        v = np.stack([flat_values[c][t] for t in taps])  # (4, n)
        acc = (v[0] * wm[0] + v[1] * wm[1] + v[2] * wm[2] + v[3] * wm[3]) / safe
        vmin = np.where(tap_valid, v, big).min(axis=0)
        vmax = np.where(tap_valid, v, -big).max(axis=0)
        with np.errstate(invalid="ignore"):
            acc = np.clip(acc, vmin, vmax)  # exactly convex despite rounding
            edge = (vmax - vmin) > edge_thresh if edge_thresh is not None else None
        if edge is not None and edge.any():
            # nearest valid neighbour = the valid tap with the largest bilinear weight
            best = np.argmax(np.stack([w[edge] for w in wm]), axis=0)
            acc[edge] = v[:, edge][best, np.arange(best.size)]
        out[c] = np.where(ok, acc, 0)
    return out.reshape(C, *shape), ok.reshape(shape)


def warp_crop(values: np.ndarray, valid: np.ndarray | None, params: CropParams, size: int,
              interp: str = "masked_bilinear", edge_thresh: float | None = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """One crop (C, size, size) and its validity (size, size) from the source (C, H, W)."""
    ys, xs = source_coordinates(params, size)
    return resample(values, valid, ys, xs, interp, edge_thresh)


def make_crop(values: np.ndarray, valid: np.ndarray | None, size: int, scale: tuple[float, float], aug: AugConfig,
              rng: np.random.Generator, interp: str, edge_thresh: float | None) -> tuple[np.ndarray, np.ndarray, CropParams]:
    """Sample and warp one crop; redraw (≤ 10 tries, then keep the last) while the valid fraction is
    below ``aug.min_crop_valid``."""
    _, H, W = values.shape
    for _ in range(_MAX_CROP_TRIES):
        params = sample_crop_params(H, W, scale, aug, rng)
        crop, crop_valid = warp_crop(values, valid, params, size, interp, edge_thresh)
        if crop_valid.mean() >= aug.min_crop_valid:
            break
    return crop, crop_valid, params


def depth_multicrop(x: np.ndarray, valid: np.ndarray, crops: CropsConfig, aug: AugConfig,
                    rng: np.random.Generator) -> MultiCrop:
    """2 global + n local crops of a nearness-normalised depth map (spatial transforms only)."""
    values = x[None].astype(np.float32, copy=False)
    g = [make_crop(values, valid, crops.global_crops_size, tuple(crops.global_crops_scale), aug, rng,
                   aug.interp, aug.edge_thresh) for _ in range(2)]
    loc = [make_crop(values, valid, crops.local_crops_size, tuple(crops.local_crops_scale), aug, rng,
                     aug.interp, aug.edge_thresh) for _ in range(crops.local_crops_number)]
    return _stack(g, loc, crops, values.shape[0])
