"""SLURM side of pretraining at scale: rendezvous settings from SLURM / submitit variables, the job
scripts' syntax, and the sbatch script's body run on one CPU process with a faked SLURM (test
doubles of ``srun`` and ``scontrol`` on PATH): time-limit signal → checkpoint → exit 75 → requeue →
the next start resumes and ends with the weights of an uninterrupted run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_distributed_utils import EXACT, REPO
from test_pretrain_utils import single_thread, tiny_config, write_depth_folder  # noqa: F401

from pretrain.train import EXIT_REQUEUE, Trainer
from shared import distributed as sd
from shared.checkpoint import load_checkpoint
from shared.config import save_config

SCRIPTS = sorted((REPO / "slurm").glob("*.sh"))
PYTHON = sys.executable


# -- rendezvous settings ---------------------------------------------------------------------------
def test_single_node_slurm_step():
    env = sd.detect_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0", "SLURM_NNODES": "1",
                         "SLURM_JOB_NODELIST": "gpu-node7", "SLURM_JOB_ID": "981"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (0, 1, 0, 1)
    assert (env.master_addr, env.master_port, env.source) == ("gpu-node7", 20981, "slurm")
    assert not env.is_distributed


@pytest.mark.parametrize("nodelist,master,hosts", [
    ("gpu[07-08]", "gpu07", 2),
    ("a100-[001-004]-ib", "a100-001-ib", 4),
    ("node12,node[3-4]", "node12", 3),
    ("rack[1-2]n[01-02]", "rack1n01", 4),
])
def test_multi_node_slurm_step(nodelist, master, hosts):
    env = sd.detect_env({"SLURM_PROCID": "13", "SLURM_NTASKS": str(4 * hosts), "SLURM_LOCALID": "1",
                         "SLURM_NNODES": str(hosts), "SLURM_TASKS_PER_NODE": f"4(x{hosts})",
                         "SLURM_JOB_NODELIST": nodelist, "SLURM_JOB_ID": "123456"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (13, 4 * hosts, 1, 4)
    assert env.master_addr == master and env.master_port == 20000 + 123456 % 20000
    assert len(sd.expand_slurm_nodelist(nodelist)) == hosts


def test_step_nodelist_and_explicit_rendezvous_win():
    base = {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_NNODES": "2", "SLURM_JOB_ID": "7",
            "SLURM_JOB_NODELIST": "n[1-8]", "SLURM_STEP_NODELIST": "n[5-6]"}
    assert sd.detect_env(base).master_addr == "n5"  # the step may run on a subset of the allocation
    env = sd.detect_env({**base, "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "29400"})
    assert (env.master_addr, env.master_port) == ("10.1.2.3", 29400)
    assert sd.detect_env({**base, "SLURM_NTASKS_PER_NODE": "1"}).local_world_size == 1


def test_submitit_local_variables():
    env = sd.detect_env({"SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_GLOBALID": "1", "SUBMITIT_LOCAL_LOCALID": "1",
                         "SUBMITIT_LOCAL_NTASKS": "2", "SUBMITIT_LOCAL_JOB_ID": "31337"})
    assert (env.rank, env.world_size, env.local_rank, env.source) == (1, 2, 1, "submitit-local")
    assert (env.master_addr, env.master_port) == ("127.0.0.1", 20000 + 31337 % 20000)


def test_collective_errors_are_recognised():
    assert sd.is_collective_error(RuntimeError("[gloo/transport/tcp/pair.cc:561] Connection closed by peer"))
    assert sd.is_collective_error(RuntimeError("Timed out waiting 4000ms for recv operation to complete"))
    assert not sd.is_collective_error(RuntimeError("loader delivered iteration 3 for 2"))
    assert not sd.is_collective_error(ValueError("gloo"))


def test_nccl_ranks_beyond_the_visible_gpus_fail_clearly():
    with pytest.raises(sd.DistributedFailure, match="only 0 GPU"):
        sd.init(backend="nccl", environ={"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}, timeout_s=1)


# -- job scripts -----------------------------------------------------------------------------------
def test_job_scripts_parse():
    assert {p.name for p in SCRIPTS} >= {"pretrain_dinodepth.sh", "pseudo_depth.sh", "detect_modmap.sh"}
    for script in SCRIPTS:
        subprocess.run(["bash", "-n", str(script)], check=True)
        text = script.read_text()
        assert text.startswith("#!/bin/bash") and "#SBATCH --gpus-per-node=" in text, script.name


def test_pretrain_script_sbatch_header():
    header = [ln for ln in (REPO / "slurm/pretrain_dinodepth.sh").read_text().splitlines() if ln.startswith("#SBATCH")]
    options = {ln.split()[1].split("=")[0] for ln in header}
    assert {"--nodes", "--ntasks-per-node", "--gpus-per-node", "--cpus-per-task", "--time", "--signal", "--requeue",
            "--open-mode"} <= options
    assert "#SBATCH --signal=USR1@120" in [ln.split("  ")[0].strip() for ln in header]


def _run_script(name: str, args: list[str], env: dict, cwd: Path = REPO) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SUBMITIT_"))}
    full.update(env)
    return subprocess.run(["bash", str(REPO / "slurm" / name), *args], env=full, cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_pseudo_depth_array_task_converts_its_part():
    out = _run_script("pseudo_depth.sh", ["--source", "mvtec_ad", "--root", "/data/m", "--out", "/data/s"],
                      {"DRY_RUN": "1", "SLURM_ARRAY_TASK_ID": "6", "SLURM_ARRAY_TASK_MIN": "4",
                       "SLURM_ARRAY_TASK_COUNT": "4", "PYTHON": "python3"})
    assert out.returncode == 0, out.stderr
    assert "data_prep/pseudo_depth.py --source mvtec_ad --root /data/m --out /data/s --num-parts 4 --part 2" in out.stdout
    bad = _run_script("pseudo_depth.sh", [], {"DRY_RUN": "1", "PART": "4", "NUM_PARTS": "4", "PYTHON": "python3"})
    assert bad.returncode == 2 and "outside [0, 4)" in bad.stderr


def test_detect_array_task_runs_its_class():
    env = {"DRY_RUN": "1", "PYTHON": "python3", "CLASSES": "plastic_stool,wooden_stool,rack"}
    out = _run_script("detect_modmap.sh", ["--config", "c.yaml", "--out", "o"],
                      {**env, "SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_MIN": "0"})
    assert out.returncode == 0, out.stderr
    assert "detect/run.py --config c.yaml --out o --classes wooden_stool --skip-finished --no-progress" in out.stdout
    recompute = _run_script("detect_modmap.sh", [], {**env, "SLURM_ARRAY_TASK_ID": "1", "SKIP_FINISHED": "0"})
    assert "--classes wooden_stool --no-progress" in recompute.stdout
    single = _run_script("detect_modmap.sh", ["--mode", "evaluate"], env)
    assert "--mode evaluate --classes plastic_stool\\,wooden_stool\\,rack" in single.stdout
    missing = _run_script("detect_modmap.sh", [], {"DRY_RUN": "1", "PYTHON": "python3", "SLURM_ARRAY_TASK_ID": "0"})
    assert missing.returncode == 2 and "CLASSES" in missing.stderr
    beyond = _run_script("detect_modmap.sh", [], {**env, "SLURM_ARRAY_TASK_ID": "3"})
    assert beyond.returncode == 2 and "has no class" in beyond.stderr


# -- the sbatch script's body under a faked SLURM --------------------------------------------------
FAKE_SRUN = r"""#!/bin/bash
# Test double of srun: records its options, starts one task on this machine with the SLURM task
# variables, and (if FAKE_SIGNAL_WHEN names a file) sends SIGUSR1 to the task once that file is not
# empty, as slurmstepd does for `#SBATCH --signal=USR1@120`.
opts=()
while [[ $# -gt 0 && "$1" == -* ]]; do opts+=("$1"); shift; done
echo "${opts[*]}" >> "$FAKE_LOG/srun"
export SLURM_PROCID=0 SLURM_LOCALID=0 SLURM_STEP_ID=0
"$@" &
task=$!
if [[ -n "${FAKE_SIGNAL_WHEN:-}" ]]; then
    while kill -0 "$task" 2>/dev/null && [[ ! -s "$FAKE_SIGNAL_WHEN" ]]; do sleep 0.02; done
    kill -USR1 "$task" 2>/dev/null
fi
wait "$task"
"""
FAKE_SCONTROL = r"""#!/bin/bash
# Test double of scontrol: `show hostnames` prints FAKE_HOSTS, `requeue <id>` is recorded.
echo "$*" >> "$FAKE_LOG/scontrol"
case "$1" in
    show) for h in $FAKE_HOSTS; do echo "$h"; done ;;
    requeue) exit "${FAKE_REQUEUE_STATUS:-0}" ;;
