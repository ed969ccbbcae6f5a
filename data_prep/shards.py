"""Webdataset depth shards: keys, sample encoding, the resumable shard writer, indexes and manifest.

Schema: ``../shared/spec/data_formats.md`` §8 (one sample = one depth map, members
``<key>.depth.npy`` + ``<key>.json``), §12 (resumable, ``--num-parts/--part``, merged manifest).

Every converter (``data_prep/convert.py``, and ``data_prep/pseudo_depth.py``) goes through
:func:`run_conversion`, which

1. enumerates the source (sorted), builds the keys and asserts they are unique,
2. shuffles the item list with a fixed seed and takes this part's contiguous slice,
3. resumes after the last complete shard of this part (finished shards are never rewritten),
4. maps items → encoded samples (in-process, a ``multiprocessing`` pool, or a caller-supplied
   ``process_many`` generator such as a batched GPU model) and feeds them **in order** to
   :class:`ShardSequenceWriter`, which writes ``<source>-%06d.tar`` to a temp name and renames it
   when complete, then writes the ``.idx.json`` sidecar,
5. merges the part into ``manifest.json`` under a file lock, atomically.

The tar files are written with :mod:`tarfile` directly, following webdataset's ``TarWriter``
conventions (member ``<key>.<ext>``, members of a sample in sorted extension order, fixed
owner/mode/mtime): ``TarWriter`` writes through a buffered stream, which hides the member offsets
the index needs and the point where the file is complete (for the temp-then-rename step). The
result is an ordinary webdataset shard (``wds.WebDataset`` reads it; tested).

Byte reproducibility: the sample order, the shard boundaries (a deterministic function of the
encoded sample sizes), the tar headers (constant mtime/owner/mode, PAX format, sorted members) and
the JSON encoding (sorted keys) depend only on the source files and the parameters, so an
interrupted-then-resumed conversion gives the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import io
import json
import math
import multiprocessing
import os
import re
import sys
import tarfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from shared.depth import depth_stats, downsample_depth, normalization_range, rescale_intrinsics
from shared.io import atomic_open, atomic_write_json
from shared.shards import (  # the read side of the format, shared by every reader
    CANONICAL_SPLITS,
    DEPTH_EXT,
    INDEX_FORMAT,
    INDEX_FORMAT_VERSION,
    INDEX_SUFFIX,
    JSON_EXT,
    MANIFEST_NAME,
    decode_npy,
    file_sha256,
    load_manifest,
    load_shard_index,
    manifest_fingerprint,
    read_json_or_none,
    scan_shard_index,
    split_key,
)

CONVERTER_VERSION = "1.1"  # 1.1: json gains norm_range
PART_STRIDE = 100_000  # part p numbers its shards from p * PART_STRIDE (spec §12)
TAR_MTIME = 946_684_800  # 2000-01-01T00:00:00Z: constant so that shards are byte-reproducible
TAR_OWNER = "dinodepth"
TAR_MODE = 0o444
DEFAULT_SPLITS = ("train", "validation")
LABELS = ("normal", "anomalous", None)
_KEY_COMPONENT_RE = re.compile(r"[^A-Za-z0-9_-]")
_SOURCE_ID_RE = re.compile(r"^[a-z0-9_]+$")
_MAX_NOTES = 200  # notes/skips beyond this are counted, not listed, in the manifest report


class ConversionError(RuntimeError):
    """A conversion that cannot proceed (bad root, key collision, output inside input, ...)."""


class SkipSample(Exception):
    """Raised by a reader for an input that is unreadable or fails a format check.

    The sample is skipped, counted and listed in the manifest with ``reason``.
    """


# ------------------------------------------------------------------------------------------------
# keys


def sanitize_component(text: str) -> str:
    """Key component: every character outside ``[A-Za-z0-9_-]`` becomes ``_`` (spec §8).

    This also removes dots, which webdataset would otherwise treat as the start of the extension.
    """
    text = str(text)
    if not text:
        raise ValueError("empty key component")
    return _KEY_COMPONENT_RE.sub("_", text)


def make_key(source: str, category: str, split: str, stem: str) -> str:
    """``<source>/<category>/<split>/<stem>`` with each component sanitised."""
    return "/".join(sanitize_component(c) for c in (source, category, split, stem))


def check_unique_keys(keys: Sequence[str], origins: Sequence[str] | None = None) -> None:
    """Raise :class:`ConversionError` naming the colliding inputs if two samples share a key."""
    seen: dict[str, int] = {}
    collisions: list[str] = []
    for i, key in enumerate(keys):
        j = seen.setdefault(key, i)
        if j != i:
            a = origins[j] if origins else j
            b = origins[i] if origins else i
            collisions.append(f"{key!r} <- {a} and {b}")
    if collisions:
        shown = "; ".join(collisions[:10])
        more = f" (and {len(collisions) - 10} more)" if len(collisions) > 10 else ""
        raise ConversionError(
            f"{len(collisions)} sample key collision(s) after sanitising (characters outside "
            f"[A-Za-z0-9_-] become '_'): {shown}{more}. Keys must be unique; rename the inputs."
        )


def check_source_id(source_id: str) -> str:
    if not _SOURCE_ID_RE.match(source_id or ""):
        raise ValueError(f"invalid source id {source_id!r}: use lower-case letters, digits and '_'")
    return source_id


def parse_splits(splits: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """``"train,validation"`` / list → validated tuple; ``"all"`` or None → None (no filter)."""
    if splits is None:
        return None
    if isinstance(splits, str):
        items = [s.strip() for s in splits.split(",") if s.strip()]
    else:
        items = [str(s).strip() for s in splits]
    if not items:
        raise ValueError("empty split selection; use e.g. 'train,validation' or 'all'")
    if "all" in items:
        if len(items) > 1:
            raise ValueError(f"split selection {items}: 'all' cannot be combined with other names")
        return None
    unknown = [s for s in items if s not in CANONICAL_SPLITS]
    if unknown:
        raise ValueError(f"unknown split name(s) {unknown}; canonical names are {list(CANONICAL_SPLITS)} "
                         "or 'all'")
    return tuple(sorted(set(items), key=CANONICAL_SPLITS.index))


def shard_name(source: str, number: int) -> str:
    return f"{source}-{number:06d}.tar"


def _shard_number(source: str, name: str) -> int | None:
    m = re.fullmatch(re.escape(source) + r"-(\d{6,})\.tar", name)
    return int(m.group(1)) if m else None


# ------------------------------------------------------------------------------------------------
# items, samples and outcomes


@dataclass
class SourceItem:
    """One input depth map as enumerated by a reader (cheap: no pixel data).

    ``ref`` is the reader's own locator (absolute path, (zip, member), ...); it must be picklable.
    ``label`` may be None at enumeration time and filled in by the reader's ``load`` (Eyecandies
    reads it from a per-sample YAML).
    """

    category: str
    split: str
    split_orig: str
    stem: str
    rel_path: str
    label: str | None = None
    defect_type: str | None = None
    ref: Any = None
    size: int = -1  # source file size in bytes (part of the plan hash: a changed input invalidates it)
    extra: dict = field(default_factory=dict)

    def key(self, source: str) -> str:
        return make_key(source, self.category, self.split, self.stem)


@dataclass
class LoadedDepth:
    """What a reader's ``load`` returns: the map at its original resolution, NaN = invalid."""

    depth: np.ndarray
    bg_removed: str = "none"
    camera: dict | None = None  # {"K": 3x3 at the original resolution, "T_c2w": 4x4} when known
    label: str | None = None  # overrides SourceItem.label when not None
    defect_type: str | None = None
    label_known: bool = False  # True: ``label`` (possibly None) is authoritative
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class SampleJob:
    """Everything a worker needs besides the item: fixed per conversion, recorded in every sample."""

    source: str
    kind: str
    unit: str | None
    max_side: int
    downsample: str
    valid_frac_min: float
    params_hash: str
    converter_version: str = CONVERTER_VERSION


