"""Depth-shard readers for pretraining (``dino_depth.md`` §9; schema ``data_formats.md`` §8).

Two modes:

* **indexed** (default): :class:`SampleTable` is a global table of every selected sample (shard file,
  member byte offsets) built from ``manifest.json`` and the per-shard ``.idx.json`` sidecars (rebuilt
  from the tar headers when absent). :meth:`SampleTable.read` seeks straight to a sample
  (``os.pread``; no tar scan), so any sample order is possible and training resumes exactly.
  :class:`StreamOrder` maps a global stream position ``q`` to a table index: ``π_p(q mod S)`` with
  ``p = q div S`` and ``π_p`` a permutation seeded by ``(seed, p)``, or counter-based weighted draws
  keyed by ``(seed, q)`` when per-source weights are given.
* **streaming**: :func:`make_stream` is a webdataset pipeline (seeded shard sequence, resampled or
  per-epoch shuffled, explicit ``split_by_node`` + ``split_by_worker``, a shuffle buffer, a custom
  ``.npy`` decoder, ``warn_and_continue`` with a counter, per-source weights). It is deterministic
  given (seed, rank, worker, epoch); resuming mid-epoch is approximate.

Depth is always decoded with ``np.load`` (exact float32); webdataset's image decoders are never
used (they convert to 8-bit). Normalisation is the shared nearness map of :mod:`shared.depth`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import re
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from webdataset.pytorch import IterableDataset

from data_prep.presets import preset_sources
from data_prep.shards import (
    CANONICAL_SPLITS,
    DEPTH_EXT,
    JSON_EXT,
    decode_npy,
    file_sha256,
    load_manifest,
    load_shard_index,
    split_key,
)
from shared.depth import DepthNormConfig, normalize_depth, stored_valid_range

KNOWN_SOURCES = ("mvtec3d", "eyecandies", "realiad_d3", "folder", "synthetic",
                 "mvtec_ad", "mvtec_loco", "mvtec_ad2", "visa")
TABLE_FORMAT_VERSION = 1
_SHARD_RE = re.compile(r"^(?P<source>[a-z0-9_]+)-\d{6,}\.tar$")
_MAX_OPEN_FILES = 256


class SampleTableError(ValueError):
    """Selection or consistency problem of the shard folders (unknown source, changed shard, ...)."""


def _check_splits(splits: Sequence[str] | None) -> tuple[str, ...] | None:
    if splits is None:
        return None
    if isinstance(splits, str):
        splits = [s.strip() for s in splits.split(",") if s.strip()]
    splits = list(splits)
    if splits == ["all"]:
        return None
    unknown = [s for s in splits if s not in CANONICAL_SPLITS]
    if unknown or not splits:
        raise SampleTableError(f"unknown split name(s) {unknown or splits}; expected names from "
                               f"{list(CANONICAL_SPLITS)} or 'all'")
    return tuple(sorted(set(splits), key=CANONICAL_SPLITS.index))


def _resolve_sources(sources: Sequence[str] | None, preset: str | None) -> list[str] | None:
    if preset is not None:
        wanted = preset_sources(preset)
        if sources is not None and sorted(set(sources)) != sorted(wanted):
            raise SampleTableError(f"preset {preset!r} means sources {wanted}, but sources={list(sources)} "
                                   "was also given; pass one of them")
        return wanted
    if sources is None:
        return None
    if isinstance(sources, str):
        sources = [s.strip() for s in sources.split(",") if s.strip()]
    if not sources:  # an empty list in a config means "no restriction", like None
        return None
    return list(dict.fromkeys(sources))


@dataclass(frozen=True)
class ShardInfo:
    path: str
    source: str
    name: str
    sha256: str
    bytes: int


class SampleTable:
    """Global table of depth samples in one or more shard folders (indexed mode).

    Build it with :meth:`from_shard_dirs`. ``read(i)`` returns ``(depth, meta)``: float32 (H, W)
    NaN-invalid raw depth and the sample's JSON metadata. Order: sources sorted by id, shards by
    name, samples in shard order — independent of the order of ``dirs``. Picklable (open file
    descriptors are per process and reopened lazily after a fork or unpickling).
    """

    def __init__(self, shards: list[ShardInfo], keys: list[str], shard_of: np.ndarray, depth_loc: np.ndarray,
                 json_loc: np.ndarray, splits: tuple[str, ...] | None, fingerprint: str) -> None:
        self._shards = shards
        self._keys = keys
        self._shard_of = shard_of
        self._depth_loc = depth_loc  # (N, 2) int64 offset, size
        self._json_loc = json_loc
        self._splits = splits
        self._fingerprint = fingerprint
        self._source_names = sorted({s.source for s in shards})
        src_index = {s: i for i, s in enumerate(self._source_names)}
        per_shard = np.array([src_index[s.source] for s in shards], dtype=np.int32)
        self._source_of = per_shard[shard_of] if len(shard_of) else np.zeros(0, np.int32)
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._pid = os.getpid()

    # -- construction -------------------------------------------------------------------------------
    @classmethod
    def from_shard_dirs(cls, dirs: list[str | Path], sources: list[str] | None = None,
                        splits: list[str] | None = None, preset: str | None = None,
                        verify: bool = False) -> SampleTable:
        """Table of the selected samples in ``dirs`` (each a folder with ``manifest.json``).

        ``sources``: source ids to use (None = every source found); ``preset``: ``A``/``B``/``C``
        instead of ``sources``; ``splits``: canonical split names to keep (None or ``["all"]`` = all).
        A requested source absent from every manifest is an error (never silently ignored), as is a
        source present in two folders, an incomplete conversion, or a shard whose size differs
        from its manifest entry. ``verify=True`` also checks every shard's SHA-256 (reads all bytes).
        """
        if isinstance(dirs, (str, Path)):
            dirs = [dirs]
        dirs = [Path(d).expanduser().resolve() for d in dirs]
        if not dirs:
            raise SampleTableError("no shard folder given")
        wanted = _resolve_sources(sources, preset)
        split_sel = _check_splits(splits)
        available: dict[str, list[tuple[Path, dict]]] = {}
        for d in dirs:
            try:
                manifest = load_manifest(d, required=True)
            except (FileNotFoundError, ValueError) as exc:
                raise SampleTableError(str(exc)) from None
            for sid, entry in manifest.get("sources", {}).items():
                available.setdefault(sid, []).append((d, entry))
        names = sorted(available) if wanted is None else wanted
        missing = [s for s in names if s not in available]
        if missing:
            hint = " (pseudo-depth sources are written by data_prep/pseudo_depth.py)" if any(
                s in ("mvtec_ad", "mvtec_loco", "mvtec_ad2", "visa") for s in missing) else ""
            raise SampleTableError(
                f"unknown source(s) {missing}: not in the manifests of {[str(d) for d in dirs]}; "
                f"available: {sorted(available)}{hint}")
        if not names:
            raise SampleTableError(f"no source in the manifests of {[str(d) for d in dirs]}")

        shards: list[ShardInfo] = []
        keys: list[str] = []
        shard_of: list[int] = []
        depth_loc: list[tuple[int, int]] = []
        json_loc: list[tuple[int, int]] = []
        for sid in sorted(names):
            entries = available[sid]
            if len(entries) > 1:
                raise SampleTableError(f"source {sid!r} is in several shard folders "
                                       f"({', '.join(str(d) for d, _ in entries)}); its keys would repeat")
            d, entry = entries[0]
            if not entry.get("complete", False):
                raise SampleTableError(f"source {sid!r} in {d} is incomplete (some --part conversions are "
                                       "missing or still running); finish the conversion first")
            for rec in sorted(entry.get("shards", []), key=lambda r: r["name"]):
                path = d / rec["name"]
                if not path.is_file():
                    raise SampleTableError(f"shard {path} listed in {d / 'manifest.json'} is missing")
                size = path.stat().st_size
                if size != rec["bytes"]:
                    raise SampleTableError(f"shard {path} has {size} bytes but the manifest says {rec['bytes']}: "
                                           "it changed since conversion; re-run data_prep/convert.py")
                if verify and file_sha256(path) != rec["sha256"]:
                    raise SampleTableError(f"shard {path} does not match its manifest SHA-256")
                idx = load_shard_index(path, expected_sha256=rec["sha256"])
                si = len(shards)
                shards.append(ShardInfo(str(path), sid, rec["name"], rec["sha256"], int(rec["bytes"])))
                for s in idx["samples"]:
                    key = s["key"]
                    if split_sel is not None and split_key(key)[2] not in split_sel:
                        continue
                    members = s.get("members", {})
                    if DEPTH_EXT not in members or JSON_EXT not in members:
                        raise SampleTableError(f"{path}: sample {key} lacks a {DEPTH_EXT} or {JSON_EXT} member")
                    keys.append(key)
                    shard_of.append(si)
                    depth_loc.append(tuple(members[DEPTH_EXT]))
                    json_loc.append(tuple(members[JSON_EXT]))
        if not keys:
            raise SampleTableError(f"no samples for sources {sorted(names)} and splits "
                                   f"{'all' if split_sel is None else list(split_sel)} in {[str(d) for d in dirs]}")
        if len(set(keys)) != len(keys):
            first: dict[str, int] = {}
            for key, si in zip(keys, shard_of):
                if key in first:
                    raise SampleTableError(
                        f"duplicate sample key {key!r}: in {shards[first[key]].path} and {shards[si].path} "
                        "(a shard copied or converted twice?); every key must be unique")
                first[key] = si
        fp_obj = {"v": TABLE_FORMAT_VERSION, "splits": "all" if split_sel is None else list(split_sel),
                  "shards": [[s.source, s.name, s.sha256] for s in shards]}
        fingerprint = hashlib.sha256(json.dumps(fp_obj, sort_keys=True).encode()).hexdigest()
        return cls(shards, keys, np.asarray(shard_of, np.int32), np.asarray(depth_loc, np.int64).reshape(-1, 2),
                   np.asarray(json_loc, np.int64).reshape(-1, 2), split_sel, fingerprint)

    # -- the contract -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._keys)

    def key(self, i: int) -> str:
        return self._keys[i]

    def read(self, i: int) -> tuple[np.ndarray, dict]:
        """``(depth float32 (H, W) NaN-invalid, metadata)`` of sample ``i``, read at its offsets."""
        shard = int(self._shard_of[i])
        d_off, d_size = (int(v) for v in self._depth_loc[i])
        j_off, j_size = (int(v) for v in self._json_loc[i])
        fd = self._fd(shard)
        path = self._shards[shard].path
        # the array is decoded in place from a writable buffer (no second copy of the map)
        d_buf = bytearray(d_size)
        n_d = os.preadv(fd, [d_buf], d_off)
        j_buf = os.pread(fd, j_size, j_off)
        if n_d != d_size or len(j_buf) != j_size:
            raise OSError(f"{path}: short read for sample {self._keys[i]} (shard truncated?)")
        depth = _npy_from_buffer(d_buf, f"{path}:{self._keys[i]}.{DEPTH_EXT}")
        meta = json.loads(j_buf)
        return depth, meta

    @property
    def fingerprint(self) -> str:
        """SHA-256 over the (source, shard name, shard SHA-256) list and the split selection."""
        return self._fingerprint

    # -- conveniences -------------------------------------------------------------------------------
    @property
    def sources(self) -> list[str]:
        return list(self._source_names)

    @property
    def splits(self) -> tuple[str, ...] | None:
        return self._splits

    @property
    def shards(self) -> list[ShardInfo]:
        return list(self._shards)

    @property
    def source_index(self) -> np.ndarray:
        """Per-sample index into :attr:`sources` (int32, length ``len(self)``)."""
        return self._source_of

    def source(self, i: int) -> str:
        return self._source_names[int(self._source_of[i])]

    def split(self, i: int) -> str:
        return split_key(self._keys[i])[2]

    def counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for key in self._keys:
            src, _, split, _ = split_key(key)
            out.setdefault(src, {}).setdefault(split, 0)
            out[src][split] += 1
        return out

    def read_normalized(self, i: int, norm: DepthNormConfig | None = None
                        ) -> tuple[np.ndarray, np.ndarray, bool, dict]:
        """``(x, valid, degenerate, meta)``: the nearness-normalised full map (``shared.depth``)."""
        depth, meta = self.read(i)
        x, valid, degenerate = normalize_sample(depth, meta, norm)
        return x, valid, degenerate, meta

    def selection(self) -> dict:
        """What was selected (for checkpoints / export metadata)."""
        return {"sources": self.sources, "splits": "all" if self._splits is None else list(self._splits),
                "shard_dirs": sorted({str(Path(s.path).parent) for s in self._shards}),
                "samples": len(self), "fingerprint": self._fingerprint}

    # -- file handles -------------------------------------------------------------------------------
    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():  # after fork: the parent's descriptors share offsets; reopen
            self._fds = OrderedDict()
            self._pid = os.getpid()
        fd = self._fds.get(shard)
        if fd is None:
            if len(self._fds) >= _MAX_OPEN_FILES:
                _, old = self._fds.popitem(last=False)
                os.close(old)
            fd = os.open(self._shards[shard].path, os.O_RDONLY)
            self._fds[shard] = fd
        else:
            self._fds.move_to_end(shard)
        return fd

    def close(self) -> None:
        if self._pid == os.getpid():
            for fd in self._fds.values():
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._fds = OrderedDict()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # may run at interpreter shutdown
            self.close()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_fds"] = OrderedDict()
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._pid = os.getpid()


def _npy_from_buffer(buf: bytearray, what: str) -> np.ndarray:
    """float32 (H, W) array over ``buf`` (a complete ``.npy`` file), writable, without copying."""
    try:
        head = io.BytesIO(bytes(buf[:4096]))
        version = np.lib.format.read_magic(head)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(head)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(head)
    except Exception:  # unusual or corrupt header: np.load parses it, or decode_npy raises a ValueError
        return decode_npy(bytes(buf), what)
    if dtype != np.float32 or len(shape) != 2 or fortran:
        raise ValueError(f"{what}: expected a C-ordered float32 (H, W) array, got {dtype} {shape}")
    count = int(shape[0]) * int(shape[1])
    if head.tell() + 4 * count != len(buf):
        raise ValueError(f"{what}: .npy size does not match its header {shape}")
    return np.frombuffer(buf, dtype=np.float32, count=count, offset=head.tell()).reshape(shape)


def normalize_sample(depth: np.ndarray, meta: Mapping, norm: DepthNormConfig | Mapping | None = None
                     ) -> tuple[np.ndarray, np.ndarray, bool]:
    """Canonical normalisation of one stored map, using the sample's ``kind``."""
    if norm is None:
        norm = DepthNormConfig()
    elif isinstance(norm, Mapping):
        norm = DepthNormConfig.from_dict(dict(norm))
    return normalize_depth(depth, kind=meta.get("kind", "metric_z"), mode=norm.mode, eps=norm.eps,
                           pct=tuple(norm.pct), valid_range=stored_valid_range(meta, tuple(norm.pct)))


