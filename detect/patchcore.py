"""PatchCore (Roth et al., CVPR 2022) on ModMap's tokens: the memory-bank baseline of the paper's Table 1.

Nominal tokens of the training instance(s) form a memory bank; a test token's anomaly score is its
distance to the nearest bank token. As in SiM3D and the ModMap paper, each view is scored on its own
and the maps enter the same 3D projection, voxel aggregation and metrics as ModMap's.

Choices (``PatchCoreSettings``):

* ``features``: ``image`` (the paper's PatchCore rows use image features), ``depth``, or ``both``
  (each modality's tokens L2-normalised, then concatenated, so neither dominates by scale);
* ``bank``: ``view`` — one bank per view index, from that view of the training instances (the views of
  a class are calibrated poses, so view v of a test instance sees what view v of the training
  instances saw); ``class`` — one bank of all views (pose-free, slower);
* ``bank_tokens``: ``object`` — only the training tokens whose patch is ≥ 50 % valid depth; ``all`` —
  every token of the training views, background and silhouette-straddling tokens included, as PatchCore
  banks every patch of its nominal images. Test tokens along silhouettes and depth holes are scored (the
  bilinear upsampling carries them onto foreground pixels); with an ``object`` bank their mixed
  object/background features have no counterpart, so they score as anomalous on every instance
  (issue 23: 40 of 48 instance maxima within 3 px of invalid depth, see docs/results/demo_detection.md);
* ``metric``: ``l2`` (PatchCore's) or ``cosine`` (1 − cos);
* ``coreset_ratio`` < 1: greedy k-center coreset on a seeded random projection (PatchCore §3.3),
  which bounds the bank's size and the scoring time at a small cost in accuracy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from detect.infer import InferenceSettings, ViewScorer

PatchCoreFeatures = Literal["image", "depth", "both"]


@dataclass
class PatchCoreSettings:
    features: PatchCoreFeatures = "image"
    bank: Literal["view", "class"] = "view"
    bank_tokens: Literal["object", "all"] = "object"
    metric: Literal["l2", "cosine"] = "l2"
    coreset_ratio: float = 1.0
    coreset_projection_dim: int = 128
    seed: int = 0
    chunk: int = 4096  # query tokens per distance block (memory: chunk × bank floats)

    def __post_init__(self) -> None:
        if self.features not in ("image", "depth", "both"):
            raise ValueError(f"patchcore features must be image, depth or both, got {self.features!r}")
        if self.bank not in ("view", "class"):
            raise ValueError(f"patchcore bank must be 'view' or 'class', got {self.bank!r}")
        if self.bank_tokens not in ("object", "all"):
            raise ValueError(f"patchcore bank_tokens must be 'object' or 'all', got {self.bank_tokens!r}")
        if self.metric not in ("l2", "cosine"):
            raise ValueError(f"patchcore metric must be 'l2' or 'cosine', got {self.metric!r}")
        if not 0.0 < self.coreset_ratio <= 1.0:
            raise ValueError(f"patchcore coreset_ratio must be in (0, 1], got {self.coreset_ratio}")


def patch_features(image_tokens: torch.Tensor | None, depth_tokens: torch.Tensor | None,
                   which: PatchCoreFeatures) -> torch.Tensor:
    """The tokens PatchCore compares, (..., D): one modality, or both L2-normalised and concatenated."""
    if which == "image":
        if image_tokens is None:
            raise ValueError("patchcore features 'image' need image tokens")
        return image_tokens.float()
    if which == "depth":
        if depth_tokens is None:
            raise ValueError("patchcore features 'depth' need depth tokens")
        return depth_tokens.float()
    if image_tokens is None or depth_tokens is None:
        raise ValueError("patchcore features 'both' need image and depth tokens")
    return torch.cat([F.normalize(image_tokens.float(), dim=-1), F.normalize(depth_tokens.float(), dim=-1)], dim=-1)


def greedy_coreset(features: torch.Tensor, ratio: float, projection_dim: int = 128, seed: int = 0) -> torch.Tensor:
    """Indices of a greedy k-center coreset of ``ceil(ratio·N)`` rows (PatchCore §3.3).

    Distances are taken in a seeded Johnson–Lindenstrauss projection to ``projection_dim`` dimensions;
    the first centre is row 0, each next one the row farthest from all chosen centres.
    """
    n = features.shape[0]
    k = max(1, int(torch.ceil(torch.tensor(ratio * n)).item()))
    if k >= n:
        return torch.arange(n)
    x = features.float()
    if projection_dim and x.shape[1] > projection_dim:
        gen = torch.Generator().manual_seed(seed)
        proj = torch.randn(x.shape[1], projection_dim, generator=gen) / projection_dim ** 0.5
        x = x @ proj.to(x.device)
    chosen = torch.empty(k, dtype=torch.long)
    chosen[0] = 0
    min_dist = torch.linalg.vector_norm(x - x[0], dim=1)
    for i in range(1, k):
        nxt = int(torch.argmax(min_dist))
        chosen[i] = nxt
        min_dist = torch.minimum(min_dist, torch.linalg.vector_norm(x - x[nxt], dim=1))
    return chosen


def nearest_distances(query: torch.Tensor, bank: torch.Tensor, metric: Literal["l2", "cosine"] = "l2",
                      chunk: int = 4096) -> torch.Tensor:
    """Distance of each query row (M, D) to its nearest bank row (N, D), computed in blocks → (M,)."""
    if bank.shape[0] == 0:
        raise ValueError("the PatchCore memory bank is empty (no valid training tokens)")
    if query.shape[-1] != bank.shape[-1]:
        raise ValueError(f"query tokens have {query.shape[-1]} dimensions, the memory bank {bank.shape[-1]}")
    bank = bank.float()
    if metric == "cosine":
        bank = F.normalize(bank, dim=1)
    else:
        bank_sq = (bank * bank).sum(1)
    out = torch.empty(query.shape[0], dtype=torch.float32, device=query.device)
    for start in range(0, query.shape[0], chunk):
        q = query[start:start + chunk].float()
        if metric == "cosine":
            out[start:start + chunk] = 1.0 - (F.normalize(q, dim=1) @ bank.T).amax(1)
        else:
            d2 = (q * q).sum(1, keepdim=True) + bank_sq[None] - 2.0 * (q @ bank.T)
            out[start:start + chunk] = d2.amin(1).clamp_min(0.0).sqrt()
    return out


def leave_one_view_out_scale(image: torch.Tensor | None, depth: torch.Tensor | None, valid: torch.Tensor,
                             settings: PatchCoreSettings, quantile: float = 0.99) -> float:
    """The ``quantile`` of nominal scores, from the training instance alone: each view's object tokens scored
    against a bank of the other views' tokens (as ``settings`` banks them). A scale for other scores that
    must weigh against PatchCore's (detect/geometry.py); with per-view banks it overestimates the nominal
    scores of a test view (its own view index is never banked here)."""
    feats = patch_features(image, depth, settings.features)
    n = feats.shape[0]
    if n < 2:
        raise ValueError("a leave-one-view-out scale needs at least 2 training views")
    scores = []
    for v in range(n):
        others = [j for j in range(n) if j != v]
        bank = feats[others].reshape(-1, feats.shape[-1])
        if settings.bank_tokens == "object":
            bank = bank[valid[others].reshape(-1)]
        scores.append(nearest_distances(feats[v][valid[v]], bank, settings.metric, settings.chunk))
    scores = torch.cat(scores)
    if scores.numel() == 0:
        raise ValueError("no valid training tokens for a leave-one-view-out scale")
    return float(torch.quantile(scores.float(), quantile))


class PatchCoreBank:
    """Memory banks keyed by view index (``bank="view"``) or one shared bank (``bank="class"``)."""

    def __init__(self, settings: PatchCoreSettings) -> None:
        self.settings = settings
        self._parts: dict[int, list[torch.Tensor]] = {}
        self.banks: dict[int, torch.Tensor] = {}

    def _key(self, view: int) -> int:
        return view if self.settings.bank == "view" else -1

    def add(self, view: int, tokens: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Add one training view's tokens (T, D); ``valid`` (T,) bool keeps only object tokens."""
        if valid is not None:
            tokens = tokens[valid.reshape(-1).to(tokens.device)]
        self._parts.setdefault(self._key(view), []).append(tokens.detach().float().cpu())

    def build(self) -> PatchCoreBank:
        """Concatenate the added tokens per bank and reduce each to its coreset."""
        s = self.settings
        for key, parts in self._parts.items():
            bank = torch.cat(parts)
            if s.coreset_ratio < 1.0 and bank.shape[0] > 1:
                bank = bank[greedy_coreset(bank, s.coreset_ratio, s.coreset_projection_dim, s.seed + max(key, 0))]
            self.banks[key] = bank
        self._parts.clear()
        return self

    def score(self, view: int, tokens: torch.Tensor) -> torch.Tensor:
        """Anomaly score (T,) of a test view's tokens: distance to the nearest bank token."""
        key = self._key(view)
        if key not in self.banks:
            raise KeyError(f"no PatchCore memory bank for view {view} (banks: {sorted(self.banks)})")
        return nearest_distances(tokens, self.banks[key].to(tokens.device), self.settings.metric, self.settings.chunk)

    def size(self) -> int:
        return sum(int(b.shape[0]) for b in self.banks.values())

    def state(self) -> dict:
        """The banks and settings as plain tensors and containers (for ``torch.load(weights_only=True)``)."""
        return {"settings": asdict(self.settings), "banks": {str(k): b.contiguous() for k, b in self.banks.items()}}

    @classmethod
    def from_state(cls, state: dict) -> PatchCoreBank:
        """Inverse of :meth:`state` (KeyError/TypeError/ValueError on a malformed record)."""
        bank = cls(PatchCoreSettings(**state["settings"]))
        bank.banks = {int(k): v.float() for k, v in state["banks"].items()}
        if not bank.banks:
            raise ValueError("no memory banks")
        return bank


