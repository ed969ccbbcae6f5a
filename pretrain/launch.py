"""Submit DINO-Depth pretraining with submitit: SLURM (one or many nodes) or this machine.

    python pretrain/launch.py --config configs/pretrain/dinodepth_vits14.yaml \\
        train.output_dir=/shared/runs/vits14 data.shards=[/shared/shards] \\
        slurm.nodes=2 slurm.gpus_per_node=8 slurm.partition=gpu slurm.timeout_min=2800

Every task runs the trainer's own entry point (:func:`pretrain.train.run_job`, the body of
``python -m pretrain.train``): one process per GPU, rank / world size / rendezvous from the SLURM
variables (:func:`shared.distributed.detect_env`). ``../shared/spec/dino_depth.md`` §10.

Executor (``submitit.AutoExecutor``, folder ``slurm.folder`` or ``<train.output_dir>/submitit``;
``%j`` in the folder becomes the job id):

* SLURM: ``nodes``, ``tasks_per_node`` (``slurm.tasks_per_node``; default ``gpus_per_node``, or 1
  with ``gpus_per_node=0``; ``slurm.gpus_per_node`` is required: no guessed default, unlike
  upstream's 8; ``0`` submits a CPU job with ``tasks_per_node`` gloo ranks per node),
  ``cpus_per_task``, ``timeout_min`` (int),
  ``slurm_signal_delay_s`` (120), partition / account / qos / constraint / mem_gb passthrough,
  ``slurm.setup`` lines before ``srun``, ``slurm_max_num_timeout``.
* ``--cluster local``: one process per visible GPU (``slurm.gpus_per_node`` may ask for fewer,
  never for more: that is an error), or one CPU process without a GPU.

Requeue on timeout or preemption: submitit signals every task ``signal_delay_s`` before the time
limit (SIGUSR2). The trainer catches it, finishes the iteration, all ranks agree, rank 0 writes the
checkpoint of that iteration, and :class:`PretrainJob` hands over to submitit's handler on global
rank 0 only, which calls :meth:`PretrainJob.checkpoint` (a fresh job with the same config) and
requeues; the new job resumes from the newest checkpoint in ``train.output_dir``. A timeout
consumes one of ``slurm.max_num_timeout`` requeues; a preemption does not.

``--rehearse-preemption-at N`` sends that signal to rank 0 of the first attempt at iteration N: a
cheap check of the whole requeue path on a real cluster before a multi-day run.
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a script: put the repo root on sys.path instead of the script dir
    import pathlib
    import sys

    sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

if __name__ == "__main__":  # --help and argument errors answer before torch is imported (pretrain.config)
    from pretrain.cli import launch_parser
    from shared.cli import preparse

    preparse(launch_parser)

import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from pretrain.cli import launch_parser
from pretrain.config import PretrainConfig, validate
from shared import distributed as dist_utils
from shared.cli import debug_enabled, run_main
from shared.config import ConfigError, from_dict, load_config, to_dict

log = logging.getLogger("pretrain.launch")
REPO_ROOT = Path(__file__).resolve().parents[1]


class LaunchError(ValueError):
    """A submission that cannot work (missing GPU count, more GPUs than visible, ...)."""


def _submitit_signal() -> signal.Signals:
    """The signal submitit sends before a timeout / on preemption (SIGUSR2 unless overridden)."""
    from submitit import JobEnvironment

    return getattr(signal, "SIG" + JobEnvironment.USR_SIG)


class _RehearsePreemption:
    """Trainer hook: rank 0 sends itself the submitit signal once it has finished iteration ``at``."""

    def __init__(self, at: int) -> None:
        self.at = at

    def __call__(self, trainer, _metrics: dict) -> None:
        if trainer.iteration == self.at and trainer.rank == 0:
            log.warning("rehearsal: sending %s to rank 0 at iteration %d", _submitit_signal().name, self.at)
            os.kill(os.getpid(), _submitit_signal())


class PretrainJob:
    """The callable submitit pickles and runs in every task; checkpointable (requeue → resume).

    Holds the resolved config as a plain dict (pickles across code versions of the dataclasses).
    """

    def __init__(self, config: dict, allow_data_change: bool = False, rehearse_preemption_at: int | None = None,
                 attempt: int = 0) -> None:
        self.config = config
        self.allow_data_change = allow_data_change
        self.rehearse_preemption_at = rehearse_preemption_at
        self.attempt = attempt

    def __call__(self) -> dict:
        from pretrain.train import EXIT_OK, EXIT_REQUEUE, run_job

        cfg = from_dict(PretrainConfig, self.config)
        hook = _RehearsePreemption(self.rehearse_preemption_at) if self.rehearse_preemption_at is not None else None
        code, result = run_job(cfg, resume=True, allow_data_change=self.allow_data_change, on_iteration_end=hook)
        summary = {"exit_status": code, "attempt": self.attempt,
                   **({k: result[k] for k in ("status", "iteration", "total_iterations", "out_dir")} if result else {})}
        if code == EXIT_REQUEUE:
            self._requeue_through_submitit()
            return summary  # non-zero ranks (and runs outside a submitit job) end here
        if code != EXIT_OK:
            raise RuntimeError(f"pretraining failed with exit status {code} (see pretrain.train's docstring and "
                               f"the task logs); summary {summary}")
        return summary

    def _requeue_through_submitit(self) -> None:
        """Global rank 0: re-raise submitit's signal, now that the checkpoint is on disk.

        The trainer restored submitit's handler when it returned; that handler decides timeout vs
        preemption, calls :meth:`checkpoint`, requeues the job and exits this process.
        """
        from submitit import JobEnvironment

        if JobEnvironment().global_rank != 0:
            return
        sig = _submitit_signal()
        handler = signal.getsignal(sig)
        if not callable(handler):  # not inside a submitit job (DebugExecutor, direct call)
            log.warning("preempted outside a submitit job: not requeued; run the same command again to resume")
            return
        signal.raise_signal(sig)

    def checkpoint(self, *args: Any, **kwargs: Any):
        """Called by submitit on rank 0 before requeueing: a fresh job with the same config.

        The trainer has already written the checkpoint of the last finished iteration; the new
        job's Trainer resumes from the newest checkpoint in ``train.output_dir``.
        """
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(PretrainJob(self.config, self.allow_data_change, None, self.attempt + 1))


# -- submission ------------------------------------------------------------------------------------
def absolutize(cfg: PretrainConfig, base: Path) -> None:
    """Make the config's paths absolute: the job may start in another working directory."""
    def fix(p: str | None) -> str | None:
        if p is None:
            return None
        path = Path(p).expanduser()
        return str(path if path.is_absolute() else base / path)

    cfg.train.output_dir = fix(cfg.train.output_dir)
    cfg.data.shards = [fix(p) for p in cfg.data.shards]
    cfg.data.glob = fix(cfg.data.glob)
    cfg.data.list_file = fix(cfg.data.list_file)
    cfg.slurm.folder = fix(cfg.slurm.folder)


