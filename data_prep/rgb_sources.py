"""Enumerators of image-only datasets, the inputs of Depth-Anything-V2 pseudo-depth.

Layouts, split mapping, labels and stems follow ``../shared/spec/data_formats.md`` §5 and §8:
MVTec AD, MVTec LOCO AD, MVTec AD 2, VisA (raw layout, optional ``split_csv``), a generic image
folder, and Hugging Face ``datasets`` (a hub id, a local ``imagefolder`` tree, or a dataset saved with
``save_to_disk``). Enumeration is pure: it lists files (sorted, extensions matched
case-insensitively, masks excluded) and never opens or modifies them.
"""

from __future__ import annotations

import csv
import io
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
DEFAULT_SPLITS = ("train", "validation")
RGB_SOURCES = ("mvtec_ad", "mvtec_loco", "mvtec_ad2", "visa", "image_folder", "hf")

CATEGORIES: dict[str, tuple[str, ...]] = {
    "mvtec_ad": ("bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill",
                 "screw", "tile", "toothbrush", "transistor", "wood", "zipper"),
    "mvtec_loco": ("breakfast_box", "juice_bottle", "pushpins", "screw_bag", "splicing_connectors"),
    "mvtec_ad2": ("can", "fabric", "fruit_jelly", "rice", "sheet_metal", "vial", "wallplugs", "walnuts"),
    "visa": ("candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2", "pcb1", "pcb2",
             "pcb3", "pcb4", "pipe_fryum"),
}


class LayoutError(ValueError):
    """The dataset root does not have the layout of the selected source."""


@dataclass
class ImageRecord:
    """One input image and where its pseudo-depth sample goes (spec §8 key components)."""

    source: str
    category: str
    split: str
    split_orig: str
    label: str | None
    defect_type: str | None
    rel_path: str
    stem: str
    path: Path | None = None  # on-disk file; None for in-memory (datasets) images
    loader: Callable[[], Image.Image] | None = field(default=None, repr=False, compare=False)

    def open_rgb(self) -> Image.Image:
        """Decode the image as 8-bit RGB (some MVTec AD categories are grayscale PNGs)."""
        if self.loader is not None:
            image = self.loader()
        else:
            with Image.open(self.path) as handle:
                handle.load()
                image = handle
        if image.width == 0 or image.height == 0:
            raise ValueError("zero-size image")
        if image.mode in ("I;16", "I;16B", "I", "F"):
            # 16-bit or float grayscale: rescale to 8 bits instead of clipping.
            import numpy as np

            arr = np.asarray(image, dtype=np.float64)
            lo, hi = float(arr.min()), float(arr.max())
            arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else arr * 0
            image = Image.fromarray(arr.astype("uint8"))
        return image.convert("RGB")


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def is_mask_path(rel: Path) -> bool:
    """Masks are never inputs: any component ``ground_truth``/``Masks`` or a basename with ``_mask``."""
    parts = [p.lower() for p in rel.parts]
    return any(p in ("ground_truth", "masks") for p in parts[:-1]) or "_mask" in rel.name.lower()


def _images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and is_image(p) and not is_mask_path(Path(p.name)))


def _select(categories: Iterable[str] | None, found: list[str], root: Path, source: str) -> list[str]:
    if categories is None:
        return found
    wanted = list(categories)
    missing = [c for c in wanted if c not in found]
    if missing:
        raise LayoutError(f"{source}: categor{'y' if len(missing) == 1 else 'ies'} {missing} not found under "
                          f"{root} (found: {found or 'none'})")
    return wanted


def _category_dirs(root: Path, source: str, probe: Callable[[Path], bool], expected: str) -> list[str]:
    if not root.is_dir():
        raise LayoutError(f"{source}: dataset root {root} does not exist or is not a folder")
    found = sorted(d.name for d in root.iterdir() if d.is_dir() and probe(d))
    if not found:
        raise LayoutError(f"{source}: no category folder under {root} has the expected layout {expected}")
    return found


def _wanted(split: str, splits: set[str] | None) -> bool:
    return splits is None or split in splits


