"""Corrupt and unusual inputs everywhere, and a full disk while writing shards.

Policies (``docs/data_prep.md`` "Bad input policy", ``docs/reliability.md``):

* data preparation skips a bad input file, counts it and lists it with the reason in the manifest;
  the other files are converted; exit status 1 unless ``--allow-skipped``; no partial shard visible;
* shard readers refuse an inconsistent shard folder with an error naming the shard;
* detection stops with a :class:`SiM3DError` naming the file.
"""

from __future__ import annotations

import builtins
import io
import os
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from data_prep import fixtures
from data_prep.convert import convert
from data_prep.convert import main as convert_main
from data_prep.inspect_shards import main as inspect_main
from data_prep.shards import load_manifest, write_manifest
from detect.data.sim3d import SiM3DClass, SiM3DError, list_classes, load_depth
from pretrain.data import SampleTable, SampleTableError
from shared.exr import encode_exr

GOOD = 3  # files written by fixtures.write_depth_folder


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=True)
    return buf.getvalue()


def _truncated(data: bytes, frac: float = 0.5) -> bytes:
    return data[: int(len(data) * frac)]


def _tif_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, arr)
    return buf.getvalue()


def _png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _giant_npy_header() -> bytes:
    """A valid header that declares 200000 × 200000 float32 (149 GiB) over 64 bytes of data."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": (200000, 200000)})
    return buf.getvalue() + b"\0" * 64


RNG = np.random.default_rng(0)
DEPTH = (RNG.random((30, 40)) + 0.5).astype(np.float32)
# name → (file name, bytes, reason pattern). Each is one bad file among the good ones.
BAD_FILES: dict[str, tuple[str, bytes, str]] = {
    "truncated_tiff": ("bad.tif", _truncated(_tif_bytes(DEPTH)), r"unreadable TIFF .*bad\.tif"),
    "truncated_png": ("bad.png", _truncated(_png_bytes((DEPTH * 30000).astype(np.uint16))), r"unreadable PNG .*bad\.png"),
    "truncated_npy": ("bad.npy", _truncated(_npy_bytes(DEPTH)), r"unreadable \.npy file .*bad\.npy"),
    "empty_npy": ("bad.npy", b"", r"unreadable \.npy file .*bad\.npy"),
    "giant_npy_header": ("bad.npy", _giant_npy_header(), r"unreadable \.npy file .*bad\.npy"),
    "pickled_npy": ("bad.npy", _npy_bytes(np.array([{"a": 1}], dtype=object)), r"unreadable \.npy file .*objects"),
    "garbage_tiff": ("bad.tiff", b"II*\0" + bytes(range(200)), r"bad\.tiff"),
    "wrong_dtype_bool": ("bad.npy", _npy_bytes(DEPTH > 1), r"bad\.npy has dtype bool"),
    "wrong_dtype_8bit_png": ("bad.png", _png_bytes((DEPTH * 100).astype(np.uint8)), r"8-bit"),
    "wrong_channels": ("bad.npy", _npy_bytes(np.stack([DEPTH] * 4, -1)), r"bad\.npy has shape \(30, 40, 4\)"),
    "rgb_image_as_depth": ("bad.tif", _tif_bytes((RNG.random((30, 40, 3)) * 255).astype(np.uint8)),
                           r"bad\.tif is a uint8 \(H, W, 3\) image, not depth"),
    "all_nan": ("bad.npy", _npy_bytes(np.full((30, 40), np.nan, np.float32)), r"no valid depth pixel"),
    "zero_size": ("bad.npy", _npy_bytes(np.zeros((0, 0), np.float32)), r"no valid depth pixel"),
}


def _converted_cleanly(out: Path) -> None:
    """No partial output visible: only complete shards, their indexes and the manifest."""
    names = sorted(p.name for p in out.iterdir())
    assert not [n for n in names if n.startswith(".") and n != ".manifest.lock"], names
    for p in out.glob("*.tar"):
        with tarfile.open(p) as tar:  # complete archives
            tar.getmembers()


@pytest.mark.parametrize("fault", sorted(BAD_FILES))
def test_bad_input_file_is_skipped_counted_and_listed(tmp_path, fault):
    name, data, reason = BAD_FILES[fault]
    root = tmp_path / "scans"
    fixtures.write_depth_folder(root)
    (root / name).write_bytes(data)
    summary = convert("folder", root, tmp_path / "out", progress=False)
    assert summary["written"] == GOOD and summary["skipped"] == 1 and not summary["ok"]
    [item] = summary["skipped_items"]
    assert item["rel_path"] == name
    assert re.search(reason, item["reason"]), item["reason"]
    manifest = load_manifest(tmp_path / "out")["sources"]["folder"]
    assert [s["rel_path"] for s in manifest["skipped"]] == [name]
    assert manifest["summary"]["checks_failed"] == ["inputs_readable"]
    _converted_cleanly(tmp_path / "out")
    assert len(SampleTable.from_shard_dirs([tmp_path / "out"])) == GOOD  # the good maps are usable


def test_unreadable_file_permissions_are_skipped(tmp_path, monkeypatch):
    root = tmp_path / "scans"
    fixtures.write_depth_folder(root)
    locked = root / "locked.npy"
    np.save(locked, DEPTH)
    if os.geteuid() == 0:  # root reads anything: make the open itself fail as it would for a user
        real_open = builtins.open

        def guarded_open(file, *args, **kwargs):
            if os.fspath(file) == str(locked):
                raise PermissionError(13, "Permission denied", str(locked))
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", guarded_open)
    else:
        locked.chmod(0)
    try:
        summary = convert("folder", root, tmp_path / "out", progress=False)
    finally:
        locked.chmod(0o644)
    [item] = summary["skipped_items"]
    assert item["rel_path"] == "locked.npy" and "PermissionError" in item["reason"] and "locked.npy" in item["reason"]
    assert summary["written"] == GOOD


def test_skipped_inputs_set_the_exit_status(tmp_path, capsys):
    root = tmp_path / "scans"
    fixtures.write_depth_folder(root)
    (root / "bad.npy").write_bytes(b"")
    args = ["--source", "folder", "--root", str(root), "--out", str(tmp_path / "out"), "--no-progress"]
    assert convert_main(args) == 1
    out = capsys.readouterr()
    assert "skipped bad.npy: unreadable .npy file" in out.out and "check inputs_readable: FAILED" in out.out
    assert convert_main([*args, "--allow-skipped"]) == 0


def test_truncated_exr_is_skipped_by_data_prep_and_named_by_detection(tmp_path):
    root = tmp_path / "bench"
    fixtures.write_synthetic_views(root, classes=("stool",))
    exr_dir = root / "stool" / "stool_synth" / "DEPTH"
    exr_dir.mkdir(parents=True)
    (exr_dir / "0_depth.exr").write_bytes(encode_exr(DEPTH))
    (exr_dir / "1_depth.exr").write_bytes(_truncated(encode_exr(DEPTH), 0.6))
    summary = convert("synthetic", root, tmp_path / "out", progress=False)
    [item] = summary["skipped_items"]
    assert item["rel_path"] == "stool/stool_synth/DEPTH/1_depth.exr" and "EXR" in item["reason"]
    assert summary["written"] == 4  # 3 real training views + the good EXR
    with pytest.raises(SiM3DError, match=r"cannot read depth .*1_depth\.exr.*(corrupt|truncated)"):
        load_depth(exr_dir / "1_depth.exr")


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickled_npy_is_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    root = tmp_path / "scans"
    fixtures.write_depth_folder(root)
    (root / "evil.npy").write_bytes(_npy_bytes(np.array([_Exploit(marker)], dtype=object)))
    summary = convert("folder", root, tmp_path / "out", progress=False)
    assert [s["rel_path"] for s in summary["skipped_items"]] == ["evil.npy"]
    with pytest.raises(SiM3DError, match="evil.npy"):
        load_depth(root / "evil.npy")
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"\x93NUMPY garbage", _giant_npy_header(),
                                     _truncated(_npy_bytes(DEPTH)), _npy_bytes(np.array([{"a": 1}], dtype=object))])
def test_detection_names_a_corrupt_depth_file(tmp_path, content):
    path = tmp_path / "view" / "3.npy"
    path.parent.mkdir()
    path.write_bytes(content)
    with pytest.raises(SiM3DError, match=r"cannot read depth .*3\.npy"):
        load_depth(path, where="widget_01 view 3")


def test_empty_category_folders_are_reported(tmp_path):
    root = tmp_path / "mvtec"
    fixtures.write_mvtec3d(root, categories=("bagel",))
    (root / "cookie").mkdir()  # an empty category (failed extraction)
    (root / "bagel" / "test" / "hole" / "xyz").mkdir(parents=True)
    summary = convert("mvtec3d", root, tmp_path / "out", progress=False, splits="all")
    assert summary["ok"] and summary["checks_warned"] == ["no_empty_folders"]  # reported, not fatal
    [check] = [c for c in summary["checks"] if c["name"] == "no_empty_folders"]
    assert "cookie/" in check["detail"] and "bagel/test/hole/xyz/" in check["detail"]
    # detection: an empty class folder is not a class; asking for it is a clear error
    data = tmp_path / "sim3d"
    fixtures.write_synthetic_views(data, classes=("stool",))
    (data / "vase").mkdir()
    assert list_classes(data) == ["stool"]
    with pytest.raises(SiM3DError, match="vase"):
        SiM3DClass(data, "vase")


# -- shard folders ---------------------------------------------------------------------------------
@pytest.fixture
def shards(tmp_path) -> Path:
    root = tmp_path / "scans"
    fixtures.write_depth_folder(root)
    for i in range(3):
        np.save(root / f"extra_{i}.npy", DEPTH + i)
    out = tmp_path / "shards"
    summary = convert("folder", root, out, progress=False, shard_max_count=2)
    assert summary["ok"] and len(summary["shards"]) == 3
    return out


def test_duplicate_keys_in_shards_are_refused_naming_them(shards):
    manifest = load_manifest(shards)
    recs = sorted(manifest["sources"]["folder"]["shards"], key=lambda r: r["name"])
    first, second = shards / recs[0]["name"], shards / recs[1]["name"]
    shutil.copyfile(first, second)  # the same samples twice (a shard copied over another)
    shutil.copyfile(first.with_name(first.name + ".idx.json"), second.with_name(second.name + ".idx.json"))
    for rec in manifest["sources"]["folder"]["shards"]:
        if rec["name"] == recs[1]["name"]:
            rec.update(bytes=recs[0]["bytes"], sha256=recs[0]["sha256"])
    write_manifest(shards, manifest)
    with pytest.raises(SampleTableError, match=r"duplicate sample key 'folder/.*': in .*000000\.tar and .*000001\.tar"):
        SampleTable.from_shard_dirs([shards])


def test_truncated_shard_is_refused_and_reconverted(shards, tmp_path, capsys):
    name = sorted(p.name for p in shards.glob("*.tar"))[-1]
    original = (shards / name).read_bytes()
    (shards / name).write_bytes(original[: len(original) // 2])  # cut by a crash or a failed copy
    with pytest.raises(SampleTableError, match=rf"{name} has \d+ bytes but the manifest says"):
        SampleTable.from_shard_dirs([shards])
    assert inspect_main([str(shards), "--previews", "0", "--verify"]) == 1
    assert name in capsys.readouterr().out
    root = tmp_path / "scans"
    summary = convert("folder", root, shards, progress=False, shard_max_count=2)  # the same command again
    assert summary["ok"] and summary["written"] == 2 and summary["resumed"] == 4
    assert (shards / name).read_bytes() == original  # rewritten byte-identically
    assert len(SampleTable.from_shard_dirs([shards])) == GOOD + 3


# -- a full disk while writing shards -----------------------------------------------------------------
def test_disk_full_while_writing_shards(tmp_path, disk_full, capsys):
    root = tmp_path / "scans"
    fixtures.write_depth_folder(root)
    for i in range(5):
        np.save(root / f"extra_{i}.npy", DEPTH + i)
    out = tmp_path / "shards"
    # A previous output in the same folder: another source's complete shards.
    other = tmp_path / "other"
    fixtures.write_depth_folder(other, seed=3)
    assert convert("folder", other, out, progress=False, folder_source_id="other")["ok"]
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.name.startswith("other")}
    reference = convert("folder", root, tmp_path / "reference", progress=False, shard_max_count=2)
    shard_bytes = (tmp_path / "reference" / "folder-000000.tar").stat().st_size

    disk = disk_full(out, free_bytes=int(2.5 * shard_bytes))  # room for two shards and a half
    args = ["--source", "folder", "--root", str(root), "--out", str(out), "--no-progress", "--shard-max-count", "2"]
    assert convert_main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: folder part 0: writing shards to ") and "No space left on device" in err
    assert "re-run the same command to resume" in err and "Traceback" not in err
    assert disk.hits >= 1
    _converted_cleanly(out)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name.startswith("other")} == before
    assert len(SampleTable.from_shard_dirs([out], sources=["other"])) == GOOD  # previous output intact
    with pytest.raises(SampleTableError, match="incomplete"):
        SampleTable.from_shard_dirs([out], sources=["folder"])  # the interrupted source is not usable yet

    disk.free = 1 << 40  # space freed: the same command resumes after the complete shards
    summary = convert("folder", root, out, progress=False, shard_max_count=2)
    assert summary["ok"] and summary["resumed"] > 0
    for name in reference["shards"]:
        assert (out / name).read_bytes() == (tmp_path / "reference" / name).read_bytes()


def _read_all(out: Path) -> dict[str, bytes]:
    table = SampleTable.from_shard_dirs([out])
    return {table.key(i): table.read(i)[0].tobytes() for i in range(len(table))}


def test_failed_conversion_never_publishes_a_partial_shard(tmp_path, monkeypatch):
    """An exception inside the writer (not only ENOSPC) removes the shard being written."""
    import data_prep.shards as shards_mod

    root = tmp_path / "scans"
    fixtures.write_depth_folder(root)
    real_add = shards_mod._OpenShard.add
    calls = {"n": 0}

    def failing_add(self, sample):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # Ctrl-C in the middle of a shard
        return real_add(self, sample)

    monkeypatch.setattr(shards_mod._OpenShard, "add", failing_add)
    with pytest.raises(KeyboardInterrupt):
        convert("folder", root, tmp_path / "out", progress=False)
    assert not list((tmp_path / "out").glob("*.tar")) and not list((tmp_path / "out").glob(".*.tmp"))
    monkeypatch.setattr(shards_mod._OpenShard, "add", real_add)
    assert convert("folder", root, tmp_path / "out", progress=False)["ok"]
    assert len(_read_all(tmp_path / "out")) == GOOD
