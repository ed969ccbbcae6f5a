"""Preview figure of a SiM3D-style benchmark (the picture in docs/synthetic_benchmark.md).

A few views (image with the 2D GT mask outline, depth) of one anomalous test instance — by default the
one whose geometric anomaly covers the most mask pixels — and a 3D scatter of its GT volume (occupancy
in grey, anomalous voxels in red). The data is read through the SiM3D reader, so the figure doubles as
a check of what the generator wrote.

Usage::

    python detect/data/preview.py --root data/synthetic --out docs/images/synthetic_views.png
    python -m detect.data.preview --root data/synthetic --out /tmp/bin.png --class bin --instance bin_03_bad

Library: ``render_preview(root, png, class_name=None, instance=None) -> Path``. The PNG is written
atomically and never inside ``root`` (readers never write into their input).
"""

if __package__ in (None, ""):  # run as a script: put the repo root on sys.path instead of the script dir
    import pathlib
    import sys

    sys.path[0] = str(pathlib.Path(__file__).resolve().parents[2])

import argparse
import io
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from detect.data.sim3d import InstanceRecord, SiM3DClass, SiM3DError, list_classes
from shared.cli import ArgumentParser, fail, run_main
from shared.io import atomic_write_bytes

# Anomaly types that change the geometry (meta.json "anomalies"[].type; docs/synthetic_benchmark.md).
GEOMETRIC_TYPES = ("bump", "dent", "missing")


class PreviewError(ValueError):
    """The preview cannot be made (bad output path, no anomalous instance, unreadable mask)."""


def _read_gray(path: Path) -> np.ndarray:
    import cv2  # lazy

    img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if img is None:
        raise PreviewError(f"cannot read {path}")
    return img