esac
"""
FAKE_TRAINER = r"""#!/bin/bash
# Test double of the Python interpreter: the training step ends with FAKE_STATUS.
echo "$*" >> "$FAKE_LOG/python"
exit "${FAKE_STATUS:-0}"
"""


@pytest.fixture
def fake_slurm(tmp_path) -> dict:
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("fake_python", FAKE_TRAINER)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "log"
    log.mkdir()
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_LOG": str(log), "FAKE_HOSTS": "node01 node02",
            "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node[01-02]", "SLURM_NTASKS": "1", "SLURM_NNODES": "1",
            "SLURM_SUBMIT_DIR": str(REPO), "OMP_NUM_THREADS": "1", "_bin": str(bin_dir), "_log": str(log)}


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


@pytest.mark.parametrize("status,restarts,requeue_status,expected,requeued", [
    (0, 0, 0, 0, False),          # finished
    (3, 0, 0, 3, False),          # distributed failure: not requeued
    (EXIT_REQUEUE, 0, 0, 0, True),  # checkpoint written: requeue, the batch script ends
    (EXIT_REQUEUE, 30, 0, EXIT_REQUEUE, False),  # MAX_REQUEUES reached
    (EXIT_REQUEUE, 0, 1, EXIT_REQUEUE, True),  # scontrol requeue failed: the status says so
])
def test_script_requeues_only_on_the_requeue_status(fake_slurm, status, restarts, requeue_status, expected, requeued):
    env = {k: v for k, v in fake_slurm.items() if not k.startswith("_")}
    env.update(PYTHON=f"{fake_slurm['_bin']}/fake_python", FAKE_STATUS=str(status), SLURM_RESTART_COUNT=str(restarts),
               FAKE_REQUEUE_STATUS=str(requeue_status))
    out = _run_script("pretrain_dinodepth.sh", ["--config", "x.yaml", "train.output_dir=runs/x"], env)
    assert out.returncode == expected, out.stdout + out.stderr
    log = Path(fake_slurm["_log"])
    assert ("requeue 4242" in _read(log / "scontrol")) == requeued
    assert _read(log / "python").strip() == "-m pretrain.train --config x.yaml train.output_dir=runs/x"
    assert _read(log / "srun").split() == ["--kill-on-bad-exit=0", "--wait=60", "--cpu-bind=none"]
    assert "rendezvous node01:24242" in out.stdout  # first host of `scontrol show hostnames`, port from the job id


def test_sbatch_body_trains_on_one_cpu_process(fake_slurm, tmp_path):
    data = write_depth_folder(tmp_path / "depth", n=4)
    run = tmp_path / "run"
    config = save_config(tiny_config(run, **{"train.epoch_length": 2, "data.glob": f"{data}/*.npy",
                                             "train.batch_size_per_gpu": 2}), tmp_path / "tiny.yaml")
    env = {k: v for k, v in fake_slurm.items() if not k.startswith("_")}
    out = _run_script("pretrain_dinodepth.sh", ["--config", str(config)], {**env, "PYTHON": PYTHON})
    assert out.returncode == 0, out.stdout + out.stderr
    assert "G=2 (B=2 × W=1, single)" in out.stderr and "finished at iteration 2/2" in out.stderr
    assert (run / "checkpoints" / "checkpoint_00000002.pth").is_file() and (run / "dinodepth.pth").is_file()
    assert "requeue" not in _read(Path(fake_slurm["_log"]) / "scontrol")


@pytest.mark.slow
def test_sbatch_body_on_one_cpu_process_requeues_and_resumes_exactly(fake_slurm, tmp_path):
    data = write_depth_folder(tmp_path / "depth", n=8)
    overrides = {**EXACT, "train.epoch_length": 12, "train.batch_size_per_gpu": 4, "data.glob": f"{data}/*.npy",
                 "train.ckpt_period": 1000}
    run = tmp_path / "run"
    config = save_config(tiny_config(run, **overrides), tmp_path / "tiny.yaml")  # the §16 tiny model, as a file
    args = ["--config", str(config)]
    env = {k: v for k, v in fake_slurm.items() if not k.startswith("_")}
    env.update(PYTHON=PYTHON, FAKE_SIGNAL_WHEN=str(run / "metrics.jsonl"))
    env.pop("FAKE_HOSTS")  # no `show hostnames` output: the script falls back to the Python expansion
    first = _run_script("pretrain_dinodepth.sh", args, env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "rendezvous node01:24242" in first.stdout
    assert "requeue 4242" in _read(Path(fake_slurm["_log"]) / "scontrol"), first.stdout + first.stderr
    stopped_at = int((run / "checkpoints" / "latest").read_text().strip()[len("checkpoint_"):-len(".pth")])
    assert 1 <= stopped_at < 12 and not (run / "dinodepth.pth").exists()

    env.pop("FAKE_SIGNAL_WHEN")
    second = _run_script("pretrain_dinodepth.sh", args, {**env, "SLURM_RESTART_COUNT": "1"})
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"resumed from {run}/checkpoints/checkpoint_{stopped_at:08d}.pth" in second.stderr
    assert _read(Path(fake_slurm["_log"]) / "scontrol").count("requeue") == 1
    final = load_checkpoint(run / "checkpoints" / "checkpoint_00000012.pth")

    reference = Trainer(tiny_config(tmp_path / "reference", **overrides))
    reference.run()
    for key, module in (("student", reference.student), ("teacher", reference.teacher)):
        expected = module.state_dict()
        assert all(torch.equal(expected[k], final[key][k]) for k in expected), key
    assert (run / "dinodepth.pth").is_file()

