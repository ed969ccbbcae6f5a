"""Ceilings of the 2D → 3D path: project the 2D GT masks as if they were anomaly maps.

    python detect/gt_projection_check.py --data data/synthetic [--classes vase,bin] [--size 224 --patch 14]
                                         [--out check.md] [--json check.json]

Two oracles per test instance, scored with the same voxel metrics and evaluation domain as
``detect/run.py`` (occupied voxels ∪ GT voxels), with 95 % bootstrap intervals over instances:

* **pixel-level oracle** — each view's 2D GT mask (1 on anomalous pixels, 0 elsewhere) is back-projected
  and max-aggregated into the GT voxel grid exactly like ModMap's anomaly maps
  (:class:`detect.volume.VolumeAccumulator`, all valid-depth pixels as foreground). A perfect per-pixel
  detector cannot do better in V-AUROC / V-AUPRO; ``GT voxels reached`` is the fraction of anomalous GT
  voxels that any masked pixel lands in.
* **token-grid oracle** — a perfect detector at token resolution: the mask is padded to a square and
  resized to the input size like the image (detect/preprocess.py), averaged over each ``patch × patch``
  token (the fraction of the token that is anomalous), then goes through ModMap's own chain: bilinear
  upsampling of the token grid (:func:`detect.preprocess.upsample_tokens`), zeroed outside the depth
  foreground (:func:`detect.preprocess.foreground_mask`), brought back to the view's pixels
  (:func:`detect.preprocess.undo_geometry`) and projected like the pixel oracle. At the demo's input size
  (configs/detect/demo_cpu.yaml: 224, patch 14) this is the ceiling of a 16 × 16-token detector.
"""

if __package__ in (None, ""):  # run as a script: put the repo root on sys.path instead of the script dir
    import pathlib
    import sys

    sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import warnings
from pathlib import Path

import numpy as np

from shared.cli import ArgumentParser, fail, run_main

ORACLES = ("pixel", "token")
DEFAULT_LIMITS = (0.3, 0.01)


