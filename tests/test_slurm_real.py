"""The cluster path on a real SLURM: a one-node cluster on this machine (tests/slurm/local_cluster.sh,
brought up once per session, torn down at the end; the tests skip with its reason where it cannot run).

The job scripts run unchanged through ``sbatch`` on the CPU partition: only the GPU, task and time
options are overridden on the command line (``--gpus-per-node=0``, as docs/pretraining.md describes).
Covered: pretraining with 2 gloo ranks to the end; the time limit's SIGUSR1 → checkpoint → exit 75 →
requeue → resume; ``scancel --signal=TERM`` as a preemption and ``MAX_REQUEUES``; a crashed rank
(status 3, no requeue); ``pretrain/launch.py`` through submitit's SLURM executor, preempted and requeued
through ``PretrainJob.checkpoint``; ``slurm/pseudo_depth.sh`` and ``slurm/detect_modmap.sh`` as array
jobs. Every interrupted run ends with the weights of the uninterrupted one (bit-identical)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from test_distributed_utils import EXACT, REPO
from test_pretrain_utils import tiny_config, write_depth_folder
from test_pseudo_depth import tiny_model_dir  # noqa: F401 - fixture

from shared.checkpoint import load_checkpoint
from shared.config import save_config

CLUSTER = REPO / "tests" / "slurm" / "local_cluster.sh"
# Two gloo ranks on the CPU partition; the script's own --signal=USR1@120 / --requeue / --open-mode lines apply.
PRETRAIN_SBATCH = ["--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=00:10:00"]
ITERATIONS = 300  # a few seconds of training per run at 2 ranks on 2 cores
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}
SIGUSR1_MASK = 1 << (10 - 1)  # bit of SIGUSR1 in /proc/<pid>/status SigPnd / ShdPnd


# -- the cluster -------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def slurm() -> dict[str, str]:
    """Bring the local cluster up (installing SLURM first where root + apt allow) for the session.

    Returns the environment of the test jobs: SLURM_CONF of the local cluster, one intra-op thread
    (every run, reference included, uses the same kernels), this worktree on PYTHONPATH."""
    if sys.platform != "linux":
        pytest.skip("the local SLURM test cluster needs Linux")
    was_up = subprocess.run([str(CLUSTER), "status"], capture_output=True, text=True).returncode == 0
    started = subprocess.run([str(CLUSTER), "up"], capture_output=True, text=True, timeout=900)
    if started.returncode == 77:
        pytest.skip(started.stderr.strip().splitlines()[-1])
    assert started.returncode == 0, f"{CLUSTER} up failed:\n{started.stdout}{started.stderr}"
    conf = re.search(r"SLURM_CONF=(\S+)", subprocess.run([str(CLUSTER), "env"], capture_output=True,
                                                          text=True).stdout).group(1)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SUBMITIT_", "SBATCH_", "SRUN_"))}
    env.update(SLURM_CONF=conf, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        dict.fromkeys([str(REPO), *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]])))
    env["PATH"] = f"{env.get('PATH', '')}:/usr/sbin:/sbin"
    yield env
    if not was_up:
        subprocess.run([str(CLUSTER), "down"], capture_output=True, timeout=120)


def run(cmd: list[str], env: dict, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=120, **kwargs)
    if check and out.returncode:
        raise AssertionError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout}{out.stderr}")
    return out


def sbatch(env: dict, *args: str) -> str:
    return run(["sbatch", "--parsable", *args], env).stdout.strip().split(";")[0]


def job_records(env: dict, job: str) -> list[dict[str, str]]:
    """``scontrol show job -o``: one record per job (per array task), as key → value."""
    out = run(["scontrol", "show", "job", "-o", job], env, check=False)
    records = []
    for line in out.stdout.splitlines():
        record: dict[str, str] = {}
        key = None
        for token in line.split():
            if "=" in token and re.match(r"^[A-Za-z:/]+=", token):
                key, value = token.split("=", 1)
                record[key] = value
            elif key:  # a value with spaces (Command=..., Reason=...)
                record[key] += " " + token
        records.append(record)
    return records


def wait_until(predicate: Callable[[], object], timeout_s: float, what: str, env: dict, job: str,
               logs: list[Path] = ()) -> object:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    records = job_records(env, job)
    run(["scancel", job], env, check=False)
    tails = "\n".join(f"--- {p}\n{p.read_text()[-3000:]}" for p in logs if p.is_file())
    pytest.fail(f"job {job}: {what} did not happen within {timeout_s:.0f} s; job: {records}\n{tails}")


def wait_done(env: dict, job: str, timeout_s: float, logs: list[Path] = ()) -> list[dict[str, str]]:
    """Wait until the job (every task of an array) reached a final state; returns its records."""
    def done():
        records = job_records(env, job)
        return records if records and all(r.get("JobState") in FINAL_STATES for r in records) else None
    return wait_until(done, timeout_s, "the end", env, job, logs)


def metric_iterations(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines()]
    # iteration records only: events (collapse warning, probes) share the file and name an iteration too
    return [r["iteration"] for r in records if "event" not in r]


def assert_same_weights(run_dir: Path, reference_dir: Path) -> None:
    final = load_checkpoint(run_dir / "checkpoints" / f"checkpoint_{ITERATIONS:08d}.pth")
    expected = load_checkpoint(reference_dir / "checkpoints" / f"checkpoint_{ITERATIONS:08d}.pth")
    for key in ("student", "teacher"):
        assert final[key].keys() == expected[key].keys()
        different = [k for k in expected[key] if not torch.equal(expected[key][k], final[key][k])]
        assert not different, f"{key} differs from the uninterrupted run in {different[:5]}"
    assert (run_dir / "dinodepth.pth").is_file()


# -- pretraining through sbatch slurm/pretrain_dinodepth.sh -----------------------------------------
@pytest.fixture(scope="module")
def pretrain_config(tmp_path_factory) -> Path:
    """The §16 tiny model made exact across restarts (no stochastic depth, no KoLeo), as a file."""
    root = tmp_path_factory.mktemp("slurm_pretrain")
    data = write_depth_folder(root / "depth", n=8)
    overrides = {**EXACT, "train.epoch_length": ITERATIONS, "train.batch_size_per_gpu": 2,
                 "data.glob": f"{data}/*.npy", "train.ckpt_period": 1000, "train.keep": 3, "dist.timeout_s": 120}
    return save_config(tiny_config(root / "unused", **overrides), root / "tiny.yaml")


def submit_pretraining(env: dict, config: Path, run_dir: Path, *sbatch_args: str) -> str:
    run_dir.mkdir(parents=True, exist_ok=True)
    return sbatch(env, *PRETRAIN_SBATCH, *sbatch_args, f"--output={run_dir}/%x-%j.out", f"--error={run_dir}/%x-%j.err",
                  "slurm/pretrain_dinodepth.sh", "--config", str(config), f"train.output_dir={run_dir}")


def logs_of(run_dir: Path, job: str) -> list[Path]:
    """The job's stdout (the batch script) and stderr (the trainer's log) files."""
    return [run_dir / f"dinodepth-{job}.out", run_dir / f"dinodepth-{job}.err"]


@pytest.fixture(scope="module")
def reference_run(slurm, pretrain_config, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("reference")
    job = submit_pretraining(slurm, pretrain_config, run_dir)
    (record,) = wait_done(slurm, job, 300, logs_of(run_dir, job))
    assert (record["JobState"], record["ExitCode"], record["Restarts"]) == ("COMPLETED", "0:0", "0"), \
        "\n".join(p.read_text()[-3000:] for p in logs_of(run_dir, job))
    return run_dir


@pytest.mark.slow
def test_sbatch_pretraining_with_two_gloo_ranks_runs_to_the_end(reference_run):
    (log,) = reference_run.glob("dinodepth-*.out")
    out, err = (p.read_text() for p in logs_of(reference_run, log.stem.split("-")[1]))
    assert "world size 2, rendezvous localhost:" in out and "training step ended with status 0" in out
    assert "G=4 (B=2 × W=2, ddp)" in err and f"finished at iteration {ITERATIONS}/{ITERATIONS}" in err
    assert metric_iterations(reference_run) == list(range(ITERATIONS))
    assert (reference_run / "dinodepth.pth").is_file()


def rank_pids(env: dict, job: str) -> list[int]:
    """PIDs of the job's training processes (``scontrol listpids``)."""
    pids = []
    for line in run(["scontrol", "listpids", job], env, check=False).stdout.splitlines()[1:]:
        pid = line.split()[0]
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"pretrain.train" in cmdline and b"-c" not in cmdline:  # python -m pretrain.train, not the bash -c wrapper
            pids.append(int(pid))
    return pids


