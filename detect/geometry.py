"""Nominal–actual surface comparison: how far each pixel's 3D point lies from the training instance's surface.

Why (issue 23, docs/results/demo_detection.md step 9): bumps and dents of a few millimetres over several
centimetres change an image only through faint shading, and the image tokens miss them (0 % of their GT
voxels above the 1 % FPR threshold on most instances). Their 3D signature is plain: the surface moved.
This is the metrology check of a factory (align the part to its reference, read the deviation):

1. :meth:`SurfaceReference.from_views` fuses the training instance's calibrated views into one point
   cloud (world frame, voxel-downsampled) with normals;
2. :func:`register` aligns a test instance's fused points to it: rigid point-to-plane ICP (open3d), then
   a trimmed point-to-plane *affine* refinement, which absorbs the smooth global shape tolerances of a
   part (scale, ovality, lean are affine) but not a local dent (a least-squares fit over the whole part
   barely moves for a few per cent of its surface); optionally (``warp_slab_m``) a *profile warp* follows:
   per height along the fixture's up axis a shift along it and a scale across it (:class:`Registration`),
   for features that vary one by one along a part's height (a lid's skirt, a ring on the legs);
3. :func:`deviation_map` gives every valid pixel of a view its distance to the reference surface
   (point-to-plane, capped by the point-to-point distance), median-filtered, zero within ``edge_px`` of a
   silhouette or depth jump (mixed pixels there are no surface);
4. :func:`fuse_scores` brings the deviation onto the detector's score scale: ``max(score, scale ·
   deviation / tolerance)`` — a deviation of one tolerance weighs as much as the 99th percentile of the
   detector's scores on nominal training data (``scale``).

5. optionally (:func:`template_support`), the registration also reads the training instance's grey level at
   each pixel's surface point in the view of the same index; where the pixel matches that *golden template*,
   the detector's score there is a token's halo around a defect nearby, and it is weighted down;
6. optionally (:func:`see_through`), a pixel whose point lies behind the training instance's surface looks
   through a hole: its score goes to the hole's rim instead of the far surface (:class:`InstanceSurface`).

Limits, measured: a single reference cannot know the nominal variation of individual features (a knob's
height, a lid's lip), which the affine fit does not absorb; there the deviation is large on every instance.
The profile warp absorbs such variation where it runs all round the part, and with it part of a defect that
covers much of a cross-section (a bump of 8–10 cm radius on a 15 cm seat).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from detect.volume import ViewCalibration, voxel_coordinates


@dataclass(frozen=True)
class GeometrySettings:
    tolerance_m: float = 0.001  # a deviation this large scores as the detector's nominal 99th percentile
    voxel_m: float = 0.002  # downsampling of the reference cloud
    register_voxel_m: float = 0.004  # downsampling of a test instance's cloud for the registration
    max_correspondence_m: float = 0.006  # ICP: pairs farther apart are no correspondence
    affine: bool = True  # refine the rigid alignment by a trimmed affine fit
    affine_iterations: int = 15
    edge_px: int = 3  # pixels next to a silhouette or depth jump get no deviation
    jump_m: float = 0.01  # 4-neighbours this far apart in depth: a jump
    median_px: int = 5  # median filter of the deviation map (odd; 1 = none)
    missing_m: float = 0.01  # a reference point with no measured point this near: the material is missing
    # After the affine: the profile warp along the fixture's up axis (``warp_axis``), a shift along it and a scale
    # across it per knot every ``warp_slab_m``, linear between knots (0 = off; :class:`Registration`). Parts vary
    # feature by feature along their height (a lid 6 mm lower on a body, a ring higher on the legs), which one
    # affine cannot follow; each knot is fitted on the whole cross-section at that height, so a local defect
    # barely pulls it.
    warp_slab_m: float = 0.0
    warp_axis: int = 2
    warp_iterations: int = 10
    warp_smoothness: float = 0.01  # neighbouring knots' agreement, relative to the points per knot (the demo's)

    def __post_init__(self) -> None:
        if min(self.tolerance_m, self.voxel_m, self.register_voxel_m, self.max_correspondence_m, self.missing_m) <= 0:
            raise ValueError("geometry tolerance_m, voxel_m, register_voxel_m, max_correspondence_m and missing_m "
                             "must be > 0")
        if self.warp_slab_m < 0 or self.warp_axis not in (0, 1, 2) or self.warp_iterations < 0 or \
                self.warp_smoothness < 0:
            raise ValueError(f"geometry warp_slab_m must be >= 0, warp_axis 0, 1 or 2, warp_iterations and "
                             f"warp_smoothness >= 0, got {self.warp_slab_m}, {self.warp_axis}, "
                             f"{self.warp_iterations}, {self.warp_smoothness}")
        if self.edge_px < 0 or self.median_px < 1 or self.median_px % 2 == 0 or self.affine_iterations < 0:
            raise ValueError(f"geometry edge_px must be >= 0, median_px odd >= 1 and affine_iterations >= 0, got "
                             f"{self.edge_px}, {self.median_px}, {self.affine_iterations}")


def view_points(depth: np.ndarray, calib: ViewCalibration) -> tuple[np.ndarray, np.ndarray]:
    """World points (M, 3) of a view's valid pixels and their flat pixel indices."""
    return voxel_coordinates(depth, calib, np.zeros(3), 1.0)


