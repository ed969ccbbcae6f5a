"""The read side of the depth-shard format (``../shared/spec/data_formats.md`` §8): what every stage that
reads shards shares — format constants, sample keys, ``.npy`` decoding, the per-shard index, the manifest,
and :class:`SampleTable`, the indexed table of every selected sample that reads one with a single
``os.pread``. ``data_prep.shards`` writes the format (and re-exports these names); ``pretrain.data``
builds its loaders on the table; ``data_prep/inspect_shards.py`` shows what the loader will see through
the same reader.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tarfile
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.depth import DepthNormConfig, normalize_depth, stored_valid_range

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "dinodepth-shards"
MANIFEST_FORMAT_VERSION = 1
INDEX_FORMAT = "dinodepth-shard-index"
INDEX_FORMAT_VERSION = 1
INDEX_SUFFIX = ".idx.json"
DEPTH_EXT = "depth.npy"
JSON_EXT = "json"
CANONICAL_SPLITS = ("train", "validation", "test", "test_private", "test_private_mixed", "unsplit")
TABLE_FORMAT_VERSION = 1
MAX_OPEN_FILES = 256  # shard file descriptors a table keeps open per process


# -- sample keys and payloads ----------------------------------------------------------------------
def split_key(key: str) -> tuple[str, str, str, str]:
    """Inverse of :func:`make_key` (components are sanitised, so ``/`` only separates them)."""
    parts = key.split("/")
    if len(parts) != 4:
        raise ValueError(f"malformed sample key {key!r}: expected <source>/<category>/<split>/<stem>")
    return parts[0], parts[1], parts[2], parts[3]


def decode_npy(data: bytes, what: str = "depth.npy") -> np.ndarray:
    """Inverse of :func:`encode_npy`; checks dtype float32 and 2-D. Raises ValueError naming ``what``."""
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exc:  # corrupt bytes fail with EOFError, tokenize errors, MemoryError, ...
        raise ValueError(f"{what}: not a readable .npy array ({type(exc).__name__}: {exc})") from None
    if not isinstance(arr, np.ndarray):
        raise ValueError(f"{what}: an .npz archive, expected a single .npy array")
    if arr.dtype != np.float32 or arr.ndim != 2:
        raise ValueError(f"{what}: expected a float32 (H, W) array, got {arr.dtype} {arr.shape}")
    return arr



# -- per-shard index -------------------------------------------------------------------------------
def read_json_or_none(path: Path) -> dict | None:
    try:
        with open(path, "rb") as fh:
            obj = json.load(fh)
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def shard_index_path(shard_path: str | os.PathLike) -> Path:
    shard_path = Path(shard_path)
    return shard_path.with_name(shard_path.name + INDEX_SUFFIX)


def split_member_name(name: str) -> tuple[str, str]:
    # webdataset convention: the key is everything before the first dot of the basename
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot:
        raise ValueError(f"tar member {name!r} has no extension")
    return (f"{head}/{stem}" if head else stem), ext


def scan_shard_index(shard_path: str | os.PathLike) -> dict:
    """Rebuild a shard's index by reading its tar headers only (data blocks are skipped by seeking)."""
    shard_path = Path(shard_path)
    samples: list[dict] = []
    by_key: dict[str, dict] = {}
    with tarfile.open(shard_path, "r:") as tf:
        for ti in tf:
            if not ti.isfile():
                continue
            key, ext = split_member_name(ti.name)
            entry = by_key.get(key)
            if entry is None:
                entry = {"key": key, "offset": ti.offset, "members": {}}
                by_key[key] = entry
                samples.append(entry)
            entry["members"][ext] = [ti.offset_data, ti.size]
    return {"format": INDEX_FORMAT, "format_version": INDEX_FORMAT_VERSION, "shard": shard_path.name,
            "bytes": shard_path.stat().st_size, "samples": samples, "rebuilt": True}


