"""Real-IAD D³: zip members read in place + JSON splits, extracted folders, NaN holes, downsampling."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest

from data_prep import fixtures
from data_prep.convert import convert
from data_prep.shards import ConversionError, load_manifest
from pretrain.data import SampleTable
from shared.depth import downsample_depth


def read_all(out) -> dict:
    table = SampleTable.from_shard_dirs([out])
    return {m["rel_path"]: (d, m) for d, m in (table.read(i) for i in range(len(table)))}


def assert_bit_exact(a, b):
    na, nb = np.isnan(a), np.isnan(b)
    np.testing.assert_array_equal(na, nb)
    assert a.dtype == b.dtype == np.float32 and a[~na].tobytes() == b[~nb].tobytes()


@pytest.fixture(scope="module")
def zipped(tmp_path_factory):
    root = tmp_path_factory.mktemp("realiad")
    return root, fixtures.write_realiad_d3(root)


def test_zip_roundtrip_with_nans(zipped, tmp_path):
    root, expected = zipped
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    s = convert("realiad_d3", root, tmp_path / "o", splits="all", progress=False)
    assert s["ok"] and s["written"] == 8
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before  # nothing extracted or modified
    got = read_all(tmp_path / "o")
    assert set(got) == set(expected)  # rel_path = zip member name
    for rel, (depth, meta) in got.items():
        assert_bit_exact(depth, expected[rel])
        assert 0.8 < meta["valid_frac"] < 0.95  # NaN and zero holes are invalid
        assert meta["unit"] == "unknown"
    _, m = got["audiojack/NG/missing_part/S0004/audiojack_0004_NG_C1_xyz.tiff"]
    assert m["key"] == "realiad_d3/audiojack/test/NG_missing_part_S0004_audiojack_0004_NG_C1_xyz"
    assert (m["label"], m["defect_type"], m["split"]) == ("anomalous", "missing_part", "test")
    entry = load_manifest(tmp_path / "o")["sources"]["realiad_d3"]
    z = entry["report"]["z_stats"]
    assert set(z) == {"train", "test"}
    for st in z.values():
        assert set(st) == {"samples", "min", "p1", "median", "p99", "max", "valid_frac"}
        assert st["min"] <= st["p1"] <= st["median"] <= st["p99"] <= st["max"]
    rep = entry["report"]["reader"]
    assert rep["categories"]["pcb"]["layout"] == "zip" and rep["categories"]["pcb"]["member_pattern"] == "prefix+path"
    assert "xyz_path" in rep["json_fields"] and rep["unit"] == "unknown"


def test_default_splits_and_unit_flag(zipped, tmp_path):
    root, _ = zipped
    s = convert("realiad_d3", root, tmp_path / "o", progress=False, realiad_unit="mm")
    assert s["written"] == 4  # train only (no validation list in the JSON)
    assert {m["unit"] for _, m in read_all(tmp_path / "o").values()} == {"mm"}


def test_extracted_folder_and_json_zip_give_the_same_maps(zipped, tmp_path):
    root, _ = zipped
    other = tmp_path / "extracted"
    expected = fixtures.write_realiad_d3(other, zipped=False, json_zipped=True)
    convert("realiad_d3", root, tmp_path / "a", splits="all", progress=False)
    convert("realiad_d3", other, tmp_path / "b", splits="all", progress=False)
    a = {m["key"]: d for d, m in read_all(tmp_path / "a").values()}
    b_all = read_all(tmp_path / "b")
    b = {m["key"]: d for d, m in b_all.values()}
    assert set(a) == set(b)
    for k, depth in a.items():
        assert_bit_exact(depth, b[k])
    for rel, (depth, _) in b_all.items():
        assert_bit_exact(depth, expected[rel])
    rep = load_manifest(tmp_path / "b")["sources"]["realiad_d3"]["report"]["reader"]
    assert rep["json_source"].endswith("realiad_d3_jsons.zip") and rep["categories"]["pcb"]["layout"] == "folder"


def test_corrupt_and_missing_members_are_skipped(tmp_path):
    root = tmp_path / "d"
    fixtures.write_realiad_d3(root, categories=("pcb",))
    zpath = root / "realiad_d3_raw" / "pcb.zip"
    with zipfile.ZipFile(zpath) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    tiffs = sorted(n for n in members if n.endswith(".tiff"))
    members[tiffs[0]] = members[tiffs[0]][:300]  # truncated TIFF
    del members[tiffs[1]]  # listed in the JSON, absent from the zip
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for n, data in members.items():
            zf.writestr(n, data)
    zpath.write_bytes(buf.getvalue())
    s = convert("realiad_d3", root, tmp_path / "o", splits="all", progress=False)
    assert s["written"] == 2 and s["skipped"] == 2 and not s["ok"]
    reasons = {x["rel_path"]: x["reason"] for x in load_manifest(tmp_path / "o")["sources"]["realiad_d3"]["skipped"]}
    assert reasons[tiffs[0]].startswith("unreadable")
    assert any("not found" in r for r in reasons.values())


def test_wrong_root(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConversionError, match="realiad_d3_jsons"):
        convert("realiad_d3", tmp_path / "empty", tmp_path / "o", progress=False)
    root = tmp_path / "jsons_only"
    fixtures.write_realiad_d3(root)
    for z in (root / "realiad_d3_raw").iterdir():
        z.unlink()
    with pytest.raises(ConversionError, match="no category zip or folder"):
        convert("realiad_d3", root, tmp_path / "o", progress=False)


def test_big_maps_are_downsampled_nan_aware(tmp_path):
    root = tmp_path / "big"
    expected = fixtures.write_realiad_d3(root, categories=("pcb",), hw=(300, 500), n_train=1, n_test=0)
    s = convert("realiad_d3", root, tmp_path / "o", progress=False, max_side=100)
    assert s["written"] == 1
    (depth, meta), = read_all(tmp_path / "o").values()
    (exp,) = expected.values()
    assert depth.shape == (60, 100) and meta["stored_hw"] == [60, 100] and meta["orig_hw"] == [300, 500]
    assert meta["resize"] == {"applied": True, "method": "nan_median", "scale": 0.2}
    assert_bit_exact(depth, downsample_depth(exp, 100, "nan_median", 0.5))
    s = convert("realiad_d3", root, tmp_path / "o2", progress=False, max_side=100, downsample="nearest")
    (depth, meta), = read_all(tmp_path / "o2").values()
    assert meta["resize"]["method"] == "nearest"
    assert_bit_exact(depth, exp[2::5, 2::5])


def test_benchmark_folder_layout_without_jsons(tmp_path):
    """The authors' benchmark layout: <cat>/{train,test}/{GOOD,<defect>}/xyz/*.tiff, upper-case GOOD."""
    root = tmp_path / "d3"
    expected = fixtures.write_realiad_d3_folders(root)
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    s = convert("realiad_d3", root, tmp_path / "o", splits="all", progress=False)
    assert s["written"] == len(expected) == 8
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before
    got = read_all(tmp_path / "o")
    assert set(got) == set(expected)
    for rel, (depth, _) in got.items():
        assert_bit_exact(depth, expected[rel])  # NaN, 0 and negative z are all invalid
        assert np.nanmin(depth) > 0
    _, m = got["pcb/test/missing_part/xyz/pcb_0004.tiff"]
    assert (m["key"], m["label"], m["defect_type"]) == (
        "realiad_d3/pcb/test/missing_part_pcb_0004", "anomalous", "missing_part")
    _, m = got["pcb/test/GOOD/xyz/pcb_0003.tiff"]
    assert (m["label"], m["defect_type"], m["split"]) == ("normal", None, "test")
    entry = load_manifest(tmp_path / "o")["sources"]["realiad_d3"]
    rep = entry["report"]["reader"]
    assert rep["layout"] == "benchmark_folders"
    assert rep["categories"]["audiojack"] == {"train": {"GOOD": 2}, "test": {"GOOD": 1, "missing_part": 1}}
    assert s["ok"]
    # the default splits take train only, like the JSON layout
    assert convert("realiad_d3", root, tmp_path / "o2", progress=False)["written"] == 4


def test_negative_z_is_invalid_and_noted(zipped, tmp_path):
    root, _ = zipped
    convert("realiad_d3", root, tmp_path / "o", progress=False)
    for depth, _ in read_all(tmp_path / "o").values():
        assert np.nanmin(depth) > 0
    notes = str(load_manifest(tmp_path / "o")["sources"]["realiad_d3"]["report"])
    assert "pixels with z < 0 set invalid" in notes


def test_single_category_benchmark_folder_is_a_clear_error(tmp_path):
    root = tmp_path / "d3"
    fixtures.write_realiad_d3_folders(root, categories=("pcb",))
    with pytest.raises(ConversionError, match="single category folder"):
        convert("realiad_d3", root / "pcb", tmp_path / "o", progress=False)