def local_tasks(gpus_per_node: int | None, visible: int) -> tuple[int, int]:
    """(tasks, GPUs) of a local launch: one task per visible GPU; asking for more is an error."""
    if gpus_per_node is None:
        return (visible, visible) if visible else (1, 0)
    if gpus_per_node > visible:
        raise LaunchError(f"slurm.gpus_per_node={gpus_per_node} but only {visible} GPU(s) are visible here "
                          "(CUDA_VISIBLE_DEVICES); a local launch never starts more processes than GPUs")
    return (gpus_per_node, gpus_per_node) if gpus_per_node else (1, 0)


def tasks_per_node(tasks: int | None, gpus: int) -> int:
    """Ranks per node: ``slurm.tasks_per_node`` when set, else one per GPU (1 without GPUs). With GPUs the
    two must agree: every rank drives the GPU of its local rank."""
    if tasks is None:
        return gpus or 1
    if tasks < 1:
        raise LaunchError(f"slurm.tasks_per_node must be >= 1, got {tasks}")
    if gpus and tasks != gpus:
        raise LaunchError(f"slurm.tasks_per_node={tasks} but slurm.gpus_per_node={gpus}: with GPUs every rank "
                          "drives one GPU (leave tasks_per_node unset, or set gpus_per_node=0 for a CPU job)")
    return tasks