def _rel(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix()


def _defect_folder_records(source: str, root: Path, categories: Iterable[str], split_names: tuple[str, ...],
                           splits: set[str] | None) -> list[ImageRecord]:
    """``<cat>/<split>/<good|defect>/*`` (the MVTec AD family's layout): "good" is normal, any other folder
    names the defect; stems ``<defect or good>_<file stem>``."""
    records = []
    for cat in categories:
        for split in split_names:
            split_dir = root / cat / split
            if not _wanted(split, splits) or not split_dir.is_dir():
                continue
            for defect_dir in sorted(d for d in split_dir.iterdir() if d.is_dir()):
                defect = defect_dir.name
                label = "normal" if defect == "good" else "anomalous"
                for path in _images(defect_dir):
                    records.append(ImageRecord(source, cat, split, split, label, None if label == "normal" else defect,
                                               _rel(root, path), f"{defect}_{path.stem}", path))
    return records


def enumerate_mvtec_ad(root: Path, splits: set[str] | None, categories: Iterable[str] | None = None) -> list[ImageRecord]:
    """``<cat>/train/good/*.png``, ``<cat>/test/<good|defect>/*.png`` (stems ``<defect or good>_<NNN>``)."""
    found = _category_dirs(root, "mvtec_ad", lambda d: (d / "train").is_dir() and (d / "test").is_dir(),
                           "<category>/{train,test}/<good|defect>/*.png")
    return _defect_folder_records("mvtec_ad", root, _select(categories, found, root, "mvtec_ad"), ("train", "test"),
                                  splits)


def enumerate_mvtec_loco(root: Path, splits: set[str] | None, categories: Iterable[str] | None = None) -> list[ImageRecord]:
    """``<cat>/{train,validation}/good``, ``<cat>/test/{good,logical_anomalies,structural_anomalies}``."""
    found = _category_dirs(root, "mvtec_loco", lambda d: (d / "train").is_dir(),
                           "<category>/{train,validation,test}/<good|..._anomalies>/*.png")
    return _defect_folder_records("mvtec_loco", root, _select(categories, found, root, "mvtec_loco"),
                                  ("train", "validation", "test"), splits)


def enumerate_mvtec_ad2(root: Path, splits: set[str] | None, categories: Iterable[str] | None = None) -> list[ImageRecord]:
    """AD 2: train/validation good, ``test_public/{good,bad}`` → test, private folders unlabelled."""
    found = _category_dirs(root, "mvtec_ad2", lambda d: (d / "train").is_dir(),
                           "<category>/{train,validation}/good, test_public/{good,bad}, test_private*/")
    layout = [  # (folder, canonical split, subfolder, label, stem prefix)
        ("train", "train", "good", "normal", "good_"),
        ("validation", "validation", "good", "normal", "good_"),
        ("test_public", "test", "good", "normal", "good_"),
        ("test_public", "test", "bad", "anomalous", "bad_"),
        ("test_private", "test_private", None, None, ""),
        ("test_private_mixed", "test_private_mixed", None, None, ""),
    ]
    records = []
    for cat in _select(categories, found, root, "mvtec_ad2"):
        for folder, split, sub, label, prefix in layout:
            if not _wanted(split, splits):
                continue
            directory = root / cat / folder / sub if sub else root / cat / folder
            for path in _images(directory):
                records.append(ImageRecord("mvtec_ad2", cat, split, folder, label,
                                           "bad" if label == "anomalous" else None,
                                           _rel(root, path), f"{prefix}{path.stem}", path))
    return records


VISA_RAW_LAYOUT = "<object>/Data/Images/{Normal,Anomaly}/*.JPG"
VISA_1CLS_LAYOUT = "1cls/<object>/{train,test}/{good,bad}/*.JPG (+ ground_truth/bad/, from prepare_data.py)"
# prepare_data.py's folder names → the raw layout's, so both layouts give the same keys
# (train/bad exists only in the script's 2cls_* layouts, which are read the same way)
_VISA_1CLS_FOLDERS = (("train", "good", "Normal", "normal"), ("train", "bad", "Anomaly", "anomalous"),
                      ("test", "good", "Normal", "normal"), ("test", "bad", "Anomaly", "anomalous"))


def _is_visa_1cls_object(d: Path) -> bool:
    return (d / "train" / "good").is_dir() or (d / "test" / "bad").is_dir()


def visa_1cls_root(root: Path) -> Path | None:
    """The folder holding the objects of the ``1cls`` layout written by VisA's ``prepare_data.py``
    (``root`` itself or ``root/1cls``), or None when ``root`` has the raw layout."""
    for cand in (root / "1cls", root):
        if cand.is_dir() and any(d.is_dir() and _is_visa_1cls_object(d) for d in cand.iterdir()):
            return cand
    return None


def enumerate_visa_1cls(root: Path, splits: set[str] | None, categories: Iterable[str] | None = None
                        ) -> list[ImageRecord]:
    """``1cls/<object>/{train,test}/{good,bad}/<stem>.JPG``: the layout ``prepare_data.py`` writes from
    ``split_csv/1cls.csv``. Splits come from the folders; stems are ``Normal_<stem>`` /
    ``Anomaly_<stem>`` as in the raw layout (the file names are copied unchanged), so both layouts give
    the same sample keys. ``ground_truth/bad/*.png`` (masks, binarised to 0/255 by the script) are never
    inputs. The script's ``2cls_highshot`` / ``2cls_fewshot`` folders (anomalies in ``train/bad`` too)
    are read the same way when passed as the root."""
    base = visa_1cls_root(root)
    if base is None:
        raise LayoutError(f"visa: no object folder under {root} has the layout {VISA_1CLS_LAYOUT}")
    found = sorted(d.name for d in base.iterdir() if d.is_dir() and _is_visa_1cls_object(d))
    records = []
    for cat in _select(categories, found, base, "visa"):
        for split, folder, raw_folder, label in _VISA_1CLS_FOLDERS:
            if not _wanted(split, splits):
                continue
            for path in _images(base / cat / split / folder):
                records.append(ImageRecord("visa", cat, split, split, label,
                                           None if label == "normal" else "anomaly", _rel(root, path),
                                           f"{raw_folder}_{path.stem}", path))
    return records


def enumerate_visa(root: Path, splits: set[str] | None, categories: Iterable[str] | None = None,
                   split_csv: Path | None = None) -> list[ImageRecord]:
    """``<object>/Data/Images/{Normal,Anomaly}/*.JPG``; splits from ``split_csv/1cls.csv`` when given.
    A root in the ``1cls`` layout of ``prepare_data.py`` is read by :func:`enumerate_visa_1cls`.

    Stems are read from the files, never formatted: the real ones are 3 digits for anomalies and for
    part of the normal images, 4 digits for the rest. Without a split CSV every image gets split
    ``unsplit`` (selected only by ``--splits all``).
    """
    if not any((d / "Data" / "Images").is_dir() for d in (root.iterdir() if root.is_dir() else ())) \
            and visa_1cls_root(root) is not None:
        if split_csv is not None:
            raise LayoutError(f"visa: {root} has the 1cls layout of prepare_data.py, whose folders already "
                              "are the split; --visa-split-csv applies to the raw Data/Images layout only")
        return enumerate_visa_1cls(root, splits, categories)
    found = _category_dirs(root, "visa", lambda d: (d / "Data" / "Images").is_dir(),
                           f"{VISA_RAW_LAYOUT} (or {VISA_1CLS_LAYOUT})")
    wanted_cats = set(_select(categories, found, root, "visa"))
    split_of: dict[str, str] = {}
    if split_csv is not None:
        split_csv = Path(split_csv)
        if not split_csv.is_file():
            raise LayoutError(f"visa: split CSV {split_csv} does not exist")
        with open(split_csv, newline="") as handle:
            reader = csv.DictReader(handle)
            need = {"object", "split", "label", "image"}
            if not need <= set(reader.fieldnames or []):
                raise LayoutError(f"visa: split CSV {split_csv} lacks columns {sorted(need - set(reader.fieldnames or []))}")
            for row in reader:
                split_of[Path(row["image"]).as_posix()] = {"train": "train", "test": "test"}.get(row["split"], row["split"])
    elif splits is not None:
        warnings.warn("visa: no --visa-split-csv given, every image has split 'unsplit' (select it with --splits all)",
                      stacklevel=2)
    records = []
    for cat in sorted(wanted_cats):
        for folder, label in (("Normal", "normal"), ("Anomaly", "anomalous")):
            for path in _images(root / cat / "Data" / "Images" / folder):
                rel = _rel(root, path)
                split = split_of.get(rel, "unsplit") if split_of else "unsplit"
                if not _wanted(split, splits):
                    continue
                records.append(ImageRecord("visa", cat, split, split, label, None if label == "normal" else "anomaly",
                                           rel, f"{folder}_{path.stem}", path))
    return records


def enumerate_folder(root: Path, splits: set[str] | None, categories: Iterable[str] | None = None,
                     category: str = "default", split: str = "train") -> list[ImageRecord]:
    """Any tree of images: stem = path relative to the root without extension, ``/`` → ``_``."""
    if not root.is_dir():
        raise LayoutError(f"image_folder: image root {root} does not exist or is not a folder")
    if not _wanted(split, splits):
        return []
    records = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            rel = path.relative_to(root)
            if not is_image(path) or is_mask_path(rel):
                continue
            records.append(ImageRecord("image_folder", category, split, split, None, None, rel.as_posix(),
                                       rel.with_suffix("").as_posix().replace("/", "_"), path))
    if not records:
        raise LayoutError(f"image_folder: no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {root}")
    return records


def enumerate_hf(dataset: str, splits: set[str] | None, categories: Iterable[str] | None = None, *,
                 image_column: str = "image", label_column: str | None = "label", category: str | None = None,
                 streaming: bool = False, max_images: int | None = None) -> Iterator[ImageRecord]:
    """Hugging Face ``datasets`` source: a saved dataset folder (``load_from_disk``), a local image
    tree (``imagefolder``), or a hub id (users with internet; ``streaming=True`` avoids a full download).

    Split names map to canonical ones (``val``/``valid`` → validation). Stems are the row index.
    """
    import datasets

    path = Path(dataset)
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists()
                          or (path / "state.json").exists()):
        loaded = datasets.load_from_disk(str(path))
        name = category or path.name
    elif path.is_dir():
        loaded = datasets.load_dataset("imagefolder", data_dir=str(path), streaming=streaming)
        name = category or path.name
    else:
        loaded = datasets.load_dataset(dataset, streaming=streaming)
        name = category or dataset.split("/")[-1]
    if not isinstance(loaded, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        loaded = {"train": loaded}
    canonical = {"val": "validation", "valid": "validation", "validation": "validation", "train": "train", "test": "test"}
    count = 0
    for split_orig, ds in loaded.items():
        split = canonical.get(split_orig, split_orig)
        if not _wanted(split, splits):
            continue
        features = getattr(ds, "features", None) or {}
        if image_column not in features:
            raise LayoutError(f"hf dataset {dataset}: split {split_orig} has no column {image_column!r} "
                              f"(columns: {list(features)})")
        label_feature = features.get(label_column) if label_column else None
        for index, row in enumerate(ds):
            label_value = row.get(label_column) if label_column else None
            label_name = None
            if label_value is not None and hasattr(label_feature, "int2str"):
                label_name = label_feature.int2str(label_value)
            label = {"good": "normal", "normal": "normal", "ok": "normal"}.get(str(label_name).lower(), None)
            if label is None and label_name is not None:
                label = "anomalous"
            image = row[image_column]
            yield ImageRecord("hf", name, split, split_orig, label, None if label != "anomalous" else label_name,
                              f"{split_orig}/{index}", f"{index:08d}", None, loader=_frozen_image(image))
            count += 1
            if max_images is not None and count >= max_images:
                return


def _frozen_image(image) -> Callable[[], Image.Image]:
    if isinstance(image, Image.Image):
        return lambda: image
    if isinstance(image, dict) and image.get("bytes") is not None:
        data = image["bytes"]
        return lambda: Image.open(io.BytesIO(data))
    if isinstance(image, dict) and image.get("path"):
        p = image["path"]
        return lambda: Image.open(p)
    raise LayoutError(f"unsupported image cell of type {type(image).__name__}")


def enumerate_source(source: str, root: str | Path, splits: Iterable[str] | str | None = DEFAULT_SPLITS,
                     categories: Iterable[str] | None = None, **options) -> list[ImageRecord]:
    """Dispatch to the enumerator of ``source``; ``splits`` ``"all"``/None selects every split."""
    split_set = parse_splits(splits)
    if source == "mvtec_ad":
        return enumerate_mvtec_ad(Path(root), split_set, categories)
    if source == "mvtec_loco":
        return enumerate_mvtec_loco(Path(root), split_set, categories)
    if source == "mvtec_ad2":
        return enumerate_mvtec_ad2(Path(root), split_set, categories)
    if source == "visa":
        return enumerate_visa(Path(root), split_set, categories, options.get("visa_split_csv"))
    if source == "image_folder":
        return enumerate_folder(Path(root), split_set, categories, options.get("folder_category", "default"),
                                options.get("folder_split", "train"))
    if source == "hf":
        return list(enumerate_hf(str(root), split_set, categories, image_column=options.get("hf_image_column", "image"),
                                 label_column=options.get("hf_label_column", "label"),
                                 category=options.get("folder_category"),
                                 streaming=options.get("hf_streaming", False),
                                 max_images=options.get("max_images")))
    raise LayoutError(f"unknown image source {source!r}; expected one of {', '.join(RGB_SOURCES)}")


def parse_splits(splits: Iterable[str] | str | None) -> set[str] | None:
    if splits is None:
        return None
    if isinstance(splits, str):
        splits = [s.strip() for s in splits.split(",") if s.strip()]
    splits = list(splits)
    if "all" in splits:
        return None
    return set(splits)
