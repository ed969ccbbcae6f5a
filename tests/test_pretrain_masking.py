"""iBOT block masking (dino_depth.md §4, §16)."""

from __future__ import annotations

import numpy as np
import torch
from test_pretrain_utils import single_thread  # noqa: F401

from pretrain.masking import (
    BlockMaskGenerator,
    assign_masks,
    collate_mask_fields,
    masked_upper_bound,
    plan_masks,
)

GRID = (16, 16)
N = 256


def test_block_generator_respects_target_and_shape():
    gen = BlockMaskGenerator(GRID)
    rng = np.random.default_rng(0)
    ratios = []
    for target in (4, 25, 60, 128):
        for _ in range(20):
            mask = gen(target, rng)
            count = int(mask.sum())
            assert mask.shape == GRID and 0 < count <= target
            ratios.append(count / target)
    assert np.mean(ratios) > 0.9  # under-shooting happens, but rarely by much


def test_exactly_half_of_the_global_crops_masked_with_stratified_counts():
    B = 8
    for it in range(5):
        masks = assign_masks(it, seed=0, global_batch_size=B, grid=GRID)
        assert masks.shape == (2 * B, N) and masks.dtype == torch.bool
        counts = masks.sum(dim=1)
        assert int((counts > 0).sum()) == B  # B of 2B when W = 1
        plan = plan_masks(it, 0, B, N)
        edges = np.linspace(0.1, 0.5, B + 1)
        lower = (N * edges[:-1]).astype(int)
        upper = (N * edges[1:]).astype(int)
        assert np.all(plan.targets >= lower) and np.all(plan.targets <= upper)
        # Each masked crop's count lies in its stratum (targets may be under-shot, never exceeded).
        for slot in range(2 * B):
            m = plan.slot_to_mask[slot]
            if m < 0:
                assert counts[slot] == 0
            else:
                assert 0 < counts[slot] <= plan.targets[m] <= upper[m]


def test_mask_counts_cover_the_ratio_range():
    B, seen = 16, []
    for it in range(20):
        masks = assign_masks(it, seed=3, global_batch_size=B, grid=GRID)
        c = masks.sum(dim=1)
        seen += (c[c > 0] / N).tolist()
    assert min(seen) < 0.15 and max(seen) > 0.4 and max(seen) <= 0.5


def test_masks_identical_for_one_and_two_ranks_at_equal_global_batch():
    G = 6
    for it in (0, 7):
        single = assign_masks(it, seed=11, global_batch_size=G, grid=GRID, rank=0, world_size=1)
        per_rank = [assign_masks(it, seed=11, global_batch_size=G, grid=GRID, rank=r, world_size=2) for r in (0, 1)]
        # Rank r's row c·B + k is global sample j = r + k·W, i.e. single-process row c·G + j.
        B = G // 2
        rebuilt = torch.zeros_like(single)
        for r in (0, 1):
            for c in (0, 1):
                for k in range(B):
                    rebuilt[c * G + r + 2 * k] = per_rank[r][c * B + k]
        assert torch.equal(rebuilt, single)
        assert int((rebuilt.sum(1) > 0).sum()) == G  # exactly G of the 2G crops of the global batch


def test_masks_depend_on_seed_and_iteration():
    a = assign_masks(0, 0, 4, GRID)
    assert torch.equal(a, assign_masks(0, 0, 4, GRID))
    assert not torch.equal(a, assign_masks(1, 0, 4, GRID))
    assert not torch.equal(a, assign_masks(0, 1, 4, GRID))


def test_collate_fields():
    masks = torch.zeros(4, 9, dtype=torch.bool)
    masks[0, [1, 2, 3, 4]] = True
    masks[3, [0, 8]] = True
    fields = collate_mask_fields(masks, upper_bound=masked_upper_bound(2, 9))
    assert fields["n_masked"] == 6
    assert torch.equal(fields["mask_indices"], torch.tensor([1, 2, 3, 4, 27, 35]))
    assert torch.allclose(fields["mask_weights"], torch.tensor([0.25] * 4 + [0.5] * 2))
    assert fields["n_masked_upper_bound"] == int(9 * 0.3) + int(9 * 0.5)
    # The bound holds for any plan.
    for it in range(10):
        m = assign_masks(it, 0, 8, GRID)
        assert int(m.sum()) <= masked_upper_bound(8, N)
