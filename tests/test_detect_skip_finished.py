"""``--skip-finished``: a re-submitted detection task skips the classes whose outputs are complete and
were made with the same settings, and rewrites nothing (slurm/detect_modmap.sh arrays)."""

import json
from pathlib import Path

import pytest
import torch

from detect.config import parse_config
from detect.pipeline.base import FINISHED_MARKER, FinishedClasses, run_classes
from detect.run import main

TINY = ["--image-encoder", "random", "--random-encoder-arch", "vit_tiny_patch14", "--random-encoder-depth", "1",
        "--image-size", "56", "--epochs", "2", "--no-progress", "--encoder-batch-size", "4"]


def _loop(tmp_path: Path, mode: str, skip: bool, calls: list, fail_on: str = "") -> dict:
    """run_classes over classes a, b with callbacks that record what ran (and write metrics.json)."""
    cfg = parse_config(["--data", "/d", "--out", str(tmp_path), "--mode", mode,
                        *(["--skip-finished"] if skip else [])])
    finished = FinishedClasses(cfg, lambda setup, c: tmp_path / setup / c)

    def stage(name):
        def call(setup, c):
            if c == fail_on:
                raise KeyboardInterrupt  # a task killed in the middle of a class
            calls.append((name, c))
            folder = tmp_path / setup / c
            folder.mkdir(parents=True, exist_ok=True)
            if name == "evaluate":
                (folder / "metrics.json").write_text(json.dumps({"class": c, "image_auroc": 0.5}))
                return {"class": c, "image_auroc": 0.5}
        return call

    return run_classes(mode, ["real2real"], ["a", "b"], stage("fit"), stage("predict"), stage("evaluate"),
                       finished=finished)


def test_finished_classes_are_skipped_and_a_killed_class_is_not(tmp_path, capsys):
    calls: list = []
    with pytest.raises(KeyboardInterrupt):
        _loop(tmp_path, "all", True, calls, fail_on="b")
    assert (tmp_path / "real2real/a" / FINISHED_MARKER).is_file()
    assert not (tmp_path / "real2real/b" / FINISHED_MARKER).exists()  # killed: no marker
    calls.clear()
    results = _loop(tmp_path, "all", True, calls)
    assert calls == [("fit", "b"), ("predict", "b"), ("evaluate", "b")]  # a skipped, b redone
    assert results["real2real"]["a"] == {"class": "a", "image_auroc": 0.5}  # a's saved metrics stand in
    assert "[real2real/a] skipped: finished" in capsys.readouterr().err
    calls.clear()
    _loop(tmp_path, "evaluate", True, calls)
    assert calls == []  # evaluate is among the recorded stages
    _loop(tmp_path, "all", False, calls)  # without the flag everything runs again
    assert len(calls) == 6


def test_a_redone_stage_invalidates_the_later_ones(tmp_path):
    calls: list = []
    _loop(tmp_path, "all", True, calls)
    _loop(tmp_path, "fit", False, calls)  # refitted: the predictions no longer follow the model
    marker = json.loads((tmp_path / "real2real/a" / FINISHED_MARKER).read_text())
    assert marker["stages"] == ["fit"]
    calls.clear()
    _loop(tmp_path, "all", True, calls)
    assert len(calls) == 6


def test_other_settings_are_not_finished(tmp_path):
    cfg = parse_config(["--data", "/d", "--out", str(tmp_path), "--skip-finished"])
    FinishedClasses(cfg, lambda s, c: tmp_path / s / c).finish("real2real", "a", [])
    same = parse_config(["--data", "/d", "--out", str(tmp_path), "--skip-finished", "--classes", "a", "--no-progress"])
    other = parse_config(["--data", "/d", "--out", str(tmp_path), "--skip-finished", "--epochs", "3"])
    assert FinishedClasses(same, lambda s, c: tmp_path / s / c).is_finished("real2real", "a")
    assert not FinishedClasses(other, lambda s, c: tmp_path / s / c).is_finished("real2real", "a")


def test_resubmitted_run_writes_nothing(tmp_path, capsys):
    from data_prep.synthetic import SynthConfig, generate_benchmark
    from pretrain.export import default_depth_input_norm, write_export
    from shared.vit import create_vit

    data = tmp_path / "data"
    generate_benchmark(data, SynthConfig(classes=("vase",), n_views=3, width=64, height=48, n_test=2,
                                         setups=("real2real",)), progress=False)
    torch.manual_seed(0)
    vit = create_vit("vit_tiny_patch14", in_chans=1, depth=1)
    ckpt = write_export(tmp_path / "dd.pth", vit.state_dict(), vit.cfg.to_dict(), default_depth_input_norm(), {},
                        safetensors=False)
    out = tmp_path / "run"
    args = ["--data", str(data), "--ckpt", str(ckpt), "--out", str(out), *TINY, "--skip-finished"]
    assert main(args) == 0
    files = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()}
    assert out / "real2real/vase" / FINISHED_MARKER in files and out / "results.md" in files
    capsys.readouterr()
    assert main(args) == 0
    assert "every class is finished" in capsys.readouterr().err
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()} == files
    assert main([*args, "--epochs", "3"]) == 0  # other settings: the class is computed again
    assert (out / "real2real/vase/model.pt").stat().st_mtime_ns > files[out / "real2real/vase/model.pt"][1]
