"""Every results table and machine-readable record of detect/: numbers shown once (:func:`fmt`), JSON
without NaN (:func:`jsonable`), CSV written atomically (:func:`write_csv`); the per-class table of a
multiview run (the paper's Table 1 layout) and of a single-view run."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from shared.io import atomic_write_bytes, atomic_write_json, atomic_write_text

# Paper column names (Table 1) of the SiM3D classes, in the paper's order.
PAPER_COLUMNS = {
    "plastic_stool": "Pl. Stool", "rubbish_bin": "Rub. Bin", "wicker_vase": "W. Vase",
    "bathroom_forniture": "B. Furn.", "container": "Cont.", "plastic_vase": "Pl. Vase",
    "wooden_stool": "W. Stool", "sink_cabinet": "Sink Cab.",
}
# The single-view tables' P-AUROC domain, named wherever they are written (issue 18)
ALL_PIXEL_P_AUROC = ("P-AUROC over all pixels of every image (the published MVTec 3D-AD / CFM convention, kept for parity; on views with a background, e.g. the SiM3D-layout benchmark, the background that every method scores low counts as correctly ranked, so the value is inflated and does not show that the maps separate anomalous from nominal object pixels)")
RANDOM_ENCODER_BANNER = "**RANDOM IMAGE ENCODER (--image-encoder random): test/demo output, not a real result.**"


def fmt(v: Any, digits: int = 3) -> str:
    """A metric in a table: ``digits`` decimals, ``n/a`` when missing or not finite."""
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


def jsonable(obj: Any) -> Any:
    """Plain JSON types: numpy scalars to Python, NaN/inf to null, keys to strings."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return None if not math.isfinite(float(obj)) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def write_csv(path: Path, rows: list[dict], columns: Sequence[str] | None = None,
              float_format: str | None = None) -> None:
    """Rows as CSV (atomically); ``columns`` None = every key in first-seen order (missing cells empty,
    ``float_format`` e.g. ``.6f`` for floats; None cells empty)."""
    if columns is None:
        seen: list[str] = []
        for r in rows:
            seen += [k for k in r if k not in seen]
        columns = seen
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        if float_format is not None:
            r = {k: ("" if r.get(k) is None else (format(r[k], float_format) if isinstance(r.get(k), float) else r[k]))
                 for k in columns}
        writer.writerow(r)
    atomic_write_text(path, buf.getvalue())


def ci_text(ci: dict | None) -> str:
    """`` [low, high]`` of a stored interval (empty when there is none)."""
    if not ci or ci.get("low") is None:
        return ""
    return f" [{ci['low']:.2f}, {ci['high']:.2f}]"


def complete_mean(vals: Sequence[float | None]) -> float | None:
    """Mean over classes, only when every class has a finite value."""
    ok = [v for v in vals if v is not None and math.isfinite(v)]
    return float(np.mean(ok)) if ok and len(ok) == len(vals) else None


def read_results(out: Path) -> dict[str, dict[str, dict]]:
    """``results`` of a finished run's ``<out>/results.json``."""
    import json

    return json.loads((Path(out) / "results.json").read_text())["results"]


# -- class-mean intervals --------------------------------------------------------------------------
REPLICATES_DIR = "bootstrap_replicates"  # <class dir>/bootstrap_replicates/<metric key>.npz
# results.md headline metric → key of its replicates file
MEAN_CI_KEYS = {"I-AUROC": "image_auroc", "V-AUPRO@1%": "voxel_aupro@0.01", "O-P-AUROC": "object_pixel_auroc"}


def save_replicates(class_dir: Path, key: str, value: float, replicates: np.ndarray) -> None:
    """One class's exact value and bootstrap replicates of a metric (resampled with the class's own seed,
    :func:`detect.metrics.class_seed`), kept so that the mean over classes gets an interval."""
    buf = io.BytesIO()
    np.savez(buf, value=np.float64(value), replicates=np.asarray(replicates, dtype=np.float64))
    atomic_write_bytes(Path(class_dir) / REPLICATES_DIR / f"{key}.npz", buf.getvalue())


