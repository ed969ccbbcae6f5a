"""DINO-Depth objective: DINO class-token loss, iBOT masked-patch loss, KoLeo, teacher targets.

``../shared/spec/dino_depth.md`` §5. Notation: τ_s student temperature, τ_t teacher temperature,
K prototypes, P teacher probabilities, s raw student head logits, and

    CE(P, s) = −(1/R) Σ_r Σ_k P_rk · log softmax(s_r / τ_s)_k      (mean over the R rows).

Every function computes in fp32 (inputs are cast), so bf16 head outputs are safe. Every collective
goes through :func:`shared.distributed.all_reduce`, the identity without a multi-rank process group
(upstream's iBOT Sinkhorn calls ``all_reduce`` unguarded and crashes in a single process).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shared.distributed import all_reduce

__all__ = [
    "DINOLoss",
    "KoLeoLoss",
    "TeacherTargets",
    "cross_entropy",
    "dino_loss",
    "dino_loss_terms",
    "iBOTPatchLoss",
    "ibot_loss",
    "koleo_loss",
    "sinkhorn_knopp",
    "softmax_center",
    "update_center",
    "center_statistics",
    "apply_center_statistics",
]


def cross_entropy(teacher_probs: Tensor, student_logits: Tensor, student_temp: float = 0.1) -> Tensor:
    """Per-row CE: −Σ_k P_k · log softmax(s / τ_s)_k, shape (R,)."""
    log_p = F.log_softmax(student_logits.float() / student_temp, dim=-1)
    return -(teacher_probs.float() * log_p).sum(dim=-1)


# -- DINO (class tokens) ------------------------------------------------------------------------------
def dino_loss_terms(student_logits: Sequence[Tensor], teacher_probs: Sequence[Tensor],
                    student_temp: float = 0.1) -> tuple[Tensor, Tensor]:
    """The DINO loss split into its (local-crop, cross-global) parts; their sum is :func:`dino_loss`.

    With n_g global and n_l local crops there are n_g·(n_g + n_l) − n_g pairs (a global crop is never
    paired with its own teacher view): 18 for 2 + 8. Both parts are divided by the total pair count,
    so ``local + global`` is the pair mean (logged as ``dino_local`` / ``dino_global``).
    """
    n_global = len(teacher_probs)
    if n_global < 1 or len(student_logits) < n_global:
        raise ValueError(f"need ≥1 teacher view and ≥{n_global} student crops (globals first), "
                         f"got {len(teacher_probs)} and {len(student_logits)}")
    n_pairs = n_global * len(student_logits) - n_global
    if n_pairs == 0:
        raise ValueError("a single global crop and no local crops leave no DINO pair")
    zero = student_logits[0].new_zeros((), dtype=torch.float32)
    local_sum, global_sum = zero, zero
    for i, s in enumerate(student_logits):
        log_p = F.log_softmax(s.float() / student_temp, dim=-1)
        for a, p in enumerate(teacher_probs):
            if i == a:  # same view: no pair
                continue
            ce = -(p.float() * log_p).sum(dim=-1).mean()
            if i < n_global:
                global_sum = global_sum + ce
            else:
                local_sum = local_sum + ce
    return local_sum / n_pairs, global_sum / n_pairs


def dino_loss(student_logits: Sequence[Tensor], teacher_probs: Sequence[Tensor], student_temp: float = 0.1) -> Tensor:
    """Mean CE over all (student crop, teacher view) pairs except a global crop with itself.

    ``student_logits``: one (B, K) tensor per crop, globals first; ``teacher_probs``: one (B, K)
    tensor per global crop (same order). For 2 globals g₁, g₂ and 8 locals l₁..l₈:

        L = (1/18) [ Σ_j Σ_a CE(P_a, s(l_j)) + CE(P_2, s(g_1)) + CE(P_1, s(g_2)) ]
    """
    local, cross_global = dino_loss_terms(student_logits, teacher_probs, student_temp)
    return local + cross_global


class DINOLoss(nn.Module):
    """Module form of :func:`dino_loss_terms`; returns ``(dino_local, dino_global)``."""

    def __init__(self, student_temp: float = 0.1) -> None:
        super().__init__()
        self.student_temp = student_temp

    def forward(self, student_logits: Sequence[Tensor], teacher_probs: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        return dino_loss_terms(student_logits, teacher_probs, self.student_temp)


# -- iBOT (masked patch tokens) -----------------------------------------------------------------------
def masked_token_weights(masks: Tensor) -> Tensor:
    """w_j = 1/|M_c(j)| for every masked token, in ``masks.flatten().nonzero()`` order, shape (M,)."""
    masks = masks.bool()
    counts = masks.sum(dim=1).clamp_min(1).float()  # (G,)
    crop_of_token = masks.flatten().nonzero().squeeze(1) // masks.shape[1]
    return 1.0 / counts[crop_of_token]


def ibot_loss(student_patch_logits: Tensor, teacher_patch_probs: Tensor, masks: Tensor,
              student_temp: float = 0.1, token_weights: Tensor | None = None) -> Tensor:
    """Mean over the G global crops of each crop's mean masked-token CE (unmasked crops add 0).

        L_iBOT = (1/G) · Σ_c (1/|M_c|) Σ_{j ∈ M_c} CE(P_j, s_j)

    ``student_patch_logits`` / ``teacher_patch_probs``: (M, K), one row per masked token, ordered as
    ``masks.flatten().nonzero()``; ``masks``: (G, N) bool. ``token_weights`` (the collated w_j) can be
    passed to avoid recomputing them.
    """
    if masks.ndim != 2:
        raise ValueError(f"masks must be (G, N), got shape {tuple(masks.shape)}")
    # With the collated weights the row count is known on the host (their length): no device read.
    n_masked = int(masks.sum()) if token_weights is None else token_weights.shape[0]
    if student_patch_logits.shape[0] != n_masked or teacher_patch_probs.shape[0] != n_masked:
        raise ValueError(f"{n_masked} masked tokens but {student_patch_logits.shape[0]} student / "
                         f"{teacher_patch_probs.shape[0]} teacher rows")
    if token_weights is None:
        token_weights = masked_token_weights(masks)
    ce = cross_entropy(teacher_patch_probs, student_patch_logits, student_temp)  # (M,)
    return (ce * token_weights.to(ce.dtype)).sum() / masks.shape[0]


class iBOTPatchLoss(nn.Module):
    """Module form of :func:`ibot_loss`."""

    def __init__(self, student_temp: float = 0.1) -> None:
        super().__init__()
        self.student_temp = student_temp

    def forward(self, student_patch_logits: Tensor, teacher_patch_probs: Tensor, masks: Tensor,
                token_weights: Tensor | None = None) -> Tensor:
        return ibot_loss(student_patch_logits, teacher_patch_probs, masks, self.student_temp, token_weights)


# -- KoLeo ------------------------------------------------------------------------------------------
def koleo_loss(x: Tensor, eps: float = 1e-8) -> Tensor:
    """Kozachenko-Leonenko entropy term on L2-normalised rows (fp32, autocast disabled).

        x̂ = x / max(‖x‖, eps);  nn(i) = argmax_{j≠i} x̂_i·x̂_j;
        KoLeo(x) = −(1/B) Σ_i log(‖x̂_i − x̂_nn(i) + eps·𝟙‖₂ + eps)

    In half precision eps underflows and a duplicate row gives −log 0 = inf (upstream's
    "koleo_loss: inf"); in fp32 a duplicate gives ≈ −log(eps·(√D + 1)) (≈ 15.4 for D = 384).
    """
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"KoLeo needs a (B ≥ 2, D) batch, got shape {tuple(x.shape)}")
    with torch.autocast(device_type=x.device.type, enabled=False):
        x = x.float()
        x = x / x.norm(dim=-1, keepdim=True).clamp_min(eps)
        with torch.no_grad():
            sim = x @ x.t()
            sim.fill_diagonal_(-float("inf"))  # j ≠ i
            nearest = sim.argmax(dim=1)
        distance = (x - x[nearest] + eps).norm(dim=-1)
        return -torch.log(distance + eps).mean()


class KoLeoLoss(nn.Module):
    """Module form of :func:`koleo_loss`."""

    def forward(self, x: Tensor) -> Tensor:
        return koleo_loss(x)


# -- teacher targets ----------------------------------------------------------------------------------
def softmax_center(teacher_logits: Tensor, center: Tensor, teacher_temp: float) -> Tensor:
    """P = softmax((t − c) / τ_t) over the K prototypes, in fp32."""
    return F.softmax((teacher_logits.float() - center.float()) / teacher_temp, dim=-1)


@torch.no_grad()
def center_statistics(teacher_logits: Tensor) -> Tensor:
    """(K + 1,) fp32: the row sum of ``teacher_logits`` and the row count — what the center update
    needs, so the logits can be freed right after the targets are made; sum-reducible over ranks."""
    t = teacher_logits.detach().float()
    return torch.cat([t.sum(dim=0), t.new_full((1,), float(t.shape[0]))])


@torch.no_grad()
def apply_center_statistics(center: Tensor, stats: Tensor, momentum: float, apply: Tensor | None = None) -> Tensor:
    """In place: c ← m·c + (1 − m)·sum/count from (all-reduced) :func:`center_statistics`; unchanged when
    the count is 0 or ``apply`` (a device bool) is False. Decided on the device: no host sync."""
    count = stats[-1]
    mean = (stats[:-1] / count.clamp_min(1)).reshape(center.shape).to(center.dtype)
    keep = count > 0 if apply is None else (count > 0) & apply
    center.copy_(torch.where(keep, center.mul(momentum).add_(mean, alpha=1.0 - momentum), center))
    return center


@torch.no_grad()
def update_center(center: Tensor, teacher_logits: Tensor, momentum: float = 0.9) -> Tensor:
    """In place: c ← m·c + (1 − m)·mean(t), the mean taken over the rows of **all** ranks.

    Sum and row count are both all-reduced, so the result does not depend on how rows are spread
    over ranks. With no rows anywhere (e.g. no masked token in the global batch) c is unchanged.
    """
    return apply_center_statistics(center, all_reduce(center_statistics(teacher_logits), op="sum"), momentum)


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: Tensor, teacher_temp: float, n_iterations: int = 3) -> Tensor:
    """Sinkhorn-Knopp teacher targets (R, K) whose rows sum to 1 and whose prototypes get ≈ R_tot/K mass.

    Q = exp(t/τ_t)ᵀ (K × R, fp32); Q ← Q / ΣQ (global); ``n_iterations`` × { Q ← Q / rowsum(Q)
    (prototypes, all-reduced) / K; Q ← Q / colsum(Q) (samples, local) / R_tot }; P = (Q · R_tot)ᵀ.
    R_tot = global row count. Works with and without a process group (every reduction is guarded).

    Computed in the log domain (log Q, normalisations by logsumexp): the same maths as the
    exponentiated form with the global-max shift of the spec, but a prototype whose logits all lie
    more than ~100·τ_t below the maximum no longer underflows to a zero row (0/0 = NaN) — possible
    once the trainable prototype norms g grow above ~2 at τ_t = 0.04. The global normalisation
    Q / ΣQ is a constant factor that the first row normalisation removes exactly; it is skipped.
    """
    t = teacher_logits.detach().float()
    n_prototypes = t.shape[-1]
    n_rows = all_reduce(t.new_tensor([t.shape[0]]), op="sum")
    if n_rows.item() == 0:
        return t.new_zeros(t.shape)
    log_q = (t / teacher_temp).t()  # (K, R)
    log_k, log_r = math.log(n_prototypes), math.log(n_rows.item())
    for _ in range(n_iterations):
        log_q = log_q - (_global_logsumexp_rows(log_q) + log_k)  # prototypes: sum over all ranks' samples
        log_q = log_q - (torch.logsumexp(log_q, dim=0, keepdim=True) + log_r)  # samples: local
    return torch.exp(log_q + log_r).t()


def _global_logsumexp_rows(log_q: Tensor) -> Tensor:
    """log Σ_r exp(log_q[k, r]) over the samples of every rank, shape (K, 1)."""
    if log_q.shape[1]:
        row_max = log_q.max(dim=1, keepdim=True).values
    else:
        row_max = log_q.new_full((log_q.shape[0], 1), -float("inf"))
    row_max = all_reduce(row_max, op="max")
    shifted = torch.exp(log_q - row_max).sum(dim=1, keepdim=True)
    return row_max + torch.log(all_reduce(shifted, op="sum"))


class TeacherTargets(nn.Module):
    """Teacher probabilities by softmax-centering (default, center buffer) or Sinkhorn-Knopp.

    ``forward(teacher_logits, teacher_temp)`` returns P (R, K); ``update(teacher_logits)`` applies the
    momentum update of the center (call it after the targets of the iteration were computed: it
    takes effect from the next iteration). The center (1, K) is a buffer, hence in checkpoints.
    """

    def __init__(self, n_prototypes: int, mode: str = "centering", center_momentum: float = 0.9,
                 sinkhorn_iterations: int = 3) -> None:
        super().__init__()
        if mode not in ("centering", "sinkhorn_knopp"):
            raise ValueError(f"unknown centering mode {mode!r}; expected 'centering' or 'sinkhorn_knopp'")
        self.mode = mode
        self.center_momentum = center_momentum
        self.sinkhorn_iterations = sinkhorn_iterations
        self.register_buffer("center", torch.zeros(1, n_prototypes))

    def forward(self, teacher_logits: Tensor, teacher_temp: float) -> Tensor:
        if self.mode == "centering":
            return softmax_center(teacher_logits, self.center, teacher_temp)
        return sinkhorn_knopp(teacher_logits, teacher_temp, self.sinkhorn_iterations)

    @torch.no_grad()
    def update(self, teacher_logits: Tensor) -> None:
        if self.mode == "centering":
            update_center(self.center, teacher_logits, self.center_momentum)