def _cloud(points: np.ndarray, voxel_m: float, normals: bool = True):
    import open3d as o3d  # lazy: only the geometry check needs open3d

    pc = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(np.asarray(points, dtype=np.float64)))
    pc = pc.voxel_down_sample(voxel_m)
    if normals:
        pc.estimate_normals(o3d.geometry.KDTreeSearchParamHybrid(radius=4 * voxel_m, max_nn=30))
    return pc


class SurfaceReference:
    """The nominal surface: points (N, 3) and unit normals (N, 3) in the world frame, with a k-d tree."""

    def __init__(self, points: np.ndarray, normals: np.ndarray) -> None:
        points, normals = np.asarray(points, np.float64), np.asarray(normals, np.float64)
        if points.ndim != 2 or points.shape[1] != 3 or normals.shape != points.shape or len(points) < 3:
            raise ValueError(f"a surface reference needs >= 3 points (N, 3) with normals of the same shape, got "
                             f"{points.shape} and {normals.shape}")
        self.points, self.normals = points, normals
        self._tree = None

    @classmethod
    def from_views(cls, views: list[tuple[np.ndarray, ViewCalibration]], voxel_m: float) -> SurfaceReference:
        """Fuse calibrated (depth, calibration) views: every valid pixel, voxel-downsampled, normals by PCA."""
        pts = [view_points(d, c)[0] for d, c in views]
        pc = _cloud(np.concatenate(pts) if pts else np.zeros((0, 3)), voxel_m)
        return cls(np.asarray(pc.points), np.asarray(pc.normals))

    @property
    def tree(self):
        if self._tree is None:
            from scipy.spatial import cKDTree

            self._tree = cKDTree(self.points)
        return self._tree

    def deviation(self, points: np.ndarray) -> np.ndarray:
        """Distance (M,) of points to the surface: along the nearest reference point's normal, at most the
        distance to that point (a point beyond the reference's edge is not infinitely far)."""
        dist, idx = self.tree.query(points, k=1)
        along = np.abs(np.sum((points - self.points[idx]) * self.normals[idx], axis=1))
        return np.minimum(along, dist)

    def save(self, path: str | os.PathLike) -> Path:
        from shared.io import atomic_open

        path = Path(path)
        with atomic_open(path, "wb") as handle:
            np.savez_compressed(handle, points=self.points.astype(np.float32), normals=self.normals.astype(np.float32))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> SurfaceReference:
        try:
            with np.load(path, allow_pickle=False) as z:
                return cls(z["points"], z["normals"])
        except (OSError, KeyError, ValueError) as exc:
            raise ValueError(f"{path} is not a surface reference (points, normals): {exc}") from None


