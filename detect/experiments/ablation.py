"""Paper ablations of ModMap with one command: baselines, depth encoders, aggregation, multi-class,
view subsampling (``../shared/spec/modmap.md`` §14–§16; paper Tables 3, 4, 6, 7, 8, 10).

    python detect/ablate.py --config configs/detect/ablate/tiny.yaml --data data/synthetic \
        --ckpt dinodepth_tiny.pth --out runs/ablate
    python detect/run.py ablate --config configs/detect/ablate/paper.yaml --data SiM3D --ckpt dinodepth.pth \
        --image-encoder-weights dinov2_vitb14_reg4_pretrain.pth --out runs/ablate_sim3d
    python detect/ablate.py ... tables=[aggregation] detect.epochs=50      # key=value overrides

Every table row is a :class:`detect.config.DetectConfig` (the base config + the row's overrides) run
through the normal multiview code path (:func:`detect.pipeline.multiview.run_multiview`). Rows that resolve to the same config
run once (e.g. "ModMap" appears in Tables 6, 7, 8 and 10); runs that differ only in inference settings
(aggregation, source views) share the trained models; all runs share one feature cache
(``<out>/features``), keyed by the encoder hashes, so each encoder pair encodes every view once.

Outputs (``<out>/``)::

    report.md                    every table + how it was made (command, encoders, data, runtime)
    tables/tableNN_<name>.md/.csv one table per paper table (I-AUROC and V-AUPRO@1% per class + mean;
                                 view subsampling also the mapping time per instance)
    configs/<run>.yaml           the resolved DetectConfig of every run;  ablation_config.yaml
    runs/<run>/                  the runs themselves (detect/run.py layout: models, scores, metrics, timing)
    ablation.json                all metrics and timings, machine-readable
    features/                    the shared feature cache

A finished run (its ``results.json`` next to an identical ``config.yaml``) is reused when the command
is repeated (``reuse: false`` recomputes).
"""

import dataclasses
import hashlib
import json
import math
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from detect.config import SETUPS, DetectConfig, setups
from detect.pipeline.base import deterministic
from detect.pipeline.results import (
    PAPER_COLUMNS,
    ci_text,
    complete_mean,
    fmt,
    jsonable,
    read_results,
    write_csv,
)
from shared.config import ConfigError, from_dict, load_yaml, merge_dicts, save_config, to_dict
from shared.io import atomic_write_json, atomic_write_text

REPO = Path(__file__).resolve().parents[2]
TABLE_NAMES = ("view_conditioning", "depth_encoder", "cross_view", "multi_class", "view_subsampling", "aggregation")
# Settings that do not change a run's results: they never enter the run key.
_NON_RESULT_FIELDS = {"out", "cache_dir", "mode", "progress"}
# Settings used only after training: runs differing only in these share trained models.
_INFERENCE_FIELDS = {"aggregation", "blur_sigma", "fg_connectivity", "fg_erosion", "view_aggregation", "occlusion_gate_m",
                     "occlusion_gate_tokens", "num_source_views", "num_target_views",
                     "source_chunk", "project_stride", "voxel_size", "eval_domain", "pro_limits", "save_maps",
                     "viz", "save_ply", "classes", "setup", "calib_reader", "gt_reader"}
DET, SEG = "I-AUROC", "V-AUPRO@1%"


