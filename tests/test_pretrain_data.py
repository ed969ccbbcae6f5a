"""Pretraining readers: SampleTable (indexed mode), StreamOrder, and the webdataset stream."""

from __future__ import annotations

import json
import pickle
import shutil
import tarfile
from collections import Counter

import numpy as np
import pytest
import webdataset as wds

from data_prep import fixtures
from data_prep.convert import convert
from data_prep.shards import (
    INDEX_SUFFIX,
    EncodedSample,
    SampleJob,
    ShardSequenceWriter,
    SourceItem,
    load_manifest,
    make_sample,
    write_manifest,
)
from pretrain.data import (
    SampleTable,
    SampleTableError,
    StreamOrder,
    list_shard_urls,
    make_stream,
    normalize_sample,
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    base = tmp_path_factory.mktemp("corpus")
    exp = {}
    exp.update(fixtures.write_mvtec3d(base / "mvtec"))
    exp.update(fixtures.write_eyecandies(base / "eye"))
    fixtures.write_synthetic_views(base / "synth")
    a, b = base / "shards_a", base / "shards_b"
    for src, root in (("mvtec3d", "mvtec"), ("eyecandies", "eye")):
        convert(src, base / root, a, splits="all", progress=False, shard_max_count=3)
    convert("synthetic", base / "synth", b, splits="all", progress=False, shard_max_count=4)
    return {"base": base, "a": a, "b": b, "expected": exp}


def test_table_reads_exact_values(corpus):
    t = SampleTable.from_shard_dirs([corpus["a"]])
    assert len(t) == 22 and t.sources == ["eyecandies", "mvtec3d"]
    exp = corpus["expected"]
    for i in range(len(t)):
        depth, meta = t.read(i)
        assert meta["key"] == t.key(i)
        e = exp[meta["rel_path"]]
        np.testing.assert_array_equal(np.isnan(depth), np.isnan(e))
        assert depth[~np.isnan(depth)].tobytes() == e[~np.isnan(e)].tobytes()
        assert t.source(i) == meta["source"] and t.split(i) == meta["split"]
    assert t.counts()["mvtec3d"] == {"train": 4, "validation": 2, "test": 4}


def test_table_selection_order_and_fingerprint(corpus):
    a, b = corpus["a"], corpus["b"]
    t1 = SampleTable.from_shard_dirs([a, b])
    t2 = SampleTable.from_shard_dirs([str(b), str(a)])
    assert [t1.key(i) for i in range(len(t1))] == [t2.key(i) for i in range(len(t2))]
    assert t1.fingerprint == t2.fingerprint and len(t1) == 31
    t3 = SampleTable.from_shard_dirs([a, b], splits=["train", "validation"])
    assert len(t3) == 4 + 2 + 4 + 2 + 3 and t3.fingerprint != t1.fingerprint
    assert {t3.split(i) for i in range(len(t3))} == {"train", "validation"}
    t4 = SampleTable.from_shard_dirs([a, b], sources=["synthetic"])
    assert t4.sources == ["synthetic"] and len(t4) == 9
    assert SampleTable.from_shard_dirs([a, b], preset="A").sources == ["eyecandies", "mvtec3d"]
    assert SampleTable.from_shard_dirs([a], sources=[]).sources == ["eyecandies", "mvtec3d"]
    sel = t3.selection()
    assert sel["splits"] == ["train", "validation"] and sel["fingerprint"] == t3.fingerprint


def test_table_errors(corpus, tmp_path):
    a, b = corpus["a"], corpus["b"]
    with pytest.raises(SampleTableError, match=r"unknown source\(s\) \['realiad_d3'\].*available"):
        SampleTable.from_shard_dirs([a, b], preset="B")
    with pytest.raises(SampleTableError, match="unknown source"):
        SampleTable.from_shard_dirs([a], sources=["mvtec3d", "visa"])
    with pytest.raises(SampleTableError, match="either|one of them"):
        SampleTable.from_shard_dirs([a], sources=["mvtec3d"], preset="A")
    with pytest.raises(SampleTableError, match="unknown split"):
        SampleTable.from_shard_dirs([a], splits=["val"])
    with pytest.raises(SampleTableError, match="no samples"):
        SampleTable.from_shard_dirs([b], splits=["test_private"])
    with pytest.raises(SampleTableError, match="manifest.json does not exist"):
        SampleTable.from_shard_dirs([tmp_path])
    copy = tmp_path / "copy"
    shutil.copytree(b, copy)
    with pytest.raises(SampleTableError, match="several shard folders"):
        SampleTable.from_shard_dirs([b, copy])
    shard = copy / "synthetic-000000.tar"
    shard.write_bytes(shard.read_bytes() + b"\0" * 512)
    with pytest.raises(SampleTableError, match="changed since conversion"):
        SampleTable.from_shard_dirs([copy])
    m = load_manifest(b)
    m["sources"]["synthetic"]["complete"] = False
    inc = tmp_path / "inc"
    shutil.copytree(b, inc)
    write_manifest(inc, m)
    with pytest.raises(SampleTableError, match="incomplete"):
        SampleTable.from_shard_dirs([inc])


def test_missing_index_is_rebuilt_from_tar_headers(corpus, tmp_path):
    copy = tmp_path / "noidx"
    shutil.copytree(corpus["a"], copy)
    for p in copy.glob("*" + INDEX_SUFFIX):
        p.unlink()
    (copy / "mvtec3d-000001.tar.idx.json").write_text("{broken")
    t1, t2 = SampleTable.from_shard_dirs([corpus["a"]]), SampleTable.from_shard_dirs([copy])
    assert t1.fingerprint == t2.fingerprint and len(t1) == len(t2)
    for i in range(len(t1)):
        d1, m1 = t1.read(i)
        d2, m2 = t2.read(i)
        assert m1 == m2 and d1.tobytes() == d2.tobytes()


def test_read_seeks_without_scanning(corpus, monkeypatch):
    t = SampleTable.from_shard_dirs([corpus["a"]])

    def no_scan(*a, **k):
        raise AssertionError("read() must not scan the tar")

    monkeypatch.setattr(tarfile, "open", no_scan)
    depth, meta = t.read(len(t) - 1)
    assert depth.shape == tuple(meta["stored_hw"])
    t2 = pickle.loads(pickle.dumps(t))  # DataLoader workers receive a pickled table
    assert t2.read(3)[1] == t.read(3)[1] and t2.fingerprint == t.fingerprint


def test_read_normalized(corpus):
    t = SampleTable.from_shard_dirs([corpus["a"]])
    x, valid, degenerate, _ = t.read_normalized(0)
    assert not degenerate and x.dtype == np.float32
    assert np.all(x[~valid] == 0) and x[valid].min() >= 0.1 - 1e-7 and x[valid].max() <= 1.0


def test_stream_order():
    o = StreamOrder(10, seed=3)
    first = [o(q) for q in range(10)]
    second = [o(q) for q in range(10, 20)]
    assert sorted(first) == sorted(second) == list(range(10)) and first != second
    assert [StreamOrder(10, seed=3)(q) for q in range(20)] == first + second
    assert [StreamOrder(10, seed=4)(q) for q in range(10)] != first
    src = np.array([0] * 8 + [1] * 2)
    w = StreamOrder(10, seed=0, source_index=src, source_weights=[1.0, 3.0])
    draws = [w(q) for q in range(2000)]
    assert np.mean(src[draws] == 1) == pytest.approx(0.75, abs=0.04)
    assert draws[:50] == [StreamOrder(10, 0, src, [1.0, 3.0])(q) for q in range(50)]


def test_stream_order_for_table(corpus):
    t = SampleTable.from_shard_dirs([corpus["a"]])
    o = StreamOrder.for_table(t, seed=0, source_weights={"mvtec3d": 1, "eyecandies": 1})
    assert 0 <= o(5) < len(t)
    with pytest.raises(ValueError, match="exactly"):
        StreamOrder.for_table(t, seed=0, source_weights={"mvtec3d": 1})


def keys_of(stream, n=None):
    out = []
    for s in stream:
        out.append(s["__key__"])
        if n is not None and len(out) >= n:
            break
    return out


def test_stream_one_pass_deterministic_and_complete(corpus):
    urls = list_shard_urls([corpus["a"], corpus["b"]])
    all_keys = set(SampleTable.from_shard_dirs([corpus["a"], corpus["b"]])._keys)
    k1 = keys_of(make_stream(urls, seed=1, resampled=False, shuffle_buffer=8))
    k2 = keys_of(make_stream(urls, seed=1, resampled=False, shuffle_buffer=8))
    k3 = keys_of(make_stream(urls, seed=1, epoch=1, resampled=False, shuffle_buffer=8))
    assert k1 == k2 and sorted(k1) == sorted(all_keys) and k3 != k1 and sorted(k3) == sorted(k1)
    stream = make_stream(urls, seed=1, resampled=False, shuffle_buffer=8)
    stream.set_epoch(1)
    assert keys_of(stream) == k3


def test_stream_splits_by_worker_and_node(corpus, monkeypatch):
    urls = list_shard_urls([corpus["a"], corpus["b"]])
    parts = []
    for rank in range(2):
        for worker in range(2):
            monkeypatch.setenv("RANK", str(rank))
            monkeypatch.setenv("WORLD_SIZE", "2")
            monkeypatch.setenv("WORKER", str(worker))
            monkeypatch.setenv("NUM_WORKERS", "2")
            parts.append(keys_of(make_stream(urls, seed=0, resampled=False)))
    flat = [k for p in parts for k in p]
    assert len(flat) == len(set(flat)) == 31  # disjoint, complete
    assert all(parts)
    # resampled: each (rank, worker) gets its own deterministic infinite stream
    monkeypatch.setenv("RANK", "1")
    r1 = keys_of(make_stream(urls, seed=0, epoch_length=20), 20)
    assert r1 == keys_of(make_stream(urls, seed=0, epoch_length=20), 20) and len(r1) == 20
    monkeypatch.setenv("RANK", "0")
    assert keys_of(make_stream(urls, seed=0), 20) != r1


def test_stream_values_exact_and_normalised(corpus):
    t = SampleTable.from_shard_dirs([corpus["a"]])
    by_key = {t.key(i): i for i in range(len(t))}
    urls = list_shard_urls([corpus["a"]], sources=["mvtec3d"])
    for s in make_stream(urls, resampled=False, keep_raw=True, splits=["train"]):
        depth, meta = t.read(by_key[s["__key__"]])
        assert s["depth"].tobytes() == depth.tobytes() and s["meta"] == meta and meta["split"] == "train"
        x, valid, _ = normalize_sample(depth, meta)
        assert np.array_equal(s["x"], x) and np.array_equal(s["valid"], valid)
        assert s["x"].dtype == np.float32 and set(np.unique(s["x"][~s["valid"]])) <= {0.0}


def test_stream_source_weights(corpus):
    urls = list_shard_urls([corpus["a"], corpus["b"]])
    with pytest.warns(UserWarning, match="no weight"):
        st = make_stream(urls, seed=0, shuffle_buffer=4, source_weights={"mvtec3d": 1, "synthetic": 3})
    c = Counter(k.split("/")[0] for k in keys_of(st, 400))
    assert set(c) == {"mvtec3d", "synthetic"}
    assert c["synthetic"] / 400 == pytest.approx(0.75, abs=0.07)
    with pytest.raises(ValueError, match="resampled"):
        make_stream(urls, resampled=False, source_weights={"mvtec3d": 1})
    with pytest.raises(ValueError, match="without shards"):
        make_stream(urls, source_weights={"visa": 1})


def test_stream_counts_corrupt_and_degenerate_samples(tmp_path):
    job = SampleJob("folder", "metric_z", "m", 1024, "nan_median", 0.5, "h")
    w = ShardSequenceWriter(tmp_path, "folder", params_hash="h", plan_hash="p", n_items=4)
    w.resume()
    rng = np.random.default_rng(0)
    items = [SourceItem("c", "train", "train", f"s{i}", f"s{i}.npy") for i in range(4)]
    w.add(make_sample(job, 0, items[0], rng.random((20, 20)).astype(np.float32) + 1))
    good = make_sample(job, 1, items[1], rng.random((20, 20)).astype(np.float32) + 1)
    w.add(EncodedSample(1, good.key, {"depth.npy": b"not an npy file", "json": good.members["json"]}, good.summary))
    w.add(make_sample(job, 2, items[2], np.ones((20, 20), np.float32)))  # constant: degenerate
    w.add(make_sample(job, 3, items[3], rng.random((20, 20)).astype(np.float32) + 1))
    w.close()
    stream = make_stream([str(tmp_path / "folder-000000.tar")], resampled=False, shuffle_buffer=0,
                         handler=wds.ignore_and_continue)
    out = list(stream)
    assert [s["__key__"] for s in out] == ["folder/c/train/s0", "folder/c/train/s3"]
    assert stream.counters.errors == 1 and stream.counters.degenerate == 1
    assert out[-1]["n_skipped"] == 2
    meta = json.loads(good.members["json"])
    assert meta["key"] == good.key


def test_stream_in_dataloader_workers(corpus):
    import torch

    urls = list_shard_urls([corpus["b"]])
    stream = make_stream(urls, seed=0, resampled=False, shuffle_buffer=2)
    pickle.loads(pickle.dumps(stream))  # spawn-context workers receive a pickled pipeline
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2,
                                         collate_fn=lambda s: s["__key__"])
    keys = list(loader)
    assert sorted(keys) == sorted(SampleTable.from_shard_dirs([corpus["b"]])._keys)
    assert list(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2,
                                            collate_fn=lambda s: s["__key__"])) == keys


