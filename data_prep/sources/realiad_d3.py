"""Real-IAD D³ reader (``data_formats.md`` §4): xyz TIFF z channel only, NaN/0 → invalid.

Works on the distribution as downloaded — one zip per category (members read in place, nothing
extracted) — or on extracted folders, driven by the per-category JSON split files
(``realiad_d3_jsons/<category>.json`` or ``realiad_d3_jsons.zip``). The member name is
``meta.prefix + xyz_path``; because the exact naming is not documented, a few variants are tried and
the one found is reported. Names are taken from the files (JSON stems), never from a fixed list.
The depth unit is ``unknown`` unless given (``--realiad-unit``; nearness normalisation is
unit-free).

Without JSON files the reader takes the extracted folder layout that the authors' benchmark code
reads: ``<category>/{train,test}/{GOOD,<defect>}/xyz/*.tiff`` (upper-case ``GOOD`` = normal, any
other folder = anomalous with that defect name; ``rgb/`` and ``gt/`` beside ``xyz/`` are not depth).

Invalid z: non-finite, 0 **and negative** values become NaN in both layouts. A structured-light
camera-frame z is positive; 0 is the no-return marker and a negative z can only be an artefact (the
benchmark code carries a commented-out branch for z <= 0). We do not fill NaN with the minimum z as
that code does: it would put every hole at the nearest depth of the scan; the number of negative-z
pixels is noted per sample.
"""

from __future__ import annotations

import json
import posixpath
import zipfile
from pathlib import Path

import numpy as np

from data_prep.shards import CANONICAL_SPLITS, ConversionError, DepthSource, LoadedDepth, SourceItem
from data_prep.sources.common import file_size, read_tiff, rel_posix, xyz_to_z

JSON_DIR = "realiad_d3_jsons"
RAW_DIR = "realiad_d3_raw"
SPLIT_ALIASES = {"train": "train", "test": "test", "val": "validation", "valid": "validation",
                 "validation": "validation"}
FOLDER_SPLITS = ("train", "validation", "test")
NORMAL_FOLDER = "GOOD"
FOLDER_LAYOUT = "<root>/<category>/{train,test}/{GOOD,<defect>}/xyz/*.tiff (the benchmark code's folders)"
LAYOUT = (f"<root>/{JSON_DIR}/<category>.json (or <root>/{JSON_DIR}.zip) and the data as "
          f"<root>/{RAW_DIR}/<category>.zip, <root>/<category>.zip, or the same zips extracted into "
          f"<root>/{RAW_DIR}/ or <root>/; or, without JSON files, {FOLDER_LAYOUT}")


def _norm_member(path: str) -> str:
    path = path.replace("\\", "/")
    while path.startswith("./"):
        path = path[2:]
    return posixpath.normpath(path.lstrip("/")) if path else path


