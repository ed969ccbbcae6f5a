"""Readers of the real depth datasets (and of the built-in synthetic benchmark).

Each reader turns its dataset's on-disk format into float32 (H, W) depth with NaN = invalid, never
writing to the dataset. :func:`make_source` builds one from the CLI/library parameters.
"""

from __future__ import annotations

from data_prep.shards import DepthSource
from data_prep.sources.eyecandies import EyecandiesSource
from data_prep.sources.folder import FolderSource
from data_prep.sources.mvtec3d import MVTec3DSource
from data_prep.sources.realiad_d3 import RealIADD3Source
from data_prep.sources.synthetic import SyntheticSource

SOURCES: dict[str, type[DepthSource]] = {
    "mvtec3d": MVTec3DSource,
    "eyecandies": EyecandiesSource,
    "realiad_d3": RealIADD3Source,
    "folder": FolderSource,
    "synthetic": SyntheticSource,
}


def make_source(source: str, root, *, bg: str = "none", realiad_unit: str | None = None,
                realiad_json_dir: str | None = None, eyecandies_pose: str = "official", folder_kind: str = "metric_z",
                folder_unit: str | None = None, folder_glob: str = "**/*", folder_category: str | None = None,
                folder_split: str = "train", folder_source_id: str | None = None) -> DepthSource:
    """Reader for ``source`` (one of :data:`SOURCES`) at ``root``; source-specific options are
    refused for other sources rather than silently ignored."""
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; expected one of {sorted(SOURCES)}")
    if bg != "none" and source != "mvtec3d":
        raise ValueError("--bg (background removal) applies to mvtec3d only")
    if source != "realiad_d3" and (realiad_unit is not None or realiad_json_dir is not None):
        raise ValueError("--realiad-unit / --realiad-json-dir apply to realiad_d3 only")
    if source != "eyecandies" and eyecandies_pose != "official":
        raise ValueError("--eyecandies-pose applies to eyecandies only")
    folder_opts = (folder_kind != "metric_z", folder_unit is not None, folder_glob != "**/*",
                   folder_category is not None, folder_split != "train", folder_source_id is not None)
    if source != "folder" and any(folder_opts):
        raise ValueError("--folder-* options apply to the folder source only")
    if source == "mvtec3d":
        return MVTec3DSource(root, bg=bg)
    if source == "eyecandies":
        return EyecandiesSource(root, pose=eyecandies_pose)
    if source == "realiad_d3":
        return RealIADD3Source(root, unit=realiad_unit, json_dir=realiad_json_dir)
    if source == "folder":
        return FolderSource(root, kind=folder_kind, unit=folder_unit, glob=folder_glob,
                            category=folder_category, split=folder_split, source_id=folder_source_id)
    return SyntheticSource(root)


__all__ = [
    "SOURCES",
    "EyecandiesSource",
    "FolderSource",
    "MVTec3DSource",
    "RealIADD3Source",
    "SyntheticSource",
    "make_source",
]
