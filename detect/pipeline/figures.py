"""Pictures and 3D exports of a finished detection run on a SiM3D-layout benchmark (``make demo``, issue 11):
per-view anomaly maps, 3D volumes vs GT, PCA of DINO-Depth features, training curves, instance scores, dense
volume exports, and the ``figures.json`` manifest :mod:`detect.pipeline.report_html` reads. The command line
is ``detect/demo_figures.py``, whose docstring lists the files written."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from detect.data.sim3d import InstanceRecord, SiM3DClass
from shared.io import atomic_write_bytes, atomic_write_json

MANIFEST = "figures.json"
DPI = 100  # the pictures are meant for a browser and the README: small files, sharp enough


class FigureError(ValueError):
    """The detection run or the benchmark lacks something a picture needs."""


@dataclass
class Figure:
    """One picture of the manifest (``path`` relative to the manifest's folder)."""

    path: str
    title: str
    caption: str
    section: str

    def to_dict(self) -> dict:
        return {"path": self.path, "title": self.title, "caption": self.caption, "section": self.section}


# -- helpers ---------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: never needs a display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    """PNG through a buffer and an atomic rename (a reader never sees half a picture)."""
    plt = _pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def read_jsonl(path: Path) -> list[dict]:
    """Records of a JSON-lines log (blank lines skipped)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _read_scores(class_dir: Path) -> dict[str, float]:
    with open(class_dir / "scores.csv", newline="") as handle:
        return {r["instance"]: float(r["pred_score"]) for r in csv.DictReader(handle)}


def run_classes(detect_dir: Path) -> list[tuple[str, str]]:
    """(setup, class) pairs of a detection run that have predictions, in a stable order."""
    pairs = sorted((p.parent.parent.name, p.parent.name) for p in detect_dir.glob("*/*/scores.csv"))
    if not pairs:
        raise FigureError(f"no predictions under {detect_dir} (expected <setup>/<class>/scores.csv from "
                          "detect/run.py)")
    return pairs


def _mask_area(record: InstanceRecord) -> dict[str, int]:
    """GT mask pixels per view stem (views without a mask file count 0)."""
    import cv2

    areas = {}
    for vf in record.views:
        m = cv2.imread(str(vf.mask_path), cv2.IMREAD_GRAYSCALE) if vf.mask_path is not None else None
        areas[vf.stem] = int((m > 0).sum()) if m is not None else 0
    return areas


def pick_instances(ds: SiM3DClass) -> tuple[InstanceRecord | None, InstanceRecord | None, list[str]]:
    """(anomalous instance with the largest visible defect, first nominal instance, its top views).

    Chosen from the GT alone, never from the scores, so the pictures are not picked to flatter the method.
    """
    best, best_area, best_views = None, -1, []
    for rec in ds.test_records:
        if not rec.label:
            continue
        areas = _mask_area(rec)
        total = sum(areas.values())
        if total > best_area:
            best, best_area = rec, total
            best_views = sorted(areas, key=lambda s: -areas[s])
    nominal = next((r for r in ds.test_records if not r.label), None)
    if best is None:
        best_views = list(ds.stems)
    return best, nominal, best_views


def _load_map(class_dir: Path, instance: str, stem: str) -> np.ndarray:
    path = class_dir / "maps" / instance / f"{stem}_combined.npy"
    if not path.is_file():
        raise FigureError(f"no per-view map {path}: run detect/run.py with --save-maps orig")
    return np.load(path).astype(np.float32)


# -- per-view heatmaps ------------------------------------------------------------------------------
def anomaly_map_figure(ds: SiM3DClass, class_dir: Path, out_png: Path, n_views: int = 4) -> Path | None:
    """Heatmap overlays with GT contours: the chosen anomalous instance and a nominal one, same views."""
    plt = _pyplot()
    anomalous, nominal, views = pick_instances(ds)
    rows = [r for r in (anomalous, nominal) if r is not None]
    if not rows:
        return None
    stems = views[:n_views]
    scores = _read_scores(class_dir)
    panels = []  # (record, view, map)
    for rec in rows:
        for stem in stems:
            view = ds.load_view(rec, ds.stems.index(stem))
            panels.append((rec, view, _load_map(class_dir, rec.name, stem)))
    # One colour scale for the figure: from the typical foreground score (median over all shown
    # pixels with a score) to the highest one, so both rows are comparable.
    fg = np.concatenate([m[m > 0] for _, _, m in panels]) if any((m > 0).any() for _, _, m in panels) else None
    lo = float(np.median(fg)) if fg is not None else 0.0
    hi = float(np.percentile(fg, 99.9)) if fg is not None else 1.0
    hi = max(hi, lo + 1e-6)
    from matplotlib import colormaps

    cmap = colormaps["inferno"]
    fig, axes = plt.subplots(len(rows), len(stems), figsize=(3.2 * len(stems), 2.7 * len(rows) + 0.4),
                             squeeze=False)
    for k, (rec, view, m) in enumerate(panels):
        ax = axes[k // len(stems)][k % len(stems)]
        gray = view.image.astype(np.float32) / 255.0
        t = np.clip((m - lo) / (hi - lo), 0.0, 1.0)
        alpha = (0.85 * t)[..., None]  # scores at or below the typical level stay transparent
        rgb = (1 - alpha) * gray[..., None] + alpha * cmap(t)[..., :3]
        ax.imshow(np.clip(rgb, 0, 1))
        if view.mask is not None and view.mask.any():
            ax.contour(view.mask.astype(np.float32), levels=[0.5], colors=["#00ff66"], linewidths=1.2)
        label = "anomalous" if rec.label else "nominal"
        ax.set_title(f"{rec.name} · view {view.stem}" + (f"\n{label}, score {scores[rec.name]:.3f}"
                                                        if rec.name in scores else f"\n{label}"), fontsize=8)
        ax.set_axis_off()
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(lo, hi))
    fig.colorbar(sm, ax=axes, fraction=0.02, pad=0.01, label="anomaly score (1 − cos)")
    fig.suptitle(f"{ds.class_name}: per-view anomaly maps (green: GT defect contour)", fontsize=10)
    return _save(fig, out_png)


# -- 3D volumes -------------------------------------------------------------------------------------
def _subsample(n: int, limit: int, seed: int = 0) -> np.ndarray:
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))


def volume_figure(ds: SiM3DClass, class_dir: Path, out_png: Path, max_points: int = 25000) -> Path | None:
    """Predicted anomaly volume (score-coloured voxels) beside the GT volume of the chosen instance."""
    from detect.volume import SparseVolume, resample_to_grid

    plt = _pyplot()
    anomalous, _, _ = pick_instances(ds)
    if anomalous is None:
        return None
    gt = ds.load_gt(anomalous)
    vol_path = class_dir / "volumes" / f"{anomalous.name}.npz"
    if gt is None or not vol_path.is_file():
        return None
    vol = SparseVolume.load(vol_path)
    pred = resample_to_grid(vol.dense(), vol.grid, gt.grid)
    grid = gt.grid
    p_idx = np.argwhere(pred > 0)
    p_val = pred[tuple(p_idx.T)]
    occ = gt.occupancy if gt.occupancy is not None else (pred > 0)
    o_idx = np.argwhere(occ & ~gt.labels)
    a_idx = np.argwhere(gt.labels)
    pts = [grid.centers(i) for i in (p_idx, o_idx, a_idx)]
    everything = np.concatenate([p for p in pts if len(p)]) if any(len(p) for p in pts) else np.zeros((1, 3))
    lo, hi = everything.min(axis=0), everything.max(axis=0)
    # Look at the defect: azimuth of the anomalous voxels' centroid seen from the object's axis.
    centre = (lo + hi) / 2
    azim = (math.degrees(math.atan2(*(pts[2].mean(axis=0) - centre)[[1, 0]])) if len(pts[2]) else -60.0)
    fig = plt.figure(figsize=(10, 5))
    vmax = float(np.percentile(p_val, 99.5)) if len(p_val) else 1.0
    vmin = float(np.median(p_val)) if len(p_val) else 0.0
    panels = (("prediction: voxels coloured by anomaly score", pts[0], p_val),
              ("ground truth: surface (grey), anomalous voxels (red)", None, None))
    for k, (title, p, val) in enumerate(panels):
        ax = fig.add_subplot(1, 2, k + 1, projection="3d")
        if p is not None:
            sel = _subsample(len(p), max_points)
            order = sel[np.argsort(val[sel])]  # high scores drawn last, on top
            sc = ax.scatter(*p[order].T, c=val[order], cmap="inferno", vmin=vmin, vmax=max(vmax, vmin + 1e-6),
                            s=1.5, depthshade=False, linewidths=0)
            fig.colorbar(sc, ax=ax, shrink=0.6, pad=0.02, label="anomaly score")
        else:
            sel = _subsample(len(pts[1]), max_points)
            ax.scatter(*pts[1][sel].T, c="#9a9a9a", s=1.0, alpha=0.35, depthshade=False, linewidths=0)
            ax.scatter(*pts[2].T, c="#e0201b", s=3.0, depthshade=False, linewidths=0)
        ax.set_xlim(lo[0], hi[0])
        ax.set_ylim(lo[1], hi[1])
        ax.set_zlim(lo[2], hi[2])
        ax.set_box_aspect(tuple(np.maximum(hi - lo, 1e-6)))
        ax.view_init(elev=20, azim=azim)
        ax.set_axis_off()
        ax.set_title(title, fontsize=9)
    fig.suptitle(f"{ds.class_name}/{anomalous.name}: 3D anomaly volume "
                 f"({grid.shape[0]}×{grid.shape[1]}×{grid.shape[2]} voxels of {grid.voxel_size * 1000:.2f} mm)",
                 fontsize=10)
    return _save(fig, out_png)


# -- PCA of DINO-Depth features ---------------------------------------------------------------------
def pca_figure(ckpt: Path, data_root: Path, classes: Sequence[str], out_png: Path, size: int) -> Path:
    """First three principal components of DINO-Depth patch tokens (foreground only) as RGB."""
    import torch

    from detect.encoders import load_depth_encoder
    from detect.preprocess import preprocess_depth, token_validity
    from shared.depth import DepthNormConfig

    plt = _pyplot()
    encoder = load_depth_encoder(ckpt)
    norm = DepthNormConfig.from_dict(encoder.info.input_norm)
    inputs, titles = [], []
    for class_name in classes:
        ds = SiM3DClass(data_root, class_name)
        rec, nominal, views = pick_instances(ds)
        rec = rec or nominal or ds.train_record()  # no anomalous test instance: any instance shows features
        view = ds.load_view(rec, ds.stems.index(views[0]))
        x, _ = preprocess_depth(view.depth, size, mode=norm.mode, eps=norm.eps, pct=tuple(norm.pct))
        inputs.append(x)
        titles.append(f"{class_name}/{rec.name} · view {view.stem}")
    batch = torch.stack(inputs)
    tokens, (h, w) = encoder(batch)
    valid = torch.stack([token_validity(x, encoder.patch_size) for x in inputs])  # (B, h·w)
    feats = tokens[valid].double()
    if feats.shape[0] < 3:
        raise FigureError("too few foreground tokens for a PCA of the depth features")
    mean = feats.mean(dim=0, keepdim=True)
    _, _, v = torch.linalg.svd(feats - mean, full_matrices=False)
    proj = (tokens.double() - mean) @ v[:3].T  # (B, h·w, 3)
    fg_proj = proj[valid]
    lo, hi = torch.quantile(fg_proj, 0.01, dim=0), torch.quantile(fg_proj, 0.99, dim=0)
    rgb = ((proj - lo) / (hi - lo).clamp_min(1e-9)).clamp(0, 1)
    rgb[~valid] = 0.0  # background black, as in the paper's figure
    rgb = rgb.reshape(len(inputs), h, w, 3).numpy()
    fig, axes = plt.subplots(2, len(inputs), figsize=(2.8 * len(inputs), 5.6), squeeze=False)
    for k, x in enumerate(inputs):
        axes[0][k].imshow(x[0].numpy(), cmap="viridis", vmin=0, vmax=1)
        axes[0][k].set_title(titles[k], fontsize=7)
        axes[1][k].imshow(rgb[k], interpolation="nearest")
        for row in (0, 1):
            axes[row][k].set_axis_off()
    axes[0][0].text(-0.08, 0.5, f"depth input ({norm.mode})", transform=axes[0][0].transAxes, rotation=90,
                    va="center", ha="right", fontsize=8)
    axes[1][0].text(-0.08, 0.5, f"PCA of patch features ({h}×{w})", transform=axes[1][0].transAxes,
                    rotation=90, va="center", ha="right", fontsize=8)
    fig.suptitle("DINO-Depth: first 3 principal components of the foreground patch features as RGB", fontsize=10)
    return _save(fig, out_png)


# -- training curves --------------------------------------------------------------------------------
def pretrain_curves_figure(logs: dict[str, Path], out_png: Path) -> Path:
    """Loss terms, teacher entropy and learning rate of pretraining runs (their ``metrics.jsonl``)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), layout="constrained")
    styles = ["-", "--", ":", "-."]
    for k, (label, path) in enumerate(logs.items()):
        recs = [r for r in read_jsonl(path) if "total" in r and r.get("event") is None]
        if not recs:
            raise FigureError(f"{path} holds no training records")
        it = [r["iteration"] for r in recs]
        ls = styles[k % len(styles)]
        n_prototypes = _prototypes(path.parent / "config.yaml")
        if n_prototypes:  # the uniform (collapsed) level of the DINO targets
            axes[1].axhline(math.log(n_prototypes), ls=ls, color="grey", lw=0.8,
                            label=f"{label}: ln K (K = {n_prototypes})")
        axes[0].plot(it, [r["total"] for r in recs], ls, color="k", label=f"{label}: total")
        for term, color in (("dino", "C0"), ("ibot", "C1"), ("koleo", "C2")):
            vals = [r["dino_local"] + r["dino_global"] if term == "dino" else r[term] for r in recs]
            axes[0].plot(it, vals, ls, color=color, label=f"{label}: {term}", alpha=0.8)
        axes[1].plot(it, [r["teacher_entropy"] for r in recs], ls, color="C3", label=f"{label}: DINO targets")
        axes[1].plot(it, [r["ibot_teacher_entropy"] for r in recs], ls, color="C4", label=f"{label}: iBOT targets")
        axes[2].plot(it, [r["lr"] for r in recs], ls, color="C5", label=label)
    axes[0].set_title("loss terms", fontsize=9)
    axes[1].set_title("entropy of the teacher targets (nats)", fontsize=9)
    axes[2].ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    axes[2].set_title("learning rate", fontsize=9)
    for ax in axes:
        ax.set_xlabel("iteration")
        ax.legend(fontsize=6)
        ax.grid(alpha=0.3)
    fig.suptitle("Pretraining (DINOv2 recipe): " + ", ".join(logs), fontsize=10)
    return _save(fig, out_png)