@dataclass
class EncodedSample:
    """A sample ready for the tar: member bytes plus a small summary for counts and reports."""

    index: int
    key: str
    members: dict[str, bytes]
    summary: dict


@dataclass
class SkippedItem:
    index: int
    rel_path: str
    reason: str


Outcome = EncodedSample | SkippedItem


def encode_npy(depth: np.ndarray) -> bytes:
    """Exact float32 ``.npy`` bytes (``np.save``; never an image encoder, which would quantise)."""
    arr = np.ascontiguousarray(depth, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"depth map must be 2-D, got shape {arr.shape}")
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def encode_json(obj: Mapping) -> bytes:
    """Deterministic compact JSON (sorted keys; NaN/inf refused so the output is valid JSON)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")


def depth_summary(depth: np.ndarray) -> dict:
    """Per-map z summary at the original resolution, aggregated into per-split report statistics."""
    finite = depth[np.isfinite(depth)]
    n = int(depth.size)
    if finite.size == 0:
        return {"n": n, "n_valid": 0}
    p1, p50, p99 = np.percentile(finite, (1.0, 50.0, 99.0))
    return {"n": n, "n_valid": int(finite.size), "min": float(finite.min()), "p1": float(p1),
            "p50": float(p50), "p99": float(p99), "max": float(finite.max())}


def make_sample(
    job: SampleJob,
    index: int,
    item: SourceItem,
    depth: np.ndarray,
    *,
    bg_removed: str = "none",
    camera: dict | None = None,
    label: str | None = None,
    label_known: bool = False,
    defect_type: str | None = None,
    orig_hw: tuple[int, int] | None = None,
    resize_method: str | None = None,
    pseudo: dict | None = None,
    notes: Sequence[str] = (),
) -> EncodedSample:
    """Downsample (spec §9), describe (§8 json fields) and encode one depth map.

    ``depth`` is float32 (H, W) NaN-invalid at its original resolution. Pseudo-depth passes its map
    at the model's processed resolution with ``orig_hw`` = the image size and
    ``resize_method="da_processed"``; it is then only further reduced if still above ``max_side``.
    Raises :class:`SkipSample` for maps without a single valid pixel.
    """
    depth = np.asarray(depth)
    if depth.ndim != 2:
        raise SkipSample(f"depth map is not 2-D (shape {depth.shape})")
    depth = depth.astype(np.float32, copy=False)
    if not np.isfinite(depth).any():
        raise SkipSample("no valid depth pixel (every value is invalid)")
    src_hw = depth.shape
    zsum = depth_summary(depth)
    stored = downsample_depth(depth, job.max_side, job.downsample, job.valid_frac_min)
    if not np.isfinite(stored).any():
        raise SkipSample(f"no valid depth pixel left after {job.downsample} downsampling to {stored.shape}")
    oh, ow = (int(orig_hw[0]), int(orig_hw[1])) if orig_hw is not None else (int(src_hw[0]), int(src_hw[1]))
    sh, sw = int(stored.shape[0]), int(stored.shape[1])
    downsampled = stored.shape != src_hw
    method = resize_method if resize_method else (job.downsample if downsampled else "none")
    if resize_method and downsampled:
        method = f"{resize_method}+{job.downsample}"
    applied = (sh, sw) != (oh, ow)
    resize = {"applied": bool(applied), "method": method if applied else "none",
              "scale": float(max(sh, sw) / max(oh, ow))}
    if camera is not None:
        camera = dict(camera)
        if camera.get("K") is not None and (sh, sw) != (oh, ow):
            camera["K"] = rescale_intrinsics(np.asarray(camera["K"], dtype=np.float64), sw / ow, sh / oh)
        camera = {k: np.asarray(v, dtype=np.float64).tolist() for k, v in camera.items() if v is not None}
    final_label = label if (label_known or label is not None) else item.label
    final_defect = defect_type if (label_known or defect_type is not None) else item.defect_type
    if final_label not in LABELS:
        raise ValueError(f"invalid label {final_label!r} for {item.rel_path}")
    key = item.key(job.source)
    n_valid = int(np.isfinite(stored).sum())
    meta: dict[str, Any] = {
        "key": key,
        "source": job.source,
        "category": item.category,
        "split": item.split,
        "split_orig": item.split_orig,
        "label": final_label,
        "defect_type": final_defect,
        "rel_path": item.rel_path,
        "kind": job.kind,
        "unit": job.unit,
        "orig_hw": [oh, ow],
        "stored_hw": [sh, sw],
        "resize": resize,
        "invalid": "nan",
        "valid_frac": n_valid / float(stored.size),
        "stats": depth_stats(stored),
        # the default nearness range (pretraining's normalisation), so loaders skip the percentile search
        "norm_range": normalization_range(stored, job.kind),
        "bg_removed": bg_removed,
        "converter": {"version": job.converter_version, "params_hash": job.params_hash},
    }
    if camera:
        meta["camera"] = camera
    if pseudo is not None:
        meta["pseudo"] = dict(pseudo)
    members = {DEPTH_EXT: encode_npy(stored), JSON_EXT: encode_json(meta)}
    summary = {"category": item.category, "split": item.split, "label": final_label, "zsum": zsum,
               "stored_hw": [sh, sw]}
    if notes:
        summary["notes"] = list(notes)
    return EncodedSample(index=index, key=key, members=members, summary=summary)


# ------------------------------------------------------------------------------------------------
# sources


class DepthSource:
    """Base class of the readers in :mod:`data_prep.sources` (and of pseudo-depth sources).

    Subclasses set ``source_id``, ``kind``, ``unit`` and implement :meth:`enumerate` (sorted, cheap)
    and :meth:`load`. Readers are pure: they never write to their roots. Instances are pickled to
    worker processes, so they must hold only picklable state (open handles go in ``_cache``,
    which is dropped when pickling).
    """

    source_id: str = ""
    kind: str = "metric_z"
    unit: str | None = "unknown"
    expected_layout: str = ""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).expanduser().resolve()
        self._cache: dict = {}
        # Folders of the layout without a single depth file (an empty category, a failed extraction),
        # relative to the root: found by enumerate(), reported as a warning (exit status unchanged).
        self.empty_folders: list[str] = []

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_cache"] = {}
        return state

    def roots(self) -> list[Path]:
        """Input folders; the converter refuses an output folder inside any of them."""
        return [self.root]

    def params(self) -> dict:
        """Reader-specific conversion parameters recorded in the manifest (and hashed)."""
        return {}

    def enumerate(self) -> list[SourceItem]:
        raise NotImplementedError

    def load(self, item: SourceItem) -> LoadedDepth:
        raise NotImplementedError

    def report(self) -> dict:
        """Facts observed while enumerating (layout found, fields seen, warnings)."""
        return {}

    def range_checks(self, z_stats: dict) -> list[dict]:
        """Value-range checks on the per-split statistics: [{name, ok, fatal, detail}]."""
        return []

    def close(self) -> None:
        for handle in self._cache.values():
            with contextlib.suppress(Exception):
                handle.close()
        self._cache.clear()

    def require_root(self) -> None:
        if not self.root.is_dir():
            raise ConversionError(f"{self.source_id}: dataset root {self.root} is not a directory. "
                                  f"Expected layout: {self.expected_layout}")


def process_item(source: DepthSource, job: SampleJob, index: int, item: SourceItem) -> Outcome:
    """Load + downsample + encode one item; unreadable or invalid inputs become :class:`SkippedItem`."""
    try:
        if item.extra.get("skip_reason"):
            raise SkipSample(item.extra["skip_reason"])
        loaded = source.load(item)
        return make_sample(job, index, item, loaded.depth, bg_removed=loaded.bg_removed,
                           camera=loaded.camera, label=loaded.label, label_known=loaded.label_known,
                           defect_type=loaded.defect_type, notes=loaded.notes)
    except SkipSample as exc:
        return SkippedItem(index, item.rel_path, str(exc))
    except (KeyboardInterrupt, SystemExit, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001  (corrupt files raise library-specific errors of every kind)
        return SkippedItem(index, item.rel_path, f"unreadable: {type(exc).__name__}: {exc}")


_WORKER_STATE: dict = {}


def _worker_init(source: DepthSource, job: SampleJob) -> None:
    _WORKER_STATE["source"] = source
    _WORKER_STATE["job"] = job


def _worker_process(task: tuple[int, SourceItem]) -> Outcome:
    index, item = task
    return process_item(_WORKER_STATE["source"], _WORKER_STATE["job"], index, item)


def iter_outcomes(source: DepthSource, job: SampleJob, tasks: Iterable[tuple[int, SourceItem]],
                  workers: int = 0) -> Iterator[Outcome]:
    """Outcomes in task order; ``workers > 0`` uses a spawn-context process pool."""
    if workers <= 0:
        for index, item in tasks:
            yield process_item(source, job, index, item)
        return
    # spawn: no inherited threads/locks (fork after numpy/BLAS threads can deadlock); the workers
    # import data_prep from the repository like the parent did.
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, initializer=_worker_init, initargs=(source, job)) as pool:
        yield from pool.imap(_worker_process, tasks, chunksize=1)


# ------------------------------------------------------------------------------------------------
# tar output


def _padded(n: int) -> int:
    return ((n + tarfile.BLOCKSIZE - 1) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def member_tar_bytes(name: str, size: int) -> int:
    """Bytes a member takes in a PAX tar (header + padded data; long names add a pax header)."""
    extra = 0
    if len(name.encode("utf-8")) > tarfile.LENGTH_NAME:
        # pax extended header block + its padded record ("NN path=<name>\n")
        record = len(name) + 16
        extra = tarfile.BLOCKSIZE + _padded(record)
    return extra + tarfile.BLOCKSIZE + _padded(size)


def sample_tar_bytes(key: str, members: Mapping[str, bytes]) -> int:
    return sum(member_tar_bytes(f"{key}.{ext}", len(data)) for ext, data in members.items())


class _HashingWriter:
    """File wrapper that hashes and counts what tarfile writes (tarfile 'w' mode never seeks)."""

    def __init__(self, handle) -> None:
        self.handle = handle
        self.sha = hashlib.sha256()
        self.count = 0

    def write(self, data) -> int:
        self.handle.write(data)
        self.sha.update(data)
        self.count += len(data)
        return len(data)

    def tell(self) -> int:
        return self.count

    def flush(self) -> None:
        self.handle.flush()


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size = size
    ti.mtime = TAR_MTIME
    ti.mode = TAR_MODE
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = TAR_OWNER
    ti.type = tarfile.REGTYPE
    return ti


class _OpenShard:
    """One shard being written to its temp file."""

    def __init__(self, path: Path, start: int) -> None:
        self.path = path
        self.start = start
        self._cm = atomic_open(path, "wb")
        self._fh = self._cm.__enter__()
        self._hw = _HashingWriter(self._fh)
        # closed in finish()/abort(): the archive stays open across add() calls
        self._tar = tarfile.open(fileobj=self._hw, mode="w", format=tarfile.PAX_FORMAT)  # noqa: SIM115
        self.samples: list[dict] = []
        self.skipped: list[dict] = []

    @property
    def offset(self) -> int:
        return self._tar.offset

    def add(self, sample: EncodedSample) -> None:
        entry = {"key": sample.key, "offset": self._tar.offset, "members": {}}
        for ext in sorted(sample.members):  # same member order as webdataset's TarWriter
            data = sample.members[ext]
            self._tar.addfile(_tarinfo(f"{sample.key}.{ext}", len(data)), io.BytesIO(data))
            entry["members"][ext] = [self._tar.offset - _padded(len(data)), len(data)]
        entry.update(sample.summary)
        self.samples.append(entry)

    def finish(self) -> tuple[int, str]:
        self._tar.close()  # end-of-archive blocks + record padding, written through the hasher
        self._cm.__exit__(None, None, None)  # fsync + rename onto the final name
        publish_mode(self.path)
        return self._hw.count, self._hw.sha.hexdigest()

    def abort(self, exc: BaseException | None = None) -> None:
        with contextlib.suppress(Exception):
            self._cm.__exit__(type(exc) if exc else RuntimeError, exc or RuntimeError("aborted"), None)


class ShardSequenceWriter:
    """Writes one source part as a sequence of shards, resumably.

    Items are fed in plan order by :meth:`add` (samples and skips, with their plan index). A shard
    is closed when the next sample would exceed ``max_bytes`` or ``max_count``; it is written to a
    temp file and renamed when complete, and its ``.idx.json`` sidecar (member offsets, the plan
    range it covers, parameter and plan hashes) is written after the rename. :meth:`resume` finds
    the complete prefix of this part's shards from a previous run and returns the plan index to
    continue from; incomplete or stale later files are removed.
    """

    def __init__(self, out_dir: str | os.PathLike, source: str, *, part: int = 0, params_hash: str,
                 plan_hash: str, n_items: int, max_bytes: float = 1e9, max_count: int | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.source = check_source_id(source)
        self.part = int(part)
        self.params_hash = params_hash
        self.plan_hash = plan_hash
        self.n_items = int(n_items)
        self.max_bytes = float(max_bytes)
        self.max_count = int(max_count) if max_count else None
        if self.max_bytes <= 0 or (self.max_count is not None and self.max_count <= 0):
            raise ValueError("shard limits must be positive")
        self.first_number = self.part * PART_STRIDE
        self.records: list[dict] = []  # finished shards: name, samples, bytes, sha256
        self.skipped: list[dict] = []
        self.resumed_samples = 0
        self.written_samples = 0
        self.done = False
        self._next_number = self.first_number
        self._range_start = 0
        self._pending_skipped: list[dict] = []
        self._open: _OpenShard | None = None
        self.out_dir.mkdir(parents=True, exist_ok=True)

    # -- resume -----------------------------------------------------------------------------------
    def part_files(self) -> list[Path]:
        """Shard, sidecar and temp files that belong to this part (any number in its range)."""
        out = []
        pat = re.compile(r"^\.?" + re.escape(self.source) + r"-(\d{6,})\.tar(" + re.escape(INDEX_SUFFIX)
                         + r")?(\..*\.tmp)?$")
        for p in self.out_dir.iterdir():
            m = pat.match(p.name)
            if m and self.first_number <= int(m.group(1)) < self.first_number + PART_STRIDE:
                out.append(p)
        return sorted(out)

    def resume(self) -> int:
        """Adopt complete shards of a previous run; return the plan index to continue from."""
        start = 0
        number = self.first_number
        while True:
            name = shard_name(self.source, number)
            idx = read_json_or_none(self.out_dir / (name + INDEX_SUFFIX))
            tar_path = self.out_dir / name
            ok = (idx is not None and tar_path.is_file()
                  and idx.get("format") == INDEX_FORMAT
                  and idx.get("params_hash") == self.params_hash
                  and idx.get("plan_hash") == self.plan_hash
                  and idx.get("item_range", [None])[0] == start
                  and idx.get("bytes") == tar_path.stat().st_size)
            if not ok:
                break
            self.records.append(_shard_record(idx))
            self.skipped.extend(idx.get("skipped", []))
            self.resumed_samples += len(idx.get("samples", []))
            start = int(idx["item_range"][1])
            number += 1
            if idx.get("final"):
                self.done = True
                break
        keep = {self.out_dir / r["name"] for r in self.records}
        keep |= {self.out_dir / (r["name"] + INDEX_SUFFIX) for r in self.records}
        for p in self.part_files():
            if p not in keep:  # temp files of a killed run, shards after the complete prefix
                p.unlink()
        self._next_number = number
        self._range_start = start
        return start

    # -- writing ----------------------------------------------------------------------------------
    def add(self, outcome: Outcome) -> None:
        if isinstance(outcome, SkippedItem):
            self._pending_skipped.append({"rel_path": outcome.rel_path, "reason": outcome.reason,
                                          "item": outcome.index})
            return
        size = sample_tar_bytes(outcome.key, outcome.members)
        if self._open is not None:
            n = len(self._open.samples)
            full_count = self.max_count is not None and n >= self.max_count
            # final size: 2 zero blocks close the archive, then padding to a whole tar record; a
            # single over-sized sample still gets its own shard
            end = self._open.offset + size + 2 * tarfile.BLOCKSIZE
            full_bytes = -(-end // tarfile.RECORDSIZE) * tarfile.RECORDSIZE > self.max_bytes
            if n > 0 and (full_count or full_bytes):
                self._finish(end=outcome.index, final=False)
        if self._open is None:
            path = self.out_dir / shard_name(self.source, self._next_number)
            if self._next_number >= self.first_number + PART_STRIDE:
                raise ConversionError(f"part {self.part} needs more than {PART_STRIDE} shards; "
                                      "raise --shard-max-bytes or use more parts")
            self._open = _OpenShard(path, self._range_start)
        self._open.add(outcome)
        self.written_samples += 1

    def _finish(self, end: int, final: bool) -> None:
        shard = self._open
        assert shard is not None
        shard.skipped.extend(self._pending_skipped)
        self._pending_skipped = []
        nbytes, sha = shard.finish()
        self._open = None
        index = {
            "format": INDEX_FORMAT, "format_version": INDEX_FORMAT_VERSION,
            "shard": shard.path.name, "source": self.source, "part": self.part,
            "bytes": nbytes, "sha256": sha, "params_hash": self.params_hash, "plan_hash": self.plan_hash,
            "item_range": [shard.start, int(end)], "final": bool(final),
            "samples": shard.samples, "skipped": shard.skipped,
        }
        _write_json_published(shard.path.with_name(shard.path.name + INDEX_SUFFIX), index)
        self.records.append(_shard_record(index))
        self.skipped.extend(shard.skipped)
        self._next_number += 1
        self._range_start = int(end)

    def close(self) -> None:
        """Finish the last shard (marked ``final``); trailing skips go into the last sidecar."""
        if self._open is not None:
            self._finish(end=self.n_items, final=True)
        elif self._pending_skipped or not self.done:
            if self.records:
                # The previous run closed its last shard on a later sample that now fails to load
                # (inputs changed in between): extend that shard's sidecar to the end of the plan.
                last = self.out_dir / (self.records[-1]["name"] + INDEX_SUFFIX)
                idx = json.loads(last.read_text())
                idx["skipped"].extend(self._pending_skipped)
                idx["item_range"][1] = self.n_items
                idx["final"] = True
                _write_json_published(last, idx)
            self.skipped.extend(self._pending_skipped)
            self._pending_skipped = []
        self.done = True

    def abort(self, exc: BaseException | None = None) -> None:
        """Drop the shard being written (its temp file is removed; finished shards stay)."""
        if self._open is not None:
            self._open.abort(exc)
            self._open = None


def publish_mode(path: Path) -> None:
    """Give a finished output the usual umask-based permissions (temp files are created 0600, which
    would hide shards from the other users of a shared dataset folder)."""
    umask = os.umask(0)
    os.umask(umask)
    with contextlib.suppress(OSError):
        os.chmod(path, 0o666 & ~umask)


def _write_json_published(path: Path, obj: Any) -> None:
    atomic_write_json(path, obj, indent=None)
    publish_mode(path)


def _shard_record(idx: Mapping) -> dict:
    return {"name": idx["shard"], "samples": len(idx.get("samples", [])), "bytes": int(idx["bytes"]),
            "sha256": idx["sha256"]}


# ------------------------------------------------------------------------------------------------
# per-shard index


# ------------------------------------------------------------------------------------------------
# manifest


@contextlib.contextmanager
def manifest_lock(out_dir: str | os.PathLike) -> Iterator[None]:
    """Exclusive lock for read-modify-write of the manifest (parallel ``--part`` jobs)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".manifest.lock", "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def write_manifest(out_dir: str | os.PathLike, manifest: dict) -> None:
    manifest["fingerprint"] = manifest_fingerprint(manifest.get("sources", {}))
    atomic_write_json(Path(out_dir) / MANIFEST_NAME, manifest)
    publish_mode(Path(out_dir) / MANIFEST_NAME)