@dataclass
class AblateConfig:
    """What to ablate and on which data; ``detect`` holds :class:`DetectConfig` overrides."""

    detect_config: str = ""  # base DetectConfig YAML (e.g. configs/detect/tiny_cpu.yaml); empty: paper defaults
    detect: dict[str, Any] = field(default_factory=dict)  # DetectConfig overrides on top of detect_config
    tables: list[str] = field(default_factory=lambda: list(TABLE_NAMES))
    setup: Literal["real2real", "synth2real", "both"] = "both"
    classes: list[str] = field(default_factory=list)  # empty: every class of the dataset
    source_views: list[int] = field(default_factory=lambda: [0, 6, 3, 2])  # K per target (Table 8); 0 = all
    timing_classes: list[str] = field(default_factory=list)  # classes of Table 8 (paper: sink_cabinet); empty: all
    # per-table setup that replaces ``setup`` for that table, e.g. {multi_class: both}: the paper reports
    # Table 7 on both setups and the rest on real-to-real only
    table_setups: dict[str, str] = field(default_factory=dict)
    out: str = "runs/ablate"
    reuse: bool = True

    def validate(self) -> None:
        unknown = [t for t in self.tables if t not in TABLE_NAMES]
        if unknown:
            raise ConfigError(f"unknown table(s) {unknown}; expected some of {list(TABLE_NAMES)}")
        if not self.tables:
            raise ConfigError("tables is empty: nothing to run")
        if any(k < 0 for k in self.source_views):
            raise ConfigError(f"source_views must be >= 0 (0 = all views), got {self.source_views}")
        if "view_subsampling" in self.tables and not self.source_views:
            raise ConfigError("the view_subsampling table needs at least one value in source_views")
        for table, setup in self.table_setups.items():
            if table not in TABLE_NAMES:
                raise ConfigError(f"table_setups: unknown table {table!r}; expected one of {list(TABLE_NAMES)}")
            if setup not in ("real2real", "synth2real", "both"):
                raise ConfigError(f"table_setups.{table}: expected real2real, synth2real or both, got {setup!r}")

    def setups_of(self, table: str) -> list[str]:
        """The setups a table's rows run and show."""
        setup = self.table_setups.get(table, self.setup)
        return list(SETUPS) if setup == "both" else [setup]

    def all_setups(self) -> list[str]:
        """Every setup some table runs, in the order of SETUPS."""
        used = {s for t in self.tables for s in self.setups_of(t)}
        return [s for s in SETUPS if s in used]


# -- table definitions -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    label: str
    overrides: dict


@dataclass(frozen=True)
class TableSpec:
    name: str
    number: int  # paper table number
    title: str
    rows: Callable[[AblateConfig, DetectConfig], list[Row]]
    note: str = ""
    timing: bool = False
    setup_columns: bool = False  # Table 7 layout: setups as column groups (means only)
    # the row every other row is compared with (paired bootstrap interval of the difference): the full
    # method of the table (last row) unless said otherwise
    reference: Callable[[list[Row]], int] = lambda rows: len(rows) - 1


def _image_on_depth_label(base: DetectConfig) -> str:
    if base.image_encoder == "random":
        return "random image encoder on depth (3× replicated)"
    return f"{base.image_encoder} on depth (3× replicated)"


def _image_on_depth(base: DetectConfig) -> str:
    """The image encoder applied to depth: the CNN's or the ViT's."""
    return "cnn_on_depth" if base.image_encoder == "cnn" else "dinov2_on_depth"


# PatchCore in the same 3D pipeline: the reference row of the tables that compare methods (issue 23).
PATCHCORE_ROW = Row("PatchCore (reference: memory bank of the training instance's tokens)", {"method": "patchcore"})


def _source_views_label(k: int) -> str:
    return "all" if k == 0 else str(k)


TABLES: dict[str, TableSpec] = {t.name: t for t in (
    TableSpec("view_conditioning", 3, "Impact of view conditioning",
              lambda a, b: [PATCHCORE_ROW, Row("CFM (no view conditioning)", {"variant": "cfm"}),
                            Row("CFM + view conditioning", {"variant": "vc_cfm"})],
              "Same-view pairs only, s = t at inference; depth encoder of the base config (the paper used FPFH "
              "here, which is not bundled)."),
    TableSpec("depth_encoder", 4, "Effects of the depth feature extractor (view-conditioned CFM)",
              lambda a, b: [Row("random init (DINO-Depth architecture)", {"variant": "vc_cfm", "depth_encoder": "random"}),
                            Row(_image_on_depth_label(b), {"variant": "vc_cfm", "depth_encoder": _image_on_depth(b)}),
                            Row("DINO-Depth", {"variant": "vc_cfm", "depth_encoder": "dino_depth"})],
              "FPFH and Point-MAE rows of the paper are not bundled."),
    TableSpec("cross_view", 6, "Cross-view conditioning",
              lambda a, b: [PATCHCORE_ROW,
                            Row("view-conditioned CFM + DINO-Depth", {"variant": "vc_cfm", "depth_encoder": "dino_depth"}),
                            Row("ModMap (cross-view pairs, min-ensembling, max-aggregation)",
                                {"variant": "modmap", "depth_encoder": "dino_depth"})]),
    TableSpec("multi_class", 7, "Class-specific vs. multi-class",
              lambda a, b: [Row("Class-specific", {"variant": "modmap", "multi_class": False}),
                            Row("Multi-class", {"variant": "modmap", "multi_class": True})],
              "Multi-class: one model for all classes of the setup, class one-hot appended to the modulator input.",
              setup_columns=True, reference=lambda rows: 0),
    TableSpec("view_subsampling", 8, "Number of source views vs. inference time vs. performance",
              lambda a, b: [Row(_source_views_label(k), {"variant": "modmap", "num_source_views": int(k),
                                                         **({"classes": list(a.timing_classes)} if a.timing_classes else {})})
                            for k in a.source_views],
              "K random source views per target (seeded, always incl. the target), all targets kept; training "
              "unchanged. Time = median per instance (mean over classes) of the mapping stage (per-view maps from cached tokens, "
              "volume construction and encoding excluded, modmap.md §13) on the run's device.",
              timing=True, reference=lambda rows: next((i for i, r in enumerate(rows) if r.label == "all"), 0)),
    TableSpec("aggregation", 10, "Aggregation function of the two modality maps",
              lambda a, b: [Row(agg, {"variant": "modmap", "aggregation": agg}) for agg in ("max", "min", "prod", "mean")],
              reference=lambda rows: 0),
)}


