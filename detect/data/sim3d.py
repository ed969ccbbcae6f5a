"""Reader for the SiM3D multiview layout (data_formats.md §7) and for our synthetic benchmark, which
uses the same layout plus documented calibration and GT files (docs/synthetic_benchmark.md).

One API for both::

    ds = SiM3DClass(root, "vase")                       # calib_reader="npz", gt_reader="npz"
    train = ds.load_instance(ds.train_record("real2real"))
    for inst in ds:                                      # test instances, sorted by folder name
        inst.label, inst.gt, [(v.view_id, v.stem, v.image, v.depth, v.calib) for v in inst.views]

Layout (per class folder ``<root>/<class>/``)::

    <class>_real/   depth/<stem>.npy          rgb/<stem>_2.png      (real-to-real training instance)
    <class>_synth/  DEPTH/<stem>_depth.exr    RGB/<stem>_2.png      (synthetic-to-real training instance)
    <instance>/     depth/<stem>.npy          rgb/<stem>_2.png      (test instances; "bad" in the name
                                                                     = anomalous)

Either training layout may also use the other one's file types (our generator can write the synth
instance as ``depth/*.npy``). Test instances are the sub-folders whose name contains neither ``real``
nor ``synth`` and that hold a ``depth/`` (or ``DEPTH/``) folder.

Views and their order
    A view is identified by its *stem* (``"7"`` for ``depth/7.npy`` and ``DEPTH/7_depth.exr``).
    ``view_id`` (0-based; the paper's C1..CN are view_id 0..N-1) is the position of the stem in the
    view order, which defines the one-hot view code of ModMap:

    - ``"lexicographic"``: the authors' convention — the order of the real layout's depth file names
      ``<stem>.npy`` as Python sorts strings (``"10.npy"`` before ``"2.npy"``). We sort by that name for
      every instance, including synth ones, whose own file names (``10_depth.exr`` < ``1_depth.exr``)
      would order differently: training and test instances must share one order.
    - ``"natural"``: digit runs compare as numbers (``2`` before ``10``).
    - ``"auto"`` (default): ``"natural"`` for our synthetic benchmark (its root holds a
      ``benchmark.json`` of format ``synthetic-sim3d``; its stems are 1..N, so natural order is the
      generation order), ``"lexicographic"`` otherwise (real SiM3D, for parity with the authors).
    The resolved order is ``SiM3DClass.view_order``; record it with any model trained on the views.
    Every instance of a class must have exactly the same stems (checked at construction).

Arrays returned
    image: uint8 (H, W) grayscale; depth: float32 (H, W) in the stored unit, **NaN = invalid**
    (``.npy``: non-finite or ≤ 0; ``.exr``: the map's maximum — the renderer's background — or
    negative); ``calib.depth_scale`` converts to metres. Calibration and GT come from pluggable readers
    selected by name (``register_calib_reader`` / ``register_gt_reader``; also discoverable through the
    entry-point groups ``dinodepth_modmap.calib_readers`` / ``dinodepth_modmap.gt_readers``). Passing
    ``calib_reader=None`` is the explicit 2D-only mode: views carry no calibration and detection can
    still produce per-view maps and I-AUROC, but no volumes.

Readers are pure: they never modify the dataset.
"""

from __future__ import annotations

import os

# OpenCV reads this once, at its first EXR decode; set it before anything imports cv2 (data_formats §7).
os.environ.setdefault("OPENCV_IO_ENABLE_OPENEXR", "1")

import abc
import json
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from detect.data.base import GTVolume, Instance, InstanceDataset, InstanceRecord, View, ViewFiles
from detect.volume import ViewCalibration
from shared.exr import ExrError, read_exr_channel0
from shared.formats import read_npy
from shared.geometry import invert_rigid

VIEW_ORDERS = ("auto", "natural", "lexicographic")
SETUP_TO_ROLE = {"real2real": "train_real", "synth2real": "train_synth"}
CALIB_ENTRY_POINT_GROUP = "dinodepth_modmap.calib_readers"
GT_ENTRY_POINT_GROUP = "dinodepth_modmap.gt_readers"
SYNTHETIC_FORMAT = "synthetic-sim3d"
NON_INSTANCE_FOLDERS = ("calib", "gt")  # class-level folders that are not instances