def delete_source_shards(out_dir: str | os.PathLike, source: str) -> int:
    """Remove every shard, sidecar and temp file of ``source`` in ``out_dir``; returns the count."""
    pat = re.compile(r"^\.?" + re.escape(source) + r"-\d{6,}\.tar(" + re.escape(INDEX_SUFFIX) + r")?(\..*\.tmp)?$")
    n = 0
    for p in Path(out_dir).iterdir():
        if pat.match(p.name):
            p.unlink()
            n += 1
    return n


def params_hash(params: Mapping) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _label_name(label: str | None) -> str:
    return "null" if label is None else label


def aggregate_source(out_dir: Path, entry: dict) -> dict:
    """Recompute counts, shard list, skipped list and split statistics of a source entry from the
    sidecar indexes of its completed parts."""
    shards: list[dict] = []
    skipped: list[dict] = []
    counts: dict = {"total": 0, "categories": {}}
    per_split: dict[str, dict] = {}
    notes: list[dict] = []
    n_notes = 0
    for part_id in sorted(entry.get("parts", {}), key=int):
        part = entry["parts"][part_id]
        skipped.extend({"rel_path": s["rel_path"], "reason": s["reason"]} for s in part.get("skipped", []))
        for name in part.get("shards", []):
            idx = json.loads((out_dir / (name + INDEX_SUFFIX)).read_text())
            shards.append(_shard_record(idx))
            for s in idx["samples"]:
                counts["total"] += 1
                cat = counts["categories"].setdefault(s["category"], {})
                spl = cat.setdefault(s["split"], {})
                lab = _label_name(s.get("label"))
                spl[lab] = spl.get(lab, 0) + 1
                acc = per_split.setdefault(s["split"], {"samples": 0, "n": 0, "n_valid": 0, "min": math.inf,
                                                        "max": -math.inf, "p1": [], "p50": [], "p99": []})
                z = s.get("zsum", {})
                acc["samples"] += 1
                acc["n"] += int(z.get("n", 0))
                acc["n_valid"] += int(z.get("n_valid", 0))
                if z.get("n_valid"):
                    acc["min"] = min(acc["min"], z["min"])
                    acc["max"] = max(acc["max"], z["max"])
                    for q in ("p1", "p50", "p99"):
                        acc[q].append(z[q])
                for note in s.get("notes", []):
                    n_notes += 1
                    if len(notes) < _MAX_NOTES:
                        notes.append({"key": s["key"], "note": note})
    z_stats = {}
    for split, acc in sorted(per_split.items()):
        has = bool(acc["p50"])
        z_stats[split] = {
            "samples": acc["samples"],
            "min": acc["min"] if has else None,
            "p1": float(np.median(acc["p1"])) if has else None,
            "median": float(np.median(acc["p50"])) if has else None,
            "p99": float(np.median(acc["p99"])) if has else None,
            "max": acc["max"] if has else None,
            "valid_frac": acc["n_valid"] / acc["n"] if acc["n"] else None,
        }
    shards.sort(key=lambda r: r["name"])
    counts["categories"] = {c: {sp: dict(sorted(lab.items())) for sp, lab in sorted(v.items())}
                            for c, v in sorted(counts["categories"].items())}
    return {"shards": shards, "skipped": skipped, "counts": counts, "z_stats": z_stats,
            "notes": notes, "n_notes": n_notes}