def usr1_pending(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:  # the process has ended
        return False
    masks = re.findall(r"^(?:SigPnd|ShdPnd):\s*([0-9a-f]+)", status, re.M)
    return any(int(m, 16) & SIGUSR1_MASK for m in masks)


@pytest.mark.slow
def test_time_limit_signal_checkpoints_requeues_and_resumes_exactly(slurm, pretrain_config, reference_run, tmp_path):
    """The script's ``--signal=USR1@120``, sent by slurmctld when the time limit comes near.

    slurmctld checks time limits every 30 s: to make the signal land in the middle of a run of a few
    seconds on any machine, the ranks are paused (SIGSTOP) once training has started and the time
    limit is lowered so that less than 120 s remain. slurmstepd continues the tasks when it signals
    them (else the test does, once the SIGUSR1 is pending). The time limit goes back up once the
    signal arrived, so the requeued job is not signalled again."""
    run_dir = tmp_path / "run"
    job = submit_pretraining(slurm, pretrain_config, run_dir)
    logs = logs_of(run_dir, job)
    wait_until(lambda: metric_iterations(run_dir), 120, "the first iteration", slurm, job, logs)
    pids = wait_until(lambda: (p if len(p := rank_pids(slurm, job)) == 2 else None), 30, "2 ranks", slurm, job, logs)
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    stopped_at = max(metric_iterations(run_dir))
    try:
        (record,) = job_records(slurm, job)
        minutes = max(1, -(-(_seconds(record["RunTime"]) + 45) // 60))  # 45..105 s left: < the 120 s of USR1@120
        run(["scontrol", "update", f"JobId={job}", f"TimeLimit={minutes}"], slurm)
        wait_until(lambda: "received SIGUSR1" in logs[1].read_text() or any(usr1_pending(p) for p in pids), 100,
                   "slurmctld's SIGUSR1", slurm, job, logs)
        run(["scontrol", "update", f"JobId={job}", "TimeLimit=10"], slurm)
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    (record,) = wait_done(slurm, job, 300, logs)
    out, err = (p.read_text() for p in logs)
    assert (record["JobState"], record["ExitCode"], record["Restarts"]) == ("COMPLETED", "0:0", "1"), out + err
    assert "received SIGUSR1" in err and "checkpoint written (status 75): requeueing" in out
    resumed = re.search(r"resumed from \S+checkpoint_(\d+)\.pth", err)
    assert resumed and stopped_at <= int(resumed.group(1)) < ITERATIONS, err
    assert metric_iterations(run_dir) == list(range(ITERATIONS))  # no iteration logged twice, none missing
    assert_same_weights(run_dir, reference_run)


def _seconds(runtime: str) -> int:
    days, _, hms = runtime.rpartition("-")
    h, m, s = (int(x) for x in hms.split(":"))
    return int(days or 0) * 86400 + h * 3600 + m * 60 + s


@pytest.mark.slow
def test_preemption_by_sigterm_and_max_requeues(slurm, pretrain_config, reference_run, tmp_path):
    """``scancel --signal=TERM`` twice with MAX_REQUEUES=1: the first requeues, the second only checkpoints
    (exit 75, not requeued); a resubmission finishes. A preemption with a grace time signals the steps
    the same way (SIGTERM to the tasks, not to the batch shell or srun)."""
    run_dir = tmp_path / "run"
    env = {**slurm, "MAX_REQUEUES": "1"}
    job = submit_pretraining(env, pretrain_config, run_dir)
    logs = logs_of(run_dir, job)

    def training(restarts: int, past_iteration: int) -> Callable[[], bool]:
        def check() -> bool:
            records, iterations = job_records(slurm, job), metric_iterations(run_dir)
            return bool(records and records[0].get("JobState") == "RUNNING"
                        and records[0].get("Restarts") == str(restarts) and iterations
                        and max(iterations) > past_iteration)
        return check

    wait_until(training(0, -1), 120, "training", slurm, job, logs)
    run(["scancel", "--signal=TERM", job], slurm)
    wait_until(lambda: (r := job_records(slurm, job)) and r[0].get("Restarts") == "1", 120, "the requeue",
               slurm, job, logs)
    wait_until(training(1, max(metric_iterations(run_dir))), 120, "training after the requeue", slurm, job, logs)
    run(["scancel", "--signal=TERM", job], slurm)
    (record,) = wait_done(slurm, job, 120, logs)
    out, err = (p.read_text() for p in logs)
    assert (record["JobState"], record["ExitCode"], record["Restarts"]) == ("FAILED", "75:0", "1"), out + err
    assert err.count("[rank 0] received SIGTERM") == 2 and out.count("requeueing job") == 1
    assert "already requeued 1 times (MAX_REQUEUES): not requeueing" in out
    assert not (run_dir / "dinodepth.pth").exists()

    again = submit_pretraining(slurm, pretrain_config, run_dir)  # the user resubmits: resumes, finishes
    (record,) = wait_done(slurm, again, 300, logs_of(run_dir, again))
    assert (record["JobState"], record["ExitCode"]) == ("COMPLETED", "0:0")
    err = "".join(p.read_text() for p in run_dir.glob("*.err"))
    assert err.count("resumed from") == 2
    assert metric_iterations(run_dir) == list(range(ITERATIONS))
    assert_same_weights(run_dir, reference_run)


CRASHING_RANK = r"""#!/bin/bash
# Interpreter for the test job: rank 1 runs the trainer and crashes once training has started. The
# trainer is killed (SIGKILL); the task then exits with status 1 (a crash under a wrapper) or dies by
# SIGKILL itself (the OOM killer): CRASH=exit|kill.
if [[ ${RANK:-0} != 1 ]]; then exec "$REAL_PYTHON" "$@"; fi
"$REAL_PYTHON" "$@" &
trainer=$!
while kill -0 "$trainer" 2>/dev/null && [[ ! -s "$RUN_DIR/metrics.jsonl" ]]; do sleep 0.1; done
kill -KILL "$trainer"
wait "$trainer"
echo "rank 1: trainer killed by the test" >&2
if [[ $CRASH == kill ]]; then kill -KILL $$; fi
exit 1
"""


@pytest.mark.slow
@pytest.mark.parametrize("crash,status", [("exit", 3), ("kill", 128 + 9)])
def test_a_crashed_rank_fails_the_job_without_requeue(slurm, pretrain_config, tmp_path, crash, status):
    """Rank 0 notices the lost peer (gloo) and exits 3 at once; the step status is the highest task
    status, so a rank killed by a signal makes it 128 + signal (srun's rule). Neither is requeued."""
    run_dir = tmp_path / "run"
    wrapper = tmp_path / "crashing_python"
    wrapper.write_text(CRASHING_RANK)
    wrapper.chmod(0o755)
    env = {**slurm, "PYTHON": str(wrapper), "REAL_PYTHON": sys.executable, "RUN_DIR": str(run_dir), "CRASH": crash}
    job = submit_pretraining(env, pretrain_config, run_dir)
    (record,) = wait_done(slurm, job, 240, logs_of(run_dir, job))
    out, err = (p.read_text() for p in logs_of(run_dir, job))
    assert (record["JobState"], record["ExitCode"], record["Restarts"]) == ("FAILED", f"{status}:0", "0"), out + err
    assert "rank 1: trainer killed by the test" in err and f"training step ended with status {status}" in out
    assert "task 0: Exited with exit code 3" in err  # rank 0: distributed failure, not a hang until --wait
    assert "requeue" not in out
    assert not (run_dir / "dinodepth.pth").exists()


# -- pretrain/launch.py through submitit's SLURM executor ---------------------------------------------
@pytest.mark.slow
def test_launch_py_on_slurm_is_preempted_and_requeued_through_checkpoint(slurm, pretrain_config, tmp_path):
    import submitit

    run_dir = tmp_path / "run"
    cmd = [sys.executable, "pretrain/launch.py", "--cluster", "slurm", "--config", str(pretrain_config),
           f"train.output_dir={run_dir}", "slurm.gpus_per_node=0", "slurm.tasks_per_node=2", "slurm.cpus_per_task=1",
           "slurm.timeout_min=60"]  # submitit counts a signal in the first 80 % of the time limit as a preemption
    submitted = run(cmd, slurm)
    job = submitted.stdout.strip().splitlines()[-1]
    folder = run_dir / "submitit" / job
    logs = [folder / f"{job}_0_log.out", folder / f"{job}_0_log.err"]
    script = (folder / f"{job}_submission.sh").read_text()
    assert "#SBATCH --signal=USR2@120" in script and "#SBATCH --ntasks-per-node=2" in script
    assert "gpus" not in script
    wait_until(lambda: metric_iterations(run_dir), 120, "the first iteration", slurm, job, logs)
    run(["scancel", "--signal=USR2", job], slurm)  # what submitit expects on preemption
    (record,) = wait_done(slurm, job, 300, logs)
    log = logs[1].read_text()
    assert (record["JobState"], record["ExitCode"], record["Restarts"]) == ("COMPLETED", "0:0", "1"), log
    assert "this job is preempted" in log and "Calling checkpoint method" in log and "(30 remaining timeouts)" in log
    assert "resumed from" in log
    result = submitit.SlurmJob(folder=run_dir / "submitit" / "%j", job_id=job).result()
    assert result == {"exit_status": 0, "attempt": 1, "status": "finished", "iteration": ITERATIONS,
                      "total_iterations": ITERATIONS, "out_dir": str(run_dir)}
    assert metric_iterations(run_dir) == list(range(ITERATIONS))
    assert (run_dir / "dinodepth.pth").is_file()


# -- array jobs -----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_pseudo_depth_array_over_parts_and_resubmission(slurm, tiny_model_dir, tmp_path):  # noqa: F811
    from data_prep.shards import load_manifest
    from tests.test_rgb_sources import make_mvtec_ad

    root = tmp_path / "mvtec_ad"
    make_mvtec_ad(root)
    out = tmp_path / "shards"
    args = ["--array=0-1", "--gpus-per-node=0", "--cpus-per-task=1", "--mem=2G", "--time=00:05:00",
            f"--output={tmp_path}/%x-%A_%a.out", "slurm/pseudo_depth.sh", "--source", "mvtec_ad", "--root", str(root),
            "--out", str(out), "--model", str(tiny_model_dir), "--workers", "0", "--shard-max-count", "1"]
    job = sbatch(slurm, *args)
    records = wait_done(slurm, job, 300, sorted(tmp_path.glob("*.out")))
    assert sorted((r["JobState"], r["ExitCode"]) for r in records) == [("COMPLETED", "0:0")] * 2, records
    entry = load_manifest(out)["sources"]["mvtec_ad"]
    assert entry["counts"]["total"] == 4  # the 4 training images, 2 per part
    shards = sorted(out.glob("*.tar"))
    keys = []
    for shard in shards:  # complete tar files (atomic writes: no partial shard, no temporary left)
        with tarfile.open(shard) as tar:
            keys += [m.name.split(".", 1)[0] for m in tar.getmembers()]
    assert len(set(keys)) == 4
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    logs = {p.name: p.read_text() for p in tmp_path.glob("pseudo_depth-*.out")}
    assert sorted(re.findall(r"part (\d) of 2", "".join(logs.values()))) == ["0", "1"]
    before = {p.name: p.read_bytes() for p in shards}

    again = sbatch(slurm, *args)
    records = wait_done(slurm, again, 300, sorted(tmp_path.glob("*.out")))
    assert sorted((r["JobState"], r["ExitCode"]) for r in records) == [("COMPLETED", "0:0")] * 2, records
    rerun = "".join(p.read_text() for p in tmp_path.glob(f"pseudo_depth-{again}_*.out"))
    assert rerun.count('"written": 0') == 2, rerun
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == before


@pytest.mark.slow
def test_detect_array_over_classes_then_evaluation_job(slurm, tmp_path):
    from data_prep.synthetic import SynthConfig, generate_benchmark
    from pretrain.export import default_depth_input_norm, write_export
    from shared.vit import create_vit

    data = tmp_path / "data"
    generate_benchmark(data, SynthConfig(classes=("vase", "stool"), n_views=3, width=64, height=48, n_test=2,
                                         setups=("real2real",)), progress=False)
    torch.manual_seed(0)
    vit = create_vit("vit_tiny_patch14", in_chans=1, depth=1)
    ckpt = write_export(tmp_path / "dd.pth", vit.state_dict(), vit.cfg.to_dict(), default_depth_input_norm(), {},
                        safetensors=False)
    out = tmp_path / "run"
    tiny = ["--data", str(data), "--ckpt", str(ckpt), "--out", str(out), "--image-encoder", "random",
            "--random-encoder-arch", "vit_tiny_patch14", "--random-encoder-depth", "1", "--image-size", "56",
            "--epochs", "2", "--encoder-batch-size", "4"]
    env = {**slurm, "CLASSES": "vase,stool"}
    common = ["--gpus-per-node=0", "--cpus-per-task=1", "--mem=2G", "--time=00:05:00",
              f"--output={tmp_path}/%x-%A_%a.out"]
    array = sbatch(env, "--array=0-1", *common, "slurm/detect_modmap.sh", *tiny)
    evaluate = sbatch(env, f"--dependency=afterok:{array}", *common, "slurm/detect_modmap.sh", "--mode", "evaluate",
                      *tiny)
    logs = sorted(tmp_path.glob("*.out"))
    records = wait_done(slurm, array, 400, logs)
    assert sorted((r["JobState"], r["ExitCode"]) for r in records) == [("COMPLETED", "0:0")] * 2, \
        records + [p.read_text()[-2000:] for p in tmp_path.glob("*.out")]
    for cls in ("vase", "stool"):  # each task wrote its own class completely
        folder = out / "real2real" / cls
        for name in ("model.pt", "scores.csv", "metrics.json"):
            assert (folder / name).is_file(), (cls, name)
        assert json.loads((folder / "metrics.json").read_text())["image_auroc"] is not None
    (record,) = wait_done(slurm, evaluate, 300, sorted(tmp_path.glob("*.out")))
    assert (record["JobState"], record["ExitCode"]) == ("COMPLETED", "0:0"), [p.read_text() for p in tmp_path.glob("*.out")]
    results = json.loads((out / "results.json").read_text())["results"]
    assert set(results["real2real"]) == {"vase", "stool"}  # the table over both classes, from their predictions
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    # A re-submitted array (array tasks run --skip-finished) finds both classes finished: nothing is written.
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()}
    assert {p.parent.name for p in before if p.name == "finished.json"} == {"vase", "stool"}
    again = sbatch(env, "--array=0-1", *common, "slurm/detect_modmap.sh", *tiny)
    records = wait_done(slurm, again, 300, sorted(tmp_path.glob(f"*-{again}_*.out")))
    assert sorted((r["JobState"], r["ExitCode"]) for r in records) == [("COMPLETED", "0:0")] * 2, records
    rerun = "".join(p.read_text() for p in tmp_path.glob(f"detect_modmap-{again}_*.out"))
    assert rerun.count("every class is finished") == 2, rerun
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()} == before


def test_cluster_script_reports_why_it_cannot_run(tmp_path):
    """Without root the bring-up ends with status 77 and a reason (the fixture turns it into a skip)."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run the script as another user")
    out = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "bash", str(CLUSTER), "up"],
                         capture_output=True, text=True, timeout=60, env={**os.environ,
                                                                           "DINODEPTH_SLURM_DIR": str(tmp_path / "s")})
    assert out.returncode == 77 and "local SLURM unavailable:" in out.stderr and "root" in out.stderr


def test_launch_on_a_cpu_partition_asks_for_one_task_per_node_and_no_gpu(pretrain_config):
    from pretrain.config import PretrainConfig
    from pretrain.launch import executor_parameters
    from shared.config import load_config

    cfg = load_config(PretrainConfig, str(pretrain_config), ["slurm.gpus_per_node=0", "slurm.nodes=3"])
    params = executor_parameters(cfg, "slurm", visible_gpus=0)
    assert (params["nodes"], params["tasks_per_node"]) == (3, 1) and "gpus_per_node" not in params


def test_launch_tasks_per_node(pretrain_config):
    """``slurm.tasks_per_node``: gloo ranks per node on a CPU partition; with GPUs one rank per GPU only."""
    from pretrain.config import PretrainConfig
    from pretrain.launch import LaunchError, executor_parameters
    from shared.config import load_config

    def params(*overrides: str) -> dict:
        return executor_parameters(load_config(PretrainConfig, str(pretrain_config), list(overrides)), "slurm",
                                   visible_gpus=0)

    cpu = params("slurm.gpus_per_node=0", "slurm.tasks_per_node=2", "slurm.nodes=2")
    assert (cpu["nodes"], cpu["tasks_per_node"]) == (2, 2) and "gpus_per_node" not in cpu
    assert params("slurm.gpus_per_node=4")["tasks_per_node"] == 4  # default: one per GPU
    assert params("slurm.gpus_per_node=4", "slurm.tasks_per_node=4")["tasks_per_node"] == 4
    with pytest.raises(LaunchError, match="every rank drives one GPU"):
        params("slurm.gpus_per_node=4", "slurm.tasks_per_node=2")
    with pytest.raises(LaunchError, match=">= 1"):
        params("slurm.gpus_per_node=0", "slurm.tasks_per_node=0")
    local = executor_parameters(load_config(PretrainConfig, str(pretrain_config), ["slurm.tasks_per_node=2"]),
                                "local", visible_gpus=0)
    assert (local["tasks_per_node"], local["gpus_per_node"]) == (2, 0)  # two CPU processes here
