"""Eyecandies: 16-bit depth PNG + info_depth.yaml → metres, exactly; 8-bit reads are wrong."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from data_prep import fixtures
from data_prep.convert import convert
from data_prep.shards import ConversionError, load_manifest
from data_prep.sources.common import read_png_uint16
from data_prep.sources.eyecandies import FOCAL_PX, decode_eyecandies_depth, read_info_depth
from pretrain.data import SampleTable


def read_all(out) -> dict:
    table = SampleTable.from_shard_dirs([out])
    return {m["rel_path"]: (d, m) for d, m in (table.read(i) for i in range(len(table)))}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("eyecandies")
    return root, fixtures.write_eyecandies(root)


def test_roundtrip_exact_metres(dataset, tmp_path):
    root, expected = dataset
    s = convert("eyecandies", root, tmp_path / "o", splits="all", progress=False)
    assert s["ok"] and s["written"] == len(expected) == 12
    got = read_all(tmp_path / "o")
    assert set(got) == set(expected)
    for rel, (depth, meta) in got.items():
        assert depth.dtype == np.float32 and depth.tobytes() == expected[rel].tobytes()
        assert np.isfinite(depth).all() and meta["valid_frac"] == 1.0  # every pixel is valid
        assert meta["unit"] == "m" and meta["kind"] == "metric_z"
        K = np.array(meta["camera"]["K"])
        assert K[0, 0] == K[1, 1] == pytest.approx(FOCAL_PX) and K[0, 2] == 25.0 and K[1, 2] == 20.0
        pose = np.loadtxt(root / rel.replace("_depth.png", "_pose.txt"))
        np.testing.assert_array_equal(np.array(meta["camera"]["T_c2w"]), pose)  # official: camera-to-world


def test_cfm_pose_convention_is_the_inverse(dataset, tmp_path):
    root, _ = dataset
    convert("eyecandies", root, tmp_path / "o", progress=False, eyecandies_pose="cfm")
    m = load_manifest(tmp_path / "o")["sources"]["eyecandies"]
    assert m["params"]["eyecandies_pose"] == "cfm"
    for rel, (_, meta) in read_all(tmp_path / "o").items():
        pose = np.loadtxt(root / rel.replace("_depth.png", "_pose.txt"))
        t = np.array(meta["camera"]["T_c2w"])
        np.testing.assert_allclose(t @ pose, np.eye(4), atol=1e-12)
        assert not np.allclose(t, pose)
    with pytest.raises(ValueError, match="eyecandies only"):
        convert("mvtec3d", root, tmp_path / "x", progress=False, eyecandies_pose="cfm")


def test_splits_and_labels(dataset, tmp_path):
    root, _ = dataset
    convert("eyecandies", root, tmp_path / "o", splits="all", progress=False)
    got = {m["rel_path"]: m for _, m in read_all(tmp_path / "o").values()}
    m = got["CandyCane/val/data/000_depth.png"]
    assert (m["split"], m["split_orig"], m["label"], m["key"]) == ("validation", "val", "normal",
                                                                   "eyecandies/CandyCane/validation/000")
    assert got["CandyCane/test_public/data/00_depth.png"]["label"] == "normal"  # metadata anomalous: 0
    assert got["CandyCane/test_public/data/01_depth.png"]["label"] == "anomalous"  # metadata anomalous: 1
    assert got["CandyCane/test_private/data/00_depth.png"]["label"] is None
    assert got["CandyCane/test_public/data/01_depth.png"]["split"] == "test"
    counts = load_manifest(tmp_path / "o")["sources"]["eyecandies"]["counts"]["categories"]["GummyBear"]
    assert counts == {"test": {"anomalous": 1, "normal": 1}, "test_private": {"null": 1},
                      "train": {"normal": 2}, "validation": {"normal": 1}}


def test_an_8bit_read_would_be_wrong(dataset):
    """The default OpenCV read returns 8-bit data; decoding it destroys the depth map."""
    import cv2

    root, expected = dataset
    png = root / "CandyCane/train/data/000_depth.png"
    dmin, dmax = read_info_depth(png.with_name("000_info_depth.yaml"))
    exact = decode_eyecandies_depth(read_png_uint16(png), dmin, dmax)
    assert exact.tobytes() == expected["CandyCane/train/data/000_depth.png"].tobytes()
    wrong8 = cv2.imread(str(png))  # the forbidden default read
    assert wrong8.dtype == np.uint8 and wrong8.ndim == 3
    as_if_16 = (wrong8[..., 0].astype(np.float64) / 65535.0 * (dmax - dmin) + dmin).astype(np.float32)
    assert np.abs(as_if_16 - exact).max() > 0.1  # metres: not a rounding issue, the map is destroyed
    scaled = (wrong8[..., 0].astype(np.float64) / 255.0 * (dmax - dmin) + dmin).astype(np.float32)
    assert np.abs(scaled - exact).max() > 1e-4  # even rescaled to 8 bits, it only keeps 256 levels
    assert len(np.unique(scaled)) <= 256 < len(np.unique(exact))
    # an 8-bit PNG written in place of the 16-bit one is refused, not silently accepted
    ok16 = cv2.imread(str(png), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(ok16, read_png_uint16(png))


def test_8bit_png_and_missing_yaml_are_skipped(tmp_path):
    root = tmp_path / "d"
    fixtures.write_eyecandies(root, categories=("Lollipop",), counts={"train": 3})
    data = root / "Lollipop/train/data"
    Image.fromarray(np.full((40, 50), 100, np.uint8)).save(data / "000_depth.png")
    (data / "001_info_depth.yaml").unlink()
    s = convert("eyecandies", root, tmp_path / "o", progress=False)
    assert s["written"] == 1 and s["skipped"] == 2 and not s["ok"]
    reasons = {x["rel_path"]: x["reason"] for x in s["skipped_items"]}
    assert "expected a 16-bit grayscale depth PNG" in reasons["Lollipop/train/data/000_depth.png"]
    assert "missing 001_info_depth.yaml" in reasons["Lollipop/train/data/001_depth.png"]


def test_truncated_png_is_skipped(tmp_path):
    root = tmp_path / "d"
    fixtures.write_eyecandies(root, categories=("Confetto",), counts={"train": 2})
    fixtures.truncate_file(root / "Confetto/train/data/001_depth.png", 0.5)
    s = convert("eyecandies", root, tmp_path / "o", progress=False)
    assert s["written"] == 1 and [x["rel_path"] for x in s["skipped_items"]] == ["Confetto/train/data/001_depth.png"]


def test_wrong_root(dataset, tmp_path):
    root, _ = dataset
    with pytest.raises(ConversionError, match="single category folder"):
        convert("eyecandies", root / "CandyCane", tmp_path / "o", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConversionError, match="Expected layout"):
        convert("eyecandies", tmp_path / "empty", tmp_path / "o", progress=False)