# ------------------------------------------------------------------------------------------------
# the conversion driver


@dataclass
class ShardParams:
    """Shard-level parameters of a conversion (recorded in the manifest)."""

    splits: tuple[str, ...] | None = DEFAULT_SPLITS
    max_side: int = 1024
    downsample: str = "nan_median"
    valid_frac_min: float = 0.5
    seed: int = 0
    shard_max_bytes: float = 1e9
    shard_max_count: int | None = None
    num_parts: int = 1

    def validate(self) -> None:
        if self.max_side < 1:
            raise ValueError(f"max_side must be >= 1, got {self.max_side}")
        if self.downsample not in ("nan_median", "nan_mean", "nearest"):
            raise ValueError(f"unknown downsample method {self.downsample!r}; expected nan_median, "
                             "nan_mean or nearest")
        if not 0.0 <= self.valid_frac_min <= 1.0:
            raise ValueError(f"valid_frac_min must be in [0, 1], got {self.valid_frac_min}")
        if self.shard_max_bytes <= 0:
            raise ValueError("shard_max_bytes must be positive")
        if self.shard_max_count is not None and self.shard_max_count <= 0:
            raise ValueError("shard_max_count must be positive")
        if self.num_parts < 1:
            raise ValueError("num_parts must be >= 1")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["splits"] = "all" if self.splits is None else list(self.splits)
        return d


