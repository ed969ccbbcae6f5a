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
``checkpoints/checkpoint_<it>.pth`` + ``checkpoints/latest`` (atomic; last ``train.keep`` kept),
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
from pretrain.loader import MultiCropBatches, SampleSource, build_loader, open_sample_table
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
from pretrain.ssl_model import SSLModel, ema_update, loss_components, mean_entropy, teacher_targets
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
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True)
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

        self.dino_targets, self.ibot_targets = teacher_targets(cfg, self.device)

        if cfg.train.compile:
            self.student.backbone.compile()
            self.teacher.backbone.compile()
        self.strategy = cfg.dist.strategy if self.world_size > 1 else "single"
        if self.strategy == "fsdp" and self.precision == "fp16":
            # A GradScaler would check only this rank's gradient shards for inf: ranks could disagree on
            # skipping a step. bf16 needs no scaler.
            raise ConfigError("dist.strategy=fsdp supports train.precision bf16 or fp32, not fp16")
        self.student_forward: nn.Module = self.student
        if self.world_size > 1:
            self.student_forward = parallel.wrap_models(self.student, self.teacher, cfg.dist.strategy, self.device,
                                                        cfg.dist.fsdp_reshard_after_forward)
        self.sharded = parallel.is_sharded(self.student)

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
        self.dataset = MultiCropBatches(cfg, self.table, self.global_batch_size, self.rank, self.world_size)
        self.dataset.position_offset = self.position_offset

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
    def checkpoint_state(self) -> dict:
        """The full training state; under FSDP a collective (gathers shards): call it on every rank."""
        return {
            "format_version": CHECKPOINT_FORMAT_VERSION,
            "iteration": self.iteration,
            "config": {**to_dict(self.cfg), "runtime": {"global_batch_size": self.global_batch_size,
                                                        "world_size": self.world_size}},
            "arch": self.teacher_vit_cfg.to_dict(),
            "input_norm": self.input_norm(),
            "train_meta": self.train_meta(),
            "student": parallel.full_state_dict(self.student),
            "teacher": parallel.full_state_dict(self.teacher),
            "centers": {"dino": self.dino_targets.center.clone(), "ibot": self.ibot_targets.center.clone()},
            "optimizer": parallel.full_optimizer_state(optimizer_state_by_name(self.optimizer)),
            "grad_scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "schedule": {"global_batch_size": self.schedule_batch_size},
            "rng": get_rng_state(),
            "data_state": {"seed": self.cfg.train.seed, "position": self.position_offset
                           + self.iteration * self.global_batch_size, "fingerprint": self.fingerprint,
                           "table_size": len(self.table), "skipped_total": self.skipped_total},
            "counters": {"nonfinite_skipped": self.nonfinite_skipped},
            "metrics_tail": self.metrics_tail,
        }

    def save_checkpoint(self) -> Path | None:
        """Atomically write ``checkpoint_<it>.pth``, move ``latest``, prune to the last ``keep`` (rank 0).

        Call on every rank: under FSDP the full tensors are gathered first (a collective)."""
        state = self.checkpoint_state() if self.is_main or self.sharded else None
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
        set_rng_state(ckpt["rng"])
        self._last_ckpt_iteration = self.iteration
        log.info("resumed from %s at iteration %d", path, self.iteration)

    # -- one iteration ----------------------------------------------------------------------------------------
    def train_step(self, batch: dict, it: int) -> dict:
        """Forward, losses, guard, backward, clip, step, EMA, centers. Returns the iteration's metrics."""
        cfg = self.cfg
        dev = self.device
        nb = dev.type == "cuda"
        globals_ = batch["global_crops"].to(dev, non_blocking=nb)
        locals_ = batch["local_crops"].to(dev, non_blocking=nb)
        masks = batch["masks"].to(dev, non_blocking=nb)
        mask_indices = batch["mask_indices"].to(dev, non_blocking=nb)
        mask_weights = batch["mask_weights"].to(dev, non_blocking=nb)
        B = globals_.shape[0] // 2
        n_crops = 2 + locals_.shape[0] // B
        sched = self.schedules.at(it)
        temp = sched["teacher_temp"]

        # Teacher targets (fp32 from here on).
        with self._autocast():
            t_cls, t_patch = self.teacher.teacher_logits(globals_, mask_indices)
        t_cls, t_patch = t_cls.float(), t_patch.float()
        p_cls = self.dino_targets(t_cls, temp)
        p_patch = self.ibot_targets(t_patch, temp)

        # Student.
        with self._autocast():
            out = self.student_forward(globals_, locals_, masks, mask_indices)
        components = loss_components(cfg, out, p_cls, p_patch, masks, mask_weights, n_crops)
        total = components["total"]
        # One small all-reduce per iteration: the rank-mean of the components (what the gradient
        # average optimises: the global-batch loss) plus "some rank got a stop signal". Every rank then
        # takes the same decisions (skip / stop on a non-finite loss, checkpoint and exit on a signal);
        # a rank deciding alone would leave the others waiting in the next collective.
        stop_flag = torch.tensor([float(self._stop_signal is not None)], device=dev)
        reduced = dist_utils.all_reduce(torch.cat([torch.stack([v.detach().float() for v in components.values()]),
                                                   stop_flag]), op="sum").tolist()
        self._stop_agreed = reduced[-1] > 0
        values = {name: v / self.world_size for name, v in zip(components, reduced[:-1])}
        bad = [name for name, v in values.items() if not math.isfinite(v)]
        if bad:
            return self._nonfinite(it, bad, values)

        # Backward, clipping per submodule, optimizer step.
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(total).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            total.backward()
        grad_norms = {}
        clip = cfg.optim.clip_grad if cfg.optim.clip_grad > 0 else float("inf")
        for name in ("backbone", "dino_head", "ibot_head"):
            module = getattr(self.student, name)
            if module is not None:
                grad_norms[name] = parallel.scalar(torch.nn.utils.clip_grad_norm_(module.parameters(), clip))
        if self.scaler is None:
            bad = [f"grad_norm/{k}" for k, v in grad_norms.items() if not math.isfinite(v)]
            if bad:
                self.optimizer.zero_grad(set_to_none=True)
                return self._nonfinite(it, bad, {**values, **{f"grad_norm/{k}": v for k, v in grad_norms.items()}})
        apply_schedules(self.optimizer, self.schedules, it)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        ema_update(self.teacher, self.student, sched["momentum"])
        self.dino_targets.update(t_cls)
        self.ibot_targets.update(t_patch)

        return {
            **values,
            "grad_norm": grad_norms,
            "teacher_entropy": mean_entropy(p_cls),
            "teacher_distinct_prototypes": int(p_cls.argmax(dim=-1).unique().numel()),
            "ibot_teacher_entropy": mean_entropy(p_patch),
            "n_masked": int(mask_indices.numel()),
        }

    def _nonfinite(self, it: int, bad: list[str], values: dict) -> dict:
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

    # -- hooks ------------------------------------------------------------------------------------------------
    def _teacher_backbone_state(self) -> dict[str, Tensor] | None:
        """Full teacher backbone weights on rank 0 (None elsewhere); a collective under FSDP."""
        if not (self.is_main or self.sharded):
            return None
        state = parallel.full_state_dict(self.teacher) if self.sharded else self.teacher.state_dict()
        if not self.is_main:
            return None
        return {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}

    def export(self, path: Path | None = None) -> Path | None:
        """Teacher backbone export (rank 0 writes; call on every rank: FSDP gathers first)."""
        backbone = self._teacher_backbone_state()
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
            state = self._teacher_backbone_state()
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
                loader = build_loader(self.dataset, start, end, cfg.train.num_workers, pin_memory=self.device.type == "cuda",
                                      generator_seed=cfg.train.seed)
                if cfg.train.progress and self.is_main:
                    from tqdm import tqdm

                    progress = tqdm(total=end, initial=start, desc="pretrain", dynamic_ncols=True, smoothing=0.1)
                self.student.train()
                self.teacher.eval()
                period_time, period_data, period_n = 0.0, 0.0, 0
                t_prev = time.perf_counter()
                for it, batch in zip(range(start, end), loader):
                    t_data = time.perf_counter() - t_prev
                    if batch["iteration"] != it:
                        raise RuntimeError(f"loader delivered iteration {batch['iteration']} for {it}")
                    self.skipped_total += int(batch["skipped"])
                    metrics = self.train_step(batch, it)
                    self.iteration = it + 1
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    t_now = time.perf_counter()
                    period_time += t_now - t_prev
                    period_data += t_data
                    period_n += 1
                    last_metrics = metrics
                    if it % cfg.train.log_period == 0 or self.iteration == end:
                        record = self._log_record(it, metrics, {"time": period_time / period_n,
                                                                "data": period_data / period_n})
                        self.metrics_tail = record
                        self._write_metrics(record)
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
    backend = None if cfg.dist.backend == "auto" else cfg.dist.backend
    if backend is None and cfg.train.device == "cpu":
        backend = "gloo"
    try:
        denv = dist_utils.init(backend=backend, timeout_s=cfg.dist.timeout_s)
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
