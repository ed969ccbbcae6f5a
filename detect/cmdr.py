"""CMDR-IAD-style scoring for the ModMap detector (``../shared/spec/modmap.md`` §20–§21).

CMDR-IAD = CFM + one **reconstruction decoder per modality** (image features and depth features each
reconstructed from themselves, trained on nominal data) + a two-part fusion. Here it is an option of the
same detector (``--scoring cmdr``): the mapping distances come from ModMap's networks (with one view
they are CFM's), the decoders are trained on the same cached tokens, and the fusion runs per view
before the maps are undone to the original pixels (single view) or back-projected (multiview).

Per view, on the token grid (h × w), with d(a, b) = √(2 − 2 cos(a, b)) and 0 on background tokens:

* mapping distances: d2D_map = √(2 Ψ_I), d3D_map = √(2 Ψ_D) (Ψ = ModMap's min-ensembled 1 − cos; with
  one view the plain CFM distances);
* reconstruction distances: d2D_rec = d(D_2D(F_I), F_I), d3D_rec = d(D_3D(F_D), F_D); d2D_rec is
  pre-smoothed (CMDR's code smooths only this one);
* reliability-gated mapping anomaly: d_joint = d2D_map ⊙ d3D_map, μ = mean(d_joint),
  σ_local = √(box_k[(d_joint − μ)²]) (k × k mean, stride 1, zero padding counted, as ``AvgPool2d``),
  W = 4 + 2 σ_local / (mean(σ_local) + 1e-8), **A_map = sigmoid(W ⊙ d_joint) ⊙ d_joint**;
* confidence-weighted reconstruction anomaly: w_m = exp(−0.3 d_m,rec),
  **A_rec = (w_2D d2D_rec + w_3D d3D_rec) / (w_2D + w_3D + 1e-8)**;
* **Ψ = A_map ⊙ A_rec**, then bilinear upsampling to the input size, 0 outside the foreground, and
  CFM's smoothing (a Gaussian; §20).

Resolution independence: the decoders are convolutional on the token grid (1×1 → k×k → k×k → 1×1
with a channel bottleneck: local spatial mixing, no layer tied to the number of tokens — the
reference's 81 M-parameter Linear over the 50,176 tokens of a 224² input is what we avoid), the fusion
window is given in tokens, and both smoothing widths are fractions of the image side (CMDR's values at
224 px: pre-smoothing 5×5 ×3 + 7×7 ×2 box filters, variance 14 px²; final 5×5 ×5 + 7×7 ×3, variance
22 px²), so a model trained at one input size runs at another.

Modality-flexible modes (``modality``): ``image`` = d2D_rec alone, ``depth`` = d3D_rec alone (A_map
needs both modalities); only the available modality's encoder, decoder and files are used.
Missing-depth robustness (``missing_depth="image_fallback"``): the foreground is the depth foreground
with its holes filled, and on foreground tokens without valid depth (< 50 % valid pixels) every
depth-dependent distance (d2D_map, d3D_map, d3D_rec) is replaced by the image reconstruction distance
d2D_rec before the fusion — the fused score there is what it would be if every branch agreed with the
image branch, on the same scale as elsewhere (our design; CMDR-IAD leaves such pixels at 0).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from detect.infer import ViewScorer
from detect.model import cosine_similarity
from detect.preprocess import gaussian_blur, upsample_tokens

Scoring = Literal["modmap", "cfm", "cmdr"]
Modality = Literal["both", "image", "depth"]
MissingDepth = Literal["ignore", "image_fallback"]
SCORINGS: tuple[str, ...] = ("modmap", "cfm", "cmdr")
MODALITY_MODES: tuple[str, ...] = ("both", "image", "depth")
MISSING_DEPTH_MODES: tuple[str, ...] = ("ignore", "image_fallback")

GATE_BASE = 4.0  # W = GATE_BASE + GATE_SCALE · σ_local / mean(σ_local)
GATE_SCALE = 2.0
REC_CONFIDENCE = 0.3  # w = exp(−0.3 d)
FUSION_EPS = 1e-8
# CMDR's box-filter cascades at 224 px expressed as Gaussian σ / image side (variance of k×k box = (k²−1)/12).
PRE_SIGMA_FRAC = math.sqrt(3 * 2.0 + 2 * 4.0) / 224.0  # d2D_rec: 5×5 ×3, 7×7 ×2 → σ ≈ 3.74 px at 224
POST_SIGMA_FRAC = math.sqrt(5 * 2.0 + 3 * 4.0) / 224.0  # Ψ: 5×5 ×5, 7×7 ×3 → σ ≈ 4.69 px at 224


# -- distances and fusion (pure functions, hand-checkable) ---------------------------------------
def cfm_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-token ‖a/‖a‖ − b/‖b‖‖ = √(2 − 2 cos(a, b)) over the last axis (CFM / CMDR-IAD distance)."""
    return torch.sqrt(torch.clamp(2.0 - 2.0 * cosine_similarity(a, b), min=0.0))


