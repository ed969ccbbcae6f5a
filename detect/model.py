"""ModMap networks: FiLM view modulators and token-wise mapping MLPs (``../shared/spec/modmap.md`` §6–§8).

* :class:`ViewModulator` — ``[γ, β] = MLP([v_s ; v_t (; c)])``, ``Φ(F) = γ ⊙ F + β``, identity at init.
* :class:`FeatureMapper` — ``in → (in+out)//2 → (in+out)//2 → out`` with GELU after the first two.
* :class:`ModMap` — the two modulators and two mappers of one model set (image→depth and depth→image)
  plus the variant logic of §16 (``modmap``, ``vc_cfm``, ``cfm``).
* :func:`training_pairs` — the ordered (source, target) pairs a variant trains on.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Variant = Literal["modmap", "vc_cfm", "cfm"]
VARIANTS: tuple[str, ...] = ("modmap", "vc_cfm", "cfm")
COSINE_EPS = 1e-8


class ViewModulator(nn.Module):
    """FiLM conditioning of source-view tokens on the (source, target) view identity (§6).

    ``MLP = Linear(2N (+C) → hidden) → GELU → Linear(hidden → 2·dim)``; the first ``dim`` outputs are
    γ, the last ``dim`` are β, broadcast over all tokens. The last Linear starts at weight 0 and bias
    ``[1…1, 0…0]`` so that Φ is exactly the identity before training.
    """

    def __init__(self, n_views: int, dim: int, hidden: int = 128, n_classes: int = 0) -> None:
        super().__init__()
        if n_views < 1 or dim < 1 or hidden < 1 or n_classes < 0:
            raise ValueError(f"invalid ViewModulator sizes: n_views={n_views}, dim={dim}, hidden={hidden}, "
                             f"n_classes={n_classes}")
        self.n_views = n_views
        self.dim = dim
        self.n_classes = n_classes
        self.fc1 = nn.Linear(2 * n_views + n_classes, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, 2 * dim)
        self.reset_identity()

    def reset_identity(self) -> None:
        nn.init.zeros_(self.fc2.weight)
        with torch.no_grad():
            self.fc2.bias[: self.dim].fill_(1.0)
            self.fc2.bias[self.dim:].zero_()

    def condition(self, source_view: torch.Tensor, target_view: torch.Tensor,
                  class_id: torch.Tensor | None = None) -> torch.Tensor:
        """The one-hot code ``[v_s ; v_t (; c)]`` (B, 2N (+C)) as float."""
        # Ids on the host are range-checked here; ids already on an accelerator are not (reading them
        # back would stall every training step and target): F.one_hot's device-side assert stops them there.
        on_host = [not isinstance(v, torch.Tensor) or v.device.type == "cpu" for v in (source_view, target_view)]
        source_view = torch.as_tensor(source_view, device=self.fc1.weight.device).long().reshape(-1)
        target_view = torch.as_tensor(target_view, device=self.fc1.weight.device).long().reshape(-1)
        if source_view.shape != target_view.shape:
            raise ValueError(f"source_view {tuple(source_view.shape)} and target_view {tuple(target_view.shape)} "
                             "must have the same length")
        for name, v, host in (("source_view", source_view, on_host[0]), ("target_view", target_view, on_host[1])):
            if host and v.numel() and (int(v.min()) < 0 or int(v.max()) >= self.n_views):
                raise ValueError(f"{name} ids must lie in [0, {self.n_views}), got range "
                                 f"[{int(v.min())}, {int(v.max())}]")
        parts = [F.one_hot(source_view, self.n_views), F.one_hot(target_view, self.n_views)]
        if self.n_classes:
            if class_id is None:
                raise ValueError("this modulator was built with n_classes > 0: class_id is required")
            class_id = torch.as_tensor(class_id, device=source_view.device).long().reshape(-1)
            if class_id.numel() == 1 and source_view.numel() != 1:
                class_id = class_id.expand(source_view.numel())
            parts.append(F.one_hot(class_id, self.n_classes))
        elif class_id is not None:
            raise ValueError("class_id given but the modulator was built with n_classes=0")
        return torch.cat(parts, dim=1).to(self.fc1.weight.dtype)

    def film(self, source_view: torch.Tensor, target_view: torch.Tensor,
             class_id: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(γ, β), each (B, dim)."""
        out = self.fc2(self.act(self.fc1(self.condition(source_view, target_view, class_id))))
        return out[:, : self.dim], out[:, self.dim:]

    def forward(self, features: torch.Tensor, source_view: torch.Tensor, target_view: torch.Tensor,
                class_id: torch.Tensor | None = None) -> torch.Tensor:
        if features.ndim != 3 or features.shape[-1] != self.dim:
            raise ValueError(f"features must be (B, T, {self.dim}), got {tuple(features.shape)}")
        gamma, beta = self.film(source_view, target_view, class_id)
        if gamma.shape[0] != features.shape[0]:
            raise ValueError(f"{features.shape[0]} feature maps but {gamma.shape[0]} view pairs")
        return features * gamma.unsqueeze(1).to(features.dtype) + beta.unsqueeze(1).to(features.dtype)


