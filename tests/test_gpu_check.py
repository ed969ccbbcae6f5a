"""bench/gpu_check.py: the one-command GPU check; its CPU rehearsal (--dry-run) runs here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _run(*args: str, timeout: float = 1500) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "bench/gpu_check.py", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_help_and_refusal_without_cuda(tmp_path, capsys):
    from bench import gpu_check

    with pytest.raises(SystemExit) as exc:
        gpu_check.main(["--help"])
    assert exc.value.code == 0 and "--dry-run" in capsys.readouterr().out
    assert gpu_check.main(["--only", "nonsense", "--dry-run", "--out", str(tmp_path / "x.json")]) == 2
    assert "unknown step" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert gpu_check.main(["--out", str(tmp_path / "x.json")]) == 2
        assert "no CUDA device" in capsys.readouterr().err and not (tmp_path / "x.json").exists()


@pytest.mark.slow
def test_dry_run_passes_on_cpu(tmp_path):
    """The whole sequence at toy sizes on the CPU: every step ok (xformers skipped: CPU), one JSON."""
    from bench.gpu_check import STEPS

    target = tmp_path / "gpu_check.json"
    out = _run("--dry-run", "--out", str(target))
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    record = json.loads(target.read_text())
    assert record["dry_run"] and record["failed"] == []
    assert list(record["steps"]) == list(STEPS)
    for name, entry in record["steps"].items():
        assert entry["status"] in ("ok", "skipped"), (name, entry)
    assert record["steps"]["xformers"]["status"] == "skipped"
    augment = record["steps"]["device_augment"]
    assert augment["global_max_ulp"] == 0 and augment["local_validity_equal"]
    train = record["steps"]["train_single"]
    assert train["logged_iterations"] == [0, 1, 2, 3] and train["export_loaded"]
    assert train["data_s"] >= 0 and train["step_s"] > 0
    assert record["steps"]["table8"]["bf16"]["n_views"] == 3