def psi_to_distance(psi: torch.Tensor) -> torch.Tensor:
    """ModMap's Ψ = 1 − cos → CFM's distance √(2 − 2 cos) = √(2 Ψ)."""
    return torch.sqrt(torch.clamp(2.0 * psi, min=0.0))


def box_mean(x: torch.Tensor, window: int) -> torch.Tensor:
    """k × k mean of (..., H, W) maps, stride 1, zero padding k // 2 counted in the mean
    (``nn.AvgPool2d(k, 1, k // 2)`` with its default ``count_include_pad=True``)."""
    if window < 1 or window % 2 == 0:
        raise ValueError(f"the fusion window must be a positive odd number of tokens, got {window}")
    lead = x.shape[:-2]
    y = F.avg_pool2d(x.reshape(-1, 1, *x.shape[-2:]).float(), window, stride=1, padding=window // 2,
                     count_include_pad=True)
    return y.reshape(*lead, *x.shape[-2:])


def reliability_gated_mapping(d_image_map: torch.Tensor, d_depth_map: torch.Tensor, window: int = 7
                              ) -> torch.Tensor:
    """A_map = sigmoid(W ⊙ d_joint) ⊙ d_joint for (..., H, W) distance maps (module docstring)."""
    d_joint = d_image_map * d_depth_map
    mu = d_joint.mean(dim=(-2, -1), keepdim=True)
    sigma_local = torch.sqrt(torch.clamp(box_mean((d_joint - mu) ** 2, window), min=0.0))
    gate = GATE_BASE + GATE_SCALE * sigma_local / (sigma_local.mean(dim=(-2, -1), keepdim=True) + FUSION_EPS)
    return torch.sigmoid(gate * d_joint) * d_joint


def confidence_weighted_reconstruction(d_image_rec: torch.Tensor | None, d_depth_rec: torch.Tensor | None
                                       ) -> torch.Tensor:
    """A_rec = Σ w_m d_m / (Σ w_m + 1e-8) with w_m = exp(−0.3 d_m); one modality: that distance alone."""
    terms = [d for d in (d_image_rec, d_depth_rec) if d is not None]
    if not terms:
        raise ValueError("at least one reconstruction distance is required")
    if len(terms) == 1:
        return terms[0]
    weights = [torch.exp(-REC_CONFIDENCE * d) for d in terms]
    return sum(w * d for w, d in zip(weights, terms)) / (sum(weights) + FUSION_EPS)


def cmdr_fusion(d_image_map: torch.Tensor, d_depth_map: torch.Tensor, d_image_rec: torch.Tensor,
                d_depth_rec: torch.Tensor, window: int = 7) -> torch.Tensor:
    """Ψ = A_map ⊙ A_rec (distances already 0 on background)."""
    return reliability_gated_mapping(d_image_map, d_depth_map, window) * confidence_weighted_reconstruction(
        d_image_rec, d_depth_rec)


