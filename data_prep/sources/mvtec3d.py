"""MVTec 3D-AD reader (``data_formats.md`` §2): xyz TIFF → z channel (metres), 0 → NaN.

Optional background removal is applied to the stored copy only (the peers' preprocessing scripts
overwrite the TIFFs in place; we never write to the dataset).

Intrinsics come from the category's real ``calibration/camera_parameters.json`` (HALCON
``area_scan_division`` model, lengths in metres): ``fx = focus / sx``, ``fy = focus / sy`` in pixels,
``(cx, cy)`` the principal point in pixels (HALCON and OpenCV both put pixel centres on integer
coordinates, so no half-pixel shift). ``kappa`` (1/m², radial division-model distortion) has no place
in a pinhole ``K``: it is stored beside ``K`` as ``camera.kappa`` and not applied — the depth maps come
from the organised xyz cloud, which needs no projection; whoever projects points with ``K`` must undo
the division model (``u_undist = u_dist / (1 + kappa · r²)``, r in metres on the sensor) first.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from data_prep.shards import ConversionError, DepthSource, LoadedDepth, SourceItem
from data_prep.sources.common import file_size, read_tiff, rel_posix, xyz_to_z

# The background-removal recipes are shared with detection (single-view MVTec 3D-AD evaluation).
from shared.formats import BG_METHODS, FormatError, plane_foreground, ransac_dbscan_foreground

SPLITS = ("train", "validation", "test")
LAYOUT = ("<root>/<category>/{train,validation,test}/<good|defect_type>/xyz/NNN.tiff "
          "(e.g. <root>/bagel/train/good/xyz/000.tiff)")


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
        self._calib_cache: dict[Path, tuple[dict | None, str | None]] = {}
        if bg == "ransac_dbscan":
            try:
                import open3d  # noqa: F401  (fail early, not once per sample)
            except ImportError as exc:
                raise ConversionError("--bg ransac_dbscan needs open3d (pip install open3d); "
                                      "--bg plane needs only numpy") from exc

    def params(self) -> dict:
        # the reader version travels in the parameters so shards from before the intrinsics were read
        # are rewritten, not mixed with new ones
        return {"bg": self.bg, "intrinsics": "camera_parameters.json:halcon_pinhole"}

    def _calibration(self, cat_dir: Path) -> tuple[dict | None, str | None]:
        """The category's parsed camera parameters (cached), or (None, reason)."""
        cache = self._calib_cache
        if cat_dir not in cache:
            path = cat_dir / "calibration" / "camera_parameters.json"
            try:
                cache[cat_dir] = (read_camera_parameters(path), None)
            except FileNotFoundError:
                cache[cat_dir] = (None, f"no {rel_posix(path, self.root)}; stored without intrinsics")
            except FormatError as exc:
                cache[cat_dir] = (None, f"{exc}; stored without intrinsics")
        return cache[cat_dir]

    def _categories(self) -> list[Path]:
        self.require_root()
        cats = []
        for d in sorted(p for p in self.root.iterdir() if p.is_dir()):
            if any((d / s).is_dir() and any((d / s).glob("*/xyz")) for s in SPLITS):
                cats.append(d)
            elif not d.name.startswith("."):
                self.empty_folders.append(d.name + "/")
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
        self.empty_folders = []
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
                    if not files:
                        self.empty_folders.append(rel_posix(xyz_dir, self.root) + "/")
                    for f in files:
                        items.append(SourceItem(
                            category=cat_dir.name, split=split, split_orig=split,
                            stem=f"{defect}_{f.stem}", rel_path=rel_posix(f, self.root),
                            label="normal" if defect == "good" else "anomalous",
                            defect_type=None if defect == "good" else defect,
                            ref=str(f), size=file_size(f), extra={"category_dir": str(cat_dir)}))
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
        camera = None
        if "category_dir" in item.extra:
            calib, reason = self._calibration(Path(item.extra["category_dir"]))
            if calib is not None:
                camera, reason = camera_from_calibration(calib, z.shape)
            if reason:
                notes.append(reason)
        return LoadedDepth(depth=z, bg_removed=bg_removed, camera=camera, notes=notes)

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


CAMERA_KEYS = ("camera_type", "focus", "kappa", "sx", "sy", "cx", "cy", "image_width", "image_height")


def read_camera_parameters(path: str | Path) -> dict:
    """MVTec 3D-AD ``calibration/camera_parameters.json`` → dict of its HALCON keys (:data:`CAMERA_KEYS`).

    Raises FileNotFoundError when absent and :class:`shared.formats.FormatError` naming the file and
    the problem when it is not that format (not JSON, keys missing, non-numeric or non-positive values).
    """
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as exc:
        raise FormatError(f"{path}: unreadable camera parameters ({exc})") from None
    if not isinstance(obj, dict):
        raise FormatError(f"{path}: expected a JSON object with keys {', '.join(CAMERA_KEYS)}")
    missing = [k for k in CAMERA_KEYS if k not in obj]
    if missing:
        raise FormatError(f"{path}: camera parameters lack {missing} (expected the HALCON keys "
                          f"{', '.join(CAMERA_KEYS)})")
    out: dict = {"camera_type": str(obj["camera_type"])}
    for k in CAMERA_KEYS[1:]:
        try:
            out[k] = float(obj[k])
        except (TypeError, ValueError):
            raise FormatError(f"{path}: {k} = {obj[k]!r} is not a number") from None
        if not np.isfinite(out[k]):
            raise FormatError(f"{path}: {k} = {obj[k]!r} is not finite")
    for k in ("focus", "sx", "sy", "image_width", "image_height"):
        if out[k] <= 0:
            raise FormatError(f"{path}: {k} = {out[k]} must be positive for a perspective (area scan) camera")
    if "telecentric" in out["camera_type"]:
        raise FormatError(f"{path}: camera_type {out['camera_type']!r} is telecentric; no pinhole intrinsics")
    return out


def camera_from_calibration(calib: dict, frame_hw: tuple[int, int]) -> tuple[dict | None, str | None]:
    """Pinhole ``K`` (pixels) at the frame's resolution plus the unapplied ``kappa``; (None, reason)
    when the calibration's image size differs from the frame (a crop or resize we cannot tell apart)."""
    H, W = frame_hw
    if (int(round(calib["image_height"])), int(round(calib["image_width"]))) != (H, W):
        return None, (f"camera_parameters.json is for {calib['image_width']:.0f}x{calib['image_height']:.0f} "
                      f"images, this frame is {W}x{H}; stored without intrinsics")
    K = [[calib["focus"] / calib["sx"], 0.0, calib["cx"]],
         [0.0, calib["focus"] / calib["sy"], calib["cy"]],
         [0.0, 0.0, 1.0]]
    return {"K": K, "kappa": calib["kappa"]}, None


__all__ = ["MVTec3DSource", "camera_from_calibration", "plane_foreground", "ransac_dbscan_foreground",
           "read_camera_parameters"]