def load_shard_index(shard_path: str | os.PathLike, expected_sha256: str | None = None) -> dict:
    """The sidecar index of a shard, or one rebuilt from the tar headers if absent/stale/unreadable."""
    shard_path = Path(shard_path)
    idx = read_json_or_none(shard_index_path(shard_path))
    size = shard_path.stat().st_size
    if (idx is not None and idx.get("format") == INDEX_FORMAT and idx.get("bytes") == size
            and (expected_sha256 is None or idx.get("sha256") == expected_sha256)):
        return idx
    return scan_shard_index(shard_path)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            data = fh.read(chunk)
            if not data:
                break
            sha.update(data)
    return sha.hexdigest()



# -- manifest --------------------------------------------------------------------------------------
def empty_manifest() -> dict:
    return {"format": MANIFEST_FORMAT, "format_version": MANIFEST_FORMAT_VERSION, "sources": {},
            "fingerprint": manifest_fingerprint({})}


def load_manifest(out_dir: str | os.PathLike, required: bool = False) -> dict:
    """Read ``<out_dir>/manifest.json`` (an empty manifest if absent and not ``required``)."""
    path = Path(out_dir) / MANIFEST_NAME
    if not path.is_file():
        if required:
            raise FileNotFoundError(f"{path} does not exist: not a shard folder written by data_prep")
        return empty_manifest()
    try:
        obj = json.loads(path.read_text())
    except ValueError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if obj.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path} is not a {MANIFEST_FORMAT} manifest (format={obj.get('format')!r})")
    if int(obj.get("format_version", 0)) > MANIFEST_FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {obj.get('format_version')}, newer than this code "
                         f"({MANIFEST_FORMAT_VERSION})")
    return obj


def manifest_fingerprint(sources: Mapping[str, Mapping]) -> str:
    """Hash over every shard hash of every source (what checkpoints record to detect data changes)."""
    lines = []
    for sid in sorted(sources):
        for rec in sorted(sources[sid].get("shards", []), key=lambda r: r["name"]):
            lines.append(f"{sid}/{rec['name']}:{rec['sha256']}")
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


# -- the sample table ------------------------------------------------------------------------------
def source_list(sources: Sequence[str] | str | None) -> list[str] | None:
    """Source ids as a list without repeats (a comma-separated string allowed); None or empty = all."""
    if sources is None:
        return None
    if isinstance(sources, str):
        sources = [s.strip() for s in sources.split(",") if s.strip()]
    if not sources:  # an empty list in a config means "no restriction", like None
        return None
    return list(dict.fromkeys(sources))


class SampleTableError(ValueError):
    """Selection or consistency problem of the shard folders (unknown source, changed shard, ...)."""


def check_splits(splits: Sequence[str] | None) -> tuple[str, ...] | None:
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
                        splits: list[str] | None = None, verify: bool = False) -> SampleTable:
        """Table of the selected samples in ``dirs`` (each a folder with ``manifest.json``).

        ``sources``: source ids to use (None or empty = every source found); ``splits``: canonical split names to keep (None or ``["all"]`` = all).
        A requested source absent from every manifest is an error (never silently ignored), as is a
        source present in two folders, an incomplete conversion, or a shard whose size differs
        from its manifest entry. ``verify=True`` also checks every shard's SHA-256 (reads all bytes).
        """
        if isinstance(dirs, (str, Path)):
            dirs = [dirs]
        dirs = [Path(d).expanduser().resolve() for d in dirs]
        if not dirs:
            raise SampleTableError("no shard folder given")
        wanted = source_list(sources)
        split_sel = check_splits(splits)
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
        depth = npy_from_buffer(d_buf, f"{path}:{self._keys[i]}.{DEPTH_EXT}")
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
            if len(self._fds) >= MAX_OPEN_FILES:
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


def npy_from_buffer(buf: bytearray, what: str) -> np.ndarray:
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


