"""Rank discovery (SLURM, torchrun, single) and guarded collectives."""

import socket

import pytest
import torch
import torch.multiprocessing as mp

from shared import distributed as sd


def test_single_process_defaults():
    env = sd.detect_env({})
    assert (env.rank, env.world_size, env.local_rank, env.source) == (0, 1, 0, "single")
    assert not env.is_distributed and env.is_main
    assert sd.init(environ={}) == env  # no process group is created
    assert not torch.distributed.is_initialized()
    t = torch.tensor([1.0, 2.0])
    assert sd.all_reduce(t, "sum") is t and t.tolist() == [1.0, 2.0]
    assert sd.get_rank() == 0 and sd.get_world_size() == 1 and sd.is_main_process()


def test_slurm_variables_are_parsed():
    env = sd.detect_env({
        "SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NNODES": "2",
        "SLURM_TASKS_PER_NODE": "4(x2)", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "123456",
    })
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (5, 8, 1, 4)
    assert env.master_addr == "gpu07" and env.source == "slurm"
    assert env.master_port == 20000 + 123456 % 20000


def test_torchrun_variables_take_precedence():
    env = sd.detect_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.1",
                         "MASTER_PORT": "1234", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"})
    assert (env.rank, env.world_size, env.master_addr, env.master_port, env.source) == (1, 2, "10.0.0.1", 1234, "torchrun")


@pytest.mark.parametrize("nodelist,hosts", [
    ("node1", ["node1"]),
    ("gpu[01-03,07]", ["gpu01", "gpu02", "gpu03", "gpu07"]),
    ("a[8-10],b5,c[1,3]", ["a8", "a9", "a10", "b5", "c1", "c3"]),
])
def test_nodelist_expansion(nodelist, hosts):
    assert sd.expand_slurm_nodelist(nodelist) == hosts


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, queue) -> None:
    env = {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    sd.init(backend="gloo", environ=env, timeout_s=60)
    try:
        t = torch.tensor([float(rank + 1)])
        sd.all_reduce(t, "sum")
        m = torch.tensor([float(rank)])
        sd.all_reduce(m, "max")
        module = torch.nn.Linear(2, 2)
        torch.nn.init.constant_(module.weight, float(rank))
        sd.broadcast_module(module)
        queue.put((rank, t.item(), m.item(), module.weight.sum().item()))
    finally:
        sd.cleanup()


def test_two_process_gloo_collectives():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    results = sorted(queue.get(timeout=5) for _ in procs)
    assert results == [(0, 3.0, 1.0, 0.0), (1, 3.0, 1.0, 0.0)]


def test_local_device_index_one_gpu_per_task():
    from shared.distributed import DistributedFailure, local_device_index

    assert local_device_index(3, 8, {}) == 3  # one GPU per local rank (torchrun, --gpus-per-node)
    # --gpus-per-task=1: every task sees its own GPU as device 0, whatever its local rank.
    assert local_device_index(5, 1, {"SLURM_GPUS_PER_TASK": "1"}) == 0
    assert local_device_index(2, 1, {"CUDA_VISIBLE_DEVICES": "6"}) == 0
    with pytest.raises(DistributedFailure, match="at most one process per GPU"):
        local_device_index(1, 1, {})  # two ranks, one shared GPU
    with pytest.raises(DistributedFailure, match="at most one process per GPU"):
        local_device_index(4, 2, {"CUDA_VISIBLE_DEVICES": "0,1"})


def test_local_device_index_without_gpus_is_refused():
    from shared.distributed import DistributedFailure, local_device_index

    with pytest.raises(DistributedFailure, match="only 0 GPU"):
        local_device_index(0, 0, {"SLURM_GPUS_PER_TASK": "1"})
