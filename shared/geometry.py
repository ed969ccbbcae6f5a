"""Camera and voxel geometry shared by the synthetic benchmark, the SiM3D reader and ModMap's 3D
anomaly volumes (modmap.md §12, metrics.md §7). Everything is vectorised numpy.

Conventions (fixed here, used everywhere):

- Cameras are pinhole, OpenCV axes: x right, y down, z forward (looking direction).
- ``K`` is the 3×3 intrinsic matrix in pixels; ``T_c2w`` the 4×4 camera-to-world rigid transform,
  so ``X_world = R @ X_cam + t`` with ``R = T_c2w[:3, :3]``, ``t = T_c2w[:3, 3]`` (the camera centre).
- Pixel (u, v) is column u, row v of the image array (``image[v, u]``). With ``pixel_center = 0.0``
  (OpenCV) the integer coordinate is the centre of the pixel, so the ray through the centre of pixel
  (u, v) is ``K⁻¹ [u, v, 1]ᵀ``; with ``pixel_center = 0.5`` the centre is at (u + 0.5, v + 0.5).
- Depth types: ``'z'`` = distance along the optical axis, ``X_cam = z · K⁻¹ [u + c, v + c, 1]ᵀ``;
  ``'range'`` = Euclidean distance from the camera centre, ``X_cam = range · r / ‖r‖``.
  Depth maps are multiplied by ``depth_scale`` (metres per stored unit) before use.
- Voxel grids: voxel (i, j, k) of a grid with ``origin`` (its minimum corner, metres, world frame)
  and edge ``voxel_size`` covers ``origin + [i, i+1) · voxel_size`` along x (j along y, k along z);
  the index of a point is ``floor((X - origin) / voxel_size)``; its centre is
  ``origin + (index + 0.5) · voxel_size``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEPTH_TYPES = ("z", "range")


def invert_rigid(T: np.ndarray) -> np.ndarray:
    """Inverse of a 4×4 rigid transform (rotation + translation), without a general matrix inverse."""
    T = np.asarray(T, dtype=np.float64)
    R, t = T[:3, :3], T[:3, 3]
    out = np.eye(4)
    out[:3, :3] = R.T
    out[:3, 3] = -R.T @ t
    return out


def look_at_c2w(eye: np.ndarray, target: np.ndarray, up: np.ndarray = (0.0, 0.0, 1.0)) -> np.ndarray:
    """Camera-to-world pose (OpenCV axes) of a camera at ``eye`` looking at ``target``.

    The image's "up" (−y) is the projection of the world ``up`` vector; ``up`` must not be parallel to
    the viewing direction.
    """
    eye = np.asarray(eye, dtype=np.float64)
    forward = np.asarray(target, dtype=np.float64) - eye
    forward /= np.linalg.norm(forward)
    right = np.cross(forward, np.asarray(up, dtype=np.float64))
    norm = np.linalg.norm(right)
    if norm < 1e-9:
        raise ValueError("look_at_c2w: 'up' is parallel to the viewing direction")
    right /= norm
    down = np.cross(forward, right)
    T = np.eye(4)
    T[:3, 0], T[:3, 1], T[:3, 2], T[:3, 3] = right, down, forward, eye
    return T


def pixel_rays(K: np.ndarray, height: int, width: int, pixel_center: float = 0.0) -> np.ndarray:
    """Camera-frame rays ``K⁻¹ [u + c, v + c, 1]ᵀ`` of every pixel, shape (H, W, 3), z component 1.

    Multiplying by a z-depth gives the camera-frame point; the rays are deliberately not normalised.
    """
    K_inv = np.linalg.inv(np.asarray(K, dtype=np.float64))
    v, u = np.mgrid[0:height, 0:width].astype(np.float64)
    pix = np.stack([u + pixel_center, v + pixel_center, np.ones_like(u)], axis=-1)
    rays = pix @ K_inv.T
    # K⁻¹ of an upper-triangular K with K[2,2] = 1 keeps z = 1 exactly; normalise anyway for safety.
    return rays / rays[..., 2:3]


def backproject_depth(
    depth: np.ndarray,
    K: np.ndarray,
    T_c2w: np.ndarray,
    depth_scale: float = 1.0,
    depth_type: str = "z",
    pixel_center: float = 0.0,
    mask: np.ndarray | None = None,
    stride: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Back-project the valid pixels of a depth map to world points.

    Args:
        depth: (H, W) depth in stored units; NaN, ±inf and values ≤ 0 are invalid.
        K, T_c2w: intrinsics and camera-to-world pose (module conventions).
        depth_scale: metres per stored depth unit.
        depth_type: ``'z'`` (along the optical axis) or ``'range'`` (along the ray).
        pixel_center: 0.0 (OpenCV integer centres) or 0.5.
        mask: optional (H, W) bool; only pixels where it is True are used.
        stride: use every ``stride``-th row and column (``--project-stride``).

    Returns:
        ``points`` (M, 3) float64 world coordinates (metres) and ``pixels`` (M, 2) int64 as (v, u) =
        (row, column), in row-major order.
    """
    if depth_type not in DEPTH_TYPES:
        raise ValueError(f"depth_type must be one of {DEPTH_TYPES}, got {depth_type!r}")
    depth = np.asarray(depth)
    if depth.ndim != 2:
        raise ValueError(f"depth must be (H, W), got shape {depth.shape}")
    valid = np.isfinite(depth) & (depth > 0)
    if mask is not None:
        if mask.shape != depth.shape:
            raise ValueError(f"mask shape {mask.shape} != depth shape {depth.shape}")
        valid &= mask
    if stride > 1:
        keep = np.zeros_like(valid)
        keep[::stride, ::stride] = True
        valid &= keep
    v, u = np.nonzero(valid)
    d = depth[v, u].astype(np.float64) * float(depth_scale)
    K_inv = np.linalg.inv(np.asarray(K, dtype=np.float64))
    pix = np.stack([u + pixel_center, v + pixel_center, np.ones(u.shape)], axis=1)
    rays = pix @ K_inv.T
    if depth_type == "z":
        cam = rays * (d / rays[:, 2])[:, None]
    else:
        cam = rays * (d / np.linalg.norm(rays, axis=1))[:, None]
    T_c2w = np.asarray(T_c2w, dtype=np.float64)
    world = cam @ T_c2w[:3, :3].T + T_c2w[:3, 3]
    return world, np.stack([v, u], axis=1).astype(np.int64)


