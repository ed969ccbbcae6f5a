"""Process-group discovery and set-up, one code path from a laptop to many SLURM nodes.

Detection order (``../shared/spec/dino_depth.md`` §10): SLURM (``srun`` / submitit) or submitit-local variables →
torchrun variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) →
a single process without any process group. Every collective in the toolkit goes through
:func:`all_reduce`, which is the identity unless a process group with more than one rank exists
(upstream DINOv2 calls ``all_reduce`` unguarded and crashes in a single process).

Failure semantics: the process group is created with a timeout that applies to the rendezvous and to
every collective, so a rank whose peer died or hangs raises (gloo: at once when the peer's socket
closes, or after the timeout; NCCL: the watchdog aborts after the timeout) instead of waiting
forever. :func:`is_collective_error` recognises those errors so callers can re-raise them as
:class:`DistributedFailure` with context.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

DEFAULT_MASTER_PORT = 29500


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = DEFAULT_MASTER_PORT
    source: str = "single"  # "slurm", "torchrun", "submitit-local" or "single"

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class DistributedFailure(RuntimeError):
    """Another rank failed or a collective timed out: this rank stops instead of waiting forever."""


# Substrings of the errors gloo / NCCL / the TCP store raise when a peer died or did not answer in time.
_COLLECTIVE_ERROR_MARKERS = ("gloo", "nccl", "connection closed by peer", "timed out", "timeout",
                             "connection reset", "broken pipe", "processgroup", "watchdog")


def is_collective_error(exc: BaseException) -> bool:
    """True if ``exc`` comes from a failed or timed-out collective (not from this rank's own code)."""
    if isinstance(exc, DistributedFailure):
        return False
    if isinstance(exc, dist.DistError):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _COLLECTIVE_ERROR_MARKERS)


