"""Data-parallel student and teacher: DDP (default) or FSDP2 (``../shared/spec/dino_depth.md`` §10).

Every rank holds the same student and teacher and processes its own B of the G = B·W samples.

* **DDP** (``dist.strategy: ddp``, right for ViT-S/B): the student (backbone + heads) is wrapped in
  :class:`~torch.nn.parallel.DistributedDataParallel`, which averages the gradients over the ranks
  in backward. Each rank's loss is a mean over its own rows, so the averaged gradient is the gradient
  of the global-batch loss. The teacher stays a plain module: it is updated by EMA from identical
  student weights, hence stays identical on every rank without any communication.
* **FSDP2** (``dist.strategy: fsdp``, for larger backbones): student *and* teacher are sharded the
  same way with ``fully_shard`` (each transformer block, each head, the rest at the root), so the EMA
  runs on the local shards without communication and the teacher's ``teacher_logits`` all-gathers
  like ``forward`` does. Gradients are reduce-scattered (averaged) by FSDP.

Checkpoints are world-size agnostic in both cases: :func:`full_state_dict` and
:func:`full_optimizer_state` gather full tensors (collectives: call them on **every** rank under
FSDP), and :func:`load_full_state_dict` / :func:`shard_optimizer_state` cut a full checkpoint back
into this run's shards. Under DDP they are plain state dicts. Under FSDP the checkpoint's tensors
normally go through ``torch.distributed.checkpoint`` instead (:func:`save_sharded`: every rank writes
its own shards, nothing is gathered; :func:`load_sharded_full` reads them back full, any world size).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "checkpoint_activations",
    "full_optimizer_state",
    "full_state_dict",
    "full_value",
    "is_sharded",
    "load_full_state_dict",
    "local_tensor",
    "reshard",
    "load_sharded_full",
    "save_sharded",
    "scalar",
    "sharded_tensors",
    "shard_optimizer_state",
    "wrap_models",
]


def _dtensor_cls():
    from torch.distributed.tensor import DTensor

    return DTensor


def is_sharded(module: nn.Module) -> bool:
    """True if the module's parameters are FSDP2 DTensor shards."""
    dtensor = _dtensor_cls()
    return any(isinstance(p, dtensor) for p in module.parameters())


def wrap_models(student: nn.Module, teacher: nn.Module, strategy: str, device: torch.device,
                reshard_after_forward: bool = True, param_dtype: torch.dtype | None = None) -> nn.Module:
    """Prepare student and teacher for data-parallel training; return the module to call forward on.

    Needs an initialised process group (one rank is fine: ``dist.process_group=always``). DDP: returns the DDP wrapper (``student`` itself
    stays the plain module: state dicts, EMA and clipping use it). FSDP: shards ``student`` and
    ``teacher`` in place and returns ``student``. Build the optimizer **after** this call (FSDP
    replaces the parameters by DTensors). ``param_dtype`` (FSDP, bf16 training): parameters are
    all-gathered in that dtype (half the traffic of fp32) while gradients are reduced in fp32
    (``MixedPrecisionPolicy``); the sharded parameters and the optimizer stay fp32.
    """
    if strategy == "ddp":
        import inspect

        from torch.nn.parallel import DistributedDataParallel

        # No buffer sync before each forward: the backbone has no running statistics, and a
        # per-forward buffer broadcast would be a wasted collective (newer torch names the option
        # forward_sync_buffers; it still syncs once at construction, which is what we want).
        no_sync = ({"forward_sync_buffers": False}
                   if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
                   else {"broadcast_buffers": False})
        # find_unused_parameters=False: every student parameter receives a gradient every step (the
        # mask token enters through torch.where even when a rank has no masked crop).
        return DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None,
                                       find_unused_parameters=False, **no_sync)
    if strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

        mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
        policy = {} if param_dtype is None else {
            "mp_policy": MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)}
        # The teacher runs forward only: kept gathered after its forward it would stay unsharded through
        # the EMA (plain tensors meeting the student's DTensor shards), so it always reshards;
        # ``reshard_after_forward`` concerns the student, whose backward follows its forward.
        for model, reshard in ((student, reshard_after_forward), (teacher, True)):
            # One FSDP unit per block bounds the gathered-parameter memory to about one block; the
            # heads (the large K-prototype layers) are separate units; patch embedding, tokens and
            # the final norm stay with the root.
            for block in model.backbone.blocks:
                fully_shard(block, mesh=mesh, reshard_after_forward=reshard, **policy)
            for head in (model.dino_head, model.ibot_head):
                if head is not None:
                    fully_shard(head, mesh=mesh, reshard_after_forward=reshard, **policy)
            fully_shard(model, mesh=mesh, reshard_after_forward=reshard, **policy)
        # The teacher is called through teacher_logits, not forward: let FSDP gather around it too.
        register_fsdp_forward_method(teacher, "teacher_logits")
        return student
    raise ValueError(f"dist.strategy {strategy!r} unknown; expected 'ddp' or 'fsdp'")


def checkpoint_activations(blocks: nn.ModuleList) -> None:
    """Activation checkpointing of each block (``torch.utils.checkpoint``, non-reentrant): its
    activations are recomputed in backward. The block's ``forward`` is wrapped in place, so parameter
    names, state dicts and FSDP units stay as they are; the RNG state is replayed in the recomputation
    (same drop-path draws), so loss and gradients equal those without."""
    import functools

    from torch.utils.checkpoint import checkpoint

    for block in blocks:
        inner = block.forward

        @functools.wraps(inner)
        def forward(*args, _inner=inner, **kwargs):
            if not torch.is_grad_enabled():
                return _inner(*args, **kwargs)
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward


