"""Pictures and 3D exports of a finished detection run on a SiM3D-layout benchmark (``make demo``, issue 11).

Reads the outputs of ``detect/run.py`` (``--save-maps orig`` for the per-view overlays) and the
benchmark it ran on, and writes into ``--out``:

* ``maps_<class>.png``: per-view anomaly heatmaps over the grayscale images with the 2D GT contours, for
  the anomalous test instance of the class with the largest visible defect and a nominal one, on one
  colour scale per class (so the nominal row shows what "quiet" looks like);
* ``volume_<class>.png``: the predicted 3D anomaly volume (voxels coloured by score) next to the GT
  volume (object surface grey, anomalous voxels red) of the same instance;
* ``pca_depth_features.png``: PCA of DINO-Depth patch features on a few depth maps (the paper's Fig. 6
  view: first three principal components of the foreground tokens as RGB);
* ``pretrain_curves.png`` (from the pretraining runs' ``metrics.jsonl``), ``mapping_curves.png`` (from
  the per-class ``train_log.jsonl``) and ``instance_scores.png`` (instance scores, nominal vs anomalous);
* ``figures.json``: the manifest :mod:`detect.pipeline.report_html` builds ``index.html`` from.

With ``--volumes-out`` every predicted volume is also written densely (``anomaly`` float32 (X, Y, Z),
``occupancy``, ``origin``, ``voxel_size``; ``np.load(path)["anomaly"]``) next to the PLY point sets
``detect/run.py --save-ply`` writes.

Usage (what ``make demo-report`` runs)::

    python detect/demo_figures.py --data runs/demo/data --detect runs/demo/detect \\
        --ckpt runs/demo/pretrain/dinodepth.pth \\
        --pretrain-log "DINO-Depth (depth)=runs/demo/pretrain/metrics.jsonl" \\
        --pretrain-log "image encoder (image mode)=runs/demo/image_encoder/metrics.jsonl" \\
        --out runs/demo/figures --volumes-out runs/demo/volumes
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a script: put the repo root on sys.path instead of the script dir
    import pathlib
    import sys

    sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from detect.data.sim3d import SiM3DError
from detect.pipeline.figures import FigureError, make_figures
from shared.cli import ArgumentParser, fail, label_path, run_main


def build_parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(
        prog="python detect/demo_figures.py",
        description="Pictures (per-view heatmaps with GT contours, 3D volumes vs GT, PCA of DINO-Depth "
                    "features, training curves) and dense volume exports of a detect/run.py run.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--data", required=True, help="the benchmark root detect/run.py ran on (SiM3D layout)")
    ap.add_argument("--detect", required=True, help="the --out folder of detect/run.py (--save-maps orig)")
    ap.add_argument("--out", required=True, help="output folder for the PNGs and figures.json")
    ap.add_argument("--ckpt", default=None, help="DINO-Depth export for the PCA picture (omit: no PCA picture)")
    ap.add_argument("--pretrain-log", action="append", type=label_path, default=[], metavar="LABEL=PATH",
                    help="a pretraining run's metrics.jsonl (repeatable)")
    ap.add_argument("--volumes-out", default=None, help="write every volume densely (.npz) into this folder")
    ap.add_argument("--pca-size", type=int, default=None,
                    help="depth input side of the PCA picture (default: the run's image_size)")
    ap.add_argument("--views", type=int, default=4, help="views per row of the heatmap pictures")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from detect.encoders import EncoderError

    try:
        path = make_figures(args.data, args.detect, args.out, args.ckpt, {label: Path(path) for label, path in args.pretrain_log} or None,
                            args.volumes_out, args.pca_size, args.views)
    except (FigureError, SiM3DError, EncoderError, FileNotFoundError) as exc:
        return fail(exc)
    manifest = json.loads(path.read_text())
    print(f"wrote {len(manifest['figures'])} pictures and {len(manifest['volumes'])} dense volumes "
          f"(manifest {path})")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
