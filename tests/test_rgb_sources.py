"""Enumeration of image-only datasets (data_formats.md §5): layouts, splits, labels, stems, masks."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep.rgb_sources import LayoutError, enumerate_source


def _img(path: Path, size=(20, 16), mode="RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(abs(hash(str(path))) % 2**32)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(path)


def make_mvtec_ad(root: Path) -> None:
    for cat in ("bottle", "grid"):
        _img(root / cat / "train/good/000.png")
        _img(root / cat / "train/good/001.png", mode="L")  # grayscale categories exist
        _img(root / cat / "test/good/000.png")
        _img(root / cat / "test/crack/000.png")
        _img(root / cat / "ground_truth/crack/000_mask.png", mode="L")


def make_mvtec_loco(root: Path) -> None:
    cat = root / "pushpins"
    _img(cat / "train/good/000.png")
    _img(cat / "validation/good/000.png")
    _img(cat / "test/good/000.png")
    _img(cat / "test/logical_anomalies/000.png")
    _img(cat / "test/structural_anomalies/000.png")
    _img(cat / "ground_truth/logical_anomalies/000/000.png", mode="L")


def make_mvtec_ad2(root: Path) -> None:
    cat = root / "can"
    _img(cat / "train/good/000_regular.png")
    _img(cat / "validation/good/000_regular.png")
    _img(cat / "test_public/good/000_regular.png")
    _img(cat / "test_public/bad/001_overexposed.png")
    _img(cat / "test_public/ground_truth/bad/001_overexposed_mask.png", mode="L")
    _img(cat / "test_private/002_regular.png")
    _img(cat / "test_private_mixed/003_regular.png")


def make_visa(root: Path) -> Path:
    """Raw VisA: stems are 3 digits for anomalies and part of the normals, 4 digits for the rest; the
    masks hold class ids (non-zero = anomalous), not 0/255."""
    for cat in ("pcb1", "candle"):
        _img(root / cat / "Data/Images/Normal/000.JPG")
        _img(root / cat / "Data/Images/Normal/0001.JPG")
        _img(root / cat / "Data/Images/Anomaly/000.JPG")
        mask = np.zeros((16, 20), np.uint8)
        mask[4:8, 5:9], mask[10:12, 2:6] = 1, 3
        (root / cat / "Data/Masks/Anomaly").mkdir(parents=True)
        Image.fromarray(mask).save(root / cat / "Data/Masks/Anomaly/000.png")
    csv = root / "split_csv" / "1cls.csv"
    csv.parent.mkdir(parents=True)
    lines = ["object,split,label,image,mask"]
    for cat in ("pcb1", "candle"):
        lines += [f"{cat},train,normal,{cat}/Data/Images/Normal/000.JPG,",
                  f"{cat},test,normal,{cat}/Data/Images/Normal/0001.JPG,",
                  f"{cat},test,anomaly,{cat}/Data/Images/Anomaly/000.JPG,{cat}/Data/Masks/Anomaly/000.png"]
    csv.write_text("\n".join(lines) + "\n")
    return csv


def make_visa_1cls(raw: Path, csv: Path, out: Path) -> None:
    """What VisA's prepare_data.py writes from the raw tree and split_csv/1cls.csv: images copied
    unchanged into 1cls/<object>/<split>/{good,bad}/, test masks binarised into ground_truth/bad/."""
    import csv as csv_module
    import shutil

    with open(csv, newline="") as handle:
        for row in csv_module.DictReader(handle):
            label = "good" if row["label"] == "normal" else "bad"
            dst = out / "1cls" / row["object"] / row["split"] / label / Path(row["image"]).name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(raw / row["image"], dst)
            if row["split"] == "test" and label == "bad":
                mask = np.array(Image.open(raw / row["mask"]))
                mask[mask != 0] = 255
                gt = out / "1cls" / row["object"] / "ground_truth" / "bad" / Path(row["mask"]).name
                gt.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask).save(gt)


def test_mvtec_ad_default_splits_exclude_test_and_masks(tmp_path):
    make_mvtec_ad(tmp_path)
    recs = enumerate_source("mvtec_ad", tmp_path)
    assert [(r.category, r.split, r.stem) for r in recs] == [
        ("bottle", "train", "good_000"), ("bottle", "train", "good_001"),
        ("grid", "train", "good_000"), ("grid", "train", "good_001")]
    every = enumerate_source("mvtec_ad", tmp_path, "all", categories=["grid"])
    assert {(r.split, r.label, r.defect_type, r.stem) for r in every} == {
        ("train", "normal", None, "good_000"), ("train", "normal", None, "good_001"),
        ("test", "normal", None, "good_000"), ("test", "anomalous", "crack", "crack_000")}
    assert not any("mask" in r.rel_path or "ground_truth" in r.rel_path for r in every)
    assert recs[1].open_rgb().mode == "RGB"  # grayscale PNG converted for the model


def test_mvtec_loco_splits_and_labels(tmp_path):
    make_mvtec_loco(tmp_path)
    recs = enumerate_source("mvtec_loco", tmp_path, "all")
    assert [(r.split, r.label, r.stem) for r in recs] == [
        ("train", "normal", "good_000"), ("validation", "normal", "good_000"),
        ("test", "normal", "good_000"), ("test", "anomalous", "logical_anomalies_000"),
        ("test", "anomalous", "structural_anomalies_000")]


def test_mvtec_ad2_private_splits_are_unlabelled(tmp_path):
    make_mvtec_ad2(tmp_path)
    recs = enumerate_source("mvtec_ad2", tmp_path, "all")
    got = [(r.split, r.split_orig, r.label, r.stem) for r in recs]
    assert got == [
        ("train", "train", "normal", "good_000_regular"),
        ("validation", "validation", "normal", "good_000_regular"),
        ("test", "test_public", "normal", "good_000_regular"),
        ("test", "test_public", "anomalous", "bad_001_overexposed"),
        ("test_private", "test_private", None, "002_regular"),
        ("test_private_mixed", "test_private_mixed", None, "003_regular")]
    assert len(enumerate_source("mvtec_ad2", tmp_path)) == 2


def test_visa_uppercase_extension_and_split_csv(tmp_path):
    csv = make_visa(tmp_path)
    recs = enumerate_source("visa", tmp_path, "train,test", visa_split_csv=csv)
    assert [(r.category, r.split, r.label, r.stem) for r in recs] == [
        ("candle", "train", "normal", "Normal_000"), ("candle", "test", "normal", "Normal_0001"),
        ("candle", "test", "anomalous", "Anomaly_000"), ("pcb1", "train", "normal", "Normal_000"),
        ("pcb1", "test", "normal", "Normal_0001"), ("pcb1", "test", "anomalous", "Anomaly_000")]
    with pytest.warns(UserWarning, match="unsplit"):
        assert enumerate_source("visa", tmp_path) == []  # default splits select nothing without a CSV
    assert {r.split for r in enumerate_source("visa", tmp_path, "all")} == {"unsplit"}


def test_visa_1cls_layout_of_prepare_data_gives_the_raw_layouts_keys(tmp_path):
    raw, out = tmp_path / "VisA", tmp_path / "VisA_pytorch"
    csv = make_visa(raw)
    make_visa_1cls(raw, csv, out)
    want = [(r.category, r.split, r.label, r.defect_type, r.stem)
            for r in enumerate_source("visa", raw, "all", visa_split_csv=csv)]
    for root in (out, out / "1cls"):  # the save folder or its 1cls/ subfolder
        recs = enumerate_source("visa", root, "all")
        assert sorted((r.category, r.split, r.label, r.defect_type, r.stem) for r in recs) == sorted(want)
        assert not any("ground_truth" in r.rel_path for r in recs)
    assert {r.split for r in enumerate_source("visa", out)} == {"train"}  # default splits, no CSV needed
    assert [r.rel_path for r in enumerate_source("visa", out, "test", categories=["pcb1"])] == [
        "1cls/pcb1/test/good/0001.JPG", "1cls/pcb1/test/bad/000.JPG"]
    with pytest.raises(LayoutError, match="1cls layout"):
        enumerate_source("visa", out, "all", visa_split_csv=csv)
    # a 2cls_* folder of the same script also has anomalies in train/bad: none is lost
    two = tmp_path / "VisA_pytorch" / "2cls_highshot"
    _img(two / "pcb1/train/bad/001.JPG")
    _img(two / "pcb1/train/good/0002.JPG")
    _img(two / "pcb1/ground_truth/train/bad/001.png", mode="L")
    assert [(r.split, r.label, r.stem) for r in enumerate_source("visa", two, "all")] == [
        ("train", "normal", "Normal_0002"), ("train", "anomalous", "Anomaly_001")]


def test_wrong_root_and_unknown_category_are_clear_errors(tmp_path):
    make_mvtec_loco(tmp_path)
    with pytest.raises(LayoutError, match=r"mvtec_ad: no category folder .* expected layout"):
        enumerate_source("mvtec_ad", tmp_path / "pushpins")
    with pytest.raises(LayoutError, match="does not exist"):
        enumerate_source("visa", tmp_path / "missing")
    with pytest.raises(LayoutError, match=r"\['zipper'\] not found"):
        enumerate_source("mvtec_loco", tmp_path, categories=["zipper"])


def test_image_folder_and_hf_imagefolder_sources(tmp_path):
    _img(tmp_path / "imgs/a/x.PNG")
    _img(tmp_path / "imgs/b/y.jpeg")
    _img(tmp_path / "imgs/b/y_mask.png")
    (tmp_path / "imgs/notes.txt").write_text("not an image")
    recs = enumerate_source("image_folder", tmp_path / "imgs", folder_category="parts")
    assert [(r.category, r.stem) for r in recs] == [("parts", "a_x"), ("parts", "b_y")]
    hf_root = tmp_path / "hf" / "train"
    _img(hf_root / "good" / "0.png")
    _img(hf_root / "scratch" / "1.png")
    recs = enumerate_source("hf", tmp_path / "hf", "all")
    assert sorted(r.label for r in recs) == ["anomalous", "normal"]
    assert all(r.open_rgb().size == (20, 16) for r in recs)
