"""Data-parallel pretraining: CPU strong scaling over gloo processes, GPU cost of the DDP wrapper.

* **CPU** (always): the training step (forward, losses, backward with DDP gradient all-reduce,
  clipping, AdamW, EMA, center updates) at the same global batch G with 1 process × 1 thread and
  with 2 gloo processes × 1 thread (B = G/2 each). Batches are built before timing (in a real run
  the loader workers make them in parallel), so the figure is compute + communication.
  ``efficiency = t(1 process) / (2 · t(2 processes))``: 1.0 is perfect strong scaling; the rest is
  the gradient all-reduce, the per-step loss/flag all-reduce and the smaller per-rank matmuls.
  Needs two otherwise idle cores to mean anything; ``cpu_work_efficiency`` (CPU seconds of 1
  process / CPU seconds of both ranks) is the load-independent counterpart.
* **GPU** (only with CUDA): ViT-S/14 DINO-Depth step (K = 65,536, bf16, B per GPU 32 quick / 64)
  on one GPU, plain module vs the same module in DDP (a 1-rank NCCL group: bucketing, hooks and a
  one-rank all-reduce, i.e. the wrapper's own overhead). ``ddp_overhead = t(DDP) / t(plain) − 1``.

    python bench/bench_distributed.py [--full]      (or python bench/run.py distributed)
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a script: put the repo root on sys.path instead of the script dir
    import pathlib
    import sys

    sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import argparse
import hashlib
import json
import os
import queue as queue_lib
import socket
import statistics
import tempfile
import time

import numpy as np
import torch

# A small model whose step is long enough (≈ 0.1–0.3 s on one core) for the per-step communication
# to be measured against: embed 96, 4 blocks, K = 256, 2 × 56 px globals + 4 × 28 px locals.
CPU_MODEL = {
    "student.img_size": 56, "student.embed_dim": 96, "student.depth": 4, "student.num_heads": 3,
    "student.drop_path_rate": 0.0, "student.layerscale": "null",
    "dino.head_n_prototypes": 256, "dino.head_bottleneck_dim": 32, "dino.head_hidden_dim": 128,
    "crops.global_crops_size": 56, "crops.local_crops_size": 28, "crops.local_crops_number": 4,
    "train.epoch_length": 1000, "optim.epochs": 1, "train.num_workers": 0, "train.progress": False,
    "train.eval_period": 0, "train.export_period": 0, "train.ckpt_period": 0, "train.log_period": 1000,
    "train.device": "cpu",
}


class SyntheticTable:
    """In-memory depth maps (tilted planes with bumps): the sample-table contract without disk I/O."""

    def __init__(self, n: int, size: tuple[int, int] = (96, 112)) -> None:
        rng = np.random.default_rng(0)
        yy, xx = np.mgrid[0:size[0], 0:size[1]].astype(np.float32)
        self.maps = []
        for _ in range(n):
            z = 500 + rng.uniform(-0.2, 0.2) * xx + rng.uniform(-0.2, 0.2) * yy
            cy, cx, r = rng.uniform(0, size[0]), rng.uniform(0, size[1]), rng.uniform(6, 25)
            z -= rng.uniform(-15, 30) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
            self.maps.append(z.astype(np.float32))

    def __len__(self) -> int:
        return len(self.maps)

    def key(self, i: int) -> str:
        return f"bench/synthetic/train/{i:05d}"

    def read(self, i: int) -> tuple[np.ndarray, dict]:
        return self.maps[i].copy(), {"key": self.key(i), "kind": "metric_z"}

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(str(len(self.maps)).encode()).hexdigest()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _time_steps(trainer, warmup: int, steps: int) -> tuple[list[float], list[float]]:
    """Per-step wall and process-CPU seconds of ``train_step`` on pre-built batches (barrier-aligned
    across ranks). CPU time counts every thread of the process, gloo's included."""
    from shared import distributed as dist_utils

    batches = [trainer.dataset[i] for i in range(warmup + steps)]
    trainer.student.train()
    wall, cpu = [], []
    for i, batch in enumerate(batches):
        dist_utils.barrier()
        if trainer.device.type == "cuda":
            torch.cuda.synchronize(trainer.device)
        t0, c0 = time.perf_counter(), time.process_time()
        trainer.train_step(batch, i)
        if trainer.device.type == "cuda":
            torch.cuda.synchronize(trainer.device)
        dist_utils.barrier()
        if i >= warmup:
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    return wall, cpu