# -- planning --------------------------------------------------------------------------------------
def _key(d: dict) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:8]


def run_key(cfg: DetectConfig) -> str:
    d = {k: v for k, v in to_dict(cfg).items() if k not in _NON_RESULT_FIELDS}
    return _key(d)


def fit_key(cfg: DetectConfig) -> str:
    """Identifies trained models: everything except inference/evaluation settings (and, for class-specific
    models, the class list, since each class has its own model)."""
    d = {k: v for k, v in to_dict(cfg).items() if k not in _NON_RESULT_FIELDS | _INFERENCE_FIELDS}
    if cfg.multi_class:
        d["classes"] = list(cfg.classes)
    return _key(d)


def run_name(cfg: DetectConfig) -> str:
    parts = [cfg.variant, cfg.depth_encoder, cfg.aggregation]
    if cfg.method == "patchcore":
        parts = ["patchcore", cfg.patchcore_features, cfg.patchcore_bank]
    if cfg.num_source_views:
        parts.append(f"k{cfg.num_source_views}")
    if cfg.multi_class:
        parts.append("multiclass")
    return "-".join(parts) + "-" + run_key(cfg)


def resolve_base(acfg: AblateConfig) -> DetectConfig:
    """The DetectConfig every row starts from: defaults ← detect_config YAML ← ``detect`` overrides."""
    data: dict = {}
    if acfg.detect_config:
        path = Path(acfg.detect_config)
        if not path.is_file() and (REPO / path).is_file():
            path = REPO / path
        data = load_yaml(path)
    data = merge_dicts(data, acfg.detect)
    data = merge_dicts(data, {"setup": acfg.setup, "mode": "all"})
    if acfg.classes:
        data["classes"] = list(acfg.classes)
    cfg = from_dict(DetectConfig, data)
    if not cfg.classes and cfg.data_root:
        from detect.pipeline.multiview import list_run_classes

        cfg = dataclasses.replace(cfg, classes=list_run_classes(cfg))  # fixed list: multi-class order, run keys
    cfg = dataclasses.replace(cfg, cache_dir=str(Path(acfg.out) / "features"), feature_cache=True)
    cfg.validate()
    return cfg


@dataclass
class PlannedRun:
    name: str
    cfg: DetectConfig
    tables: list[str] = field(default_factory=list)


def plan(acfg: AblateConfig, base: DetectConfig) -> tuple[dict[str, list[tuple[Row, str]]], dict[str, PlannedRun]]:
    """Rows of every table with the name of the run that produces them, and the unique runs."""
    rows: dict[str, list[tuple[Row, str]]] = {}
    runs: dict[str, PlannedRun] = {}
    for table in acfg.tables:
        spec = TABLES[table]
        rows[table] = []
        table_setup = {"setup": acfg.table_setups[table]} if table in acfg.table_setups else {}
        for row in spec.rows(acfg, base):
            try:
                cfg = from_dict(DetectConfig, merge_dicts(to_dict(base), {**row.overrides, **table_setup}))
            except ConfigError as exc:
                raise ConfigError(f"table {table}, row {row.label!r}: {exc}") from None
            name = run_name(cfg)
            cfg = dataclasses.replace(cfg, out=str(Path(acfg.out) / "runs" / name))
            runs.setdefault(name, PlannedRun(name, cfg)).tables.append(table)
            rows[table].append((row, name))
    # Train-once order: runs sharing a fit key follow each other, full-view runs first.
    order = sorted(runs.values(), key=lambda r: (fit_key(r.cfg), r.cfg.num_source_views != 0, r.name))
    return rows, {r.name: r for r in order}


