"""What one class of any dataset offers the detection pipeline: its instance records and the loaders of
their views, GT and metadata, and the containers they return (records, views, instances, GT volumes). :class:`detect.data.sim3d.SiM3DClass` (multiview, calibrated, GT volumes)
and :class:`detect.data.single_view_datasets.SingleViewClass` (MVTec 3D-AD, Eyecandies, one view of a
SiM3D instance; 2D masks) implement it."""

from __future__ import annotations

import abc
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from detect.volume import ViewCalibration
from shared.geometry import VoxelGrid


# -- containers (data_formats.md §7.1) -------------------------------------------------------------
@dataclass(frozen=True)
class GTVolume:
    """Ground-truth anomaly volume of one instance on a regular grid (``shared.geometry``).

    ``labels`` bool (X, Y, Z): anomalous surface voxels; ``occupancy`` optional bool (X, Y, Z): object
    surface voxels (the evaluation domain of metrics.md §7); ``origin`` (3,) metres = minimum corner of
    voxel (0, 0, 0); ``voxel_size`` metres.
    """

    labels: np.ndarray
    origin: np.ndarray
    voxel_size: float
    occupancy: np.ndarray | None = None

    def __post_init__(self) -> None:
        labels = np.asarray(self.labels).astype(bool, copy=False)
        if labels.ndim != 3:
            raise ValueError(f"GT labels must be a 3D volume, got shape {labels.shape}")
        origin = np.asarray(self.origin, dtype=np.float64).reshape(-1)
        if origin.shape != (3,) or not np.isfinite(origin).all():
            raise ValueError(f"GT origin must be 3 finite numbers, got {self.origin!r}")
        if not float(self.voxel_size) > 0:
            raise ValueError(f"GT voxel_size must be > 0, got {self.voxel_size}")
        occ = None
        if self.occupancy is not None:
            occ = np.asarray(self.occupancy).astype(bool, copy=False)
            if occ.shape != labels.shape:
                raise ValueError(f"GT occupancy shape {occ.shape} != labels shape {labels.shape}")
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "origin", origin)
        object.__setattr__(self, "voxel_size", float(self.voxel_size))
        object.__setattr__(self, "occupancy", occ)

    @classmethod
    def from_sparse(cls, indices: np.ndarray, shape: Sequence[int], origin: Sequence[float], voxel_size: float,
                    occupancy_indices: np.ndarray | None = None) -> GTVolume:
        """Build from (M, 3) integer voxel indices (the sparse form allowed by data_formats §7.1)."""

        def dense(idx: np.ndarray) -> np.ndarray:
            idx = np.asarray(idx, dtype=np.int64).reshape(-1, 3)
            if len(idx) and ((idx < 0).any() or (idx >= np.asarray(shape)).any()):
                raise ValueError("sparse GT indices fall outside the volume shape")
            vol = np.zeros(tuple(int(s) for s in shape), bool)
            vol[idx[:, 0], idx[:, 1], idx[:, 2]] = True
            return vol

        occ = dense(occupancy_indices) if occupancy_indices is not None else None
        return cls(dense(indices), np.asarray(origin, dtype=np.float64), float(voxel_size), occ)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.labels.shape)

    @property
    def grid(self) -> VoxelGrid:
        return VoxelGrid(self.origin, self.voxel_size, self.shape)


@dataclass(frozen=True)
class ViewFiles:
    view_id: int
    stem: str
    depth_path: Path
    image_path: Path
    mask_path: Path | None


@dataclass(frozen=True)
class InstanceRecord:
    """An instance folder, scanned but not loaded."""

    class_name: str
    name: str
    path: Path
    role: str  # "train_real", "train_synth" or "test"
    label: int  # 1 anomalous ("bad" in a test folder's name), 0 otherwise
    views: tuple[ViewFiles, ...]

    @property
    def stems(self) -> list[str]:
        return [v.stem for v in self.views]


@dataclass
class View:
    """One loaded view. ``depth`` is in the stored unit (× ``calib.depth_scale`` = metres)."""

    view_id: int
    stem: str
    image: np.ndarray  # uint8 (H, W)
    depth: np.ndarray  # float32 (H, W), NaN = invalid
    calib: ViewCalibration | None
    mask: np.ndarray | None  # bool (H, W) 2D GT when the dataset provides it
    image_path: Path
    depth_path: Path

    @property
    def K(self) -> np.ndarray | None:
        return None if self.calib is None else self.calib.K

    @property
    def T_c2w(self) -> np.ndarray | None:
        return None if self.calib is None else self.calib.T_c2w


@dataclass
class Instance:
    record: InstanceRecord
    views: list[View]
    gt: GTVolume | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def label(self) -> int:
        return self.record.label

    @property
    def stems(self) -> list[str]:
        return [v.stem for v in self.views]



# -- the interface ---------------------------------------------------------------------------------

class InstanceDataset(abc.ABC):
    """One class: ``test_records`` (iteration and indexing load the test instances), ``stems`` (the view
    stems every instance shares), the training record(s) of a setup, and per-view loading."""

    root: Path
    class_name: str
    path: Path
    stems: list[str]
    test_records: list[InstanceRecord]
    calib_reader: Any
    view_order: str

    @property
    def n_views(self) -> int:
        return len(self.stems)

    @property
    def has_calibration(self) -> bool:
        return self.calib_reader is not None

    def __len__(self) -> int:
        return len(self.test_records)

    def __getitem__(self, i: int) -> Instance:
        return self.load_instance(self.test_records[i])

    def __iter__(self) -> Iterator[Instance]:
        for rec in self.test_records:
            yield self.load_instance(rec)

    @abc.abstractmethod
    def train_record(self, setup: str = "real2real") -> InstanceRecord:
        """The (single) training instance of ``setup``."""

    @abc.abstractmethod
    def load_view(self, record: InstanceRecord, view_id: int) -> View:
        """One view of an instance, checked (image, depth, calibration or None, 2D mask or None)."""

    @abc.abstractmethod
    def load_gt(self, record: InstanceRecord):
        """The instance's GT volume, or None (no reader, a nominal or training instance, 2D-only data)."""

    @abc.abstractmethod
    def load_meta(self, record: InstanceRecord) -> dict[str, Any]:
        """Per-instance metadata (anomaly descriptions, defect type), {} when there is none."""

    @abc.abstractmethod
    def load_instance(self, record: InstanceRecord, with_gt: bool = True) -> Instance:
        """Every view, the GT and the metadata of one instance."""
