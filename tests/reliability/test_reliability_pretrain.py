"""Pretraining never loses work: kill -9 at random points (one mid-checkpoint-write), SLURM
pre-emption signals, a full disk at checkpoint time, a NaN batch.

The interrupted runs are real pretraining processes on the §16 tiny config (CPU, one thread, a
checkpoint every iteration) running the command-line entry point ``pretrain.train.main``: children
forked from a "zygote" process (it imports torch once and never computes, so forking is safe; each
child starts in milliseconds instead of the seconds torch takes to import), and, in the slow suite,
``python pretrain/train.py`` itself. Each interrupted run is then
resumed with the same command (in-process ``main``) and must end with the weights, optimizer
state, centers and loss log of the uninterrupted reference run, bit for bit.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from test_pretrain_train import PoisonedBatches
from test_pretrain_utils import single_thread, tiny_config, write_depth_folder  # noqa: F401

from pretrain.export import resolve_checkpoint_path
from pretrain.train import EXIT_ERROR, EXIT_NONFINITE, EXIT_OK, EXIT_REQUEUE, main, run_job
from shared.checkpoint import load_checkpoint
from shared.config import save_config

REPO = Path(__file__).resolve().parents[2]
ITERATIONS = 10  # tiny_config: epoch_length 10, 1 epoch
THREADS_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

# Forks pretraining processes on request (one JSON line per request on stdin; pid and exit status
# reported on stdout). A request may ask for the kill -9 to happen inside the process, half-way
# through writing the bytes of its n-th torch.save (a checkpoint), which no outside timing can hit.
ZYGOTE = r"""
import io, json, os, select, signal, sys, traceback
import torch
from pretrain import train

def report(obj):
    os.write(1, (json.dumps(obj) + "\n").encode())

def save_then_die(real, at):
    calls = [0]
    def save(obj, f, *args, **kwargs):
        calls[0] += 1
        if calls[0] == at and hasattr(f, "write"):
            buf = io.BytesIO()
            real(obj, buf, *args, **kwargs)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            f.flush()
            os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        return real(obj, f, *args, **kwargs)
    return save

def child(req):
    fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    if req.get("kill_at_save"):
        torch.save = save_then_die(torch.save, req["kill_at_save"])
    try:
        code = train.main(req["args"])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

children, pending = {}, b""
report({"ready": True})
while True:
    while children:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            break
        report({"id": children.pop(pid), "status": os.waitstatus_to_exitcode(status)})
    if select.select([0], [], [], 0.005)[0]:
        data = os.read(0, 65536)
        if not data:
            break
        pending += data
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            req = json.loads(line)
            pid = os.fork()
            if pid == 0:
                child(req)
            children[pid] = req["id"]
            report({"id": req["id"], "pid": pid})
for pid in children:
    os.kill(pid, signal.SIGKILL)
