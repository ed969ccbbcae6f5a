"""Generic folder source (.npy/.tif/16-bit .png) and the synthetic benchmark source."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from data_prep import fixtures
from data_prep.convert import convert
from data_prep.shards import ConversionError
from pretrain.data import SampleTable


def read_all(out) -> dict:
    table = SampleTable.from_shard_dirs([out])
    return {m["rel_path"]: (d, m) for d, m in (table.read(i) for i in range(len(table)))}


def assert_bit_exact(a, b):
    na, nb = np.isnan(a), np.isnan(b)
    np.testing.assert_array_equal(na, nb)
    assert a.dtype == b.dtype == np.float32 and a[~na].tobytes() == b[~nb].tobytes()


def test_folder_roundtrip(tmp_path):
    root = tmp_path / "scans"
    expected = fixtures.write_depth_folder(root)
    s = convert("folder", root, tmp_path / "o", progress=False, folder_unit="mm")
    assert s["ok"] and s["written"] == 3
    got = read_all(tmp_path / "o")
    assert set(got) == set(expected)
    for rel, (depth, meta) in got.items():
        assert_bit_exact(depth, expected[rel])
        assert meta["unit"] == "mm" and meta["kind"] == "metric_z" and meta["category"] == "scans"
    assert got["sub/b.tif"][1]["key"] == "folder/scans/train/sub_b"
    assert got["c.PNG"][1]["key"] == "folder/scans/train/c"


def test_folder_options(tmp_path):
    root = tmp_path / "scans"
    fixtures.write_depth_folder(root)
    s = convert("folder", root, tmp_path / "o", progress=False, folder_kind="rel_disparity",
                folder_glob="*.npy", folder_category="kinect", folder_split="validation",
                folder_source_id="my_sensor")
    assert s["written"] == 1 and s["shards"] == ["my_sensor-000000.tar"]
    (depth, meta), = read_all(tmp_path / "o").values()
    assert meta["key"] == "my_sensor/kinect/validation/a" and meta["unit"] is None
    assert meta["kind"] == "rel_disparity"
    raw = np.load(root / "a.npy")
    # for disparity, zero and negative values are valid data; only non-finite is invalid
    assert depth[3, 3] == -1.0 and np.array_equal(np.isnan(depth), ~np.isfinite(raw))
    with pytest.raises(ValueError, match="folder source only"):
        convert("mvtec3d", root, tmp_path / "x", progress=False, folder_unit="mm")
    with pytest.raises(ValueError, match="meaningless"):
        convert("folder", root, tmp_path / "x", progress=False, folder_kind="rel_disparity", folder_unit="m")


def test_folder_bad_files(tmp_path):
    root = tmp_path / "scans"
    fixtures.write_depth_folder(root)
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(root / "eight.png")
    np.save(root / "trunc.npy", np.ones((30, 30), np.float32))
    fixtures.truncate_file(root / "trunc.npy", 0.5)
    np.save(root / "x.npy", np.ones((4, 4), np.float32))
    np.save(root / "sub" / "x.npy", np.ones((4, 4), np.float32))  # different path, different key: fine
    s = convert("folder", root, tmp_path / "o", progress=False)
    reasons = {x["rel_path"]: x["reason"] for x in s["skipped_items"]}
    assert set(reasons) == {"eight.png", "trunc.npy"}
    assert "8-bit" in reasons["eight.png"] and reasons["trunc.npy"].startswith("unreadable")
    assert s["written"] == 5
    (root / "x.NPY").write_bytes((root / "x.npy").read_bytes())
    (root / "x.npy").rename(root / "x.tif")  # x.tif + x.NPY -> same key
    with pytest.raises(ConversionError, match="collision"):
        convert("folder", root, tmp_path / "o3", progress=False)


def test_folder_empty_root(tmp_path):
    (tmp_path / "e").mkdir()
    with pytest.raises(ConversionError, match="no depth files"):
        convert("folder", tmp_path / "e", tmp_path / "o", progress=False)


def test_synthetic_source(tmp_path):
    root = tmp_path / "bench"
    expected = fixtures.write_synthetic_views(root)
    s = convert("synthetic", root, tmp_path / "o", splits="all", progress=False)
    assert s["ok"] and s["written"] == 9
    got = read_all(tmp_path / "o")
    assert set(got) == set(expected)
    for rel, (depth, meta) in got.items():
        assert_bit_exact(depth, expected[rel])  # +inf became NaN
        assert meta["unit"] == "m"
    m = got["plastic_stool/plastic_stool_real/depth/0.npy"][1]
    assert (m["split"], m["label"], m["key"]) == ("train", "normal", "synthetic/plastic_stool/train/plastic_stool_real_0")
    assert got["plastic_stool/plastic_stool_02_bad/depth/1.npy"][1]["label"] == "anomalous"
    assert got["plastic_stool/plastic_stool_01_good/depth/1.npy"][1]["label"] == "normal"
    s = convert("synthetic", root, tmp_path / "o2", progress=False)
    assert s["written"] == 3  # default splits: training instances only
    (tmp_path / "e").mkdir()
    with pytest.raises(ConversionError, match="Expected layout"):
        convert("synthetic", tmp_path / "e", tmp_path / "o3", progress=False)


def test_synthetic_source_reads_the_generator_output(tmp_path):
    """Integration with data_prep/synthetic.py: npy real/test views and EXR ``_synth`` renders."""
    synthetic = pytest.importorskip("data_prep.synthetic")
    cfg = synthetic.SynthConfig(classes=(synthetic.CLASS_NAMES[0],), n_views=2, width=48, height=36, n_test=2,
                                workers=1)
    synthetic.generate_benchmark(tmp_path / "bench", cfg, progress=False)
    s = convert("synthetic", tmp_path / "bench", tmp_path / "o", splits="all", progress=False)
    assert s["ok"] and s["written"] == 2 * 4  # (real + synth + 2 test instances) x 2 views
    got = read_all(tmp_path / "o")
    exr = [m for _, m in got.values() if m["rel_path"].endswith("_depth.exr")]
    assert len(exr) == 2 and all(m["split"] == "train" for m in exr)
    for depth, meta in got.values():
        assert 0.05 < meta["valid_frac"] < 0.95  # background (+inf / EXR maximum) is invalid
        assert np.nanmax(depth) < 100  # the EXR background value 1e10 never survives
        assert np.array(meta["camera"]["K"]).shape == (3, 3)
