"""Single-view detection datasets through the SiM3D reader API with N = 1 view per instance.

ModMap with one view is CFM (crossmodal feature mapping) with DINO-Depth (``../shared/spec/modmap.md``
§20), so single-view benchmarks reuse the detector unchanged; only the data access differs:

* ``mvtec3d`` — MVTec 3D-AD (``data_formats.md`` §2): ``<root>/<category>/{train,validation,test}/
  <good|defect>/{rgb/NNN.png, xyz/NNN.tiff, gt/NNN.png}``; depth = the z channel in metres with
  (0, 0, 0) → NaN and optional background removal (``bg_removal``: ``none``, ``plane``,
  ``ransac_dbscan``; applied in memory, the TIFFs are never rewritten).
* ``eyecandies`` — Eyecandies (§3): ``<root>/<Category>/{train,val,test_public}/data/<idx>_*``; depth
  decoded from the 16-bit PNG with ``info_depth.yaml``; the image is ``<idx>_image_<k>.png``
  (``image_index``, default 0 = all spotlights on); test = ``test_public`` (labels from
  ``<idx>_metadata.yaml``, masks ``<idx>_mask.png``).
* ``sim3d_single`` — a SiM3D-layout dataset (real SiM3D or our synthetic benchmark) read one view at a
  time: every chosen view stem of every instance is one single-view sample (``views``: default the
  first stem, i.e. one view per instance; ``["all"]`` for every view). The training set is the chosen
  views of the setup's training instance. A sample is anomalous iff its view's 2D GT mask has an
  anomalous pixel (the 2D convention: an anomaly hidden from that view is not in the image); without
  masks the instance label is used.

API (shared with :class:`detect.data.sim3d.SiM3DClass`): ``class_name``, ``stems`` (one stem),
``n_views`` (1), ``view_order``, ``has_calibration`` (False: 2D maps only), ``test_records``,
``train_record(setup)`` (only when the training set is a single image), ``load_view(record, 0)``,
``iter_views``, ``load_instance``, ``load_gt`` (None), ``load_meta``; plus ``train_set(setup)``: every
training image, one record each. ``load_view(..., modalities=("image",))`` reads only the image file
(and ``("depth",)`` only the depth file) — single-sensor modes never touch the other modality.
``View.mask`` is the 2D GT (all False for nominal samples without a mask file).

Readers are pure: they never modify the dataset.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from detect.data.base import InstanceDataset
from detect.data.sim3d import (
    Instance,
    InstanceRecord,
    SiM3DClass,
    SiM3DError,
    View,
    ViewFiles,
    list_classes,
    load_depth,
)
from shared.formats import (
    BG_METHODS,
    FormatError,
    read_eyecandies_depth,
    read_tiff,
    remove_background,
    xyz_to_z,
)

SINGLE_VIEW_DATASETS: tuple[str, ...] = ("mvtec3d", "eyecandies", "sim3d_single")
MODALITIES: tuple[str, ...] = ("image", "depth")
SINGLE_STEM = "0"  # the one view of a single-view instance
MVTEC3D_CATEGORIES = ("bagel", "cable_gland", "carrot", "cookie", "dowel", "foam", "peach", "potato", "rope", "tire")
EYECANDIES_CATEGORIES = ("CandyCane", "ChocolateCookie", "ChocolatePraline", "Confetto", "GummyBear",
                         "HazelnutTruffle", "LicoriceSandwich", "Lollipop", "Marshmallow", "PeppermintCandy")
MVTEC3D_LAYOUT = "<root>/<category>/{train,validation,test}/<good|defect>/{rgb/NNN.png,xyz/NNN.tiff,gt/NNN.png}"
EYECANDIES_LAYOUT = "<root>/<Category>/{train,val,test_public}/data/<idx>_{image_0,depth,info_depth,mask,metadata}.*"


class SingleViewError(SiM3DError):
    """Malformed or missing single-view data; the message names the sample and the file."""


def _read_rgb(path: Path, where: str) -> np.ndarray:
    """An image as uint8 RGB (H, W, 3) (grayscale files stay (H, W))."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.mode in ("L", "I;16", "I"):
                arr = np.array(im.convert("L"))
            else:
                arr = np.array(im.convert("RGB"))
    except (OSError, ValueError) as exc:
        raise SingleViewError(f"{where}: cannot read image {path}: {exc}") from None
    return arr


