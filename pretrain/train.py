"""DINO-Depth self-supervised pretraining: the DINOv2 recipe on depth maps, one process to many nodes.

``python pretrain/train.py --config configs/pretrain/tiny_cpu.yaml train.output_dir=runs/tiny key=value …``
(or ``python -m pretrain.train …``). Spec: ``../shared/spec/dino_depth.md``. The same entry point runs
under ``torchrun --nproc_per_node=K -m pretrain.train …``, ``srun`` (``slurm/pretrain_dinodepth.sh``)
and submitit (``pretrain/launch.py``); see ``docs/pretraining.md`` "Pretraining at scale".

One iteration (§3–§7):

1. teacher (EMA of the student, eval mode, no grad) on the two unmasked global crops → cls logits
   and patch logits at the masked positions → targets by softmax-centering or Sinkhorn-Knopp;
2. student on the masked global crops, then on the local crops (two backbone passes), one head pass
   over [cls tokens; masked patch tokens];
3. L = w_dino·L_DINO + w_ibot·L_iBOT + w_koleo·(KoLeo(g₁) + KoLeo(g₂)); non-finite → stop (or skip);
4. backward, per-submodule gradient clipping, AdamW with the §6 schedules, EMA update of the
   teacher, center updates (effective from the next iteration).

Run directory (``train.output_dir``): ``config.yaml`` (resolved config), ``metrics.jsonl`` (a run that
resumes, or starts over, first drops the records of the iterations it is about to redo),
``checkpoints/checkpoint_<it>.pth`` + ``checkpoints/latest`` (atomic; last ``train.keep`` kept; under
FSDP the tensors in ``checkpoint_<it>.dcp/``, written by every rank, ``dist.fsdp_checkpoint``),
``dinodepth.pth`` (+ ``.safetensors``, ``.sha256``) at the end, ``exports/`` (periodic),
``eval/pca_<it>.png`` (PCA of teacher patch features of fixed samples).

Resume is automatic when the run directory has a checkpoint (``--no-resume`` to start over) and
bit-exact on CPU.

This file holds the loop (:class:`Trainer`: optimizer, schedules, the iteration, signals) and the entry
points (:func:`run_job`, :func:`main`); the model, its losses and the EMA are in :mod:`pretrain.ssl_model`,
checkpoint files, resume and RNG state in :mod:`pretrain.checkpointing`, ``metrics.jsonl``, TensorBoard and
the PCA pictures in :mod:`pretrain.monitor`.

Distributed (§10): the process group comes from SLURM / torchrun / submitit variables
(:func:`shared.distributed.init`, with a collective timeout ``dist.timeout_s``); the student is
wrapped in DDP or sharded with FSDP2 (:mod:`pretrain.parallel`); rank r reads the stream positions
i·G + r + k·W of iteration i; G = B·W and the lr scaling rule uses G. Every reduction goes through
:func:`shared.distributed.all_reduce`. Rank 0 alone logs and writes checkpoints and exports
(full, world-size agnostic tensors). Each iteration all-reduces the loss components together with
a stop flag, so all ranks take the same decisions (non-finite loss, preemption signal).

Exit status of ``main`` (also the launchers' contract):

* ``0`` finished, or stopped at ``train.stop_at_iteration``;
* ``1`` configuration or checkpoint error (also a full disk or an unwritable run directory);
  ``2`` non-finite loss (``train.on_nonfinite: error``), or bad command-line arguments (argparse);
* ``3`` distributed failure: another rank died, or a collective / the rendezvous timed out;
* ``75`` (EX_TEMPFAIL) preempted: SIGTERM, SIGUSR1 or SIGUSR2 arrived, the checkpoint of the current
  iteration was written; rerun the same command (or requeue the job) to resume.
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a script: put the repo root on sys.path instead of the script dir
    import pathlib
    import sys

    sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

if __name__ == "__main__":  # --help and argument errors answer before the torch import below
    from pretrain.cli import train_parser
    from shared.cli import preparse

    preparse(train_parser)

import argparse
import logging
import math
import os
import signal
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from pretrain import export as export_lib
from pretrain import parallel
from pretrain import probes as probes_lib  # [probes] issue 22
from pretrain.checkpointing import (
    CHECKPOINT_FORMAT_VERSION,
    compare_configs,
    find_resume,
    get_rng_state,
    read_training_checkpoint,
    set_rng_state,
    write_checkpoint,
)
from pretrain.cli import train_parser
from pretrain.config import PretrainConfig, validate
from pretrain.device_augment import DevicePrefetcher, resolve_warp
from pretrain.loader import MultiCropBatches, SampleSource, build_loader, open_sample_table
from pretrain.losses import apply_center_statistics, center_statistics
from pretrain.monitor import (
    MetricsLog,
    fixed_eval_inputs,
    iteration_record,
    pca_feature_image,
    write_pca_image,
)
from pretrain.optim import (
    apply_schedules,
    build_optimizer,
    load_optimizer_state_by_name,
    optimizer_state_by_name,
)
from pretrain.schedules import Schedules, build_schedules
from pretrain.ssl_model import (
    SSLModel,
    distinct_prototypes,
    ema_update,
    entropy_tensor,
    loss_components,
    teacher_targets,
)
from shared import distributed as dist_utils
from shared.checkpoint import CheckpointError
from shared.cli import debug_enabled, fail, run_main
from shared.config import ConfigError, load_config, save_config, to_dict
from shared.depth import DepthNormConfig
from shared.vit import vit_from_config

log = logging.getLogger("pretrain")

# Exit status of `main` (module docstring); the SLURM script requeues on EXIT_REQUEUE.
EXIT_OK, EXIT_ERROR, EXIT_NONFINITE, EXIT_DIST_FAILURE, EXIT_REQUEUE = 0, 1, 2, 3, 75
# Signals that mean "checkpoint at the end of this iteration, then exit": SIGTERM (scancel, preemption),
# SIGUSR1 (`#SBATCH --signal=USR1@120` of slurm/pretrain_dinodepth.sh), SIGUSR2 (submitit's default).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
# Gradient norms logged (and clipped) per submodule, in this order in the flat all-reduce.
GRAD_NORM_MODULES = ("backbone", "dino_head", "ibot_head")
# Device guard: iterations between read-backs of the stop flag when nothing else reads back (a
# preemption signal is acted on within this many steps; SLURM gives 120 s).
STOP_POLL_PERIOD = 10


class NonFiniteLossError(RuntimeError):
    """A loss component or gradient norm became NaN or inf (``train.on_nonfinite: error``)."""


# -- trainer ------------------------------------------------------------------------------------------------
class Trainer:
    """DINO-Depth trainer: one process (CPU or one GPU) or one rank of a data-parallel job.

    A multi-rank job needs the process group first (:func:`shared.distributed.init`; :func:`run_job`
    does it). ``student`` is always the plain :class:`SSLModel` (state dicts, EMA, clipping);
    ``student_forward`` is what the training step calls (the DDP wrapper, or ``student`` itself).
    """

    def __init__(self, cfg: PretrainConfig, table: SampleSource | None = None, resume: bool | str = True,
                 allow_data_change: bool = False,
                 on_iteration_end: Callable[[Trainer, dict], None] | None = None) -> None:
        validate(cfg, require_data=table is None)
        if not cfg.train.output_dir:
            raise ConfigError("train.output_dir is required (the run directory)")
        self.cfg = cfg
        self.out_dir = Path(cfg.train.output_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.on_iteration_end = on_iteration_end
        self.rank = dist_utils.get_rank()
        self.world_size = dist_utils.get_world_size()
        self.is_main = self.rank == 0
        self.device = self._pick_device(cfg.train.device)
        self.precision = cfg.train.precision if self.device.type == "cuda" else "fp32"
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        configure_determinism(cfg.train.deterministic)
        # Global batch G = B·W; the lr scaling rule (schedules) and the data positions use G.
        self.global_batch_size = cfg.train.batch_size_per_gpu * self.world_size

        self.table = table if table is not None else open_sample_table(cfg)
        self.fingerprint = self.table.fingerprint

        torch.manual_seed(cfg.train.seed)
        self.vit_cfg = cfg.vit_config()
        self.teacher_vit_cfg = cfg.vit_config(teacher=True)
        self.student = SSLModel(self.vit_cfg, cfg).to(self.device)
        self.teacher = SSLModel(self.teacher_vit_cfg, cfg).to(self.device)
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.eval().requires_grad_(False)
        # Start-up synchronisation: every rank starts from rank 0's weights (same seed, but a rank
        # must never depend on identical RNG streams for correctness).
        dist_utils.broadcast_module(self.student)
        dist_utils.broadcast_module(self.teacher)
        # Per-rank random streams from here on (stochastic depth, KoLeo ties): ranks with the same stream
        # would draw the same drop-path masks for different samples. All ranks' states are checkpointed.
        torch.manual_seed(cfg.train.seed + self.rank)

        self.dino_targets, self.ibot_targets = teacher_targets(cfg, self.device)

        # A process group (also a one-rank one, dist.process_group=always) means DDP or FSDP.
        self.strategy = cfg.dist.strategy if dist_utils.is_initialized() else "single"
        if self.strategy == "fsdp" and self.precision == "fp16":
            # A GradScaler would check only this rank's gradient shards for inf: ranks could disagree on
            # skipping a step. bf16 needs no scaler.
            raise ConfigError("dist.strategy=fsdp supports train.precision bf16 or fp32, not fp16")
        self.student_forward: nn.Module = self.student
        if cfg.train.activation_checkpointing:  # before sharding and compiling: they see the wrapped forward
            parallel.checkpoint_activations(self.student.backbone.blocks)
        if self.strategy != "single":
            self.student_forward = parallel.wrap_models(
                self.student, self.teacher, cfg.dist.strategy, self.device, cfg.dist.fsdp_reshard_after_forward,
                param_dtype=self.autocast_dtype if self.precision == "bf16" else None)
        self.sharded = parallel.is_sharded(self.student)
        if cfg.train.compile:
            # After wrapping (compiling first would trace FSDP's hooks out of the graph), and per block:
            # FSDP's unit boundaries (all-gather / reshard) then fall between compiled regions.
            for model in (self.student, self.teacher):
                for block in model.backbone.blocks:
                    block.compile()

        # After wrapping: FSDP replaces the parameters by DTensor shards.
        self.optimizer = build_optimizer(self.student.named_parameters(), self.vit_cfg.depth, cfg.optim.layerwise_decay,
                                         cfg.optim.patch_embed_lr_mult, (cfg.optim.adamw_beta1, cfg.optim.adamw_beta2),
                                         self.device)
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        self.schedule_batch_size = self.global_batch_size
        self.schedules: Schedules = build_schedules(cfg, self.global_batch_size)

        self.iteration = 0
        self.position_offset = 0  # stream position of iteration i is offset + i·G (non-zero only after a G change)
        self.skipped_total = 0
        self.nonfinite_skipped = 0
        self.metrics_tail: dict = {}
        self._stop_signal: int | None = None  # set by the signal handler of this rank
        self._stop_agreed = False  # some rank got a stop signal (all-reduced each iteration)
        self._last_ckpt_iteration: int | None = None
        self.metrics_log = MetricsLog(self.out_dir, self.is_main)

        resume_path = find_resume(self.out_dir, resume)
        if resume_path is not None:
            self.load_checkpoint(resume_path, allow_data_change=allow_data_change)
        # Depth crops warped on the training device (CUDA by default) or in the loader workers (numpy).
        self.warp = resolve_warp(cfg.aug.warp_on, self.device, cfg.data.modality)
        self.dataset = MultiCropBatches(cfg, self.table, self.global_batch_size, self.rank, self.world_size,
                                        warp=self.warp)
        # Non-finite guard on the device (CUDA, fused AdamW's found_inf): no host sync per step. The
        # counters live on the device and are read back with the metrics (read_back).
        self.device_guard = self.device.type == "cuda"
        self._bad_count = torch.full((), self.nonfinite_skipped, dtype=torch.long, device=self.device)
        self._first_bad = torch.full((), -1, dtype=torch.long, device=self.device)
        self._first_bad_values = torch.zeros(5 + len(GRAD_NORM_MODULES), device=self.device)
        self._stop_flag_dev = torch.zeros((), device=self.device)
        self._last_head = torch.zeros(5 + len(GRAD_NORM_MODULES), device=self.device)
        self._last_teacher_metrics: Tensor | None = None
        self.dataset.position_offset = self.position_offset
        self.run_probes = probes_lib.build_run_probes(self)  # [probes] collapse monitor + held-out probes

    # -- set-up helpers ---------------------------------------------------------------------------------
    @staticmethod
    def _pick_device(name: str) -> torch.device:
        if name == "auto":
            if torch.cuda.is_available():
                return torch.device("cuda", torch.cuda.current_device())
            return torch.device("cpu")
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"train.device={name} but CUDA is not available")
        if device.type == "cuda" and device.index is None:  # this rank's GPU (set by shared.distributed.init)
            device = torch.device("cuda", torch.cuda.current_device())
        return device

    def _autocast(self):
        if self.autocast_dtype is None:
            return torch.autocast(device_type=self.device.type, enabled=False)
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    # -- export metadata ----------------------------------------------------------------------------------
    def input_norm(self) -> dict:
        cfg = self.cfg
        if cfg.data.modality == "image":
            ia = cfg.image_aug
            c = cfg.student.in_chans
            mean = list(ia.mean) * (c if len(ia.mean) == 1 else 1)
            std = list(ia.std) * (c if len(ia.std) == 1 else 1)
            return {"modality": "image", "in_chans": c, "scale": 255.0, "max_normalize": ia.max_normalize,
                    "mean": mean, "std": std}
        n = cfg.data.depth_norm
        return {"modality": "depth", **DepthNormConfig(n.mode, n.eps, tuple(n.pct)).to_dict(), "invalid_value": 0.0}

    def train_meta(self) -> dict:
        cfg = self.cfg
        selection = self.table.selection() if hasattr(self.table, "selection") else None
        return {
            "iteration": self.iteration,
            "modality": cfg.data.modality,
            "data": {"preset": cfg.data.preset, "sources": cfg.data.sources, "splits": list(cfg.data.splits),
                     "shards": list(cfg.data.shards), "glob": cfg.data.glob, "list_file": cfg.data.list_file,
                     "selection": selection},
            "fingerprint": self.fingerprint,
            "table_size": len(self.table),
            "global_batch_size": self.global_batch_size,
            "world_size": self.world_size,
            "seed": cfg.train.seed,
            "code_version": export_lib.code_version(),
            "config": to_dict(cfg),
        }

    # -- checkpoints ------------------------------------------------------------------------------------
    def checkpoint_state(self, weights: bool = True) -> dict:
        """The full training state; under FSDP a collective (gathers shards): call it on every rank.
        ``weights=False``: without student, teacher and optimizer moments (they go to a DCP folder)."""
        if not weights:
            return {**self._checkpoint_state_rest(),
                    "optimizer": {"state": {}, "param_groups": optimizer_state_by_name(self.optimizer)["param_groups"]}}
        return {**self._checkpoint_state_rest(),
                "student": parallel.full_state_dict(self.student),
                "teacher": parallel.full_state_dict(self.teacher),
                "optimizer": parallel.full_optimizer_state(optimizer_state_by_name(self.optimizer))}

    def _checkpoint_state_rest(self) -> dict:
        return {
            "format_version": CHECKPOINT_FORMAT_VERSION,
            "iteration": self.iteration,
            "config": {**to_dict(self.cfg), "runtime": {"global_batch_size": self.global_batch_size,
                                                        "world_size": self.world_size}},
            "arch": self.teacher_vit_cfg.to_dict(),
            "input_norm": self.input_norm(),
            "train_meta": self.train_meta(),
            "centers": {"dino": self.dino_targets.center.clone(), "ibot": self.ibot_targets.center.clone()},
            "grad_scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "schedule": {"global_batch_size": self.schedule_batch_size},
            "rng": get_rng_state(),  # this (rank 0's) state; every rank's in rng_per_rank
            "data_state": {"seed": self.cfg.train.seed, "position": self.position_offset
                           + self.iteration * self.global_batch_size, "fingerprint": self.fingerprint,
                           "table_size": len(self.table), "skipped_total": self.skipped_total},
            "counters": {"nonfinite_skipped": self.nonfinite_skipped},
            "metrics_tail": self.metrics_tail,
        }

    def save_checkpoint(self) -> Path | None:
        """Atomically write ``checkpoint_<it>.pth``, move ``latest``, prune to the last ``keep`` (rank 0).

        Call on every rank: under FSDP the full tensors are gathered first (a collective)."""
        rng_per_rank = dist_utils.all_gather_object(get_rng_state())  # a collective: every rank's stream
        if self.sharded and self.cfg.dist.fsdp_checkpoint == "dcp":
            # Each rank writes its own shards (no gather); the .pth written last (atomically) by rank 0
            # names the folder, so a folder without its .pth (a killed save) is never resumed from.
            folder = f"checkpoint_{self.iteration:08d}.dcp"
            parallel.save_sharded(str(self.ckpt_dir / folder), parallel.sharded_tensors(
                self.student, self.teacher, optimizer_state_by_name(self.optimizer)))
            state = self.checkpoint_state(weights=False) if self.is_main else None
            if state is not None:
                state["dcp"] = folder
        else:
            state = self.checkpoint_state() if self.is_main or self.sharded else None
        if state is not None:
            state["rng_per_rank"] = rng_per_rank
        self._last_ckpt_iteration = self.iteration
        if not self.is_main:
            return None
        return write_checkpoint(self.ckpt_dir, self.iteration, state, self.cfg.train.keep)

    def load_checkpoint(self, path: Path, allow_data_change: bool = False) -> None:
        ckpt = read_training_checkpoint(path)
        saved_cfg = dict(ckpt["config"])
        runtime = saved_cfg.pop("runtime", {})
        compare_configs(self.cfg, saved_cfg, same_global_batch=runtime.get("global_batch_size") == self.global_batch_size)
        data_state = ckpt["data_state"]
        if data_state["fingerprint"] != self.fingerprint and not allow_data_change:
            raise CheckpointError(f"the sample table changed since {path} was written (fingerprint "
                                  f"{data_state['fingerprint'][:12]}… → {self.fingerprint[:12]}…); "
                                  "pass --allow-data-change to continue on the new data")
        if "dcp" in ckpt:  # sharded tensors in a DCP folder: read back full, whatever the world size
            student, teacher, moments = parallel.load_sharded_full(str(Path(path).parent / ckpt["dcp"]))
            ckpt = {**ckpt, "student": student, "teacher": teacher,
                    "optimizer": {"state": moments, "param_groups": ckpt["optimizer"]["param_groups"]}}
        # Full tensors, whatever the world size at save time; each rank loads the same file and, under
        # FSDP, cuts its own shards.
        parallel.load_full_state_dict(self.student, ckpt["student"])
        parallel.load_full_state_dict(self.teacher, ckpt["teacher"])
        self.dino_targets.center.copy_(ckpt["centers"]["dino"])
        self.ibot_targets.center.copy_(ckpt["centers"]["ibot"])
        optimizer_state = ckpt["optimizer"]
        if self.sharded:
            optimizer_state = parallel.shard_optimizer_state(self.optimizer, optimizer_state)
        load_optimizer_state_by_name(self.optimizer, optimizer_state)
        if self.scaler is not None and ckpt.get("grad_scaler"):
            self.scaler.load_state_dict(ckpt["grad_scaler"])
        self.iteration = int(ckpt["iteration"])
        saved_g = int(runtime.get("global_batch_size", self.global_batch_size))
        saved_w = int(runtime.get("world_size", self.world_size))
        if saved_w != self.world_size:
            log.info("checkpoint written by %d rank(s), resuming on %d", saved_w, self.world_size)
        sched_g = int(ckpt.get("schedule", {}).get("global_batch_size", saved_g))
        if saved_g != self.global_batch_size:
            warnings.warn(f"global batch size changed {saved_g} → {self.global_batch_size}: the schedules keep the "
                          f"values of G = {sched_g}; data continue at stream position {data_state['position']}",
                          stacklevel=2)
        if sched_g != self.global_batch_size:
            self.schedule_batch_size = sched_g
            self.schedules = build_schedules(self.cfg, sched_g)
        self.position_offset = int(data_state["position"]) - self.iteration * self.global_batch_size
        self.skipped_total = int(data_state.get("skipped_total", 0))
        self.nonfinite_skipped = int(ckpt.get("counters", {}).get("nonfinite_skipped", 0))
        self.metrics_tail = dict(ckpt.get("metrics_tail") or {})
        per_rank = ckpt.get("rng_per_rank") or []
        if self.rank < len(per_rank):
            set_rng_state(per_rank[self.rank])
        else:  # written by fewer ranks (or before per-rank states): rank 0's, this rank's own seed
            set_rng_state(ckpt["rng"])
            if self.rank:
                torch.manual_seed(self.cfg.train.seed + self.rank + self.iteration)
        self._last_ckpt_iteration = self.iteration
        log.info("resumed from %s at iteration %d", path, self.iteration)

    # -- one iteration ----------------------------------------------------------------------------------------
    def train_step(self, batch: dict, it: int, read_back: bool = True) -> dict:
        """Forward, losses, backward, clip, one all-reduce, guarded step, EMA, centers.

        Everything the ranks must agree on — the loss components, the gradient norms, the stop flag and
        both centers' statistics — travels in **one** flat all-reduce. With ``read_back`` (log
        iterations, and whenever the loop needs the host to decide) the iteration's metrics are read
        back with one ``.tolist()`` and returned; otherwise ``{}``. Under :attr:`device_guard` (CUDA)
        the non-finite guard runs on the device: the fused AdamW skips the step through ``found_inf``
        (as under GradScaler), the EMA and the centers are masked, skips are counted on the device and
        reported at the next read-back; on CPU host reads cost nothing and the guard decides at once.
        """
        cfg = self.cfg
        dev = self.device
        nb = dev.type == "cuda"
        # Already on the device when they come through DevicePrefetcher (then these are no-ops).
        globals_ = batch["global_crops"].to(dev, non_blocking=nb)
        locals_ = batch["local_crops"].to(dev, non_blocking=nb)
        masks = batch["masks"].to(dev, non_blocking=nb)
        mask_indices = batch["mask_indices"].to(dev, non_blocking=nb)
        mask_weights = batch["mask_weights"].to(dev, non_blocking=nb)
        B = globals_.shape[0] // 2
        n_crops = 2 + locals_.shape[0] // B
        sched = self.schedules.at(it)
        temp = sched["teacher_temp"]

        # Teacher targets (fp32 from here on). The centers' statistics and the entropy metrics are taken
        # now, so that the teacher logits (two ~2.9 GB fp32 patch tensors at ViT-g scale) are freed
        # before the student's forward instead of living through its backward.
        with self._autocast():
            t_cls, t_patch = self.teacher.teacher_logits(globals_, mask_indices)
        t_cls, t_patch = t_cls.float(), t_patch.float()
        p_cls = self.dino_targets(t_cls, temp)
        p_patch = self.ibot_targets(t_patch, temp)
        center_stats = [center_statistics(t_cls), center_statistics(t_patch)]
        teacher_metrics = (torch.stack([entropy_tensor(p_cls), distinct_prototypes(p_cls), entropy_tensor(p_patch)])
                           if read_back else None)
        del t_cls, t_patch

        # Student.
        with self._autocast():
            out = self.student_forward(globals_, locals_, masks, mask_indices)
        components = loss_components(cfg, out, p_cls, p_patch, masks, mask_weights, n_crops)
        del out, p_cls, p_patch
        total = components["total"]

        # Backward, clipping per submodule.
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(total).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            total.backward()
        clip = cfg.optim.clip_grad if cfg.optim.clip_grad > 0 else float("inf")
        grad_norms = []
        for name in GRAD_NORM_MODULES:
            module = getattr(self.student, name)
            norm = (parallel.full_value(torch.nn.utils.clip_grad_norm_(module.parameters(), clip))
                    if module is not None else None)
            grad_norms.append(norm.float().reshape(()) if norm is not None else total.new_zeros((), dtype=torch.float32))

        # The iteration's one all-reduce: [components, grad norms, stop flag, center statistics]. Every
        # rank then takes the same decisions (skip / stop on a non-finite value, checkpoint and exit on a
        # signal); a rank deciding alone would leave the others waiting in the next collective.
        n_comp = len(components)
        stop = total.new_full((1,), float(self._stop_signal is not None), dtype=torch.float32)
        flat = dist_utils.all_reduce(torch.cat([torch.stack([v.detach().float() for v in components.values()]),
                                                torch.stack(grad_norms), stop, *center_stats]), op="sum")
        head = flat[: n_comp + len(GRAD_NORM_MODULES)] / self.world_size
        stop_flag = flat[n_comp + len(GRAD_NORM_MODULES)]
        k_dino = center_stats[0].numel()
        dino_stats = flat[n_comp + len(GRAD_NORM_MODULES) + 1: n_comp + len(GRAD_NORM_MODULES) + 1 + k_dino]
        ibot_stats = flat[n_comp + len(GRAD_NORM_MODULES) + 1 + k_dino:]
        # A non-finite component, or (without a GradScaler, which finds those itself) gradient norm.
        checked = head[:n_comp] if self.scaler is not None else head
        ok = torch.isfinite(checked).all()

        if not self.device_guard:  # CPU: the host decides now (a host read is free here)
            host = head.tolist() + [float(stop_flag)]
            self._stop_agreed = host[-1] > 0
            values = dict(zip(components, host[:n_comp]))
            norms = {k: v for k, v in zip(GRAD_NORM_MODULES, host[n_comp:-1]) if getattr(self.student, k) is not None}
            bad = [k for k, v in values.items() if not math.isfinite(v)]
            if not bad and self.scaler is None:
                bad = [f"grad_norm/{k}" for k, v in norms.items() if not math.isfinite(v)]
            if bad:
                self.optimizer.zero_grad(set_to_none=True)
                return self._nonfinite(it, bad, {**values, **{f"grad_norm/{k}": v for k, v in norms.items()}})
            self._optimizer_step(it)
            self._after_step(sched["momentum"], dino_stats, ibot_stats, None)
            metrics = {**values, "grad_norm": norms, "n_masked": int(mask_indices.numel())}
            if teacher_metrics is not None:
                entropy, distinct, ibot_entropy = teacher_metrics.tolist()
                metrics.update(teacher_entropy=entropy, teacher_distinct_prototypes=int(distinct),
                               ibot_teacher_entropy=ibot_entropy)
            return metrics

        # CUDA: guarded on the device, nothing read back unless asked.
        if self.scaler is None:
            self.optimizer.found_inf = (~ok).float()  # fused AdamW: skip the step (all ranks agree)
        self._optimizer_step(it)
        self._after_step(torch.where(ok, sched["momentum"], 1.0), dino_stats, ibot_stats, ok)
        self._bad_count += (~ok).long()
        first = (~ok) & (self._first_bad < 0)
        self._first_bad = torch.where(first, it, self._first_bad)
        self._first_bad_values = torch.where(first, head, self._first_bad_values)
        self._stop_flag_dev = stop_flag
        self._last_head = head
        self._last_teacher_metrics = teacher_metrics
        if not read_back:
            return {}
        return self.read_back(it, int(mask_indices.numel()))

    def _optimizer_step(self, it: int) -> None:
        apply_schedules(self.optimizer, self.schedules, it)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _after_step(self, momentum: float | Tensor, dino_stats: Tensor, ibot_stats: Tensor, ok: Tensor | None) -> None:
        if self.sharded:  # the EMA runs on local shards of both models (pretrain.parallel.reshard)
            parallel.reshard(self.teacher)
            parallel.reshard(self.student)
        ema_update(self.teacher, self.student, momentum)
        for targets, stats in ((self.dino_targets, dino_stats), (self.ibot_targets, ibot_stats)):
            if targets.mode == "centering":
                apply_center_statistics(targets.center, stats, targets.center_momentum, ok)

    def read_back(self, it: int, n_masked: int | None = None) -> dict:
        """Device guard: one ``.tolist()`` of the last step's reduced values, the stop flag, the
        teacher metrics and the skip counters; reports the non-finite steps since the last read-back
        (``_nonfinite``: raises under ``train.on_nonfinite: error``). Returns the metrics of ``it``."""
        n_comp, n_norm = 5, len(GRAD_NORM_MODULES)
        pieces = [self._last_head, self._stop_flag_dev.reshape(1), self._bad_count.float().reshape(1),
                  self._first_bad.float().reshape(1), self._first_bad_values]
        if self._last_teacher_metrics is not None:
            pieces.append(self._last_teacher_metrics)
        host = torch.cat(pieces).tolist()
        head, stop, bad_count, first_bad = host[:n_comp + n_norm], host[n_comp + n_norm], host[n_comp + n_norm + 1], \
            host[n_comp + n_norm + 2]
        first_values = host[n_comp + n_norm + 3: 2 * (n_comp + n_norm) + 3]
        self._stop_agreed = self._stop_agreed or stop > 0
        names = ("dino_local", "dino_global", "ibot", "koleo", "total")
        present = [k for k in GRAD_NORM_MODULES if getattr(self.student, k) is not None]
        new_bad = int(bad_count) - self.nonfinite_skipped
        if new_bad > 0:
            values = dict(zip(names, first_values[:n_comp]))
            norms = {f"grad_norm/{k}": v for k, v in zip(GRAD_NORM_MODULES, first_values[n_comp:]) if k in present}
            bad = [k for k, v in {**values, **norms}.items() if not math.isfinite(v)]
            self._first_bad.fill_(-1)
            # The step was already skipped on the device; _nonfinite records it (and raises in error mode).
            self._nonfinite(int(first_bad), bad, {**values, **norms}, skipped_on_device=True)
            self.nonfinite_skipped = int(bad_count)
        metrics = {**dict(zip(names, head[:n_comp])),
                   "grad_norm": {k: v for k, v in zip(GRAD_NORM_MODULES, head[n_comp:]) if k in present}}
        if self._last_teacher_metrics is not None:
            entropy, distinct, ibot_entropy = host[-3:]
            metrics.update(teacher_entropy=entropy, teacher_distinct_prototypes=int(distinct),
                           ibot_teacher_entropy=ibot_entropy)
        if n_masked is not None:
            metrics["n_masked"] = n_masked
        return metrics

    def _nonfinite(self, it: int, bad: list[str], values: dict, skipped_on_device: bool = False) -> dict:
        message = (f"non-finite {', '.join(bad)} at iteration {it} "
                   f"({', '.join(f'{k}={v:.6g}' for k, v in values.items())})")
        self._write_metrics({"iteration": it, "event": "nonfinite", "components": bad, **values})
        if self.cfg.train.on_nonfinite == "error":
            last = self._last_ckpt_iteration
            where = f"; last good checkpoint: iteration {last} in {self.ckpt_dir}" if last is not None else ""
            raise NonFiniteLossError(message + where)
        self.optimizer.zero_grad(set_to_none=True)
        self.nonfinite_skipped += 1
        log.warning("skipping the step: %s", message)
        return {**values, "skipped_step": True}

    # -- logging ----------------------------------------------------------------------------------------------
    def _write_metrics(self, record: dict) -> None:
        self.metrics_log.write(record)

    def _log_record(self, it: int, metrics: dict, timing: dict) -> dict:
        return iteration_record(it, self.schedules.at(it), metrics, timing,
                                (it + 1) * self.global_batch_size / len(self.table), self.skipped_total,
                                self.nonfinite_skipped, self.device)

    def _cuda_event(self) -> torch.cuda.Event | None:
        """A timing event recorded on this device's current stream (None on the CPU)."""
        if self.device.type != "cuda":
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    # -- hooks ------------------------------------------------------------------------------------------------
    def teacher_backbone_state(self) -> dict[str, Tensor] | None:
        """Full teacher backbone weights on rank 0 (None elsewhere); a collective under FSDP."""
        if not (self.is_main or self.sharded):
            return None
        state = parallel.full_state_dict(self.teacher) if self.sharded else self.teacher.state_dict()
        if not self.is_main:
            return None
        return {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}

    def export(self, path: Path | None = None) -> Path | None:
        """Teacher backbone export (rank 0 writes; call on every rank: FSDP gathers first)."""
        backbone = self.teacher_backbone_state()
        if not self.is_main:
            return None
        if path is None:
            path = self.out_dir / "exports" / f"dinodepth_{self.iteration:08d}.pth"
        meta = self.train_meta()
        return export_lib.write_export(path, backbone, self.teacher_vit_cfg.to_dict(), self.input_norm(), meta)

    @torch.no_grad()
    def evaluate_pca(self) -> Path | None:
        """PCA of teacher patch features of a few fixed samples → ``eval/pca_<it>.png`` (rank 0).

        Call on every rank: under FSDP the teacher backbone is gathered into a plain copy first."""
        if self.cfg.train.eval_num_images <= 0:
            return None
        backbone = self.teacher.backbone
        if self.sharded:
            state = self.teacher_backbone_state()
            if not self.is_main:
                return None
            backbone = vit_from_config(self.teacher_vit_cfg).to(self.device)
            backbone.load_state_dict(state)
        if not self.is_main:
            return None
        inputs = fixed_eval_inputs(self.cfg, self.table, self.cfg.train.eval_num_images)
        if inputs is None:
            return None
        image = pca_feature_image(backbone, inputs.to(self.device), self._autocast)
        return write_pca_image(self.out_dir, self.iteration, image)

    def _handle_signal(self, signum, _frame) -> None:
        self._stop_signal = signum
        # Every rank reports (which rank got the signal matters when debugging). os.write, not print or
        # logging: a handler that interrupts a buffered write to the same stream would re-enter it.
        os.write(2, f"[rank {self.rank}] received {signal.Signals(signum).name}: checkpoint at the end of the "
                    "next agreed iteration, then exit\n".encode())

    # -- main loop ------------------------------------------------------------------------------------------
    def run(self) -> dict:
        cfg = self.cfg
        T = self.schedules.total_iterations
        end = T if cfg.train.stop_at_iteration is None else min(T, cfg.train.stop_at_iteration)
        start = self.iteration
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out_dir / "config.yaml")
            self.metrics_log.truncate(start)
            if cfg.train.tensorboard:
                self.metrics_log.open_tensorboard()
        previous_handlers = {}
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                previous_handlers[sig] = signal.signal(sig, self._handle_signal)
        n_params = sum(p.numel() for p in self.student.parameters())
        log.info("DINO-Depth pretraining: %s, %.1fM student parameters, G=%d (B=%d × W=%d, %s), iterations %d→%d of "
                 "%d, device %s (%s)", cfg.data.modality, n_params / 1e6, self.global_batch_size,
                 cfg.train.batch_size_per_gpu, self.world_size, self.strategy, start, end, T, self.device,
                 self.precision)
        status = "finished" if start >= T else "stopped"
        last_metrics: dict = {}
        progress = None
        try:
            if start < end:
                # The prefetcher pins each batch itself and sends it one step ahead on a side stream (CUDA),
                # then makes the crops of device-warp batches; the DataLoader must not pin a second time.
                loader = DevicePrefetcher(build_loader(self.dataset, start, end, cfg.train.num_workers,
                                                       pin_memory=False, generator_seed=cfg.train.seed),
                                          self.device, cfg.aug.interp, cfg.aug.edge_thresh)
                if cfg.train.progress and self.is_main:
                    from tqdm import tqdm

                    progress = tqdm(total=end, initial=start, desc="pretrain", dynamic_ncols=True, smoothing=0.1)
                self.student.train()
                self.teacher.eval()
                period_time, period_data, period_n = 0.0, 0.0, 0
                period_start = self._cuda_event()
                t_prev = time.perf_counter()
                for it, batch in zip(range(start, end), loader):
                    t_data = time.perf_counter() - t_prev
                    if batch["iteration"] != it:
                        raise RuntimeError(f"loader delivered iteration {batch['iteration']} for {it}")
                    self.skipped_total += int(batch["skipped"])
                    n = it + 1
                    log_step = it % cfg.train.log_period == 0 or n == end
                    # The host must see this step's values (device guard) when it logs, writes files, hands
                    # the trainer to a hook, or polls the stop flag; otherwise the device runs ahead.
                    read_back = (log_step or self.on_iteration_end is not None or n % STOP_POLL_PERIOD == 0
                                 or (cfg.train.ckpt_period > 0 and n % cfg.train.ckpt_period == 0)
                                 or (cfg.train.export_period > 0 and n % cfg.train.export_period == 0)
                                 or (cfg.train.eval_period > 0 and n % cfg.train.eval_period == 0))
                    metrics = self.train_step(batch, it, read_back=read_back)
                    self.iteration = n
                    # No synchronize: the host runs ahead of the device; the period's mean time is exact
                    # because every log step's read-back (one .tolist()) waits for the device.
                    t_now = time.perf_counter()
                    period_time += t_now - t_prev
                    period_data += t_data
                    period_n += 1
                    if metrics:
                        last_metrics = metrics
                    if log_step:
                        gpu_time = None
                        if period_start is not None:  # the log step's read-back already waited for the device
                            period_end = self._cuda_event()
                            period_end.synchronize()
                            gpu_time = period_start.elapsed_time(period_end) / 1000.0 / period_n
                            period_start = period_end
                        record = self._log_record(it, metrics, {"time": period_time / period_n,
                                                                "data": period_data / period_n, "gpu": gpu_time})
                        self.metrics_tail = record
                        self._write_metrics(record)
                        probes_lib.observe_log_record(self, record)  # [probes] collapse warning
                        period_time, period_data, period_n = 0.0, 0.0, 0
                        if progress is not None:
                            progress.set_postfix(loss=f"{record['total']:.3f}", dino=f"{record['dino_local'] + record['dino_global']:.3f}",
                                                 ibot=f"{record['ibot']:.3f}", koleo=f"{record['koleo']:.3f}",
                                                 H_t=f"{record['teacher_entropy']:.2f}", refresh=False)
                    if progress is not None:
                        progress.update(1)
                    if self._stop_agreed:  # this or another rank got a stop signal (train_step's all-reduce)
                        status = "preempted"
                        self.save_checkpoint()
                        # No rank may exit before rank 0 has written the checkpoint: `srun
                        # --kill-on-bad-exit` would kill rank 0 as soon as another rank exits with 75.
                        dist_utils.barrier()
                        break
                    if cfg.train.ckpt_period > 0 and self.iteration % cfg.train.ckpt_period == 0:
                        self.save_checkpoint()
                    if cfg.train.export_period > 0 and self.iteration % cfg.train.export_period == 0 and self.iteration < T:
                        self.export()
                    if cfg.train.eval_period > 0 and self.iteration % cfg.train.eval_period == 0:
                        self.evaluate_pca()
                        probes_lib.run_probes(self)  # [probes] every eval_period
                    if self.on_iteration_end is not None:  # after the iteration's checkpoint/export/eval
                        self.on_iteration_end(self, metrics)
                    t_prev = time.perf_counter()
                del loader
            if status != "preempted":
                status = "finished" if self.iteration >= T else "stopped"
                if self._last_ckpt_iteration != self.iteration:
                    self.save_checkpoint()
                if status == "finished":
                    self.export(self.out_dir / "dinodepth.pth")
                    if cfg.train.eval_period > 0:
                        self.evaluate_pca()
                        if self.iteration % cfg.train.eval_period:  # [probes] at the end (unless just done)
                            probes_lib.run_probes(self)
                dist_utils.barrier()  # every file of rank 0 is written before any rank returns
        except Exception as exc:
            if self.world_size > 1 and dist_utils.is_collective_error(exc):
                last = self._last_ckpt_iteration
                where = f"iteration {last} in {self.ckpt_dir}" if last is not None else "none yet"
                cause = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise dist_utils.DistributedFailure(
                    f"rank {self.rank}/{self.world_size}: a collective failed during iteration {self.iteration}: "
                    f"another rank probably crashed (see its log) or did not answer within dist.timeout_s="
                    f"{cfg.dist.timeout_s} s. Last checkpoint: {where}. Cause: {cause}") from exc
            raise
        finally:
            if progress is not None:
                progress.close()
            for sig, handler in previous_handlers.items():
                signal.signal(sig, handler)
            self.metrics_log.close()
        log.info("%s at iteration %d/%d", status, self.iteration, T)
        return {"status": status, "iteration": self.iteration, "total_iterations": T, "last": last_metrics,
                "metrics_tail": self.metrics_tail, "out_dir": str(self.out_dir)}


