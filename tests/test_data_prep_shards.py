"""Shard writer: keys, encoding, tar layout, indexes, manifest, resumability, parts, workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest

from data_prep import fixtures
from data_prep.convert import convert
from data_prep.shards import (
    INDEX_SUFFIX,
    ConversionError,
    SampleJob,
    ShardParams,
    ShardSequenceWriter,
    SourceItem,
    check_unique_keys,
    decode_npy,
    iter_outcomes,
    load_manifest,
    make_key,
    make_sample,
    manifest_fingerprint,
    parse_splits,
    run_conversion,
    sanitize_component,
    scan_shard_index,
    split_key,
)
from data_prep.sources import make_source
from shared.depth import downsample_depth, rescale_intrinsics

REPO = Path(__file__).resolve().parents[1]
JOB = SampleJob(source="folder", kind="metric_z", unit="m", max_side=1024, downsample="nan_median",
                valid_frac_min=0.5, params_hash="0" * 16)


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


def visible_state(out: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name.endswith((".tar", INDEX_SUFFIX))}


@pytest.fixture(scope="module")
def mvtec_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mvtec3d")
    fixtures.write_mvtec3d(root, categories=("bagel", "foam", "rope"))
    return root


def _item(i: int, hw=(12, 16)) -> SourceItem:
    return SourceItem(category="cat", split="train", split_orig="train", stem=f"s{i:03d}", rel_path=f"s{i:03d}.npy")


def test_key_sanitising_and_roundtrip():
    assert sanitize_component("a.b c/d") == "a_b_c_d"
    key = make_key("mvtec3d", "cable gland", "test", "crack.003")
    assert key == "mvtec3d/cable_gland/test/crack_003"
    assert split_key(key) == ("mvtec3d", "cable_gland", "test", "crack_003")
    with pytest.raises(ValueError):
        split_key("a/b/c")


def test_key_collisions_are_errors():
    check_unique_keys(["a/b/c/d", "a/b/c/e"])
    with pytest.raises(ConversionError, match="collision.*x.png and x.npy"):
        check_unique_keys(["f/c/train/x", "f/c/train/x"], ["x.png", "x.npy"])


def test_parse_splits():
    assert parse_splits("train,validation") == ("train", "validation")
    assert parse_splits("validation, train") == ("train", "validation")
    assert parse_splits("all") is None
    with pytest.raises(ValueError, match="unknown split"):
        parse_splits("train,val")


def test_make_sample_json_fields_and_exact_bytes():
    depth = np.random.default_rng(0).random((12, 16)).astype(np.float32)
    depth[2, 3] = np.nan
    s = make_sample(JOB, 0, _item(0), depth, camera={"K": np.eye(3)})
    stored = decode_npy(s.members["depth.npy"])
    assert stored.tobytes() == depth.tobytes()  # bit-exact including the NaN payload position
    meta = json.loads(s.members["json"])
    for field in ("key", "source", "category", "split", "split_orig", "label", "defect_type", "rel_path", "kind",
                  "unit", "orig_hw", "stored_hw", "resize", "invalid", "valid_frac", "stats", "bg_removed",
                  "converter"):
        assert field in meta, field
    assert meta["key"] == "folder/cat/train/s000" == s.key
    assert meta["invalid"] == "nan" and meta["resize"] == {"applied": False, "method": "none", "scale": 1.0}
    assert meta["valid_frac"] == pytest.approx(1 - 1 / depth.size)
    assert meta["converter"]["params_hash"] == JOB.params_hash


def test_make_sample_downsamples_big_maps_and_rescales_K():
    job = SampleJob(**{**JOB.__dict__, "max_side": 20})
    depth = np.random.default_rng(1).random((60, 80)).astype(np.float32) + 1
    depth[:30, :40] = np.nan
    K = np.array([[100.0, 0, 39.5], [0, 100.0, 29.5], [0, 0, 1]])
    s = make_sample(job, 0, _item(0), depth, camera={"K": K})
    meta = json.loads(s.members["json"])
    stored = decode_npy(s.members["depth.npy"])
    assert stored.shape == (15, 20) and meta["stored_hw"] == [15, 20] and meta["orig_hw"] == [60, 80]
    assert meta["resize"] == {"applied": True, "method": "nan_median", "scale": 0.25}
    np.testing.assert_array_equal(stored, downsample_depth(depth, 20, "nan_median", 0.5))
    np.testing.assert_allclose(meta["camera"]["K"], rescale_intrinsics(K, 0.25, 0.25))
    # the z summary for the report is taken at the original resolution
    assert s.summary["zsum"]["n"] == 60 * 80


def test_writer_layout_offsets_and_index_scan(tmp_path):
    rng = np.random.default_rng(2)
    w = ShardSequenceWriter(tmp_path, "folder", params_hash="p", plan_hash="q", n_items=7, max_count=3)
    assert w.resume() == 0
    maps = {}
    for i in range(7):
        if i == 4:
            w.add(iter_skip(i))
            continue
        d = rng.random((5 + i, 9)).astype(np.float32)
        maps[f"folder/cat/train/s{i:03d}"] = d
        w.add(make_sample(JOB, i, _item(i), d))
    w.close()
    names = sorted(p.name for p in tmp_path.glob("*.tar"))
    assert names == ["folder-000000.tar", "folder-000001.tar"]
    for name in names:
        idx = json.loads((tmp_path / (name + INDEX_SUFFIX)).read_text())
        data = (tmp_path / name).read_bytes()
        assert idx["bytes"] == len(data)
        for s in idx["samples"]:
            off, size = s["members"]["depth.npy"]
            np.testing.assert_array_equal(decode_npy(data[off:off + size]), maps[s["key"]])
        scanned = scan_shard_index(tmp_path / name)
        assert [(s["key"], s["members"]) for s in scanned["samples"]] == \
               [(s["key"], s["members"]) for s in idx["samples"]]
        with tarfile.open(tmp_path / name) as tf:
            members = tf.getmembers()
        assert {m.mtime for m in members} == {946_684_800} and {m.uname for m in members} == {"dinodepth"}
        assert [m.name.split(".", 1)[1] for m in members] == ["depth.npy", "json"] * len(idx["samples"])
    last = json.loads((tmp_path / ("folder-000001.tar" + INDEX_SUFFIX)).read_text())
    assert last["final"] and last["item_range"] == [3, 7]
    assert [s["rel_path"] for s in last["skipped"]] == ["bad.npy"]


def iter_skip(i):
    from data_prep.shards import SkippedItem

    return SkippedItem(i, "bad.npy", "unreadable: test")


def test_writer_respects_max_bytes(tmp_path):
    w = ShardSequenceWriter(tmp_path, "folder", params_hash="p", plan_hash="q", n_items=6, max_bytes=25_000)
    w.resume()
    for i in range(6):
        w.add(make_sample(JOB, i, _item(i), np.ones((30, 40), np.float32)))  # ~7 kB in the tar
    w.close()
    sizes = [p.stat().st_size for p in sorted(tmp_path.glob("*.tar"))]
    assert len(sizes) == 3 and all(s <= 25_000 for s in sizes)  # tar files are padded to 10 kB records


def test_conversion_manifest(mvtec_root, tmp_path):
    out = tmp_path / "out"
    s = convert("mvtec3d", mvtec_root, out, splits="all", progress=False, shard_max_count=4)
    assert s["ok"] and s["written"] == 15 and s["skipped"] == 0
    m = load_manifest(out, required=True)
    assert m["format"] == "dinodepth-shards" and m["format_version"] == 1
    e = m["sources"]["mvtec3d"]
    assert e["complete"] and e["counts"]["total"] == 15
    assert e["counts"]["categories"]["bagel"]["test"] == {"anomalous": 1, "normal": 1}
    for k in ("splits", "max_side", "downsample", "valid_frac_min", "bg", "seed", "shard_max_bytes",
              "shard_max_count", "num_parts", "converter_version"):
        assert k in e["params"], k
    assert [r["name"] for r in e["shards"]] == [f"mvtec3d-{i:06d}.tar" for i in range(4)]
    for r in e["shards"]:
        assert set(r) == {"name", "samples", "bytes", "sha256"}
    assert e["skipped"] == [] and "z_stats" in e["report"] and e["report"]["checks"]
    assert m["fingerprint"] == manifest_fingerprint(m["sources"])
    assert s["fingerprint"] == m["fingerprint"]


def test_workers_give_identical_shards(mvtec_root, tmp_path):
    a = convert("mvtec3d", mvtec_root, tmp_path / "a", progress=False, shard_max_count=3)
    b = convert("mvtec3d", mvtec_root, tmp_path / "b", progress=False, shard_max_count=3, workers=2)
    assert a["written"] == b["written"] == 9
    assert shard_bytes(tmp_path / "a") == shard_bytes(tmp_path / "b")


def test_rerun_is_a_noop_and_param_change_replaces(mvtec_root, tmp_path):
    out = tmp_path / "out"
    convert("mvtec3d", mvtec_root, out, progress=False, shard_max_count=4)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    s = convert("mvtec3d", mvtec_root, out, progress=False, shard_max_count=4)
    assert s["written"] == 0 and s["resumed"] == 9 and s["ok"]
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == before
    s = convert("mvtec3d", mvtec_root, out, progress=False, shard_max_count=100)
    assert s["written"] == 9 and sorted(p.name for p in out.glob("*.tar")) == ["mvtec3d-000000.tar"]
    assert load_manifest(out)["sources"]["mvtec3d"]["params"]["shard_max_count"] == 100


class _Interrupt(KeyboardInterrupt):
    pass


def test_resume_after_interrupt_is_byte_identical(mvtec_root, tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "out"
    convert("mvtec3d", mvtec_root, ref, splits="all", progress=False, shard_max_count=2)
    reader = make_source("mvtec3d", mvtec_root)
    params = ShardParams(splits=None, shard_max_count=2)

    def interrupted(tasks):
        from data_prep.shards import SampleJob, conversion_params

        job = SampleJob("mvtec3d", "metric_z", "m", 1024, "nan_median", 0.5,
                        conversion_params(reader, params)[1])
        for n, outcome in enumerate(iter_outcomes(reader, job, tasks)):
            if n == 7:  # in the middle of the 4th shard
                raise _Interrupt
            yield outcome

    with pytest.raises(_Interrupt):
        run_conversion(reader, out, params, progress=False, process_many=interrupted)
    # only complete shards are visible, each with its index; nothing half-written, no temp file
    visible = sorted(p.name for p in out.iterdir())
    assert [n for n in visible if n.endswith(".tar")] == [f"mvtec3d-{i:06d}.tar" for i in range(3)]
    assert not [n for n in visible if n.endswith(".tmp")]
    for i in range(3):
        name = f"mvtec3d-{i:06d}.tar"
        assert (out / name).read_bytes() == (ref / name).read_bytes()
    assert load_manifest(out)["sources"]["mvtec3d"]["parts"] == {}
    s = convert("mvtec3d", mvtec_root, out, splits="all", progress=False, shard_max_count=2)
    assert s["resumed"] == 6 and s["written"] == 9
    assert visible_state(out) == visible_state(ref)
    assert load_manifest(out)["fingerprint"] == load_manifest(ref)["fingerprint"]


def test_resume_after_hard_kill_and_lost_index(mvtec_root, tmp_path):
    """SIGKILL mid-shard leaves a temp file only; a shard whose sidecar was never written is redone."""
    ref, out = tmp_path / "ref", tmp_path / "out"
    convert("mvtec3d", mvtec_root, ref, splits="all", progress=False, shard_max_count=2)
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(REPO)!r})
        from data_prep.shards import ShardParams, SampleJob, conversion_params, iter_outcomes, run_conversion
        from data_prep.sources import make_source
        reader = make_source("mvtec3d", {str(mvtec_root)!r})
        params = ShardParams(splits=None, shard_max_count=2)
        job = SampleJob("mvtec3d", "metric_z", "m", 1024, "nan_median", 0.5, conversion_params(reader, params)[1])
        def killed(tasks):
            for n, o in enumerate(iter_outcomes(reader, job, tasks)):
                if n == 9:
                    os.kill(os.getpid(), signal.SIGKILL)
                yield o
        run_conversion(reader, {str(out)!r}, params, progress=False, process_many=killed)
    """)
    proc = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    names = sorted(p.name for p in out.iterdir())
    assert any(n.endswith(".tmp") for n in names)  # the shard being written died as a temp file
    assert [n for n in names if n.endswith(".tar")] == [f"mvtec3d-{i:06d}.tar" for i in range(4)]
    (out / ("mvtec3d-000003.tar" + INDEX_SUFFIX)).unlink()  # as if killed between rename and index write
    s = convert("mvtec3d", mvtec_root, out, splits="all", progress=False, shard_max_count=2)
    assert s["resumed"] == 6
    assert visible_state(out) == visible_state(ref)
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_parts_merge_into_one_manifest(mvtec_root, tmp_path):
    out, single = tmp_path / "out", tmp_path / "single"
    convert("mvtec3d", mvtec_root, single, splits="all", progress=False)
    s0 = convert("mvtec3d", mvtec_root, out, splits="all", progress=False, num_parts=2, part=0)
    assert not s0["source_complete"]
    s1 = convert("mvtec3d", mvtec_root, out, splits="all", progress=False, num_parts=2, part=1)
    assert s1["source_complete"] and s0["written"] + s1["written"] == 15
    e = load_manifest(out)["sources"]["mvtec3d"]
    assert [r["name"] for r in e["shards"]] == ["mvtec3d-000000.tar", "mvtec3d-100000.tar"]
    assert e["counts"] == load_manifest(single)["sources"]["mvtec3d"]["counts"]

    def keys(d):
        return sorted(s["key"] for p in d.glob("*" + INDEX_SUFFIX) for s in json.loads(p.read_text())["samples"])

    assert keys(out) == keys(single)