def class_mean_intervals(out: Path, results: dict[str, dict[str, dict]]) -> dict[str, dict[str, dict]]:
    """``{setup: {metric key: Interval dict}}``: the mean over a setup's classes with its bootstrap interval
    (replicate k of the mean = mean of the classes' replicates k), for the metrics every class saved."""
    from detect.metrics import mean_interval

    means: dict[str, dict[str, dict]] = {}
    for setup, per in results.items():
        for key in MEAN_CI_KEYS.values():
            parts = []
            for class_name in per:
                path = Path(out) / setup / class_name / REPLICATES_DIR / f"{key}.npz"
                if not path.is_file():
                    break
                with np.load(path) as z:
                    parts.append((float(z["value"]), z["replicates"]))
            else:
                if parts and len({r.size for _, r in parts}) == 1:
                    means.setdefault(setup, {})[key] = mean_interval(parts).to_dict()
    return means


# -- multiview (SiM3D layout) ----------------------------------------------------------------------
def write_results(out: Path, results: dict[str, dict[str, dict]], random_encoder: bool,
                  title: str = "ModMap results") -> None:
    """Per-class table in the layout of the paper's Table 1 (classes as columns + Mean) under ``title``."""
    classes = sorted({c for per in results.values() for c in per},
                     key=lambda c: (list(PAPER_COLUMNS).index(c) if c in PAPER_COLUMNS else len(PAPER_COLUMNS), c))
    headline = [("I-AUROC", lambda m: m.get("image_auroc")),
                ("V-AUPRO@1%", lambda m: (m.get("voxel_aupro") or {}).get("0.01")),
                ("O-P-AUROC", lambda m: m.get("object_pixel_auroc"))]
    # 95 % bootstrap intervals over instances (detect/metrics.py), shown next to each class's value
    intervals = {"I-AUROC": lambda m: m.get("image_auroc_ci"),
                 "V-AUPRO@1%": lambda m: (m.get("voxel_aupro_ci") or {}).get("0.01"),
                 "O-P-AUROC": lambda m: m.get("object_pixel_auroc_ci")}
    full = [("image_auroc", lambda m: m.get("image_auroc")), ("voxel_auroc", lambda m: m.get("voxel_auroc"))]
    for lim in ("0.3", "0.1", "0.05", "0.01"):
        full.append((f"voxel_aupro@{lim}", lambda m, lim=lim: (m.get("voxel_aupro") or {}).get(lim)))
    full += [("pixel_auroc", lambda m: m.get("pixel_auroc")),
             ("pixel_aupro@0.3", lambda m: (m.get("pixel_aupro") or {}).get("0.3")),
             ("object_pixel_auroc", lambda m: m.get("object_pixel_auroc")),
             ("object_pixel_aupro@0.3", lambda m: (m.get("object_pixel_aupro") or {}).get("0.3"))]
    for key, get_ci in (("image_auroc", lambda m: m.get("image_auroc_ci")),
                        ("voxel_auroc", lambda m: m.get("voxel_auroc_ci")),
                        ("voxel_aupro@0.01", lambda m: (m.get("voxel_aupro_ci") or {}).get("0.01")),
                        ("object_pixel_auroc", lambda m: m.get("object_pixel_auroc_ci"))):
        for end in ("low", "high"):
            full.append((f"{key}_ci95_{end}", lambda m, g=get_ci, e=end: (g(m) or {}).get(e)))

    means = class_mean_intervals(out, results)
    lines = [f"# {title}", ""]
    if random_encoder:
        lines += [RANDOM_ENCODER_BANNER, ""]
    cols = [PAPER_COLUMNS.get(c, c) for c in classes]
    lines.append("| Setup | Metric | " + " | ".join(cols) + " | Mean |")
    lines.append("|---|---|" + "---|" * (len(cols) + 1))
    csv_rows = []
    for setup, per in results.items():
        for name, get in headline:
            vals = [get(per[c]) if c in per else None for c in classes]
            cells = [fmt(v) + ci_text(intervals[name](per[c]) if c in per else None) for v, c in zip(vals, classes)]
            mean_ci = means.get(setup, {}).get(MEAN_CI_KEYS[name]) if None not in vals else None
            lines.append(f"| {setup} | {name} | " + " | ".join(cells)
                         + f" | {fmt(complete_mean(vals))}{ci_text(mean_ci)} |")
        for name, get in full:
            vals = [get(per[c]) if c in per else None for c in classes]
            row = {"setup": setup, "metric": name, **{c: vals[i] for i, c in enumerate(classes)}, "mean": complete_mean(vals)}
            csv_rows.append(row)
    lines += ["", "V-AUPRO@1% = exact voxel AUPRO at FPR 0.01 (metrics.md); voxel eval domain: "
              + ", ".join(sorted({str(m.get('eval_domain')) for per in results.values() for m in per.values()}))
              + ". O-P-AUROC = pixel AUROC on the object foreground of every view (valid depth ∪ GT-anomalous "
              "pixels; results.csv also has pixel_auroc over all pixels). [a, b] = 95 % stratified bootstrap "
              "interval over the class's instances; Mean = mean over classes, its interval from the classes' "
              "replicates (each class resampled independently).", ""]
    atomic_write_text(out / "results.md", "\n".join(lines))
    write_csv(out / "results.csv", [{k: ("" if v is None else v) for k, v in r.items()} for r in csv_rows],
              ["setup", "metric", *classes, "mean"])
    atomic_write_json(out / "results.json", jsonable({"title": title, "random_image_encoder": random_encoder,
                                                   "results": results, "class_mean": means}))