def token_oracle_map(mask: np.ndarray, depth: np.ndarray, size: int, patch: int) -> tuple[np.ndarray, np.ndarray]:
    """(score map, foreground) at the view's pixels of a perfect token-level detector (module docstring)."""
    import torch
    import torch.nn.functional as F

    from detect.preprocess import (
        ViewGeometry,
        foreground_mask,
        preprocess_depth,
        undo_geometry,
        upsample_tokens,
    )

    if size % patch:
        raise ValueError(f"input size {size} is not a multiple of the patch size {patch}")
    h, w = mask.shape
    geom = ViewGeometry.for_shape(h, w, size)
    x = torch.from_numpy((np.asarray(mask) > 0).astype(np.float32))[None, None]
    x = F.pad(x, geom.pads, mode="constant", value=0.0)  # the padding shows no anomaly
    x = F.interpolate(x, size=(size, size), mode="area")
    grid = (size // patch, size // patch)
    tokens = F.avg_pool2d(x, patch).reshape(-1)  # fraction of each token that is anomalous
    up = upsample_tokens(tokens, grid, size)
    depth_input, _ = preprocess_depth(depth, size)
    fg = foreground_mask(depth_input)
    up = up * torch.from_numpy(fg)
    return undo_geometry(up, geom, "bilinear"), undo_geometry(torch.from_numpy(fg), geom, "nearest")


def check_class(root: str, class_name: str, limits: tuple[float, ...] = DEFAULT_LIMITS, size: int = 224,
                patch: int = 14, oracles: tuple[str, ...] = ORACLES, n_boot: int = 1000, seed: int = 0) -> dict:
    """Oracle V-AUROC / V-AUPRO (with bootstrap intervals) of one class; see the module docstring."""
    from detect.data.sim3d import SiM3DClass
    from detect.metrics import InstanceElements
    from detect.volume import VolumeAccumulator

    ds = SiM3DClass(root, class_name, calib_reader="npz", gt_reader="npz")
    sets = {o: InstanceElements() for o in oracles}
    reached = {o: 0 for o in oracles}
    total = 0
    for record in ds.test_records:
        gt = ds.load_gt(record)
        if gt is None:
            raise ValueError(f"{class_name}/{record.name}: no GT volume")
        vols = {o: VolumeAccumulator(gt.grid) for o in oracles}
        for t in range(ds.n_views):
            view = ds.load_view(record, t)
            if view.mask is None:
                raise ValueError(f"{class_name}/{record.name}, view {view.stem}: no 2D GT mask")
            valid = np.isfinite(view.depth)
            if "pixel" in vols:
                vols["pixel"].add_view(view.depth, view.calib, (view.mask > 0).astype(np.float32), valid)
            if "token" in vols:
                scores, fg = token_oracle_map(view.mask, view.depth, size, patch)
                vols["token"].add_view(view.depth, view.calib, scores, fg)
        domain = gt.occupancy | gt.labels
        total += int(np.count_nonzero(gt.labels))
        for o, vol in vols.items():
            scores = vol.volume()
            reached[o] += int(np.count_nonzero(gt.labels & (scores > 0)))
            sets[o].add(record.name, scores, gt.labels, domain, label=record.label)
    out: dict = {"class": class_name, "n_instances": len(ds.test_records), "n_gt_voxels": total}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for o, s in sets.items():
            res = s.metrics(limits, "voxel", n_boot=n_boot, seed=seed)
            out[o] = {"voxel_auroc": res["voxel_auroc"].to_dict(),
                      "voxel_aupro": {str(a): v.to_dict() for a, v in res["voxel_aupro"].items()},
                      "gt_voxels_reached": reached[o] / total if total else float("nan")}
    first = out[oracles[0]]  # the flat keys of format 1 of this report (pixel oracle by default)
    out["voxel_auroc"] = first["voxel_auroc"]["value"]
    out["voxel_aupro"] = {a: v["value"] for a, v in first["voxel_aupro"].items()}
    out["gt_voxels_reached"] = first["gt_voxels_reached"]
    return out


def markdown_table(rows: list[dict], oracle: str, limits: tuple[float, ...] = DEFAULT_LIMITS) -> str:
    """Per class and mean (unweighted over classes, as the paper's "Mean" column; no interval)."""
    heads = ["V-AUROC"] + [f"V-AUPRO@{a * 100:g}%" for a in limits]
    lines = ["| Class | " + " | ".join(heads) + " | GT voxels reached |", "|---" * (len(heads) + 2) + "|"]

    def fmt(d: dict) -> str:
        return f"{d['value']:.3f} [{d['low']:.3f}, {d['high']:.3f}]"

    for r in rows:
        o = r[oracle]
        cells = [fmt(o["voxel_auroc"])] + [fmt(o["voxel_aupro"][str(a)]) for a in limits]
        lines.append(f"| {r['class']} | " + " | ".join(cells) + f" | {o['gt_voxels_reached']:.3f} |")
    means = [np.mean([r[oracle]["voxel_auroc"]["value"] for r in rows])]
    means += [np.mean([r[oracle]["voxel_aupro"][str(a)]["value"] for r in rows]) for a in limits]
    reach = np.mean([r[oracle]["gt_voxels_reached"] for r in rows])
    lines.append("| **mean** | " + " | ".join(f"{m:.3f}" for m in means) + f" | {reach:.3f} |")
    return "\n".join(lines) + "\n"


def mean_over_classes(rows: list[dict], oracle: str, limit: float = 0.01) -> float:
    return float(np.mean([r[oracle]["voxel_aupro"][str(limit)]["value"] for r in rows]))


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python detect/gt_projection_check.py", description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="dataset root with 2D GT masks and GT volumes (synthetic benchmark)")
    p.add_argument("--classes", default="", help="comma-separated classes (default: all)")
    p.add_argument("--size", type=int, default=224, help="network input size of the token-grid oracle "
                                                         "(the demo's image_size)")
    p.add_argument("--patch", type=int, default=14, help="patch size of the token-grid oracle")
    p.add_argument("--oracles", default="pixel,token", help="which oracles: pixel, token or both")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap replicates for the 95 %% intervals")
    p.add_argument("--out", default="", help="also write the Markdown tables here")
    p.add_argument("--json", default="", help="also write every number (with intervals) as JSON here")
    args = p.parse_args(argv)
    from tqdm import tqdm

    from detect.data.sim3d import SiM3DError, list_classes
    from shared.io import atomic_write_json, atomic_write_text

    oracles = tuple(o for o in args.oracles.split(",") if o)
    if not oracles or any(o not in ORACLES for o in oracles):
        return fail(f"--oracles must name pixel and/or token, got {args.oracles!r}")
    try:
        classes = [c for c in args.classes.split(",") if c] or list_classes(args.data)
        rows = [check_class(args.data, c, size=args.size, patch=args.patch, oracles=oracles, n_boot=args.n_boot)
                for c in tqdm(classes, desc="GT projection check", unit="class")]
    except (SiM3DError, ValueError) as exc:
        return fail(exc)
    parts = []
    for o in oracles:
        title = "pixel-level oracle" if o == "pixel" else f"token-grid oracle ({args.size} px input, patch {args.patch})"
        parts.append(f"### {title}\n\n" + markdown_table(rows, o))
    text = "\n".join(parts)
    print(text)
    if args.out:
        atomic_write_text(Path(args.out), text)
    if args.json:
        doc = {"data": str(args.data), "size": args.size, "patch": args.patch, "classes": rows,
               "mean_voxel_aupro@0.01": {o: mean_over_classes(rows, o) for o in oracles}}
        atomic_write_json(Path(args.json), doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
