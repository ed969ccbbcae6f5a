"""DINO / iBOT projection head (``../shared/spec/dino_depth.md`` §2).

    x → Linear(in→hidden) → GELU → [Linear(hidden→hidden) → GELU] × (nlayers − 2) → Linear(hidden→bottleneck)
      → L2-normalise → weight-normalised Linear(bottleneck→K, no bias)

The prototype layer is called ``last_layer`` (its parameters ``last_layer.weight_g`` (K, 1), the
per-prototype norm g initialised to 1 and trainable, and ``last_layer.weight_v`` (K, bottleneck), the
direction) so that the optimiser can find and freeze it (§6) and upstream checkpoints line up.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import Tensor, nn


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight normalisation: W = g · v / ‖v‖ (norm per output row)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))
        trunc_normal_(self.weight_v, std=0.02)  # only the direction matters

    @property
    def weight(self) -> Tensor:
        return self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weight_norm=True"


class DINOHead(nn.Module):
    """MLP projector + L2-normalised bottleneck + weight-normalised prototypes (no batch-norm)."""

    def __init__(self, in_dim: int = 384, out_dim: int = 65536, nlayers: int = 3, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256) -> None:
        super().__init__()
        if nlayers < 1:
            raise ValueError("DINOHead needs nlayers >= 1")
        if nlayers == 1:
            layers: list[nn.Module] = [nn.Linear(in_dim, bottleneck_dim)]
        else:
            layers = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
            for _ in range(nlayers - 2):
                layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        for module in self.mlp.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        self.out_dim = out_dim

    def forward(self, x: Tensor) -> Tensor:
        x = self.mlp(x)
        # 1e-12 underflows in half precision: use 1e-6 there.
        eps = 1e-6 if x.dtype in (torch.float16, torch.bfloat16) else 1e-12
        x = F.normalize(x, dim=-1, p=2, eps=eps)
        return self.last_layer(x)
