"""Multi-rank GPU paths of the pretraining loop on CPU with gloo (issue 21 part B): the FSDP2 EMA with
and without ``dist.fsdp_reshard_after_forward``, FSDP checkpoints through ``torch.distributed.checkpoint``
and their resume, DDP and FSDP on a one-rank process group."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from test_distributed_ddp import assert_losses_close, assert_weights_close, steps
from test_distributed_utils import EXACT, check_ok, single_process_reference, spawn, train_rank
from test_pretrain_utils import memory_table, tiny_config

from pretrain.train import Trainer

SHORT = {**EXACT, "train.epoch_length": 3, "train.log_period": 1}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """One process without a process group, G = 8, three iterations."""
    return single_process_reference(tmp_path_factory.mktemp("ref"), SHORT)


@pytest.mark.parametrize("reshard", ["true", "false"])
def test_fsdp_ema_with_and_without_reshard_after_forward(reference, tmp_path, reshard):
    run = tmp_path / f"fsdp_{reshard}"
    results = check_ok(spawn(train_rank, 2, str(run), {**SHORT, "dist.strategy": "fsdp",
                                                       "dist.fsdp_reshard_after_forward": reshard}))
    assert [(r["status"], r["iteration"], r["sharded"]) for r in results] == [("finished", 3, True)] * 2
    assert_losses_close(steps(reference), steps(run), range(3))
    final = torch.load(run / "final_state.pt", weights_only=True)
    ref = torch.load(reference / "checkpoints" / "checkpoint_00000003.pth", weights_only=True)
    assert_weights_close(ref["student"], final["student"])
    assert_weights_close(ref["teacher"], final["teacher"])


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_one_rank_process_group_runs_ddp_and_fsdp(reference, tmp_path, strategy):
    """dist.process_group=always: one rank gets a (gloo) group, the student is wrapped / sharded, and
    the run equals the one without any group."""
    from shared import distributed as sd

    run = tmp_path / strategy
    cfg = tiny_config(run, **SHORT, **{"train.batch_size_per_gpu": 8, "dist.strategy": strategy,
                                       "dist.process_group": "always"})
    sd.init(backend="gloo", environ={}, process_group=cfg.dist.process_group)
    try:
        assert sd.is_initialized() and sd.get_world_size() == 1
        trainer = Trainer(cfg, table=memory_table(8))
        assert trainer.strategy == strategy and trainer.sharded == (strategy == "fsdp")
        assert (trainer.student_forward is not trainer.student) == (strategy == "ddp")
        assert trainer.run()["status"] == "finished"
    finally:
        sd.cleanup()
    assert not sd.is_initialized()
    assert_losses_close(steps(reference), steps(run), range(3))


def test_no_process_group_for_one_rank_by_default(tmp_path):
    from shared import distributed as sd

    denv = sd.init(backend="gloo", environ={})
    assert denv.world_size == 1 and not sd.is_initialized()
    with pytest.raises(ValueError, match="process_group"):
        sd.init(backend="gloo", environ={}, process_group="sometimes")


def test_every_rank_has_its_own_rng_stream_and_checkpoints_it(tmp_path):
    run = tmp_path / "rng"
    over = {**SHORT, "student.drop_path_rate": 0.1, "train.ckpt_period": 3}
    results = check_ok(spawn(train_rank, 2, str(run), over))
    assert [r["status"] for r in results] == ["finished"] * 2
    assert results[0]["sha256"] == results[1]["sha256"]  # replicas agree although the streams differ
    ckpt = torch.load(run / "checkpoints" / "checkpoint_00000003.pth", weights_only=True)
    states = ckpt["rng_per_rank"]
    assert len(states) == 2 and not torch.equal(states[0]["torch"], states[1]["torch"])
    assert torch.equal(states[0]["torch"], ckpt["rng"]["torch"])


def test_fsdp_dcp_checkpoints_resume_on_two_ranks_and_on_one(reference, tmp_path):
    """dist.fsdp_checkpoint=dcp: each rank writes its shards (checkpoint_<it>.dcp); the run resumes from
    them with 2 ranks and with 1 (no process group) like the uninterrupted run; exports read them."""
    from pretrain.export import backbone_from_checkpoint

    over = {**SHORT, "dist.strategy": "fsdp", "dist.fsdp_checkpoint": "dcp", "train.ckpt_period": 2}
    run = tmp_path / "dcp"
    first = check_ok(spawn(train_rank, 2, str(run), {**over, "train.stop_at_iteration": 2}))
    assert [r["iteration"] for r in first] == [2, 2]
    ckpt = torch.load(run / "checkpoints" / "checkpoint_00000002.pth", weights_only=True)
    assert ckpt["dcp"] == "checkpoint_00000002.dcp" and "student" not in ckpt
    assert (run / "checkpoints" / "checkpoint_00000002.dcp").is_dir()
    backbone, arch, _, meta = backbone_from_checkpoint(run / "checkpoints" / "checkpoint_00000002.pth")
    assert meta["iteration"] == 2 and "pos_embed" in backbone
    one = tmp_path / "one"
    shutil.copytree(run, one)
    results = check_ok(spawn(train_rank, 2, str(run), over))
    assert [r["iteration"] for r in results] == [3, 3]
    assert_losses_close(steps(reference), steps(run), range(3))
    trainer = Trainer(tiny_config(one, **over, **{"train.batch_size_per_gpu": 8}), table=memory_table(8))
    assert trainer.iteration == 2 and not trainer.sharded
    trainer.run()
    assert_losses_close(steps(reference), steps(one), range(3))