def _read_mask(path: Path, where: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            arr = np.array(im.convert("L"))
    except (OSError, ValueError) as exc:
        raise SingleViewError(f"{where}: cannot read GT mask {path}: {exc}") from None
    return arr > 0


def _image_shape(path: Path) -> tuple[int, int]:
    from PIL import Image  # header only

    with Image.open(path) as im:
        return im.size[1], im.size[0]


class SingleViewClass(InstanceDataset):
    """One class of a single-view dataset (N = 1). Subclasses fill ``_train`` and ``test_records`` and
    implement :meth:`_read_image` and :meth:`_read_depth`."""

    dataset: str = ""
    view_order = "natural"
    calib_reader = None
    gt_reader = None

    def __init__(self, root: str | os.PathLike, class_name: str, load_masks: bool = True) -> None:
        self.root = Path(root)
        self.class_name = class_name
        self.path = self.root / class_name
        self.load_masks = load_masks
        self.stems = [SINGLE_STEM]
        self._train: dict[str, list[InstanceRecord]] = {}
        self._meta: dict[str, dict] = {}
        self.test_records: list[InstanceRecord] = []

    # -- records --------------------------------------------------------------------------------
    @staticmethod
    def _record(class_name: str, name: str, path: Path, role: str, label: int, depth_path: Path,
                image_path: Path, mask_path: Path | None) -> InstanceRecord:
        return InstanceRecord(class_name, name, path, role, int(label),
                              (ViewFiles(0, SINGLE_STEM, depth_path, image_path, mask_path),))

    def train_set(self, setup: str = "real2real") -> list[InstanceRecord]:
        """Every training image of the class (one N = 1 record each)."""
        key = setup if setup in self._train else "default"
        if key not in self._train or not self._train[key]:
            raise SingleViewError(f"{self.dataset} class {self.class_name!r} ({self.path}): no training images"
                                  + (f" for setup {setup}" if key == setup else ""))
        return self._train[key]

    def train_record(self, setup: str = "real2real") -> InstanceRecord:
        records = self.train_set(setup)
        if len(records) != 1:
            raise SingleViewError(f"{self.dataset} class {self.class_name!r} has {len(records)} training images: "
                                  "use train_set() (single-view training uses all of them)")
        return records[0]

    # -- loading --------------------------------------------------------------------------------
    def _read_image(self, vf: ViewFiles, where: str) -> np.ndarray:
        raise NotImplementedError

    def _read_depth(self, vf: ViewFiles, where: str) -> np.ndarray:
        raise NotImplementedError

    def load_view(self, record: InstanceRecord, view_id: int = 0,
                  modalities: Sequence[str] = MODALITIES) -> View:
        """The sample's image and/or depth (only the requested modalities are read) and its 2D GT mask.

        ``image`` uint8 (H, W, 3) or (H, W); ``depth`` float32 (H, W), NaN = invalid; an unrequested
        modality is None. ``mask`` bool (H, W), all False for a nominal sample without a mask file.
        """
        if view_id != 0:
            raise SingleViewError(f"{self.dataset} samples have one view (view_id 0), got {view_id}")
        unknown = [m for m in modalities if m not in MODALITIES]
        if unknown or not modalities:
            raise ValueError(f"modalities must be a non-empty subset of {MODALITIES}, got {list(modalities)}")
        vf = record.views[0]
        where = f"{self.dataset} class {record.class_name!r}, sample {record.name!r}"
        image = depth = None
        if "image" in modalities:
            if not vf.image_path.is_file():
                raise SingleViewError(f"{where}: image {vf.image_path} missing")
            image = self._read_image(vf, where)
        if "depth" in modalities:
            if not vf.depth_path.is_file():
                raise SingleViewError(f"{where}: depth {vf.depth_path} missing")
            depth = self._read_depth(vf, where)
            if not np.isfinite(depth).any():
                raise SingleViewError(f"{where}: depth {vf.depth_path} has no valid pixel")
        shape = (image if image is not None else depth).shape[:2]
        if image is not None and depth is not None and image.shape[:2] != depth.shape:
            raise SingleViewError(f"{where}: image {vf.image_path} is {image.shape[1]}×{image.shape[0]} but depth "
                                  f"{vf.depth_path} is {depth.shape[1]}×{depth.shape[0]} (must be pixel-aligned)")
        mask = None
        if self.load_masks:
            if vf.mask_path is not None and vf.mask_path.is_file():
                mask = _read_mask(vf.mask_path, where)
                if mask.shape != shape:
                    raise SingleViewError(f"{where}: GT mask {vf.mask_path} is {mask.shape[1]}×{mask.shape[0]}, the "
                                          f"sample is {shape[1]}×{shape[0]}")
            elif record.label == 0:
                mask = np.zeros(shape, bool)
            else:
                raise SingleViewError(f"{where}: anomalous sample without GT mask "
                                      f"({vf.mask_path or 'no mask file expected by the layout'})")
        return View(0, SINGLE_STEM, image, depth, None, mask, vf.image_path, vf.depth_path)

    def iter_views(self, record: InstanceRecord, modalities: Sequence[str] = MODALITIES) -> Iterator[View]:
        yield self.load_view(record, 0, modalities)

    def load_gt(self, record: InstanceRecord) -> None:
        return None  # single-view datasets have 2D masks (View.mask), no GT volumes

    def load_meta(self, record: InstanceRecord) -> dict[str, Any]:
        return dict(self._meta.get(record.name, {}))

    def load_instance(self, record: InstanceRecord, with_gt: bool = True,
                      modalities: Sequence[str] = MODALITIES) -> Instance:
        return Instance(record, [self.load_view(record, 0, modalities)], None, self.load_meta(record))


# -- MVTec 3D-AD -----------------------------------------------------------------------------------
class MVTec3DClass(SingleViewClass):
    """One MVTec 3D-AD category (module docstring). ``train_splits``: the splits used for training
    (default ``("train",)``; add ``"validation"`` for the 294 extra nominal scans)."""

    dataset = "mvtec3d"

    def __init__(self, root: str | os.PathLike, class_name: str, bg_removal: str = "none",
                 train_splits: Sequence[str] = ("train",), load_masks: bool = True) -> None:
        super().__init__(root, class_name, load_masks)
        if bg_removal not in BG_METHODS:
            raise ValueError(f"unknown background removal {bg_removal!r}; expected one of {BG_METHODS}")
        if bg_removal == "ransac_dbscan":
            try:
                import open3d  # noqa: F401  (fail now, not at the first sample)
            except ImportError as exc:
                raise SingleViewError("bg_removal ransac_dbscan needs open3d (pip install open3d); "
                                      "'plane' needs only numpy") from exc
        self.bg_removal = bg_removal
        self.bg_notes: list[str] = []
        if not self.path.is_dir():
            raise SingleViewError(f"MVTec 3D-AD category folder {self.path} not found (expected {MVTEC3D_LAYOUT})")
        train = []
        for split in train_splits:
            if split not in ("train", "validation"):
                raise ValueError(f"MVTec 3D-AD training splits are 'train' and 'validation', got {split!r}")
            train += self._scan_split(split, "train")
        self._train["default"] = train
        self.test_records = self._scan_split("test", "test")
        if not self.test_records and not train:
            raise SingleViewError(f"{self.path}: no samples (expected {MVTEC3D_LAYOUT})")

    def _scan_split(self, split: str, role: str) -> list[InstanceRecord]:
        split_dir = self.path / split
        if not split_dir.is_dir():
            return []
        records = []
        for defect_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            rgb, xyz, gt = defect_dir / "rgb", defect_dir / "xyz", defect_dir / "gt"
            stems: set[str] = set()
            if rgb.is_dir():
                stems |= {p.stem for p in rgb.iterdir() if p.suffix.lower() == ".png"}
            if xyz.is_dir():
                stems |= {p.stem for p in xyz.iterdir() if p.suffix.lower() in (".tif", ".tiff")}
            defect = defect_dir.name
            for stem in sorted(stems):
                tiff = xyz / f"{stem}.tiff"
                if not tiff.is_file() and (xyz / f"{stem}.tif").is_file():
                    tiff = xyz / f"{stem}.tif"
                name = f"{split}/{defect}/{stem}"
                label = int(defect != "good")
                self._meta[name] = {"defect_type": None if defect == "good" else defect, "split": split}
                records.append(self._record(self.class_name, name, defect_dir, role, label, tiff,
                                            rgb / f"{stem}.png", gt / f"{stem}.png" if label else None))
        return records

    def _read_image(self, vf: ViewFiles, where: str) -> np.ndarray:
        return _read_rgb(vf.image_path, where)

    def _read_depth(self, vf: ViewFiles, where: str) -> np.ndarray:
        try:
            xyz = read_tiff(vf.depth_path)
            z = xyz_to_z(xyz, str(vf.depth_path))
            z, _, note = remove_background(xyz, z, self.bg_removal)
        except FormatError as exc:
            raise SingleViewError(f"{where}: {exc}") from None
        except (OSError, ValueError) as exc:  # truncated / corrupt TIFF
            raise SingleViewError(f"{where}: cannot read xyz {vf.depth_path}: {exc}") from None
        if note:
            self.bg_notes.append(f"{vf.depth_path}: {note}")
            warnings.warn(f"{where}: {note}", stacklevel=3)
        return z


# -- Eyecandies ------------------------------------------------------------------------------------
class EyecandiesClass(SingleViewClass):
    """One Eyecandies category (module docstring). ``train_splits``: on-disk split names used for
    training (default ``("train",)``; ``("train", "val")`` adds the validation images)."""

    dataset = "eyecandies"

    def __init__(self, root: str | os.PathLike, class_name: str, image_index: int = 0,
                 train_splits: Sequence[str] = ("train",), load_masks: bool = True) -> None:
        super().__init__(root, class_name, load_masks)
        if not 0 <= int(image_index) <= 5:
            raise ValueError(f"Eyecandies image_index must be 0..5 (image_0..image_5), got {image_index}")
        self.image_index = int(image_index)
        if not self.path.is_dir():
            raise SingleViewError(f"Eyecandies category folder {self.path} not found (expected {EYECANDIES_LAYOUT})")
        train = []
        for split in train_splits:
            if split not in ("train", "val"):
                raise ValueError(f"Eyecandies training splits are 'train' and 'val', got {split!r}")
            train += self._scan_split(split, "train")
        self._train["default"] = train
        self.test_records = self._scan_split("test_public", "test")
        if not self.test_records and not train:
            raise SingleViewError(f"{self.path}: no samples (expected {EYECANDIES_LAYOUT})")

    def _scan_split(self, split: str, role: str) -> list[InstanceRecord]:
        data = self.path / split / "data"
        if not data.is_dir():
            return []
        suffixes = ("_depth.png", f"_image_{self.image_index}.png")
        idxs = sorted({p.name[: -len(s)] for p in data.iterdir() for s in suffixes if p.name.endswith(s)})
        records = []
        for idx in idxs:
            name = f"{split}/{idx}"
            label = 0
            if role == "test":
                label = self._read_label(data / f"{idx}_metadata.yaml", data / f"{idx}_mask.png")
            self._meta[name] = {"split": split}
            records.append(self._record(self.class_name, name, data, role, label, data / f"{idx}_depth.png",
                                        data / f"{idx}_image_{self.image_index}.png",
                                        data / f"{idx}_mask.png" if role == "test" else None))
        return records

    @staticmethod
    def _read_label(meta_path: Path, mask_path: Path) -> int:
        import yaml

        try:
            value = int(yaml.safe_load(meta_path.read_text())["anomalous"])
        except FileNotFoundError:
            raise SingleViewError(f"{meta_path} missing: the label of an Eyecandies test sample comes from "
                                  "its metadata.yaml") from None
        except (yaml.YAMLError, TypeError, KeyError, ValueError) as exc:
            raise SingleViewError(f"{meta_path}: no 'anomalous: 0|1' field ({type(exc).__name__})") from None
        if value not in (0, 1):
            raise SingleViewError(f"{meta_path}: anomalous must be 0 or 1, got {value}")
        return value

    def _read_image(self, vf: ViewFiles, where: str) -> np.ndarray:
        return _read_rgb(vf.image_path, where)

    def _read_depth(self, vf: ViewFiles, where: str) -> np.ndarray:
        try:
            return read_eyecandies_depth(vf.depth_path)
        except FormatError as exc:
            raise SingleViewError(f"{where}: {vf.depth_path}: {exc}") from None
        except OSError as exc:
            raise SingleViewError(f"{where}: cannot read depth {vf.depth_path}: {exc}") from None


# -- SiM3D layout, one view at a time ----------------------------------------------------------------
class SiM3DSingleViewClass(SingleViewClass):
    """Views of a SiM3D-layout class as independent single-view samples (module docstring)."""

    dataset = "sim3d_single"

    def __init__(self, root: str | os.PathLike, class_name: str, views: Sequence[str] = (),
                 view_order: str = "auto", load_masks: bool = True) -> None:
        super().__init__(root, class_name, load_masks)
        self.multiview = SiM3DClass(root, class_name, view_order=view_order, calib_reader=None, gt_reader=None,
                                    load_masks=load_masks)
        stems = self.multiview.stems
        views = [str(v) for v in views]
        if not views:
            chosen = stems[:1]
        elif views == ["all"]:
            chosen = list(stems)
        else:
            missing = [v for v in views if v not in stems]
            if missing:
                raise SingleViewError(f"class {class_name!r}: views {missing} not found; stems: {stems}")
            chosen = views
        self.views = chosen
        self._label_from_instance = False
        for setup, rec in self.multiview.train_records.items():
            self._train[setup] = [self._single(rec, s, "train") for s in chosen]
        self.test_records = [self._single(rec, s, "test") for rec in self.multiview.test_records for s in chosen]
        if self._label_from_instance:
            warnings.warn(f"class {class_name!r}: test views without gt/masks/<stem>.png are labelled with their "
                          "instance's label (anomalous even where the anomaly is hidden from that view)",
                          stacklevel=2)

    def _single(self, rec: InstanceRecord, stem: str, role: str) -> InstanceRecord:
        vf = rec.views[rec.stems.index(stem)]
        name = rec.name if len(self.views) == 1 else f"{rec.name}/{stem}"
        label = 0
        if role == "test":
            if vf.mask_path is not None:
                label = int(_read_mask(vf.mask_path, f"class {rec.class_name!r}, {name}").any())
            else:
                label = rec.label
                self._label_from_instance |= bool(rec.label)
        self._meta[name] = {"instance": rec.name, "view_stem": stem, "instance_label": rec.label}
        return self._record(rec.class_name, name, rec.path, role, label, vf.depth_path, vf.image_path, vf.mask_path)

    def train_set(self, setup: str = "real2real") -> list[InstanceRecord]:
        if setup not in self._train:
            raise SingleViewError(f"class {self.class_name!r}: no training instance for {setup} in {self.path}")
        return self._train[setup]

    def _read_image(self, vf: ViewFiles, where: str) -> np.ndarray:
        from detect.data.sim3d import load_image

        return load_image(vf.image_path, where)

    def _read_depth(self, vf: ViewFiles, where: str) -> np.ndarray:
        return load_depth(vf.depth_path, where)


# -- discovery -------------------------------------------------------------------------------------
def list_single_view_classes(dataset: str, root: str | os.PathLike) -> list[str]:
    """Class folders of a single-view dataset root, sorted."""
    root = Path(root)
    if dataset not in SINGLE_VIEW_DATASETS:
        raise ValueError(f"unknown single-view dataset {dataset!r}; expected one of {SINGLE_VIEW_DATASETS}")
    if not root.is_dir():
        raise SingleViewError(f"dataset root {root} does not exist or is not a folder")
    if dataset == "sim3d_single":
        return list_classes(root)
    if dataset == "mvtec3d":
        found = [d.name for d in sorted(root.iterdir()) if d.is_dir()
                 and any((d / s).is_dir() and any(p.name in ("xyz", "rgb") for p in (d / s).glob("*/*"))
                         for s in ("train", "validation", "test"))]
        layout = MVTEC3D_LAYOUT
    else:
        found = [d.name for d in sorted(root.iterdir()) if d.is_dir()
                 and any((d / s / "data").is_dir() for s in ("train", "val", "test_public"))]
        layout = EYECANDIES_LAYOUT
    if not found:
        raise SingleViewError(f"no {dataset} category folders under {root} (expected {layout}; pass the "
                              "dataset root that contains the category folders)")
    return found


def open_single_view_class(dataset: str, root: str | os.PathLike, class_name: str, **options: Any
                           ) -> SingleViewClass:
    """Build the reader of ``dataset``; ``options`` are the class's keyword arguments (unknown ones are
    refused, so a typo is not silently ignored)."""
    factories = {"mvtec3d": MVTec3DClass, "eyecandies": EyecandiesClass, "sim3d_single": SiM3DSingleViewClass}
    if dataset not in factories:
        raise ValueError(f"unknown single-view dataset {dataset!r}; expected one of {SINGLE_VIEW_DATASETS}")
    return factories[dataset](root, class_name, **options)


__all__ = [
    "EYECANDIES_CATEGORIES", "EyecandiesClass", "MODALITIES", "MVTEC3D_CATEGORIES", "MVTec3DClass",
    "SINGLE_VIEW_DATASETS", "SiM3DSingleViewClass", "SingleViewClass", "SingleViewError",
    "list_single_view_classes", "open_single_view_class",
]