def build_bank(image: torch.Tensor | None, depth: torch.Tensor | None, valid: torch.Tensor | None,
               settings: PatchCoreSettings,
               copies: Sequence[tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]] = ()
               ) -> PatchCoreBank:
    """Memory banks of one training instance's N views: ``image`` (N, T, c_I), ``depth`` (N, T, c_D),
    ``valid`` (N, T) bool (tokens on the object; None or ``settings.bank_tokens == "all"``: every token).
    ``copies``: more (image, depth, valid) of the same N views (e.g. shifted copies), banked under the
    same view indices."""
    bank = PatchCoreBank(settings)
    for img, dep, val in ((image, depth, valid), *copies):
        if settings.bank_tokens == "all":
            val = None
        feats = patch_features(img, dep, settings.features)
        for v in range(feats.shape[0]):
            bank.add(v, feats[v], None if val is None else val[v])
    return bank.build()


class PatchCoreScorer(ViewScorer):
    """PatchCore in ModMap's one map loop: a target view's token map is each token's distance to the
    nearest token of its memory bank (no mapping networks, no source views); upsampling, foreground
    mask and back-projection stay those of :class:`detect.infer.ViewScorer`. The one distance map fills
    both directions, so every aggregation Ξ returns it unchanged except ``prod`` (its square, same order)."""

    def __init__(self, settings: InferenceSettings, bank: PatchCoreBank) -> None:
        super().__init__(settings)
        self.bank = bank

    def sources(self, model, n_views: int) -> list[list[int]]:
        return [[t] for t in range(n_views)]

    def token_maps(self, model, image: torch.Tensor, depth: torch.Tensor, target: int, sources: Sequence[int],
                   class_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        feats = patch_features(image[target], depth[target], self.bank.settings.features)
        dist = self.bank.score(target, feats)
        return dist, dist


__all__ = ["PatchCoreBank", "PatchCoreScorer", "PatchCoreSettings", "build_bank", "greedy_coreset",
           "leave_one_view_out_scale", "nearest_distances", "patch_features"]
