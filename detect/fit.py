"""ModMap training on cached tokens (``../shared/spec/modmap.md`` §8, §15, §16, §20).

One optimiser, schedule and loss for every training set: all N² ordered (source, target) view pairs
incl. self-pairs (``modmap``) or the N same-view pairs (``vc_cfm``/``cfm``) of one instance
(:func:`fit_modmap`); the union of every class's pairs with the class one-hot in the modulators
(:func:`fit_multiclass`, §15); or M single-view images with one view code (:func:`fit_single_view_mapping`,
§20). Loss ``[1 − mean cos(F̂_D, F_D)] + [1 − mean cos(F̂_I, F_I)]`` over every token of every pair in the
batch (or the valid-depth target tokens with ``loss_mask="foreground"``), one Adam and a OneCycleLR
stepped per iteration, pairs reshuffled every epoch with a seeded generator, ``drop_last`` — except that
a batch never exceeds the pairs per epoch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from detect.model import ModMap, cosine_similarity, training_pairs


# -- training --------------------------------------------------------------------------------------
@dataclass
class TrainSettings:
    """Optimisation settings (paper defaults, §8)."""

    variant: str = "modmap"
    epochs: int = 200
    batch_size: int = 48
    lr_max: float = 5e-4
    pct_start: float = 0.1
    div_factor: float = 25.0
    final_div_factor: float = 1e4
    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    loss_mask: str = "all"  # "all" tokens, or "foreground": target tokens with ≥ 50 % valid depth
    match_steps: bool = False  # same-view variants: as many optimizer steps as modmap would make
    modulator_hidden: int = 128
    seed: int = 42


def batch_plan(n_pairs: int, batch_size: int) -> tuple[int, int]:
    """(effective batch size, iterations per epoch): ``drop_last``, but never fewer than one batch."""
    if n_pairs < 1:
        raise ValueError("no training pairs")
    batch = min(batch_size, n_pairs)
    return batch, n_pairs // batch


def total_training_steps(n_views: int, settings: TrainSettings) -> tuple[int, int, int]:
    """(epochs actually run, iterations per epoch, total optimizer steps) for a variant."""
    n_pairs = len(training_pairs(n_views, settings.variant))  # type: ignore[arg-type]
    _, iters = batch_plan(n_pairs, settings.batch_size)
    epochs = settings.epochs
    if settings.match_steps and settings.variant != "modmap":
        _, iters_modmap = batch_plan(n_views * n_views, settings.batch_size)
        epochs = math.ceil(settings.epochs * iters_modmap / iters)
    return epochs, iters, epochs * iters


def make_optimizer(model: torch.nn.Module, settings: TrainSettings, total_steps: int
                   ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.OneCycleLR]:
    """Adam (no weight decay) + OneCycleLR: starts at lr_max/25, peaks after 10 %, ends at lr_max/25/1e4."""
    opt = torch.optim.Adam(model.parameters(), lr=settings.lr_max / settings.div_factor, betas=settings.betas,
                           eps=settings.adam_eps, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=settings.lr_max, total_steps=total_steps, pct_start=settings.pct_start,
        anneal_strategy="cos", cycle_momentum=False, div_factor=settings.div_factor,
        final_div_factor=settings.final_div_factor)
    return opt, sched


def mapping_loss(pred_depth: torch.Tensor, target_depth: torch.Tensor, pred_image: torch.Tensor,
                 target_image: torch.Tensor, token_weight: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """L = (1 − mean cos(depth)) + (1 − mean cos(image)) over the tokens of a batch; with ``token_weight``
    (B, T) the means run over the valid (foreground) tokens only. Returns (loss, mean cos depth, mean cos image)."""
    cos_d = cosine_similarity(pred_depth, target_depth)
    cos_i = cosine_similarity(pred_image, target_image)
    if token_weight is not None:
        w = token_weight.float()
        denom = w.sum().clamp_min(1.0)
        mean_d, mean_i = (cos_d * w).sum() / denom, (cos_i * w).sum() / denom
    else:
        mean_d, mean_i = cos_d.mean(), cos_i.mean()
    return (1.0 - mean_d) + (1.0 - mean_i), mean_d, mean_i


def pair_loss(model: ModMap, image: torch.Tensor, depth: torch.Tensor, pairs: torch.Tensor,
              token_valid: torch.Tensor | None = None, class_id: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss of a batch of (source, target) pairs; returns (loss, mean cos depth, mean cos image)."""
    src, tgt = pairs[:, 0], pairs[:, 1]
    pred_depth, pred_image = model(image[src], depth[src], src, tgt, class_id)
    return mapping_loss(pred_depth, depth[tgt], pred_image, image[tgt],
                        None if token_valid is None else token_valid[tgt])


