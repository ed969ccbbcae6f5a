"""MVTec 3D-AD: xyz TIFF → z, exact round trip through shards, bad input, background removal."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from data_prep import fixtures
from data_prep.convert import convert, main
from data_prep.shards import ConversionError, load_manifest
from data_prep.sources.mvtec3d import plane_foreground
from pretrain.data import SampleTable


def assert_bit_exact(a: np.ndarray, b: np.ndarray) -> None:
    assert a.dtype == b.dtype == np.float32 and a.shape == b.shape
    na, nb = np.isnan(a), np.isnan(b)
    np.testing.assert_array_equal(na, nb)
    assert a[~na].tobytes() == b[~nb].tobytes()


def by_rel_path(out) -> dict:
    table = SampleTable.from_shard_dirs([out])
    res = {}
    for i in range(len(table)):
        depth, meta = table.read(i)
        res[meta["rel_path"]] = (depth, meta)
    return res


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("mvtec")
    return root, fixtures.write_mvtec3d(root)


def test_roundtrip_bit_exact_with_nan_holes(dataset, tmp_path):
    root, expected = dataset
    s = convert("mvtec3d", root, tmp_path / "o", splits="all", progress=False)
    assert s["ok"] and s["written"] == len(expected) == 10
    got = by_rel_path(tmp_path / "o")
    assert set(got) == set(expected)
    for rel, (depth, meta) in got.items():
        assert_bit_exact(depth, expected[rel])
        assert np.isnan(depth).any()  # the (0, 0, 0) holes became NaN
        assert meta["kind"] == "metric_z" and meta["unit"] == "m" and meta["bg_removed"] == "none"
    _, meta = got["bagel/test/crack/xyz/000.tiff"]
    assert meta["key"] == "mvtec3d/bagel/test/crack_000"
    assert meta["label"] == "anomalous" and meta["defect_type"] == "crack"
    _, meta = got["foam/validation/good/xyz/000.tiff"]
    assert meta["label"] == "normal" and meta["defect_type"] is None and meta["split"] == "validation"
    # intrinsics from the real camera_parameters.json keys: fx = focus / sx (pixels), kappa kept aside
    calib = json.loads((root / "foam/calibration/camera_parameters.json").read_text())
    K = np.asarray(meta["camera"]["K"])
    assert K[0, 0] == pytest.approx(calib["focus"] / calib["sx"]) and K[1, 1] == pytest.approx(calib["focus"] / calib["sy"])
    assert (K[0, 2], K[1, 2]) == (pytest.approx(calib["cx"]), pytest.approx(calib["cy"]))
    assert meta["camera"]["kappa"] == pytest.approx(calib["kappa"])


def test_fixture_follows_the_real_layout(dataset):
    """Real trees: gt/ in test/good too (all zero), masks hold class ids (not 0/255), HALCON keys."""
    root, _ = dataset
    from PIL import Image

    good = np.array(Image.open(root / "bagel/test/good/gt/000.png"))
    assert good.dtype == np.uint8 and not good.any()
    assert set(json.loads((root / "bagel/calibration/camera_parameters.json").read_text())) == {
        "camera_type", "focus", "kappa", "sx", "sy", "cx", "cy", "image_width", "image_height"}
    ids = json.loads((root / "bagel/class_ids.json").read_text())
    root2 = root.parent / (root.name + "_defects")
    fixtures.write_mvtec3d(root2, categories=("tire",), defects=True,
                           layout={"test": {"good": 1, "cut": 1, "combined": 1}})
    cut = np.array(Image.open(root2 / "tire/test/cut/gt/000.png"))
    assert set(np.unique(cut)) == {0, ids["cut"]}
    combined = np.array(Image.open(root2 / "tire/test/combined/gt/000.png"))
    assert len(set(np.unique(combined)) - {0}) == 2


def test_camera_parameters_bad_or_mismatched(tmp_path):
    from data_prep.sources.mvtec3d import camera_from_calibration, read_camera_parameters
    from shared.formats import FormatError

    p = tmp_path / "camera_parameters.json"
    p.write_text(json.dumps({"focus": 1.0, "ppx": 25, "ppy": 20}))  # the made-up keys of old fixtures
    with pytest.raises(FormatError, match=r"camera_parameters.json: camera parameters lack"):
        read_camera_parameters(p)
    calib = fixtures.mvtec3d_camera_parameters((40, 50))
    p.write_text(json.dumps({**calib, "sx": 0}))
    with pytest.raises(FormatError, match="sx = 0.0 must be positive"):
        read_camera_parameters(p)
    p.write_text(json.dumps(calib))
    cam, why = camera_from_calibration(read_camera_parameters(p), (40, 50))
    assert why is None and np.allclose(cam["K"][2], [0, 0, 1])
    cam, why = camera_from_calibration(read_camera_parameters(p), (80, 100))
    assert cam is None and "50x40 images, this frame is 100x80" in why


def test_default_splits_exclude_test(dataset, tmp_path):
    root, _ = dataset
    convert("mvtec3d", root, tmp_path / "o", progress=False)
    splits = {m["split"] for _, m in by_rel_path(tmp_path / "o").values()}
    assert splits == {"train", "validation"}
    report = load_manifest(tmp_path / "o")["sources"]["mvtec3d"]["report"]
    assert {c["name"]: c["ok"] for c in report["checks"]}["z_unit_metres"]


def test_rgb_xyz_is_rejected_with_a_clear_reason(tmp_path, capsys):
    root = tmp_path / "legacy"
    rels = fixtures.write_mvtec3d_legacy_rgb(root)
    s = convert("mvtec3d", root, tmp_path / "o", progress=False)
    assert not s["ok"] and s["written"] == 0 and s["skipped"] == len(rels)
    assert all("8-bit RGB" in it["reason"] and "not an xyz point cloud" in it["reason"] for it in s["skipped_items"])
    assert main(["--source", "mvtec3d", "--root", str(root), "--out", str(tmp_path / "o2"), "--no-progress"]) == 1
    assert "8-bit RGB" in capsys.readouterr().out


def test_truncated_tiff_is_skipped_counted_and_listed(tmp_path):
    root = tmp_path / "d"
    expected = fixtures.write_mvtec3d(root, categories=("bagel",))
    fixtures.truncate_file(root / "bagel/train/good/xyz/001.tiff", 0.3)
    (root / "bagel/train/good/xyz/002.tiff").write_bytes(b"")  # empty file
    s = convert("mvtec3d", root, tmp_path / "o", progress=False)
    assert not s["ok"] and s["skipped"] == 2 and s["written"] == 2
    m = load_manifest(tmp_path / "o")["sources"]["mvtec3d"]
    assert sorted(x["rel_path"] for x in m["skipped"]) == ["bagel/train/good/xyz/001.tiff",
                                                           "bagel/train/good/xyz/002.tiff"]
    assert all(x["reason"].startswith("unreadable") for x in m["skipped"])
    assert {c["name"]: c["ok"] for c in m["report"]["checks"]}["inputs_readable"] is False
    got = by_rel_path(tmp_path / "o")
    assert_bit_exact(got["bagel/train/good/xyz/000.tiff"][0], expected["bagel/train/good/xyz/000.tiff"])
    # accepted explicitly: exit status 0, still listed
    s2 = convert("mvtec3d", root, tmp_path / "o", progress=False, allow_skipped=True)
    assert s2["ok"] and s2["skipped"] == 2


def test_wrong_root_errors_name_the_layout(dataset, tmp_path):
    root, _ = dataset
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConversionError, match="Expected layout"):
        convert("mvtec3d", tmp_path / "empty", tmp_path / "o", progress=False)
    with pytest.raises(ConversionError, match="single category folder"):
        convert("mvtec3d", root / "bagel", tmp_path / "o", progress=False)
    with pytest.raises(ConversionError, match="not a directory"):
        convert("mvtec3d", tmp_path / "missing", tmp_path / "o", progress=False)


def test_plane_background_removal_keeps_the_object(dataset, tmp_path):
    root, expected = dataset
    before = hashlib.sha256((root / "bagel/train/good/xyz/000.tiff").read_bytes()).hexdigest()
    convert("mvtec3d", root, tmp_path / "o", progress=False, bg="plane")
    assert hashlib.sha256((root / "bagel/train/good/xyz/000.tiff").read_bytes()).hexdigest() == before
    for rel, (depth, meta) in by_rel_path(tmp_path / "o").items():
        exp = expected[rel]
        assert meta["bg_removed"] == "plane"
        kept = np.isfinite(depth)
        assert 0.02 < kept.mean() < 0.6  # the bump survives, most of the plane is gone
        np.testing.assert_array_equal(depth[kept], exp[kept])  # kept values untouched
        # the nearest point (top of the bump) is foreground
        assert kept.flat[np.nanargmin(exp)]
    m = load_manifest(tmp_path / "o")["sources"]["mvtec3d"]
    assert m["params"]["bg"] == "plane"


def test_plane_fallback_when_corners_invalid():
    xyz = np.zeros((20, 20, 3))
    valid = np.zeros((20, 20), bool)
    valid[5:15, 5:15] = True
    keep, note = plane_foreground(xyz, valid)
    assert keep is None and "corner" in note


def test_ransac_dbscan_background_removal(tmp_path):
    pytest.importorskip("open3d")
    root = tmp_path / "d"
    fixtures.write_mvtec3d(root, categories=("bagel",), hw=(60, 70),
                           layout={"train": {"good": 2}}, hole_frac=0.0)
    a = convert("mvtec3d", root, tmp_path / "a", progress=False, bg="ransac_dbscan")
    convert("mvtec3d", root, tmp_path / "b", progress=False, bg="ransac_dbscan")
    assert a["ok"] and a["written"] == 2
    ia = json.loads((tmp_path / "a" / "mvtec3d-000000.tar.idx.json").read_text())
    assert ia["sha256"] == json.loads((tmp_path / "b" / "mvtec3d-000000.tar.idx.json").read_text())["sha256"]
    for depth, meta in by_rel_path(tmp_path / "a").values():
        assert meta["bg_removed"] == "ransac_dbscan"
        assert 0.01 < np.isfinite(depth).mean() < 0.6
