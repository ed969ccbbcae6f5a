"""3D anomaly volumes: back-project per-view anomaly maps and max-aggregate them on a voxel grid
(``../shared/spec/modmap.md`` §12, ``metrics.md`` §7).

:class:`VolumeAccumulator` is fed one view at a time (streaming, memory = one dense float32 grid plus
two boolean grids, independent of the number of views). For each view it

1. computes voxel indices of every valid depth pixel in one fused affine step
   (``index = ⌊depth · (A·[u+c, v+c, 1]) + b⌋`` with ``A = R·K⁻¹ / voxel`` and
   ``b = (t − origin) / voxel``; range depth is first divided by the ray length), without building
   camera or world point arrays;
2. marks those voxels as occupied (the evaluation domain; independent of scores);
3. max-scatters the scores of the foreground pixels (``np.maximum.at``).

The view is processed in blocks of rows (``add_view``), so that every temporary is small and cache
resident instead of several arrays over all valid pixels (fresh memory, i.e. page faults, per view).

Points outside the grid are dropped and counted. Conventions (camera-to-world poses, OpenCV axes,
``pixel_center``, voxel index = ⌊(X − origin)/voxel⌋) are those of :mod:`shared.geometry`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from shared.geometry import DEPTH_TYPES, VoxelGrid, invert_rigid


@dataclass(frozen=True)
class ViewCalibration:
    """Calibration of one view, checked on construction (the SiM3D readers' ``ViewCalib``).

    ``K`` 3×3 pixels; ``T_c2w`` 4×4 camera-to-world (OpenCV axes: x right, y down, z forward);
    ``depth_scale`` metres per stored depth unit; ``depth_type`` ``'z'`` (along the optical axis) or
    ``'range'`` (along the ray); ``pixel_center`` 0.0 (OpenCV: integer coordinates are pixel centres) or
    0.5; ``width``/``height`` the image size it belongs to (0: not known).
    """

    K: np.ndarray
    T_c2w: np.ndarray
    depth_scale: float = 1.0
    depth_type: str = "z"
    pixel_center: float = 0.0
    width: int = 0
    height: int = 0

    def __post_init__(self) -> None:
        K = np.asarray(self.K, dtype=np.float64)
        T = np.asarray(self.T_c2w, dtype=np.float64)
        if K.shape != (3, 3) or not np.isfinite(K).all() or K[0, 0] <= 0 or K[1, 1] <= 0:
            raise ValueError(f"K must be a finite 3×3 intrinsic matrix with positive focal lengths, got {K!r}")
        if not np.allclose(K[2], [0.0, 0.0, 1.0], atol=1e-9):
            raise ValueError(f"K's last row must be [0, 0, 1], got {K[2]}")
        if T.shape != (4, 4) or not np.isfinite(T).all():
            raise ValueError(f"T_c2w must be a finite 4×4 matrix, got shape {T.shape}")
        R = T[:3, :3]
        if not np.allclose(T[3], [0, 0, 0, 1], atol=1e-9) or not np.allclose(R.T @ R, np.eye(3), atol=1e-4) \
                or np.linalg.det(R) <= 0:
            raise ValueError("T_c2w must be a rigid transform (orthonormal rotation with det +1, last row "
                             "[0, 0, 0, 1]); a Blender/OpenGL pose needs the diag(1, -1, -1, 1) flip")
        if int(self.width) < 0 or int(self.height) < 0:
            raise ValueError(f"width/height must be positive (0: not known), got {self.width}×{self.height}")
        if self.depth_type not in DEPTH_TYPES:
            raise ValueError(f"depth_type must be one of {DEPTH_TYPES}, got {self.depth_type!r}")
        if not float(self.depth_scale) > 0:
            raise ValueError(f"depth_scale must be > 0, got {self.depth_scale}")
        object.__setattr__(self, "K", K)
        object.__setattr__(self, "T_c2w", T)
        object.__setattr__(self, "width", int(self.width))
        object.__setattr__(self, "height", int(self.height))
        object.__setattr__(self, "depth_scale", float(self.depth_scale))
        object.__setattr__(self, "pixel_center", float(self.pixel_center))

    @property
    def T_w2c(self) -> np.ndarray:
        return invert_rigid(self.T_c2w)

    @property
    def center(self) -> np.ndarray:
        """Camera centre in world coordinates."""
        return self.T_c2w[:3, 3].copy()


def _pixel_affine(calib: ViewCalibration, origin: np.ndarray, voxel_size: float) -> tuple[np.ndarray, np.ndarray]:
    """(A, b) with voxel coordinate = depth_z · (A @ [u + c, v + c, 1]) + b."""
    K_inv = np.linalg.inv(calib.K)
    R, t = calib.T_c2w[:3, :3], calib.T_c2w[:3, 3]
    A = (R @ K_inv) * (calib.depth_scale / voxel_size)
    b = (t - np.asarray(origin, dtype=np.float64)) / voxel_size
    return A, b


def _check_inputs(depth: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    depth = np.asarray(depth)
    if depth.ndim != 2:
        raise ValueError(f"depth must be (H, W), got {depth.shape}")
    if mask is not None and mask.shape != depth.shape:
        raise ValueError(f"mask shape {mask.shape} != depth shape {depth.shape}")
    return depth


@dataclass
class _ViewGeometry:
    """Per-view constants of the back-projection: pixel-centre tables and K⁻¹."""

    H: int
    W: int
    uc: np.ndarray
    vc: np.ndarray
    K_inv: np.ndarray
    ray_factor: bool  # range depth, or a K whose last row is not (0, 0, 1): divide by the ray

    @classmethod
    def of(cls, depth: np.ndarray, calib: ViewCalibration) -> _ViewGeometry:
        H, W = depth.shape
        K_inv = np.linalg.inv(calib.K)
        return cls(H, W, np.arange(W, dtype=np.float64) + calib.pixel_center,
                   np.arange(H, dtype=np.float64) + calib.pixel_center, K_inv,
                   calib.depth_type == "range" or not np.array_equal(K_inv[2], [0.0, 0.0, 1.0]))


def _valid_pixels(depth: np.ndarray, calib: ViewCalibration, mask: np.ndarray | None, stride: int,
                  rows: tuple[int, int] | None = None, geo: _ViewGeometry | None = None):
    """Row-major valid pixels and the factor f with X_cam = f · K⁻¹[u + c, v + c, 1] for each; only the
    rows [r0, r1) with ``rows`` (flat pixel indices and v stay those of the whole map)."""
    depth = _check_inputs(depth, mask)
    geo = geo or _ViewGeometry.of(depth, calib)
    W = geo.W
    r0, r1 = rows if rows is not None else (0, geo.H)
    block = depth[r0:r1]
    with np.errstate(invalid="ignore"):
        valid = np.isfinite(block) & (block > 0)
    if mask is not None:
        valid &= mask[r0:r1]
    if stride > 1:
        sub = np.zeros_like(valid)
        first = (-r0) % stride  # global rows that are multiples of the stride
        sub[first::stride, ::stride] = valid[first::stride, ::stride]
        valid = sub
    flat_pix = np.flatnonzero(valid)  # row-major, within the block
    factor = block.reshape(-1)[flat_pix].astype(np.float64)
    v = flat_pix // W
    u = flat_pix - v * W
    if r0:
        v += r0
        flat_pix += r0 * W
    if geo.ray_factor:
        # z-depth: X_cam = z·r/r_z; range: X_cam = range·r/‖r‖, with r = K⁻¹[u + c, v + c, 1].
        K_inv = geo.K_inv
        ray = [K_inv[k, 0] * geo.uc[u] + K_inv[k, 1] * geo.vc[v] + K_inv[k, 2] for k in range(3)]
        if calib.depth_type == "range":
            factor /= np.sqrt(ray[0] * ray[0] + ray[1] * ray[1] + ray[2] * ray[2])
        else:
            factor /= ray[2]
    return flat_pix, u, v, factor, geo.uc, geo.vc


def voxel_coordinates(depth: np.ndarray, calib: ViewCalibration, origin: np.ndarray, voxel_size: float,
                      mask: np.ndarray | None = None, stride: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Continuous voxel coordinates (M, 3) float64 of the valid (and masked) pixels of ``depth``.

    Returns ``(coords, flat_pixel_index)`` with pixels in row-major order; ``⌊coords⌋`` is the voxel
    index. Valid = finite and > 0. ``stride`` keeps every ``stride``-th row and column.
    """
    flat_pix, u, v, factor, uc, vc = _valid_pixels(depth, calib, mask, stride)
    A, b = _pixel_affine(calib, origin, voxel_size)
    coords = np.empty((flat_pix.size, 3), dtype=np.float64)
    # Per-row and per-column terms are tiny tables; gathering them avoids (M, 3) matmuls.
    for k in range(3):
        coords[:, k] = factor * ((A[k, 0] * uc)[u] + (A[k, 1] * vc + A[k, 2])[v]) + b[k]
    return coords, flat_pix


_BLOCK_PIXELS = 1 << 15  # pixels per row block: a block's temporaries stay small and in the CPU cache


def _row_blocks(height: int, width: int) -> list[tuple[int, int]]:
    rows = max(1, _BLOCK_PIXELS // max(1, width))
    return [(r, min(height, r + rows)) for r in range(0, height, rows)]


def _voxel_block(depth: np.ndarray, calib: ViewCalibration, grid: VoxelGrid, tables: tuple,
                 mask: np.ndarray | None, stride: int, rows: tuple[int, int], geo: _ViewGeometry
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(flat voxel index, inside grid, flat pixel index) of the valid pixels of rows [r0, r1).
    ``tables`` = (per-column terms, per-row terms, offsets) of the voxel affine (:func:`_voxel_tables`)."""
    shape = grid.shape
    col, row, off = tables
    flat_pix, u, v, factor, _, _ = _valid_pixels(depth, calib, mask, stride, rows, geo)
    flat_vox = np.zeros(flat_pix.size, dtype=np.int64)
    inside = np.ones(flat_pix.size, dtype=bool)
    for k in range(3):
        c = col[k][u]
        c += row[k][v]
        c *= factor
        # Shift by one voxel so that truncation equals floor for every coordinate > -1; anything at or
        # below -1 (and every negative index) fails the single unsigned range check below.
        c += off[k]
        idx = c.astype(np.int64)
        idx -= 1
        inside &= idx.view(np.uint64) < np.uint64(shape[k])
        flat_vox *= shape[k]
        flat_vox += idx
    return flat_vox, inside, flat_pix


def _voxel_tables(calib: ViewCalibration, grid: VoxelGrid, geo: _ViewGeometry) -> tuple:
    A, b = _pixel_affine(calib, grid.origin, grid.voxel_size)
    return ([A[k, 0] * geo.uc for k in range(3)], [A[k, 1] * geo.vc + A[k, 2] for k in range(3)],
            [b[k] + 1.0 for k in range(3)])


def voxel_indices(depth: np.ndarray, calib: ViewCalibration, grid: VoxelGrid, mask: np.ndarray | None = None,
                  stride: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flat voxel index of every valid (and masked) pixel, the mask of those inside ``grid``, and the
    flat pixel index, pixels in row-major order. Computed axis by axis (no (M, 3) temporaries), in
    blocks of rows (see :meth:`VolumeAccumulator.add_view`)."""
    depth = _check_inputs(depth, mask)
    geo = _ViewGeometry.of(depth, calib)
    tables = _voxel_tables(calib, grid, geo)
    parts = [_voxel_block(depth, calib, grid, tables, mask, stride, rows, geo) for rows in _row_blocks(*depth.shape)]
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(3))  # type: ignore[return-value]


def scatter_max_runs(target: np.ndarray, flat_index: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``target[i] = max(target[i], values)`` for repeated indices, vectorised.

    Runs of equal consecutive indices (pixel order keeps neighbours together) are reduced first with
    ``np.maximum.reduceat``, then the run maxima are scattered with ``np.maximum.at``. Returns the
    index of every run (each distinct index of ``flat_index`` at least once).
    """
    if flat_index.size == 0:
        return flat_index
    starts = np.flatnonzero(flat_index[1:] != flat_index[:-1])
    starts += 1
    starts = np.concatenate([np.zeros(1, starts.dtype), starts])
    run_max = np.maximum.reduceat(values.astype(target.dtype, copy=False), starts)
    run_index = flat_index[starts]
    np.maximum.at(target, run_index, run_max)
    return run_index


@dataclass
class VolumeAccumulator:
    """Streaming voxel max-aggregation of per-view score maps for one instance.

    ``view_aggregation="mean"`` (a demo-scale option; the paper's is ``max``): a voxel's score is the mean,
    over the views that score it, of each view's maximum in that voxel, so that what one view alone sees
    (a specular highlight, a silhouette) is diluted by the views that see the surface plainly.

    Context pixels (``add_view(..., context=mask)``, the occlusion gate of ``detect.infer``) form a second
    tier: a voxel takes the maximum over the views that score it plainly, and the maximum over the views
    that see it only as context (e.g. through a hole, past an occluding edge) only when no view scores it
    plainly. The results (:meth:`volume`, :meth:`instance_score`, :meth:`save_npz`, ``scores``/``hit``
    after :meth:`finish`) merge the two tiers."""

    grid: VoxelGrid
    view_aggregation: str = "max"
    scores: np.ndarray = field(init=False)
    hit: np.ndarray = field(init=False)
    occupied: np.ndarray = field(init=False)
    dropped: int = field(default=0, init=False)
    n_points: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        n = int(np.prod(self.grid.shape))
        self.scores = np.zeros(n, dtype=np.float32)
        self.hit = np.zeros(n, dtype=bool)
        self.occupied = np.zeros(n, dtype=bool)
        self._ctx_scores: np.ndarray | None = None  # second tier, allocated by the first context pixel
        self._ctx_hit: np.ndarray | None = None
        if self.view_aggregation not in ("max", "mean", "second"):
            raise ValueError(f"view_aggregation must be 'max', 'mean' or 'second', got {self.view_aggregation!r}")
        if self.view_aggregation != "max":  # one view's maxima, then folded over views
            self._view = np.zeros(n, dtype=np.float32)
            self._view_hit = np.zeros(n, dtype=bool)
            self._count = np.zeros(n, dtype=np.int32)
        if self.view_aggregation == "mean":
            self._sum = np.zeros(n, dtype=np.float64)
        if self.view_aggregation == "second":
            self._top = np.zeros((2, n), dtype=np.float32)

    def _target(self) -> tuple[np.ndarray, np.ndarray]:
        """(scores, hit) arrays a view scatters into: the volume's (max), or the view's own (mean, second)."""
        return (self.scores, self.hit) if self.view_aggregation == "max" else (self._view, self._view_hit)

    def _end_view(self) -> None:
        """Mean mode: fold the view's maxima into the per-voxel means; second mode: into the two highest."""
        if self.view_aggregation == "max":
            return
        idx = np.flatnonzero(self._view_hit)
        self._count[idx] += 1
        if self.view_aggregation == "mean":
            self._sum[idx] += self._view[idx]
            self.scores[idx] = (self._sum[idx] / self._count[idx]).astype(np.float32)
        else:
            v, top = self._view[idx], self._top[:, idx]
            top[1] = np.maximum(top[1], np.minimum(top[0], v))
            top[0] = np.maximum(top[0], v)
            self._top[:, idx] = top
            self.scores[idx] = np.where(self._count[idx] >= 2, top[1], top[0])
        self.hit[idx] = True
        self._view[idx] = 0.0
        self._view_hit[idx] = False

    def _context_target(self) -> tuple[np.ndarray, np.ndarray]:
        if self._ctx_scores is None:
            self._ctx_scores = np.zeros_like(self.scores)
            self._ctx_hit = np.zeros_like(self.hit)
        return self._ctx_scores, self._ctx_hit  # type: ignore[return-value]

    def _scatter(self, vox: np.ndarray, vals: np.ndarray, ctx: np.ndarray | None) -> None:
        """Max-scatter scores into the plain tier, and those of context pixels (``ctx``) into the second."""
        if ctx is not None and ctx.any():
            c_scores, c_hit = self._context_target()
            np.maximum.at(c_scores, vox[ctx], vals[ctx])
            c_hit[vox[ctx]] = True
            vox, vals = vox[~ctx], vals[~ctx]
        target, target_hit = self._target()
        # numpy ≥ 2's ufunc.at fast path beats reducing runs of equal voxels first (reduceat) here
        np.maximum.at(target, vox, vals)
        target_hit[vox] = True

    def add_points(self, points: np.ndarray, scores: np.ndarray) -> None:
        """Max-scatter ``scores`` (K,) onto the voxels of world ``points`` (K, 3), plain tier; occupancy is
        left to the views. Points outside the grid are dropped (and counted)."""
        if self.view_aggregation == "mean":
            raise ValueError("add_points needs view_aggregation 'max' or 'second' (the view's points, added before "
                             "its add_view)")
        points = np.asarray(points, np.float64).reshape(-1, 3)
        scores = np.asarray(scores, np.float32).reshape(-1)
        if len(points) != len(scores):
            raise ValueError(f"{len(points)} points but {len(scores)} scores")
        if not np.isfinite(scores).all():
            raise ValueError("non-finite scores")
        idx, inside = self.grid.index(points)
        self.dropped += int((~inside).sum())
        self.n_points += int(inside.sum())
        self._scatter(np.ravel_multi_index(idx[inside].T, self.grid.shape), scores[inside], None)

    def add_view(self, depth: np.ndarray, calib: ViewCalibration, score_map: np.ndarray | None,
                 foreground: np.ndarray | None, stride: int = 1, context: np.ndarray | None = None) -> None:
        """Mark occupancy with every valid pixel; max-scatter ``score_map`` over foreground pixels
        (``context``: pixels whose score goes to the second tier, see the class).

        Works through the view in blocks of rows: every temporary is a block's worth (small, cache
        resident, reused by the allocator) instead of several arrays of all M valid pixels (tens of
        MB of fresh memory per view, i.e. page faults). Same result as one pass — max and "or" do not
        depend on the order — except that non-finite scores are looked for before anything is added.
        """
        depth = _check_inputs(depth, None)
        if score_map is not None:
            score_map = np.asarray(score_map)
            if score_map.shape != depth.shape:
                raise ValueError(f"score map {score_map.shape} and depth {depth.shape} differ in shape")
            if foreground is not None and foreground.shape != depth.shape:
                raise ValueError(f"foreground mask {foreground.shape} and depth {depth.shape} differ in shape")
            if context is not None and context.shape != depth.shape:
                raise ValueError(f"context mask {context.shape} and depth {depth.shape} differ in shape")
            if context is not None and self.view_aggregation == "mean":
                raise ValueError("context pixels (the occlusion gate) need view_aggregation 'max' or 'second'")
            if not np.isfinite(score_map).all():
                self._add_view_checked(depth, calib, score_map, foreground, stride, context)
                return
        geo = _ViewGeometry.of(depth, calib)
        tables = _voxel_tables(calib, self.grid, geo)
        flat_scores = None if score_map is None else score_map.reshape(-1)
        flat_fg = None if foreground is None else foreground.reshape(-1)
        flat_ctx = None if context is None else context.reshape(-1)
        for rows in _row_blocks(*depth.shape):
            vox, inside, flat_pix = _voxel_block(depth, calib, self.grid, tables, None, stride, rows, geo)
            self.occupied[vox[inside]] = True
            if flat_scores is None:
                continue
            sel = self._count_scored(inside, None if flat_fg is None else flat_fg[flat_pix])
            pix = flat_pix[sel]
            self._scatter(vox[sel], flat_scores[pix].astype(np.float32), None if flat_ctx is None else flat_ctx[pix])
        if flat_scores is not None:
            self._end_view()

    def _count_scored(self, inside: np.ndarray, fg: np.ndarray | None) -> np.ndarray:
        """Points that carry a score (inside the grid, and foreground when a mask is given); counts the
        scored points and those dropped for falling outside the grid."""
        if fg is None:
            self.dropped += int(np.count_nonzero(~inside))
            self.n_points += int(inside.size)
            return inside
        self.dropped += int(np.count_nonzero(fg & ~inside))
        self.n_points += int(np.count_nonzero(fg))
        return inside & fg

    def _add_view_checked(self, depth: np.ndarray, calib: ViewCalibration, score_map: np.ndarray,
                          foreground: np.ndarray | None, stride: int, context: np.ndarray | None = None) -> None:
        """The one-pass version, for score maps with non-finite values: raises if one of them falls on
        a scored pixel (after marking the occupancy), before any score is added."""
        vox, inside, flat_pix = voxel_indices(depth, calib, self.grid, None, stride)
        self.occupied[vox[inside]] = True
        sel = self._count_scored(inside, None if foreground is None else foreground.reshape(-1)[flat_pix])
        vals = score_map.reshape(-1)[flat_pix[sel]].astype(np.float32)
        if not np.all(np.isfinite(vals)):
            raise ValueError("anomaly scores contain non-finite values")
        if context is not None:
            self._scatter(vox[sel], vals, context.reshape(-1)[flat_pix[sel]])
        else:
            target, target_hit = self._target()
            target_hit[scatter_max_runs(target, vox[sel], vals)] = True
        self._end_view()

    # -- results ----------------------------------------------------------------------------------
    def finish(self) -> None:
        """Merge the context tier into ``scores``/``hit`` (voxels that no view scores plainly); views added
        afterwards start a new second tier. Every result accessor calls it."""
        if self._ctx_hit is None:
            return
        only_ctx = self._ctx_hit & ~self.hit
        self.scores[only_ctx] = self._ctx_scores[only_ctx]  # type: ignore[index]
        self.hit |= only_ctx
        self._ctx_scores = self._ctx_hit = None

    def volume(self) -> np.ndarray:
        self.finish()
        return self.scores.reshape(self.grid.shape)

    def occupancy(self) -> np.ndarray:
        return self.occupied.reshape(self.grid.shape)

    def instance_score(self) -> float:
        self.finish()
        return float(self.scores.max()) if self.scores.size else 0.0

    def save_npz(self, path: str | os.PathLike, **extra) -> Path:
        """Sparse storage (modmap §18): hit voxel indices + scores, occupancy indices, grid."""
        from shared.io import atomic_open

        self.finish()
        hit_flat = np.flatnonzero(self.hit)
        occ_flat = np.flatnonzero(self.occupied)
        payload = {
            "indices": np.stack(np.unravel_index(hit_flat, self.grid.shape), axis=1).astype(np.int32),
            "scores": self.scores[hit_flat].astype(np.float32),
            "occupancy": np.stack(np.unravel_index(occ_flat, self.grid.shape), axis=1).astype(np.int32),
            "origin": np.asarray(self.grid.origin, dtype=np.float64),
            "voxel_size": np.float64(self.grid.voxel_size),
            "shape": np.asarray(self.grid.shape, dtype=np.int64),
            "instance_score": np.float32(self.instance_score()),
            "dropped_points": np.int64(self.dropped),
        }
        payload.update({k: np.asarray(v) for k, v in extra.items()})
        path = Path(path)
        with atomic_open(path, "wb") as handle:
            np.savez_compressed(handle, **payload)
        return path


@dataclass
class SparseVolume:
    """A saved anomaly volume (see :meth:`VolumeAccumulator.save_npz`)."""

    grid: VoxelGrid
    indices: np.ndarray
    scores: np.ndarray
    occupancy_indices: np.ndarray
    meta: dict

    @classmethod
    def load(cls, path: str | os.PathLike) -> SparseVolume:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"anomaly volume {path} does not exist")
        with np.load(path, allow_pickle=False) as data:
            required = ("indices", "scores", "occupancy", "origin", "voxel_size", "shape")
            missing = [k for k in required if k not in data.files]
            if missing:
                raise ValueError(f"{path} is not an anomaly volume file (missing {missing})")
            grid = VoxelGrid(origin=data["origin"], voxel_size=float(data["voxel_size"]),
                             shape=tuple(int(s) for s in data["shape"]))
            meta = {k: data[k] for k in data.files if k not in required}
            return cls(grid, data["indices"], data["scores"], data["occupancy"], meta)

    def dense(self) -> np.ndarray:
        vol = np.zeros(self.grid.shape, dtype=np.float32)
        if self.indices.size:
            vol[tuple(self.indices.T)] = self.scores
        return vol

    def occupancy(self) -> np.ndarray:
        occ = np.zeros(self.grid.shape, dtype=bool)
        if self.occupancy_indices.size:
            occ[tuple(self.occupancy_indices.T)] = True
        return occ


def bounding_grid(views: list[tuple[np.ndarray, ViewCalibration]], voxel_size: float,
                  stride: int = 1) -> VoxelGrid:
    """Grid without GT: origin = ⌊min/vs⌋·vs over every valid back-projected point, shape from the max."""
    lo = np.full(3, np.inf)
    hi = np.full(3, -np.inf)
    for depth, calib in views:
        coords, _ = voxel_coordinates(depth, calib, np.zeros(3), voxel_size, None, stride)
        if coords.size:
            lo = np.minimum(lo, coords.min(axis=0))
            hi = np.maximum(hi, coords.max(axis=0))
    if not np.all(np.isfinite(lo)):
        raise ValueError("no valid depth pixel in any view: cannot build a voxel grid")
    lo_i, hi_i = np.floor(lo), np.floor(hi)
    return VoxelGrid(origin=lo_i * voxel_size, voxel_size=float(voxel_size),
                     shape=tuple(int(s) for s in (hi_i - lo_i + 1)))


def resample_to_grid(volume: np.ndarray, grid: VoxelGrid, target: VoxelGrid) -> np.ndarray:
    """Resample a predicted volume onto another grid by voxel centre (maximum per target voxel)."""
    if grid.shape == target.shape and np.allclose(grid.origin, target.origin) and grid.voxel_size == target.voxel_size:
        return volume.astype(np.float32, copy=False)
    src = np.flatnonzero(volume.reshape(-1) > 0)
    out = np.zeros(target.shape, dtype=np.float32)
    if src.size == 0:
        return out
    idx = np.stack(np.unravel_index(src, grid.shape), axis=1)
    centres = grid.centers(idx)
    t_idx, inside = target.index(centres)
    flat = np.ravel_multi_index(t_idx[inside].T, target.shape)
    np.maximum.at(out.reshape(-1), flat, volume.reshape(-1)[src[inside]].astype(np.float32))
    return out