def gaussian_smooth(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian (truncated at 4σ) of (..., H, W) maps with zero padding (as CFM's box filters)."""
    return gaussian_blur(maps.float(), sigma, padding="zeros")


def cfm_normalizations(score_map: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """CFM's three per-image normalisations of a map M (§20): (image score, pixel-AUROC map, AUPRO map).

    image score = max(M / √mean(M[M ≠ 0])); pixel map = M / √mean(M) (all pixels); AUPRO map =
    M / mean(M[M ≠ 0]). An all-zero map stays zero (score 0).
    """
    m = np.asarray(score_map, dtype=np.float64)
    nz = m[m != 0]
    if nz.size == 0:
        return 0.0, m.astype(np.float32), m.astype(np.float32)
    mean_nz = float(nz.mean())
    mean_all = float(m.mean())
    image_score = float((m / math.sqrt(mean_nz)).max()) if mean_nz > 0 else 0.0
    pixel = m / math.sqrt(mean_all) if mean_all > 0 else m
    pro = m / mean_nz if mean_nz > 0 else m
    return image_score, pixel.astype(np.float32), pro.astype(np.float32)


# -- reconstruction decoders ----------------------------------------------------------------------
class ReconstructionDecoder(nn.Module):
    """Reconstructs a feature map from itself through a channel bottleneck with local spatial mixing.

    ``1×1 conv (c → h) → GELU → k×k conv (h → b) → GELU → k×k conv (b → h) → GELU → 1×1 conv (h → c)``
    on the (c, h_tok, w_tok) token grid. Fully convolutional, so it runs on any token grid
    (resolution-independent); the bottleneck keeps it from learning the identity, so features unlike
    the nominal ones reconstruct badly.
    """

    def __init__(self, dim: int, hidden: int, bottleneck: int, kernel: int = 3) -> None:
        super().__init__()
        if min(dim, hidden, bottleneck, kernel) < 1 or kernel % 2 == 0:
            raise ValueError(f"invalid decoder sizes: dim={dim}, hidden={hidden}, bottleneck={bottleneck}, "
                             f"kernel={kernel} (kernel must be odd)")
        self.dim, self.hidden, self.bottleneck, self.kernel = dim, hidden, bottleneck, kernel
        pad = kernel // 2
        self.net = nn.Sequential(
            nn.Conv2d(dim, hidden, 1), nn.GELU(),
            nn.Conv2d(hidden, bottleneck, kernel, padding=pad, padding_mode="replicate"), nn.GELU(),
            nn.Conv2d(bottleneck, hidden, kernel, padding=pad, padding_mode="replicate"), nn.GELU(),
            nn.Conv2d(hidden, dim, 1))

    @classmethod
    def with_ratios(cls, dim: int, hidden_ratio: float = 0.5, bottleneck_ratio: float = 0.25,
                    kernel: int = 3) -> ReconstructionDecoder:
        """Widths as fractions of the feature dimension (h = c·hidden_ratio, b = c·bottleneck_ratio)."""
        return cls(dim, max(1, round(dim * hidden_ratio)), max(1, round(dim * bottleneck_ratio)), kernel)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(B, h·w, c) tokens → reconstructed (B, h·w, c)."""
        if tokens.ndim != 3 or tokens.shape[-1] != self.dim or tokens.shape[1] != grid[0] * grid[1]:
            raise ValueError(f"expected (B, {grid[0]}·{grid[1]}, {self.dim}) tokens, got {tuple(tokens.shape)}")
        B = tokens.shape[0]
        x = tokens.transpose(1, 2).reshape(B, self.dim, grid[0], grid[1])
        return self.net(x).reshape(B, self.dim, -1).transpose(1, 2)

    def config(self) -> dict:
        return {"dim": self.dim, "hidden": self.hidden, "bottleneck": self.bottleneck, "kernel": self.kernel}

    @classmethod
    def from_config(cls, cfg: dict) -> ReconstructionDecoder:
        return cls(*(int(cfg[k]) for k in ("dim", "hidden", "bottleneck", "kernel")))


@dataclass
class DecoderSettings:
    """Training of a reconstruction decoder (CMDR-IAD: Adam with PyTorch defaults, masked 1 − cos)."""

    epochs: int = 50
    batch_size: int = 8
    lr: float = 1e-3
    hidden_ratio: float = 0.5
    bottleneck_ratio: float = 0.25
    kernel: int = 3
    seed: int = 42


def reconstruction_loss(decoder: ReconstructionDecoder, tokens: torch.Tensor, grid: tuple[int, int],
                        mask: torch.Tensor | None = None) -> torch.Tensor:
    """1 − mean cos(D(F), F) over the (masked) tokens of a batch."""
    cos = cosine_similarity(decoder(tokens, grid), tokens)
    if mask is None:
        return 1.0 - cos.mean()
    w = mask.float()
    return 1.0 - (cos * w).sum() / w.sum().clamp_min(1.0)


def fit_decoder(tokens: torch.Tensor, grid: tuple[int, int], settings: DecoderSettings,
                token_mask: torch.Tensor | None = None, log: Callable[[dict], None] | None = None,
                progress: Callable[[int], None] | None = None) -> ReconstructionDecoder:
    """Train one decoder on nominal tokens (M, T, c) (one sample per view/image), reshuffled every epoch
    with a seeded generator; a batch never exceeds M. ``token_mask`` (M, T) restricts the loss."""
    if tokens.ndim != 3 or tokens.shape[1] != grid[0] * grid[1]:
        raise ValueError(f"tokens must be (M, {grid[0] * grid[1]}, c), got {tuple(tokens.shape)}")
    torch.manual_seed(settings.seed)
    dec = ReconstructionDecoder.with_ratios(tokens.shape[-1], settings.hidden_ratio, settings.bottleneck_ratio,
                                            settings.kernel).to(tokens.device)
    dec.train()
    opt = torch.optim.Adam(dec.parameters(), lr=settings.lr)
    n = tokens.shape[0]
    batch = max(1, min(settings.batch_size, n))
    iters = max(1, n // batch)
    gen = torch.Generator().manual_seed(settings.seed)
    for epoch in range(settings.epochs):
        perm = torch.randperm(n, generator=gen).to(tokens.device)
        total = 0.0
        for it in range(iters):
            idx = perm[it * batch:(it + 1) * batch]
            loss = reconstruction_loss(dec, tokens[idx], grid, None if token_mask is None else token_mask[idx])
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite decoder loss at epoch {epoch}, iteration {it}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach())
            if progress is not None:
                progress(1)
        if log is not None:
            log({"epoch": epoch + 1, "loss": total / iters})
    dec.eval()
    return dec


@torch.no_grad()
def reconstruction_distance(decoder: ReconstructionDecoder, tokens: torch.Tensor, grid: tuple[int, int]
                            ) -> torch.Tensor:
    """d_rec = √(2 − 2 cos(D(F), F)) per token, (B, T) for (B, T, c) tokens (or (T,) for (T, c))."""
    single = tokens.ndim == 2
    x = tokens[None] if single else tokens
    d = cfm_distance(decoder(x, grid), x)
    return d[0] if single else d


@dataclass
class Decoders:
    """The reconstruction decoders of one class (either may be absent in single-modality modes)."""

    image: ReconstructionDecoder | None = None
    depth: ReconstructionDecoder | None = None
    meta: dict = field(default_factory=dict)

    def to(self, device: torch.device | str) -> Decoders:
        for d in (self.image, self.depth):
            if d is not None:
                d.to(device)
        return self

    def state(self) -> dict:
        out: dict = {"config": dict(self.meta)}
        for name, dec in (("decoder_image", self.image), ("decoder_depth", self.depth)):
            if dec is not None:
                out[name] = {k: v.detach().cpu() for k, v in dec.state_dict().items()}
                out["config"][f"{name}_arch"] = dec.config()
        return out

    def save(self, path) -> None:
        from shared.checkpoint import save_checkpoint

        save_checkpoint(self.state(), path)

    @classmethod
    def load(cls, path, device: torch.device | str = "cpu") -> Decoders:
        from shared.checkpoint import load_checkpoint

        obj = load_checkpoint(path)
        cfg = obj["config"]
        decs = {}
        for name in ("decoder_image", "decoder_depth"):
            if name in obj:
                dec = ReconstructionDecoder.from_config(cfg[f"{name}_arch"])
                dec.load_state_dict(obj[name])
                decs[name] = dec.eval().to(device)
        return cls(decs.get("decoder_image"), decs.get("decoder_depth"),
                   {k: v for k, v in cfg.items() if not k.endswith("_arch")})


# -- per-view scoring ------------------------------------------------------------------------------
@dataclass
class ScoringSettings:
    """How per-view anomaly maps are scored (``--scoring``, ``--modality``, ``--missing-depth``)."""

    scoring: str = "cmdr"
    modality: str = "both"
    missing_depth: str = "ignore"
    window: int = 7  # tokens
    pre_sigma_frac: float = PRE_SIGMA_FRAC  # smoothing of d2D_rec (fraction of the image side)
    post_sigma_frac: float = POST_SIGMA_FRAC  # smoothing of the final map (fraction of the image side)

    def validate(self) -> None:
        if self.scoring not in SCORINGS:
            raise ValueError(f"scoring must be one of {SCORINGS}, got {self.scoring!r}")
        if self.modality not in MODALITY_MODES:
            raise ValueError(f"modality must be one of {MODALITY_MODES}, got {self.modality!r}")
        if self.missing_depth not in MISSING_DEPTH_MODES:
            raise ValueError(f"missing_depth must be one of {MISSING_DEPTH_MODES}, got {self.missing_depth!r}")
        if self.modality != "both" and self.scoring != "cmdr":
            raise ValueError(f"modality {self.modality!r} needs --scoring cmdr: with one modality only its "
                             "reconstruction branch can score (the mapping needs both)")
        if self.missing_depth != "ignore" and (self.scoring != "cmdr" or self.modality != "both"):
            raise ValueError("missing_depth image_fallback needs --scoring cmdr with both modalities (it falls "
                             "back from the fused score to the image reconstruction branch)")
        if self.window < 1 or self.window % 2 == 0:
            raise ValueError(f"the fusion window must be a positive odd number of tokens, got {self.window}")
        if self.pre_sigma_frac < 0 or self.post_sigma_frac < 0:
            raise ValueError("smoothing widths must be >= 0")

    @property
    def uses_image(self) -> bool:
        return self.modality in ("both", "image")

    @property
    def uses_depth(self) -> bool:
        return self.modality in ("both", "depth")

    @property
    def uses_mapping(self) -> bool:
        return self.modality == "both"

    def to_dict(self) -> dict:
        return asdict(self)


def token_foreground(fg: np.ndarray | torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Per-token flag (h, w): at least half of the token's pixels are foreground."""
    m = torch.as_tensor(np.asarray(fg) if not isinstance(fg, torch.Tensor) else fg).float()
    size = m.shape[-1]
    frac = F.avg_pool2d(m.reshape(1, 1, *m.shape[-2:]), kernel_size=size // grid[0], stride=size // grid[0])
    return (frac >= 0.5).reshape(grid)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return ndimage.binary_fill_holes(np.asarray(mask, bool))


@dataclass
class TokenScores:
    """One view's inputs to the scoring, on the (h, w) token grid (None where a branch is absent)."""

    psi_image: torch.Tensor | None = None  # ModMap Ψ_I = 1 − cos (depth→image mapping error)
    psi_depth: torch.Tensor | None = None  # ModMap Ψ_D = 1 − cos (image→depth mapping error)
    d_image_rec: torch.Tensor | None = None
    d_depth_rec: torch.Tensor | None = None


def score_tokens(ts: TokenScores, settings: ScoringSettings, fg_tokens: torch.Tensor,
                 depth_ok_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """The fused (h, w) token map of one view for ``cfm`` or ``cmdr`` scoring (0 on background tokens).

    ``depth_ok_tokens`` (h, w) bool: tokens with valid depth (only used by ``image_fallback``).
    """
    fg = fg_tokens.float()
    grid_side = fg.shape[-1]
    if settings.scoring == "cfm":  # CFM: product of the two mapping distances
        return psi_to_distance(ts.psi_image) * psi_to_distance(ts.psi_depth) * fg
    if settings.scoring != "cmdr":
        raise ValueError(f"score_tokens handles 'cfm' and 'cmdr', got {settings.scoring!r}")
    d2_rec = ts.d_image_rec
    if d2_rec is not None:  # CMDR's code pre-smooths the image reconstruction distance only
        d2_rec = gaussian_smooth(d2_rec, settings.pre_sigma_frac * grid_side)
    if settings.modality == "image":
        return d2_rec * fg
    if settings.modality == "depth":
        return ts.d_depth_rec * fg
    d2_map, d3_map, d3_rec = psi_to_distance(ts.psi_image), psi_to_distance(ts.psi_depth), ts.d_depth_rec
    if settings.missing_depth == "image_fallback":
        if depth_ok_tokens is None:
            raise ValueError("image_fallback needs the per-token depth validity")
        hole = ~depth_ok_tokens.bool()
        d2_map, d3_map, d3_rec = (torch.where(hole, d2_rec, d) for d in (d2_map, d3_map, d3_rec))
    return cmdr_fusion(d2_map * fg, d3_map * fg, d2_rec * fg, d3_rec * fg, settings.window)


# -- the scorer hook of the one per-view map loop (detect.infer.iter_view_maps) ----------------------
class CMDRScorer(ViewScorer):
    """``cfm``/``cmdr`` scoring of a target view from ModMap's min-ensembled Ψ_I, Ψ_D (both modalities).

    The target's reconstruction distances (``cmdr``), the fusion on the token grid, bilinear upsampling,
    the foreground mask and the final smoothing; ``ViewMaps.combined`` carries the fused map, so
    projection and voxel-max aggregation stay ModMap's.
    """

    def __init__(self, settings, scoring: ScoringSettings, decoders: Decoders | None) -> None:
        if scoring.modality != "both":
            raise ValueError("the mapping-based scoring needs both modalities (single-modality CMDR scores "
                             "with its reconstruction branch alone)")
        super().__init__(settings)
        self.scoring, self.decoders = scoring, decoders

    def foreground(self, depth_input: torch.Tensor) -> np.ndarray:
        fg = super().foreground(depth_input)
        return fill_holes(fg) if self.scoring.missing_depth == "image_fallback" else fg

    def score(self, target: int, psi_d: torch.Tensor, psi_i: torch.Tensor, image: torch.Tensor,
              depth: torch.Tensor, fg: np.ndarray, depth_input: torch.Tensor, grid: tuple[int, int],
              size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        depth_ok = None
        if self.scoring.missing_depth == "image_fallback":
            depth_ok = token_foreground((torch.as_tensor(depth_input).squeeze() != 0).cpu(), grid).to(image.device)
        ts = TokenScores(psi_i.reshape(grid), psi_d.reshape(grid))
        if self.scoring.scoring == "cmdr":
            ts.d_image_rec = reconstruction_distance(self.decoders.image, image[target], grid).reshape(grid)
            ts.d_depth_rec = reconstruction_distance(self.decoders.depth, depth[target], grid).reshape(grid)
        fg_tok = token_foreground(fg, grid).to(image.device)
        fused = score_tokens(ts, self.scoring, fg_tok, depth_ok)
        maps = upsample_tokens(torch.stack([psi_d, psi_i, fused.reshape(-1)]), grid, size)
        fg_t = torch.from_numpy(np.ascontiguousarray(fg)).to(maps.device)
        maps = maps * fg_t
        return maps[0], maps[1], gaussian_smooth(maps[2], self.scoring.post_sigma_frac * size)


def fit_class_decoders(image: torch.Tensor | None, depth: torch.Tensor | None, grid: tuple[int, int],
                       settings: DecoderSettings, token_mask: torch.Tensor | None = None,
                       progress: Callable[[int], None] | None = None, meta: dict | None = None
                       ) -> tuple[Decoders, list[dict]]:
    """Train the decoders of the available modalities (image/depth tokens (M, T, c) or None)."""
    log: list[dict] = []
    decs = Decoders(meta=dict(meta or {}))
    for name, tokens in (("image", image), ("depth", depth)):
        if tokens is None:
            continue
        dec = fit_decoder(tokens, grid, settings, token_mask,
                          log=lambda rec, _n=name: log.append({"decoder": _n, **rec}), progress=progress)
        setattr(decs, name, dec)
    decs.meta["decoder_settings"] = asdict(settings)
    return decs, log


def decoder_steps(n_samples: int, settings: DecoderSettings, n_decoders: int) -> int:
    """Optimizer steps of :func:`fit_class_decoders` (for progress bars)."""
    batch = max(1, min(settings.batch_size, n_samples))
    return settings.epochs * max(1, n_samples // batch) * n_decoders


__all__ = [
    "Decoders", "DecoderSettings", "MISSING_DEPTH_MODES", "MODALITY_MODES", "POST_SIGMA_FRAC", "PRE_SIGMA_FRAC",
    "ReconstructionDecoder", "SCORINGS", "ScoringSettings", "TokenScores", "box_mean", "cfm_distance",
    "cfm_normalizations", "cmdr_fusion", "confidence_weighted_reconstruction", "decoder_steps", "fill_holes",
    "CMDRScorer", "fit_class_decoders", "fit_decoder", "gaussian_smooth", "psi_to_distance",
    "reconstruction_distance", "reliability_gated_mapping", "score_tokens", "token_foreground",
]