def plan_items(items: Sequence[SourceItem], seed: int, num_parts: int = 1, part: int = 0
               ) -> list[SourceItem]:
    """Shuffle with a fixed seed (sources arrive sorted by category), then take part ``part`` of
    ``num_parts`` as a contiguous slice."""
    if not 0 <= part < num_parts:
        raise ValueError(f"part must be in [0, {num_parts}), got {part}")
    order = np.random.default_rng(seed).permutation(len(items))
    n = len(items)
    lo, hi = n * part // num_parts, n * (part + 1) // num_parts
    return [items[int(i)] for i in order[lo:hi]]


def plan_hash(source: str, items: Sequence[SourceItem]) -> str:
    sha = hashlib.sha256()
    for it in items:
        sha.update(f"{it.key(source)}\t{it.rel_path}\t{it.size}\n".encode())
    return sha.hexdigest()[:16]


def check_output_location(out_dir: Path, roots: Iterable[Path]) -> None:
    """Refuse an output folder inside (or equal to) an input root: readers never write to sources."""
    out = Path(out_dir).expanduser().resolve()
    for root in roots:
        root = Path(root).expanduser().resolve()
        if out == root or root in out.parents:
            raise ConversionError(f"output folder {out} is inside the input root {root}; "
                                  "choose an output folder outside the dataset (sources are never modified)")