# -- execution -------------------------------------------------------------------------------------
def _model_files(out: Path, setup: str, unit: str) -> list[Path]:
    folder = out / setup / unit
    return [folder / "model.pt", folder / "train_log.jsonl"]


def _adopt_models(src_out: Path, dst_out: Path, setup: str, unit: str) -> bool:
    """Copy trained model files from another run of the same fit key; False when there are none."""
    files = _model_files(src_out, setup, unit)
    if not files[0].is_file():
        return False
    if Path(src_out).resolve() == Path(dst_out).resolve():  # resuming this run's own models
        return True
    dst = dst_out / setup / unit
    dst.mkdir(parents=True, exist_ok=True)
    for f in files:
        if f.is_file():
            shutil.copy2(f, dst / f.name)
    return True


def _run_units(cfg: DetectConfig) -> list[str]:
    from detect.pipeline.multiview import fit_units

    return fit_units(cfg, cfg.classes)


def _register_models(trained: dict[tuple[str, str, str], Path], cfg: DetectConfig) -> None:
    """Record the trained models the run folder ``cfg.out`` holds, so that runs of the same fit key adopt
    them instead of training again (a model already recorded elsewhere keeps its source)."""
    out, fk = Path(cfg.out), fit_key(cfg)
    for setup in setups(cfg):
        for unit in _run_units(cfg):
            if _model_files(out, setup, unit)[0].is_file():
                trained.setdefault((fk, setup, unit), out)


def _is_complete(run: PlannedRun) -> bool:
    out = Path(run.cfg.out)
    cfg_file, results = out / "config.yaml", out / "results.json"
    if not (cfg_file.is_file() and results.is_file()):
        return False
    try:
        saved = from_dict(DetectConfig, load_yaml(cfg_file))
    except ConfigError:
        return False
    return run_key(saved) == run_key(run.cfg)


def execute_run(run: PlannedRun, trained: dict[tuple[str, str, str], Path]) -> dict[str, dict[str, dict]]:
    """Fit (or adopt models of an equal fit key), predict and evaluate one run; ``{setup: {class: metrics}}``."""
    from detect.pipeline.multiview import run_multiview

    cfg = run.cfg
    out = Path(cfg.out)
    fk = fit_key(cfg)
    # Models left by an interrupted earlier attempt at this very run (same config) are resumed from.
    if (out / "config.yaml").is_file():
        try:
            same = run_key(from_dict(DetectConfig, load_yaml(out / "config.yaml"))) == run_key(cfg)
        except ConfigError:
            same = False
        if same:
            _register_models(trained, cfg)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").unlink(missing_ok=True)  # complete again only when this run finishes

    def adopt(setup: str, unit: str) -> bool:
        src = trained.get((fk, setup, unit))
        if src is not None and _adopt_models(src, out, setup, unit):
            return True
        trained[(fk, setup, unit)] = out  # fitted now, by the run
        return False

    with deterministic(cfg):
        return run_multiview(cfg, adopt)


def _timings(out: Path, results: dict[str, dict[str, dict]]) -> dict[str, dict[str, dict]]:
    """Per setup and class: mean and median mapping/volume/encoding seconds per instance, pairs per instance.

    The median is what the tables show: the first instance of a class also pays one-off costs (kernel
    selection, allocator warm-up) that the paper's timings exclude ("after warm-up", modmap.md §13).
    """
    timings: dict[str, dict[str, dict]] = {}
    for setup, per in results.items():
        for class_name in per:
            path = out / setup / class_name / "timing.json"
            if not path.is_file():
                continue
            data = json.loads(path.read_text())
            inst = data.get("instances", [])
            timings.setdefault(setup, {})[class_name] = {
                **data.get("mean", {}), "device": data.get("device"),
                **{f"median_{k}": float(np.median([i[k] for i in inst])) for k in ("map_s", "volume_s", "encode_s")
                   if inst and all(k in i for i in inst)},
                "pairs_per_instance": float(np.mean([i["n_pairs"] for i in inst])) if inst else None,
                "n_instances": len(inst)}
    return timings


# -- tables ----------------------------------------------------------------------------------------
def _metric(m: dict | None, which: str) -> float | None:
    if not m:
        return None
    v = m.get("image_auroc") if which == DET else (m.get("voxel_aupro") or {}).get("0.01")
    return None if v is None or not math.isfinite(float(v)) else float(v)


def _col(c: str) -> str:
    return PAPER_COLUMNS.get(c, c)


