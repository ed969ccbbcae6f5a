"""The self-supervised model of DINO-Depth pretraining (``../shared/spec/dino_depth.md`` §3–§5), as
DINOv2's ``ssl_meta_arch.py``: student and teacher (:class:`SSLModel`), the teachers' targets
(:class:`TeacherTargets`, softmax-centering or Sinkhorn-Knopp), the loss composition
(:func:`loss_components`) and the EMA update of the teacher (:func:`ema_update`). The loop that drives
them — optimizer, schedules, checkpoints — is :mod:`pretrain.train`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pretrain.config import PretrainConfig
from pretrain.heads import DINOHead
from pretrain.losses import TeacherTargets, dino_loss_terms, ibot_loss, koleo_loss
from shared.vit import ViTConfig, vit_from_config

__all__ = ["SSLModel", "TeacherTargets", "ema_update", "loss_components", "mean_entropy", "teacher_targets"]


# -- student and teacher --------------------------------------------------------------------------------
class SSLModel(nn.Module):
    """Backbone + DINO head (+ separate iBOT head): the student, and (a copy of it) the teacher.

    ``forward`` is the student path (the module DDP will wrap); :meth:`teacher_logits` the teacher's.
    """

    def __init__(self, vit_cfg: ViTConfig, cfg: PretrainConfig) -> None:
        super().__init__()
        self.backbone = vit_from_config(vit_cfg)
        d = cfg.dino
        dim = vit_cfg.embed_dim
        self.dino_head = DINOHead(dim, d.head_n_prototypes, d.head_nlayers, d.head_hidden_dim, d.head_bottleneck_dim)
        self.ibot_head: DINOHead | None = None
        if cfg.ibot.separate_head:
            k = cfg.ibot.head_n_prototypes or d.head_n_prototypes
            self.ibot_head = DINOHead(dim, k, d.head_nlayers, d.head_hidden_dim, d.head_bottleneck_dim)

    def _heads(self, cls_tokens: Tensor, patch_tokens: Tensor) -> tuple[Tensor, Tensor]:
        if self.ibot_head is None:  # shared head: one pass over [cls; masked patches]
            logits = self.dino_head(torch.cat([cls_tokens, patch_tokens]))
            return logits[: cls_tokens.shape[0]], logits[cls_tokens.shape[0]:]
        return self.dino_head(cls_tokens), self.ibot_head(patch_tokens)

    def forward(self, global_crops: Tensor, local_crops: Tensor, masks: Tensor, mask_indices: Tensor) -> dict:
        """Student: masked globals, then locals → cls logits (globals first, crop-major), masked-patch
        logits (rows in ``mask_indices`` order) and the global cls tokens (for KoLeo)."""
        g = self.backbone(global_crops, masks=masks)
        cls_global = g["x_norm_clstoken"]
        patches = g["x_norm_patchtokens"].flatten(0, 1).index_select(0, mask_indices)
        cls = cls_global
        if local_crops.shape[0]:
            cls = torch.cat([cls_global, self.backbone(local_crops)["x_norm_clstoken"]])
        cls_logits, patch_logits = self._heads(cls, patches)
        return {"cls_logits": cls_logits, "patch_logits": patch_logits, "cls_global": cls_global}

    @torch.no_grad()
    def teacher_logits(self, global_crops: Tensor, mask_indices: Tensor) -> tuple[Tensor, Tensor]:
        """Teacher: unmasked globals → (cls logits (2B, K), patch logits at the masked positions (M, K))."""
        g = self.backbone(global_crops)
        patches = g["x_norm_patchtokens"].flatten(0, 1).index_select(0, mask_indices)
        return self._heads(g["x_norm_clstoken"], patches)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """θ_t ← m·θ_t + (1 − m)·θ_s over every parameter (fp32); buffers are not averaged."""
    t_params = [p for p in teacher.parameters()]
    s_params = [p.detach() for p in student.parameters()]
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, s_params, alpha=1.0 - momentum)


def mean_entropy(probs: Tensor) -> float:
    """Mean Shannon entropy (nats) of the rows of ``probs``; NaN when empty."""
    return float(-(probs * torch.log(probs.clamp_min(1e-30))).sum(dim=-1).mean()) if probs.numel() else float("nan")


# -- targets and losses ----------------------------------------------------------------------------------
def teacher_targets(cfg: PretrainConfig, device: torch.device) -> tuple[TeacherTargets, TeacherTargets]:
    """The DINO (cls) and iBOT (patch) target makers, each with its own center."""
    k_dino = cfg.dino.head_n_prototypes
    k_ibot = (cfg.ibot.head_n_prototypes or k_dino) if cfg.ibot.separate_head else k_dino
    return (TeacherTargets(k_dino, cfg.train.centering, cfg.train.center_momentum).to(device),
            TeacherTargets(k_ibot, cfg.train.centering, cfg.train.center_momentum).to(device))


def loss_components(cfg: PretrainConfig, out: dict, p_cls: Tensor, p_patch: Tensor, masks: Tensor,
                    mask_weights: Tensor, n_crops: int) -> dict[str, Tensor]:
    """L = w_dino·L_DINO + w_ibot·L_iBOT + w_koleo·(KoLeo(g₁) + KoLeo(g₂)) from the student's outputs
    (:meth:`SSLModel.forward`) and the teacher's targets; returns every component and ``total``."""
    s_cls = out["cls_logits"].float()
    dino_local, dino_global = dino_loss_terms(list(s_cls.chunk(n_crops)), list(p_cls.chunk(2)), cfg.train.student_temp)
    ibot = ibot_loss(out["patch_logits"].float(), p_patch, masks, cfg.train.student_temp, token_weights=mask_weights)
    if cfg.dino.koleo_loss_weight > 0:
        cls_g = out["cls_global"]
        B = cls_g.shape[0] // 2
        koleo = koleo_loss(cls_g[:B]) + koleo_loss(cls_g[B:])
    else:
        koleo = s_cls.new_zeros(())
    dino = dino_local + dino_global
    total = cfg.dino.loss_weight * dino + cfg.ibot.loss_weight * ibot + cfg.dino.koleo_loss_weight * koleo
    return {"dino_local": dino_local, "dino_global": dino_global, "ibot": ibot, "koleo": koleo, "total": total}