def filter_splits(items: list[SourceItem], splits: tuple[str, ...] | None) -> list[SourceItem]:
    """Items whose canonical split is selected (``None`` selects everything)."""
    if splits is None:
        return items
    return [it for it in items if it.split in splits]


def conversion_params(source: DepthSource, shard_params: ShardParams, extra_params: Mapping | None = None
                      ) -> tuple[dict, str]:
    """``(params, params_hash)`` exactly as :func:`run_conversion` records them in the manifest and in
    every sample's ``converter.params_hash`` (callers building samples themselves use this hash)."""
    params = {"source": check_source_id(source.source_id), **shard_params.to_dict(), **source.params(),
              **dict(extra_params or {}), "converter_version": CONVERTER_VERSION}
    return params, params_hash(params)


def run_conversion(
    source: DepthSource,
    out_dir: str | os.PathLike,
    shard_params: ShardParams,
    *,
    extra_params: Mapping | None = None,
    part: int = 0,
    workers: int = 0,
    progress: bool = True,
    overwrite: bool = False,
    allow_skipped: bool = False,
    process_many: Callable[[Iterator[tuple[int, SourceItem]]], Iterator[Outcome]] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Convert one source (one part of it) into shards in ``out_dir`` and merge it into the manifest.

    ``process_many`` replaces the default per-item loader (:func:`iter_outcomes`): it receives
    ``(plan_index, item)`` pairs in plan order and must yield one :class:`EncodedSample` or
    :class:`SkippedItem` per pair, in the same order (pseudo-depth batches them on a GPU and builds
    samples with :func:`make_sample`, using the hash of :func:`conversion_params`). Returns the summary dict that is also printed by the CLI.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    shard_params.validate()
    sid = check_source_id(source.source_id)
    out_dir = Path(out_dir).expanduser().resolve()
    num_parts = shard_params.num_parts

    all_items = filter_splits(source.enumerate(), shard_params.splits)  # validates the root first
    check_output_location(out_dir, source.roots())
    keys = [it.key(sid) for it in all_items]
    check_unique_keys(keys, [it.rel_path for it in all_items])
    items = plan_items(all_items, shard_params.seed, num_parts, part)
    params, phash = conversion_params(source, shard_params, extra_params)
    pl_hash = plan_hash(sid, items)
    reader_report = source.report()
    if not all_items:
        log(f"warning: {sid}: no input depth maps for splits {params['splits']} under {source.root}")

    out_dir.mkdir(parents=True, exist_ok=True)
    with manifest_lock(out_dir):
        manifest = load_manifest(out_dir)
        entry = manifest["sources"].get(sid)
        if entry is not None and (entry.get("params_hash") != phash):
            log(f"{sid}: parameters changed since the last conversion; deleting its old shards")
            delete_source_shards(out_dir, sid)
            entry = None
        if entry is None:
            entry = {"params": params, "params_hash": phash, "root": str(source.root),
                     "num_parts": num_parts, "complete": False, "parts": {}}
            manifest["sources"][sid] = entry
            write_manifest(out_dir, manifest)
        else:
            # The inputs changed since other parts were written (files added/removed/resized): their
            # slices of the shuffled plan are stale, so drop them; they must be converted again.
            stale = [pid for pid, rec in entry.get("parts", {}).items() if int(pid) != part and
                     rec.get("plan_hash") != plan_hash(sid, plan_items(all_items, shard_params.seed,
                                                                       num_parts, int(pid)))]
            for pid in stale:
                log(f"{sid}: inputs changed since part {pid} was converted; removing its shards")
                stale_writer = ShardSequenceWriter(out_dir, sid, part=int(pid), params_hash=phash,
                                                   plan_hash="", n_items=0)
                for f in stale_writer.part_files():
                    f.unlink()
                del entry["parts"][pid]
            if stale:
                entry["complete"] = False
                write_manifest(out_dir, manifest)

    writer = ShardSequenceWriter(out_dir, sid, part=part, params_hash=phash, plan_hash=pl_hash,
                                 n_items=len(items), max_bytes=shard_params.shard_max_bytes,
                                 max_count=shard_params.shard_max_count)
    if overwrite:
        for p in writer.part_files():
            p.unlink()
    start = writer.resume()
    if writer.done:
        log(f"{sid} part {part}: {len(writer.records)} complete shard(s) found, nothing to do")
    else:
        if start:
            log(f"{sid} part {part}: resuming after {len(writer.records)} complete shard(s) "
                f"({start}/{len(items)} items)")
        job = SampleJob(source=sid, kind=source.kind, unit=source.unit, max_side=shard_params.max_side,
                        downsample=shard_params.downsample, valid_frac_min=shard_params.valid_frac_min,
                        params_hash=phash)
        tasks = ((i, items[i]) for i in range(start, len(items)))
        outcomes = process_many(tasks) if process_many is not None else iter_outcomes(source, job, tasks, workers)
        bar = _progress_bar(len(items), start, f"{sid}[{part}]", progress)
        try:
            expected = start
            for outcome in outcomes:
                if outcome.index != expected:
                    raise ConversionError(f"outcomes out of order: got plan index {outcome.index}, "
                                          f"expected {expected}")
                expected += 1
                writer.add(outcome)
                if isinstance(outcome, SkippedItem):
                    log(f"skipped {outcome.rel_path}: {outcome.reason}")
                bar.update(1)
            if expected != len(items):
                raise ConversionError(f"processing stopped at item {expected} of {len(items)}")
            writer.close()
        except OSError as exc:  # writing failed (disk full, quota): name the place, keep what is complete
            writer.abort(exc)
            raise ConversionError(
                f"{sid} part {part}: writing shards to {out_dir} failed: {exc.strerror or exc}. The shard being "
                f"written was removed; the {len(writer.records)} complete shard(s) are kept: free space and "
                "re-run the same command to resume") from exc
        except BaseException as exc:
            writer.abort(exc)
            raise
        finally:
            bar.close()
            close = getattr(outcomes, "close", None)
            if close is not None:
                close()
            source.close()

    with manifest_lock(out_dir):
        manifest = load_manifest(out_dir)
        entry = manifest["sources"].get(sid)
        if entry is None or entry.get("params_hash") != phash:
            raise ConversionError(f"the manifest entry of {sid} in {out_dir} was replaced by another "
                                  "conversion with different parameters while this one ran")
        entry["parts"][str(part)] = {
            "plan_hash": pl_hash, "items": len(items), "complete": True,
            "shards": [r["name"] for r in writer.records], "skipped": writer.skipped,
            "reader_report": reader_report,
        }
        entry["root"] = str(source.root)
        entry["complete"] = all(str(p) in entry["parts"] for p in range(num_parts))
        agg = aggregate_source(out_dir, entry)
        checks = [
            {"name": "inputs_readable", "ok": not agg["skipped"], "fatal": not allow_skipped,
             "detail": f"{len(agg['skipped'])} input(s) skipped (see 'skipped')"},
            {"name": "samples_written", "ok": agg["counts"]["total"] > 0, "fatal": True,
             "detail": f"{agg['counts']['total']} sample(s) in the shards"},
            *source.range_checks(agg["z_stats"]),
            *_empty_folder_checks(getattr(source, "empty_folders", [])),
        ]
        entry["shards"] = agg["shards"]
        entry["counts"] = agg["counts"]
        entry["skipped"] = agg["skipped"]
        entry["report"] = {
            "z_stats": agg["z_stats"],
            "z_stats_method": "min/max exact; p1/median/p99 = median over samples of per-sample "
                              "percentiles at the original resolution; valid_frac over all pixels",
            "checks": checks,
            "notes": agg["notes"], "n_notes": agg["n_notes"],
            "reader": _merge_reader_reports(entry["parts"]),
        }
        failed = [c["name"] for c in checks if c["fatal"] and not c["ok"]]
        warned = [c["name"] for c in checks if not c["fatal"] and not c["ok"]]
        entry["summary"] = {"samples": agg["counts"]["total"], "skipped": len(agg["skipped"]),
                            "shards": len(agg["shards"]), "bytes": sum(r["bytes"] for r in agg["shards"]),
                            "checks_failed": failed, "checks_warned": warned}
        write_manifest(out_dir, manifest)
        fingerprint = manifest["fingerprint"]

    return {
        "source": sid, "out": str(out_dir), "part": part, "num_parts": num_parts,
        "items": len(items), "written": writer.written_samples, "resumed": writer.resumed_samples,
        "skipped": len(writer.skipped), "skipped_items": writer.skipped,
        "shards": [r["name"] for r in writer.records],
        "source_complete": entry["complete"], "source_samples": agg["counts"]["total"],
        "checks": checks, "checks_failed": failed, "checks_warned": warned, "ok": not failed,
        "z_stats": agg["z_stats"],
        "manifest": str(out_dir / MANIFEST_NAME), "fingerprint": fingerprint,
        "params_hash": phash,
    }


def _empty_folder_checks(folders: Sequence[str]) -> list[dict]:
    if not folders:
        return []
    shown = ", ".join(folders[:10]) + (f", ... (+{len(folders) - 10} more)" if len(folders) > 10 else "")
    return [{"name": "no_empty_folders", "ok": False, "fatal": False,
             "detail": f"{len(folders)} folder(s) without depth files, ignored (empty category or incomplete "
                       f"download?): {shown}"}]


def _merge_reader_reports(parts: Mapping[str, Mapping]) -> dict:
    # Every part enumerates the whole source, so their reader reports agree; keep the lowest part's.
    for pid in sorted(parts, key=int):
        if parts[pid].get("reader_report"):
            return parts[pid]["reader_report"]
    return {}


class _NullBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, initial: int, desc: str, enabled: bool):
    if not enabled:
        return _NullBar()
    try:
        from tqdm import tqdm
    except ImportError:  # progress is cosmetic
        warnings.warn("tqdm is not installed: no progress bar", stacklevel=2)
        return _NullBar()
    return tqdm(total=total, initial=initial, desc=desc, unit="map", dynamic_ncols=True)


__all__ = [
    "CANONICAL_SPLITS",
    "CONVERTER_VERSION",
    "DEFAULT_SPLITS",
    "MANIFEST_NAME",
    "PART_STRIDE",
    "ConversionError",
    "DepthSource",
    "EncodedSample",
    "LoadedDepth",
    "Outcome",
    "SampleJob",
    "ShardParams",
    "ShardSequenceWriter",
    "SkipSample",
    "SkippedItem",
    "SourceItem",
    "check_output_location",
    "check_unique_keys",
    "conversion_params",
    "decode_npy",
    "delete_source_shards",
    "encode_json",
    "encode_npy",
    "file_sha256",
    "filter_splits",
    "iter_outcomes",
    "load_manifest",
    "load_shard_index",
    "make_key",
    "make_sample",
    "manifest_fingerprint",
    "manifest_lock",
    "params_hash",
    "parse_splits",
    "plan_items",
    "process_item",
    "publish_mode",
    "run_conversion",
    "sanitize_component",
    "scan_shard_index",
    "shard_name",
    "split_key",
    "write_manifest",
]