def _cpu_rank(rank: int, world: int, port: int, global_batch: int, warmup: int, steps: int, out_dir: str,
              results) -> None:
    from pretrain.config import PretrainConfig
    from pretrain.train import Trainer
    from shared import distributed as dist_utils
    from shared.config import load_config

    torch.set_num_threads(1)
    environ = {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port)}
    dist_utils.init(backend="gloo", environ=environ, timeout_s=300)
    try:
        overrides = {**CPU_MODEL, "train.batch_size_per_gpu": global_batch // world, "train.output_dir": out_dir}
        cfg = load_config(PretrainConfig, None, [f"{k}={v}" for k, v in overrides.items()])
        trainer = Trainer(cfg, table=SyntheticTable(64))
        wall, cpu = _time_steps(trainer, warmup, steps)
        results.put((rank, (statistics.median(wall), statistics.median(cpu))))
    finally:
        dist_utils.cleanup()


def cpu_step_time(world: int, global_batch: int, warmup: int, steps: int) -> tuple[float, float]:
    """(median wall seconds per step of rank 0, summed median CPU seconds per step of all ranks) with
    ``world`` gloo processes at global batch G."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_cpu_rank, args=(r, world, port, global_batch, warmup, steps, tmp, results))
                 for r in range(world)]
        for p in procs:
            p.start()
        out: dict = {}
        deadline = time.monotonic() + 1800
        while len(out) < world and time.monotonic() < deadline:
            try:
                rank, value = results.get(timeout=1.0)
                out[rank] = value
            except queue_lib.Empty:
                if any(p.exitcode not in (None, 0) for p in procs):  # a rank died: do not wait for it
                    break
        for p in procs:
            p.join(60)
            if p.is_alive():
                p.kill()
    if len(out) < world:
        raise RuntimeError(f"{world}-process benchmark failed: exit codes {[p.exitcode for p in procs]}")
    return out[0][0], sum(v[1] for v in out.values())


def gpu_ddp_overhead(quick: bool) -> dict:
    """ViT-S/14 step on one GPU, plain vs wrapped in DDP (1-rank NCCL group)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from pretrain.config import PretrainConfig
    from pretrain.train import Trainer
    from shared.config import load_config

    batch = 32 if quick else 64
    warmup, steps = (3, 10) if quick else (5, 30)
    overrides = {"train.batch_size_per_gpu": batch, "train.num_workers": 0, "train.progress": False,
                 "train.eval_period": 0, "train.export_period": 0, "train.ckpt_period": 0, "train.log_period": 10**6,
                 "train.device": "cuda", "train.precision": "bf16"}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(PretrainConfig, None, [f"{k}={v}" for k, v in {**overrides, "train.output_dir": tmp}.items()])
        trainer = Trainer(cfg, table=SyntheticTable(256, size=(448, 448)))
        plain, _ = _time_steps(trainer, warmup, steps)
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        dist.init_process_group("nccl", rank=0, world_size=1, device_id=trainer.device)
        try:
            trainer.student_forward = DistributedDataParallel(trainer.student, device_ids=[trainer.device.index],
                                                              find_unused_parameters=False)
            wrapped, _ = _time_steps(trainer, warmup, steps)
        finally:
            dist.destroy_process_group()
        peak_gb = torch.cuda.max_memory_allocated(trainer.device) / 2**30
    t_plain, t_ddp = statistics.median(plain), statistics.median(wrapped)
    return {"gpu": torch.cuda.get_device_name(0), "gpu_batch_per_gpu": batch,
            "gpu_step_s_plain": round(t_plain, 4), "gpu_step_s_ddp": round(t_ddp, 4),
            "gpu_ddp_overhead": round(t_ddp / t_plain - 1, 4),
            "gpu_images_per_s_ddp": round(batch / t_ddp, 1), "gpu_peak_memory_gb": round(peak_gb, 2)}


def run(quick: bool = True) -> dict:
    # Per-step fixed costs (op dispatch, optimizer, EMA: replicated on every rank) dominate this small
    # model below G ≈ 32 on CPU; the figures are for a batch where the per-sample work dominates.
    global_batch = 32 if quick else 64
    warmup, steps = (2, 6) if quick else (3, 20)
    t1, c1 = cpu_step_time(1, global_batch, warmup, steps)
    t2, c2 = cpu_step_time(2, global_batch, warmup, steps)
    result = {
        "cpu_global_batch": global_batch,
        "cpu_step_s_1proc": round(t1, 4),
        "cpu_step_s_2proc": round(t2, 4),
        "cpu_speedup_2proc": round(t1 / t2, 3),
        "cpu_scaling_efficiency": round(t1 / (2 * t2), 3),
        # Work efficiency: CPU seconds of one process / CPU seconds of both ranks for the same G. Unlike
        # the wall-clock figure it is not distorted by other load on the machine.
        "cpu_work_s_1proc": round(c1, 4),
        "cpu_work_s_2proc": round(c2, 4),
        "cpu_work_efficiency": round(c1 / c2, 3),
        "cpu_load_avg_1min": round(os.getloadavg()[0], 2),  # > cpu_count − 2: the wall figures are not clean
    }
    if torch.cuda.is_available():
        result.update(gpu_ddp_overhead(quick))
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="larger batches and more steps")
    args = parser.parse_args()
    print(json.dumps(run(quick=not args.full), indent=2))
