"""Helpers shared by the benchmarks: device choice, checks against targets, subprocess workers, memory.

A benchmark module ``bench/bench_<name>.py`` has ``run(quick: bool) -> dict``. Figures that have a
target are listed under ``"checks"`` (see :func:`check`); the first check is also copied to the
top-level ``ratio`` / ``target`` / ``passed`` keys. ``"skipped"`` (a reason) marks a benchmark that
cannot run on this machine (e.g. needs CUDA).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEVICE_ENV = "BENCH_DEVICE"  # set by ``bench/run.py --device``; "auto" (default): CUDA when available


def device() -> str:
    """The device the benchmarks run on: ``$BENCH_DEVICE`` (cpu, cuda, auto) resolved."""
    import torch

    want = os.environ.get(DEVICE_ENV, "auto")
    if want == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"{DEVICE_ENV}={want} but CUDA is not available on this machine")
    return want


def sync(dev: str) -> None:
    if dev.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def check(name: str, value: float, target: float, op: str = ">=", unit: str = "", note: str = "") -> dict:
    """One figure against its target: ``value op target`` (op ``>=`` or ``<=``)."""
    if op not in (">=", "<="):
        raise ValueError(f"op must be '>=' or '<=', got {op!r}")
    value = float(value)
    passed = value >= target if op == ">=" else value <= target
    out = {"name": name, "value": value, "target": float(target), "op": op, "passed": bool(passed)}
    if unit:
        out["unit"] = unit
    if note:
        out["note"] = note
    return out


def with_checks(result: dict, checks: list[dict]) -> dict:
    """Attach ``checks`` and mirror the first one in ``ratio`` / ``target`` / ``passed``."""
    result["checks"] = checks
    if checks:
        first = checks[0]
        result["ratio"] = first["value"]
        result["target"] = first["target"]
        result["passed"] = all(c["passed"] for c in checks)
    return result


def skipped(reason: str, **extra) -> dict:
    return {"skipped": reason, **extra}


def load_avg() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # not available on this platform
        return []


def reset_peak_rss() -> bool:
    """Reset this process's peak-RSS mark (Linux ≥ 4.0: ``5 > /proc/self/clear_refs`` resets VmHWM), so
    that :func:`peak_rss_bytes` measures from now on — imports can leave a transient peak higher than
    the work measured afterwards. False where unsupported (the peak then covers the process's life)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (since :func:`reset_peak_rss`, where supported)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(kb * (1 if sys.platform == "darwin" else 1024))


def current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss_bytes()


def run_worker(module: str, args: list[str], timeout_s: float = 1800, env: dict | None = None) -> dict:
    """Run ``python -m <module> --worker <args>`` in a fresh process (its own peak memory, allocator
    and thread settings) and return the JSON object it prints last on stdout."""
    cmd = [sys.executable, "-m", module, "--worker", *args]
    full_env = {**os.environ, **(env or {})}
    res = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=REPO_ROOT, timeout=timeout_s,
                         env=full_env)
    if res.returncode != 0:
        raise RuntimeError(f"worker {' '.join(cmd[2:])} failed (exit {res.returncode}):\n{res.stderr[-4000:]}")
    lines = [line for line in res.stdout.strip().splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"worker {' '.join(cmd[2:])} printed no JSON result:\n{res.stdout[-2000:]}")
    return json.loads(lines[-1])


def linear_fit(xs: list[float], ys: list[float]) -> dict:
    """Least-squares y = a + b·x and the worst relative deviation of a point from the line."""
    import numpy as np

    x, y = np.asarray(xs, float), np.asarray(ys, float)
    b, a = np.polyfit(x, y, 1)
    pred = a + b * x
    dev = float(np.max(np.abs(y - pred) / np.maximum(np.abs(y), 1e-12)))
    ss_res = float(np.sum((y - pred) ** 2))
    ss_tot = float(np.sum((y - y.mean()) ** 2)) or 1.0
    return {"intercept": float(a), "slope": float(b), "r2": 1.0 - ss_res / ss_tot, "max_rel_dev": dev}


class Timer:
    """Wall and process-CPU seconds of a block (CPU time counts every thread of the process)."""

    def __enter__(self) -> Timer:
        self.t0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self.t0
        self.cpu = time.process_time() - self.c0