def reshard(module: nn.Module) -> None:
    """Free the gathered parameters of every FSDP2 unit of ``module`` (no-op when not sharded).

    Older FSDP2 versions never reshard the root unit after forward, whatever ``reshard_after_forward``
    says; the EMA must see the sharded parameters of student and teacher alike."""
    from torch.distributed.fsdp import FSDPModule

    for sub in module.modules():
        if isinstance(sub, FSDPModule):
            sub.reshard()


def local_tensor(value: Tensor) -> Tensor:
    """This rank's shard of a DTensor, or the tensor itself."""
    return value.to_local() if isinstance(value, _dtensor_cls()) else value


def full_value(value: Any) -> Any:
    """The complete tensor of a DTensor (a collective, no host sync), anything else unchanged."""
    if isinstance(value, _dtensor_cls()):
        return value.full_tensor()
    return value


_full = full_value


def full_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """The module's state dict with every tensor complete, in host memory (all-gathers shards one
    tensor at a time, each moved to the CPU at once: the device never holds the whole model; a
    collective under FSDP)."""
    return {k: _full(v).detach().cpu() for k, v in module.state_dict().items()}


def load_full_state_dict(module: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Load a full (unsharded) state dict into a plain or FSDP-sharded module.

    Every rank read the same checkpoint file, so each cuts its own shard locally
    (``src_data_rank=None``: no scatter from rank 0).
    """
    from torch.distributed.tensor import distribute_tensor

    dtensor = _dtensor_cls()
    current = module.state_dict()
    converted = {}
    for key, value in state.items():
        ref = current.get(key)
        if isinstance(ref, dtensor):
            value = distribute_tensor(value.to(device=ref.device, dtype=ref.dtype), ref.device_mesh, ref.placements,
                                      src_data_rank=None)
        converted[key] = value
    module.load_state_dict(converted)


def full_optimizer_state(state_by_name: dict) -> dict:
    """Gather the DTensor moments of a by-name optimizer state (``pretrain.optim.optimizer_state_by_name``)."""
    return {"state": {name: {k: _full(v) for k, v in entry.items()} for name, entry in state_by_name["state"].items()},
            "param_groups": state_by_name["param_groups"]}


def shard_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict) -> dict:
    """Cut the full moments of a by-name optimizer state into the shards of this run's parameters."""
    from torch.distributed.tensor import distribute_tensor

    dtensor = _dtensor_cls()
    params = {name: p for group in optimizer.param_groups for name, p in zip(group["names"], group["params"])}
    state = {}
    for name, entry in saved["state"].items():
        param = params.get(name)
        if not isinstance(param, dtensor):
            state[name] = entry
            continue
        # Moments have the parameter's shape and get its sharding; scalars (the step count) stay.
        state[name] = {k: distribute_tensor(v.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
                       if isinstance(v, Tensor) and tuple(v.shape) == tuple(param.shape) else v
                       for k, v in entry.items()}
    return {"state": state, "param_groups": saved["param_groups"]}


# -- sharded checkpoints (torch.distributed.checkpoint) -------------------------------------------------------
def sharded_tensors(student: nn.Module, teacher: nn.Module, optimizer_state_by_name: dict) -> dict[str, Tensor]:
    """The tensors of a training checkpoint as one flat dict for ``torch.distributed.checkpoint``:
    ``student/<name>``, ``teacher/<name>``, ``optimizer/<param name>/<key>`` (DTensor shards stay
    shards: each rank writes its own)."""
    out = {f"student/{k}": v for k, v in student.state_dict().items()}
    out.update({f"teacher/{k}": v for k, v in teacher.state_dict().items()})
    for name, entry in optimizer_state_by_name["state"].items():
        out.update({f"optimizer/{name}/{k}": v for k, v in entry.items() if isinstance(v, Tensor)})
    return out


def save_sharded(directory: str, tensors: dict[str, Tensor]) -> None:
    """Every rank writes its shards of ``tensors`` to the DCP folder ``directory`` (a collective)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(tensors, checkpoint_id=directory)


def load_sharded_full(directory: str) -> tuple[dict, dict, dict]:
    """The full (unsharded, CPU) student and teacher state dicts and by-name optimizer moments of a DCP
    folder written by :func:`save_sharded`; any world size, with or without a process group (a
    collective when one exists). Tensors only: nothing is unpickled."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    flat = _load_state_dict_from_keys(checkpoint_id=directory)
    student, teacher, moments = {}, {}, {}
    for key, value in flat.items():
        part, rest = key.split("/", 1)
        if part == "student":
            student[rest] = value
        elif part == "teacher":
            teacher[rest] = value
        elif part == "optimizer":
            name, field = rest.rsplit("/", 1)
            moments.setdefault(name, {})[field] = value
    return student, teacher, moments


def scalar(value: Tensor | float) -> float:
    """A Python float from a plain or DTensor scalar (e.g. a clip_grad_norm_ total norm)."""
    return float(_full(value)) if isinstance(value, Tensor) else float(value)
