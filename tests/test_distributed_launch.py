"""``pretrain/launch.py`` (submitit): executor parameters for SLURM and local runs, the sbatch file
submitit generates (``sbatch`` test double on PATH), the checkpoint/requeue contract, and a
LocalExecutor job that is preempted, requeued and finishes with the weights of an uninterrupted run."""

from __future__ import annotations

import os
import pickle
import time
from pathlib import Path

import pytest
import torch
from test_distributed_utils import EXACT
from test_pretrain_utils import single_thread, tiny_config, write_depth_folder  # noqa: F401

from pretrain.launch import LaunchError, PretrainJob, executor_parameters, local_tasks, main, submit
from pretrain.train import Trainer
from shared.checkpoint import load_checkpoint
from shared.config import to_dict


def _cfg(tmp_path: Path, **extra):
    return tiny_config(tmp_path / "run", **{"data.glob": str(tmp_path / "depth/*.npy"), **extra})


def test_slurm_submissions_require_the_gpu_count(tmp_path):
    with pytest.raises(LaunchError, match="slurm.gpus_per_node is required"):
        executor_parameters(_cfg(tmp_path), "slurm", visible_gpus=0)


def test_slurm_executor_parameters(tmp_path):
    cfg = _cfg(tmp_path, **{"slurm.nodes": 4, "slurm.gpus_per_node": 8, "slurm.partition": "gpu", "slurm.qos": "high",
                            "slurm.mem_gb": 480, "slurm.setup": "['module load cuda']"})
    params = executor_parameters(cfg, "slurm", visible_gpus=0)
    assert params == {"name": "dinodepth", "timeout_min": 2800, "cpus_per_task": 10, "mem_gb": 480, "nodes": 4,
                      "gpus_per_node": 8, "tasks_per_node": 8, "slurm_signal_delay_s": 120, "slurm_partition": "gpu",
                      "slurm_qos": "high", "slurm_setup": ["module load cuda"],
                      "slurm_srun_args": ["--kill-on-bad-exit=1"]}
    assert isinstance(params["timeout_min"], int)


def test_local_launches_use_the_visible_gpus():
    assert local_tasks(None, visible=0) == (1, 0)  # one CPU process
    assert local_tasks(None, visible=4) == (4, 4)
    assert local_tasks(2, visible=4) == (2, 2)
    with pytest.raises(LaunchError, match="only 4 GPU"):
        local_tasks(8, visible=4)
    with pytest.raises(LaunchError, match="only 0 GPU"):
        local_tasks(1, visible=0)


def test_local_launches_are_single_node(tmp_path):
    with pytest.raises(LaunchError, match="slurm.nodes must be 1"):
        executor_parameters(_cfg(tmp_path, **{"slurm.nodes": 2}), "local", visible_gpus=0)


def test_checkpoint_returns_a_fresh_job_with_the_same_config(tmp_path):
    config = to_dict(_cfg(tmp_path))
    job = PretrainJob(config, allow_data_change=True, rehearse_preemption_at=3)
    delayed = job.checkpoint()
    fresh = delayed.function
    assert isinstance(fresh, PretrainJob) and fresh is not job and delayed.args == () and delayed.kwargs == {}
    assert (fresh.config, fresh.allow_data_change, fresh.rehearse_preemption_at, fresh.attempt) == (config, True, None, 1)


SBATCH = r"""#!/bin/bash
# Test double of sbatch: keeps the submitted file and answers like SLURM (no job runs).
cp "${@: -1}" "$FAKE_LOG/submitted.sh"
echo "Submitted batch job 4243"
"""


def test_submitit_slurm_submission_file(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(SBATCH)
    (bin_dir / "srun").write_text("#!/bin/bash\nexit 1\n")  # submitit only checks that srun exists
    for name in ("sbatch", "srun"):
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_LOG", str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))  # restored after the test
    monkeypatch.chdir(tmp_path)
    cfg = tiny_config("runs/vits14", **{"data.shards": "[shards/]", "slurm.nodes": 2, "slurm.gpus_per_node": 8,
                                        "slurm.partition": "gpu", "slurm.timeout_min": 600})
    job = submit(cfg, cluster="slurm")
    assert job.job_id == "4243"
    script = (tmp_path / "submitted.sh").read_text()
    for line in ("#SBATCH --nodes=2", "#SBATCH --gpus-per-node=8", "#SBATCH --ntasks-per-node=8",
                 "#SBATCH --cpus-per-task=10", "#SBATCH --time=600", "#SBATCH --partition=gpu",
                 "#SBATCH --signal=USR2@120", "#SBATCH --open-mode=append", "#SBATCH --job-name=dinodepth"):
        assert line in script, line
    assert "--kill-on-bad-exit=1" in script and "submitit.core._submit" in script
    # The pickled callable carries absolute paths (the job may start elsewhere) and resumes by itself.
    folder = tmp_path / "runs/vits14/submitit/4243"
    with open(folder / "4243_submitted.pkl", "rb") as handle:
        delayed = pickle.load(handle)
    assert isinstance(delayed.function, PretrainJob)
    assert delayed.function.config["train"]["output_dir"] == str(tmp_path / "runs/vits14")
    assert delayed.function.config["data"]["shards"] == [str(tmp_path / "shards")]
    assert delayed._timeout_countdown == 30  # slurm.max_num_timeout
    assert str(Path(__file__).resolve().parents[1]) in os.environ["PYTHONPATH"].split(os.pathsep)


def test_cli_reports_a_missing_gpu_count(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    args = [f"train.output_dir={tmp_path / 'run'}", f"data.glob={tmp_path}/*.npy", "slurm.partition=gpu"]
    assert main(["--cluster", "slurm", *args]) == 1
    assert "slurm.gpus_per_node is required" in caplog.text


@pytest.mark.slow
def test_local_job_is_preempted_requeued_and_finishes_like_an_uninterrupted_run(tmp_path, monkeypatch):
    data = write_depth_folder(tmp_path / "depth", n=8)
    overrides = {**EXACT, "train.batch_size_per_gpu": 4, "data.glob": f"{data}/*.npy", "train.ckpt_period": 1000}
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the job's processes: same kernels as this reference
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    run = tmp_path / "run"
    job = submit(tiny_config(run, **overrides), cluster="local", rehearse_preemption_at=2)
    deadline = time.monotonic() + 300
    while not job.done() and time.monotonic() < deadline:
        time.sleep(0.5)
    if not job.done():
        job.cancel()
        pytest.fail(f"submitit job still running after 300 s; log: {job.paths.stderr}")
    result = job.result()
    assert result == {"exit_status": 0, "attempt": 1, "status": "finished", "iteration": 6, "total_iterations": 6,
                      "out_dir": str(run)}
    log = Path(job.paths.stderr).read_text()
    assert "Requeued job" in log and "resumed from" in log and "checkpoint_00000003.pth" in log
    final = load_checkpoint(run / "checkpoints" / "checkpoint_00000006.pth")

    reference = Trainer(tiny_config(tmp_path / "reference", **overrides))
    reference.run()
    for key, module in (("student", reference.student), ("teacher", reference.teacher)):
        expected = module.state_dict()
        assert all(torch.equal(expected[k], final[key][k]) for k in expected), key
    assert (run / "dinodepth.pth").is_file()