def visible_gpu_count() -> int:
    """CUDA devices this process may use (respects ``CUDA_VISIBLE_DEVICES``); 0 without CUDA."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def expand_slurm_nodelist(nodelist: str) -> list[str]:
    """Expand SLURM's compressed host list: ``"gpu[01-03,07],cpu5"`` → ``[gpu01, gpu02, gpu03, gpu07, cpu5]``.

    Zero padding of ranges is kept; several bracket groups in one name expand as their product
    (``"r[1-2]n[1-2]"`` → ``r1n1, r1n2, r2n1, r2n2``). (Equivalent to ``scontrol show hostnames``,
    which may not be available inside containers.)
    """
    hosts: list[str] = []
    for part in re.findall(r"(?:[^,\[]|\[[^\]]*\])+", nodelist):
        part = part.strip()
        if part:
            hosts.extend(_expand_host(part))
    return hosts


def _expand_host(name: str) -> list[str]:
    m = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", name)
    if not m:
        return [name]
    prefix, ranges, suffix = m.groups()
    heads: list[str] = []
    for rng in ranges.split(","):
        if "-" in rng:
            lo, hi = rng.split("-", 1)
            width = len(lo)
            heads.extend(f"{prefix}{i:0{width}d}" for i in range(int(lo), int(hi) + 1))
        else:
            heads.append(f"{prefix}{rng}")
    tails = _expand_host(suffix) if suffix else [""]
    return [h + t for h in heads for t in tails]


def _slurm_port(job_id: str | None) -> int:
    # A job-dependent port avoids collisions between jobs sharing a node (all ranks agree on it).
    if job_id and job_id.isdigit():
        return 20000 + int(job_id) % 20000
    return DEFAULT_MASTER_PORT


def detect_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Discover rank and world size from SLURM, then torchrun variables, else a single process.

    SLURM is used only when the job step was launched with one task per rank (``SLURM_NTASKS`` and
    ``SLURM_PROCID`` set, as under ``srun`` or submitit); a bare ``sbatch`` shell with torchrun
    inside is recognised by torchrun's own variables taking precedence when both are present.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env and "LOCAL_RANK" in env:
        # torchrun (also when torchrun itself is started inside a SLURM allocation).
        return DistEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env["LOCAL_RANK"]),
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", 1)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", DEFAULT_MASTER_PORT)),
            source="torchrun",
        )
    if env.get("SUBMITIT_EXECUTOR") == "local" and "SUBMITIT_LOCAL_GLOBALID" in env:
        # submitit's LocalExecutor (one machine, one process per task, no SLURM variables).
        world = int(env.get("SUBMITIT_LOCAL_NTASKS", 1))
        return DistEnv(
            rank=int(env["SUBMITIT_LOCAL_GLOBALID"]),
            world_size=world,
            local_rank=int(env.get("SUBMITIT_LOCAL_LOCALID", 0)),
            local_world_size=world,
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT") or _slurm_port(env.get("SUBMITIT_LOCAL_JOB_ID"))),
            source="submitit-local",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and int(env["SLURM_NTASKS"]) >= 1:
        world = int(env["SLURM_NTASKS"])
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        master = env.get("MASTER_ADDR") or (expand_slurm_nodelist(nodelist)[0] if nodelist else "127.0.0.1")
        port = int(env.get("MASTER_PORT") or _slurm_port(env.get("SLURM_JOB_ID")))
        tasks_per_node = _slurm_tasks_per_node(env, world)
        return DistEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=world,
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            local_world_size=tasks_per_node,
            master_addr=master,
            master_port=port,
            source="slurm",
        )
    return DistEnv()


def _slurm_tasks_per_node(env: Mapping[str, str], world: int) -> int:
    raw = env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or ""
    m = re.match(r"(\d+)", raw)
    if m:
        return int(m.group(1))
    nnodes = int(env.get("SLURM_NNODES", env.get("SLURM_JOB_NUM_NODES", 1)) or 1)
    return max(1, world // max(1, nnodes))


def local_device_index(local_rank: int, device_count: int, environ: Mapping[str, str] | None = None) -> int:
    """This rank's CUDA device among the visible ones.

    One GPU per node-local rank (``torchrun --nproc_per_node``, ``--gpus-per-node``): the local rank.
    Clusters that give every task its own GPU (``--gpus-per-task=1``, or a launcher that sets
    ``CUDA_VISIBLE_DEVICES`` per task) show each task one device, numbered 0, whatever its local rank:
    ``local_rank % device_count`` there. Several ranks sharing one GPU fail obscurely in NCCL: refused.
    """
    env = os.environ if environ is None else environ
    if 0 <= local_rank < device_count:
        return local_rank
    visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    one_per_task = env.get("SLURM_GPUS_PER_TASK", "").split(":")[-1] == "1" or len(visible) == device_count == 1
    if one_per_task and device_count > 0:
        return local_rank % device_count
    # Upstream's launcher assumes 8 GPUs per node; several ranks on one GPU fail obscurely in NCCL.
    raise DistributedFailure(
        f"local rank {local_rank} but only {device_count} GPU(s) are visible on this node: start at most one "
        f"process per GPU (torchrun --nproc_per_node, #SBATCH --ntasks-per-node / --gpus-per-node, "
        f"slurm.gpus_per_node), or give each task its own GPU (--gpus-per-task=1)")


def init(backend: str | None = None, environ: Mapping[str, str] | None = None, timeout_s: int = 1800,
         process_group: str = "auto") -> DistEnv:
    """Initialise ``torch.distributed`` when the job has more than one rank; return the environment.

    ``backend`` defaults to NCCL when CUDA is available, else gloo. ``process_group``: ``"auto"`` = a
    single process gets no process group at all (every collective helper is then the identity);
    ``"always"`` = a one-rank group as well, so that DDP and FSDP run (and are tested) on one GPU.
    On CUDA the process is bound to its local GPU (:func:`local_device_index`), which is also passed
    to ``init_process_group`` (``device_id``: NCCL connects eagerly, to the right device).
    """
    if process_group not in ("auto", "always"):
        raise ValueError(f"process_group must be 'auto' or 'always', got {process_group!r}")
    denv = detect_env(environ)
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    device = None
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    try:
        index = local_device_index(denv.local_rank, count, environ)
    except DistributedFailure as exc:
        if backend == "nccl" and denv.is_distributed:
            raise DistributedFailure(f"rank {denv.rank}: {exc}") from None
        index = None  # gloo ranks may share a GPU (or run on the CPU)
    if index is not None:
        torch.cuda.set_device(index)
        device = torch.device("cuda", index)
    want_group = denv.is_distributed or process_group == "always"
    if not want_group or (dist.is_available() and dist.is_initialized()):
        return denv
    import datetime
    import inspect

    kwargs = {}
    if backend == "nccl" and device is not None and "device_id" in inspect.signature(dist.init_process_group).parameters:
        kwargs["device_id"] = device
    if denv.is_distributed:
        os.environ.setdefault("MASTER_ADDR", denv.master_addr)
        os.environ.setdefault("MASTER_PORT", str(denv.master_port))
        kwargs["init_method"] = f"tcp://{denv.master_addr}:{denv.master_port}"
    else:  # one rank: an in-process store, no port to bind or to collide with another job's
        kwargs["store"] = dist.HashStore()
    try:
        dist.init_process_group(
            backend=backend,
            rank=denv.rank,
            world_size=denv.world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
            **kwargs,
        )
    except (RuntimeError, dist.DistError) as exc:  # e.g. DistStoreError: a peer never showed up
        raise DistributedFailure(
            f"rank {denv.rank}/{denv.world_size}: rendezvous at {denv.master_addr}:{denv.master_port} "
            f"({denv.source} variables) failed within {timeout_s} s: {exc}") from exc
    log.info("process group up: rank %d/%d via %s (%s), collective timeout %d s", denv.rank, denv.world_size,
             denv.source, backend, timeout_s)
    return denv


def cleanup() -> None:
    """Destroy the process group if one exists."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_initialized() -> bool:
    """A process group exists (possibly a one-rank one: ``init(process_group="always")``)."""
    return dist.is_available() and dist.is_initialized()