def run_mapping_epochs(opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler, epochs: int,
                       iters: int, batch: int, epoch_order: Callable[[int], torch.Tensor],
                       batch_loss: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                       log: Callable[[dict], None] | None = None,
                       progress: Callable[[int], None] | None = None, check_every: int | None = None) -> None:
    """The optimisation loop shared by the per-class, multi-class and single-view mappings.

    Each epoch draws an order of training items (``epoch_order(epoch)``), cuts it into ``iters`` batches of
    ``batch`` and steps on ``batch_loss(indices)`` -> (loss, cos depth, cos image). A non-finite loss stops
    training with FloatingPointError instead of silently diverging, read every ``check_every`` steps and
    at each epoch's end (default: every step on the CPU, before its update; every 50 on an accelerator,
    where a host read per step would stall the queue: the first non-finite step is recorded on the device,
    and the few steps after it update a model that is discarded). ``log`` receives one record per epoch.
    """
    lr = opt.param_groups[0]["lr"]
    first_bad: torch.Tensor | None = None  # deferred checks: global step of the first non-finite loss, -1 = none
    every = 1

    def check(step: int) -> None:
        if first_bad is not None and (step % every == 0 or step % iters == 0) and int(first_bad) >= 0:
            bad = int(first_bad)
            raise FloatingPointError(f"non-finite loss at epoch {bad // iters}, iteration {bad % iters}")

    for epoch in range(epochs):
        order = epoch_order(epoch)
        sums = torch.zeros(3, device=order.device, dtype=torch.float64)
        if epoch == 0:
            every = check_every if check_every is not None else 1 if order.device.type == "cpu" else 50
            if every > 1:
                first_bad = torch.full((), -1, dtype=torch.long, device=order.device)
        for it in range(iters):
            loss, cos_d, cos_i = batch_loss(order[it * batch:(it + 1) * batch])
            step = epoch * iters + it
            if first_bad is None:
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"non-finite loss at epoch {epoch}, iteration {it}")
            else:
                first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss.detach()), step, first_bad)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            lr = opt.param_groups[0]["lr"]
            opt.step()
            sched.step()
            sums += torch.stack([loss.detach(), cos_d.detach(), cos_i.detach()]).double()
            if progress is not None:
                progress(1)
            check(step + 1)
        if log is not None:
            mean = (sums / iters).tolist()
            log({"epoch": epoch + 1, "loss": mean[0], "cos_depth": mean[1], "cos_image": mean[2],
                 "lr": lr, "steps": (epoch + 1) * iters})


def fit_modmap(image: torch.Tensor, depth: torch.Tensor, settings: TrainSettings,
               token_valid: torch.Tensor | None = None, log: Callable[[dict], None] | None = None,
               progress: Callable[[int], None] | None = None) -> ModMap:
    """Train one model set on cached tokens ``image`` (N, T, c_I) and ``depth`` (N, T, c_D) (same device).

    ``log`` receives one record per epoch (epoch, loss, cos terms, lr); ``progress`` the number of
    optimizer steps done since its last call.
    """
    if image.shape[:2] != depth.shape[:2]:
        raise ValueError(f"image tokens {tuple(image.shape)} and depth tokens {tuple(depth.shape)} differ in N or T")
    n_views = image.shape[0]
    device = image.device
    torch.manual_seed(settings.seed)
    model = ModMap(n_views, image.shape[-1], depth.shape[-1], settings.modulator_hidden,
                   settings.variant).to(device)  # type: ignore[arg-type]
    model.train()
    pairs = training_pairs(n_views, settings.variant).to(device)  # type: ignore[arg-type]
    batch, iters = batch_plan(len(pairs), settings.batch_size)
    epochs, _, total = total_training_steps(n_views, settings)
    opt, sched = make_optimizer(model, settings, total)
    mask = token_valid if settings.loss_mask == "foreground" else None
    if settings.loss_mask not in ("all", "foreground"):
        raise ValueError(f"loss_mask must be 'all' or 'foreground', got {settings.loss_mask!r}")
    gen = torch.Generator().manual_seed(settings.seed)
    run_mapping_epochs(opt, sched, epochs, iters, batch,
                       epoch_order=lambda _: torch.randperm(len(pairs), generator=gen).to(device),
                       batch_loss=lambda idx: pair_loss(model, image, depth, pairs[idx], mask),
                       log=log, progress=progress)
    model.eval()
    return model


# -- multi-class: the union of every class's pairs (§15) ---------------------------------------------
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


# -- single view: M images, one view code (§20) -------------------------------------------------------
def fit_single_view_mapping(image: torch.Tensor, depth: torch.Tensor, settings, token_valid: torch.Tensor | None = None,
                            log: Callable[[dict], None] | None = None,
                            progress: Callable[[int], None] | None = None) -> ModMap:
    """ModMap's mapping networks with one view, trained on M images (M, T, c): CFM with ModMap's loss,
    optimiser and OneCycle schedule; an epoch visits every image once (``settings.batch_size`` images
    per step, ``drop_last`` but at least one batch)."""
    if image.shape[:2] != depth.shape[:2]:
        raise ValueError(f"image tokens {tuple(image.shape)} and depth tokens {tuple(depth.shape)} differ in M or T")
    if settings.loss_mask not in ("all", "foreground"):
        raise ValueError(f"loss_mask must be 'all' or 'foreground', got {settings.loss_mask!r}")
    torch.manual_seed(settings.seed)
    model = ModMap(1, image.shape[-1], depth.shape[-1], settings.modulator_hidden, settings.variant).to(image.device)
    model.train()
    batch, iters = batch_plan(image.shape[0], settings.batch_size)
    opt, sched = make_optimizer(model, settings, settings.epochs * iters)
    view = torch.zeros(batch, dtype=torch.long, device=image.device)
    mask = token_valid if settings.loss_mask == "foreground" else None
    gen = torch.Generator().manual_seed(settings.seed)

    def batch_loss(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pred_d, pred_i = model(image[idx], depth[idx], view, view)
        return mapping_loss(pred_d, depth[idx], pred_i, image[idx], None if mask is None else mask[idx])

    run_mapping_epochs(opt, sched, settings.epochs, iters, batch,
                       epoch_order=lambda _: torch.randperm(image.shape[0], generator=gen).to(image.device),
                       batch_loss=batch_loss, log=log, progress=progress)
    model.eval()
    return model