class SiM3DError(ValueError):
    """Malformed or inconsistent SiM3D data; the message names the instance and the file."""


# ---------------------------------------------------------------------------------------------------
# Calibration and GT containers (data_formats.md §7.1)
# ---------------------------------------------------------------------------------------------------


# One calibration class for the readers and the volume (detect.volume.ViewCalibration); ViewCalib is the
# readers' name for it.
ViewCalib = ViewCalibration


# ---------------------------------------------------------------------------------------------------
# Pluggable readers
# ---------------------------------------------------------------------------------------------------


class CalibReader(abc.ABC):
    """Reads the calibration of one view. Subclass, then ``@register_calib_reader("name")``."""

    name: ClassVar[str] = ""

    @abc.abstractmethod
    def read(self, instance_dir: Path, view_id: int, view_stem: str) -> ViewCalib:
        """Calibration of view ``view_stem`` (position ``view_id`` in the view order). Raise
        ``FileNotFoundError`` when the instance has no calibration."""


class GTReader(abc.ABC):
    """Reads the GT volume of one instance. Subclass, then ``@register_gt_reader("name")``."""

    name: ClassVar[str] = ""

    @abc.abstractmethod
    def read(self, instance_dir: Path) -> GTVolume | None:
        """The instance's GT volume, or None when the instance has none (e.g. training instances)."""


_CALIB_READERS: dict[str, Callable[..., CalibReader]] = {}
_GT_READERS: dict[str, Callable[..., GTReader]] = {}


def _registrar(registry: dict[str, Callable], what: str) -> Callable[[str], Callable[[Callable], Callable]]:
    """The ``@register_…("name")`` decorator of one reader registry (a name may not be taken twice)."""

    def register(name: str) -> Callable[[Callable], Callable]:
        def deco(factory: Callable) -> Callable:
            if name in registry and registry[name] is not factory:
                raise ValueError(f"{what} {name!r} is already registered")
            registry[name] = factory
            if isinstance(factory, type):
                factory.name = name
            return factory

        return deco

    return register


register_calib_reader = _registrar(_CALIB_READERS, "calibration reader")
register_calib_reader.__doc__ = "Decorator registering a CalibReader class (or factory) under ``name``."
register_gt_reader = _registrar(_GT_READERS, "GT reader")
register_gt_reader.__doc__ = "Decorator registering a GTReader class (or factory) under ``name``."


def _lookup(name: str, registry: dict[str, Callable], group: str, what: str) -> Callable:
    if name not in registry:
        from importlib.metadata import entry_points

        for ep in entry_points(group=group):
            if ep.name == name:
                registry[name] = ep.load()
                break
    if name not in registry:
        raise KeyError(f"unknown {what} {name!r}; registered: {sorted(registry)} (plugins can register "
                       f"through the entry-point group {group!r})")
    return registry[name]


def get_calib_reader(name: str, **kwargs: Any) -> CalibReader:
    """Instantiate the calibration reader registered as ``name`` with ``kwargs``."""
    return _lookup(name, _CALIB_READERS, CALIB_ENTRY_POINT_GROUP, "calibration reader")(**kwargs)


def get_gt_reader(name: str, **kwargs: Any) -> GTReader:
    """Instantiate the GT reader registered as ``name`` with ``kwargs``."""
    return _lookup(name, _GT_READERS, GT_ENTRY_POINT_GROUP, "GT reader")(**kwargs)


def available_calib_readers() -> list[str]:
    return sorted(_CALIB_READERS)


def available_gt_readers() -> list[str]:
    return sorted(_GT_READERS)


def _npz_scalar(data: Any, key: str, default: Any = None) -> Any:
    if key not in data:
        if default is None:
            raise KeyError(key)
        return default
    value = np.asarray(data[key])
    return value.item() if value.ndim == 0 else value


