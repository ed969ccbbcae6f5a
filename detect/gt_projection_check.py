"""Upper bound of the 2D → 3D path: project the 2D GT masks as if they were anomaly maps.

    python detect/gt_projection_check.py --data data/synthetic [--classes vase,bin] [--out check.md]

For every test instance, each view's 2D GT mask (1 on anomalous pixels, 0 elsewhere) is back-projected
and max-aggregated into the GT voxel grid exactly like ModMap's anomaly maps (:class:`detect.volume.
VolumeAccumulator`, all valid-depth pixels as foreground), then scored with the same voxel metrics and
evaluation domain as ``detect/run.py`` (occupied voxels ∪ GT voxels). A perfect 2D detector cannot do
better than this in V-AUROC / V-AUPRO; ``GT voxels reached`` is the fraction of anomalous GT voxels that
any masked pixel lands in (those never observed as surface, e.g. removed material, stay at 0).
"""

if __package__ in (None, ""):  # run as a script: put the repo root on sys.path instead of the script dir
    import pathlib
    import sys

    sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import sys
import warnings
from pathlib import Path

import numpy as np

from shared.cli import ArgumentParser, fail, run_main


def check_class(root: str, class_name: str, limits: tuple[float, ...] = (0.3, 0.01)) -> dict:
    from detect.data.sim3d import SiM3DClass
    from detect.metrics import SegmentationAccumulator
    from detect.volume import VolumeAccumulator

    ds = SiM3DClass(root, class_name, calib_reader="npz", gt_reader="npz")
    acc = SegmentationAccumulator()
    reached, total = 0, 0
    for record in ds.test_records:
        gt = ds.load_gt(record)
        if gt is None:
            raise ValueError(f"{class_name}/{record.name}: no GT volume")
        vol = VolumeAccumulator(gt.grid)
        for t in range(ds.n_views):
            view = ds.load_view(record, t)
            if view.mask is None:
                raise ValueError(f"{class_name}/{record.name}, view {view.stem}: no 2D GT mask")
            valid = np.isfinite(view.depth)
            vol.add_view(view.depth, view.calib, (view.mask > 0).astype(np.float32), valid)
        scores = vol.volume()
        reached += int(np.count_nonzero(gt.labels & (scores > 0)))
        total += int(np.count_nonzero(gt.labels))
        acc.add(scores, gt.labels, gt.occupancy | gt.labels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = acc.compute(limits, prefix="voxel")
    return {"class": class_name, "voxel_auroc": res["voxel_auroc"],
            "voxel_aupro": {str(k): v for k, v in res["voxel_aupro"].items()},
            "gt_voxels_reached": reached / total if total else float("nan"), "n_gt_voxels": total}


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python detect/gt_projection_check.py", description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="dataset root with 2D GT masks and GT volumes (synthetic benchmark)")
    p.add_argument("--classes", default="", help="comma-separated classes (default: all)")
    p.add_argument("--out", default="", help="also write the Markdown table here")
    args = p.parse_args(argv)
    from detect.data.sim3d import SiM3DError, list_classes

    try:
        classes = [c for c in args.classes.split(",") if c] or list_classes(args.data)
        rows = [check_class(args.data, c) for c in classes]
    except (SiM3DError, ValueError) as exc:
        return fail(exc)
    lines = ["| Class | V-AUROC | V-AUPRO@30% | V-AUPRO@1% | GT voxels reached |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['class']} | {r['voxel_auroc']:.3f} | {r['voxel_aupro']['0.3']:.3f} | "
                     f"{r['voxel_aupro']['0.01']:.3f} | {r['gt_voxels_reached']:.3f} |")
    mean = {k: float(np.mean([r[k] for r in rows])) for k in ("voxel_auroc", "gt_voxels_reached")}
    mean30 = float(np.mean([r["voxel_aupro"]["0.3"] for r in rows]))
    mean1 = float(np.mean([r["voxel_aupro"]["0.01"] for r in rows]))
    lines.append(f"| **mean** | {mean['voxel_auroc']:.3f} | {mean30:.3f} | {mean1:.3f} | "
                 f"{mean['gt_voxels_reached']:.3f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
