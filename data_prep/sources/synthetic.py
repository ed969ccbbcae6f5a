"""The built-in synthetic multiview benchmark as a pretraining source.

Reads the SiM3D-like layout written by ``data_prep/synthetic.py`` directly from disk:
``<root>/<class>/<instance>/depth/<view>.npy`` (z-depth in metres, float32, +inf = invalid) and,
for CAD-like training renders in SiM3D's format, ``<instance>/DEPTH/<view>_depth.exr`` (channel 0;
background = the map's maximum, negative values invalid; ``data_formats.md`` §7). Instances named
``<class>_real`` / ``<class>_synth`` are the training instances (split ``train``), every other
instance is ``test``; a test instance is anomalous iff its name contains ``bad``. When the
instance has ``calib/<view>.npz`` (``K``, ``T_c2w``), the camera is stored with the sample.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from data_prep.shards import ConversionError, DepthSource, LoadedDepth, SourceItem
from data_prep.sources.common import file_size, read_npy, rel_posix, to_depth_2d

LAYOUT = ("<root>/<class>/<instance>/depth/<view>.npy or <root>/<class>/<instance>/DEPTH/<view>_depth.exr "
          "(e.g. <root>/plastic_stool/plastic_stool_real/depth/0.npy)")
CALIB_DIR = "calib"


class SyntheticSource(DepthSource):
    source_id = "synthetic"
    kind = "metric_z"
    unit = "m"
    expected_layout = LAYOUT

    def enumerate(self) -> list[SourceItem]:
        self.require_root()
        files = sorted(p for p in self.root.glob("*/*/depth/*") if p.is_file() and p.suffix.lower() == ".npy")
        files += sorted(p for p in self.root.glob("*/*/DEPTH/*") if p.is_file()
                        and p.name.lower().endswith("_depth.exr"))
        if not files:
            raise ConversionError(f"synthetic: no depth maps under {self.root}. Expected layout: {LAYOUT}")
        items = []
        for f in files:
            instance_dir = f.parent.parent
            cls, instance = instance_dir.parent.name, instance_dir.name
            train = instance in (f"{cls}_real", f"{cls}_synth")
            split = "train" if train else "test"
            anomalous = (not train) and "bad" in instance
            exr = f.suffix.lower() == ".exr"
            view = f.name[: -len("_depth.exr")] if exr else f.stem
            items.append(SourceItem(category=cls, split=split, split_orig=instance,
                                    stem=f"{instance}_{view}", rel_path=rel_posix(f, self.root),
                                    label="anomalous" if anomalous else "normal",
                                    defect_type="bad" if anomalous else None, ref=str(f), size=file_size(f),
                                    extra={"view": view, "exr": exr}))
        return items

    def load(self, item: SourceItem) -> LoadedDepth:
        path = Path(item.ref)
        if item.extra.get("exr"):
            from shared.exr import read_exr_channel0

            depth = to_depth_2d(read_exr_channel0(path), item.rel_path)
            finite = np.isfinite(depth)
            if finite.any():
                depth[finite & (depth == depth[finite].max())] = np.nan  # rendered background
        else:
            depth = to_depth_2d(read_npy(path), item.rel_path)
        with np.errstate(invalid="ignore"):
            depth[~np.isfinite(depth) | (depth <= 0)] = np.nan  # +inf marks "no surface"
        camera = None
        calib = path.parent.parent / CALIB_DIR / f"{item.extra['view']}.npz"
        if calib.is_file():
            with np.load(calib, allow_pickle=False) as npz:
                if "K" in npz and "T_c2w" in npz:
                    camera = {"K": np.asarray(npz["K"], np.float64), "T_c2w": np.asarray(npz["T_c2w"], np.float64)}
        return LoadedDepth(depth=depth, camera=camera)