@register_calib_reader("npz")
class NpzCalibReader(CalibReader):
    """Our interchange format: one ``<stem>.npz`` per view in ``<instance>/calib/`` (or, shared by all
    instances, in ``<class>/calib/``) with arrays ``K`` (3×3), ``T_c2w`` (4×4; or ``T_w2c``), ``width``,
    ``height``, ``depth_scale``, ``depth_type`` ('z'|'range'), ``pixel_center``."""

    def __init__(self, subdir: str = "calib") -> None:
        self.subdir = subdir

    def read(self, instance_dir: Path, view_id: int, view_stem: str) -> ViewCalib:
        candidates = [instance_dir / self.subdir / f"{view_stem}.npz",
                      instance_dir.parent / self.subdir / f"{view_stem}.npz"]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise FileNotFoundError(f"no calibration file {candidates[0]} (nor {candidates[1]})")
        with np.load(path, allow_pickle=False) as data:
            try:
                if "T_c2w" in data:
                    T = np.asarray(data["T_c2w"], dtype=np.float64)
                else:
                    T = invert_rigid(np.asarray(data["T_w2c"], dtype=np.float64))
                return ViewCalib(
                    K=np.asarray(data["K"], dtype=np.float64), T_c2w=T, width=int(_npz_scalar(data, "width")),
                    height=int(_npz_scalar(data, "height")),
                    depth_scale=float(_npz_scalar(data, "depth_scale", 1.0)),
                    depth_type=str(_npz_scalar(data, "depth_type", "z")),
                    pixel_center=float(_npz_scalar(data, "pixel_center", 0.0)))
            except KeyError as exc:
                raise ValueError(f"{path}: missing field {exc} (need K, T_c2w or T_w2c, width, height)") from None
            except ValueError as exc:
                raise ValueError(f"{path}: {exc}") from None


def _image_size_of_view(instance_dir: Path, view_stem: str) -> tuple[int, int] | None:
    from PIL import Image  # header only, no decoding

    for sub in ("rgb", "RGB"):
        p = instance_dir / sub / f"{view_stem}_2.png"
        if p.is_file():
            with Image.open(p) as im:
                return im.size
    return None


def _read_float_lines(path: Path) -> list[list[float]]:
    rows = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            rows.append([float(x) for x in line.replace(",", " ").split()])
    return rows


@register_calib_reader("pose_txt")
class PoseTxtCalibReader(CalibReader):
    """A prior guess at the SiM3D files (use only after verification, data_formats §7.1).

    ``poses_file``: one 4×4 camera-to-world pose per line (16 row-major floats), line i = view_id i;
    ``intrinsics_file``: one line shared by all views or one line per view, either 9 floats (row-major
    K) or 4 (fx fy cx cy). Both are looked up in the instance folder, then in the class folder.
    ``blender_to_opencv`` right-multiplies the pose by diag(1, −1, −1, 1). The image size is read from
    the view's image header unless ``width``/``height`` are given.
    """

    def __init__(self, poses_file: str = "poses.txt", intrinsics_file: str = "intrinsics.txt",
                 blender_to_opencv: bool = False, depth_scale: float = 1.0, depth_type: str = "z",
                 pixel_center: float = 0.0, width: int | None = None, height: int | None = None) -> None:
        self.poses_file, self.intrinsics_file = poses_file, intrinsics_file
        self.blender_to_opencv = blender_to_opencv
        self.depth_scale, self.depth_type, self.pixel_center = depth_scale, depth_type, pixel_center
        self.width, self.height = width, height

    @staticmethod
    def _find(instance_dir: Path, name: str) -> Path:
        for p in (instance_dir / name, instance_dir.parent / name):
            if p.is_file():
                return p
        raise FileNotFoundError(f"no {name} in {instance_dir} or {instance_dir.parent}")

    def read(self, instance_dir: Path, view_id: int, view_stem: str) -> ViewCalib:
        pose_path = self._find(instance_dir, self.poses_file)
        poses = _read_float_lines(pose_path)
        if view_id >= len(poses) or len(poses[view_id]) != 16:
            raise ValueError(f"{pose_path}: need 16 floats on line {view_id + 1} for view {view_stem!r} "
                             f"({len(poses)} pose lines found)")
        T = np.asarray(poses[view_id], dtype=np.float64).reshape(4, 4)
        if self.blender_to_opencv:
            T = T @ np.diag([1.0, -1.0, -1.0, 1.0])
        k_path = self._find(instance_dir, self.intrinsics_file)
        rows = _read_float_lines(k_path)
        row = rows[0] if len(rows) == 1 else rows[view_id] if view_id < len(rows) else None
        if row is None or len(row) not in (4, 9):
            raise ValueError(f"{k_path}: need one line (shared) or one per view with 9 or 4 floats")
        K = np.asarray(row).reshape(3, 3) if len(row) == 9 else np.array(
            [[row[0], 0.0, row[2]], [0.0, row[1], row[3]], [0.0, 0.0, 1.0]])
        size = (self.width, self.height) if self.width and self.height else _image_size_of_view(
            instance_dir, view_stem)
        if size is None:
            raise ValueError(f"image size of view {view_stem!r} unknown: pass width/height to pose_txt")
        return ViewCalib(K=K, T_c2w=T, width=size[0], height=size[1], depth_scale=self.depth_scale,
                         depth_type=self.depth_type, pixel_center=self.pixel_center)