class RealIADD3Source(DepthSource):
    source_id = "realiad_d3"
    kind = "metric_z"
    expected_layout = LAYOUT

    def __init__(self, root, unit: str | None = None, json_dir: str | None = None) -> None:
        super().__init__(root)
        if unit not in (None, "m", "mm", "unknown"):
            raise ValueError(f"--realiad-unit must be 'm', 'mm' or 'unknown', got {unit!r}")
        self.unit = unit or "unknown"
        self.json_dir = Path(json_dir).expanduser().resolve() if json_dir else None
        self._report: dict = {}

    def roots(self) -> list[Path]:
        return [self.root] + ([self.json_dir] if self.json_dir else [])

    def params(self) -> dict:
        # the invalid-z rule travels in the parameters: shards written when negative z was still valid
        # are rewritten, not mixed with new ones
        return {"realiad_unit": self.unit, "invalid_z": "nonfinite_or_le0"}

    # -- JSON split files -------------------------------------------------------------------------
    def _load_jsons(self) -> tuple[dict[str, dict], str]:
        self.require_root()
        out: dict[str, dict] = {}
        candidates = [self.json_dir] if self.json_dir else [self.root / JSON_DIR]
        for d in candidates:
            if d is not None and d.is_dir():
                for f in sorted(d.iterdir()):
                    if f.suffix.lower() == ".json" and f.is_file():
                        out[f.stem] = self._parse_json(f.read_bytes(), str(f))
                if out:
                    return out, str(d)
        zpath = self.root / f"{JSON_DIR}.zip"
        if zpath.is_file():
            with zipfile.ZipFile(zpath) as zf:
                for name in sorted(zf.namelist()):
                    if name.lower().endswith(".json") and not name.endswith("/"):
                        out[Path(name).stem] = self._parse_json(zf.read(name), f"{zpath}:{name}")
            if out:
                return out, str(zpath)
        raise ConversionError(f"realiad_d3: no JSON split files found under {self.root}. Expected layout: {LAYOUT}")

    @staticmethod
    def _parse_json(data: bytes, where: str) -> dict:
        try:
            obj = json.loads(data)
        except ValueError as exc:
            raise ConversionError(f"realiad_d3: {where} is not valid JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise ConversionError(f"realiad_d3: {where} must hold an object with 'meta' and split lists")
        return obj

    # -- data location ----------------------------------------------------------------------------
    def _locate(self, category: str) -> tuple[str, Path] | None:
        for z in (self.root / RAW_DIR / f"{category}.zip", self.root / f"{category}.zip"):
            if z.is_file():
                return "zip", z
        for base in (self.root / RAW_DIR, self.root):
            if (base / category).is_dir():
                return "folder", base
        return None

    # -- benchmark folder layout (no JSON) -----------------------------------------------------------
    def _folder_categories(self) -> list[Path]:
        """Category folders of the benchmark layout: ``<cat>/<split>/<GOOD|defect>/xyz/``."""
        if not self.root.is_dir():
            return []
        return [d for d in sorted(self.root.iterdir()) if d.is_dir() and not d.name.startswith(".")
                and any((d / s).is_dir() and any((d / s).glob("*/xyz")) for s in FOLDER_SPLITS)]

    def _enumerate_folders(self, cats: list[Path]) -> list[SourceItem]:
        items: list[SourceItem] = []
        self.empty_folders = []
        report: dict = {"layout": "benchmark_folders", "categories": {}, "unit": self.unit,
                        "unit_note": "depth unit not documented (likely mm); 'unknown' unless --realiad-unit",
                        "invalid_z": "non-finite, 0 and negative z are invalid (NaN)"}
        for cat in cats:
            counts: dict[str, dict[str, int]] = {}
            for split in FOLDER_SPLITS:
                if not (cat / split).is_dir():
                    continue
                for defect_dir in sorted(p for p in (cat / split).iterdir() if p.is_dir()):
                    xyz_dir = defect_dir / "xyz"
                    if not xyz_dir.is_dir():
                        continue
                    files = sorted(p for p in xyz_dir.iterdir()
                                   if p.is_file() and p.suffix.lower() in (".tif", ".tiff"))
                    if not files:
                        self.empty_folders.append(rel_posix(xyz_dir, self.root) + "/")
                    normal = defect_dir.name.upper() == NORMAL_FOLDER
                    counts.setdefault(split, {})[defect_dir.name] = len(files)
                    for f in files:
                        items.append(SourceItem(
                            category=cat.name, split=split, split_orig=split,
                            stem=f"{defect_dir.name}_{f.stem}", rel_path=rel_posix(f, self.root),
                            label="normal" if normal else "anomalous",
                            defect_type=None if normal else defect_dir.name,
                            ref=("file", str(f)), size=file_size(f)))
            report["categories"][cat.name] = counts
        self._report = report
        return items

    def enumerate(self) -> list[SourceItem]:
        self.require_root()
        try:
            jsons, json_where = self._load_jsons()
        except ConversionError:
            cats = [] if self.json_dir else self._folder_categories()
            if cats:
                return self._enumerate_folders(cats)
            if any((self.root / s).is_dir() and any((self.root / s).glob("*/xyz")) for s in FOLDER_SPLITS):
                raise ConversionError(
                    f"realiad_d3: {self.root} looks like a single category folder; pass its parent. "
                    f"Expected layout: {LAYOUT}") from None
            raise
        items: list[SourceItem] = []
        report: dict = {"layout": "json_splits", "json_source": json_where, "categories": {}, "json_fields": [],
                        "categories_missing_data": [], "unknown_split_lists": [], "duplicates": 0,
                        "unit": self.unit,
                        "unit_note": "depth unit not documented (likely mm); 'unknown' unless --realiad-unit"}
        fields: set[str] = set()
        for category in sorted(jsons):
            obj = jsons[category]
            meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
            prefix = str(meta.get("prefix", "") or "")
            loc = self._locate(category)
            split_lists = {k: v for k, v in obj.items() if k != "meta" and isinstance(v, list)}
            cat_rep = {"prefix": prefix, "layout": loc[0] if loc else None,
                       "data": str(loc[1]) if loc else None,
                       "splits": {k: len(v) for k, v in split_lists.items()}, "member_pattern": None}
            report["categories"][category] = cat_rep
            if loc is None:
                report["categories_missing_data"].append(category)
                continue
            names = None
            if loc[0] == "zip":
                try:
                    with zipfile.ZipFile(loc[1]) as zf:
                        names = {i.filename: i.file_size for i in zf.infolist() if not i.is_dir()}
                except (zipfile.BadZipFile, OSError) as exc:
                    raise ConversionError(f"realiad_d3: {loc[1]} is not a readable zip ({exc})") from None
            for split_orig in sorted(split_lists):
                split = SPLIT_ALIASES.get(split_orig.lower())
                if split is None:
                    split = split_orig if split_orig in CANONICAL_SPLITS else None
                if split is None:
                    report["unknown_split_lists"].append(f"{category}:{split_orig}")
                    continue
                seen: set[str] = set()
                for n, entry in enumerate(split_lists[split_orig]):
                    if not isinstance(entry, dict):
                        items.append(self._bad_item(category, split, split_orig, n, "JSON entry is not an object"))
                        continue
                    fields.update(entry)
                    xyz = entry.get("xyz_path")
                    if not xyz or not isinstance(xyz, str):
                        items.append(self._bad_item(category, split, split_orig, n, "JSON entry has no xyz_path"))
                        continue
                    found = self._resolve(category, prefix, xyz, loc, names)
                    if found is None:
                        items.append(self._bad_item(category, split, split_orig, n,
                                                    f"xyz file {prefix + xyz!r} not found in {loc[1]}",
                                                    stem=self._stem(category, _norm_member(xyz))))
                        continue
                    pattern, rel, ref, size = found
                    cat_rep["member_pattern"] = cat_rep["member_pattern"] or pattern
                    if rel in seen:
                        report["duplicates"] += 1
                        continue
                    seen.add(rel)
                    cls = entry.get("anomaly_class")
                    if cls is None:
                        label, defect = None, None
                    elif str(cls).upper() == "OK":
                        label, defect = "normal", None
                    else:
                        label, defect = "anomalous", str(cls)
                    items.append(SourceItem(category=category, split=split, split_orig=split_orig,
                                            stem=self._stem(category, rel), rel_path=rel, label=label,
                                            defect_type=defect, ref=ref, size=size))
        report["json_fields"] = sorted(fields)
        if not any(c["layout"] for c in report["categories"].values()):
            raise ConversionError(f"realiad_d3: JSON files found ({json_where}) but no category zip or "
                                  f"folder for any of {sorted(jsons)}. Expected layout: {LAYOUT}")
        self._report = report
        return items

    def _resolve(self, category: str, prefix: str, xyz: str, loc: tuple[str, Path],
                 names: dict[str, int] | None):
        variants = [("prefix+path", prefix + xyz), ("prefix/path", prefix.rstrip("/") + "/" + xyz),
                    ("path", xyz), ("category/path", f"{category}/{xyz}")]
        for pattern, cand in variants:
            cand = _norm_member(cand)
            if not cand or cand == ".":
                continue
            if loc[0] == "zip":
                assert names is not None
                if cand in names:
                    return pattern, cand, ("zip", str(loc[1]), cand), names[cand]
            else:
                p = loc[1] / cand
                if p.is_file():
                    return pattern, p.relative_to(self.root).as_posix(), ("file", str(p)), file_size(p)
        return None

    @staticmethod
    def _stem(category: str, rel: str) -> str:
        parts = rel.split("/")
        if category in parts[:-1]:
            parts = parts[parts.index(category) + 1:]
        parts[-1] = posixpath.splitext(parts[-1])[0]
        return "_".join(parts)

    def _bad_item(self, category, split, split_orig, n, reason, stem=None) -> SourceItem:
        where = f"{category}.json[{split_orig}][{n}]"
        return SourceItem(category=category, split=split, split_orig=split_orig,
                          stem=stem or f"json_entry_{n:06d}", rel_path=where,
                          extra={"skip_reason": reason})

    def load(self, item: SourceItem) -> LoadedDepth:
        kind = item.ref[0]
        if kind == "zip":
            zpath, member = item.ref[1], item.ref[2]
            zf = self._cache.get(zpath)
            if zf is None:
                zf = self._cache[zpath] = zipfile.ZipFile(zpath)
            data = zf.read(member)  # decompresses this member only, in memory
            arr = read_tiff(data)
        else:
            arr = read_tiff(item.ref[1])
        z = xyz_to_z(arr, item.rel_path)
        notes = []
        with np.errstate(invalid="ignore"):
            negative = z < 0
        n_neg = int(negative.sum())
        if n_neg:
            z[negative] = np.nan
            notes.append(f"{n_neg} pixels with z < 0 set invalid")
        return LoadedDepth(depth=z, notes=notes)

    def report(self) -> dict:
        return self._report

    def range_checks(self, z_stats: dict) -> list[dict]:
        mins = [s["min"] for s in z_stats.values() if s.get("min") is not None]
        if not mins:
            return []
        return [{"name": "z_positive", "ok": min(mins) > 0, "fatal": False,
                 "detail": f"min valid z = {min(mins):.4g} ({self.unit})"}]