def is_enabled() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce if a multi-rank process group exists; identity otherwise.

    ``op``: ``"sum"``, ``"max"``, ``"min"`` or ``"mean"``. Returns the tensor for chaining.
    """
    if not is_enabled():
        return tensor
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN, "mean": dist.ReduceOp.SUM}
    if op not in ops:
        raise ValueError(f"unknown reduction {op!r}")
    dist.all_reduce(tensor, op=ops[op])
    if op == "mean":
        tensor /= dist.get_world_size()
    return tensor


def all_gather_object(obj: object) -> list:
    """Every rank's ``obj``, in rank order (pickled; small objects only); ``[obj]`` without a group."""
    if not is_enabled():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if is_enabled():
        dist.barrier()


def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Copy parameters and buffers of rank ``src`` to every rank (start-up synchronisation)."""
    if not is_enabled():
        return
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src=src)


def print_main(*args, **kwargs) -> None:
    """``print`` on global rank 0 only."""
    if is_main_process():
        print(*args, **kwargs, flush=True)


class _MainRankFilter(logging.Filter):
    # The rank is fixed when logging is set up: after the process group is destroyed every process
    # would otherwise report rank 0 and the last lines of a run would appear once per rank.
    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:  # noqa: A003 - logging API name
        return self.rank == 0


def setup_logging(level: int = logging.INFO, all_ranks: bool = False) -> None:
    """Configure root logging; non-zero ranks are silenced unless ``all_ranks``."""
    root = logging.getLogger()
    handler = logging.StreamHandler()
    rank = get_rank()
    prefix = f"[rank {rank}] " if get_world_size() > 1 else ""
    handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    if not all_ranks:
        handler.addFilter(_MainRankFilter(rank))
        # Python warnings (config differences on resume, ...) would otherwise print once per rank.
        logging.captureWarnings(True)
    root.handlers[:] = [handler]
    root.setLevel(level)
