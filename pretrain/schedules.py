"""Schedules indexed by the global iteration (``../shared/spec/dino_depth.md`` §6).

Every schedule is a precomputed array over the T = epochs · epoch_length iterations, so resuming at
iteration i continues with exactly the values an uninterrupted run would use. Indices ≥ T return the
final value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pretrain.config import PretrainConfig, epochs_to_iterations, lr_scale


class Cosine:
    """``Cosine(base, final, T, warmup=0, start_warmup=0, freeze=0)[i]``.

    ``freeze`` zeros, then a linear ramp ``start_warmup → base`` over ``warmup`` iterations, then
    ``final + ½ (base − final)(1 + cos(π k / (T − freeze − warmup)))`` for k = 0, 1, …;
    indices ≥ T give ``final``.
    """

    def __init__(self, base: float, final: float, total: int, warmup: int = 0, start_warmup: float = 0.0,
                 freeze: int = 0) -> None:
        if total < 0 or warmup < 0 or freeze < 0:
            raise ValueError("schedule lengths must be non-negative")
        if freeze + warmup > total:
            raise ValueError(f"freeze ({freeze}) + warmup ({warmup}) exceed the schedule length ({total})")
        self.base, self.final, self.total = float(base), float(final), int(total)
        frozen = np.zeros(freeze)
        ramp = np.linspace(start_warmup, base, warmup) if warmup else np.zeros(0)
        n_cos = total - freeze - warmup
        k = np.arange(n_cos)
        cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * k / max(n_cos, 1)))
        self.values = np.concatenate([frozen, ramp, cosine]).astype(np.float64)

    def __len__(self) -> int:
        return self.total

    def __getitem__(self, i: int) -> float:
        if i < 0:
            raise IndexError("negative schedule index")
        return float(self.values[i]) if i < self.total else self.final


@dataclass
class Schedules:
    """lr, weight decay, teacher momentum, teacher temperature and last-layer lr per iteration."""

    lr: Cosine
    wd: Cosine
    momentum: Cosine
    teacher_temp: Cosine
    last_layer_lr: Cosine
    peak_lr: float
    total_iterations: int

    def at(self, it: int) -> dict[str, float]:
        return {"lr": self.lr[it], "wd": self.wd[it], "momentum": self.momentum[it],
                "teacher_temp": self.teacher_temp[it], "last_layer_lr": self.last_layer_lr[it]}


def build_schedules(cfg: PretrainConfig, global_batch_size: int) -> Schedules:
    """The §6 schedules for a global batch G (peak lr = base_lr · scaling(G))."""
    T = cfg.total_iterations
    E = cfg.train.epoch_length
    o, t = cfg.optim, cfg.teacher
    peak = o.base_lr * lr_scale(global_batch_size, o.scaling_rule)
    warmup = min(epochs_to_iterations(o.warmup_epochs, E), T)
    lr = Cosine(peak, o.min_lr, T, warmup=warmup, start_warmup=0.0)
    wd = Cosine(o.weight_decay, o.weight_decay_end, T)
    momentum = Cosine(t.momentum_teacher, t.final_momentum_teacher, T)
    temp_warmup = min(epochs_to_iterations(t.warmup_teacher_temp_epochs, E), T)
    teacher_temp = Cosine(t.teacher_temp, t.teacher_temp, T, warmup=temp_warmup, start_warmup=t.warmup_teacher_temp)
    last_layer = Cosine(peak, o.min_lr, T, warmup=warmup, start_warmup=0.0)
    freeze = min(epochs_to_iterations(o.freeze_last_layer_epochs, E), T)
    last_layer.values[:freeze] = 0.0
    return Schedules(lr, wd, momentum, teacher_temp, last_layer, peak, T)


def cosine_value(base: float, final: float, k: int, n: int) -> float:
    """Closed form of one cosine entry (tests and documentation)."""
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * k / n))