def train(cfg: PretrainConfig, table: SampleSource | None = None, resume: bool | str = True,
          allow_data_change: bool = False, on_iteration_end: Callable | None = None) -> dict:
    """Build a :class:`Trainer` and run it (the API the tests and the SLURM launcher use)."""
    trainer = Trainer(cfg, table=table, resume=resume, allow_data_change=allow_data_change,
                      on_iteration_end=on_iteration_end)
    return trainer.run()


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, PretrainConfig]:
    args = train_parser().parse_args(argv)
    cfg = load_config(PretrainConfig, args.config, args.overrides)
    return args, cfg


def _log_error(message: str, rank: int, exc: BaseException | None = None) -> None:
    """Errors are printed by every rank (the log filter keeps only rank 0's lines); the traceback
    of ``exc`` only under ``--debug`` / ``DINODEPTH_DEBUG=1`` (:mod:`shared.cli`)."""
    if rank == 0:
        log.error("%s", message)
    else:
        print(f"[rank {rank}] ERROR {message}", file=sys.stderr, flush=True)
    if exc is not None and debug_enabled():
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)


def configure_determinism(deterministic: bool) -> None:
    """``train.deterministic``: deterministic kernels only, and the cuBLAS workspace setting they need.

    cuBLAS reads ``CUBLAS_WORKSPACE_CONFIG`` when its handle is created (the first matmul), so
    :func:`run_job` calls this before any CUDA work; a user's own value is kept. cuDNN's autotuner
    picks kernels by timing, which may differ between runs: off.
    """
    if not deterministic:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True)


