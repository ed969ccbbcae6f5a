"""Data access for detection: the SiM3D multiview reader (also reads our synthetic benchmark), the
camera/voxel geometry shared with ModMap's anomaly volumes, and the benchmark preview figure
(``render_preview``; imported on first use, so ``python -m detect.data.preview`` runs cleanly)."""

from detect.data.base import GTVolume, Instance, InstanceRecord, View
from detect.data.sim3d import (
    CalibReader,
    GTReader,
    SiM3DClass,
    SiM3DDataset,
    SiM3DError,
    ViewCalib,
    get_calib_reader,
    get_gt_reader,
    list_classes,
    register_calib_reader,
    register_gt_reader,
)
from shared.geometry import (
    VoxelGrid,
    backproject_depth,
    invert_rigid,
    look_at_c2w,
    pixel_rays,
    project_points,
)

_LAZY = {"PreviewError": "detect.data.preview", "render_preview": "detect.data.preview"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CalibReader", "GTReader", "GTVolume", "Instance", "InstanceRecord", "PreviewError", "SiM3DClass",
    "SiM3DDataset", "SiM3DError", "View", "ViewCalib", "VoxelGrid", "backproject_depth", "get_calib_reader",
    "get_gt_reader", "invert_rigid", "list_classes", "look_at_c2w", "pixel_rays", "project_points",
    "register_calib_reader", "register_gt_reader", "render_preview",
]
