"""Helpers of the distributed tests: spawn W gloo processes on this machine with a free port and a
hard timeout, and run the trainer in each. Imported by the other ``test_distributed_*`` modules
(the spawned children import this module by name, so the worker functions live here)."""

from __future__ import annotations

import hashlib
import os
import queue as queue_lib
import socket
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from test_pretrain_utils import memory_table, tiny_config

REPO = Path(__file__).resolve().parents[1]

# The §16 tiny model, made comparable across world sizes: no stochastic depth (its draws depend on the
# rank's RNG stream) and no KoLeo (its nearest neighbours are searched within each rank's rows).
EXACT = {"student.drop_path_rate": 0, "dino.koleo_loss_weight": 0, "train.epoch_length": 6,
         "optim.warmup_epochs": 0.34, "train.ckpt_period": 3, "train.keep": 5}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn: Callable, rank: int, world: int, port: int, args: tuple, results) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    try:
        results.put((rank, "ok", fn(rank, world, *args)))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which fails the test
        results.put((rank, "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        raise


def spawn(fn: Callable, world: int, *args, timeout_s: float = 120.0) -> dict[int, tuple[str, object]]:
    """Run ``fn(rank, world, *args)`` in ``world`` spawned processes; {rank: ("ok", value) | ("error", text)}.

    Never hangs: processes still alive after ``timeout_s`` are killed and the test fails.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world, port, args, results), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    out: dict[int, tuple[str, object]] = {}
    while len(out) < world and time.monotonic() < deadline:
        try:
            rank, status, value = results.get(timeout=0.5)
            out[rank] = (status, value)
        except queue_lib.Empty:
            if all(not p.is_alive() for p in procs) and results.empty():
                break
    for p in procs:
        p.join(max(0.1, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    if hung:
        pytest.fail(f"ranks {hung} still running after {timeout_s} s (a hang); results so far: {out}")
    return out


def check_ok(results: dict) -> list:
    errors = {r: v for r, (status, v) in results.items() if status != "ok"}
    assert not errors, "\n".join(f"rank {r}: {v}" for r, v in errors.items())
    return [results[r][1] for r in sorted(results)]


def single_process_reference(run: Path, overrides: dict, global_batch: int = 8) -> Path:
    """The same training in one process without a process group, one intra-op thread (the reference the
    multi-rank runs are compared against); returns ``run``."""
    from pretrain.train import Trainer

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        Trainer(tiny_config(run, **overrides, **{"train.batch_size_per_gpu": global_batch}),
                table=memory_table(global_batch)).run()
    finally:
        torch.set_num_threads(previous)
    return run


def train_rank(rank: int, world: int, out_dir: str, overrides: dict, global_batch: int = 8, table_size: int = 8,
               signal_at: int | None = None, fail: tuple[int, int, str] | None = None, timeout_s: int = 60) -> dict:
    """One rank: process group (gloo), Trainer on the in-memory table, run.

    Returns the run result; rank 0 also writes the final full student/teacher weights to
    ``<out_dir>/final_state.pt``. ``signal_at``: rank 0 (only) sends itself SIGUSR1 when it reaches
    that iteration. ``fail=(rank, iteration, "crash" | "hang")``: that rank raises, or sleeps for
    4 × ``timeout_s``, at that iteration.
    """
    import signal

    from pretrain import parallel
    from pretrain.train import Trainer
    from shared import distributed as sd

    cfg = tiny_config(out_dir, **{**overrides, "train.batch_size_per_gpu": global_batch // world,
                                  "dist.timeout_s": timeout_s})
    sd.init(backend="gloo", timeout_s=timeout_s)

    def hook(trainer, _metrics):
        if signal_at is not None and rank == 0 and trainer.iteration == signal_at:
            os.kill(os.getpid(), signal.SIGUSR1)
        if fail is not None and rank == fail[0] and trainer.iteration == fail[1]:
            if fail[2] == "crash":
                raise RuntimeError(f"injected failure on rank {rank}")
            time.sleep(4 * timeout_s)

    try:
        trainer = Trainer(cfg, table=memory_table(table_size), on_iteration_end=hook)
        result = trainer.run()
        # The gather is a collective under FSDP: every rank takes part, rank 0 writes.
        state = {"student": parallel.full_state_dict(trainer.student),
                 "teacher": parallel.full_state_dict(trainer.teacher)}
        if rank == 0:
            torch.save(state, Path(out_dir) / "final_state.pt")
        # Bitwise fingerprints: replicas (DDP student after the step, EMA teacher) must be identical.
        digests = {}
        for key, sd_ in state.items():
            h = hashlib.sha256()
            for name in sorted(sd_):
                h.update(name.encode())
                h.update(sd_[name].detach().cpu().contiguous().numpy().tobytes())
            digests[key] = h.hexdigest()
        return {"status": result["status"], "iteration": result["iteration"], "strategy": trainer.strategy,
                "sharded": trainer.sharded, "sha256": digests}
    finally:
        sd.cleanup()


def test_free_port_is_bindable():
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
