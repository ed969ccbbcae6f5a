"""ModMap streaming inference on cached tokens (``../shared/spec/modmap.md`` §9–§14).

For each target view t the sources are evaluated in chunks and the per-token minimum of ``1 − cos`` is
kept on the fly, for each direction separately (:func:`target_token_maps`) — no N×N maps are ever
materialised, so memory is the 2N cached token maps plus one target's intermediates (O(N)). One loop
(:func:`iter_view_maps`) turns them into per-view maps through a scorer hook: ModMap's (maps upsampled
bilinearly to the input size, zeroed outside the foreground mask, combined, ``max`` by default) or
CFM/CMDR-IAD's (:class:`detect.cmdr.CMDRScorer`). :func:`predict_instance` brings them back to the
original pixels and back-projects them into the voxel volume (:class:`detect.volume.VolumeAccumulator`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
import torch

from detect.model import ModMap, cosine_similarity
from detect.preprocess import (
    ViewGeometry,
    foreground_mask,
    gaussian_blur,
    preprocess_depth,
    undo_geometry,
    upsample_tokens,
)

Aggregation = Literal["max", "min", "prod", "mean"]
AGGREGATIONS: tuple[str, ...] = ("max", "min", "prod", "mean")


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
    fg_erosion: int = 0  # pixels (input size) of foreground next to invalid depth left unscored; 0 = the paper
    view_aggregation: str = "max"  # voxel score over views: max (the paper) or mean (detect.volume)
    occlusion_gate_m: float = 0.0  # metres; 0 = off (the paper); see occluded_context()
    occlusion_gate_tokens: float = 1.5  # neighbourhood radius of the gate, in tokens


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


def sync(device: torch.device) -> None:
    """Wait for the device (timings of CUDA work)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ViewScorer:
    """How one target view's token maps become its maps at the input size: ModMap's scoring (§10–§11):
    bilinear upsampling, optional Gaussian blur, zero outside the foreground, Ξ(Ψ_I, Ψ_D).

    A subclass replaces the scoring and keeps the loop (:class:`detect.cmdr.CMDRScorer`)."""

    def __init__(self, settings: InferenceSettings) -> None:
        self.settings = settings

    def foreground(self, depth_input: torch.Tensor) -> np.ndarray:
        """The scored pixels: the foreground (§10), less a band of ``fg_erosion`` pixels along silhouettes
        and depth holes, where features straddle object and background (demo-scale option)."""
        fg = foreground_mask(depth_input, self.settings.fg_connectivity)
        if self.settings.fg_erosion > 0:
            import cv2

            k = 2 * self.settings.fg_erosion + 1
            kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
            # outside the image counts as foreground (as in the opening): only depth edges are eroded
            fg = cv2.erode(fg.astype(np.uint8), kernel, borderType=cv2.BORDER_CONSTANT, borderValue=1).astype(bool)
        return fg

    def sources(self, model: ModMap | None, n_views: int) -> list[list[int]]:
        """Source views of every target (ModMap: all views, or a seeded subset; same-view variants: t)."""
        if model is None:
            raise ValueError("ModMap scoring needs a fitted model")
        return source_views_for(n_views, model.variant, self.settings.num_source_views, self.settings.seed)

    def token_maps(self, model: ModMap | None, image: torch.Tensor, depth: torch.Tensor, target: int,
                   sources: Sequence[int], class_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(Ψ_D, Ψ_I) token maps (T,) of view ``target``: ModMap's min-ensembled mapping errors.
        A scorer without mapping networks (:class:`detect.patchcore.PatchCoreScorer`) replaces this."""
        assert model is not None
        return target_token_maps(model, image, depth, target, sources, self.settings.source_chunk, class_id)

    def score(self, target: int, psi_d: torch.Tensor, psi_i: torch.Tensor, image: torch.Tensor,
              depth: torch.Tensor, fg: np.ndarray, depth_input: torch.Tensor, grid: tuple[int, int],
              size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(Ψ_D, Ψ_I, combined) maps of view ``target`` at ``size`` from its token maps (T,)."""
        maps = upsample_tokens(torch.stack([psi_d, psi_i]), grid, size)
        maps = gaussian_blur(maps, self.settings.blur_sigma)
        fg_t = torch.from_numpy(fg).to(maps.device)
        maps = maps * fg_t
        return maps[0], maps[1], combine_maps(maps[1], maps[0], self.settings.aggregation)


def iter_view_maps(model: ModMap | None, image: torch.Tensor, depth: torch.Tensor, grid: tuple[int, int],
                   depth_inputs: Callable[[int], torch.Tensor], size: int, settings: InferenceSettings,
                   timing: InstanceTiming | None = None, class_id: int | None = None,
                   scorer: ViewScorer | None = None) -> Iterator[ViewMaps]:
    """Stream the per-view maps of one instance, one target at a time.

    ``depth_inputs(t)`` returns the preprocessed depth of view t at ``size`` (for the foreground mask);
    ``scorer`` computes the target's token maps and turns them into maps (default: ModMap's,
    :class:`ViewScorer`; ``model`` may be None for a scorer that needs none, e.g. PatchCore's).
    """
    scorer = scorer if scorer is not None else ViewScorer(settings)
    n_views = image.shape[0]
    sources = scorer.sources(model, n_views)
    targets = target_views_for(n_views, settings.num_target_views, settings.seed)
    for t in targets:
        d_in = depth_inputs(t)
        fg = scorer.foreground(d_in)
        sync(image.device)
        t0 = time.perf_counter()
        psi_d, psi_i = scorer.token_maps(model, image, depth, t, sources[t], class_id)
        img2depth, depth2img, combined = scorer.score(t, psi_d, psi_i, image, depth, fg, d_in, grid, size)
        sync(image.device)
        if timing is not None:
            timing.map_s += time.perf_counter() - t0
            timing.n_views += 1
            timing.n_pairs += len(sources[t])
        yield ViewMaps(t, img2depth, depth2img, combined, fg)


@dataclass
class RefinedView:
    """What a ``refine`` callback of :func:`predict_instance` returns for one view."""

    scores: np.ndarray  # (H, W) the view's map at the original pixels, used on its foreground pixels
    moved: np.ndarray | None = None  # (H, W) bool: pixels whose scores go to `moved_to`, not to their own points
    moved_to: np.ndarray | None = None  # (K, 3) world points, one per `moved` pixel in row-major order


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


def occluded_context(depth_m: np.ndarray, radius_px: float, tolerance_m: float) -> np.ndarray:
    """Pixels seen past an occluding edge: within ``radius_px`` pixels (a square window) of a depth jump
    whose near side is more than ``tolerance_m`` in front of them, e.g. what a view sees through a hole.

    A depth jump is a pair of 4-neighbours whose depths differ by more than ``tolerance_m`` (a surface
    does not change that much between adjacent pixels unless seen at a grazing angle; a slope alone is
    no occlusion). A token's score describes its whole patch and its context: where a view looks through
    a hole onto a surface far behind, the hole's score lands on that far surface, which the other views
    see as nominal (issue 23: most false-positive voxels at 1 % FPR of the demo's PatchCore come from
    "missing" defects). The volume therefore takes such pixels as a second tier
    (:class:`detect.volume.VolumeAccumulator`): used only for voxels that no view sees plainly. Depth
    ≤ 0 or non-finite is invalid and never context.
    """
    from scipy.ndimage import minimum_filter

    d = np.asarray(depth_m, dtype=np.float32)
    valid = np.isfinite(d) & (d > 0)
    d = np.where(valid, d, np.inf).astype(np.float32)
    # depth of the near side of every jump, at its far-side pixel (inf elsewhere)
    near = np.full(d.shape, np.inf, np.float32)
    with np.errstate(invalid="ignore"):  # inf − inf between two invalid pixels: no jump
        for axis in (0, 1):
            lo, hi = [slice(None)] * 2, [slice(None)] * 2
            lo[axis], hi[axis] = slice(None, -1), slice(1, None)
            for here, there in ((tuple(lo), tuple(hi)), (tuple(hi), tuple(lo))):  # both neighbours on the axis
                jump = valid[here] & valid[there] & (d[here] - d[there] > tolerance_m)
                near[here] = np.where(jump, np.minimum(near[here], d[there]), near[here])
    near_front = minimum_filter(near, size=2 * int(round(radius_px)) + 1, mode="nearest")
    with np.errstate(invalid="ignore"):  # inf − inf at invalid pixels: never context
        return valid & (d - near_front > tolerance_m)


def predict_instance(model: ModMap | None, image: torch.Tensor, depth: torch.Tensor, grid: tuple[int, int],
                     load_view: Callable[[int], tuple[np.ndarray, object | None]], geometries: Sequence[ViewGeometry],
                     size: int, depth_norm: dict, settings: InferenceSettings, voxel_grid=None,
                     on_view: Callable[[ViewMaps, np.ndarray], None] | None = None,
                     class_id: int | None = None, scorer: ViewScorer | None = None,
                     refine: Callable[[int, np.ndarray], RefinedView] | None = None) -> InstancePrediction:
    """Per-view maps → original geometry → voxel volume for one instance, streaming over targets.

    ``load_view(t)`` returns the raw depth (H, W) of view t and its :class:`detect.volume.ViewCalibration`
    (or None: 2D-only mode). ``depth_norm`` holds ``mode``/``eps``/``pct``/``pad_mode`` of the depth
    preprocessing. ``voxel_grid`` (a :class:`shared.geometry.VoxelGrid`) enables the volume;
    ``on_view(maps, combined_original)`` receives every view's maps (e.g. to save them); ``class_id``
    is the class index of a multi-class model (None: class-specific). ``scorer`` replaces ModMap's
    per-view scoring (e.g. :class:`detect.cmdr.CMDRScorer`). ``refine(view, map)`` returns a :class:`RefinedView`:
    a replacement of each view's map at the original pixels, used on the foreground pixels before the map
    is saved and projected (e.g. the surface deviation of :mod:`detect.geometry`), and optionally pixels
    whose scores the volume puts on other 3D points than their own (e.g. a hole's rim instead of the
    surface seen through the hole, :func:`detect.geometry.see_through`).
    """
    from detect.volume import VolumeAccumulator

    timing = InstanceTiming()
    volume = VolumeAccumulator(voxel_grid, settings.view_aggregation) if voxel_grid is not None else None
    current: dict = {}

    def depth_input(t: int) -> torch.Tensor:
        raw, calib = load_view(t)
        current.clear()
        current.update(t=t, raw=raw, calib=calib)
        return depth_input_for_mask(raw, size, depth_norm["mode"], depth_norm["eps"], tuple(depth_norm["pct"]),
                                    depth_norm.get("pad_mode", "edge"))

    score_2d = 0.0
    for maps in iter_view_maps(model, image, depth, grid, depth_input, size, settings, timing, class_id, scorer):
        score_2d = max(score_2d, float(maps.combined.max()))
        geom = geometries[maps.view]
        t0 = time.perf_counter()
        combined_orig = undo_geometry(maps.combined, geom, "bilinear")
        fg_orig = None
        if refine is not None or volume is not None:
            fg_orig = undo_geometry(torch.from_numpy(maps.foreground), geom, "nearest")
        refined = None
        if refine is not None:
            refined = refine(maps.view, combined_orig)
            combined_orig = np.where(fg_orig, refined.scores, combined_orig).astype(np.float32)
            score_2d = max(score_2d, float(combined_orig.max()))
        if on_view is not None:
            on_view(maps, combined_orig)
        if volume is not None:
            raw, calib = current["raw"], current["calib"]
            if calib is None:
                raise ValueError(f"view {maps.view} has no calibration but a voxel grid was requested")
            if raw.shape != (geom.height, geom.width):
                raise ValueError(f"view {maps.view}: depth {raw.shape} does not match the preprocessed geometry "
                                 f"{(geom.height, geom.width)}")
            context = None
            if settings.occlusion_gate_m > 0:  # token footprint in original pixels × radius in tokens
                radius_px = settings.occlusion_gate_tokens * geom.side / grid[0]
                context = occluded_context(raw * calib.depth_scale, radius_px, settings.occlusion_gate_m)
            if refined is not None and refined.moved is not None:
                moved = refined.moved & fg_orig
                volume.add_points(refined.moved_to[fg_orig[refined.moved]], combined_orig[moved])
                fg_orig = fg_orig & ~refined.moved
            volume.add_view(raw, calib, combined_orig, fg_orig, settings.project_stride, context)
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


def eval_frame(score_map: torch.Tensor, geom, mask: np.ndarray, eval_res: int) -> tuple[np.ndarray, np.ndarray]:
    """(map, GT) at the evaluation resolution (metrics.md §8): native = the map's padding undone and
    bilinearly resized to the GT; ``eval_res`` R > 0 = CFM's convention (map resized to R×R, GT padded
    to a square with edge replication, nearest-resized to R×R, > 0.5)."""
    if eval_res <= 0:
        return undo_geometry(score_map, geom, "bilinear"), mask
    m = torch.nn.functional.interpolate(score_map.detach().float().cpu()[None, None], size=(eval_res, eval_res),
                                        mode="bilinear", align_corners=False)[0, 0].numpy()
    g = torch.from_numpy(mask.astype(np.float32))[None, None]
    if geom.side != geom.height or geom.side != geom.width:
        g = torch.nn.functional.pad(g, geom.pads, mode="replicate")
    g = torch.nn.functional.interpolate(g, size=(eval_res, eval_res), mode="nearest")[0, 0].numpy() > 0.5
    return m, g