@register_calib_reader("cameras_json")
class CamerasJsonCalibReader(CalibReader):
    """``cameras.json`` of our generator (per class, or per instance): ``{"depth_type", "depth_scale",
    "pixel_center", "views": [{"stem", "K", "T_c2w", "width", "height"}, ...]}``."""

    def __init__(self, filename: str = "cameras.json") -> None:
        self.filename = filename
        self._cache: dict[Path, dict[str, Any]] = {}

    def read(self, instance_dir: Path, view_id: int, view_stem: str) -> ViewCalib:
        path = next((p for p in (instance_dir / self.filename, instance_dir.parent / self.filename)
                     if p.is_file()), None)
        if path is None:
            raise FileNotFoundError(f"no {self.filename} in {instance_dir} or {instance_dir.parent}")
        if path not in self._cache:
            self._cache[path] = json.loads(path.read_text())
        doc = self._cache[path]
        view = next((v for v in doc.get("views", []) if str(v.get("stem")) == view_stem), None)
        if view is None:
            raise ValueError(f"{path}: no entry for view {view_stem!r}")
        return ViewCalib(K=np.asarray(view["K"]), T_c2w=np.asarray(view["T_c2w"]), width=view["width"],
                         height=view["height"], depth_scale=doc.get("depth_scale", 1.0),
                         depth_type=doc.get("depth_type", "z"), pixel_center=doc.get("pixel_center", 0.0))


GT_FORMAT_VERSION = 2  # the newest gt/volume.npz this reader understands (data_prep/synthetic.py writes it)


def _check_gt_version(path: Path, data: Any) -> None:
    """Refuse synthetic GT files of format 1 (labels included removed material no view observes, so
    no detector could reach them) and files newer than this reader; files without ``format_version``
    (converted by users, docs/synthetic_benchmark.md) are read as they are."""
    if "format_version" not in data:
        return
    version = int(_npz_scalar(data, "format_version"))
    if version == 1:
        raise ValueError(f"{path}: GT format version 1 (synthetic benchmark before generator 2.0) is no longer "
                         "read: its labels mark removed material that no view observes. Regenerate the benchmark "
                         "(python data_prep/synthetic.py --out DIR --overwrite)")
    if version > GT_FORMAT_VERSION:
        raise ValueError(f"{path}: GT format version {version} is newer than this reader "
                         f"(up to {GT_FORMAT_VERSION}); update the toolkit")


@register_gt_reader("npz")
class NpzGTReader(GTReader):
    """Our GT format: ``<instance>/gt/volume.npz`` with ``labels`` (bool X×Y×Z) — or sparse
    ``labels_idx`` (M×3 int) + ``shape`` — ``origin`` (3,), ``voxel_size``, optional ``occupancy``
    (dense) or ``occupancy_idx`` (sparse). A missing file means "no GT" (None)."""

    def __init__(self, filename: str = "gt/volume.npz") -> None:
        self.filename = filename

    def read(self, instance_dir: Path) -> GTVolume | None:
        path = instance_dir / self.filename
        if not path.is_file():
            return None
        with np.load(path, allow_pickle=False) as data:
            _check_gt_version(path, data)
            try:
                origin, vs = data["origin"], float(_npz_scalar(data, "voxel_size"))
                if "labels" in data:
                    occ = data.get("occupancy")
                    return GTVolume(np.asarray(data["labels"]), origin, vs, occ)
                occ_idx = data.get("occupancy_idx")
                return GTVolume.from_sparse(data["labels_idx"], data["shape"], origin, vs, occ_idx)
            except KeyError as exc:
                raise ValueError(f"{path}: missing field {exc} (need labels or labels_idx + shape, origin, "
                                 "voxel_size)") from None
            except ValueError as exc:
                raise ValueError(f"{path}: {exc}") from None