def test_npy_buffer_decoding_is_strict_and_writable():
    import io

    from shared.shards import npy_from_buffer

    def npy(a):
        b = io.BytesIO()
        np.save(b, a)
        return bytearray(b.getvalue())

    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    out = npy_from_buffer(npy(a), "x")
    assert np.array_equal(out, a) and out.flags.writeable
    out[0, 0] = 5.0  # augmentation may work in place
    with pytest.raises(ValueError, match="float32"):
        npy_from_buffer(npy(a.astype(np.float64)), "x")
    with pytest.raises(ValueError, match="float32"):
        npy_from_buffer(npy(a[None]), "x")
    with pytest.raises(ValueError, match="size"):
        npy_from_buffer(npy(a)[:-4], "x")
    with pytest.raises(ValueError):
        npy_from_buffer(bytearray(b"garbage" * 20), "x")


def test_shuffle_buffer_fills_to_its_size():
    from pretrain.data import _EpochState, _Shuffle

    out = list(_Shuffle(bufsize=50, initial=5, seed=0, state=_EpochState(0), salt=0)(iter(range(1000))))
    assert sorted(out) == list(range(1000))
    # an output is at most ~bufsize inputs ahead of its position: the buffer did fill up to 50
    assert 30 < max(v - i for i, v in enumerate(out)) < 60
    assert out == list(_Shuffle(50, 5, 0, _EpochState(0), 0)(iter(range(1000))))
    assert out != list(_Shuffle(50, 5, 0, _EpochState(1), 0)(iter(range(1000))))