def table_rows(spec: TableSpec, rows: list[tuple[Row, str]], data: dict[str, dict], setup: str) -> tuple[list[str], list[dict]]:
    """Classes (columns) and one record per row for one setup: per-class values and means of both metrics."""
    classes: list[str] = []
    for _, name in rows:
        for c in data[name]["results"].get(setup, {}):
            if c not in classes:
                classes.append(c)
    records = []
    for row, name in rows:
        per = data[name]["results"].get(setup, {})
        rec: dict[str, Any] = {"row": row.label, "run": name}
        for metric in (DET, SEG):
            vals = [_metric(per.get(c), metric) for c in classes]
            rec[metric] = dict(zip(classes, vals))
            rec[metric]["mean"] = complete_mean(vals)
        if spec.timing:
            tim = data[name]["timings"].get(setup, {})
            maps = [tim[c]["median_map_s"] for c in classes if c in tim and tim[c].get("median_map_s") is not None]
            pairs = [tim[c]["pairs_per_instance"] for c in classes if c in tim and tim[c].get("pairs_per_instance")]
            rec["time_ms"] = 1000.0 * float(np.mean(maps)) if maps else None
            rec["pairs_per_instance"] = float(np.mean(pairs)) if pairs else None
        records.append(rec)
    return classes, records


def _bold_best(values: list[float | None], digits: int = 3, suffixes: list[str] | None = None) -> list[str]:
    """Values as shown, the best in bold; ``suffixes`` (e.g. intervals) follow each value, not bolded."""
    suffixes = suffixes or [""] * len(values)
    shown = [fmt(v, digits) for v in values]
    finite = [round(v, digits) for v in values if v is not None]
    if len(set(finite)) >= 2:  # else nothing to single out
        best = max(finite)
        shown = [f"**{s}**" if v is not None and round(v, digits) == best else s for s, v in zip(shown, values)]
    return [s + x for s, x in zip(shown, suffixes)]


@dataclass
class TableStats:
    """Bootstrap statistics of the tables' runs (:func:`detect.pipeline.compare.compare_runs`): ``values``
    each run's metrics with intervals, keyed by setup and run name; ``diffs`` each run minus its table's
    reference row, paired on the same instances (the reference itself has none), keyed by (table, setup)
    and run name — a run in several tables (PatchCore in Tables 3 and 6) has one difference per table."""

    values: dict[str, dict[str, dict]] = field(default_factory=dict)
    diffs: dict[tuple[str, str], dict[str, dict]] = field(default_factory=dict)


def _ci(iv) -> str:
    return ci_text(iv.to_dict()) if iv is not None else ""


def _diff_text(iv) -> str:
    """``+0.050 [-0.02, 0.12]``; a ``*`` marks an interval that excludes 0 (not a chance ordering; never
    a zero-width interval, which one instance per label gives)."""
    if iv is None or not math.isfinite(iv.value):
        return "n/a"
    star = "*" if iv.excludes(0.0) else ""
    return f"{iv.value:+.3f}{ci_text(iv.to_dict())}{star}"


def _stat(stats: TableStats | None, kind: str, setup: str | tuple[str, str], run: str, metric: str, key: str):
    table = getattr(stats, kind, {}) if stats is not None else {}
    return ((table.get(setup) or {}).get(run) or {}).get(metric, {}).get(key)