@register_gt_reader("none")
class NoGTReader(GTReader):
    """No GT volumes (detection metrics only)."""

    def read(self, instance_dir: Path) -> GTVolume | None:
        return None


# ---------------------------------------------------------------------------------------------------
# Layout scanning
# ---------------------------------------------------------------------------------------------------


def natural_key(text: str) -> tuple:
    """Sort key in which runs of ASCII digits compare as integers ("2" < "10")."""
    return tuple((0, int(p), p) if p.isdigit() else (1, p, p) for p in re.split(r"([0-9]+)", text) if p)


def lexicographic_key(stem: str) -> str:
    """The authors' order: the real layout's depth file name ``<stem>.npy`` as a Python string."""
    return f"{stem}.npy"


def sort_stems(stems: Sequence[str], view_order: str) -> list[str]:
    if view_order == "natural":
        return sorted(stems, key=natural_key)
    if view_order == "lexicographic":
        return sorted(stems, key=lexicographic_key)
    raise ValueError(f"view_order must be 'natural' or 'lexicographic', got {view_order!r}")


def pair_image_path(depth_path: Path, instance_dir: Path) -> Path:
    """The image paired with a depth file (data_formats §7): in the path *relative to the instance*,
    the directory component ``depth`` → ``rgb`` (``DEPTH`` → ``RGB``) and the file name ``<stem>.npy``
    → ``<stem>_2.png`` (``<stem>_depth.exr`` → ``<stem>_2.png``). Components are replaced, never
    substrings, so a root path containing "depth" is harmless."""
    rel = depth_path.relative_to(instance_dir)
    parts = list(rel.parts)
    swap = {"depth": "rgb", "DEPTH": "RGB"}
    if len(parts) < 2 or parts[0] not in swap:
        raise SiM3DError(f"{depth_path}: depth file is not inside a depth/ or DEPTH/ folder of {instance_dir}")
    parts[0] = swap[parts[0]]
    parts[-1] = f"{_depth_stem(parts[-1])}_2.png"
    return instance_dir.joinpath(*parts)


def _depth_stem(filename: str) -> str:
    low = filename.lower()
    if low.endswith("_depth.exr"):
        return filename[: -len("_depth.exr")]
    if low.endswith((".exr", ".npy")):
        return filename[:-4]
    raise SiM3DError(f"{filename}: not a depth file (.npy or _depth.exr)")


def _list_depth_files(instance_dir: Path) -> list[Path]:
    for sub, suffix in (("depth", ".npy"), ("DEPTH", "_depth.exr"), ("depth", ".exr")):
        folder = instance_dir / sub
        if folder.is_dir():
            files = [p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(suffix)
                     and not p.name.startswith(".")]
            if files:
                return files
    return []


def _has_depth_folder(path: Path) -> bool:
    return (path / "depth").is_dir() or (path / "DEPTH").is_dir()


def scan_instance(instance_dir: Path, class_name: str, role: str, view_order: str) -> InstanceRecord:
    """List an instance's views (sorted by ``view_order``) and pair every depth file with its image."""
    depth_files = _list_depth_files(instance_dir)
    if not depth_files:
        raise SiM3DError(f"instance {instance_dir.name!r} ({instance_dir}): no depth files (expected "
                         "depth/<view>.npy or DEPTH/<view>_depth.exr)")
    by_stem: dict[str, Path] = {}
    for p in depth_files:
        stem = _depth_stem(p.name)
        if stem in by_stem:
            raise SiM3DError(f"instance {instance_dir.name!r}: two depth files for view {stem!r}: "
                             f"{by_stem[stem]} and {p}")
        by_stem[stem] = p
    views = []
    for view_id, stem in enumerate(sort_stems(list(by_stem), view_order)):
        depth_path = by_stem[stem]
        image_path = pair_image_path(depth_path, instance_dir)
        if not image_path.is_file():
            raise SiM3DError(f"instance {instance_dir.name!r}, view {stem!r}: image {image_path} missing "
                             f"(paired with {depth_path})")
        mask_path = instance_dir / "gt" / "masks" / f"{stem}.png"
        views.append(ViewFiles(view_id, stem, depth_path, image_path, mask_path if mask_path.is_file() else None))
    label = int(role == "test" and "bad" in instance_dir.name)
    return InstanceRecord(class_name, instance_dir.name, instance_dir, role, label, tuple(views))