def _prototypes(config_path: Path) -> int | None:
    """K of a pretraining run (``dino.head_n_prototypes`` of the ``config.yaml`` beside its log)."""
    if not config_path.is_file():
        return None
    import yaml

    value = ((yaml.safe_load(config_path.read_text()) or {}).get("dino") or {}).get("head_n_prototypes")
    return int(value) if value else None


def mapping_curves_figure(detect_dir: Path, out_png: Path) -> Path:
    """ModMap training loss and cosine terms per class (``<setup>/<class>/train_log.jsonl``)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), layout="constrained")
    found = False
    for k, (setup, class_name) in enumerate(run_classes(detect_dir)):
        path = detect_dir / setup / class_name / "train_log.jsonl"
        if not path.is_file():
            continue
        recs = read_jsonl(path)
        found = True
        ep = [r["epoch"] for r in recs]
        label = class_name if setup == "real2real" else f"{setup}/{class_name}"
        axes[0].plot(ep, [r["loss"] for r in recs], color=f"C{k}", label=label)
        axes[1].plot(ep, [r["cos_depth"] for r in recs], "-", color=f"C{k}", label=f"{label}: image→depth")
        axes[1].plot(ep, [r["cos_image"] for r in recs], "--", color=f"C{k}", label=f"{label}: depth→image")
    if not found:
        raise FigureError(f"no train_log.jsonl under {detect_dir}: the mapping was not fitted in this run")
    axes[0].set_title("ModMap loss (2 − cos_depth − cos_image)", fontsize=9)
    axes[1].set_title("mean cosine of the mapped features", fontsize=9)
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.legend(fontsize=6)
        ax.grid(alpha=0.3)
    fig.suptitle("Crossmodal mapping training, one model per class", fontsize=10)
    return _save(fig, out_png)


def instance_scores_figure(detect_dir: Path, out_png: Path) -> Path:
    """Instance scores per class, nominal vs anomalous (what I-AUROC summarises)."""
    plt = _pyplot()
    pairs = run_classes(detect_dir)
    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * len(pairs), 3.4))
    rng = np.random.default_rng(0)
    for k, (setup, class_name) in enumerate(pairs):
        with open(detect_dir / setup / class_name / "scores.csv", newline="") as handle:
            rows = list(csv.DictReader(handle))
        for label, color, name in ((0, "C0", "nominal"), (1, "C3", "anomalous")):
            vals = [float(r["pred_score"]) for r in rows if int(r["gt_label"]) == label]
            x = k + (0.15 if label else -0.15) + rng.uniform(-0.06, 0.06, len(vals))
            ax.scatter(x, vals, color=color, s=18, label=name if k == 0 else None, edgecolors="none")
    ax.set_xticks(range(len(pairs)), [c if s == "real2real" else f"{s}/{c}" for s, c in pairs], fontsize=8)
    ax.set_ylabel("instance score (max of the volume)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Instance scores of the test instances", fontsize=10)
    return _save(fig, out_png)


# -- dense volumes ----------------------------------------------------------------------------------
def export_dense_volumes(detect_dir: Path, out_dir: Path) -> list[dict]:
    """Every predicted volume as a dense ``.npz``; returns one entry per instance (paths absolute).

    Skips volumes whose dense copy is newer than the sparse source, so re-running is cheap.
    """
    from detect.volume import SparseVolume

    entries = []
    for setup, class_name in run_classes(detect_dir):
        class_dir = detect_dir / setup / class_name
        scores = _read_scores(class_dir)
        with open(class_dir / "scores.csv", newline="") as handle:
            labels = {r["instance"]: int(r["gt_label"]) for r in csv.DictReader(handle)}
        for src in sorted((class_dir / "volumes").glob("*.npz")):
            dst = out_dir / setup / class_name / src.name
            if not dst.is_file() or dst.stat().st_mtime < src.stat().st_mtime:
                vol = SparseVolume.load(src)
                buf = io.BytesIO()
                np.savez_compressed(buf, anomaly=vol.dense(), occupancy=vol.occupancy(),
                                    origin=vol.grid.origin, voxel_size=np.float64(vol.grid.voxel_size),
                                    instance_score=np.float32(scores.get(src.stem, np.nan)))
                atomic_write_bytes(dst, buf.getvalue())
            ply = src.with_suffix(".ply")
            entries.append({"setup": setup, "class": class_name, "instance": src.stem,
                            "label": labels.get(src.stem), "score": scores.get(src.stem),
                            "dense_npz": str(dst.resolve()), "ply": str(ply.resolve()) if ply.is_file() else None})
    return entries


# -- all of it --------------------------------------------------------------------------------------
def make_figures(data_root: str | os.PathLike, detect_dir: str | os.PathLike, out_dir: str | os.PathLike,
                 ckpt: str | os.PathLike | None = None, pretrain_logs: dict[str, Path] | None = None,
                 volumes_out: str | os.PathLike | None = None, pca_size: int | None = None,
                 n_views: int = 4) -> Path:
    """Write every picture (and the dense volumes) and the manifest; returns the manifest's path."""
    data_root, detect_dir, out_dir = Path(data_root), Path(detect_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pairs = run_classes(detect_dir)
    figures: list[Figure] = []
    cfg_path = detect_dir / "config.yaml"
    run_cfg: dict = {}
    if cfg_path.is_file():
        import yaml

        run_cfg = yaml.safe_load(cfg_path.read_text()) or {}
    patchcore = run_cfg.get("method") == "patchcore"  # no mapping was trained: no mapping curves
    map_text = ("PatchCore map (cosine/L2 distance of each token to its nearest neighbour in the memory bank of "
                "the training instance's tokens)" if patchcore else
                "combined ModMap map (max of image→depth and depth→image 1 − cos)")

    def add(path: Path | None, title: str, caption: str, section: str) -> None:
        if path is not None:
            figures.append(Figure(os.path.relpath(path, out_dir), title, caption, section))

    aggregation_text = {"max": "max per voxel", "mean": "per voxel the mean of each view's maximum",
                        "second": "per voxel the second highest view where two or more score it"
                        }.get(str(run_cfg.get("view_aggregation", "max")), "max per voxel")
    for setup, class_name in pairs:
        ds = SiM3DClass(data_root, class_name)
        class_dir = detect_dir / setup / class_name
        tag = class_name if setup == "real2real" else f"{setup}_{class_name}"
        add(anomaly_map_figure(ds, class_dir, out_dir / f"maps_{tag}.png", n_views),
            f"Per-view anomaly maps: {class_name} ({setup})",
            "Top row: the anomalous test instance with the largest visible defect (chosen from the ground "
            "truth, not from the scores), its views with the most defect pixels; bottom row: a nominal "
            f"instance, same views. Heatmap = {map_text} at the original pixels, transparent at and below the "
            "median foreground score; green = GT defect contour.", "Per-view anomaly maps")
        add(volume_figure(ds, class_dir, out_dir / f"volume_{tag}.png"),
            f"3D anomaly volume: {class_name} ({setup})",
            f"Left: the per-view maps back-projected into the voxel grid ({aggregation_text}), coloured by score; "
            "right: the GT volume (object surface grey, anomalous voxels red). The PLY point set and the "
            "dense .npz of every instance are listed under 3D outputs.", "3D anomaly volumes")
    add(instance_scores_figure(detect_dir, out_dir / "instance_scores.png"), "Instance scores",
        "Each dot is a test instance; its score is the maximum of its anomaly volume. I-AUROC measures how "
        "well the red dots (anomalous) sit above the blue ones (nominal).", "Results")
    if ckpt is not None:
        size = pca_size if pca_size is not None else int(run_cfg.get("image_size", 224))
        classes = list(dict.fromkeys(c for _, c in pairs))
        add(pca_figure(Path(ckpt), data_root, classes, out_dir / "pca_depth_features.png", size or 224),
            "DINO-Depth features (PCA)",
            "Top: normalised depth maps (nearness: near = bright) as the depth encoder sees them; bottom: "
            "the first three principal components of its patch features, fitted jointly on the "
            "foreground tokens of all maps, as RGB (background black) — the view of the paper's Fig. 6. "
            "Similar colours = similar features: parts of the same kind share a colour across objects.",
            "Pretrained encoders")
    if pretrain_logs:
        add(pretrain_curves_figure(pretrain_logs, out_dir / "pretrain_curves.png"), "Pretraining curves",
            "DINOv2-recipe pretraining of the tiny encoders (from their metrics.jsonl): the DINO, iBOT and "
            "KoLeo loss terms, the entropy of the teacher targets (grey: ln K, the uniform distribution over "
            "the K prototypes; a run that settles on it has collapsed: its targets carry no information) and "
            "the learning-rate schedule.", "Pretrained encoders")
    if not patchcore:
        add(mapping_curves_figure(detect_dir, out_dir / "mapping_curves.png"), "Mapping curves",
            "ModMap training per class: loss and mean cosine similarity between mapped and actual features of "
            "the target view, for both directions.", "Training")
    volumes = export_dense_volumes(detect_dir, Path(volumes_out)) if volumes_out is not None else []
    manifest = {"format": "demo-figures", "format_version": 1,
                "data_root": str(data_root.resolve()), "detect_dir": str(detect_dir.resolve()),
                "figures": [f.to_dict() for f in figures], "volumes": volumes}
    path = out_dir / MANIFEST
    atomic_write_json(path, manifest)
    return path
