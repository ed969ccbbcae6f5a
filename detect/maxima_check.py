"""Where do the instance maxima come from? A diagnostic of a fitted multiview run (issue 23).

For every test instance of the chosen classes it runs the run's own prediction (same settings, same
scorer: ``--method patchcore`` banks or the ModMap model) and reports where the instance score — the
maximum of the anomaly volume — lies:

* the voxel of the volume's maximum and its distance (voxels) to the nearest GT-anomalous voxel;
* the view whose map holds the largest value, the pixel of that maximum (original resolution), its
  distance (pixels) to the nearest invalid-depth pixel (silhouette or depth hole), whether it lies on a
  saturated image pixel (the benchmark's specular artefacts saturate) and whether on the GT mask;
* the artefacts ``meta.json`` lists for that view.

Usage (the options of ``detect/run.py``; the run in ``--out`` must be fitted)::

    python detect/maxima_check.py --config configs/detect/demo_cpu.yaml --data DIR --ckpt CKPT \
        --cache-dir FEATS --out RUN --method patchcore classes=[stool,vase] --json maxima.json

Writes one JSON record per instance and prints a summary per class.
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a script: put the repo root on sys.path instead of the script dir
    import pathlib
    import sys

    sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import json
import sys

import numpy as np

from detect.config import parse_config, setups
from shared.cli import fail, run_main
from shared.config import ConfigError
from shared.io import atomic_write_json

SATURATED = 250  # grey level at and above which a pixel counts as saturated (specular highlight)


def _distance_to_invalid(depth: np.ndarray) -> np.ndarray:
    """Euclidean distance (pixels) of every pixel to the nearest invalid-depth pixel (0 on invalid ones)."""
    import cv2

    valid = (np.isfinite(depth) & (depth > 0)).astype(np.uint8)
    return cv2.distanceTransform(valid, cv2.DIST_L2, 5)


def _distance_to_labels(labels: np.ndarray) -> np.ndarray:
    """Euclidean distance (voxels) of every voxel to the nearest GT-anomalous voxel (inf without any)."""
    from scipy import ndimage

    if not labels.any():
        return np.full(labels.shape, np.inf, dtype=np.float32)
    return ndimage.distance_transform_edt(~labels).astype(np.float32)


def check_class(runner, setup: str, class_name: str) -> list[dict]:
    """One record per test instance of ``class_name`` (see the module docstring)."""
    import torch

    from detect.infer import predict_instance
    from detect.pipeline.base import progress_bar
    from detect.pipeline.multiview import class_dataset, load_view
    from detect.pipeline.settings import inference_settings

    cfg = runner.cfg
    ds = class_dataset(cfg, class_name)
    inf = inference_settings(cfg)
    if cfg.method == "patchcore":
        from detect.patchcore import PatchCoreScorer

        model, scorer = None, PatchCoreScorer(inf, runner.load_patchcore(setup, class_name, ds.n_views, ds.stems)[0])
    else:
        model, _ = runner.load_model(setup, class_name, ds.n_views, ds.stems)
        scorer = runner.scorer(runner.class_dir(setup, class_name))
    records = []
    bar = progress_bar(len(ds.test_records), f"maxima {setup}/{class_name}", runner.cfg.progress, "instance")
    for record in ds.test_records:
        bar.update(1)
        feats, _ = runner.features(ds, record, f"{class_name}/{record.name}")
        image, depth, _ = feats.tensors(runner.device)
        gt = ds.load_gt(record)
        meta = json.loads((record.path / "meta.json").read_text()) if (record.path / "meta.json").is_file() else {}
        views: list[dict] = []
        current: dict = {}

        def load(t: int, _rec=record, _cur=current):
            v = load_view(ds, _rec, t)
            _cur["view"] = v
            return v.depth, v.calib

        def on_view(maps, combined_orig, _cur=current, _views=views, _meta=meta):
            v = _cur["view"]
            m = np.asarray(combined_orig, dtype=np.float32)
            r, c = np.unravel_index(int(np.argmax(m)), m.shape)
            img = np.asarray(v.image)
            gray = img if img.ndim == 2 else img.mean(axis=-1)
            _views.append({"view": v.stem, "max": float(m[r, c]), "pixel": [int(r), int(c)],
                           "dist_invalid_px": float(_distance_to_invalid(v.depth)[r, c]),
                           "saturated": bool(gray[r, c] >= SATURATED),
                           "on_gt_mask": bool(v.mask[r, c]) if v.mask is not None else None,
                           "artefacts": list(_meta.get("artefacts", {}).get(v.stem, []))})

        with torch.no_grad():
            pred = predict_instance(model, image, depth, feats.grid, load, feats.geometries, cfg.image_size,
                                    runner.depth_norm, inf, gt.grid if gt is not None else None, on_view, None,
                                    scorer)
        rec = {"class": class_name, "instance": record.name, "label": int(record.label),
               "score": float(pred.pred_score)}
        if pred.volume is not None and gt is not None:
            vol = pred.volume.volume()
            idx = np.unravel_index(int(np.argmax(vol)), vol.shape)
            rec["max_voxel"] = [int(i) for i in idx]
            rec["max_voxel_dist_to_gt"] = float(_distance_to_labels(gt.labels)[idx])
        best = max(views, key=lambda d: d["max"])
        rec["top_view"] = best
        rec["views_max"] = {d["view"]: round(d["max"], 4) for d in views}
        records.append(rec)
    bar.close()
    return records


def summary(records: list[dict]) -> str:
    """Per class: how many maxima sit within one voxel of the defect, next to invalid depth, on saturation."""
    lines = ["class | label | n | max within 1 voxel of GT | top-view max ≤ 3 px from invalid depth | "
             "on saturated pixel | top view has an artefact | on GT mask",
             "---|---|---|---|---|---|---|---"]
    for cls in sorted({r["class"] for r in records}):
        for label in (0, 1):
            rs = [r for r in records if r["class"] == cls and r["label"] == label]
            if not rs:
                continue
            near = sum(1 for r in rs if r.get("max_voxel_dist_to_gt", np.inf) <= 1.0)
            sil = sum(1 for r in rs if r["top_view"]["dist_invalid_px"] <= 3.0)
            sat = sum(1 for r in rs if r["top_view"]["saturated"])
            art = sum(1 for r in rs if r["top_view"]["artefacts"])
            gtm = sum(1 for r in rs if r["top_view"]["on_gt_mask"])
            lines.append(f"{cls} | {'anomalous' if label else 'nominal'} | {len(rs)} | {near} | {sil} | {sat} | "
                         f"{art} | {gtm}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if "-h" in args or "--help" in args:  # our usage, then the detect/run.py options it takes
        print("usage: python detect/maxima_check.py [--json FILE] <detect/run.py options>\n\n"
              + __doc__.split("\n\n")[0] + "\n\n  --json FILE   write one record per instance to FILE\n\n"
              "The detect/run.py options (the run in --out must be fitted):\n")
        args = ["--help"]
    out_json = None
    if "--json" in args:  # our one option; everything else is detect/run.py's
        i = args.index("--json")
        if i + 1 >= len(args):
            return fail(ConfigError("--json needs a file name"))
        out_json = args[i + 1]
        del args[i:i + 2]
    try:
        cfg = parse_config(args)
    except ConfigError as exc:
        return fail(exc)
    from detect.pipeline.base import RunError
    from detect.pipeline.multiview import MultiviewRunner, list_run_classes

    try:
        runner = MultiviewRunner(cfg)
        records: list[dict] = []
        for setup in setups(cfg):
            for class_name in list_run_classes(cfg):
                records += check_class(runner, setup, class_name)
    except RunError as exc:
        return fail(exc)
    print(summary(records))
    if out_json:
        atomic_write_json(out_json, records, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
