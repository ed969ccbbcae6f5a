"""ModMap training and streaming inference on cached tokens (``../shared/spec/modmap.md`` §8–§14).

Training (:func:`fit_modmap`): all N² ordered (source, target) view pairs incl. self-pairs (``modmap``) or
the N same-view pairs (``vc_cfm``/``cfm``), loss ``[1 − mean cos(F̂_D, F_D)] + [1 − mean cos(F̂_I, F_I)]``
over every token of every pair in the batch (or the valid-depth target tokens with
``loss_mask="foreground"``), one Adam and a OneCycleLR stepped per iteration, pairs reshuffled every
epoch with a seeded generator, ``drop_last`` — except that a batch never exceeds the pairs per epoch.

Inference (:func:`target_token_maps`, :func:`predict_instance`): for each target view t the sources are
evaluated in chunks and the per-token minimum of ``1 − cos`` is kept on the fly, for each direction
separately — no N×N maps are ever materialised, so memory is the 2N cached token maps plus one target's
intermediates (O(N)). Maps are upsampled bilinearly to the input size, zeroed outside the foreground
mask, combined (``max`` by default), brought back to the original pixels and back-projected into the
voxel volume (:class:`detect.volume.VolumeAccumulator`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
import torch

from detect.model import ModMap, cosine_similarity, training_pairs
from detect.preprocess import ViewGeometry, foreground_mask, preprocess_depth, undo_geometry, upsample_tokens

Aggregation = Literal["max", "min", "prod", "mean"]
AGGREGATIONS: tuple[str, ...] = ("max", "min", "prod", "mean")


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
                       progress: Callable[[int], None] | None = None) -> None:
    """The optimisation loop shared by the per-class, multi-class and single-view mappings.

    Each epoch draws an order of training items (``epoch_order(epoch)``), cuts it into ``iters`` batches of
    ``batch`` and steps on ``batch_loss(indices)`` -> (loss, cos depth, cos image). A non-finite loss stops
    training with FloatingPointError instead of silently diverging. ``log`` receives one record per epoch.
    """
    lr = opt.param_groups[0]["lr"]
    for epoch in range(epochs):
        order = epoch_order(epoch)
        sums = torch.zeros(3, device=order.device, dtype=torch.float64)
        for it in range(iters):
            loss, cos_d, cos_i = batch_loss(order[it * batch:(it + 1) * batch])
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss at epoch {epoch}, iteration {it}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            lr = opt.param_groups[0]["lr"]
            opt.step()
            sched.step()
            sums += torch.stack([loss.detach(), cos_d.detach(), cos_i.detach()]).double()
            if progress is not None:
                progress(1)
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


# -- inference -------------------------------------------------------------------------------------
def source_views_for(n_views: int, variant: str, num_source_views: int = 0, seed: int = 42) -> list[list[int]]:
    """Sources per target: all views (``modmap``), a seeded subset of M incl. t, or t only (same-view)."""
    if variant != "modmap":
        return [[t] for t in range(n_views)]
    if not num_source_views or num_source_views >= n_views:
        return [list(range(n_views)) for _ in range(n_views)]
    if num_source_views < 1:
        raise ValueError("num_source_views must be >= 1")
    rng = np.random.default_rng(seed)
    out = []
    for t in range(n_views):
        others = np.array([s for s in range(n_views) if s != t])
        pick = rng.choice(others, size=num_source_views - 1, replace=False) if num_source_views > 1 else []
        out.append(sorted([t, *map(int, pick)]))
    return out


def target_views_for(n_views: int, num_target_views: int = 0, seed: int = 42) -> list[int]:
    if not num_target_views or num_target_views >= n_views:
        return list(range(n_views))
    rng = np.random.default_rng(seed + 1)
    return sorted(int(t) for t in rng.choice(n_views, size=num_target_views, replace=False))


@torch.no_grad()
def target_token_maps(model: ModMap, image: torch.Tensor, depth: torch.Tensor, target: int,
                      sources: Sequence[int], chunk: int = 0, class_id: int | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Ψ_D^t and Ψ_I^t (T,) for one target: per-token minimum over ``sources`` of ``1 − cos``.

    ``image`` (N, T, c_I) and ``depth`` (N, T, c_D) are the cached tokens (on the model's device).
    Sources run in chunks of ``chunk`` (0 = all at once) with running minima (memory O(chunk·T)).
    ``class_id``: the class index of a multi-class model (§15), None for class-specific models.
    """
    src_all = torch.as_tensor(list(sources), dtype=torch.long, device=image.device)
    step = len(src_all) if chunk <= 0 else chunk
    best_d = best_i = None
    tgt_image, tgt_depth = image[target], depth[target]
    for start in range(0, len(src_all), step):
        src = src_all[start:start + step]
        tgt = torch.full_like(src, target)
        cls = None if class_id is None else torch.full_like(src, int(class_id))
        pred_depth, pred_image = model(image[src], depth[src], src, tgt, cls)
        err_d = (1.0 - cosine_similarity(pred_depth, tgt_depth.unsqueeze(0))).amin(dim=0)
        err_i = (1.0 - cosine_similarity(pred_image, tgt_image.unsqueeze(0))).amin(dim=0)
        best_d = err_d if best_d is None else torch.minimum(best_d, err_d)
        best_i = err_i if best_i is None else torch.minimum(best_i, err_i)
    return best_d, best_i


