"""MVTec 3D-AD reader (``data_formats.md`` §2): xyz TIFF → z channel (metres), 0 → NaN.

Optional background removal is applied to the stored copy only (the peers' preprocessing scripts
overwrite the TIFFs in place; we never write to the dataset).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from data_prep.shards import ConversionError, DepthSource, LoadedDepth, SourceItem
from data_prep.sources.common import file_size, read_tiff, rel_posix, xyz_to_z

SPLITS = ("train", "validation", "test")
BG_METHODS = ("none", "plane", "ransac_dbscan")
LAYOUT = ("<root>/<category>/{train,validation,test}/<good|defect_type>/xyz/NNN.tiff "
          "(e.g. <root>/bagel/train/good/xyz/000.tiff)")

# background-removal constants of the spec (metres)
PLANE_PATCH = 3
PLANE_DIST = 0.005
CLOSE_ITERS = 3
RING_PX = 10
RANSAC_DIST = 0.004
RANSAC_N = 50
RANSAC_ITERS = 1000
RANSAC_REMOVE_DIST = 0.005
DBSCAN_EPS = 0.006
DBSCAN_MIN_POINTS = 30


class MVTec3DSource(DepthSource):
    source_id = "mvtec3d"
    kind = "metric_z"
    unit = "m"
    expected_layout = LAYOUT

    def __init__(self, root, bg: str = "none") -> None:
        super().__init__(root)
        if bg not in BG_METHODS:
            raise ValueError(f"unknown background removal {bg!r}; expected one of {BG_METHODS}")
        self.bg = bg
        if bg == "ransac_dbscan":
            try:
                import open3d  # noqa: F401  (fail early, not once per sample)
            except ImportError as exc:
                raise ConversionError("--bg ransac_dbscan needs open3d (pip install open3d); "
                                      "--bg plane needs only numpy") from exc

    def params(self) -> dict:
        return {"bg": self.bg}

    def _categories(self) -> list[Path]:
        self.require_root()
        cats = []
        for d in sorted(p for p in self.root.iterdir() if p.is_dir()):
            if any((d / s).is_dir() and any((d / s).glob("*/xyz")) for s in SPLITS):
                cats.append(d)
        if not cats:
            if any((self.root / s).is_dir() and any((self.root / s).glob("*/xyz")) for s in SPLITS):
                raise ConversionError(
                    f"mvtec3d: {self.root} looks like a single category folder; pass the dataset root that "
                    f"contains the category folders. Expected layout: {LAYOUT}")
            raise ConversionError(f"mvtec3d: no category folders with xyz TIFFs under {self.root}. "
                                  f"Expected layout: {LAYOUT}")
        return cats

    def enumerate(self) -> list[SourceItem]:
        items = []
        for cat_dir in self._categories():
            for split in SPLITS:
                split_dir = cat_dir / split
                if not split_dir.is_dir():
                    continue
                for defect_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
                    xyz_dir = defect_dir / "xyz"
                    if not xyz_dir.is_dir():
                        continue
                    defect = defect_dir.name
                    files = sorted(p for p in xyz_dir.iterdir()
                                   if p.is_file() and p.suffix.lower() in (".tif", ".tiff"))
                    for f in files:
                        items.append(SourceItem(
                            category=cat_dir.name, split=split, split_orig=split,
                            stem=f"{defect}_{f.stem}", rel_path=rel_posix(f, self.root),
                            label="normal" if defect == "good" else "anomalous",
                            defect_type=None if defect == "good" else defect,
                            ref=str(f), size=file_size(f)))
        return items

    def load(self, item: SourceItem) -> LoadedDepth:
        xyz = read_tiff(item.ref)
        z = xyz_to_z(xyz, item.rel_path)
        valid = np.isfinite(z)
        xyz = np.asarray(xyz, dtype=np.float64)
        notes: list[str] = []
        bg_removed = "none"
        if self.bg == "plane":
            keep, note = plane_foreground(xyz, valid)
        elif self.bg == "ransac_dbscan":
            keep, note = ransac_dbscan_foreground(xyz, valid)
        else:
            keep, note = None, None
        if note:
            notes.append(f"{self.bg}: {note}; stored without background removal")
        if keep is not None:
            z = np.where(keep, z, np.float32(np.nan)).astype(np.float32)
            bg_removed = self.bg
        return LoadedDepth(depth=z, bg_removed=bg_removed, notes=notes)

    def range_checks(self, z_stats: dict) -> list[dict]:
        maxes = [s["max"] for s in z_stats.values() if s.get("max") is not None]
        mins = [s["min"] for s in z_stats.values() if s.get("min") is not None]
        if not maxes:
            return []
        zmax, zmin = max(maxes), min(mins)
        return [
            {"name": "z_unit_metres", "ok": 0.3 <= zmax <= 1.5, "fatal": False,
             "detail": f"max z = {zmax:.4g} (expected about 0.5-0.8 m for MVTec 3D-AD in metres)"},
            {"name": "z_positive", "ok": zmin > 0, "fatal": False, "detail": f"min valid z = {zmin:.4g}"},
        ]


def _close(mask: np.ndarray, iterations: int) -> np.ndarray:
    import cv2

    kernel = np.ones((3, 3), np.uint8)
    return cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_CLOSE, kernel, iterations=iterations) > 0


def plane_foreground(xyz: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray | None, str | None]:
    """Spec recipe ``plane``: plane through the mean xyz of 3×3 patches at three image corners
    (top-left, top-right, bottom-left; valid points only), background = |distance| ≤ 5 mm,
    foreground closed with a 3×3 kernel (3 iterations). Returns (keep mask, None) or
    (None, reason) when the plane is undefined (a corner patch without valid points, collinear)."""
    H, W = valid.shape
    k = PLANE_PATCH
    if H < k or W < k:
        return None, "map smaller than the corner patches"
    pts = []
    for r, c in ((0, 0), (0, W - k), (H - k, 0)):
        v = valid[r:r + k, c:c + k]
        if not v.any():
            return None, "a corner patch has no valid point"
        pts.append(xyz[r:r + k, c:c + k][v].mean(axis=0))
    p0, p1, p2 = pts
    normal = np.cross(p1 - p0, p2 - p0)
    norm = np.linalg.norm(normal)
    if not norm > 1e-12:
        return None, "corner points are collinear"
    normal /= norm
    dist = np.abs((xyz - p0) @ normal)
    fg = valid & ~(dist <= PLANE_DIST)
    return _close(fg, CLOSE_ITERS) & valid, None


def ransac_dbscan_foreground(xyz: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray | None, str | None]:
    """Spec recipe ``ransac_dbscan`` (open3d): RANSAC plane on the valid points of a 10-px border
    ring, drop points within 5 mm of it, DBSCAN (eps 6 mm, 30 points) on the rest, keep the largest
    cluster. open3d's RNG is seeded so that shards are reproducible."""
    import open3d as o3d

    ring = np.zeros_like(valid)
    ring[:RING_PX, :] = ring[-RING_PX:, :] = True
    ring[:, :RING_PX] = ring[:, -RING_PX:] = True
    border = valid & ring
    if int(border.sum()) < RANSAC_N:
        return None, f"only {int(border.sum())} valid border points (< ransac_n {RANSAC_N})"
    o3d.utility.random.seed(0)
    pcd = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(xyz[border]))
    plane, _ = pcd.segment_plane(distance_threshold=RANSAC_DIST, ransac_n=RANSAC_N,
                                 num_iterations=RANSAC_ITERS)
    a, b, c, d = plane
    n = np.array([a, b, c], dtype=np.float64)
    norm = np.linalg.norm(n)
    if not norm > 0:
        return None, "degenerate RANSAC plane"
    dist = np.abs(xyz @ n + d) / norm
    rest = valid & (dist > RANSAC_REMOVE_DIST)
    if not rest.any():
        return None, "every point lies on the background plane"
    rest_pcd = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(xyz[rest]))
    labels = np.asarray(rest_pcd.cluster_dbscan(eps=DBSCAN_EPS, min_points=DBSCAN_MIN_POINTS))
    if labels.size == 0 or labels.max() < 0:
        return None, "DBSCAN found no cluster"
    largest = int(np.argmax(np.bincount(labels[labels >= 0])))
    keep = np.zeros_like(valid)
    keep[rest] = labels == largest
    return keep, None


__all__ = ["MVTec3DSource", "plane_foreground", "ransac_dbscan_foreground"]