def render_table(spec: TableSpec, rows: list[tuple[Row, str]], data: dict[str, dict], setups: list[str],
                 stats: TableStats | None = None) -> tuple[str, list[dict]]:
    """Markdown of one paper table and its CSV records. With ``stats``: every value with its 95 %
    bootstrap interval over instances, and per setup a table of each row minus the reference row with the
    paired bootstrap interval of the difference."""
    lines = [f"## Table {spec.number} — {spec.title}", ""]
    csv_rows: list[dict] = []
    ref = spec.reference([r for r, _ in rows]) if rows else 0
    ref_label, ref_run = (rows[ref][0].label, rows[ref][1]) if rows else ("", "")
    if spec.setup_columns:
        head = "| Model | " + " | ".join(f"{s} {m}" for s in setups for m in (DET, SEG)) + " |"
        lines += [head, "|---|" + "---|" * (2 * len(setups))]
        cells: list[list[float | None]] = []
        sufs: list[list[str]] = []
        labels = []
        for row, _ in rows:
            labels.append(row.label)
            cells.append([])
            sufs.append([])
        for s in setups:
            _, recs = table_rows(spec, rows, data, s)
            for i, rec in enumerate(recs):
                cells[i] += [rec[DET]["mean"], rec[SEG]["mean"]]
                sufs[i] += [_ci(_stat(stats, "values", s, rec["run"], m, "mean")) for m in (DET, SEG)]
        cols = list(zip(*cells)) if cells else []
        suf_cols = list(zip(*sufs)) if sufs else []
        shown_cols = [_bold_best(list(c), suffixes=list(x)) for c, x in zip(cols, suf_cols)]
        for i, label in enumerate(labels):
            lines.append(f"| {label} | " + " | ".join(col[i] for col in shown_cols) + " |")
        lines.append("")
        lines.append("Means over classes; per-class values below.")
        lines.append("")
    for s in setups:
        classes, recs = table_rows(spec, rows, data, s)
        cols = [_col(c) for c in classes]
        head = ["Views (K)" if spec.timing else "Variant"]
        if spec.timing:
            head += ["time/instance [ms]", "pairs/instance"]
        head += [f"Det. {c}" for c in cols] + ["**Det. mean**"] + [f"Seg. {c}" for c in cols] + ["**Seg. mean**"]
        lines += [f"### {s}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        # bold the best value of every metric column
        columns: list[list[str]] = []
        if spec.timing:
            columns.append([fmt(r["time_ms"], 1) for r in recs])
            columns.append([fmt(r["pairs_per_instance"], 0) for r in recs])
        for metric in (DET, SEG):
            for key in [*classes, "mean"]:
                columns.append(_bold_best([r[metric][key] for r in recs],
                                          suffixes=[_ci(_stat(stats, "values", s, r["run"], metric, key)) for r in recs]))
        for i, rec in enumerate(recs):
            lines.append(f"| {rec['row']} | " + " | ".join(col[i] for col in columns) + " |")
            for metric in (DET, SEG):
                iv = {k: _stat(stats, "values", s, rec["run"], metric, k) for k in [*classes, "mean"]}
                csv_rows.append({"table": spec.number, "setup": s, "row": rec["row"], "run": rec["run"],
                                 "metric": metric, **{c: rec[metric][c] for c in classes},
                                 "mean": rec[metric]["mean"],
                                 **{f"{k}_ci95_{e}": getattr(v, e) for k, v in iv.items() if v is not None
                                    for e in ("low", "high")},
                                 **({"time_ms": rec["time_ms"], "pairs_per_instance": rec["pairs_per_instance"]}
                                    if spec.timing else {})})
        lines.append("")
        if stats is not None and len(recs) > 1:
            lines += [f"Paired differences, row − **{ref_label}** (same instances; 95 % paired bootstrap "
                      "interval over instances; * = the interval excludes 0):", ""]
            dhead = ["Variant"] + [f"ΔDet. {c}" for c in cols] + ["**ΔDet. mean**"] + [f"ΔSeg. {c}" for c in cols] \
                + ["**ΔSeg. mean**"]
            lines += ["| " + " | ".join(dhead) + " |", "|" + "---|" * len(dhead)]
            for rec in recs:
                if rec["run"] == ref_run:
                    continue
                cells_d = [_diff_text(_stat(stats, "diffs", (spec.name, s), rec["run"], m, k)) for m in (DET, SEG)
                           for k in [*classes, "mean"]]
                lines.append(f"| {rec['row']} | " + " | ".join(cells_d) + " |")
                for metric in (DET, SEG):
                    iv = {k: _stat(stats, "diffs", (spec.name, s), rec["run"], metric, k) for k in [*classes, "mean"]}
                    csv_rows.append({"table": spec.number, "setup": s, "row": rec["row"], "run": rec["run"],
                                     "metric": f"{metric} - reference", "reference": ref_label,
                                     **{k: (v.value if v is not None else None) for k, v in iv.items()},
                                     **{f"{k}_ci95_{e}": getattr(v, e) for k, v in iv.items() if v is not None
                                        for e in ("low", "high")}})
            lines.append("")
    lines.append("Det. = I-AUROC, Seg. = V-AUPRO@1% (exact voxel AUPRO at FPR 0.01, metrics.md); best value "
                 "per column in bold." + (" [a, b] = 95 % stratified bootstrap interval over instances (the "
                                          "mean's: classes resampled independently)." if stats is not None else ""))
    if spec.note:
        lines += ["", spec.note]
    return "\n".join(lines) + "\n", csv_rows


def table_stats(acfg: AblateConfig, rows: dict[str, list[tuple[Row, str]]], data: dict[str, dict],
                configs: dict[str, DetectConfig], n_boot: int = 1000) -> TableStats:
    """Intervals of every run and paired differences with each table's reference row, in each setup the
    table shows (``acfg.setups_of``), on the instances of every class (the evidence each run left in its
    folder: scores, volumes)."""
    from detect.pipeline.compare import compare_runs, run_evidence

    stats = TableStats()

    def ev(run: str, setup: str):  # read class by class when compared, not kept
        classes = list(data[run]["results"].get(setup, {}))
        return run_evidence(configs[run], Path(data[run]["out"]), setup, classes, pixels=False) if classes else None

    for table in acfg.tables:
        spec = TABLES[table]
        trows = rows[table]
        if not trows:
            continue
        ref_run = trows[spec.reference([r for r, _ in trows])][1]
        for s in acfg.setups_of(table):
            for _, run in trows:
                a = ev(run, s)
                if a is None:
                    continue
                seed = configs[run].seed
                if run not in stats.values.get(s, {}):  # a run in several tables: its values once
                    stats.values.setdefault(s, {})[run] = compare_runs(a, None, n_boot, seed)
                b = ev(ref_run, s)
                if run != ref_run and b is not None and sorted(a) == sorted(b):
                    stats.diffs.setdefault((table, s), {})[run] = compare_runs(a, b, n_boot, seed)
    return stats


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10, check=False)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10, check=False)
        return out.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _describe_encoders(data: dict[str, dict]) -> list[str]:
    """One line per distinct encoder found in the runs' model files."""
    from shared.checkpoint import load_checkpoint

    seen: dict[str, str] = {}
    for entry in data.values():
        out = Path(entry["out"])
        for model in sorted(out.glob("*/*/model.pt"))[:1]:
            meta = load_checkpoint(model)["config"]
            for key in ("image_encoder", "depth_encoder"):
                enc = meta[key]
                arch = enc.get("arch", {})
                desc = (f"{enc.get('kind', enc['name'])}: {enc['weights']} (sha256 {enc['sha256'][:12]}…, "
                        f"embed {arch.get('embed_dim')}, {arch.get('depth')} blocks, patch {arch.get('patch_size')}"
                        f"{', RANDOM weights' if enc.get('random') else ''})")
                seen.setdefault(f"{key}:{desc}", f"{key.replace('_', ' ')} — {desc}")
    return sorted(seen.values())