@dataclass(frozen=True)
class Registration:
    """A test instance's frame → the reference frame: the 4×4 affine ``matrix``, then optionally a *profile
    warp* along one axis (the fixture's up axis): at each height ``a`` a shift ``h(a)`` along the axis and a
    scale ``1 + s(a)`` across it about ``center`` (the axis' position), ``h`` and ``s`` interpolated linearly
    between equally spaced ``knots`` (reference-frame coordinates along ``axis``; constant beyond the ends),
    ``corrections`` (K, 2) holding (h, s) per knot."""

    matrix: np.ndarray
    knots: np.ndarray | None = None
    corrections: np.ndarray | None = None
    axis: int = 2
    center: np.ndarray | None = None  # (2,) the cross-section's centre: the other two coordinates

    @classmethod
    def of(cls, transform: Registration | np.ndarray) -> Registration:
        """``transform`` itself, or a plain 4×4 matrix as a registration without warp."""
        return transform if isinstance(transform, Registration) else cls(np.asarray(transform, np.float64))

    @property
    def plane(self) -> list[int]:
        return [i for i in range(3) if i != self.axis]

    def hat(self, coord: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Lower knot index (M,) and the weight (M,) of the knot above it for coordinates along the axis."""
        k = len(self.knots)
        s = np.clip((coord - self.knots[0]) / (self.knots[1] - self.knots[0]), 0.0, k - 1)
        low = np.minimum(np.floor(s).astype(np.int64), k - 2)
        return low, s - low

    def warp(self, q: np.ndarray) -> np.ndarray:
        """The warp's displacement (M, 3) at affinely registered points ``q``."""
        low, f = self.hat(q[:, self.axis])
        c = (1.0 - f)[:, None] * self.corrections[low] + f[:, None] * self.corrections[low + 1]
        out = np.zeros_like(q)
        out[:, self.axis] = c[:, 0]
        out[:, self.plane] = c[:, 1:2] * (q[:, self.plane] - self.center)
        return out

    def apply(self, points: np.ndarray) -> np.ndarray:
        """Points (M, 3) of the instance's frame in the reference frame."""
        q = points @ self.matrix[:3, :3].T + self.matrix[:3, 3]
        return q if self.corrections is None else q + self.warp(q)

    def invert(self, points: np.ndarray, iterations: int = 6) -> np.ndarray:
        """Points (M, 3) of the reference frame in the instance's frame (the warp undone by fixed-point
        iteration: it displaces by millimetres and varies over centimetres, so a few steps converge)."""
        q = np.asarray(points, np.float64)
        if self.corrections is not None:
            target, q = q, q.copy()
            for _ in range(iterations):
                q = target - self.warp(q)
        inv = np.linalg.inv(self.matrix)
        return q @ inv[:3, :3].T + inv[:3, 3]


def _fit_warp(source: np.ndarray, matrix: np.ndarray, reference: SurfaceReference,
              settings: GeometrySettings) -> Registration:
    """The profile warp of :class:`Registration` on top of the affine ``matrix``: per knot a shift along the
    axis and a scale across it, fitted by trimmed point-to-plane least squares (linear in the corrections,
    since the hat weights are read at the affinely registered points), with a penalty on neighbouring knots'
    difference (``warp_smoothness`` × the points per knot) and a small ridge towards no correction where a knot
    has no data. Two numbers per height cannot follow a local bump or dent, which covers part of a
    cross-section only; they follow a feature that moved as a whole (a ledge, a lid, a ring)."""
    axis = settings.warp_axis
    plane = [i for i in range(3) if i != axis]
    lo, hi = reference.points[:, axis].min(), reference.points[:, axis].max()
    n_knots = max(2, int(np.ceil((hi - lo) / settings.warp_slab_m)) + 1)
    knots = lo + settings.warp_slab_m * np.arange(n_knots)
    center = reference.points[:, plane].mean(0)
    reg = Registration(matrix, knots, np.zeros((n_knots, 2)), axis, center)
    base = source @ matrix[:3, :3].T + matrix[:3, 3]
    low, f = reg.hat(base[:, axis])
    nearest = low + (f >= 0.5)
    # the scale multiplies in-plane offsets: measured as the displacement it causes at the part's radius
    radius = float(np.quantile(np.linalg.norm(reference.points[:, plane] - center, axis=1), 0.9))
    weight = np.array([1.0, radius ** 2])
    step = np.eye(n_knots, k=1)[:-1] - np.eye(n_knots)[:-1]  # (K-1, K): neighbour differences
    penalty = settings.warp_smoothness * np.kron(step.T @ step, np.diag(weight)) + \
        1e-3 * np.kron(np.eye(n_knots), np.diag(weight))
    for _ in range(settings.warp_iterations):
        q = reg.apply(source)
        dist, idx = reference.tree.query(q, k=1)
        keep = dist < settings.max_correspondence_m
        if keep.sum() < 24:
            break
        # trimmed per knot, not over the part: a feature that moved as a whole is most of its own slab, while it
        # would be the part's worst tenth and dropped by a global quantile
        for k in range(n_knots):
            mine = keep & (nearest == k)
            if mine.any():
                keep[mine] = dist[mine] <= np.quantile(dist[mine], 0.9)
        p, n, r = base[keep], reference.normals[idx[keep]], reference.points[idx[keep]]
        row = np.stack([n[:, axis], np.sum(n[:, plane] * (p[:, plane] - center), axis=1)], axis=1)
        M = np.zeros((len(p), n_knots, 2))
        at = np.arange(len(p))
        M[at, low[keep]] += (1.0 - f[keep])[:, None] * row
        M[at, low[keep] + 1] += f[keep][:, None] * row
        M = M.reshape(len(p), -1)
        b = np.sum(n * (r - p), axis=1)
        x = np.linalg.solve(M.T @ M + (len(p) / n_knots) * penalty, M.T @ b)
        reg = Registration(matrix, knots, x.reshape(n_knots, 2), axis, center)
    return reg


def register(points: np.ndarray, reference: SurfaceReference, settings: GeometrySettings) -> Registration:
    """The :class:`Registration` taking a test instance's fused world points onto the reference (rigid ICP,
    then affine, then optionally the warp along ``settings.warp_axis``); identity start: the views are
    calibrated and parts sit in a fixture."""
    import open3d as o3d

    src = _cloud(points, settings.register_voxel_m, normals=False)  # point-to-plane needs the target's only
    ref = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(reference.points))
    ref.normals = o3d.utility.Vector3dVector(reference.normals)
    reg = o3d.pipelines.registration.registration_icp(
        src, ref, settings.max_correspondence_m, np.eye(4),
        o3d.pipelines.registration.TransformationEstimationPointToPlane(),
        o3d.pipelines.registration.ICPConvergenceCriteria(max_iteration=30))
    T = np.array(reg.transformation)
    if not settings.affine:
        return Registration(T)
    sp = np.asarray(src.points)
    for _ in range(settings.affine_iterations):
        q = sp @ T[:3, :3].T + T[:3, 3]
        dist, idx = reference.tree.query(q, k=1)
        keep = dist < settings.max_correspondence_m
        if keep.sum() < 12:
            break
        keep &= dist <= np.quantile(dist[keep], 0.9)  # trimmed: defects and unseen parts do not pull
        p, n, r = q[keep], reference.normals[idx[keep]], reference.points[idx[keep]]
        # point-to-plane residual n·((I + X) p + t − r), linear in the 12 entries of X and t
        M = np.concatenate([n[:, :1] * p, n[:, 1:2] * p, n[:, 2:3] * p, n], axis=1)
        b = np.sum(n * (r - p), axis=1)
        ridge = 1e-3 * len(b) * np.diag([1.0] * 9 + [0.0] * 3)  # keeps X small where the part is degenerate
        x = np.linalg.solve(M.T @ M + ridge, M.T @ b)
        U = np.eye(4)
        U[:3, :3] += x[:9].reshape(3, 3)
        U[:3, 3] = x[9:]
        T = U @ T
    return _fit_warp(sp, T, reference, settings) if settings.warp_slab_m > 0 else Registration(T)