def combine_maps(psi_image: torch.Tensor, psi_depth: torch.Tensor, aggregation: str = "max") -> torch.Tensor:
    """Ξ(Ψ_I, Ψ_D) element-wise (§11): max (default), min, prod or mean."""
    if aggregation == "max":
        return torch.maximum(psi_image, psi_depth)
    if aggregation == "min":
        return torch.minimum(psi_image, psi_depth)
    if aggregation == "prod":
        return psi_image * psi_depth
    if aggregation == "mean":
        return 0.5 * (psi_image + psi_depth)
    raise ValueError(f"unknown aggregation {aggregation!r}; expected one of {AGGREGATIONS}")


def gaussian_blur(maps: torch.Tensor, sigma: float, padding: str = "reflect") -> torch.Tensor:
    """Separable Gaussian smoothing of (..., H, W) maps (truncated at 4σ); ``padding`` ``reflect``
    (ModMap's maps) or ``zeros`` (CFM's filters, used by the CMDR-IAD scoring)."""
    if sigma <= 0:
        return maps
    if padding not in ("reflect", "zeros"):
        raise ValueError(f"padding must be 'reflect' or 'zeros', got {padding!r}")
    radius = max(1, int(4.0 * sigma + 0.5))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=maps.device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = k / k.sum()
    lead = maps.shape[:-2]
    m = maps.reshape(-1, 1, *maps.shape[-2:])
    if padding == "zeros":
        m = torch.nn.functional.conv2d(m, k.view(1, 1, 1, -1), padding=(0, radius))
        m = torch.nn.functional.conv2d(m, k.view(1, 1, -1, 1), padding=(radius, 0))
    else:
        m = torch.nn.functional.pad(m, (radius, radius, 0, 0), mode="reflect")
        m = torch.nn.functional.conv2d(m, k.view(1, 1, 1, -1))
        m = torch.nn.functional.pad(m, (0, 0, radius, radius), mode="reflect")
        m = torch.nn.functional.conv2d(m, k.view(1, 1, -1, 1))
    return m.reshape(*lead, *maps.shape[-2:])


@dataclass
class InferenceSettings:
    aggregation: str = "max"
    blur_sigma: float = 0.0
    fg_connectivity: int = 4
    num_source_views: int = 0
    num_target_views: int = 0
    source_chunk: int = 0
    project_stride: int = 1
    seed: int = 42


@dataclass
class ViewMaps:
    """Per-view outputs at the network input size (size × size)."""

    view: int
    img2depth: torch.Tensor  # Ψ_D (image→depth mapping error), foreground only
    depth2img: torch.Tensor  # Ψ_I (depth→image mapping error), foreground only
    combined: torch.Tensor
    foreground: np.ndarray

    @property
    def anomaly_map(self) -> torch.Tensor:
        """The combined map Ξ(Ψ_I, Ψ_D) (anomalib's name)."""
        return self.combined


@dataclass
class InstanceTiming:
    map_s: float = 0.0
    volume_s: float = 0.0
    encode_s: float = 0.0
    n_views: int = 0
    n_pairs: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def iter_view_maps(model: ModMap, image: torch.Tensor, depth: torch.Tensor, grid: tuple[int, int],
                   depth_inputs: Callable[[int], torch.Tensor], size: int, settings: InferenceSettings,
                   timing: InstanceTiming | None = None, class_id: int | None = None) -> Iterator[ViewMaps]:
    """Stream the per-view maps of one instance, one target at a time.

    ``depth_inputs(t)`` returns the preprocessed depth of view t at ``size`` (for the foreground mask).
    """
    n_views = image.shape[0]
    sources = source_views_for(n_views, model.variant, settings.num_source_views, settings.seed)
    targets = target_views_for(n_views, settings.num_target_views, settings.seed)
    for t in targets:
        fg = foreground_mask(depth_inputs(t), settings.fg_connectivity)
        _sync(image.device)
        t0 = time.perf_counter()
        psi_d, psi_i = target_token_maps(model, image, depth, t, sources[t], settings.source_chunk, class_id)
        maps = upsample_tokens(torch.stack([psi_d, psi_i]), grid, size)
        maps = gaussian_blur(maps, settings.blur_sigma)
        fg_t = torch.from_numpy(fg).to(maps.device)
        maps = maps * fg_t
        combined = combine_maps(maps[1], maps[0], settings.aggregation)
        _sync(image.device)
        if timing is not None:
            timing.map_s += time.perf_counter() - t0
            timing.n_views += 1
            timing.n_pairs += len(sources[t])
        yield ViewMaps(t, maps[0], maps[1], combined, fg)


