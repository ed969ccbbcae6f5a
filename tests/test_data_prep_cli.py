"""Command lines: convert.py (script and module), exit statuses, inspect_shards.py, presets."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep import fixtures
from data_prep.inspect_shards import main as inspect_main
from data_prep.presets import expand_patterns, preset_shard_patterns, preset_sources

REPO = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], check=False, cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("cli")
    fixtures.write_mvtec3d(base / "mvtec", categories=("bagel",))
    fixtures.write_synthetic_views(base / "synth")
    return base


def test_help():
    proc = run("data_prep/convert.py", "--help")
    assert proc.returncode == 0
    for flag in ("--splits", "--max-side", "--downsample", "--valid-frac-min", "--bg", "--realiad-unit",
                 "--folder-kind", "--folder-unit", "--folder-glob", "--shard-max-bytes", "--seed", "--workers",
                 "--num-parts", "--part", "Exit status"):
        assert flag in proc.stdout, flag


def test_script_and_module_runs_and_exit_statuses(roots, tmp_path):
    out = tmp_path / "shards"
    proc = run("data_prep/convert.py", "--source", "mvtec3d", "--root", str(roots / "mvtec"), "--out", str(out),
               "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "3 written" in proc.stdout and "check samples_written: ok" in proc.stdout
    proc = run("-m", "data_prep.convert", "--source", "synthetic", "--root", str(roots / "synth"), "--out",
               str(out), "--splits", "all", "--json", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["written"] == 9
    proc = run("data_prep/convert.py", "--source", "eyecandies", "--root", str(roots / "mvtec"), "--out",
               str(tmp_path / "x"), "--no-progress")
    assert proc.returncode == 2 and "Expected layout" in proc.stderr
    proc = run("data_prep/convert.py", "--source", "mvtec3d", "--root", str(roots / "mvtec"), "--out",
               str(tmp_path / "x"), "--splits", "training")
    assert proc.returncode == 2 and "unknown split" in proc.stderr
    # inspect: summary + previews (script form, so the stdlib 'inspect' module is not shadowed)
    proc = run("data_prep/inspect_shards.py", str(out), "--previews", "2", "--preview-dir", str(tmp_path / "pv"))
    assert proc.returncode == 0, proc.stderr
    assert "[mvtec3d] 3 samples" in proc.stdout and "[synthetic] 9 samples" in proc.stdout
    assert len(list((tmp_path / "pv").glob("*.png"))) == 2


def test_inspect_reports_problems(roots, tmp_path, capsys):
    from data_prep.convert import convert

    out = tmp_path / "s"
    convert("synthetic", roots / "synth", out, progress=False)
    assert inspect_main([str(out), "--previews", "0", "--verify"]) == 0
    shard = out / "synthetic-000000.tar"
    data = bytearray(shard.read_bytes())
    data[600] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert inspect_main([str(out), "--previews", "0", "--verify"]) == 1
    assert "sha256 mismatch" in capsys.readouterr().out
    assert inspect_main([str(tmp_path / "nothing")]) == 2


def test_presets(tmp_path):
    assert preset_sources("A") == ["mvtec3d", "eyecandies"]
    assert preset_sources("b") == ["mvtec3d", "eyecandies", "realiad_d3"]
    assert preset_sources("C")[3:] == ["mvtec_ad", "mvtec_loco", "mvtec_ad2", "visa"]
    with pytest.raises(ValueError, match="unknown data preset"):
        preset_sources("D")
    pats = preset_shard_patterns("A", [tmp_path])
    assert pats == [str(tmp_path / "mvtec3d-*.tar"), str(tmp_path / "eyecandies-*.tar")]
    (tmp_path / "mvtec3d-000000.tar").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="eyecandies"):
        expand_patterns(pats)
    (tmp_path / "eyecandies-000000.tar").write_bytes(b"")
    assert len(expand_patterns(pats)) == 2