def render_preview(root: str | os.PathLike, out_png: str | os.PathLike, class_name: str | None = None,
                   instance: str | None = None, n_views: int = 4, dpi: int = 110) -> Path:
    """Figure of a few views (image with the GT mask outline, depth) of one anomalous instance — by default
    the one whose geometric anomaly covers the most mask pixels — and a 3D scatter of its GT volume
    (occupancy in grey, anomalous voxels in red).

    ``class_name`` defaults to ``stool`` when present, else the first class; ``instance`` picks a test
    instance by folder name. Reads the benchmark through the SiM3D reader, so it also checks what was
    written. The PNG must not be written inside ``root`` (readers never write into their input).

    Raises:
        PreviewError: output inside ``root`` or a folder, no (such) test instance, unreadable mask.
        SiM3DError: the dataset itself is missing or malformed (unknown class included).
    """
    root, out_png = Path(root).resolve(), Path(out_png).resolve()
    if out_png == root or root in out_png.parents:
        raise PreviewError(f"refusing to write the preview {out_png} inside the dataset root {root}")
    if out_png.is_dir():
        raise PreviewError(f"preview output {out_png} is a folder; give a .png file name")
    classes = list_classes(root)
    if not classes:
        raise PreviewError(f"no class folders with instances under {root}")
    class_name = class_name or ("stool" if "stool" in classes else classes[0])
    ds = SiM3DClass(root, class_name)
    records = [r for r in ds.test_records if (instance is None and r.label == 1) or r.name == instance]
    if not records:
        known = [r.name for r in ds.test_records]
        raise PreviewError(f"no {'instance ' + repr(instance) if instance else 'anomalous test instance'} in "
                           f"{ds.path} (test instances: {known})")

    import matplotlib  # lazy: only the figure needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def most_visible_geometric(rec: InstanceRecord) -> tuple:
        kinds = [a["type"] for a in ds.load_meta(rec).get("anomalies", [])]
        pixels = sum(int((_read_gray(v.mask_path) > 0).sum()) for v in rec.views if v.mask_path is not None)
        return (not any(k in GEOMETRIC_TYPES for k in kinds), -pixels, rec.name)

    rec = min(records, key=most_visible_geometric)
    inst = ds.load_instance(rec)
    by_pixels = sorted(inst.views, key=lambda v: -(0 if v.mask is None else int(v.mask.sum())))
    views = sorted(by_pixels[:n_views], key=lambda v: v.view_id)
    n_cols = len(views)
    fig = plt.figure(figsize=(3.0 * n_cols + 4.6, 5.6))
    grid = fig.add_gridspec(2, n_cols + 1, width_ratios=[1.0] * n_cols + [1.5], wspace=0.05, hspace=0.08)
    for col, view in enumerate(views):
        ax = fig.add_subplot(grid[0, col])
        ax.imshow(view.image, cmap="gray", vmin=0, vmax=255)
        if view.mask is not None and view.mask.any():
            ax.contour(view.mask.astype(float), levels=[0.5], colors="red", linewidths=1.2)
        ax.set_title(f"view {view.stem} (C{view.view_id + 1})", fontsize=9)
        ax.axis("off")
        ax = fig.add_subplot(grid[1, col])
        depth = np.ma.masked_invalid(view.depth)
        cmap = plt.get_cmap("viridis_r").with_extremes(bad="white")
        ax.imshow(depth, cmap=cmap)
        ax.set_title("depth (white: no measurement)", fontsize=8)
        ax.axis("off")
    ax3 = fig.add_subplot(grid[:, n_cols], projection="3d")
    gt = inst.gt
    if gt is not None:
        occ = np.argwhere(gt.occupancy & ~gt.labels) if gt.occupancy is not None else np.zeros((0, 3), int)
        rng = np.random.default_rng(0)
        if len(occ) > 40000:
            occ = occ[rng.choice(len(occ), 40000, replace=False)]
        occ_c, lab_c = gt.grid.centers(occ), gt.grid.centers(np.argwhere(gt.labels))
        ax3.computed_zorder = False  # anomalous voxels always drawn on top
        ax3.scatter(*occ_c.T, s=0.4, c="0.45", alpha=0.45, linewidths=0)
        ax3.scatter(*lab_c.T, s=5.0, c="red", alpha=1.0, linewidths=0)
        pts = occ_c if len(occ_c) else lab_c
        if len(pts):
            lo, hi = pts.min(0), pts.max(0)
            mid, half = (lo + hi) / 2, max((hi - lo).max() / 2, 1e-6)
            ax3.set_xlim(mid[0] - half, mid[0] + half)
            ax3.set_ylim(mid[1] - half, mid[1] + half)
            ax3.set_zlim(mid[2] - half, mid[2] + half)
        ax3.set_box_aspect((1, 1, 1))
        ax3.view_init(elev=22, azim=-60)
        ax3.set_title(f"GT volume {gt.shape[0]}×{gt.shape[1]}×{gt.shape[2]} @ {gt.voxel_size * 1000:.1f} mm\n"
                      f"occupancy (grey), {int(gt.labels.sum())} anomalous voxels (red)", fontsize=9)
    ax3.set_axis_off()
    kinds = ", ".join(a["type"] for a in inst.meta.get("anomalies", []))
    fig.suptitle(f"synthetic benchmark — class '{class_name}', instance '{rec.name}' ({kinds}); "
                 f"{ds.n_views} views, red outline = 2D GT mask", fontsize=11)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(out_png, buf.getvalue())  # creates the parent folder
    return out_png


# ---------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------


def build_arg_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python detect/data/preview.py",
        description="Render a preview figure of a SiM3D-style benchmark (e.g. the one written by "
                    "data_prep/synthetic.py): a few views of an anomalous test instance (image with the "
                    "2D GT outline, depth) and a 3D scatter of its GT volume. Reads through the SiM3D "
                    "reader; never writes inside --root.")
    parser.add_argument("--root", required=True, metavar="DIR", help="dataset root (holds the class folders)")
    parser.add_argument("--out", required=True, metavar="PNG", help="PNG file to write (outside --root)")
    parser.add_argument("--class", dest="class_name", default=None, metavar="NAME",
                        help="class to show (default: 'stool' when present, else the first class)")
    parser.add_argument("--instance", default=None, metavar="NAME",
                        help="test instance folder to show (default: the anomalous instance whose geometric "
                             "anomaly covers the most mask pixels)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    try:
        png = render_preview(args.root, args.out, class_name=args.class_name, instance=args.instance)
    except (PreviewError, SiM3DError, OSError) as exc:  # SiM3DError/PreviewError are ValueErrors
        return fail(exc)
    print(f"preview: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