"""


class Zygote:
    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE], cwd=REPO, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env={**os.environ, **THREADS_ENV,
                                                                  "PYTHONPATH": str(REPO)})
        self.pids: dict[str, int] = {}
        self.status: dict[str, int] = {}
        self.ready = threading.Event()
        self._changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            msg = json.loads(line)
            with self._changed:
                if msg.get("ready"):
                    self.ready.set()
                elif "pid" in msg:
                    self.pids[msg["id"]] = msg["pid"]
                else:
                    self.status[msg["id"]] = msg["status"]
                self._changed.notify_all()

    def spawn(self, name: str, args: list[str], log: Path, kill_at_save: int | None = None) -> int:
        request = {"id": name, "args": args, "log": str(log), "kill_at_save": kill_at_save}
        self.proc.stdin.write((json.dumps(request) + "\n").encode())
        self.proc.stdin.flush()
        with self._changed:
            assert self._changed.wait_for(lambda: name in self.pids, timeout=120), "zygote did not fork"
        return self.pids[name]

    def close(self) -> None:
        """End of input: the zygote kills the children still running and exits."""
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@dataclass
class Child:
    """One pretraining process and when to interrupt it (after checkpoint ``after``, plus ``delay`` s)."""

    name: str
    run: Path
    sig: int | None = None
    after: int = 0
    delay: float = 0.0
    kill_at_save: int | None = None
    proc: subprocess.Popen | None = None  # a plain `python pretrain/train.py` process, or
    pid: int | None = None  # a child of the zygote
    returncode: int | None = None
    sent_at: int | None = None  # latest checkpoint when the signal was sent (-1: it had already exited)
    due: float | None = None
    log: str = ""
    extra: dict = field(default_factory=dict)


def _latest(run: Path) -> int | None:
    try:
        return int((run / "checkpoints" / "latest").read_text().strip()[len("checkpoint_"):-len(".pth")])
    except (OSError, ValueError):
        return None


def _args(config: Path, run: Path) -> list[str]:
    return ["--config", str(config), f"train.output_dir={run}"]


def _start(child: Child, config: Path, zygote: Zygote | None) -> None:
    child.run.mkdir(parents=True, exist_ok=True)
    log = child.run.parent / f"{child.name}.log"
    if zygote is None:  # the script itself, as a user or the SLURM script starts it
        with open(log, "w") as err:  # the child keeps its own descriptor
            child.proc = subprocess.Popen([sys.executable, str(REPO / "pretrain" / "train.py"),
                                           *_args(config, child.run)], cwd=REPO, env={**os.environ, **THREADS_ENV},
                                          stdout=subprocess.DEVNULL, stderr=err)
    else:
        child.pid = zygote.spawn(child.name, _args(config, child.run), log, child.kill_at_save)
    child.extra["log"] = log


def _drive(children: list[Child], zygote: Zygote | None, timeout: float = 300.0) -> None:
    """Signal each child once its checkpoint ``after`` exists (plus its delay); wait until all exited."""
    deadline = time.monotonic() + timeout

    def poll(c: Child) -> int | None:
        if c.returncode is None:
            c.returncode = c.proc.poll() if c.proc is not None else zygote.status.get(c.name)
        return c.returncode

    while any(poll(c) is None for c in children):
        now = time.monotonic()
        if now > deadline:
            for c in children:
                if poll(c) is None:
                    os.kill(c.proc.pid if c.proc is not None else c.pid, signal.SIGKILL)
            pytest.fail("pretraining processes did not finish in time")
        for c in children:
            if c.sig is None or c.sent_at is not None or poll(c) is not None:
                continue
            latest = _latest(c.run)
            if latest is not None and latest >= c.after:
                c.due = now + c.delay if c.due is None else c.due
                if now >= c.due:
                    c.sent_at = _latest(c.run)
                    try:
                        os.kill(c.proc.pid if c.proc is not None else c.pid, c.sig)
                    except ProcessLookupError:
                        # It exited (and the zygote reaped it) between the poll and the signal: no signal
                        # was delivered; its exit status arrives through the next poll.
                        c.sent_at = -1
        time.sleep(0.002)
    for c in children:
        c.log = Path(c.extra["log"]).read_text()


def _final_state(run: Path) -> dict:
    ckpt = load_checkpoint(run / "checkpoints" / f"checkpoint_{ITERATIONS:08d}.pth")
    state = {f"student.{k}": v for k, v in ckpt["student"].items()}
    state.update({f"teacher.{k}": v for k, v in ckpt["teacher"].items()})
    state.update({f"center.{k}": v for k, v in ckpt["centers"].items()})
    for name, tensors in ckpt["optimizer"]["state"].items():
        state.update({f"optim.{name}.{k}": v for k, v in tensors.items() if torch.is_tensor(v)})
    return state


def _losses(run: Path) -> list[tuple]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["iteration"], r["total"], r["dino_local"], r["ibot"], r["koleo"]) for r in records if "event" not in r]


def _assert_resumes_exactly(run: Path, config: Path, reference: Path, checkpoint: bool = True) -> None:
    """The folder holds a loadable latest checkpoint; the same command finishes the run exactly."""
    if checkpoint:
        ckpt = load_checkpoint(resolve_checkpoint_path(run))  # weights_only load: complete, not truncated
        assert ckpt["iteration"] == _latest(run) and 1 <= ckpt["iteration"] <= ITERATIONS
    assert main(_args(config, run)) == EXIT_OK
    expected, got = _final_state(reference), _final_state(run)
    assert expected.keys() == got.keys()
    assert [k for k in expected if not torch.equal(expected[k], got[k])] == []
    assert _losses(run) == _losses(reference)  # every iteration logged once, same values
    assert (run / "dinodepth.pth").is_file()
    assert not list((run / "checkpoints").glob(".*.tmp")), "a killed write's temp file was left behind"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Data, config file and the uninterrupted reference run."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("pretrain_faults")
    data = write_depth_folder(tmp / "depth", n=8)
    config = save_config(tiny_config(tmp / "unused", **{"data.glob": f"{data}/*.npy", "train.ckpt_period": 1,
                                                        "train.keep": 2}), tmp / "tiny.yaml")
    yield {"tmp": tmp, "config": config}
    torch.set_num_threads(previous)


def _random_kills(tmp: Path, seeds: tuple[int, ...]) -> list[Child]:
    kills = []
    for seed in seeds:
        rng = random.Random(seed)
        kills.append(Child(f"kill9_seed{seed}", tmp / f"kill9_seed{seed}", signal.SIGKILL, after=rng.randint(1, 8),
                           delay=rng.uniform(0.0, 0.25)))
    return kills


@pytest.fixture(scope="module")
def interrupted(setup):
    """The interrupted runs, started together; the reference run trains in this process meanwhile."""
    tmp, config = setup["tmp"], setup["config"]
    children = [*_random_kills(tmp, (0, 1, 2)),
                Child("kill9_mid_write", tmp / "kill9_mid_write", kill_at_save=3),  # checkpoint 3, half written
                Child("sigterm", tmp / "sigterm", signal.SIGTERM, after=2),
                Child("sigusr1", tmp / "sigusr1", signal.SIGUSR1, after=2)]
    zygote = Zygote()
    try:
        assert main(_args(config, tmp / "reference")) == EXIT_OK
        assert zygote.ready.wait(timeout=240), "the zygote did not start"
        for child in children:
            _start(child, config, zygote)
        _drive(children, zygote)
        yield {c.name: c for c in children} | {"reference": tmp / "reference", "zygote": zygote}
    finally:
        zygote.close()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kill9_at_a_random_point_leaves_a_loadable_checkpoint_and_resume_is_exact(setup, interrupted, seed):
    child = interrupted[f"kill9_seed{seed}"]
    assert child.returncode in (-signal.SIGKILL, EXIT_OK), child.log  # 0: it finished before the kill came
    assert child.returncode == -signal.SIGKILL or _latest(child.run) == ITERATIONS
    _assert_resumes_exactly(child.run, setup["config"], interrupted["reference"])


def test_kill9_mid_checkpoint_write_keeps_the_previous_checkpoint(setup, interrupted):
    child = interrupted["kill9_mid_write"]
    assert child.returncode == -signal.SIGKILL, child.log
    ckpts = child.run / "checkpoints"
    partial = list(ckpts.glob(".checkpoint_00000003.pth.*.tmp"))
    assert partial and partial[0].stat().st_size > 0  # killed half-way through the write...
    assert not (ckpts / "checkpoint_00000003.pth").exists()  # ...so it never appeared under its name
    assert _latest(child.run) == 2
    assert [r[0] for r in _losses(child.run)] == [0, 1, 2]  # iteration 2 logged, its checkpoint not written
    _assert_resumes_exactly(child.run, setup["config"], interrupted["reference"])  # logs iteration 2 once


@pytest.mark.parametrize("name,sig", [("sigterm", "SIGTERM"), ("sigusr1", "SIGUSR1")])
def test_preemption_signal_checkpoints_then_exits_with_the_requeue_status(setup, interrupted, name, sig):
    child = interrupted[name]
    assert child.returncode == EXIT_REQUEUE, child.log
    stopped = _latest(child.run)
    assert child.sent_at is not None and child.sent_at <= stopped < ITERATIONS
    assert f"received {sig}" in child.log
    assert f"preempted at iteration {stopped}: checkpoint written; exit status 75" in child.log
    assert "Traceback" not in child.log
    _assert_resumes_exactly(child.run, setup["config"], interrupted["reference"])


@pytest.mark.slow
def test_sigterm_to_the_script_exits_with_the_requeue_status(setup, interrupted):
    """The same as above with ``python pretrain/train.py`` itself (the status the shell sees)."""
    child = Child("sigterm_script", setup["tmp"] / "sigterm_script", signal.SIGTERM, after=2)
    _start(child, setup["config"], None)
    try:
        _drive([child], None)
    finally:
        if child.proc.poll() is None:
            child.proc.kill()
    assert child.returncode == EXIT_REQUEUE, child.log
    assert "received SIGTERM" in child.log and "Traceback" not in child.log
    _assert_resumes_exactly(child.run, setup["config"], interrupted["reference"])


@pytest.mark.slow
def test_kill9_at_more_random_points(setup, interrupted):
    tmp, config, zygote = setup["tmp"], setup["config"], interrupted["zygote"]
    children = [*_random_kills(tmp, (3, 4, 5, 6, 7)),
                Child("kill9_first_write", tmp / "kill9_first_write", kill_at_save=1),  # no checkpoint yet
                Child("kill9_export", tmp / "kill9_export", kill_at_save=ITERATIONS + 1)]  # the final export
    for child in children:
        _start(child, config, zygote)
    _drive(children, zygote)
    for child in children[:-2]:
        assert child.returncode in (-signal.SIGKILL, EXIT_OK), child.log
        _assert_resumes_exactly(child.run, config, interrupted["reference"])
    first, export = children[-2:]
    assert first.returncode == export.returncode == -signal.SIGKILL
    assert _latest(first.run) is None and not (first.run / "checkpoints" / "checkpoint_00000001.pth").exists()
    _assert_resumes_exactly(first.run, config, interrupted["reference"], checkpoint=False)  # starts over
    assert _latest(export.run) == ITERATIONS and not (export.run / "dinodepth.pth").exists()
    _assert_resumes_exactly(export.run, config, interrupted["reference"])  # writes the export it lacks


def test_disk_full_during_checkpoint_save_is_a_clear_error_and_keeps_the_last_checkpoint(
        setup, interrupted, disk_full, capfd):
    config, run = setup["config"], setup["tmp"] / "disk_full"
    assert main([*_args(config, run), "train.stop_at_iteration=2"]) == EXIT_OK
    size = (run / "checkpoints" / "checkpoint_00000002.pth").stat().st_size
    disk = disk_full(run / "checkpoints", free_bytes=size // 2)  # checkpoint 3 does not fit
    assert main(_args(config, run)) == EXIT_ERROR
    assert disk.hits == 1
    message = capfd.readouterr().err
    assert "could not write checkpoint" in message and "checkpoint_00000003.pth" in message
    assert "No space left on device" in message and "still checkpoint_00000002.pth" in message
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "checkpoint_00000001.pth", "checkpoint_00000002.pth", "latest"]  # no partial file visible
    assert load_checkpoint(resolve_checkpoint_path(run))["iteration"] == 2
    disk.free = 1 << 40  # space freed: the same command resumes and ends like an uninterrupted run
    _assert_resumes_exactly(run, config, interrupted["reference"])


def test_nan_batch_trips_the_guard_with_a_report_not_silent_divergence(tmp_path, monkeypatch, capfd):
    import pretrain.train as train_mod

    real = train_mod.MultiCropBatches
    monkeypatch.setattr(train_mod, "MultiCropBatches", lambda *a, **k: PoisonedBatches(real(*a, **k), 3))
    data = write_depth_folder(tmp_path / "depth", n=6)
    cfg = tiny_config(tmp_path / "run", **{"train.ckpt_period": 1, "data.glob": f"{data}/*.npy"})
    code, result = run_job(cfg, resume=False)  # the body of `python pretrain/train.py`
    assert code == EXIT_NONFINITE == 2 and result is None
    err = capfd.readouterr().err
    assert "ERROR pretrain: divergence: non-finite dino_local" in err and "at iteration 3" in err
    assert "last good checkpoint: iteration 3" in err
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    event = [r for r in records if r.get("event") == "nonfinite"]
    assert len(event) == 1 and event[0]["iteration"] == 3 and "total" in event[0]["components"]
    ckpt = load_checkpoint(resolve_checkpoint_path(tmp_path / "run"))
    assert ckpt["iteration"] == 3 and all(torch.isfinite(v).all() for v in ckpt["student"].values())
