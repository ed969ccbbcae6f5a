"""iBOT block masking (``../shared/spec/dino_depth.md`` §4).

* :class:`BlockMaskGenerator`: BEiT-style rectangles on one crop's patch grid.
* :func:`assign_masks`: the global-batch stratified assignment of an iteration. Exactly
  ``int(2G · p)`` of the 2G global crops of the global batch get a mask (p = 0.5: G of them), with
  targets stratified over ``linspace(r_min, r_max, n + 1)``; the list of masks is shuffled over the
  2G crop slots. Everything is a function of ``(seed, iteration)`` (and of the mask's own index), so
  masks do not depend on the world size W or on the number of loader workers; each rank builds only
  the masks of its own samples.

Crop slots of the global batch: sample j (0 ≤ j < G) of iteration i is the stream position
i·G + j and belongs to rank j mod W as its k-th sample, k = j div W. Its global crop c (0 or 1) is
slot ``c·G + j`` in the global list and row ``c·B + k`` of the rank's crop-major batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

_MASK_STREAM = 0x6D61736B  # "mask": separates the masking RNG streams from the data/augmentation ones


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


class BlockMaskGenerator:
    """BEiT block masking on an (h, w) patch grid.

    Repeatedly add a rectangle: area ~ U(min_num_patches, min(remaining, max_num_patches)), aspect
    log-uniform in [min_aspect, 1/min_aspect], h = round(√(area·a)), w = round(√(area/a)), placed
    uniformly if it fits; it is accepted if it adds between 1 and the remaining budget new patches.
    Up to 10 tries per rectangle; stop at the target or when nothing could be added (the target may
    be under-shot).
    """

    def __init__(self, grid: tuple[int, int], max_num_patches: float | None = None, min_num_patches: int = 4,
                 min_aspect: float = 0.3, max_aspect: float | None = None, tries: int = 10) -> None:
        self.height, self.width = grid
        self.num_patches = self.height * self.width
        self.max_num_patches = 0.5 * self.num_patches if max_num_patches is None else max_num_patches
        self.min_num_patches = min_num_patches
        max_aspect = max_aspect or 1.0 / min_aspect
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect))
        self.tries = tries

    def _add_rectangle(self, mask: np.ndarray, budget: float, rng: np.random.Generator) -> int:
        for _ in range(self.tries):
            # U(4, budget); with a budget below 4 the interval is [budget, 4] reversed → [budget, budget].
            low = min(self.min_num_patches, budget)
            area = rng.uniform(low, budget)
            aspect = math.exp(rng.uniform(*self.log_aspect))
            h = round(math.sqrt(area * aspect))
            w = round(math.sqrt(area / aspect))
            if 0 < h <= self.height and 0 < w <= self.width:
                top = int(rng.integers(0, self.height - h + 1))
                left = int(rng.integers(0, self.width - w + 1))
                window = mask[top:top + h, left:left + w]
                added = h * w - int(window.sum())
                if 0 < added <= budget:
                    window[...] = True
                    return added
        return 0

    def __call__(self, num_masking_patches: int, rng: np.random.Generator) -> np.ndarray:
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < num_masking_patches:
            budget = min(num_masking_patches - count, self.max_num_patches)
            added = self._add_rectangle(mask, budget, rng)
            if added == 0:
                break
            count += added
        return mask


@dataclass(frozen=True)
class MaskPlan:
    """The global mask assignment of one iteration (cheap: no mask is built yet)."""

    slot_to_mask: np.ndarray  # (2G,) index into `targets` of the mask in each slot, −1 = empty mask
    targets: np.ndarray  # (n_masked,) target patch counts (stratified)
    upper_bounds: np.ndarray  # (n_masked,) int(N_p · r_{i+1}): per-mask upper bound for buffers


def plan_masks(iteration: int, seed: int, global_batch_size: int, num_patches: int,
               mask_probability: float = 0.5, ratio_min_max: tuple[float, float] = (0.1, 0.5)) -> MaskPlan:
    """Decide which of the 2G crop slots are masked and each masked crop's target count."""
    n_slots = 2 * global_batch_size
    n_masked = int(n_slots * mask_probability)
    rng = _rng(seed, _MASK_STREAM, iteration)
    edges = np.linspace(ratio_min_max[0], ratio_min_max[1], n_masked + 1)
    ratios = rng.uniform(edges[:-1], edges[1:]) if n_masked else np.zeros(0)
    targets = (num_patches * ratios).astype(np.int64)
    upper = (num_patches * edges[1:]).astype(np.int64)
    content = np.concatenate([np.arange(n_masked), np.full(n_slots - n_masked, -1)])
    slot_to_mask = content[rng.permutation(n_slots)]
    return MaskPlan(slot_to_mask=slot_to_mask, targets=targets, upper_bounds=upper)


def assign_masks(iteration: int, seed: int, global_batch_size: int, grid: tuple[int, int], rank: int = 0,
                 world_size: int = 1, mask_probability: float = 0.5,
                 ratio_min_max: tuple[float, float] = (0.1, 0.5), min_num_patches: int = 4,
                 max_num_patches: float | None = None) -> torch.Tensor:
    """Masks (2B, h·w) bool of rank ``rank``'s global crops, crop-major (rows c·B + k).

    B = G / W; rank r's k-th sample is global sample j = r + k·W (§9), its crop c the global slot
    c·G + j. Mask m of the plan is built from its own generator keyed by (seed, iteration, m), so a
    rank builds only its own masks and the result is the same for any W at equal G.
    """
    if global_batch_size % world_size:
        raise ValueError(f"global batch {global_batch_size} is not divisible by world size {world_size}")
    batch = global_batch_size // world_size
    num_patches = grid[0] * grid[1]
    plan = plan_masks(iteration, seed, global_batch_size, num_patches, mask_probability, ratio_min_max)
    generator = BlockMaskGenerator(grid, max_num_patches=max_num_patches, min_num_patches=min_num_patches)
    out = np.zeros((2 * batch, num_patches), dtype=bool)
    for c in range(2):
        for k in range(batch):
            slot = c * global_batch_size + rank + k * world_size
            m = int(plan.slot_to_mask[slot])
            if m >= 0:
                out[c * batch + k] = generator(int(plan.targets[m]), _rng(seed, _MASK_STREAM, iteration, m)).ravel()
    return torch.from_numpy(out)


def collate_mask_fields(masks: torch.Tensor, upper_bound: int | None = None) -> dict:
    """Per-rank iBOT fields: flat indices into the (2B·N) patch grid, weights 1/|M_c|, count M.

    ``upper_bound`` (Σ int(N_p·r_{i+1}) over the masked crops) can size fixed-shape buffers.
    """
    flat = masks.flatten()
    indices = flat.nonzero().squeeze(1)
    counts = masks.sum(dim=1).clamp_min(1).float()
    weights = (1.0 / counts).unsqueeze(1).expand_as(masks).flatten()[indices]
    fields = {"mask_indices": indices, "mask_weights": weights, "n_masked": int(indices.numel())}
    if upper_bound is not None:
        fields["n_masked_upper_bound"] = int(upper_bound)
    return fields


def masked_upper_bound(global_batch_size: int, num_patches: int, mask_probability: float = 0.5,
                       ratio_min_max: tuple[float, float] = (0.1, 0.5)) -> int:
    """Σ int(N_p · r_{i+1}) over the masked crops of the global batch (a bound for any rank)."""
    n_masked = int(2 * global_batch_size * mask_probability)
    edges = np.linspace(ratio_min_max[0], ratio_min_max[1], n_masked + 1)
    return int((num_patches * edges[1:]).astype(np.int64).sum())
