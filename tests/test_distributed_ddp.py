"""Data-parallel training on CPU with gloo (``dino_depth.md`` §10, §11): 2 processes equal 1 process at
the same global batch, checkpoints move between world sizes, all ranks stop together, and a failing
or hanging rank makes the others fail loudly instead of waiting forever."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_distributed_utils import (
    EXACT,
    REPO,
    check_ok,
    free_port,
    single_process_reference,
    spawn,
    train_rank,
)
from test_pretrain_utils import memory_table, single_thread, tiny_config, write_depth_folder  # noqa: F401

from pretrain.train import Trainer
from shared.checkpoint import load_checkpoint
from shared.config import save_config

LOSSES = ("dino_local", "dino_global", "ibot", "total")


def steps(run: Path) -> dict[int, dict]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    out = {r["iteration"]: r for r in records if "event" not in r}
    assert len(out) == len([r for r in records if "event" not in r]), "an iteration was logged twice (non-zero rank?)"
    return out


def assert_losses_close(a: dict[int, dict], b: dict[int, dict], iterations, rel: float = 1e-5) -> None:
    for it in iterations:
        for key in LOSSES:
            assert a[it][key] == pytest.approx(b[it][key], rel=rel, abs=1e-6), (it, key, a[it][key], b[it][key])


def assert_weights_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 2e-5) -> None:
    assert a.keys() == b.keys()
    worst = max((float((a[k].float() - b[k].float()).abs().max()), k) for k in a)
    assert worst[0] <= atol, f"largest difference {worst[0]:.3g} in {worst[1]}"


def seed_run_dir(run: Path, checkpoint: Path) -> Path:
    """A run directory whose only checkpoint is ``checkpoint`` (to resume from it with another W)."""
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(checkpoint, run / "checkpoints" / checkpoint.name)
    (run / "checkpoints" / "latest").write_text(checkpoint.name + "\n")
    return run


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """One process, G = 8, six iterations straight (checkpoints at 3 and 6)."""
    return single_process_reference(tmp_path_factory.mktemp("ref"), EXACT)


@pytest.fixture(scope="module")
def two_rank_preempted(tmp_path_factory) -> tuple[Path, list]:
    """Two processes, B = 4 each (G = 8); only rank 0 gets SIGUSR1 after iteration 2 (of 0..5)."""
    run = tmp_path_factory.mktemp("ddp2")
    results = check_ok(spawn(train_rank, 2, str(run), EXACT, 8, 8, 2))
    return run, results


def test_two_ranks_equal_one_rank_and_stop_together(reference, two_rank_preempted):
    run, results = two_rank_preempted
    # Both ranks agreed on the stop although only rank 0 was signalled, after the same iteration.
    assert [(r["status"], r["iteration"], r["strategy"]) for r in results] == [("preempted", 3, "ddp")] * 2
    assert results[0]["sha256"] == results[1]["sha256"]  # student and EMA teacher identical on both ranks
    ref, ddp = steps(reference), steps(run)
    assert sorted(ddp) == [0, 1, 2]  # rank 0 alone logs
    assert_losses_close(ref, ddp, range(3))
    assert (run / "checkpoints" / "latest").read_text().strip() == "checkpoint_00000003.pth"
    a = load_checkpoint(reference / "checkpoints" / "checkpoint_00000003.pth")
    b = load_checkpoint(run / "checkpoints" / "checkpoint_00000003.pth")
    assert b["config"]["runtime"] == {"global_batch_size": 8, "world_size": 2}
    assert b["data_state"]["position"] == a["data_state"]["position"] == 24
    for key in ("student", "teacher"):
        assert_weights_close(a[key], b[key])
    assert torch.allclose(a["centers"]["dino"], b["centers"]["dino"], atol=1e-5)
    assert torch.allclose(a["centers"]["ibot"], b["centers"]["ibot"], atol=1e-5)
    for name, moments in a["optimizer"]["state"].items():
        assert torch.allclose(moments["exp_avg"], b["optimizer"]["state"][name]["exp_avg"], atol=1e-6), name


def test_checkpoint_of_two_ranks_resumes_on_one(reference, two_rank_preempted, tmp_path):
    run, _ = two_rank_preempted
    resumed = seed_run_dir(tmp_path / "resume1", run / "checkpoints" / "checkpoint_00000003.pth")
    trainer = Trainer(tiny_config(resumed, **EXACT, **{"train.batch_size_per_gpu": 8}), table=memory_table(8))
    assert trainer.iteration == 3 and trainer.world_size == 1
    assert trainer.run()["status"] == "finished"
    assert_losses_close(steps(reference), steps(resumed), range(3, 6))
    final = load_checkpoint(reference / "checkpoints" / "checkpoint_00000006.pth")
    assert_weights_close(final["student"], trainer.student.state_dict())
    assert_weights_close(final["teacher"], trainer.teacher.state_dict())


def test_checkpoint_of_one_rank_resumes_on_two(reference, tmp_path):
    resumed = seed_run_dir(tmp_path / "resume2", reference / "checkpoints" / "checkpoint_00000003.pth")
    results = check_ok(spawn(train_rank, 2, str(resumed), EXACT))
    assert [(r["status"], r["iteration"]) for r in results] == [("finished", 6)] * 2
    assert results[0]["sha256"] == results[1]["sha256"]
    assert_losses_close(steps(reference), steps(resumed), range(3, 6))
    final = load_checkpoint(reference / "checkpoints" / "checkpoint_00000006.pth")
    state = torch.load(resumed / "final_state.pt", weights_only=True)
    assert_weights_close(final["student"], state["student"])
    assert_weights_close(final["teacher"], state["teacher"])
    assert (resumed / "dinodepth.pth").is_file()  # the export, by rank 0


@pytest.mark.slow
def test_fsdp_equals_one_rank_and_writes_full_checkpoints(reference, tmp_path):
    run = tmp_path / "fsdp"
    results = check_ok(spawn(train_rank, 2, str(run), {**EXACT, "dist.strategy": "fsdp", "dist.fsdp_checkpoint": "full"}))
    assert [(r["status"], r["sharded"], r["strategy"]) for r in results] == [("finished", True, "fsdp")] * 2
    assert_losses_close(steps(reference), steps(run), range(6))
    ckpt = load_checkpoint(run / "checkpoints" / "checkpoint_00000006.pth")
    final = load_checkpoint(reference / "checkpoints" / "checkpoint_00000006.pth")
    for key in ("student", "teacher"):  # full tensors, same shapes as the single-process checkpoint
        assert {k: v.shape for k, v in ckpt[key].items()} == {k: v.shape for k, v in final[key].items()}
        assert_weights_close(final[key], ckpt[key])
    for name, moments in final["optimizer"]["state"].items():
        assert ckpt["optimizer"]["state"][name]["exp_avg_sq"].shape == moments["exp_avg_sq"].shape, name
    # ... and the sharded run's checkpoint resumes in a single process.
    resumed = seed_run_dir(tmp_path / "from_fsdp", run / "checkpoints" / "checkpoint_00000003.pth")
    trainer = Trainer(tiny_config(resumed, **EXACT, **{"train.batch_size_per_gpu": 8}), table=memory_table(8))
    trainer.run()
    assert_weights_close(final["student"], trainer.student.state_dict())


@pytest.mark.parametrize("mode", ["crash", pytest.param("hang", marks=pytest.mark.slow)])
def test_a_failing_rank_makes_the_others_fail_loudly(tmp_path, mode):
    timeout_s = 3
    t0 = time.monotonic()
    results = spawn(train_rank, 2, str(tmp_path), EXACT, 8, 8, None, (1, 2, mode), timeout_s, timeout_s=90)
    elapsed = time.monotonic() - t0
    status, message = results[0]
    assert status == "error" and message.startswith("DistributedFailure"), message
    assert "rank 0/2: a collective failed during iteration 2" in message and "dist.timeout_s=3" in message
    assert "Last checkpoint" in message
    if mode == "crash":
        assert results[1][0] == "error" and "injected failure on rank 1" in results[1][1]
        assert elapsed < 60


@pytest.mark.slow
def test_torchrun_entry_point(tmp_path):
    """``torchrun --nproc_per_node=2 -m pretrain.train``: the documented command, end to end."""
    data = write_depth_folder(tmp_path / "depth", n=8)
    overrides = {**EXACT, "data.glob": f"{data}/*.npy"}
    run = tmp_path / "run"
    config = save_config(tiny_config(run, **overrides, **{"train.batch_size_per_gpu": 4}), tmp_path / "tiny.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "pretrain.train", "--config", str(config)]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "G=8 (B=4 × W=2, ddp)" in out.stderr
    assert "[rank 1]" not in out.stderr.replace("[rank 1] received", "")  # rank-0-only logging
    assert sorted(steps(run)) == list(range(6))
    reference = Trainer(tiny_config(tmp_path / "reference", **overrides, **{"train.batch_size_per_gpu": 8}))
    reference.run()
    assert_losses_close(steps(tmp_path / "reference"), steps(run), range(6))
    final = load_checkpoint(run / "checkpoints" / "checkpoint_00000006.pth")
    assert_weights_close(reference.student.state_dict(), final["student"])
