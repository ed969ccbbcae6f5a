"""Loss maths against hand-written reference formulas (dino_depth.md §5, §16)."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from test_pretrain_utils import single_thread  # noqa: F401

from pretrain.losses import (
    DINOLoss,
    KoLeoLoss,
    TeacherTargets,
    dino_loss,
    dino_loss_terms,
    ibot_loss,
    koleo_loss,
    sinkhorn_knopp,
    softmax_center,
    update_center,
)

TOL = 1e-6


def close(value: torch.Tensor | float, expected: torch.Tensor | float, tol: float = TOL) -> bool:
    """|value − expected| ≤ tol·max(1, |expected|): 1e-6 in fp32 terms (relative above 1)."""
    value, expected = float(value), float(expected)
    return abs(value - expected) <= tol * max(1.0, abs(expected))


def ref_ce(p: torch.Tensor, s: torch.Tensor, tau: float) -> torch.Tensor:
    """−(1/R) Σ_r Σ_k P_rk log softmax(s_r/τ)_k, written out."""
    z = s / tau
    log_softmax = z - torch.logsumexp(z, dim=1, keepdim=True)
    return -(p * log_softmax).sum(dim=1).mean()


def probs(B: int, K: int, gen: torch.Generator) -> torch.Tensor:
    return torch.softmax(torch.randn(B, K, generator=gen) * 3, dim=1)


def test_dino_loss_is_the_18_pair_mean():
    gen = torch.Generator().manual_seed(0)
    B, K, tau = 5, 32, 0.1
    s = [torch.randn(B, K, generator=gen) for _ in range(10)]  # g1, g2, l1..l8
    p = [probs(B, K, gen) for _ in range(2)]
    terms = [ref_ce(p[a], s[2 + j], tau) for j in range(8) for a in range(2)]  # 16 local × global
    terms += [ref_ce(p[1], s[0], tau), ref_ce(p[0], s[1], tau)]  # the 2 cross-global pairs
    expected = sum(terms) / 18
    assert len(terms) == 18
    assert close(dino_loss(s, p), expected.item())
    local, cross = dino_loss_terms(s, p)
    assert close(local, (sum(terms[:16]) / 18).item())
    assert close(cross, (sum(terms[16:]) / 18).item())
    module_local, module_cross = DINOLoss(tau)(s, p)
    assert torch.equal(module_local, local) and torch.equal(module_cross, cross)


def test_dino_loss_uniform_student_gives_ln_k():
    gen = torch.Generator().manual_seed(1)
    K = 64
    s = [torch.zeros(3, K) for _ in range(4)]
    p = [probs(3, K, gen) for _ in range(2)]
    assert abs(dino_loss(s, p).item() - math.log(K)) < 1e-5


def test_dino_loss_temperature_and_no_self_pair():
    # Only globals: pairs (g1 → P2) and (g2 → P1); changing P1 must not affect the g1 term.
    gen = torch.Generator().manual_seed(2)
    s = [torch.randn(4, 16, generator=gen) for _ in range(2)]
    p = [probs(4, 16, gen) for _ in range(2)]
    expected = (ref_ce(p[1], s[0], 0.2) + ref_ce(p[0], s[1], 0.2)) / 2
    assert close(dino_loss(s, p, student_temp=0.2), expected.item())


def test_ibot_loss_per_crop_weighting_with_empty_masks():
    gen = torch.Generator().manual_seed(3)
    G, N, K, tau = 4, 9, 16, 0.1
    masks = torch.zeros(G, N, dtype=torch.bool)
    masks[0, [0, 1, 2, 5]] = True  # 4 tokens
    masks[2, [7]] = True  # 1 token; crops 1 and 3 have no mask
    M = int(masks.sum())
    s = torch.randn(M, K, generator=gen)
    p = probs(M, K, gen)
    # Reference: tokens in masks.flatten().nonzero() order → crop 0 gets rows 0..3, crop 2 row 4.
    crop0 = ref_ce(p[:4], s[:4], tau)
    crop2 = ref_ce(p[4:], s[4:], tau)
    expected = (crop0 + crop2 + 0 + 0) / G
    assert close(ibot_loss(s, p, masks, tau), expected.item())
    # Uniform student logits: each masked crop contributes ln K, unmasked crops 0.
    uniform = ibot_loss(torch.zeros(M, K), p, masks, tau)
    assert abs(uniform.item() - 2 * math.log(K) / G) < 1e-5


def test_ibot_loss_without_any_mask_is_zero():
    masks = torch.zeros(2, 4, dtype=torch.bool)
    assert ibot_loss(torch.zeros(0, 8), torch.zeros(0, 8), masks).item() == 0.0


def ref_koleo(x: torch.Tensor) -> float:
    x = x.double()
    total = 0.0
    B = x.shape[0]
    xn = [row / max(row.norm().item(), 1e-8) for row in x]
    for i in range(B):
        best, best_j = -math.inf, -1
        for j in range(B):
            if j != i:
                sim = float(xn[i] @ xn[j])
                if sim > best:
                    best, best_j = sim, j
        d = (xn[i] - xn[best_j] + 1e-8).norm().item()
        total += -math.log(d + 1e-8)
    return total / B


def test_koleo_matches_reference():
    x = torch.randn(7, 12, generator=torch.Generator().manual_seed(4))
    assert abs(koleo_loss(x).item() - ref_koleo(x)) < 1e-5
    assert abs(KoLeoLoss()(x).item() - ref_koleo(x)) < 1e-5


def test_koleo_duplicate_row_is_finite_in_fp32():
    D = 384
    x = torch.randn(4, D, generator=torch.Generator().manual_seed(5))
    x[1] = x[0]
    value = koleo_loss(x)
    assert value.dtype == torch.float32 and torch.isfinite(value)
    # The duplicate pair contributes −log(1e-8·√D + 1e-8) ≈ 15.4 each.
    dup = -math.log(1e-8 * math.sqrt(D) + 1e-8)
    assert abs(dup - 15.4) < 0.05
    xn = torch.nn.functional.normalize(x.double(), dim=1)
    others = []
    for i in (2, 3):
        sims = xn @ xn[i]
        sims[i] = -2
        j = int(sims.argmax())
        others.append(-math.log((xn[i] - xn[j] + 1e-8).norm().item() + 1e-8))
    expected = (2 * dup + sum(others)) / 4
    assert abs(value.item() - expected) < 1e-4
    # Half-precision input under autocast: still computed in fp32, still finite.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = koleo_loss(x.bfloat16())
    assert half.dtype == torch.float32 and torch.isfinite(half)


def test_softmax_center_and_center_update_value():
    gen = torch.Generator().manual_seed(6)
    t = torch.randn(6, 10, generator=gen)
    c = torch.randn(1, 10, generator=gen)
    p = softmax_center(t, c, 0.04)
    ref = torch.exp((t - c) / 0.04)
    ref = ref / ref.sum(dim=1, keepdim=True)
    assert torch.allclose(p, ref, atol=TOL)
    center = torch.zeros(1, 10)
    update_center(center, t, momentum=0.9)
    assert torch.allclose(center, 0.1 * t.mean(dim=0, keepdim=True), atol=TOL)  # c = 0.1·mean(t)
    before = center.clone()
    update_center(center, t[:3], momentum=0.9)
    assert torch.allclose(center, 0.9 * before + 0.1 * t[:3].mean(dim=0, keepdim=True), atol=TOL)
    update_center(center, t[:0], momentum=0.9)  # no rows anywhere: unchanged
    assert torch.allclose(center, 0.9 * before + 0.1 * t[:3].mean(dim=0, keepdim=True), atol=TOL)
    targets = TeacherTargets(10, "centering", 0.9)
    assert torch.allclose(targets(t, 0.04), softmax_center(t, torch.zeros(1, 10), 0.04))
    targets.update(t)
    assert torch.allclose(targets.center, 0.1 * t.mean(dim=0, keepdim=True), atol=TOL)


def ref_sinkhorn(t: torch.Tensor, temp: float, n_iter: int = 3) -> torch.Tensor:
    t = t.double()
    q = torch.exp((t - t.max()) / temp).t()  # K × R
    K, R = q.shape
    q = q / q.sum()
    for _ in range(n_iter):
        q = q / q.sum(dim=1, keepdim=True) / K
        q = q / q.sum(dim=0, keepdim=True) / R
    return (q * R).t()


def test_sinkhorn_rows_sum_to_one_and_prototypes_balanced():
    gen = torch.Generator().manual_seed(7)
    R, K = 48, 16
    t = torch.randn(R, K, generator=gen)
    p = sinkhorn_knopp(t, 0.07, 3)
    assert p.shape == (R, K) and p.dtype == torch.float32
    assert torch.allclose(p.sum(dim=1), torch.ones(R), atol=1e-5)
    # Each prototype receives ≈ R/K mass (3 iterations only approach it on sharp logits; the
    # iteration converges: within 5 % after 200).
    converged = sinkhorn_knopp(t, 0.07, 200).sum(dim=0)
    assert torch.allclose(converged, torch.full((K,), R / K), rtol=0.05)
    assert torch.allclose(p.double(), ref_sinkhorn(t, 0.07), atol=TOL)
    # Large logits do not overflow (max subtraction).
    big = sinkhorn_knopp(t * 50, 0.04, 3)
    assert torch.isfinite(big).all()
    assert sinkhorn_knopp(t[:0], 0.07).shape == (0, K)
    targets = TeacherTargets(K, "sinkhorn_knopp")
    assert torch.allclose(targets(t, 0.07), p)
    targets.update(t)  # no center in this mode
    assert targets.center.abs().sum() == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sinkhorn_worker(rank: int, world: int, port: int, t: torch.Tensor, out: dict) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        rows = t.chunk(world)[rank]
        p = sinkhorn_knopp(rows, 0.07, 3)
        center = torch.zeros(1, t.shape[1])
        update_center(center, rows, 0.9)
        out[rank] = (p, center)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_sinkhorn_and_center_two_ranks_equal_single_process(monkeypatch):
    t = torch.randn(12, 8, generator=torch.Generator().manual_seed(8))
    manager = mp.Manager()
    out = manager.dict()
    # monkeypatch, not os.environ: a leaked OMP_NUM_THREADS=1 makes `nproc` say 1 for the rest of the
    # session (the local SLURM cluster of tests/test_slurm_real.py was then built with one CPU)
    if "OMP_NUM_THREADS" not in os.environ:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
    mp.spawn(_sinkhorn_worker, args=(2, _free_port(), t, out), nprocs=2, join=True)
    single = sinkhorn_knopp(t, 0.07, 3)
    assert torch.allclose(torch.cat([out[0][0], out[1][0]]), single, atol=1e-6)
    for r in (0, 1):
        assert torch.allclose(out[r][1], 0.1 * t.mean(dim=0, keepdim=True), atol=1e-6)


def test_sinkhorn_with_initialised_single_rank_group(tmp_path):
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group already exists")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        t = torch.randn(10, 6, generator=torch.Generator().manual_seed(9))
        p = sinkhorn_knopp(t, 0.05)
        assert torch.allclose(p.sum(dim=1), torch.ones(10), atol=1e-5)
    finally:
        dist.destroy_process_group()
