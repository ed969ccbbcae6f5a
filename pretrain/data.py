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

import hashlib
import json
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
from shared.depth import DepthNormConfig
from shared.shards import (
    DEPTH_EXT,
    JSON_EXT,
    SampleTableError,
    ShardInfo,
    check_splits,
    decode_npy,
    load_manifest,
    normalize_sample,
    source_list,
    split_key,
)
from shared.shards import SampleTable as ShardTable

KNOWN_SOURCES = ("mvtec3d", "eyecandies", "realiad_d3", "folder", "synthetic",
                 "mvtec_ad", "mvtec_loco", "mvtec_ad2", "visa")
_SHARD_RE = re.compile(r"^(?P<source>[a-z0-9_]+)-\d{6,}\.tar$")

def _resolve_sources(sources: Sequence[str] | None, preset: str | None) -> list[str] | None:
    if preset is not None:
        wanted = preset_sources(preset)
        if sources is not None and sorted(set(sources)) != sorted(wanted):
            raise SampleTableError(f"preset {preset!r} means sources {wanted}, but sources={list(sources)} "
                                   "was also given; pass one of them")
        return wanted
    return source_list(sources)


class SampleTable(ShardTable):
    """:class:`shared.shards.SampleTable` that also takes a paper data preset (``A``/``B``/``C``,
    :mod:`data_prep.presets`) in place of the source list."""

    @classmethod
    def from_shard_dirs(cls, dirs: list[str | Path], sources: list[str] | None = None,
                        splits: list[str] | None = None, preset: str | None = None,
                        verify: bool = False) -> SampleTable:
        return super().from_shard_dirs(dirs, _resolve_sources(sources, preset), splits, verify)


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
    split_sel = check_splits(splits)
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