def is_synthetic_benchmark(root: str | os.PathLike) -> bool:
    """True when ``root`` was written by data_prep/synthetic.py (its benchmark.json says so)."""
    marker = Path(root) / "benchmark.json"
    try:
        return json.loads(marker.read_text()).get("format") == SYNTHETIC_FORMAT
    except (OSError, ValueError):
        return False


def list_classes(root: str | os.PathLike) -> list[str]:
    """Class folders of a SiM3D-style root (those with at least one instance folder), sorted."""
    root = Path(root)
    if not root.is_dir():
        raise SiM3DError(f"dataset root {root} does not exist or is not a folder")
    return sorted(d.name for d in root.iterdir()
                  if d.is_dir() and any(sub.is_dir() and _has_depth_folder(sub) for sub in d.iterdir()))


# ---------------------------------------------------------------------------------------------------
# The dataset
# ---------------------------------------------------------------------------------------------------


def load_image(path: Path, where: str) -> np.ndarray:
    import cv2  # lazy

    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise SiM3DError(f"{where}: cannot read image {path}")
    if img.ndim == 3:  # SiM3D images are grayscale; tolerate RGB(A) files saved by other tools
        img = cv2.cvtColor(img, cv2.COLOR_BGRA2GRAY if img.shape[2] == 4 else cv2.COLOR_BGR2GRAY)
    if img.dtype != np.uint8:
        raise SiM3DError(f"{where}: image {path} is {img.dtype}, expected 8-bit grayscale")
    return img


def load_depth(path: Path, where: str = "") -> np.ndarray:
    """Read one depth map as float32 (H, W) with NaN = invalid (rules in the module docstring)."""
    where = where or str(path)
    if path.name.lower().endswith(".exr"):
        try:
            depth = read_exr_channel0(path)
        except (ExrError, OSError) as exc:
            raise SiM3DError(f"{where}: cannot read depth {path}: {exc}") from None
        depth = depth.astype(np.float32, copy=True)
        finite = np.isfinite(depth)
        if finite.any():  # the renderer's background is the map's maximum (data_formats §7)
            depth[finite & (depth == depth[finite].max())] = np.nan
        depth[~finite | (depth < 0)] = np.nan
        return depth
    try:
        depth = read_npy(path)  # FormatError (a ValueError) for an empty, cut or crafted file
    except (OSError, ValueError) as exc:
        raise SiM3DError(f"{where}: cannot read depth {path}: {exc}") from None
    if depth.ndim == 3 and depth.shape[2] == 1:
        depth = depth[..., 0]
    if depth.ndim != 2 or not np.issubdtype(depth.dtype, np.number):
        raise SiM3DError(f"{where}: depth {path} has shape {depth.shape} / dtype {depth.dtype}, expected a "
                         "numeric (H, W) map")
    depth = depth.astype(np.float32, copy=True)
    depth[~np.isfinite(depth) | (depth <= 0)] = np.nan  # +inf marks "no measurement"
    return depth