# -- single view (2D metrics) ---------------------------------------------------------------------
def single_view_metric(m: dict, key: str) -> float | None:
    if key.startswith("pixel_aupro@"):
        return (m.get("pixel_aupro") or {}).get(key.split("@", 1)[1])
    return m.get(key)


def results_table(results: dict[str, dict[str, dict]], limits: Sequence[float]) -> tuple[list[str], list[dict]]:
    """Markdown lines and CSV rows: ``results[method][class] = metrics``; classes as columns + Mean."""
    classes = sorted({c for per in results.values() for c in per})
    metrics = [("I-AUROC", "image_auroc"), ("P-AUROC", "pixel_auroc")]
    metrics += [(f"AUPRO@{percent(a)}", f"pixel_aupro@{a}") for a in limits]
    lines = ["| Method | Metric | " + " | ".join(classes) + " | Mean |", "|---|---|" + "---|" * (len(classes) + 1)]
    rows = []
    for method, per in results.items():
        for label, key in metrics:
            vals = [single_view_metric(per[c], key) if c in per else None for c in classes]
            mean = complete_mean(vals)
            lines.append(f"| {method} | {label} | " + " | ".join(fmt(v) for v in vals) + f" | {fmt(mean)} |")
            rows.append({"method": method, "metric": key, **{c: vals[i] for i, c in enumerate(classes)}, "mean": mean})
    return lines, rows


def percent(a: float) -> str:
    return f"{a * 100:g}%"


def write_single_view_results(out: Path, dataset: str, method: str, pro_limits: Sequence[float],
                              results: dict[str, dict], random_encoder: bool) -> None:
    """``<out>/results.{md,csv,json}`` of a single-view run (``results[class] = metrics``)."""
    lines = [f"# Single-view results — {dataset}, {method}", ""]
    if random_encoder:
        lines += [RANDOM_ENCODER_BANNER, ""]
    table, rows = results_table({method: results}, pro_limits)
    lines += table
    any_m = next(iter(results.values()), {})
    lines += ["", f"I-AUROC over per-image scores; {ALL_PIXEL_P_AUROC}; AUPRO = exact PRO (8-connected GT regions), "
              f"integrated to the FPR limit and divided by it (metrics.md). Evaluation resolution: "
              f"{any_m.get('eval_res', 'native')}; per-image score normalisation: {any_m.get('score_norm', 'none')}.", ""]
    atomic_write_text(out / "results.md", "\n".join(lines))
    classes = sorted(results)
    write_csv(out / "results.csv", [{k: ("" if v is None else v) for k, v in r.items()} for r in rows],
              ["method", "metric", *classes, "mean"])
    atomic_write_json(out / "results.json", jsonable({"dataset": dataset, "method": method,
                                                      "random_image_encoder": random_encoder, "results": results}))