class StreamOrder:
    """Global stream position ``q`` → table index (``dino_depth.md`` §9), stateless and O(1) amortised.

    Unweighted: ``π_p(q mod S)`` with ``p = q div S`` and ``π_p`` the permutation of ``S`` items
    seeded by ``(seed, p)`` — every pass visits every sample once. Weighted: a counter-based draw
    keyed by ``(seed, q)`` picks a source with probability ∝ its weight, then a uniform sample of it.
    Identical for any number of ranks/workers: only ``q`` matters.
    """

    def __init__(self, n: int, seed: int = 0, source_index: np.ndarray | None = None,
                 source_weights: Sequence[float] | None = None) -> None:
        if n <= 0:
            raise ValueError("StreamOrder needs a non-empty table")
        self.n = int(n)
        self.seed = int(seed)
        self._perm_cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._members: list[np.ndarray] | None = None
        self._probs: np.ndarray | None = None
        if source_weights is not None:
            if source_index is None:
                raise ValueError("source_weights need source_index")
            w = np.asarray(source_weights, dtype=np.float64)
            if (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
                raise ValueError(f"source weights must be finite, >= 0 and not all 0: {list(w)}")
            self._members = [np.nonzero(source_index == s)[0] for s in range(len(w))]
            for s, m in enumerate(self._members):
                if w[s] > 0 and m.size == 0:
                    raise ValueError(f"source #{s} has weight {w[s]} but no samples")
            self._probs = w / w.sum()

    @classmethod
    def for_table(cls, table: SampleTable, seed: int = 0,
                  source_weights: Mapping[str, float] | None = None) -> StreamOrder:
        """Order over ``table``; ``source_weights`` maps every source id of the table to a weight."""
        if source_weights is None:
            return cls(len(table), seed)
        unknown = sorted(set(source_weights) - set(table.sources))
        missing = sorted(set(table.sources) - set(source_weights))
        if unknown or missing:
            raise ValueError(f"source_weights must name exactly the table's sources {table.sources}: "
                             f"unknown {unknown}, missing {missing}")
        return cls(len(table), seed, table.source_index, [float(source_weights[s]) for s in table.sources])

    def _perm(self, p: int) -> np.ndarray:
        perm = self._perm_cache.get(p)
        if perm is None:
            perm = np.random.default_rng([self.seed, p]).permutation(self.n)
            self._perm_cache[p] = perm
            if len(self._perm_cache) > 2:
                self._perm_cache.popitem(last=False)
        return perm

    def __call__(self, q: int) -> int:
        q = int(q)
        if q < 0:
            raise ValueError("stream position must be >= 0")
        if self._probs is None:
            return int(self._perm(q // self.n)[q % self.n])
        rng = np.random.default_rng([self.seed, q, 1])  # 1: domain-separates from the permutations
        s = int(rng.choice(len(self._probs), p=self._probs))
        members = self._members[s]
        return int(members[rng.integers(members.size)])


# ------------------------------------------------------------------------------------------------
# streaming mode (webdataset)


@dataclass
class StreamCounters:
    """Samples dropped by the stream in this process (each DataLoader worker has its own copy; the
    running total is also attached to every yielded sample as ``n_skipped``)."""

    errors: int = 0  # corrupt/unreadable samples or shards (handler calls)
    degenerate: int = 0  # normalisation flagged the map as degenerate
    low_valid: int = 0  # valid fraction below min_sample_valid
    filtered: int = 0  # outside the split selection (not an error)

    def skipped(self) -> int:
        return self.errors + self.degenerate + self.low_valid


class CountingHandler:
    """webdataset error handler: count the error, then defer to ``base`` (``warn_and_continue``)."""

    def __init__(self, counters: StreamCounters, base: Callable[[Exception], bool] | None = None) -> None:
        self.counters = counters
        self.base = base

    def __call__(self, exn: Exception) -> bool:
        self.counters.errors += 1
        if self.base is None:
            return wds.warn_and_continue(exn)
        return self.base(exn)


class _EpochState:
    def __init__(self, epoch: int) -> None:
        self.epoch = int(epoch)


def _mix_seed(*parts: int) -> int:
    # stable across processes and Python runs (unlike hash() of strings)
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


def _worker_ids() -> tuple[int, int]:
    from webdataset.utils import pytorch_worker_info

    rank, _, worker, _ = pytorch_worker_info()
    return rank, worker


class _ShardSequence(IterableDataset):
    """Iterable of ``{"url": ...}``: seeded by (seed, epoch, salt), identical on every rank/worker."""

    def __init__(self, urls: list[str], seed: int, state: _EpochState, salt: int, resampled: bool) -> None:
        self.urls, self.seed, self.state, self.salt, self.resampled = urls, seed, state, salt, resampled

    def __iter__(self) -> Iterator[dict]:
        rng = random.Random(_mix_seed(self.seed, self.state.epoch, self.salt, 0))
        if self.resampled:
            while True:
                yield {"url": self.urls[rng.randrange(len(self.urls))]}
        order = list(self.urls)
        rng.shuffle(order)
        for u in order:
            yield {"url": u}


class _Shuffle:
    """Shuffle buffer seeded at iteration time by (seed, epoch, rank, worker, salt)."""

    def __init__(self, bufsize: int, initial: int, seed: int, state: _EpochState, salt: int) -> None:
        self.bufsize, self.initial, self.seed, self.state, self.salt = bufsize, initial, seed, state, salt

    def __call__(self, src: Iterable) -> Iterator:
        if self.bufsize <= 1:
            yield from src
            return
        rank, worker = _worker_ids()
        rng = random.Random(_mix_seed(self.seed, self.state.epoch, rank, worker, self.salt, 1))
        buf: list = []
        initial = min(self.initial, self.bufsize)
        it = iter(src)
        for sample in it:
            buf.append(sample)
            if len(buf) < self.bufsize:  # still filling: take two, give one, so the buffer grows
                try:
                    buf.append(next(it))
                except StopIteration:
                    pass
            if len(buf) < initial:
                continue
            k = rng.randrange(len(buf))
            buf[k], buf[-1] = buf[-1], buf[k]
            yield buf.pop()
        rng.shuffle(buf)
        yield from buf


class _SplitFilter:
    def __init__(self, splits: tuple[str, ...] | None, counters: StreamCounters) -> None:
        self.splits, self.counters = splits, counters

    def __call__(self, src: Iterable[dict]) -> Iterator[dict]:
        for sample in src:
            if self.splits is not None:
                try:
                    split = split_key(sample["__key__"])[2]
                except (KeyError, ValueError):
                    split = None
                if split not in self.splits:
                    self.counters.filtered += 1
                    continue
            yield sample


def decode_depth_sample(sample: Mapping[str, Any]) -> dict:
    """Raw webdataset sample → ``{"__key__", "__url__", "depth", "meta"}`` (exact ``.npy`` decode)."""
    key = sample.get("__key__")
    if DEPTH_EXT not in sample or JSON_EXT not in sample:
        raise ValueError(f"sample {key} in {sample.get('__url__')} lacks {DEPTH_EXT} or {JSON_EXT}")
    depth = decode_npy(sample[DEPTH_EXT], f"{sample.get('__url__')}:{key}")
    meta = json.loads(sample[JSON_EXT])
    return {"__key__": key, "__url__": sample.get("__url__"), "depth": depth, "meta": meta}


class _Normalize:
    def __init__(self, norm: DepthNormConfig | None, min_sample_valid: float, counters: StreamCounters,
                 handler: Callable[[Exception], bool], keep_raw: bool) -> None:
        self.norm, self.min_sample_valid, self.counters = norm, min_sample_valid, counters
        self.handler, self.keep_raw = handler, keep_raw

    def __call__(self, src: Iterable[dict]) -> Iterator[dict]:
        for sample in src:
            if self.norm is None:
                sample["n_skipped"] = self.counters.skipped()
                yield sample
                continue
            try:
                x, valid, degenerate = normalize_sample(sample["depth"], sample["meta"], self.norm)
            except Exception as exn:  # a malformed map must not stop the stream
                if self.handler(exn):
                    continue
                raise
            if degenerate:
                self.counters.degenerate += 1
                continue
            if valid.mean() < self.min_sample_valid:
                self.counters.low_valid += 1
                continue
            out = {"__key__": sample["__key__"], "__url__": sample["__url__"], "meta": sample["meta"],
                   "x": x, "valid": valid, "n_skipped": self.counters.skipped()}
            if self.keep_raw:
                out["depth"] = sample["depth"]
            yield out


class _WeightedMix(IterableDataset):
    """Sample-level mixing of per-source streams with fixed probabilities (seeded per rank/worker)."""

    def __init__(self, streams: list, probs: np.ndarray, seed: int, state: _EpochState) -> None:
        self.streams, self.probs, self.seed, self.state = streams, probs, seed, state

    def __iter__(self) -> Iterator[dict]:
        rank, worker = _worker_ids()
        rng = random.Random(_mix_seed(self.seed, self.state.epoch, rank, worker, 2))
        its = [iter(s) for s in self.streams]
        cum = np.cumsum(self.probs)
        while True:
            k = min(int(np.searchsorted(cum, rng.random(), side="right")), len(its) - 1)
            try:
                yield next(its[k])
            except StopIteration:
                return


class DepthStream(wds.DataPipeline):
    """The pipeline returned by :func:`make_stream`, with its counters and epoch."""

    counters: StreamCounters
    state: _EpochState

    def set_epoch(self, epoch: int) -> None:
        self.state.epoch = int(epoch)


def shard_source(url: str) -> str:
    """Source id from a shard file name ``<source>-NNNNNN.tar``."""
    m = _SHARD_RE.match(Path(url).name)
    if not m:
        raise ValueError(f"shard name {url!r} is not <source>-NNNNNN.tar")
    return m.group("source")


def list_shard_urls(dirs: Sequence[str | Path], sources: Sequence[str] | None = None,
                    preset: str | None = None) -> list[str]:
    """Paths of the complete shards of the selected sources, from the manifests (sorted)."""
    table_sources = _resolve_sources(sources, preset)
    urls: list[str] = []
    found: set[str] = set()
    for d in dirs:
        d = Path(d).expanduser().resolve()
        manifest = load_manifest(d, required=True)
        for sid, entry in manifest.get("sources", {}).items():
            if table_sources is not None and sid not in table_sources:
                continue
            found.add(sid)
            urls.extend(str(d / r["name"]) for r in entry.get("shards", []))
    if table_sources is not None:
        missing = sorted(set(table_sources) - found)
        if missing:
            raise SampleTableError(f"unknown source(s) {missing} in shard folders {[str(d) for d in dirs]}")
    return sorted(urls)


def make_stream(
    urls: str | Sequence[str],
    *,
    seed: int = 0,
    epoch: int = 0,
    resampled: bool = True,
    shuffle_buffer: int = 1000,
    shuffle_initial: int = 100,
    source_weights: Mapping[str, float] | None = None,
    splits: Sequence[str] | None = None,
    norm: DepthNormConfig | Mapping | None = None,
    normalize: bool = True,
    min_sample_valid: float = 0.01,
    epoch_length: int | None = None,
    handler: Callable[[Exception], bool] | None = None,
    keep_raw: bool = False,
) -> DepthStream:
    """Webdataset streaming pipeline over depth shards.

    Stages: seeded shard sequence (``resampled``: infinite draws with replacement; otherwise one
    shuffled pass per epoch) → ``wds.split_by_node`` → ``wds.split_by_worker`` (both explicit) →
    tar expansion → split filter → shuffle buffer → ``.npy`` decode → nearness normalisation with
    ``norm`` (default :class:`DepthNormConfig`; ``normalize=False`` yields raw depth) dropping degenerate maps and maps with valid fraction below
    ``min_sample_valid``. With ``source_weights`` ({source: weight}; needs ``resampled``) one
    such stream per source is mixed at sample level. Every error is counted, then passed to
    ``handler`` (default ``webdataset.warn_and_continue``; return True to continue). Yields dicts ``{"__key__", "__url__", "meta", "x", "valid",
    "n_skipped"}`` (``"depth"`` too with ``keep_raw`` or ``norm=None``).

    Deterministic given (seed, rank, worker, epoch): the shard sequence depends on (seed, epoch)
    only and is split by rank and worker; buffers and mixing are seeded by (seed, epoch, rank,
    worker). ``pipeline.set_epoch(e)`` changes the epoch (DataLoader workers see it when they are
    (re)started, i.e. without ``persistent_workers``). ``pipeline.counters`` holds the counts.
    """
    if isinstance(urls, (str, Path)):
        url_list = wds.shardlists.expand_urls(str(urls))
    else:
        url_list = [str(u) for u in urls]
    if not url_list:
        raise ValueError("make_stream: no shard URLs")
    url_list = sorted(dict.fromkeys(url_list))
    split_sel = _check_splits(splits)
    counters = StreamCounters()
    err_handler = CountingHandler(counters, base=handler)
    state = _EpochState(epoch)
    if norm is None:
        norm = DepthNormConfig()
    elif isinstance(norm, Mapping):
        norm = DepthNormConfig.from_dict(dict(norm))

    def per_source_stream(source_urls: list[str], salt: int) -> Any:
        return wds.DataPipeline(
            _ShardSequence(source_urls, seed, state, salt, resampled),
            wds.split_by_node,
            wds.split_by_worker,
            wds.tarfile_to_samples(handler=err_handler),
            _SplitFilter(split_sel, counters),
            _Shuffle(shuffle_buffer, shuffle_initial, seed, state, salt),
        )

    if source_weights is None:
        head = per_source_stream(url_list, 0)
    else:
        if not resampled:
            raise ValueError("source_weights need resampled=True (a finite source would end the mix early)")
        by_source: dict[str, list[str]] = {}
        for u in url_list:
            by_source.setdefault(shard_source(u), []).append(u)
        unknown = sorted(set(source_weights) - set(by_source))
        if unknown:
            raise ValueError(f"source_weights name source(s) {unknown} without shards; have {sorted(by_source)}")
        names = [s for s in sorted(by_source) if float(source_weights.get(s, 0.0)) > 0]
        if not names:
            raise ValueError("every source weight is 0")
        missing = sorted(set(by_source) - set(source_weights))
        if missing:
            warnings.warn(f"sources {missing} have shards but no weight: they are not sampled", stacklevel=2)
        w = np.array([float(source_weights[s]) for s in names])
        streams = [per_source_stream(by_source[s], i + 1) for i, s in enumerate(names)]
        head = _WeightedMix(streams, w / w.sum(), seed, state)

    pipeline = DepthStream(
        head,
        wds.map(decode_depth_sample, handler=err_handler),
        _Normalize(norm if normalize else None, min_sample_valid, counters, err_handler, keep_raw),
    )
    pipeline.counters = counters
    pipeline.state = state
    if epoch_length is not None:
        pipeline = pipeline.with_epoch(int(epoch_length))
    return pipeline


__all__ = ["KNOWN_SOURCES", "CountingHandler", "DepthStream", "SampleTable", "SampleTableError", "ShardInfo", "StreamCounters",
           "StreamOrder", "decode_depth_sample", "list_shard_urls", "make_stream", "normalize_sample",
           "shard_source"]