class SiM3DClass(InstanceDataset):
    """One class of a SiM3D-style dataset (real SiM3D or our synthetic benchmark).

    Args:
        root: dataset root (holds the class folders).
        class_name: class folder name.
        view_order: ``"auto"`` (default), ``"natural"`` or ``"lexicographic"`` (module docstring).
        calib_reader: registered name, a ``CalibReader`` instance, or None for the explicit 2D-only mode.
        gt_reader: registered name, a ``GTReader`` instance, or None (no GT volumes).
        calib_reader_kwargs / gt_reader_kwargs: passed to the registered reader's constructor.
        load_masks: load per-view 2D GT masks (``gt/masks/<stem>.png``) when present.
    """

    def __init__(self, root: str | os.PathLike, class_name: str, view_order: str = "auto",
                 calib_reader: str | CalibReader | None = "npz", gt_reader: str | GTReader | None = "npz",
                 calib_reader_kwargs: dict[str, Any] | None = None,
                 gt_reader_kwargs: dict[str, Any] | None = None, load_masks: bool = True) -> None:
        self.root = Path(root)
        self.class_name = class_name
        self.path = self.root / class_name
        if not self.path.is_dir():
            raise SiM3DError(f"class folder {self.path} not found (classes under {self.root}: "
                             f"{list_classes(self.root) if self.root.is_dir() else 'root missing'})")
        if view_order not in VIEW_ORDERS:
            raise ValueError(f"view_order must be one of {VIEW_ORDERS}, got {view_order!r}")
        if view_order == "auto":
            view_order = "natural" if is_synthetic_benchmark(self.root) else "lexicographic"
        self.view_order = view_order
        self.calib_reader = (get_calib_reader(calib_reader, **(calib_reader_kwargs or {}))
                             if isinstance(calib_reader, str) else calib_reader)
        self.gt_reader = (get_gt_reader(gt_reader, **(gt_reader_kwargs or {}))
                          if isinstance(gt_reader, str) else gt_reader)
        self.load_masks = load_masks
        self.train_records: dict[str, InstanceRecord] = {}
        self.test_records: list[InstanceRecord] = []
        self._scan()

    # -- scanning ------------------------------------------------------------------------------------
    def _scan(self) -> None:
        real, synth, tests = [], [], []
        for sub in sorted(p for p in self.path.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if "real" in sub.name:
                real.append(sub)
            elif "synth" in sub.name:
                synth.append(sub)
            elif _has_depth_folder(sub):
                tests.append(sub)
            elif "bad" in sub.name:
                raise SiM3DError(f"instance {sub.name!r} ({sub}): no depth/ folder")
            elif sub.name not in NON_INSTANCE_FOLDERS:
                warnings.warn(f"class {self.class_name!r}: folder {sub} holds no depth/ folder; not an "
                              "instance, skipped", stacklevel=3)
        for setup, found in (("real2real", real), ("synth2real", synth)):
            if len(found) > 1:
                raise SiM3DError(f"class {self.class_name!r}: several {setup} training folders "
                                 f"{[p.name for p in found]}")
            if found:
                self.train_records[setup] = scan_instance(found[0], self.class_name, SETUP_TO_ROLE[setup],
                                                          self.view_order)
        self.test_records = [scan_instance(p, self.class_name, "test", self.view_order) for p in tests]
        records = list(self.train_records.values()) + self.test_records
        if not records:
            raise SiM3DError(f"class {self.class_name!r} ({self.path}): no instance folders")
        ref = records[0]
        for rec in records[1:]:
            if rec.stems != ref.stems:
                missing = sorted(set(ref.stems) - set(rec.stems), key=natural_key)
                extra = sorted(set(rec.stems) - set(ref.stems), key=natural_key)
                raise SiM3DError(
                    f"class {self.class_name!r}: instance {rec.name!r} has {len(rec.stems)} views but "
                    f"{ref.name!r} has {len(ref.stems)}; missing views {missing}, extra views {extra} "
                    f"(first file of {rec.name!r}: {rec.views[0].depth_path})")
        self.stems = ref.stems

    # -- access --------------------------------------------------------------------------------------
    def train_record(self, setup: str = "real2real") -> InstanceRecord:
        if setup not in SETUP_TO_ROLE:
            raise ValueError(f"setup must be one of {sorted(SETUP_TO_ROLE)}, got {setup!r}")
        if setup not in self.train_records:
            raise SiM3DError(f"class {self.class_name!r}: no training instance for {setup} (expected a folder "
                             f"{self.class_name}_{'real' if setup == 'real2real' else 'synth'} in {self.path})")
        return self.train_records[setup]

    def load_view(self, record: InstanceRecord, view_id: int) -> View:
        """Load and check one view (image, depth, calibration, 2D mask)."""
        vf = record.views[view_id]
        where = f"class {record.class_name!r}, instance {record.name!r}, view {vf.stem!r}"
        image = load_image(vf.image_path, where)
        depth = load_depth(vf.depth_path, where)
        if image.shape != depth.shape:
            raise SiM3DError(f"{where}: image {vf.image_path} is {image.shape[1]}×{image.shape[0]} but depth "
                             f"{vf.depth_path} is {depth.shape[1]}×{depth.shape[0]} (must be pixel-aligned)")
        if not np.isfinite(depth).any():
            raise SiM3DError(f"{where}: depth {vf.depth_path} has no valid pixel (all NaN/inf/≤0)")
        calib = None
        if self.calib_reader is not None:
            try:
                calib = self.calib_reader.read(record.path, view_id, vf.stem)
            except FileNotFoundError as exc:
                raise SiM3DError(f"{where}: calibration missing ({exc}); pass calib_reader=None for 2D-only "
                                 "detection (no volumes), or another reader") from None
            except (ValueError, KeyError, OSError) as exc:
                raise SiM3DError(f"{where}: bad calibration: {exc}") from None
            if (calib.width, calib.height) != (image.shape[1], image.shape[0]):
                raise SiM3DError(f"{where}: calibration is for {calib.width}×{calib.height} but image "
                                 f"{vf.image_path} is {image.shape[1]}×{image.shape[0]}")
        mask = None
        if self.load_masks and vf.mask_path is not None:
            m = load_image(vf.mask_path, where)
            if m.shape != image.shape:
                raise SiM3DError(f"{where}: mask {vf.mask_path} is {m.shape[1]}×{m.shape[0]}, image is "
                                 f"{image.shape[1]}×{image.shape[0]}")
            mask = m > 0
        return View(vf.view_id, vf.stem, image, depth, calib, mask, vf.image_path, vf.depth_path)

    def iter_views(self, record: InstanceRecord) -> Iterator[View]:
        """Views one at a time (full-resolution SiM3D instances are GBs when loaded at once)."""
        for i in range(len(record.views)):
            yield self.load_view(record, i)

    def load_gt(self, record: InstanceRecord) -> GTVolume | None:
        if self.gt_reader is None or record.role != "test":
            return None
        try:
            return self.gt_reader.read(record.path)
        except (ValueError, KeyError, OSError) as exc:
            raise SiM3DError(f"class {record.class_name!r}, instance {record.name!r}: bad GT volume: {exc}") from None

    def load_meta(self, record: InstanceRecord) -> dict[str, Any]:
        """The generator's ``meta.json`` (anomaly descriptions) when present, else {}."""
        p = record.path / "meta.json"
        return json.loads(p.read_text()) if p.is_file() else {}

    def load_instance(self, record: InstanceRecord, with_gt: bool = True) -> Instance:
        views = list(self.iter_views(record))
        gt = self.load_gt(record) if with_gt else None
        if gt is None and record.label == 1 and self.gt_reader is not None and with_gt:
            warnings.warn(f"class {record.class_name!r}, anomalous instance {record.name!r}: no GT volume "
                          f"({self.gt_reader.name} reader)", stacklevel=2)
        return Instance(record, views, gt, self.load_meta(record))


class SiM3DDataset:
    """All classes of a root; ``ds[class_name]`` is a ``SiM3DClass`` built with the same options."""

    def __init__(self, root: str | os.PathLike, classes: Sequence[str] | None = None, **class_kwargs: Any) -> None:
        self.root = Path(root)
        available = list_classes(self.root)
        if classes is None:
            classes = available
        unknown = [c for c in classes if c not in available]
        if unknown:
            raise SiM3DError(f"classes {unknown} not found under {self.root}; available: {available}")
        self.classes = list(classes)
        self._kwargs = class_kwargs
        self._cache: dict[str, SiM3DClass] = {}

    def __getitem__(self, class_name: str) -> SiM3DClass:
        if class_name not in self.classes:
            raise KeyError(f"class {class_name!r} not in {self.classes}")
        if class_name not in self._cache:
            self._cache[class_name] = SiM3DClass(self.root, class_name, **self._kwargs)
        return self._cache[class_name]

    def __iter__(self) -> Iterator[SiM3DClass]:
        for c in self.classes:
            yield self[c]