def _set_cpu_threads(denv: dist_utils.DistEnv, device: str) -> None:
    # Several CPU ranks on one machine would each start one thread per core and fight over them.
    if denv.local_world_size > 1 and "OMP_NUM_THREADS" not in os.environ and (
            device == "cpu" or not torch.cuda.is_available()):
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // denv.local_world_size))


def run_job(cfg: PretrainConfig, resume: bool | str = True, allow_data_change: bool = False,
            on_iteration_end: Callable | None = None) -> tuple[int, dict | None]:
    """One rank of a (possibly single-process) job: process group → :class:`Trainer` → exit status.

    The common body of ``python -m pretrain.train``, ``torchrun``, ``srun`` tasks and the submitit
    job (:mod:`pretrain.launch`). Returns ``(exit status, run result or None)``; see the module
    docstring for the statuses. The process group is destroyed on return.
    """
    configure_determinism(cfg.train.deterministic)  # before the process group binds this rank's GPU
    backend = None if cfg.dist.backend == "auto" else cfg.dist.backend
    if backend is None and cfg.train.device == "cpu":
        backend = "gloo"
    try:
        denv = dist_utils.init(backend=backend, timeout_s=cfg.dist.timeout_s, process_group=cfg.dist.process_group)
    except dist_utils.DistributedFailure as exc:
        dist_utils.setup_logging()
        _log_error(str(exc), dist_utils.detect_env().rank)
        return EXIT_DIST_FAILURE, None
    dist_utils.setup_logging()
    _set_cpu_threads(denv, cfg.train.device)
    try:
        result = train(cfg, resume=resume, allow_data_change=allow_data_change, on_iteration_end=on_iteration_end)
    except NonFiniteLossError as exc:
        _log_error(f"divergence: {exc}", denv.rank, exc)
        return EXIT_NONFINITE, None
    except (ConfigError, CheckpointError) as exc:
        _log_error(str(exc), denv.rank, exc)
        return EXIT_ERROR, None
    except dist_utils.DistributedFailure as exc:
        _log_error(str(exc), denv.rank, exc)
        return EXIT_DIST_FAILURE, None
    finally:
        dist_utils.cleanup()
    tail = result["metrics_tail"]
    if tail:
        log.info("last logged: total %.4f (dino %.4f, ibot %.4f, koleo %.4f) at iteration %d",
                 tail["total"], tail["dino_local"] + tail["dino_global"], tail["ibot"], tail["koleo"], tail["iteration"])
    if result["status"] == "preempted":
        log.warning("preempted at iteration %d: checkpoint written; exit status %d = rerun or requeue to resume",
                    result["iteration"], EXIT_REQUEUE)
        return EXIT_REQUEUE, result
    return EXIT_OK, result


def main(argv: list[str] | None = None) -> int:
    try:
        args, cfg = parse_args(argv)
    except ConfigError as exc:  # a missing --config file, an unknown key, a bad value: status 1 (docstring)
        return fail(exc, EXIT_ERROR)
    if args.print_config:
        from shared.config import dump_config

        print(dump_config(cfg), end="")
        return 0
    resume: bool | str = False if args.no_resume else args.resume
    if cfg.train.device == "cpu" or not torch.cuda.is_available():
        from shared.memory import keep_freed_memory

        keep_freed_memory()  # CPU steps otherwise fault in fresh pages for every large temporary (performance.md)
    return run_job(cfg, resume=resume, allow_data_change=args.allow_data_change)[0]


if __name__ == "__main__":
    # User errors that escape main (an unwritable output folder, a full disk) exit 1 without a traceback.
    raise SystemExit(run_main(main, user_errors=(CheckpointError,), status=EXIT_ERROR))
