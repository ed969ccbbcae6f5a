"""Every command-line entry point: ``--help`` without heavy imports, one-line argument errors with
exit status 2, user errors as one ``error:`` message naming the file (no traceback unless
``--debug``). Conventions: :mod:`shared.cli`, ``docs/reliability.md``.

The scripts run as users run them (``python <script>``), in parallel: each is a fresh interpreter.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CLIS = [
    "data_prep/convert.py", "data_prep/pseudo_depth.py", "data_prep/synthetic.py", "data_prep/inspect_shards.py",
    "pretrain/train.py", "pretrain/launch.py", "pretrain/export.py", "pretrain/model_card.py",
    "detect/run.py", "detect/ablate.py", "detect/report.py", "detect/demo_figures.py",
    "detect/gt_projection_check.py", "detect/single_view_report.py", "detect/data/preview.py",
    "detect/maxima_check.py", "bench/run.py", "shared/sysdeps.py",
]
HEAVY = ("torch", "torchvision", "transformers", "open3d", "timm", "webdataset")
MULTI_LINE_ARG_ERRORS: set[str] = set()  # CLIs allowed argparse's usage block before the error line
TRACEBACK = "Traceback (most recent call last)"


def run(args: list[str], env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})})


def imported_modules(importtime_stderr: str) -> set[str]:
    """Top-level package names from ``python -X importtime`` output."""
    names = set()
    for line in importtime_stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return names


def run_all(commands: dict[str, list[str]]) -> dict[str, subprocess.CompletedProcess]:
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {key: pool.submit(run, args) for key, args in commands.items()}
        return {key: f.result() for key, f in futures.items()}


@pytest.fixture(scope="module")
def light_runs(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """``--help`` and a bad option of every script, plus missing inputs of the light ones."""
    tmp = tmp_path_factory.mktemp("cli")
    missing = tmp / "does_not_exist"
    commands = {}
    for cli in CLIS:
        commands[("help", cli)] = ["-X", "importtime", cli, "--help"]
        commands[("bad", cli)] = ["-X", "importtime", cli, "--no-such-option"]
    for cli, args in MISSING_LIGHT.items():
        commands[("missing", cli)] = [cli, *[a.format(missing=missing, tmp=tmp) for a in args]]
        commands[("debug", cli)] = [cli, *[a.format(missing=missing, tmp=tmp) for a in args], "--debug"]
    return run_all(commands) | {"missing_path": missing}


# Missing input → "error: <message naming it>", status 2, before any heavy import.
MISSING_LIGHT = {
    "data_prep/convert.py": ["--source", "folder", "--root", "{missing}", "--out", "{tmp}/shards"],
    "data_prep/inspect_shards.py": ["{missing}"],
    "detect/gt_projection_check.py": ["--data", "{missing}"],
    "detect/data/preview.py": ["--root", "{missing}", "--out", "{tmp}/preview.png"],
    "detect/report.py": ["--run", "{missing}", "--out", "{tmp}/report.html"],
    "pretrain/model_card.py": ["--run", "{missing}", "--install", "{tmp}/x.pth"],
}


def test_every_entry_point_is_listed():
    scripts = {str(p.relative_to(REPO)) for d in ("data_prep", "pretrain", "detect", "shared")
               for p in (REPO / d).rglob("*.py") if 'if __name__ == "__main__"' in p.read_text()}
    # bench/: the single entry point bench/run.py runs the standalone bench_*.py scripts
    assert scripts | {"bench/run.py"} == set(CLIS)


@pytest.mark.parametrize("cli", CLIS)
def test_help_answers_without_heavy_imports(light_runs, cli):
    out = light_runs[("help", cli)]
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage" in out.stdout.lower() or cli == "detect/single_view_report.py" and "other options" in out.stdout
    heavy = imported_modules(out.stderr) & set(HEAVY)
    assert not heavy, f"{cli} --help imports {sorted(heavy)}"
    if cli not in MULTI_LINE_ARG_ERRORS and "usage" in out.stdout.lower():
        assert "--debug" in out.stdout  # shared.cli.ArgumentParser


@pytest.mark.parametrize("cli", CLIS)
def test_bad_argument_is_a_one_line_error_with_status_2(light_runs, cli):
    out = light_runs[("bad", cli)]
    err = [line for line in out.stderr.splitlines() if not line.startswith("import time:")]
    assert out.returncode == 2, out.stderr[-2000:]
    assert TRACEBACK not in out.stderr
    assert re.search(r"error: .*(--no-such-option|required)", err[-1]), err
    if cli not in MULTI_LINE_ARG_ERRORS:
        assert len(err) == 1, err
    assert not imported_modules(out.stderr) & set(HEAVY)


@pytest.mark.parametrize("cli", sorted(MISSING_LIGHT))
def test_missing_input_is_a_clear_error_naming_it(light_runs, cli):
    out = light_runs[("missing", cli)]
    assert out.returncode == 2, out.stderr[-2000:]
    assert TRACEBACK not in out.stderr
    assert out.stderr.startswith("error: ") and str(light_runs["missing_path"]) in out.stderr


@pytest.mark.parametrize("cli", sorted(MISSING_LIGHT))
def test_debug_flag_shows_the_traceback(light_runs, cli):
    out = light_runs[("debug", cli)]
    assert out.returncode == 1 and TRACEBACK in out.stderr, out.stderr[-2000:]
    assert str(light_runs["missing_path"]) in out.stderr.splitlines()[-1]


def test_debug_environment_variable_shows_the_traceback(tmp_path):
    out = run(["data_prep/inspect_shards.py", str(tmp_path / "nowhere")], env={"DINODEPTH_DEBUG": "1"})
    assert out.returncode == 1 and TRACEBACK in out.stderr and "FileNotFoundError" in out.stderr


def test_trainer_config_errors_keep_the_documented_status_1(tmp_path, capsys):
    # In-process (torch is already imported here); the slow test below runs the script.
    from pretrain.train import EXIT_ERROR, main

    missing = tmp_path / "missing.yaml"
    assert main(["--config", str(missing)]) == EXIT_ERROR == 1
    err = capsys.readouterr().err
    assert err.strip() == f"error: config file {missing} does not exist"
    assert main(["no_such.key=1"]) == EXIT_ERROR
    assert "unknown config key(s): no_such" in capsys.readouterr().err


def test_export_of_a_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    from pretrain.export import main

    assert main(["--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "x.pth")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: export failed:") and str(tmp_path / "run") in err
    assert not (tmp_path / "x.pth").exists()


@pytest.mark.slow
def test_heavy_scripts_report_missing_inputs_without_a_traceback(tmp_path):
    missing = tmp_path / "does_not_exist"
    commands = {
        ("pretrain/train.py", 1): ["pretrain/train.py", "--config", f"{missing}.yaml"],
        ("pretrain/launch.py", 1): ["pretrain/launch.py", "--config", f"{missing}.yaml"],
        ("pretrain/export.py", 1): ["pretrain/export.py", "--ckpt", str(missing), "--out", f"{tmp_path}/x.pth"],
        ("detect/run.py", 2): ["detect/run.py", "--data", str(missing), "--ckpt", f"{missing}.pth",
                               "--out", f"{tmp_path}/o"],
        ("detect/demo_figures.py", 2): ["detect/demo_figures.py", "--data", str(missing), "--detect", str(missing),
                                        "--out", f"{tmp_path}/f"],
        ("data_prep/pseudo_depth.py", 2): ["data_prep/pseudo_depth.py", "--source", "image_folder", "--root",
                                           str(missing), "--out", f"{tmp_path}/s", "--model", f"{missing}_model"],
    }
    results = run_all({key: args for key, args in commands.items()})
    for (cli, status), out in results.items():
        assert out.returncode == status, (cli, out.stderr[-2000:])
        assert TRACEBACK not in out.stderr, cli
        assert str(missing) in out.stderr, (cli, out.stderr[-2000:])
