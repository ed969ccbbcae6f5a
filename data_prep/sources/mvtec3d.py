"""MVTec 3D-AD reader (``data_formats.md`` §2): xyz TIFF → z channel (metres), 0 → NaN.

Optional background removal is applied to the stored copy only (the peers' preprocessing scripts
overwrite the TIFFs in place; we never write to the dataset).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from data_prep.shards import ConversionError, DepthSource, LoadedDepth, SourceItem
from data_prep.sources.common import file_size, read_tiff, rel_posix, xyz_to_z

# The background-removal recipes are shared with detection (single-view MVTec 3D-AD evaluation).
from shared.formats import BG_METHODS, plane_foreground, ransac_dbscan_foreground

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


__all__ = ["MVTec3DSource", "plane_foreground", "ransac_dbscan_foreground"]
