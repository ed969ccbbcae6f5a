"""Single-view datasets (MVTec 3D-AD, Eyecandies, one view per SiM3D instance) and their 2D evaluation."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_prep import fixtures
from detect.config import parse_config
from detect.data.single_view_datasets import (
    EyecandiesClass,
    MVTec3DClass,
    SiM3DSingleViewClass,
    SingleViewError,
    list_single_view_classes,
    open_single_view_class,
)
from detect.pipeline import run
from shared.config import ConfigError
from shared.formats import read_eyecandies_depth

TINY = ["--image-encoder", "random", "--random-encoder-arch", "vit_tiny_patch14", "--random-encoder-depth", "1",
        "--image-size", "56", "--epochs", "2", "--cmdr-epochs", "2", "--no-progress", "--encoder-batch-size", "8",
        "--device", "cpu"]


@pytest.fixture(scope="module")
def mvtec(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mvtec3d")
    fixtures.write_mvtec3d(root, categories=("bagel",), hw=(30, 40),
                           layout={"train": {"good": 3}, "validation": {"good": 1},
                                   "test": {"good": 2, "crack": 2}}, defects=True)
    return root


@pytest.fixture(scope="module")
def eyecandies(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eyecandies")
    fixtures.write_eyecandies(root, categories=("CandyCane",), hw=(32, 32),
                              counts={"train": 3, "val": 1, "test_public": 4, "test_private": 1}, masks=True)
    return root


def write_multiview(root: Path, n_views: int = 3) -> Path:
    """A small SiM3D layout (fixtures.write_synthetic_views) plus per-view 2D masks: the bad instance's
    anomaly is visible in view 1 only."""
    fixtures.write_synthetic_views(root, classes=("stool",), n_views=n_views, hw=(30, 40))
    for inst in ("stool_01_good", "stool_02_bad"):
        (root / "stool" / inst / "gt" / "masks").mkdir(parents=True, exist_ok=True)
        for v in range(n_views):
            m = np.zeros((30, 40), np.uint8)
            if inst.endswith("bad") and v == 1:
                m[10:16, 12:20] = 255
            Image.fromarray(m).save(root / "stool" / inst / "gt" / "masks" / f"{v}.png")
    return root


# -- readers ---------------------------------------------------------------------------------------
def test_mvtec3d_reader(mvtec):
    ds = MVTec3DClass(mvtec, "bagel")
    assert [r.name for r in ds.test_records] == ["test/crack/000", "test/crack/001", "test/good/000",
                                                 "test/good/001"]
    assert [r.label for r in ds.test_records] == [1, 1, 0, 0]
    assert ds.n_views == 1 and ds.stems == ["0"] and not ds.has_calibration and ds.load_gt(ds.test_records[0]) is None
    assert len(ds.train_set()) == 3
    assert len(MVTec3DClass(mvtec, "bagel", train_splits=("train", "validation")).train_set()) == 4
    with pytest.raises(SingleViewError, match="train_set"):
        ds.train_record()
    view = ds.load_view(ds.test_records[0])
    assert view.image.shape == (30, 40, 3) and view.image.dtype == np.uint8
    assert view.depth.dtype == np.float32 and np.isnan(view.depth).any()  # (0, 0, 0) holes → NaN
    assert view.mask.shape == (30, 40) and view.mask.any() and view.calib is None
    good = ds.load_view(ds.test_records[2])
    assert good.mask is not None and not good.mask.any()  # nominal: no gt file, empty mask
    assert ds.load_meta(ds.test_records[0])["defect_type"] == "crack"
    inst = ds.load_instance(ds.test_records[0])
    assert inst.label == 1 and len(inst.views) == 1
    # background removal happens in memory only and keeps the kept values untouched
    before = (mvtec / "bagel/test/crack/xyz/000.tiff").read_bytes()
    plane = MVTec3DClass(mvtec, "bagel", bg_removal="plane").load_view(ds.test_records[0]).depth
    assert (mvtec / "bagel/test/crack/xyz/000.tiff").read_bytes() == before
    kept = np.isfinite(plane)
    assert 0 < kept.sum() < np.isfinite(view.depth).sum()
    np.testing.assert_array_equal(plane[kept], view.depth[kept])
    with pytest.raises(ValueError, match="background removal"):
        MVTec3DClass(mvtec, "bagel", bg_removal="magic")


def test_readers_read_only_the_requested_modality(mvtec, tmp_path):
    root = tmp_path / "m"
    shutil.copytree(mvtec, root)
    shutil.rmtree(root / "bagel/test/crack/xyz")
    ds = MVTec3DClass(root, "bagel")
    rec = ds.test_records[0]
    view = ds.load_view(rec, modalities=("image",))
    assert view.depth is None and view.image is not None and view.mask.any()
    with pytest.raises(SingleViewError, match=r"depth .*000\.tiff missing"):
        ds.load_view(rec)
    with pytest.raises(ValueError, match="modalities"):
        ds.load_view(rec, modalities=("normals",))


def test_eyecandies_reader(eyecandies):
    ds = EyecandiesClass(eyecandies, "CandyCane")
    assert [r.name for r in ds.test_records] == ["test_public/00", "test_public/01", "test_public/02",
                                                 "test_public/03"]
    assert [r.label for r in ds.test_records] == [0, 1, 0, 1]  # from <idx>_metadata.yaml
    assert len(ds.train_set()) == 3
    assert len(EyecandiesClass(eyecandies, "CandyCane", train_splits=("train", "val")).train_set()) == 4
    v = ds.load_view(ds.test_records[1])
    data = eyecandies / "CandyCane/test_public/data"
    np.testing.assert_array_equal(v.depth, read_eyecandies_depth(data / "01_depth.png"))
    assert np.isfinite(v.depth).all()  # every Eyecandies pixel is valid
    assert v.mask.any() and not ds.load_view(ds.test_records[0]).mask.any()
    assert v.image_path.name == "01_image_0.png"
    with pytest.raises(ValueError, match="image_index"):
        EyecandiesClass(eyecandies, "CandyCane", image_index=7)


def test_eyecandies_missing_metadata_is_a_clear_error(eyecandies, tmp_path):
    root = tmp_path / "e"
    shutil.copytree(eyecandies, root)
    (root / "CandyCane/test_public/data/01_metadata.yaml").unlink()
    with pytest.raises(SingleViewError, match="01_metadata.yaml missing"):
        EyecandiesClass(root, "CandyCane")


def test_sim3d_single_reader(tmp_path):
    root = write_multiview(tmp_path / "s")
    ds = SiM3DSingleViewClass(root, "stool")  # default: the first view of every instance
    assert [r.name for r in ds.test_records] == ["stool_01_good", "stool_02_bad"]
    assert [r.label for r in ds.test_records] == [0, 0]  # the anomaly is not visible in view 0
    everything = SiM3DSingleViewClass(root, "stool", views=["all"])
    assert [r.name for r in everything.test_records] == [f"stool_{i}/{v}" for i in ("01_good", "02_bad")
                                                         for v in "012"]
    assert [r.label for r in everything.test_records] == [0, 0, 0, 0, 1, 0]  # label = mask of that view
    assert len(everything.train_set("real2real")) == 3
    one = SiM3DSingleViewClass(root, "stool", views=["1"])
    v = one.load_view(one.test_records[1])
    assert one.test_records[1].label == 1 and v.mask.sum() == 48 and v.image.ndim == 2
    with pytest.raises(SingleViewError, match="views"):
        SiM3DSingleViewClass(root, "stool", views=["9"])
    with pytest.raises(SingleViewError, match="synth2real"):
        ds.train_set("synth2real")


def test_discovery_and_errors(mvtec, eyecandies, tmp_path):
    assert list_single_view_classes("mvtec3d", mvtec) == ["bagel"]
    assert list_single_view_classes("eyecandies", eyecandies) == ["CandyCane"]
    with pytest.raises(SingleViewError, match="category folders"):
        list_single_view_classes("mvtec3d", eyecandies)
    with pytest.raises(SingleViewError, match="not found"):
        open_single_view_class("mvtec3d", mvtec, "carrot")
    with pytest.raises(TypeError):
        open_single_view_class("mvtec3d", mvtec, "bagel", no_such_option=1)


# -- evaluation frame -----------------------------------------------------------------------------
def test_eval_frame_native_and_parity_resolution():
    from detect.infer import eval_frame
    from detect.preprocess import ViewGeometry

    geom = ViewGeometry.for_shape(6, 4, 12)  # portrait: padded left/right by one column
    score = torch.zeros(12, 12)
    score[:, 6:] = 1.0
    gt = np.zeros((6, 4), bool)
    gt[:, 0] = True
    m, g = eval_frame(score, geom, gt, 0)
    assert m.shape == (6, 4) and g is gt
    m, g = eval_frame(score, geom, gt, 6)
    assert m.shape == g.shape == (6, 6)
    # the GT is padded with edge replication (as CFM pads it) before the nearest resize
    np.testing.assert_array_equal(g[:, :2], True)
    assert not g[:, 2:].any()


# -- end to end ------------------------------------------------------------------------------------
def test_mvtec3d_end_to_end_with_2d_metrics(mvtec, tiny_ckpt, tmp_path):
    out = tmp_path / "out"
    args = ["--dataset", "mvtec3d", "--data", str(mvtec), "--ckpt", str(tiny_ckpt), *TINY, "--out", str(out),
            "--bg-removal", "plane", "--save-maps", "orig", "--viz"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = run(parse_config(args))
    m = results["modmap"]["bagel"]
    assert m["n_images"] == 4 and m["n_anomalous"] == 2 and m["eval_res"] == "native"
    for key in ("image_auroc", "pixel_auroc"):
        assert 0.0 <= m[key] <= 1.0
    assert set(m["pixel_aupro"]) == {"0.3", "0.1", "0.05", "0.01"} and m["pro_variant"] == "exact"
    assert m["connectivity"] == 8 and m["n_gt_regions"] == 2
    table = (out / "results.md").read_text()
    assert "| modmap | I-AUROC |" in table and "AUPRO@30%" in table and "AUPRO@1%" in table and "Mean" in table
    assert "RANDOM IMAGE ENCODER" in table
    class_dir = out / "mvtec3d" / "bagel"
    assert (class_dir / "model.pt").is_file() and (class_dir / "maps/test/crack/000/combined.png").is_file()
    assert np.load(class_dir / "maps/test/crack/000/combined.npy").shape == (30, 40)
    rows = (class_dir / "scores.csv").read_text().splitlines()
    assert rows[0] == "instance,gt_label,pred_score,defect_type" and len(rows) == 5
    # evaluate alone reproduces the metrics from the saved predictions
    again = run(parse_config(args + ["--mode", "evaluate"]))
    assert again["modmap"]["bagel"]["image_auroc"] == m["image_auroc"]
    saved = json.loads((out / "results.json").read_text())
    assert saved["dataset"] == "mvtec3d" and saved["random_image_encoder"] is True


def test_eyecandies_cmdr_end_to_end_parity_resolution(eyecandies, tiny_ckpt, tmp_path):
    out = tmp_path / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = run(parse_config(["--dataset", "eyecandies", "--data", str(eyecandies), "--ckpt", str(tiny_ckpt),
                                    *TINY, "--out", str(out), "--scoring", "cmdr", "--eval-res", "224",
                                    "--image-norm", "imagenet"]))
    m = results["cmdr"]["CandyCane"]
    assert m["eval_res"] == 224 and m["score_norm"] == "cfm" and m["n_anomalous"] == 2
    assert np.isfinite(m["image_auroc"]) and np.isfinite(m["pixel_aupro"]["0.3"])
    assert (out / "eyecandies/CandyCane/decoders.pt").is_file()


def test_single_view_config_validation():
    with pytest.raises(ConfigError, match="needs --scoring cmdr"):
        parse_config(["--data", "/d", "--dataset", "mvtec3d", "--modality", "image"])
    with pytest.raises(ConfigError, match="single-view option"):
        parse_config(["--data", "/d", "--scoring", "cmdr", "--modality", "depth"])
    with pytest.raises(ConfigError, match="image_fallback"):
        parse_config(["--data", "/d", "--dataset", "mvtec3d", "--scoring", "cmdr", "--modality", "image",
                      "--missing-depth", "image_fallback"])
    with pytest.raises(ConfigError, match="odd"):
        parse_config(["--data", "/d", "--scoring", "cmdr", "--cmdr-window", "4"])
    cfg = parse_config(["--data", "/d", "--dataset", "sim3d_single", "--single-views", "all"])
    assert cfg.single_views == ["all"]


def test_missing_class_and_model_give_clear_errors(mvtec, tiny_ckpt, tmp_path, capsys):
    from detect.run import main

    base = ["--dataset", "mvtec3d", "--data", str(mvtec), "--ckpt", str(tiny_ckpt), *TINY, "--out", str(tmp_path)]
    assert main(base + ["--classes", "carrot"]) == 2
    assert "carrot" in capsys.readouterr().err
    assert main(base + ["--mode", "predict"]) == 2
    assert "run --mode fit" in capsys.readouterr().err


@pytest.mark.slow
def test_single_view_report_command(mvtec, tiny_ckpt, tmp_path, capsys):
    from detect.single_view_report import main as report_main

    out, doc = tmp_path / "rep", tmp_path / "docs" / "sv.md"
    args = ["--methods", "cmdr_image_only,cmdr_depth_only", "--report", str(doc), "--dataset", "mvtec3d",
            "--data", str(mvtec), "--ckpt", str(tiny_ckpt), *TINY, "--out", str(out)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert report_main(args) == 0
        text = doc.read_text()
        assert "python detect/single_view_report.py --methods cmdr_image_only,cmdr_depth_only" in text
        assert "| cmdr_image_only | I-AUROC |" in text and "| cmdr_depth_only | AUPRO@1% |" in text
        assert "| bagel | 3 | 4 | 2 |" in text  # training images, test images, anomalous
        assert "Randomly initialised encoders" in text
        capsys.readouterr()
        assert report_main(args) == 0  # identical configs: the runs are reused
    printed = capsys.readouterr().out
    assert "[cmdr_image_only] reused" in printed and "[cmdr_depth_only] reused" in printed
    assert "wall time per method" in doc.read_text().lower()  # the first invocation's times are kept
    assert report_main(["--methods", "nope", "--data", str(mvtec), "--dataset", "mvtec3d"]) == 2
    assert report_main(["--data", str(mvtec)]) == 2  # multiview dataset: refused