def project_points(
    points: np.ndarray, K: np.ndarray, T_c2w: np.ndarray, pixel_center: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """Project world points into a camera.

    Returns ``uv`` (M, 2) float64 continuous pixel coordinates (column, row) in the same convention
    as the image indices (the pixel with centre (u, v) is ``image[round(v), round(u)]`` for
    ``pixel_center = 0``) and ``z`` (M,) the camera-frame depth (≤ 0: behind the camera).
    """
    T_w2c = invert_rigid(T_c2w)
    cam = np.asarray(points, dtype=np.float64) @ T_w2c[:3, :3].T + T_w2c[:3, 3]
    z = cam[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        proj = cam @ np.asarray(K, dtype=np.float64).T
        uv = proj[:, :2] / proj[:, 2:3] - pixel_center
    return uv, z


def rays_to_pixels(uv: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Nearest pixel (row, column) of continuous coordinates ``uv`` and a mask of those inside."""
    u = np.floor(uv[:, 0] + 0.5)
    v = np.floor(uv[:, 1] + 0.5)
    inside = np.isfinite(u) & np.isfinite(v) & (u >= 0) & (u < width) & (v >= 0) & (v < height)
    rows = np.where(inside, v, 0).astype(np.int64)
    cols = np.where(inside, u, 0).astype(np.int64)
    return np.stack([rows, cols], axis=1), inside


@dataclass(frozen=True)
class VoxelGrid:
    """An axis-aligned voxel grid in world coordinates (see the module docstring for conventions)."""

    origin: np.ndarray  # (3,) metres, minimum corner of voxel (0, 0, 0)
    voxel_size: float  # metres
    shape: tuple[int, int, int]

    def __post_init__(self) -> None:
        object.__setattr__(self, "origin", np.asarray(self.origin, dtype=np.float64).reshape(3))
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        if not self.voxel_size > 0:
            raise ValueError(f"voxel_size must be > 0, got {self.voxel_size}")

    @classmethod
    def bounding(cls, points: np.ndarray, voxel_size: float, margin_voxels: int = 0) -> VoxelGrid:
        """Smallest grid, aligned to multiples of ``voxel_size``, containing ``points`` (+ margin)."""
        points = np.asarray(points, dtype=np.float64)
        if points.size == 0:
            raise ValueError("VoxelGrid.bounding: no points")
        lo = np.floor(points.min(axis=0) / voxel_size) - margin_voxels
        hi = np.floor(points.max(axis=0) / voxel_size) + margin_voxels
        return cls(origin=lo * voxel_size, voxel_size=float(voxel_size), shape=tuple((hi - lo + 1).astype(int)))

    def index(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Voxel indices (M, 3) int64 of ``points`` and a bool mask of those inside the grid."""
        idx = np.floor((np.asarray(points, dtype=np.float64) - self.origin) / self.voxel_size).astype(np.int64)
        inside = np.all((idx >= 0) & (idx < np.asarray(self.shape)), axis=1)
        return idx, inside

    def centers(self, idx: np.ndarray) -> np.ndarray:
        """World coordinates of the centres of voxels ``idx`` (M, 3)."""
        return self.origin + (np.asarray(idx, dtype=np.float64) + 0.5) * self.voxel_size

    def occupancy(self, points: np.ndarray) -> np.ndarray:
        """Dense bool volume marking the voxels that contain at least one of ``points``."""
        vol = np.zeros(self.shape, dtype=bool)
        idx, inside = self.index(points)
        idx = idx[inside]
        vol[idx[:, 0], idx[:, 1], idx[:, 2]] = True
        return vol

    def scatter_max(self, volume: np.ndarray, points: np.ndarray, values: np.ndarray) -> int:
        """In place ``volume[voxel(p)] = max(volume[voxel(p)], value)``; returns the count of points
        dropped because they fall outside the grid."""
        if volume.shape != self.shape:
            raise ValueError(f"volume shape {volume.shape} != grid shape {self.shape}")
        idx, inside = self.index(points)
        flat = np.ravel_multi_index(idx[inside].T, self.shape)
        np.maximum.at(volume.reshape(-1), flat, np.asarray(values, dtype=volume.dtype)[inside])
        return int((~inside).sum())


def dilate_volume(volume: np.ndarray, iterations: int = 1) -> np.ndarray:
    """Binary dilation with the 26-neighbourhood (3×3×3 cube), ``iterations`` times."""
    from scipy import ndimage  # lazy: scipy is only needed here

    return ndimage.binary_dilation(volume, structure=np.ones((3, 3, 3), bool), iterations=iterations)