class FeatureMapper(nn.Module):
    """Token-wise MLP ``in → h → h → out`` with ``h = (in + out) // 2``, GELU, no norm/dropout/residual (§7)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        hidden = (in_dim + out_dim) // 2
        self.in_dim, self.out_dim, self.hidden_dim = in_dim, out_dim, hidden
        self.fc1 = nn.Linear(in_dim, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, out_dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_dim:
            raise ValueError(f"expected (..., {self.in_dim}) features, got {tuple(x.shape)}")
        return self.fc3(self.act(self.fc2(self.act(self.fc1(x)))))


class IdentityModulator(nn.Module):
    """Φ = identity with the modulator's call signature (variant ``cfm``)."""

    def forward(self, features: torch.Tensor, source_view: torch.Tensor, target_view: torch.Tensor,
                class_id: torch.Tensor | None = None) -> torch.Tensor:
        return features


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-token ``a·b / max(‖a‖·‖b‖, 1e-8)`` over the last axis (modmap §2), computed in fp32."""
    a = a.float()
    b = b.float()
    dot = (a * b).sum(-1)
    norms = torch.linalg.vector_norm(a, dim=-1) * torch.linalg.vector_norm(b, dim=-1)
    return dot / norms.clamp_min(COSINE_EPS)


class ModMap(nn.Module):
    """One ModMap model set: Φ_I, Φ_D, M_{I→D}, M_{D→I} (§6–§7) with the ablation variants of §16.

    ``variant``: ``modmap`` (modulator on [v_s ; v_t], all N² pairs, min over all sources), ``vc_cfm``
    (modulator on [v_t ; v_t], same-view pairs only) or ``cfm`` (no modulator, same-view pairs only).
    """

    def __init__(self, n_views: int, image_dim: int, depth_dim: int, hidden: int = 128,
                 variant: Variant = "modmap", n_classes: int = 0) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
        self.n_views, self.image_dim, self.depth_dim = n_views, image_dim, depth_dim
        self.variant = variant
        if variant == "cfm":
            self.modulator_image: nn.Module = IdentityModulator()
            self.modulator_depth: nn.Module = IdentityModulator()
        else:
            self.modulator_image = ViewModulator(n_views, image_dim, hidden, n_classes)
            self.modulator_depth = ViewModulator(n_views, depth_dim, hidden, n_classes)
        self.image2depth = FeatureMapper(image_dim, depth_dim)
        self.depth2image = FeatureMapper(depth_dim, image_dim)

    @property
    def same_view_only(self) -> bool:
        return self.variant != "modmap"

    def forward(self, image_src: torch.Tensor, depth_src: torch.Tensor, source_view: torch.Tensor,
                target_view: torch.Tensor, class_id: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Predictions ``(F̂_D^{s→t}, F̂_I^{s→t})`` from source tokens (B, T, c_I) and (B, T, c_D)."""
        if self.variant == "vc_cfm":
            source_view = target_view  # view-conditioned CFM: the code is [v_t ; v_t]
        pred_depth = self.image2depth(self.modulator_image(image_src, source_view, target_view, class_id))
        pred_image = self.depth2image(self.modulator_depth(depth_src, source_view, target_view, class_id))
        return pred_depth, pred_image

    def component_state_dicts(self) -> dict[str, dict]:
        """State dicts under the authors' names (``model_image2depth`` …), for the checkpoint (§18)."""
        return {
            "model_image2depth": self.image2depth.state_dict(),
            "model_depth2image": self.depth2image.state_dict(),
            "modulator_image": self.modulator_image.state_dict(),
            "modulator_depth": self.modulator_depth.state_dict(),
        }

    def load_component_state_dicts(self, state: dict[str, dict]) -> None:
        self.image2depth.load_state_dict(state["model_image2depth"])
        self.depth2image.load_state_dict(state["model_depth2image"])
        self.modulator_image.load_state_dict(state["modulator_image"])
        self.modulator_depth.load_state_dict(state["modulator_depth"])


def training_pairs(n_views: int, variant: Variant = "modmap") -> torch.Tensor:
    """Ordered (source, target) pairs (P, 2) long: all N² incl. self-pairs for ``modmap``, (t, t) otherwise."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    views = torch.arange(n_views)
    if variant != "modmap":
        return torch.stack([views, views], dim=1)
    source, target = torch.meshgrid(views, views, indexing="ij")
    return torch.stack([source.reshape(-1), target.reshape(-1)], dim=1)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
