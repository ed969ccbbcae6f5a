"""Data access for detection: the SiM3D multiview reader (also reads our synthetic benchmark) and the
camera/voxel geometry shared with ModMap's anomaly volumes."""

from detect.data.geometry import (
    VoxelGrid,
    backproject_depth,
    invert_rigid,
    look_at_c2w,
    pixel_rays,
    project_points,
)
from detect.data.sim3d import (
    CalibReader,
    GTReader,
    GTVolume,
    Instance,
    InstanceRecord,
    SiM3DClass,
    SiM3DDataset,
    SiM3DError,
    View,
    ViewCalib,
    get_calib_reader,
    get_gt_reader,
    list_classes,
    register_calib_reader,
    register_gt_reader,
)

__all__ = [
    "CalibReader", "GTReader", "GTVolume", "Instance", "InstanceRecord", "SiM3DClass", "SiM3DDataset",
    "SiM3DError", "View", "ViewCalib", "VoxelGrid", "backproject_depth", "get_calib_reader", "get_gt_reader",
    "invert_rigid", "list_classes", "look_at_c2w", "pixel_rays", "project_points", "register_calib_reader",
    "register_gt_reader",
]