def diagnostics(data: dict[str, dict], setups: list[str]) -> list[str]:
    """Per run and setup: the class means of every metric the runs computed, incl. the 2D per-view maps
    against the 2D GT masks (O-P-AUROC on object pixels) next to the voxel metrics — where the two disagree, the loss happens
    in the 2D → 3D aggregation rather than in the feature mapping."""
    keys = [("I-AUROC", lambda m: m.get("image_auroc")), ("O-P-AUROC", lambda m: m.get("object_pixel_auroc")),
            ("P-AUROC all px", lambda m: m.get("pixel_auroc")),
            ("V-AUROC", lambda m: m.get("voxel_auroc")),
            ("V-AUPRO@30%", lambda m: (m.get("voxel_aupro") or {}).get("0.3")),
            ("V-AUPRO@1%", lambda m: (m.get("voxel_aupro") or {}).get("0.01"))]
    lines = ["## Diagnostics: all metrics per run (means over classes)", "",
             "| Run | Setup | " + " | ".join(k for k, _ in keys) + " | run time [min] |",
             "|---|---|" + "---|" * (len(keys) + 1)]
    for name, entry in data.items():
        for s in setups:
            per = entry["results"].get(s)
            if not per:
                continue
            vals = []
            for _, get in keys:
                got = [get(m) for m in per.values()]
                ok = [float(v) for v in got if v is not None and math.isfinite(float(v))]
                vals.append(fmt(float(np.mean(ok)) if ok and len(ok) == len(got) else None))
            secs = entry.get("seconds")
            lines.append(f"| {name} | {s} | " + " | ".join(vals) + f" | {fmt(secs / 60 if secs else None, 1)} |")
    lines += ["", "O-P-AUROC: per-view 2D maps at the original resolution against the 2D GT masks on the object's "
              "foreground pixels (valid depth ∪ GT); P-AUROC all px: the same over all pixels, background "
              "included (scored 0 by every variant, so inflated: not evidence that the maps carry signal); "
              "V-AUROC / V-AUPRO: anomaly volumes against the GT volumes (occupied voxels). Run time: wall "
              "time of the run when it was computed (fit, unless adopted from a run with the same training "
              "settings, + predict + evaluate).", ""]
    return lines