def edge_band(depth_m: np.ndarray, jump_m: float, width_px: int) -> np.ndarray:
    """Pixels within ``width_px`` of invalid depth or of a depth jump (4-neighbours > ``jump_m`` apart)."""
    import cv2

    valid = np.isfinite(depth_m) & (depth_m > 0)
    d = np.where(valid, depth_m, 0.0)
    bad = ~valid
    for axis in (0, 1):
        jump = np.abs(np.diff(d, axis=axis)) > jump_m
        lo, hi = [slice(None)] * 2, [slice(None)] * 2
        lo[axis], hi[axis] = slice(None, -1), slice(1, None)
        bad[tuple(lo)] |= jump
        bad[tuple(hi)] |= jump
    if width_px > 0:
        k = 2 * width_px + 1
        bad = cv2.dilate(bad.astype(np.uint8), np.ones((k, k), np.uint8)) > 0
    return bad


def deviation_map(depth: np.ndarray, calib: ViewCalibration, transform: Registration | np.ndarray,
                  reference: SurfaceReference,
                  settings: GeometrySettings, points: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """(H, W) float32 metres: each valid pixel's registered distance to the reference surface; 0 at invalid
    pixels and within ``edge_px`` of silhouettes and depth jumps. ``points``: the view's
    :func:`view_points`, when the caller has them already."""
    import cv2

    depth = np.asarray(depth)
    pts, flat = points if points is not None else view_points(depth, calib)
    out = np.zeros(depth.size, np.float32)
    if len(pts):
        out[flat] = reference.deviation(Registration.of(transform).apply(pts))
    out = out.reshape(depth.shape)
    if settings.median_px > 1:
        out = cv2.medianBlur(out, settings.median_px) if settings.median_px <= 5 else \
            _median(out, settings.median_px)
    return np.where(edge_band(depth * calib.depth_scale, settings.jump_m, settings.edge_px), 0.0, out).astype(np.float32)


def _median(x: np.ndarray, size: int) -> np.ndarray:
    from scipy.ndimage import median_filter

    return median_filter(x, size=size, mode="nearest")


def fuse_scores(score_map: np.ndarray, deviation: np.ndarray, scale: float, tolerance_m: float,
                support: np.ndarray | None = None) -> np.ndarray:
    """``max(score · support, scale · deviation / tolerance)``: the detector's map (optionally weighted by a
    pixel's template support, :func:`template_support`) and the surface deviation on one scale."""
    score = score_map if support is None else score_map * support
    return np.maximum(score, (scale / tolerance_m) * deviation).astype(np.float32)


@dataclass(frozen=True)
class TemplateView:
    """One view of the training instance: 8-bit grey image, depth in its file's units, calibration."""

    image: np.ndarray
    depth: np.ndarray
    calib: ViewCalibration

    @cached_property
    def z_m(self) -> np.ndarray:
        """(H, W) float32 depth along the optical axis in metres, 0 where there is none; computed once per
        template, which every test instance's views are compared with."""
        z = np.asarray(self.depth, np.float32) * np.float32(self.calib.depth_scale)
        z = np.where(np.isfinite(z) & (z > 0), z, 0.0).astype(np.float32)
        if self.calib.depth_type == "range":  # distance along the ray → z: divide by ‖K⁻¹[u + c, v + c, 1]‖
            h, w = z.shape
            rows, cols = np.mgrid[0:h, 0:w].astype(np.float64) + self.calib.pixel_center
            rays = np.stack([cols, rows, np.ones_like(cols)], -1) @ np.linalg.inv(self.calib.K).T
            z = (z / np.linalg.norm(rays, axis=-1)).astype(np.float32)
        return z


def _into_template(points: np.ndarray, transform: Registration | np.ndarray, template: TemplateView):
    """Registered world points (M, 3) into the template's camera: pixel coordinates u, v (M,) float32 (for
    :func:`_sample`), camera depth z (M,) in metres and whether the point lies in front of the camera."""
    q = Registration.of(transform).apply(points)
    w2c = template.calib.T_w2c
    pc = q @ w2c[:3, :3].T + w2c[:3, 3]
    front = pc[:, 2] > 1e-6
    uvw = pc @ template.calib.K.T
    z = np.where(front, uvw[:, 2], 1.0)
    u = (uvw[:, 0] / z - template.calib.pixel_center).astype(np.float32)
    v = (uvw[:, 1] / z - template.calib.pixel_center).astype(np.float32)
    return u, v, pc[:, 2], front


_SAMPLE_COLUMNS = 1024  # cv2.remap takes maps of fewer than 32 767 rows and columns: points go in as a block


def _sample(image: np.ndarray, u: np.ndarray, v: np.ndarray, interpolation: int, border_value: float) -> np.ndarray:
    """``image`` (float32) read at pixel coordinates u, v (M,) with ``cv2.remap``; ``border_value`` outside."""
    import cv2

    m = len(u)
    if m == 0:
        return np.zeros(0, np.float32)
    rows = -(-m // _SAMPLE_COLUMNS)
    u, v = (np.pad(x, (0, rows * _SAMPLE_COLUMNS - m), constant_values=-1.0).reshape(rows, _SAMPLE_COLUMNS)
            for x in (u, v))  # the padding reads outside the image and is cut off again
    return cv2.remap(image, u, v, interpolation, borderMode=cv2.BORDER_CONSTANT,
                     borderValue=border_value).reshape(-1)[:m]


def _template_depth_at(template: TemplateView, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The template's z-depth in metres at pixel coordinates u, v (nearest pixel; 0 where it has none)."""
    import cv2

    return _sample(template.z_m, u, v, cv2.INTER_NEAREST, 0.0)


class InstanceSurface:
    """A test instance's measured surface (all its views fused, voxel-downsampled, in its own frame) and the
    nominal material it lacks: the registered reference points with no measured point within
    ``settings.missing_m`` (a missing chunk; also nominal surface that no view of this instance measured)."""

    def __init__(self, measured: np.ndarray, reference: SurfaceReference, transform: Registration | np.ndarray,
                 settings: GeometrySettings) -> None:
        from scipy.spatial import cKDTree

        self.measured = cKDTree(np.asarray(_cloud(measured, settings.voxel_m, normals=False).points))
        self.registration = Registration.of(transform)
        nominal = self.to_instance(reference.points)
        gone = self.measured.query(nominal, distance_upper_bound=settings.missing_m)[0] > settings.missing_m
        self.missing = nominal[gone]
        self._missing = cKDTree(self.missing) if len(self.missing) else None

    def to_instance(self, points: np.ndarray) -> np.ndarray:
        """Points (K, 3) of the reference frame in the instance's frame (the registration undone)."""
        return self.registration.invert(points)

    def near_missing(self, points: np.ndarray, reach_m: float) -> np.ndarray:
        """(K,) bool: which points lie within ``reach_m`` of missing material."""
        if self._missing is None or not len(points):
            return np.zeros(len(points), bool)
        return self._missing.query(points, distance_upper_bound=reach_m)[0] <= reach_m

    def nearest_measured(self, points: np.ndarray) -> np.ndarray:
        """(K, 3) the measured surface point nearest to each of ``points``."""
        if not len(points):
            return np.zeros((0, 3))
        return self.measured.data[self.measured.query(points)[1]]


def see_through(depth: np.ndarray, calib: ViewCalibration, transform: Registration | np.ndarray, template: TemplateView,
                surface: InstanceSurface, margin_m: float,
                points: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Pixels that look through a hole onto a surface behind it, and where their scores belong.

    A pixel looks *through* where the nominal part has material when its registered 3D point lies more than
    ``margin_m`` behind the training instance's surface as the view of the same index saw it. Its token sees
    the hole, but the back-projection puts that score on the far surface, which other views see as nominal
    (issue 23, step 10: such pixels held most of the false-positive voxels of the instances with a missing
    chunk). Its score belongs to the hole: it is moved to the measured surface point nearest to where the
    line of sight crosses the nominal surface, i.e. the hole's rim. A point that itself lies within
    ``margin_m`` of missing material (the wall right next to the cut, seen through it) keeps its score.

    Returns ``(moved, targets)``: the (H, W) bool mask of the moved pixels and, for them in row-major order,
    the (K, 3) world points their scores go to.
    """
    h, w = depth.shape
    moved = np.zeros(h * w, bool)
    pts, flat = points if points is not None else view_points(depth, calib)
    if not len(pts):
        return moved.reshape(h, w), np.zeros((0, 3))
    u, v, z, front = _into_template(pts, transform, template)
    ref_z = _template_depth_at(template, u, v)
    behind = np.flatnonzero(front & (ref_z > 0) & (ref_z < z - margin_m))
    far = ~surface.near_missing(pts[behind], margin_m)
    behind = behind[far]
    moved[flat[behind]] = True
    c = template.calib.pixel_center
    rays = np.linalg.inv(template.calib.K) @ np.stack([u[behind] + c, v[behind] + c, np.ones(len(behind))])
    crossing = (rays * ref_z[behind]).T  # on the nominal surface, in the template camera's frame
    crossing = crossing @ template.calib.T_c2w[:3, :3].T + template.calib.T_c2w[:3, 3]
    return moved.reshape(h, w), surface.nearest_measured(surface.to_instance(crossing))


def template_support(image: np.ndarray, depth: np.ndarray, calib: ViewCalibration,
                     transform: Registration | np.ndarray,
                     template: TemplateView, tolerance: float, settings: GeometrySettings,
                     visibility_m: float = 0.005, saturation: int = 245,
                     points: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """(H, W) weights in [0, 1]: how much each pixel differs from the training instance at the same surface point.

    A pixel's registered 3D point is projected into the training instance's view of the same index (same
    camera and light in a fixture), that view's grey level is read there (bilinear) and fitted to the test
    view's by one linear photometric map per view; the absolute residual (fraction of full scale, median
    filtered) over ``tolerance`` gives the weight, 1 from one tolerance on. A token's score describes its
    whole patch and context, so a defect's score spreads 2–3 tokens around it (issue 23, step 9); where the
    pixel itself matches the template, that score is the halo's. Where the comparison has no information
    — the point unseen by the training view (occluded, out of frame, depth off by > ``visibility_m``), a
    saturated pixel in either image (and its 4-px surroundings), next to a silhouette or depth jump — the
    weight is 1: the score stands. ``points``: the view's :func:`view_points`, when the caller has them.
    """
    import cv2

    h, w = depth.shape
    weight = np.ones((h, w), np.float32)
    pts, flat = points if points is not None else view_points(depth, calib)
    if not len(pts):
        return weight
    u, v, z, front = _into_template(pts, transform, template)
    ref_grey = _sample(template.image.astype(np.float32), u, v, cv2.INTER_LINEAR, -1.0)
    ref_z = _template_depth_at(template, u, v)
    seen = front & (ref_grey >= 0) & (ref_z > 0) & (np.abs(ref_z - z) < visibility_m)
    grey = np.asarray(image, np.float32).reshape(-1)[flat]
    saturated = (grey >= saturation) | (ref_grey >= saturation)
    ok = seen & ~saturated
    if ok.sum() < 16:
        return weight
    A = np.stack([ref_grey[ok], np.ones(int(ok.sum()), np.float32)], axis=1)
    gain, offset = np.linalg.lstsq(A, grey[ok], rcond=None)[0]
    residual = np.zeros(h * w, np.float32)
    residual[flat[ok]] = np.abs(grey[ok] - (gain * ref_grey[ok] + offset)) / 255.0
    residual = cv2.medianBlur(residual.reshape(h, w), 5)
    available = np.zeros(h * w, np.uint8)
    available[flat[ok]] = 1
    sat_map = np.zeros(h * w, np.uint8)
    sat_map[flat[saturated]] = 1
    sat_map = cv2.dilate(sat_map.reshape(h, w), np.ones((9, 9), np.uint8))
    available = available.reshape(h, w) & (1 - sat_map) & \
        (1 - edge_band(depth * calib.depth_scale, settings.jump_m, settings.edge_px).astype(np.uint8))
    available = cv2.erode(available, np.ones((5, 5), np.uint8)) > 0  # the median filter's reach
    weight[available] = np.clip(residual[available] / tolerance, 0.0, 1.0)
    return weight


__all__ = ["GeometrySettings", "InstanceSurface", "Registration", "SurfaceReference", "TemplateView", "deviation_map", "edge_band",
           "fuse_scores", "register", "see_through", "template_support", "view_points"]