@dataclass
class InstancePrediction:
    pred_score: float  # max of the anomaly volume (max of the 2D maps without calibration)
    pred_score_2d: float  # max over the per-view foreground maps (the score without calibration)
    volume: object | None  # VolumeAccumulator
    timing: InstanceTiming = field(default_factory=InstanceTiming)


def depth_input_for_mask(depth: np.ndarray, size: int, norm: str, eps: float, pct: tuple[float, float],
                         pad_mode: str) -> torch.Tensor:
    """The preprocessed depth at the image input size, whose validity defines the foreground (§10)."""
    x, _ = preprocess_depth(depth, size, norm, eps, pct, pad_mode)  # type: ignore[arg-type]
    return x[0]


def predict_instance(model: ModMap, image: torch.Tensor, depth: torch.Tensor, grid: tuple[int, int],
                     load_view: Callable[[int], tuple[np.ndarray, object | None]], geometries: Sequence[ViewGeometry],
                     size: int, depth_norm: dict, settings: InferenceSettings, voxel_grid=None,
                     on_view: Callable[[ViewMaps, np.ndarray], None] | None = None,
                     class_id: int | None = None,
                     view_maps: Callable[..., Iterator[ViewMaps]] | None = None) -> InstancePrediction:
    """Per-view maps → original geometry → voxel volume for one instance, streaming over targets.

    ``load_view(t)`` returns the raw depth (H, W) of view t and its :class:`detect.volume.ViewCalibration`
    (or None: 2D-only mode). ``depth_norm`` holds ``mode``/``eps``/``pct``/``pad_mode`` of the depth
    preprocessing. ``voxel_grid`` (a :class:`shared.geometry.VoxelGrid`) enables the volume;
    ``on_view(maps, combined_original)`` receives every view's maps (e.g. to save them); ``class_id``
    is the class index of a multi-class model (None: class-specific). ``view_maps`` replaces
    :func:`iter_view_maps` (same arguments), e.g. :func:`detect.cmdr.iter_view_maps_cmdr`'s scoring.
    """
    from detect.volume import VolumeAccumulator

    timing = InstanceTiming()
    volume = VolumeAccumulator(voxel_grid) if voxel_grid is not None else None
    current: dict = {}

    def depth_input(t: int) -> torch.Tensor:
        raw, calib = load_view(t)
        current.clear()
        current.update(t=t, raw=raw, calib=calib)
        return depth_input_for_mask(raw, size, depth_norm["mode"], depth_norm["eps"], tuple(depth_norm["pct"]),
                                    depth_norm.get("pad_mode", "edge"))

    score_2d = 0.0
    for maps in (view_maps or iter_view_maps)(model, image, depth, grid, depth_input, size, settings, timing,
                                              class_id):
        score_2d = max(score_2d, float(maps.combined.max()))
        geom = geometries[maps.view]
        t0 = time.perf_counter()
        combined_orig = undo_geometry(maps.combined, geom, "bilinear")
        if on_view is not None:
            on_view(maps, combined_orig)
        if volume is not None:
            raw, calib = current["raw"], current["calib"]
            if calib is None:
                raise ValueError(f"view {maps.view} has no calibration but a voxel grid was requested")
            if raw.shape != (geom.height, geom.width):
                raise ValueError(f"view {maps.view}: depth {raw.shape} does not match the preprocessed geometry "
                                 f"{(geom.height, geom.width)}")
            fg_orig = undo_geometry(torch.from_numpy(maps.foreground), geom, "nearest")
            volume.add_view(raw, calib, combined_orig, fg_orig, settings.project_stride)
        timing.volume_s += time.perf_counter() - t0
    if volume is not None:
        # Occupancy (the evaluation domain) comes from every view, also those not used as targets.
        used = set(target_views_for(len(geometries), settings.num_target_views, settings.seed))
        for t in range(len(geometries)):
            if t not in used:
                raw, calib = load_view(t)
                volume.add_view(raw, calib, None, None, settings.project_stride)
    score = volume.instance_score() if volume is not None else score_2d
    return InstancePrediction(score, score_2d, volume, timing)
