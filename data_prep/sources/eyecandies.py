"""Eyecandies reader (``data_formats.md`` §3): 16-bit depth PNG + ``info_depth.yaml`` → metres.

Decode: ``d = u16 / 65535 · (max − min) + min`` with ``normalization: {min, max}`` of the sample's
``<idx>_info_depth.yaml``. The PNG is read as uint16 (PIL); an 8-bit read would quantise depth to
256 levels, so 8-bit PNGs are refused. Every pixel is valid (the conveyor belt is background, not
missing data).

Conventions (checked against the official eyecan-ai/eyecandies code and the M3DM/CFM preprocessing):

* ``<idx>_pose.txt`` is **camera-to-world**: the official ``depth2pc`` stage places points with
  ``X_world = pose · [d · K⁻¹ (u, v, 1); 1]`` in the image-style camera frame (x right, y down, z
  forward). This reader stores ``camera.T_c2w`` = the file as is.
* The normal maps (``n = rgb / 127.5 − 1``) are stored in a frame whose **Y and Z are flipped**
  relative to that camera frame: the official code multiplies by ``diag(1, −1, −1)`` before rotating
  with ``pose[:3, :3]``. This reader does not read the normals; whoever does must apply the flip.
* The older README snippet, copied by M3DM/CFM preprocessing, back-projects with ``inv(K4 · pose)``,
  i.e. treats the file as **world-to-camera**. With ``pose="cfm"`` (``--eyecandies-pose cfm``, parity
  experiments only) ``T_c2w`` is the inverse of the file, so points placed with it match their
  preprocessed clouds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from data_prep.shards import ConversionError, DepthSource, LoadedDepth, SourceItem
from data_prep.sources.common import file_size, read_png_uint16, rel_posix, skip_on_format_error
from shared import formats

SPLIT_MAP = {"train": "train", "val": "validation", "test_public": "test", "test_private": "test_private"}
FOCAL_PX = formats.EYECANDIES_FOCAL_PX
LAYOUT = ("<root>/<Category>/{train,val,test_public,test_private}/data/<idx>_depth.png with "
          "<idx>_info_depth.yaml beside it (e.g. <root>/CandyCane/train/data/000_depth.png)")
_DEPTH_SUFFIX = "_depth.png"


# The decoders are shared with detection (single-view Eyecandies evaluation); data preparation turns
# their FormatError into a skipped sample.
decode_eyecandies_depth = skip_on_format_error(formats.decode_eyecandies_depth)
read_info_depth = skip_on_format_error(formats.read_info_depth)


POSE_CONVENTIONS = ("official", "cfm")


class EyecandiesSource(DepthSource):
    source_id = "eyecandies"
    kind = "metric_z"
    unit = "m"
    expected_layout = LAYOUT

    def __init__(self, root, pose: str = "official") -> None:
        super().__init__(root)
        if pose not in POSE_CONVENTIONS:
            raise ValueError(f"--eyecandies-pose must be one of {POSE_CONVENTIONS}, got {pose!r}")
        self.pose = pose

    def params(self) -> dict:
        # only a non-default convention changes the parameters (and so the shards' parameter hash)
        return {"eyecandies_pose": self.pose} if self.pose != "official" else {}

    def enumerate(self) -> list[SourceItem]:
        self.require_root()
        items: list[SourceItem] = []
        dirs = [d for d in sorted(self.root.iterdir()) if d.is_dir() and not d.name.startswith(".")]
        cats = [d for d in dirs if any((d / s / "data").is_dir() for s in SPLIT_MAP)]
        self.empty_folders = [d.name + "/" for d in dirs if d not in cats]
        if not cats:
            if any((self.root / s / "data").is_dir() for s in SPLIT_MAP):
                raise ConversionError(f"eyecandies: {self.root} looks like a single category folder; pass "
                                      f"its parent. Expected layout: {LAYOUT}")
            raise ConversionError(f"eyecandies: no category folders under {self.root}. Expected layout: {LAYOUT}")
        for cat in cats:
            for split_orig, split in SPLIT_MAP.items():
                data = cat / split_orig / "data"
                if not data.is_dir():
                    continue
                files = sorted(p for p in data.iterdir() if p.is_file() and p.name.lower().endswith(_DEPTH_SUFFIX))
                if not files:
                    self.empty_folders.append(rel_posix(data, self.root) + "/")
                for f in files:
                    idx = f.name[: -len(_DEPTH_SUFFIX)]
                    label = "normal" if split in ("train", "validation") else None
                    items.append(SourceItem(category=cat.name, split=split, split_orig=split_orig, stem=idx,
                                            rel_path=rel_posix(f, self.root), label=label, ref=str(f),
                                            size=file_size(f), extra={"idx": idx}))
        return items

    def load(self, item: SourceItem) -> LoadedDepth:
        path = Path(item.ref)
        data = path.parent
        idx = item.extra["idx"]
        u16 = read_png_uint16(path)
        dmin, dmax = read_info_depth(data / f"{idx}_info_depth.yaml")
        depth = decode_eyecandies_depth(u16, dmin, dmax)
        notes: list[str] = []
        H, W = depth.shape
        camera: dict = {"K": [[FOCAL_PX, 0.0, W / 2.0], [0.0, FOCAL_PX, H / 2.0], [0.0, 0.0, 1.0]]}
        pose_path = data / f"{idx}_pose.txt"
        if pose_path.is_file():
            try:
                pose = np.loadtxt(pose_path, dtype=np.float64)
                if pose.shape != (4, 4) or not np.isfinite(pose).all():
                    raise ValueError(f"shape {pose.shape}")
                camera["T_c2w"] = np.linalg.inv(pose) if self.pose == "cfm" else pose
            except ValueError as exc:
                notes.append(f"pose file {pose_path.name} unreadable ({exc}); stored without T_c2w")
        label, label_known = item.label, True
        if item.split == "test":
            label = _read_label(data / f"{idx}_metadata.yaml", notes)
        elif item.split == "test_private":
            label = None  # hidden labels
        return LoadedDepth(depth=depth, camera=camera, label=label, label_known=label_known, notes=notes)

    def range_checks(self, z_stats: dict) -> list[dict]:
        maxes = [s["max"] for s in z_stats.values() if s.get("max") is not None]
        if not maxes:
            return []
        zmax = max(maxes)
        return [{"name": "z_unit_metres", "ok": 0.05 <= zmax <= 5.0, "fatal": False,
                 "detail": f"max z = {zmax:.4g} m (decoded with info_depth normalization)"}]


def _read_label(path: Path, notes: list[str]) -> str | None:
    import yaml

    try:
        meta = yaml.safe_load(path.read_text())
        value = int(meta["anomalous"])
    except (OSError, yaml.YAMLError, TypeError, KeyError, ValueError) as exc:
        notes.append(f"label unknown: {path.name} unreadable ({type(exc).__name__})")
        return None
    if value not in (0, 1):
        notes.append(f"label unknown: {path.name} has anomalous={value}")
        return None
    return "anomalous" if value else "normal"
