"""Paired comparison of two detection runs on the same instances (issue 18): every difference of a
metric comes with the 95 % paired bootstrap interval over instances, per class and for the mean over
classes, so that an ordering can be told apart from chance.

The evidence of a run is what ``detect/run.py`` leaves in its output folder: ``scores.csv`` (I-AUROC),
``volumes/<instance>.npz`` against the dataset's GT volumes (V-AUPRO), and — when the run saved its
per-view maps at the original resolution (``save_maps: orig``, as the demo does) — ``maps/<instance>/
<stem>_combined.npy`` against the GT masks on the object's foreground pixels (O-P-AUROC). The bootstrap
machinery is :mod:`detect.metrics` (:func:`metric_replicates`, :func:`mean_interval`).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from detect.pipeline.artifacts import read_scores
from detect.pipeline.base import RunError
from detect.pipeline.multiview import class_dataset, load_view, voxel_elements

if TYPE_CHECKING:
    from detect.config import DetectConfig
    from detect.metrics import InstanceElements, Interval

# Metrics compared: name in tables → (elements attribute, metric_replicates prefix, key, limits)
COMPARED = {
    "I-AUROC": ("instances", "image", "image_auroc", ()),
    "V-AUPRO@1%": ("voxels", "voxel", "voxel_aupro@0.01", (0.01,)),
    "O-P-AUROC": ("object_pixels", "pixel", "pixel_auroc", ()),
}


@dataclass
class ClassEvidence:
    """What a run measured on one class, grouped by instance (for bootstrap resampling)."""

    instances: InstanceElements  # one score per instance (I-AUROC)
    voxels: InstanceElements | None  # predicted volume vs GT volume (None: no volumes or no GT)
    object_pixels: InstanceElements | None  # per-view maps on object pixels (None: maps not saved)


def class_evidence(cfg: DetectConfig, out_dir: Path, class_name: str, pixels: bool = True) -> ClassEvidence:
    """The evidence of one class of a run whose class folder is ``out_dir`` (``<out>/<setup>/<class>``);
    ``cfg`` gives the data and the evaluation domain (the run's ``config.yaml``)."""
    from detect.metrics import InstanceElements, instance_score_elements, object_pixel_domain

    rows, labels, scores = read_scores(out_dir / "scores.csv", "scores file")
    names = [r["instance"] for r in rows]
    inst = instance_score_elements(scores, labels, names)
    ds = class_dataset(cfg, class_name) if cfg.gt_reader != "none" else None
    voxels = None
    if ds is not None and (out_dir / "volumes").is_dir():
        voxels = voxel_elements(cfg, ds, out_dir, rows)
        if not voxels.n_instances:
            voxels = None
    object_px = None
    if pixels and ds is not None and (out_dir / "maps").is_dir():
        object_px = InstanceElements()
        by_name = {r.name: r for r in ds.test_records}
        for name in names:
            record = by_name[name]
            for t in range(ds.n_views):
                view = load_view(ds, record, t)
                path = out_dir / "maps" / name / f"{view.stem}_combined.npy"
                if view.mask is None or not path.is_file():
                    object_px = None
                    break
                score = np.load(path).astype(np.float32)
                if score.shape != view.mask.shape:  # maps saved at the input size, not the view's pixels
                    object_px = None
                    break
                object_px.add(name, score, view.mask, object_pixel_domain(view.depth, view.mask), label=record.label)
            if object_px is None:
                break
    return ClassEvidence(inst, voxels, object_px)


class RunEvidence(Mapping):
    """``{class: ClassEvidence}`` of one setup of the run at ``run_out``, read from its folder when a
    class is looked up and not kept: a paired comparison needs one class of two runs in memory at a time,
    not every class of every run of an ablation (voxels of real scans run into the millions)."""

    def __init__(self, cfg: DetectConfig, run_out: Path, setup: str, classes: Sequence[str], pixels: bool = True):
        self.cfg, self.run_out, self.setup, self.classes, self.pixels = cfg, Path(run_out), setup, list(classes), pixels
        for c in self.classes:
            folder = self.run_out / setup / c
            if not (folder / "scores.csv").is_file():
                raise RunError(f"no {folder / 'scores.csv'}: the run has no predictions for {setup}/{c}")

    def __getitem__(self, class_name: str) -> ClassEvidence:
        if class_name not in self.classes:
            raise KeyError(class_name)
        return class_evidence(self.cfg, self.run_out / self.setup / class_name, class_name, self.pixels)

    def __iter__(self):
        return iter(self.classes)

    def __len__(self) -> int:
        return len(self.classes)


def run_evidence(cfg: DetectConfig, run_out: Path, setup: str, classes: Sequence[str], pixels: bool = True
                 ) -> RunEvidence:
    """:func:`class_evidence` of every class of ``setup`` of the run at ``run_out`` (read on lookup)."""
    return RunEvidence(cfg, run_out, setup, classes, pixels)


def compare_runs(a: Mapping[str, ClassEvidence], b: Mapping[str, ClassEvidence] | None = None,
                 n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, dict[str, Interval]]:
    """Per metric of :data:`COMPARED`: ``{class: Interval, ..., "mean": Interval}`` of run ``a`` — or of
    ``a`` minus ``b``, paired on the same instances — with bootstrap intervals over instances. A metric
    is left out where a class lacks its evidence in either run; the mean is over the classes of ``a``."""
    from detect.metrics import class_seed, interval_from_replicates, mean_interval, metric_replicates

    if b is not None and sorted(a) != sorted(b):
        raise ValueError(f"different classes: {sorted(a)} vs {sorted(b)}")
    parts: dict[str, dict[str, tuple[float, np.ndarray]]] = {m: {} for m in COMPARED}
    for c in a:  # one class of each run in memory at a time (RunEvidence reads it on lookup)
        ea, eb = a[c], (b[c] if b is not None else None)
        for metric, (attr, prefix, key, limits) in COMPARED.items():
            xa, xb = getattr(ea, attr), (getattr(eb, attr) if eb is not None else None)
            if metric not in parts:
                continue
            if xa is None or (b is not None and xb is None):
                del parts[metric]  # a class lacks the evidence: no such row
                continue
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    reps = metric_replicates(xa, xb, limits, prefix, n_boot, class_seed(seed, c))
            except ValueError as exc:
                raise RunError(f"{metric}, class {c}: {exc}") from None
            parts[metric][c] = reps[key]
        del ea, eb
    out: dict[str, dict[str, Interval]] = {}
    for metric, per in parts.items():
        if per:
            out[metric] = {c: interval_from_replicates(v, r, level) for c, (v, r) in per.items()}
            out[metric]["mean"] = mean_interval(list(per.values()), level)
    return out