def executor_parameters(cfg: PretrainConfig, cluster: str, visible_gpus: int) -> dict:
    """``AutoExecutor.update_parameters`` keyword arguments for ``cluster`` (``slurm``, ``local``, ``debug``)."""
    s = cfg.slurm
    params: dict[str, Any] = {"name": s.job_name, "timeout_min": int(s.timeout_min), "cpus_per_task": s.cpus_per_task}
    if s.mem_gb is not None:
        params["mem_gb"] = s.mem_gb
    if cluster == "slurm":
        if s.gpus_per_node is None:
            raise LaunchError("slurm.gpus_per_node is required for SLURM submissions (one task per GPU; 0: a CPU "
                              "job with one task per node); upstream's default of 8 breaks on other machines")
        # 0 GPUs (a CPU partition, as in tests/test_slurm_real.py): slurm.tasks_per_node (default 1) gloo
        # ranks per node, no GPU request.
        params.update(nodes=s.nodes, tasks_per_node=tasks_per_node(s.tasks_per_node, s.gpus_per_node),
                      slurm_signal_delay_s=s.signal_delay_s)
        if s.gpus_per_node:
            params["gpus_per_node"] = s.gpus_per_node
        for key in ("partition", "account", "qos", "constraint"):
            if getattr(s, key):
                params[f"slurm_{key}"] = getattr(s, key)
        if s.setup:
            params["slurm_setup"] = list(s.setup)
        # srun kills the other tasks when one exits non-zero: a crashed rank never leaves the rest
        # waiting until the collective timeout.
        params["slurm_srun_args"] = ["--kill-on-bad-exit=1"]
        return params
    if s.nodes != 1:
        raise LaunchError(f"--cluster {cluster} runs on this machine: slurm.nodes must be 1, got {s.nodes}")
    tasks, gpus = local_tasks(s.gpus_per_node, visible_gpus)
    params.update(nodes=1, tasks_per_node=tasks_per_node(s.tasks_per_node, gpus) if s.tasks_per_node else tasks,
                  gpus_per_node=gpus)
    if cluster == "local" and s.setup:
        params["local_setup"] = list(s.setup)
    # (The local executor signals 30 s before its timeout; AutoExecutor does not expose that delay.)
    return params


def build_executor(cfg: PretrainConfig, cluster: str | None = None):
    """The configured ``submitit.AutoExecutor`` (``cluster`` None: SLURM if ``sbatch`` exists, else local)."""
    import submitit

    cluster = cluster or submitit.AutoExecutor.which()
    params = executor_parameters(cfg, cluster, dist_utils.visible_gpu_count())  # errors before any side effect
    folder = cfg.slurm.folder or str(Path(cfg.train.output_dir) / "submitit")
    executor = submitit.AutoExecutor(folder=os.path.join(folder, "%j"), cluster=cluster,
                                     slurm_max_num_timeout=cfg.slurm.max_num_timeout,
                                     local_max_num_timeout=cfg.slurm.max_num_timeout)
    executor.update_parameters(**params)
    return executor


def submit(cfg: PretrainConfig, cluster: str | None = None, allow_data_change: bool = False,
           rehearse_preemption_at: int | None = None):
    """Validate, make paths absolute, submit :class:`PretrainJob`; returns the submitit job."""
    validate(cfg)
    if not cfg.train.output_dir:
        raise ConfigError("train.output_dir is required (the run directory, on a file system all nodes share)")
    absolutize(cfg, Path.cwd())
    executor = build_executor(cfg, cluster)
    # The job imports this repository: make it importable wherever the job starts (SLURM exports the
    # submission environment by default; the local executor inherits it).
    paths = [str(REPO_ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    job = executor.submit(PretrainJob(to_dict(cfg), allow_data_change, rehearse_preemption_at))
    return job


def main(argv: list[str] | None = None) -> int:
    parser = launch_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        cfg = load_config(PretrainConfig, args.config, args.overrides)
        job = submit(cfg, None if args.cluster == "auto" else args.cluster, args.allow_data_change,
                     args.rehearse_preemption_at)
    except (ConfigError, LaunchError, ValueError, RuntimeError) as exc:  # RuntimeError: submitit found no srun
        if debug_enabled():
            raise
        log.error("%s", exc)
        return 1
    log.info("submitted job %s; logs: %s", job.job_id, job.paths.stdout)
    print(job.job_id, flush=True)
    if args.wait:
        result = job.result()
        log.info("job %s finished: %s", job.job_id, result)
    return 0


if __name__ == "__main__":
    # Run the importable module's main: submitit pickles PretrainJob by reference (pretrain.launch),
    # which a job can import, instead of by value from __main__.
    from pretrain.launch import main as _main

    sys.exit(run_main(_main, status=1))
