"""Evaluation during pretraining: does the encoder learn what detection needs? (issue 22)

DINOv2 evaluates its backbone during training with a k-NN probe; the DINO loss and the teacher
entropy alone cannot tell a collapsed or useless encoder from a good one. Three probes, computed on
the teacher backbone every ``train.eval_period`` iterations and at the end, each next to the same
architecture at random initialisation (computed once per run, same seed → same numbers on resume):

* ``knn_class``: weighted k-NN (cosine, k, temperature as in DINO's ``eval_knn``) of the cls token;
  label = class (or class × view); fitted on half of the instances of each class, scored on the
  other half. Score: accuracy, per test instance.
* ``mask_knn`` (dense, what detection does): per class, a bank of the patch tokens of the nominal
  instances; each token of an anomalous instance is scored by its cosine distance to the nearest
  bank token; token AUROC against the 2D GT mask (token positive: ≥ ``mask_min_fraction`` of its
  pixels defective; tokens with a smaller non-zero fraction are left out). Needs ``gt/masks``.
* ``shape_ridge`` (dense): ridge regression from patch tokens to the local shape of the depth under
  each token (mean image-space gradient of the nearness map, and the log mean |Laplacian|, a
  curvature proxy), fitted on the fitting half, R² on the test half (mean over the 3 targets).

Intervals: 95 % percentile bootstrap over the test instances (``probe.bootstrap`` resamples); the
difference trained − random uses the *same* resamples (paired), so its interval says whether
training beat random initialisation. Only valid (measured) tokens take part (depth validity; in
image mode that of the view's depth map when it exists).

Held-out set layout (the synthetic benchmark's, ``docs/synthetic_benchmark.md``):
``<root>/<class>/<instance>/depth/<view>.npy`` (image mode ``rgb/<view>_2.png``), optional
``<instance>/gt/masks/<view>.png``; an instance whose name ends in ``_bad`` is anomalous. Any
labelled folder with the same two levels (class, instance) works; ``probe.glob`` selects the files.

The collapse monitor (:class:`CollapseMonitor`) needs no held-out set: it warns when the teacher
entropy of every record logged over the last ``probe.collapse_window`` iterations stayed within
``probe.collapse_margin`` nat of ln K (the uniform fixed point).
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from pretrain.augment import CropParams, image_to_float, normalize_image, warp_crop
from pretrain.config import PretrainConfig, ProbeConfig
from shared.depth import normalize_depth
from shared.vit import ViTConfig, vit_from_config


class Trainer(Protocol):
    """What the probes use of ``pretrain.train.Trainer`` (a protocol: probes must not import the loop)."""

    cfg: PretrainConfig
    is_main: bool
    sharded: bool
    device: torch.device
    iteration: int
    out_dir: Path
    teacher: nn.Module
    teacher_vit_cfg: ViTConfig
    metrics_log: Any

    def teacher_backbone_state(self) -> dict[str, Tensor] | None: ...

log = logging.getLogger("pretrain.probes")

DEFAULT_GLOBS = {"depth": "*/*/depth/*.npy", "image": "*/*/rgb/*.png"}
PROBE_NAMES = ("knn_class", "mask_knn", "shape_ridge")


class ProbeDataError(ValueError):
    """The held-out probe set is missing or unusable (the message names the folder or file)."""


# -- held-out set ---------------------------------------------------------------------------------------
@dataclass
class ProbeItem:
    path: Path
    label: str  # class
    instance: str  # "<class>/<instance>"
    view: str
    anomalous: bool
    mask_path: Path | None
    depth_path: Path | None  # the view's depth map (the input itself in depth mode)


def _view_name(path: Path) -> str:
    # rgb/<view>_2.png → <view>; depth/<view>.npy → <view>
    stem = path.stem
    return stem[:-2] if path.suffix.lower() != ".npy" and stem.endswith("_2") else stem


def discover_probe_items(root: str | Path, modality: str, glob: str | None = None,
                         max_views_per_instance: int = 0) -> list[ProbeItem]:
    """The files of the held-out set, sorted; ``max_views_per_instance`` > 0 keeps evenly spaced views."""
    root = Path(root)
    if not root.is_dir():
        raise ProbeDataError(f"probe.root {root} is not a folder")
    pattern = glob or DEFAULT_GLOBS[modality]
    by_instance: dict[Path, list[Path]] = {}
    for path in sorted(root.glob(pattern)):
        rel = path.relative_to(root)
        if len(rel.parts) < 3:
            raise ProbeDataError(f"{path}: probe files must lie under <root>/<class>/<instance>/ (probe.glob={pattern!r})")
        by_instance.setdefault(root / rel.parts[0] / rel.parts[1], []).append(path)
    if not by_instance:
        raise ProbeDataError(f"probe.root {root}: no file matches probe.glob={pattern!r}")
    items = []
    for inst_dir, paths in sorted(by_instance.items()):
        paths = sorted(paths, key=lambda p: (len(_view_name(p)), _view_name(p)))  # 2 before 10
        if max_views_per_instance > 0 and len(paths) > max_views_per_instance:
            keep = np.linspace(0, len(paths) - 1, max_views_per_instance).round().astype(int)
            paths = [paths[i] for i in keep]
        for path in paths:
            view = _view_name(path)
            mask = inst_dir / "gt" / "masks" / f"{view}.png"
            depth = path if modality == "depth" else inst_dir / "depth" / f"{view}.npy"
            items.append(ProbeItem(path, inst_dir.parent.name, f"{inst_dir.parent.name}/{inst_dir.name}", view,
                                   inst_dir.name.endswith("_bad"), mask if mask.is_file() else None,
                                   depth if depth.is_file() else None))
    return items


@dataclass
class ProbeSet:
    """The encoded-ready held-out set: inputs and per-token targets, fixed for the whole run."""

    inputs: Tensor  # (N, C, S, S) normalised as in training
    labels: np.ndarray  # (N,) int: class (or class × view) ids
    classes: np.ndarray  # (N,) int: class ids (banks of the mask probe are per class)
    instances: np.ndarray  # (N,) int instance ids
    anomalous: np.ndarray  # (N,) bool
    fit: np.ndarray  # (N,) bool: the view belongs to the fitting half of the instances
    token_valid: np.ndarray  # (N, T) bool
    token_defect: np.ndarray | None  # (N, T) float fraction of defective pixels (NaN: no mask)
    token_shape: np.ndarray | None  # (N, T, 3) shape targets (NaN where not valid)
    instance_names: list[str]
    grid: tuple[int, int]


def _square_window(h: int, w: int) -> CropParams:
    # The whole view in a centred square window (the short side padded with invalid pixels), as
    # detection pads a view to a square before resizing it to the encoder's size.
    side = float(max(h, w))
    return CropParams(cy=h / 2, cx=w / 2, h=side, w=side)


def _depth_crop(cfg: PretrainConfig, path: Path, size: int) -> tuple[np.ndarray, np.ndarray]:
    depth = np.load(path, allow_pickle=False)
    if depth.ndim != 2:
        raise ProbeDataError(f"{path}: depth map must be 2-D, got shape {depth.shape}")
    depth = np.where(np.isfinite(depth) & (depth > 0), depth, np.nan).astype(np.float32)
    n = cfg.data.depth_norm
    x, valid, _ = normalize_depth(depth, cfg.data.folder_kind, mode=n.mode, eps=n.eps, pct=tuple(n.pct))
    crop, crop_valid = warp_crop(x[None].astype(np.float32), valid, _square_window(*depth.shape), size,
                                 cfg.aug.interp, cfg.aug.edge_thresh)
    return crop, crop_valid


def _token_mean(values: np.ndarray, patch: int) -> np.ndarray:
    """(S, S) → (S/p · S/p,) mean over each patch (NaN-aware: NaN where a patch has no finite value)."""
    s = values.shape[0] // patch
    blocks = values.reshape(s, patch, s, patch).transpose(0, 2, 1, 3).reshape(s * s, patch * patch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(blocks, axis=1)


def _shape_targets(x: np.ndarray, valid: np.ndarray, patch: int) -> np.ndarray:
    """Per token: mean ∂x/∂row, mean ∂x/∂col of the nearness map, log mean |Laplacian| (valid pixels whose
    whole 3×3 neighbourhood is valid, so no step at the object's outline enters)."""
    x = x[0].astype(np.float64)
    inner = valid.copy()
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            inner &= np.roll(np.roll(valid, dy, 0), dx, 1)
    inner[[0, -1], :] = False
    inner[:, [0, -1]] = False
    gy = (np.roll(x, -1, 0) - np.roll(x, 1, 0)) / 2
    gx = (np.roll(x, -1, 1) - np.roll(x, 1, 1)) / 2
    lap = np.roll(x, -1, 0) + np.roll(x, 1, 0) + np.roll(x, -1, 1) + np.roll(x, 1, 1) - 4 * x
    out = []
    for field_ in (gy, gx, np.abs(lap)):
        out.append(_token_mean(np.where(inner, field_, np.nan), patch))
    out[2] = np.log(out[2] + 1e-6)
    return np.stack(out, axis=-1)


def load_probe_set(cfg: PretrainConfig) -> ProbeSet:
    """Read, crop and normalise the held-out set once; per-token targets at ``probe.size``."""
    pc = cfg.probe
    modality = cfg.data.modality
    patch = cfg.student.patch_size
    if pc.size % patch:
        raise ProbeDataError(f"probe.size={pc.size} is not a multiple of the patch size {patch}")
    items = discover_probe_items(pc.root, modality, pc.glob, pc.max_views_per_instance)
    size = pc.size
    inputs, valids, defects, shapes = [], [], [], []
    for item in items:
        try:
            depth_crop = _depth_crop(cfg, item.depth_path, size) if item.depth_path is not None else None
            if modality == "depth":
                assert depth_crop is not None
                x, valid = depth_crop
            else:
                from PIL import Image

                with Image.open(item.path) as im:
                    im = im.convert("L" if cfg.student.in_chans == 1 else "RGB")
                    raw = np.asarray(im, dtype=np.uint8)
                img = image_to_float(raw, cfg.student.in_chans, cfg.image_aug.max_normalize)
                crop, inside = warp_crop(img, None, _square_window(*raw.shape[:2]), size, "masked_bilinear", None)
                x = normalize_image(crop, cfg.image_aug) * inside  # padding = 0 after normalisation
                valid = depth_crop[1] if depth_crop is not None else inside
            mask_tokens = None
            if item.mask_path is not None:
                from PIL import Image

                with Image.open(item.mask_path) as im:
                    m = (np.asarray(im.convert("L")) > 127).astype(np.float32)
                mcrop, _ = warp_crop(m[None], None, _square_window(*m.shape), size, "masked_bilinear", None)
                mask_tokens = _token_mean(mcrop[0], patch)
        except (OSError, ValueError) as exc:
            raise ProbeDataError(f"probe file {item.path}: {exc}") from exc
        inputs.append(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
        valids.append(_token_mean(valid.astype(np.float32), patch) >= pc.min_valid_fraction)
        defects.append(mask_tokens if mask_tokens is not None else np.full(valids[-1].shape, np.nan))
        shapes.append(_shape_targets(depth_crop[0], depth_crop[1], patch) if depth_crop is not None
                      else np.full((*valids[-1].shape, 3), np.nan))
    class_names = sorted({it.label for it in items})
    class_ids = np.array([class_names.index(it.label) for it in items])
    if pc.knn_label == "class_view":
        keys = sorted({(it.label, it.view) for it in items})
        labels = np.array([keys.index((it.label, it.view)) for it in items])
    else:
        labels = class_ids
    instance_names = sorted({it.instance for it in items})
    inst = np.array([instance_names.index(it.instance) for it in items])
    anomalous = np.array([it.anomalous for it in items])
    # Fitting half: every other instance of each class (nominal and anomalous alternate separately).
    fit_instances = set()
    for c in class_names:
        for flag in (False, True):
            names = sorted({it.instance for it in items if it.label == c and it.anomalous == flag})
            fit_instances |= set(names[0::2])
    fit = np.array([it.instance in fit_instances for it in items])
    defect = np.stack(defects)
    shape = np.stack(shapes)
    g = size // patch
    return ProbeSet(torch.stack(inputs), labels, class_ids, inst, anomalous, fit, np.stack(valids),
                    None if np.isnan(defect).all() else defect, None if np.isnan(shape).all() else shape,
                    instance_names, (g, g))


# -- features ---------------------------------------------------------------------------------------------
@torch.no_grad()
def encode(backbone: nn.Module, inputs: Tensor, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(cls (N, D), patch tokens (N, T, D)), L2-normalised float32 (the backbone's norm applied)."""
    was_training = backbone.training
    backbone.eval()
    device = next(backbone.parameters()).device
    cls, patches = [], []
    for start in range(0, inputs.shape[0], batch_size):
        out = backbone(inputs[start:start + batch_size].to(device))
        cls.append(torch.nn.functional.normalize(out["x_norm_clstoken"].float(), dim=-1).cpu())
        patches.append(torch.nn.functional.normalize(out["x_norm_patchtokens"].float(), dim=-1).cpu())
    backbone.train(was_training)
    return torch.cat(cls).numpy(), torch.cat(patches).numpy()


# -- probes: per-resample statistics -----------------------------------------------------------------------
def knn_predict(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, k: int, temperature: float) -> np.ndarray:
    """DINO's weighted k-NN vote: weights exp(cos / T) over the k nearest (cosine) fitting samples."""
    sim = test_x @ train_x.T
    k = min(k, train_x.shape[0])
    idx = np.argpartition(-sim, k - 1, axis=1)[:, :k]
    w = np.exp(np.take_along_axis(sim, idx, axis=1) / temperature)
    n_cls = int(train_y.max()) + 1
    votes = np.zeros((test_x.shape[0], n_cls))
    np.add.at(votes, (np.repeat(np.arange(test_x.shape[0]), k), train_y[idx].ravel()), w.ravel())
    return votes.argmax(axis=1)


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve (ties count ½); NaN without both classes."""
    pos = positive.astype(bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    s = scores[order]
    # average ranks of ties
    _, first, counts = np.unique(s, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@dataclass
class _PerInstance:
    """What a probe needs to be recomputed on any multiset of test instances."""

    kind: str  # "mean" (per-instance values averaged, weighted by count) | "auroc" | "r2"
    groups: dict[int, Any]


def _stat(per: _PerInstance, instances: np.ndarray) -> float:
    if per.kind == "mean":
        num = sum(per.groups[i][0] for i in instances)
        den = sum(per.groups[i][1] for i in instances)
        return float(num / den) if den else float("nan")
    if per.kind == "auroc":
        scores = np.concatenate([per.groups[i][0] for i in instances])
        labels = np.concatenate([per.groups[i][1] for i in instances])
        return auroc(scores, labels)
    pred = np.concatenate([per.groups[i][0] for i in instances])
    true = np.concatenate([per.groups[i][1] for i in instances])
    ss_res = ((pred - true) ** 2).sum(axis=0)
    ss_tot = ((true - true.mean(axis=0)) ** 2).sum(axis=0)
    return float(np.mean(1 - ss_res / np.maximum(ss_tot, 1e-12)))


def knn_class_per_instance(ps: ProbeSet, cls: np.ndarray, pc: ProbeConfig) -> _PerInstance | None:
    test = ~ps.fit
    if not ps.fit.any() or not test.any():
        return None
    pred = knn_predict(cls[ps.fit], ps.labels[ps.fit], cls[test], pc.knn_k, pc.knn_temperature)
    correct = pred == ps.labels[test]
    groups = {}
    for i in np.unique(ps.instances[test]):
        sel = ps.instances[test] == i
        groups[int(i)] = (float(correct[sel].sum()), float(sel.sum()))
    return _PerInstance("mean", groups)


def mask_knn_per_instance(ps: ProbeSet, patches: np.ndarray, pc: ProbeConfig) -> _PerInstance | None:
    if ps.token_defect is None:
        return None
    groups = {}
    for c in np.unique(ps.classes):
        bank_views = (ps.classes == c) & ~ps.anomalous
        query_views = np.flatnonzero((ps.classes == c) & ps.anomalous)
        if not bank_views.any() or not len(query_views):
            continue
        bank = torch.from_numpy(patches[bank_views][ps.token_valid[bank_views]])
        for v in query_views:
            frac = ps.token_defect[v]
            keep = ps.token_valid[v] & ((frac >= pc.mask_min_fraction) | (frac == 0))
            if not keep.any():
                continue
            q = torch.from_numpy(patches[v][keep])
            score = (1 - (q @ bank.T).amax(dim=1)).numpy()
            i = int(ps.instances[v])
            old = groups.get(i, (np.zeros(0), np.zeros(0, bool)))
            groups[i] = (np.concatenate([old[0], score]), np.concatenate([old[1], frac[keep] >= pc.mask_min_fraction]))
    groups = {i: g for i, g in groups.items() if len(g[0])}
    if not groups or not any(g[1].any() for g in groups.values()):
        return None
    return _PerInstance("auroc", groups)


def defect_score_maps(ps: ProbeSet, patches: np.ndarray, views: list[int]) -> np.ndarray:
    """(len(views), h, w) mask-probe scores (cosine distance to the class's nominal bank; NaN where not
    valid) of the chosen views, for the run's pictures."""
    h, w = ps.grid
    maps = np.full((len(views), h * w), np.nan, np.float32)
    for j, v in enumerate(views):
        bank_views = (ps.classes == ps.classes[v]) & ~ps.anomalous
        bank = torch.from_numpy(patches[bank_views][ps.token_valid[bank_views]])
        q = torch.from_numpy(patches[v][ps.token_valid[v]])
        if len(bank) and len(q):
            maps[j, ps.token_valid[v]] = (1 - (q @ bank.T).amax(dim=1)).numpy()
    return maps.reshape(len(views), h, w)


def probe_picture(ps: ProbeSet, views: list[int], trained: np.ndarray, random_init: np.ndarray) -> np.ndarray:
    """Rows of [input | GT defect tokens | trained scores | random-init scores] (uint8 RGB); the two score
    maps share one colour scale per row, so brighter = farther from the nominal bank."""
    size = ps.inputs.shape[-1]
    h, w = ps.grid
    rows = []
    for j, v in enumerate(views):
        x = ps.inputs[v].float().mean(dim=0).numpy()
        x = (x - x.min()) / max(float(x.max() - x.min()), 1e-6)
        gt = np.nan_to_num(ps.token_defect[v]).reshape(h, w) if ps.token_defect is not None else np.zeros((h, w))
        pair = np.stack([trained[j], random_init[j]])
        lo, hi = np.nanpercentile(pair, 1), np.nanpercentile(pair, 99)
        pair = np.nan_to_num((pair - lo) / max(hi - lo, 1e-6)).clip(0, 1)
        tiles = [x] + [np.kron(t, np.ones((size // h, size // w))) for t in (gt, pair[0], pair[1])]
        rows.append(np.concatenate(tiles, axis=1))
    gray = (np.concatenate(rows, axis=0) * 255).round().astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=2)


def shape_ridge_per_instance(ps: ProbeSet, patches: np.ndarray, pc: ProbeConfig) -> _PerInstance | None:
    if ps.token_shape is None:
        return None
    ok = ps.token_valid & np.isfinite(ps.token_shape).all(axis=-1)
    fit_tok = ok & ps.fit[:, None]
    test_tok = ok & ~ps.fit[:, None]
    if fit_tok.sum() < 10 or not test_tok.any():
        return None
    X = patches[fit_tok].astype(np.float64)
    Y = ps.token_shape[fit_tok]
    mu_x, mu_y, sd_y = X.mean(0), Y.mean(0), Y.std(0) + 1e-12
    Xc, Yc = X - mu_x, (Y - mu_y) / sd_y
    w = np.linalg.solve(Xc.T @ Xc + pc.ridge_lambda * len(X) * np.eye(X.shape[1]), Xc.T @ Yc)
    groups = {}
    views = np.flatnonzero(~ps.fit)
    for v in views:
        sel = test_tok[v]
        if not sel.any():
            continue
        pred = (patches[v][sel].astype(np.float64) - mu_x) @ w
        true = (ps.token_shape[v][sel] - mu_y) / sd_y
        i = int(ps.instances[v])
        old = groups.get(i, (np.zeros((0, 3)), np.zeros((0, 3))))
        groups[i] = (np.concatenate([old[0], pred]), np.concatenate([old[1], true]))
    return _PerInstance("r2", groups) if groups else None


def compute_per_instance(ps: ProbeSet, cls: np.ndarray, patches: np.ndarray, pc: ProbeConfig) -> dict[str, _PerInstance]:
    out = {"knn_class": knn_class_per_instance(ps, cls, pc), "mask_knn": mask_knn_per_instance(ps, patches, pc),
           "shape_ridge": shape_ridge_per_instance(ps, patches, pc)}
    return {k: v for k, v in out.items() if v is not None}


def bootstrap_compare(trained: _PerInstance, random_init: _PerInstance | None, n_boot: int, seed: int) -> dict:
    """Point values and 95 % percentile intervals of trained, random and (paired) trained − random."""
    ids = np.array(sorted(trained.groups))
    rng = np.random.default_rng(seed)
    t_point = _stat(trained, ids)
    res: dict[str, Any] = {"value": t_point, "n_instances": int(len(ids))}
    boots = [rng.choice(ids, size=len(ids), replace=True) for _ in range(n_boot)]
    t_b = np.array([_stat(trained, b) for b in boots])
    res["ci95"] = [float(np.nanpercentile(t_b, 2.5)), float(np.nanpercentile(t_b, 97.5))]
    if random_init is not None and set(random_init.groups) == set(trained.groups):
        r_point = _stat(random_init, ids)
        r_b = np.array([_stat(random_init, b) for b in boots])
        d_b = t_b - r_b
        res.update({"random": r_point, "random_ci95": [float(np.nanpercentile(r_b, 2.5)), float(np.nanpercentile(r_b, 97.5))],
                    "delta": t_point - r_point,
                    "delta_ci95": [float(np.nanpercentile(d_b, 2.5)), float(np.nanpercentile(d_b, 97.5))]})
        res["beats_random"] = bool(res["delta_ci95"][0] > 0)
    return res


# -- the run-level objects ---------------------------------------------------------------------------------
class CollapseMonitor:
    """Warns when the teacher entropy stays within ``margin`` nat of ln K over ``window`` iterations."""

    def __init__(self, n_prototypes: int, margin: float, window: int) -> None:
        self.log_k = math.log(n_prototypes)
        self.margin = margin
        self.window = max(1, int(window))
        self.history: list[tuple[int, float]] = []
        self.warned = False  # one warning per collapsed stretch

    def observe(self, iteration: int, entropy: float | None) -> dict | None:
        """Record one logged teacher entropy; returns the warning event when collapse is detected."""
        if entropy is None or not math.isfinite(entropy):
            return None
        self.history.append((iteration, float(entropy)))
        first = iteration - self.window
        self.history = [(i, h) for i, h in self.history if i >= first]
        if self.history[0][0] > first or iteration < self.window:  # the window is not covered yet
            return None
        collapsed = all(h >= self.log_k - self.margin for _, h in self.history)
        if not collapsed:
            self.warned = False
            return None
        if self.warned:
            return None
        self.warned = True
        worst = min(h for _, h in self.history)
        return {"iteration": iteration, "event": "collapse_warning", "teacher_entropy_min": worst, "ln_k": self.log_k,
                "window": self.window,
                "message": f"teacher entropy stayed within {self.margin} nat of ln K = {self.log_k:.3f} over the last "
                           f"{self.window} iterations (min {worst:.3f}): the teacher is uniform (collapsed); "
                           "the encoder is not learning (docs/pretraining.md, 'Probes')"}


class PretrainProbes:
    """The held-out set and the random-init reference of one run (built once, rank 0)."""

    def __init__(self, cfg: PretrainConfig, vit_cfg: ViTConfig, device: torch.device) -> None:
        self.cfg = cfg
        self.pc = cfg.probe
        self.device = device
        self.data = load_probe_set(cfg)
        # Random init of the same architecture, from its own seeded stream: the training RNG state is
        # untouched (resume stays bit-exact) and every run of a config gets the same reference.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.pc.random_init_seed)
            backbone = vit_from_config(vit_cfg).to(device)
        cls, patches = encode(backbone, self.data.inputs, self.pc.batch_size)
        self.random_per_instance = compute_per_instance(self.data, cls, patches, self.pc)
        del backbone
        # The run's pictures: the anomalous views with the most defect tokens (up to 4).
        self.picture_views: list[int] = []
        if self.data.token_defect is not None:
            n_defect = np.nansum(self.data.token_defect >= self.pc.mask_min_fraction, axis=1)
            self.picture_views = [int(v) for v in np.argsort(-n_defect, kind="stable")[:4] if n_defect[v] > 0]
        self.random_maps = defect_score_maps(self.data, patches, self.picture_views)
        self.last_picture: np.ndarray | None = None
        n = len(self.data.instance_names)
        log.info("probes: %d views of %d instances from %s at %d px; random-init reference: %s", len(self.data.labels), n,
                 self.pc.root, self.pc.size, ", ".join(f"{k}={_stat(v, np.array(sorted(v.groups))):.3f}"
                                                       for k, v in self.random_per_instance.items()))

    def evaluate(self, backbone: nn.Module, iteration: int) -> dict:
        """Every probe on ``backbone`` next to the random-init reference → a metrics record."""
        cls, patches = encode(backbone, self.data.inputs, self.pc.batch_size)
        trained = compute_per_instance(self.data, cls, patches, self.pc)
        record: dict[str, Any] = {"iteration": iteration, "event": "probe"}
        if self.picture_views:
            self.last_picture = probe_picture(self.data, self.picture_views,
                                              defect_score_maps(self.data, patches, self.picture_views), self.random_maps)
        for name, per in trained.items():
            record[name] = bootstrap_compare(per, self.random_per_instance.get(name), self.pc.bootstrap,
                                             self.pc.bootstrap_seed)
        return record


def describe(record: dict) -> str:
    parts = []
    for name in PROBE_NAMES:
        r = record.get(name)
        if r is None:
            continue
        s = f"{name} {r['value']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]"
        if "delta" in r:
            s += f" (random {r['random']:.3f}, Δ {r['delta']:+.3f} [{r['delta_ci95'][0]:+.3f}, {r['delta_ci95'][1]:+.3f}])"
        parts.append(s)
    return "; ".join(parts)


# -- trainer call sites (pretrain/train.py keeps only these calls) ------------------------------------------
@dataclass
class RunProbes:
    """What the trainer holds: the collapse monitor (always) and the probes (with ``probe.root``)."""

    collapse: CollapseMonitor | None
    probes: PretrainProbes | None


def build_run_probes(trainer: Trainer) -> RunProbes | None:
    """Rank 0: the collapse monitor and, when ``probe.root`` is set, the held-out probes (random-init
    reference computed here, once). Other ranks: None."""
    if not trainer.is_main:
        return None
    cfg = trainer.cfg
    pc = cfg.probe
    collapse = None
    if pc.collapse_margin > 0:
        window = pc.collapse_window or max(100, round(cfg.teacher.warmup_teacher_temp_epochs * cfg.train.epoch_length))
        collapse = CollapseMonitor(cfg.dino.head_n_prototypes, pc.collapse_margin, window)
    probes = PretrainProbes(cfg, trainer.teacher_vit_cfg, trainer.device) if pc.root else None
    return RunProbes(collapse, probes)


def observe_log_record(trainer: Trainer, record: dict) -> None:
    """After each logged record: collapse check (warning in the log and a metrics.jsonl event)."""
    rp: RunProbes | None = getattr(trainer, "run_probes", None)
    if rp is None or rp.collapse is None:
        return
    event = rp.collapse.observe(int(record["iteration"]), record.get("teacher_entropy"))
    if event is not None:
        log.warning("COLLAPSE: %s", event["message"])
        trainer.metrics_log.write(event)


def run_probes(trainer: Trainer) -> dict | None:
    """Every ``train.eval_period`` and at the end: probes of the teacher backbone → metrics.jsonl (event
    ``probe``), TensorBoard (``probe/<name>``, ``probe/<name>_random``, ``probe/<name>_delta``), the log,
    and ``eval/probe_<it>.png`` (rows: input | GT defect tokens | trained | random-init defect scores)."""
    if not trainer.cfg.probe.root:
        return None
    state = trainer.teacher_backbone_state() if trainer.sharded else None  # FSDP: a collective, every rank
    rp: RunProbes | None = getattr(trainer, "run_probes", None)
    if rp is None or rp.probes is None:  # ranks other than 0
        return None
    backbone = trainer.teacher.backbone
    if state is not None:  # a plain copy of the gathered teacher backbone
        backbone = vit_from_config(trainer.teacher_vit_cfg).to(trainer.device)
        backbone.load_state_dict(state)
    record = rp.probes.evaluate(backbone, trainer.iteration)
    trainer.metrics_log.write(record)
    for name in PROBE_NAMES:
        r = record.get(name)
        if r is None:
            continue
        trainer.metrics_log.add_scalar(f"probe/{name}", r["value"], trainer.iteration)
        if "delta" in r:
            trainer.metrics_log.add_scalar(f"probe/{name}_random", r["random"], trainer.iteration)
            trainer.metrics_log.add_scalar(f"probe/{name}_delta", r["delta"], trainer.iteration)
    if rp.probes.last_picture is not None:
        import io

        from PIL import Image

        from shared.io import atomic_write_bytes

        buffer = io.BytesIO()
        Image.fromarray(rp.probes.last_picture).save(buffer, format="PNG")
        atomic_write_bytes(trainer.out_dir / "eval" / f"probe_{trainer.iteration:08d}.png", buffer.getvalue())
    log.info("probes at iteration %d: %s", trainer.iteration, describe(record))
    return record
