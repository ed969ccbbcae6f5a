"""Generic "folder of depth maps" reader, so users can add their own sensors.

Accepted files (extension matched case-insensitively): ``.npy`` (float or integer (H, W); an
(H, W, 3) float array is read as an organised point cloud and its z channel used), ``.tif/.tiff``
(same rules) and 16-bit grayscale ``.png`` (8-bit PNGs are refused: 256 levels cannot hold depth).
Non-finite values are invalid; for ``metric_z`` so are values ≤ 0 (0 is the usual "no return"
marker of depth sensors). Values are stored as read, in the unit given by ``--folder-unit``.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from data_prep.shards import CANONICAL_SPLITS, ConversionError, DepthSource, LoadedDepth, SourceItem
from data_prep.sources.common import (
    DEPTH_FILE_EXTS,
    file_size,
    read_npy,
    read_png_uint16,
    read_tiff,
    rel_posix,
    to_depth_2d,
)

KINDS = ("metric_z", "rel_disparity")
UNITS = ("m", "mm", "unknown")


class FolderSource(DepthSource):
    source_id = "folder"
    expected_layout = ("<root>/**/<name>.{npy,tif,tiff,png} (any depth; --folder-glob selects files; "
                       "PNGs must be 16-bit)")

    def __init__(self, root, kind: str = "metric_z", unit: str | None = None, glob: str = "**/*",
                 category: str | None = None, split: str = "train", source_id: str | None = None) -> None:
        super().__init__(root)
        if kind not in KINDS:
            raise ValueError(f"--folder-kind must be one of {KINDS}, got {kind!r}")
        if kind == "rel_disparity":
            if unit not in (None, "none", "null"):
                raise ValueError("--folder-unit is meaningless for rel_disparity (unit is null)")
            unit = None
        else:
            unit = unit or "unknown"
            if unit not in UNITS:
                raise ValueError(f"--folder-unit must be one of {UNITS}, got {unit!r}")
        if split not in CANONICAL_SPLITS:
            raise ValueError(f"--folder-split must be one of {CANONICAL_SPLITS}, got {split!r}")
        if source_id is not None:
            if not re.fullmatch(r"[a-z0-9_]+", source_id):
                raise ValueError(f"invalid source id {source_id!r}: lower-case letters, digits and '_'")
            self.source_id = source_id
        self.kind = kind
        self.unit = unit
        self.glob = glob or "**/*"
        self.category = category or self.root.name or "folder"
        self.split = split

    def params(self) -> dict:
        return {"folder_kind": self.kind, "folder_unit": self.unit, "folder_glob": self.glob,
                "folder_category": self.category, "folder_split": self.split}

    def enumerate(self) -> list[SourceItem]:
        self.require_root()
        files = sorted(p for p in self.root.glob(self.glob)
                       if p.is_file() and p.suffix.lower() in DEPTH_FILE_EXTS
                       and not any(part.startswith(".") for part in p.relative_to(self.root).parts))
        if not files:
            raise ConversionError(f"folder: no depth files ({', '.join(DEPTH_FILE_EXTS)}) matching "
                                  f"{self.glob!r} under {self.root}")
        items = []
        for f in files:
            rel = rel_posix(f, self.root)
            stem = rel[: -len(f.suffix)].replace("/", "_")
            items.append(SourceItem(category=self.category, split=self.split, split_orig=self.split, stem=stem,
                                    rel_path=rel, label=None, ref=str(f), size=file_size(f)))
        return items

    def load(self, item: SourceItem) -> LoadedDepth:
        path = Path(item.ref)
        ext = path.suffix.lower()
        if ext == ".npy":
            depth = to_depth_2d(read_npy(path), item.rel_path)
        elif ext in (".tif", ".tiff"):
            depth = to_depth_2d(np.asarray(read_tiff(path)), item.rel_path)
        else:
            depth = read_png_uint16(path).astype(np.float32)
        invalid = ~np.isfinite(depth)
        if self.kind == "metric_z":
            with np.errstate(invalid="ignore"):
                invalid |= depth <= 0
        depth[invalid] = np.nan
        return LoadedDepth(depth=depth)