def write_report(acfg: AblateConfig, base: DetectConfig, rows: dict[str, list[tuple[Row, str]]],
                 data: dict[str, dict], command: str, seconds: float,
                 configs: dict[str, DetectConfig] | None = None) -> Path:
    out = Path(acfg.out)
    (out / "tables").mkdir(parents=True, exist_ok=True)
    setups = acfg.all_setups()
    random_image = base.image_encoder == "random"
    lines = ["# ModMap ablations", ""]
    if random_image:
        lines += ["**Image encoder: randomly initialised (`image_encoder: random`) — no DINOv2 weights were used.** "
                  "Read the image-feature side of every number below accordingly.", ""]
    lines += ["Produced by", "", "```bash", command, "```", "",
              f"- code: commit {_git_commit()}",
              f"- data: `{base.data_root}`, classes {list(base.classes)}, setups {setups}"
              + "".join(f"; {t}: {acfg.setups_of(t)}" for t in acfg.tables if t in acfg.table_setups),
              f"- base config: `{acfg.detect_config or '(paper defaults)'}` + {json.dumps(acfg.detect, sort_keys=True)}",
              f"- training: {base.epochs} epochs, batch {base.batch_size}, lr_max {base.lr_max}, "
              f"match_steps {base.match_steps}, image size {base.image_size}, seed {base.seed}",
              f"- device: {base.device}; wall time of this command: {seconds / 60:.1f} min "
              "(runs reused from an earlier invocation cost nothing here)"]
    lines += [f"- {d}" for d in _describe_encoders(data)]
    lines += [f"- resolved configs: `configs/` ({len(data)} runs); per-run outputs: `runs/`", ""]
    stats = table_stats(acfg, rows, data, configs) if configs is not None else None
    all_csv: list[dict] = []
    for table in acfg.tables:
        spec = TABLES[table]
        md, records = render_table(spec, rows[table], data, acfg.setups_of(table), stats)
        stem = f"table{spec.number:02d}_{spec.name}"
        atomic_write_text(out / "tables" / f"{stem}.md", md)
        write_csv(out / "tables" / f"{stem}.csv", records, float_format=".6f")
        all_csv += records
        lines.append(md)
    write_csv(out / "tables" / "all.csv", all_csv, float_format=".6f")
    lines += diagnostics(data, setups)
    atomic_write_text(out / "report.md", "\n".join(lines))
    return out / "report.md"


# -- driver ----------------------------------------------------------------------------------------
def run_ablation(acfg: AblateConfig, command: str = "") -> Path:
    """Run every table of ``acfg``; returns the report path."""
    from tqdm import tqdm

    acfg.validate()
    t0 = time.perf_counter()
    base = resolve_base(acfg)
    rows, runs = plan(acfg, base)
    out = Path(acfg.out)
    (out / "configs").mkdir(parents=True, exist_ok=True)
    save_config(acfg, out / "ablation_config.yaml")
    trained: dict[tuple[str, str, str], Path] = {}
    complete = {name for name, run in runs.items() if acfg.reuse and _is_complete(run)}
    for name in complete:  # models of finished runs first: a new run anywhere in the order adopts them
        _register_models(trained, runs[name].cfg)
    data: dict[str, dict] = {}
    bar = tqdm(total=len(runs), desc="ablation runs", unit="run", disable=not base.progress, dynamic_ncols=True)
    for name, run in runs.items():
        save_config(run.cfg, out / "configs" / f"{name}.yaml")
        bar.set_postfix_str(name)
        if name in complete:
            results = read_results(Path(run.cfg.out))
        else:
            t_run = time.perf_counter()
            results = execute_run(run, trained)
            atomic_write_json(Path(run.cfg.out) / "run_info.json",
                              {"seconds": time.perf_counter() - t_run, "adopted_models": False})
        info_path = Path(run.cfg.out) / "run_info.json"
        info = json.loads(info_path.read_text()) if info_path.is_file() else {}
        data[name] = {"out": run.cfg.out, "tables": run.tables, "results": results,
                      "timings": _timings(Path(run.cfg.out), results), "seconds": info.get("seconds")}
        bar.update(1)
    bar.close()
    seconds = time.perf_counter() - t0
    report = write_report(acfg, base, rows, data, command, seconds, {n: r.cfg for n, r in runs.items()})
    atomic_write_json(out / "ablation.json", jsonable({
        "command": command, "seconds": seconds, "tables": {t: [[r.label, n] for r, n in rows[t]] for t in rows},
        "runs": data}))
    return report