def test_output_inside_root_is_refused(mvtec_root):
    with pytest.raises(ConversionError, match="inside the input root"):
        convert("mvtec3d", mvtec_root, mvtec_root / "shards", progress=False)
    assert not (mvtec_root / "shards").exists()


def test_sources_untouched(mvtec_root, tmp_path):
    before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in mvtec_root.rglob("*") if p.is_file()}
    convert("mvtec3d", mvtec_root, tmp_path / "o", progress=False, bg="plane")
    after = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in mvtec_root.rglob("*") if p.is_file()}
    assert before == after


def test_shards_are_readable_by_webdataset(mvtec_root, tmp_path):
    import webdataset as wds

    out = tmp_path / "o"
    convert("mvtec3d", mvtec_root, out, progress=False)
    ds = wds.WebDataset(str(out / "mvtec3d-000000.tar"), shardshuffle=False)
    samples = list(ds)
    assert len(samples) == 9
    for s in samples:
        assert {k for k in s if not k.startswith("__")} == {"depth.npy", "json"}
        assert json.loads(s["json"])["key"] == s["__key__"]
        assert decode_npy(s["depth.npy"]).dtype == np.float32


def test_file_permissions_follow_umask(mvtec_root, tmp_path):
    out = tmp_path / "o"
    convert("mvtec3d", mvtec_root, out, progress=False)
    umask = os.umask(0)
    os.umask(umask)
    for p in out.glob("*.tar*"):
        assert (p.stat().st_mode & 0o777) == (0o666 & ~umask)


def test_changed_inputs_invalidate_other_parts(tmp_path):
    root = tmp_path / "d"
    fixtures.write_mvtec3d(root, categories=("bagel",))
    out = tmp_path / "o"
    convert("mvtec3d", root, out, progress=False, num_parts=2, part=0)
    convert("mvtec3d", root, out, progress=False, num_parts=2, part=1)
    assert load_manifest(out)["sources"]["mvtec3d"]["complete"]
    fixtures.write_mvtec3d(tmp_path / "more", categories=("bagel",), layout={"train": {"good": 4}}, seed=5)
    src = tmp_path / "more/bagel/train/good/xyz/003.tiff"
    (root / "bagel/train/good/xyz/003.tiff").write_bytes(src.read_bytes())  # a new input file
    s = convert("mvtec3d", root, out, progress=False, num_parts=2, part=0)
    assert not s["source_complete"] and not list(out.glob("mvtec3d-1*.tar"))
    s = convert("mvtec3d", root, out, progress=False, num_parts=2, part=1)
    assert s["source_complete"] and load_manifest(out)["sources"]["mvtec3d"]["counts"]["total"] == 4
