"""Multi-class ModMap (``../shared/spec/modmap.md`` §15): one model set for all classes.

The modulators see ``[v_s ; v_t ; c]`` with ``c`` the one-hot class code (C classes), view codes sized
for the class with the most views (N_max; a 12-view class uses slots 0..11); the mapping networks are
shared. The training set is the union of every class's pairs (``modmap``: N_c² each, same-view variants:
N_c each), with the optimiser and schedule of the class-specific training (§8);
``class_balanced`` resamples the pairs so every class contributes equally per epoch.

Everything goes through :class:`detect.model.ModMap`, :func:`detect.model.training_pairs`,
:func:`detect.modmap.make_optimizer` and :func:`detect.modmap.batch_plan` — only the pair bookkeeping
across classes lives here. :func:`fit_multiclass_run` / :func:`load_multiclass_model` plug it into
:class:`detect.run.Runner` (``multi_class: true``); the model is stored once per setup in
``<out>/<setup>/_multiclass/model.pt``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from detect.model import ModMap, training_pairs
from detect.modmap import TrainSettings, batch_plan, make_optimizer, mapping_loss, run_mapping_epochs

if TYPE_CHECKING:
    from detect.run import Runner

MULTICLASS_DIR = "_multiclass"
# Columns of the pair table built by :func:`class_pairs`.
GLOBAL_SRC, GLOBAL_TGT, LOCAL_SRC, LOCAL_TGT, CLASS = range(5)


def class_pairs(n_views_per_class: Sequence[int], variant: str = "modmap") -> torch.Tensor:
    """Training pairs of every class, (P, 5) long: global source/target rows in the concatenated feature
    tensors, local (per-class) source/target view ids, class index."""
    rows = []
    offset = 0
    for c, n in enumerate(n_views_per_class):
        local = training_pairs(int(n), variant)  # type: ignore[arg-type]
        cls = torch.full((len(local), 1), c, dtype=torch.long)
        rows.append(torch.cat([local + offset, local, cls], dim=1))
        offset += int(n)
    return torch.cat(rows)


def pairs_per_epoch(pairs: torch.Tensor, n_classes: int, class_balanced: bool) -> int:
    if not class_balanced:
        return len(pairs)
    counts = torch.bincount(pairs[:, CLASS], minlength=n_classes)
    return int(counts.max()) * n_classes


def epoch_order(pairs: torch.Tensor, n_classes: int, class_balanced: bool, gen: torch.Generator) -> torch.Tensor:
    """Row indices into ``pairs`` for one epoch, shuffled with ``gen``.

    Class-balanced: every class contributes as many pairs as the largest class, by cycling through
    fresh permutations of its own pairs (each pair used ⌊m/P_c⌋ or ⌈m/P_c⌉ times), so no pair is
    favoured beyond what balancing requires.
    """
    if not class_balanced:
        return torch.randperm(len(pairs), generator=gen)
    cls = pairs[:, CLASS]
    target = int(torch.bincount(cls, minlength=n_classes).max())
    picks = []
    for c in range(n_classes):
        rows = torch.nonzero(cls == c).flatten()
        reps = [rows[torch.randperm(len(rows), generator=gen)] for _ in range(math.ceil(target / len(rows)))]
        picks.append(torch.cat(reps)[:target])
    order = torch.cat(picks)
    return order[torch.randperm(len(order), generator=gen)]


def total_multiclass_steps(n_views_per_class: Sequence[int], settings: TrainSettings,
                           class_balanced: bool = False) -> tuple[int, int, int]:
    """(epochs actually run, iterations per epoch, total optimizer steps); ``match_steps`` as in §16."""
    n_classes = len(n_views_per_class)
    pairs = class_pairs(n_views_per_class, settings.variant)
    _, iters = batch_plan(pairs_per_epoch(pairs, n_classes, class_balanced), settings.batch_size)
    epochs = settings.epochs
    if settings.match_steps and settings.variant != "modmap":
        full = class_pairs(n_views_per_class, "modmap")
        _, iters_modmap = batch_plan(pairs_per_epoch(full, n_classes, class_balanced), settings.batch_size)
        epochs = math.ceil(settings.epochs * iters_modmap / iters)
    return epochs, iters, epochs * iters


def fit_multiclass(features: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
                   settings: TrainSettings, class_balanced: bool = False,
                   log: Callable[[dict], None] | None = None,
                   progress: Callable[[int], None] | None = None) -> ModMap:
    """Train one model set on the cached tokens of every class.

    ``features[c] = (image (N_c, T, c_I), depth (N_c, T, c_D), token_valid (N_c, T) or None)``, all on
    one device with the same T. Returns a :class:`ModMap` with ``n_views = max N_c`` and
    ``n_classes = len(features)``.
    """
    if not features:
        raise ValueError("multi-class training needs at least one class")
    if settings.loss_mask not in ("all", "foreground"):
        raise ValueError(f"loss_mask must be 'all' or 'foreground', got {settings.loss_mask!r}")
    shapes = {(img.shape[1], img.shape[2], dep.shape[2]) for img, dep, _ in features}
    if len(shapes) != 1:
        raise ValueError(f"all classes need the same token count and feature sizes, got {sorted(shapes)}")
    for c, (img, dep, _) in enumerate(features):
        if img.shape[:2] != dep.shape[:2]:
            raise ValueError(f"class {c}: image tokens {tuple(img.shape)} and depth tokens {tuple(dep.shape)} differ")
    n_views = [int(img.shape[0]) for img, _, _ in features]
    n_classes = len(features)
    image = torch.cat([f[0] for f in features])
    depth = torch.cat([f[1] for f in features])
    valid = None
    if settings.loss_mask == "foreground":
        if any(f[2] is None for f in features):
            raise ValueError("loss_mask='foreground' needs the token validity of every class")
        valid = torch.cat([f[2] for f in features])  # type: ignore[misc]
    device = image.device
    torch.manual_seed(settings.seed)
    model = ModMap(max(n_views), image.shape[-1], depth.shape[-1], settings.modulator_hidden,
                   settings.variant, n_classes=n_classes).to(device)  # type: ignore[arg-type]
    model.train()
    pairs = class_pairs(n_views, settings.variant)
    batch, iters = batch_plan(pairs_per_epoch(pairs, n_classes, class_balanced), settings.batch_size)
    epochs, _, total = total_multiclass_steps(n_views, settings, class_balanced)
    opt, sched = make_optimizer(model, settings, total)
    pairs = pairs.to(device)
    gen = torch.Generator().manual_seed(settings.seed)

    def batch_loss(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        p = pairs[idx]
        pred_depth, pred_image = model(image[p[:, GLOBAL_SRC]], depth[p[:, GLOBAL_SRC]], p[:, LOCAL_SRC],
                                       p[:, LOCAL_TGT], p[:, CLASS])
        tgt = p[:, GLOBAL_TGT]
        return mapping_loss(pred_depth, depth[tgt], pred_image, image[tgt], None if valid is None else valid[tgt])

    run_mapping_epochs(opt, sched, epochs, iters, batch,
                       epoch_order=lambda _: epoch_order(pairs.cpu(), n_classes, class_balanced, gen).to(device),
                       batch_loss=batch_loss, log=log, progress=progress)
    model.eval()
    return model


# -- Runner integration ----------------------------------------------------------------------------
def multiclass_model_path(runner: Runner, setup: str) -> Path:
    return runner.out / setup / MULTICLASS_DIR / "model.pt"


def fit_multiclass_run(runner: Runner, setup: str, classes: Sequence[str]) -> Path:
    """Train the multi-class model of ``setup`` on the training instances of ``classes`` (in that order)."""
    from detect.data.sim3d import SiM3DError
    from detect.run import MODEL_FORMAT_VERSION, RunError, _bar, _class_dataset
    from shared.checkpoint import save_checkpoint
    from shared.io import atomic_write_text

    cfg = runner.cfg
    feats, stems, records, view_orders = [], {}, {}, {}
    encode_s = 0.0
    for class_name in classes:
        ds = _class_dataset(cfg, class_name)
        try:
            record = ds.train_record(setup)
        except SiM3DError as exc:
            raise RunError(str(exc)) from None
        f, secs = runner.features(ds, record, f"{class_name}/{record.name}")
        encode_s += secs
        feats.append(f.tensors(runner.device))
        stems[class_name] = list(f.stems)
        records[class_name] = record.name
        view_orders[class_name] = ds.view_order
    settings = TrainSettings(variant=cfg.variant, epochs=cfg.epochs, batch_size=cfg.batch_size, lr_max=cfg.lr_max,
                             loss_mask=cfg.loss_mask, match_steps=cfg.match_steps,
                             modulator_hidden=cfg.modulator_hidden, seed=cfg.seed)
    n_views = [int(f[0].shape[0]) for f in feats]
    _, _, total = total_multiclass_steps(n_views, settings, cfg.class_balanced)
    out_dir = multiclass_model_path(runner, setup).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    log_lines: list[str] = []
    bar = _bar(total, f"fit {setup}/multi-class ({len(classes)} classes)", cfg.progress, "step")

    def log(rec: dict) -> None:
        log_lines.append(json.dumps(rec))
        bar.set_postfix(loss=f"{rec['loss']:.4f}")

    t0 = time.perf_counter()
    try:
        model = fit_multiclass(feats, settings, cfg.class_balanced, log=log, progress=bar.update)
    finally:
        bar.close()
    train_s = time.perf_counter() - t0
    atomic_write_text(out_dir / "train_log.jsonl", "\n".join(log_lines) + "\n")
    image_dim, depth_dim = int(feats[0][0].shape[-1]), int(feats[0][1].shape[-1])
    meta = {
        "format_version": MODEL_FORMAT_VERSION, "variant": cfg.variant, "multi_class": True,
        "class_balanced": cfg.class_balanced, "classes": list(classes), "n_classes": len(classes),
        "n_views": max(n_views), "n_views_per_class": dict(zip(classes, n_views)),
        "view_stems_per_class": stems, "view_order_per_class": view_orders, "setup": setup,
        "train_instances": records, "image_dim": image_dim, "depth_dim": depth_dim,
        "modulator_hidden": cfg.modulator_hidden, "seed": cfg.seed,
        "train_settings": dataclasses.asdict(settings), "total_steps": total,
        "random_image_encoder": runner.random_encoder, "train_seconds": round(train_s, 3),
        "encode_seconds": round(encode_s, 3), **runner.encoder_record(),
    }
    meta["train_settings"]["betas"] = list(settings.betas)
    path = multiclass_model_path(runner, setup)
    save_checkpoint({**{k: {n: t.detach().cpu() for n, t in sd.items()}
                        for k, sd in model.component_state_dicts().items()}, "config": meta}, path)
    return path


def load_multiclass_model(runner: Runner, setup: str, class_name: str, n_views: int, stems: Sequence[str]
                          ) -> tuple[ModMap, dict]:
    """The multi-class model of ``setup``; ``meta["class_index"]`` is ``class_name``'s one-hot slot."""
    from detect.run import RunError
    from shared.checkpoint import CheckpointError, load_checkpoint

    path = multiclass_model_path(runner, setup)
    if not path.is_file():
        raise RunError(f"no multi-class model {path}: run --mode fit (or all) with multi_class=true first")
    try:
        obj = load_checkpoint(path)
        meta = dict(obj["config"])
        classes = list(meta["classes"])
        trained_stems = list(meta["view_stems_per_class"][class_name]) if class_name in classes else None
        model = ModMap(int(meta["n_views"]), int(meta["image_dim"]), int(meta["depth_dim"]),
                       int(meta["modulator_hidden"]), meta["variant"], n_classes=int(meta["n_classes"]))
        model.load_component_state_dicts(obj)
    except (CheckpointError, KeyError, TypeError, RuntimeError, ValueError) as exc:
        raise RunError(f"{path} is not a multi-class ModMap model file: {exc}") from None
    if trained_stems is None:
        raise RunError(f"class {class_name} is not one of the classes {classes} the multi-class model {path} "
                       "was trained on")
    if trained_stems != list(stems) or len(stems) != n_views:
        raise RunError(f"view mismatch for {setup}/{class_name}: the multi-class model in {path} was trained on "
                       f"views {trained_stems} of this class but the test instances have {n_views} views {list(stems)}")
    runner.check_model_meta(path, meta)
    meta["class_index"] = classes.index(class_name)
    return model.to(runner.device).eval(), meta
