"""`make demo` end to end at a reduced size (2 classes, 4 views, 96 px, a few pretraining iterations): every
stage runs through its CLI, a second `make demo` skips them all, and a single stage can be redone alone."""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
STAGES = ("1 benchmark", "2a nominal instances", "2b shards", "3 DINO-Depth pretraining",
          "4b ModMap fit", "5a predict + evaluate", "5b PatchCore", "5c pictures", "5d report")


def _make(demo: Path, *targets: str) -> subprocess.CompletedProcess:
    small = {
        "DEMO": str(demo),
        "DEMO_ENV": "",  # this interpreter, as is (no .venv bootstrap)
        "PY": sys.executable,
        "DEMO_SYNTH_ARGS": "--classes vase stool --views 4 --size 96 --n-test 4",
        "DEMO_NOMINAL_N": "1",
        "DEMO_PRETRAIN_ARGS": "optim.epochs=1 train.epoch_length=6 optim.warmup_epochs=0.5 "
                              "teacher.warmup_teacher_temp_epochs=0.5 train.batch_size_per_gpu=8 "
                              "train.num_workers=0 train.progress=false",
        "DEMO_DETECT_ARGS": "--epochs 3 --image-size 56 --encoder-batch-size 4 --no-progress",
    }
    return subprocess.run(["make", "--no-print-directory", *targets, *(f"{k}={v}" for k, v in small.items())],
                          cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_demo_end_to_end_small(tmp_path):
    demo = tmp_path / "demo"
    first = _make(demo, "demo")
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    for k in range(1, 6):
        assert f"==> [{k}/5]" in first.stdout
    assert "I-AUROC" in first.stdout and "V-AUPRO@1%" in first.stdout  # the per-class table is printed
    timings = [line.split("\t")[0] for line in (demo / "timings.tsv").read_text().splitlines()]
    assert timings == list(STAGES)

    # stage outputs
    assert (demo / "pretrain" / "dinodepth.pth").is_file()
    shards = json.loads((demo / "shards" / "benchmark" / "manifest.json").read_text())
    assert shards  # the benchmark's training views only (default splits)
    results = json.loads((demo / "detect" / "results.json").read_text())
    assert set(results["results"]["real2real"]) == {"vase", "stool"} and not results["random_image_encoder"]
    assert set(results["results"]["synth2real"]) == {"vase", "stool"}  # demo_cpu.yaml: both setups
    config = (demo / "detect" / "config.yaml").read_text()
    assert "image_encoder: cnn" in config  # the ImageNet EfficientNet-Lite0 of the wheel
    pc = json.loads((demo / "patchcore" / "results.json").read_text())
    assert set(pc["results"]["real2real"]) == set(pc["results"]["synth2real"]) == {"vase", "stool"}
    assert "PatchCore" in pc["title"]
    for cls in ("vase", "stool"):
        cls_dir = demo / "detect" / "real2real" / cls
        rows = list(csv.DictReader((cls_dir / "scores.csv").open()))
        assert len(rows) == 4
        for r in rows:
            assert (cls_dir / "volumes" / f"{r['instance']}.ply").is_file()
            with np.load(demo / "volumes" / "real2real" / cls / f"{r['instance']}.npz") as dense:
                assert dense["anomaly"].ndim == 3
        assert (demo / "figures" / f"maps_{cls}.png").is_file() and (demo / "figures" / f"volume_{cls}.png").is_file()
    for name in ("pca_depth_features.png", "pretrain_curves.png", "mapping_curves.png", "instance_scores.png"):
        assert (demo / "figures" / name).is_file(), name
    html = (demo / "index.html").read_text()
    for cls in ("vase", "stool"):  # PatchCore's pictures too, under its table in the report
        assert (demo / "figures_patchcore" / f"maps_{cls}.png").is_file()
    assert not (demo / "figures_patchcore" / "mapping_curves.png").exists()  # PatchCore trains no mapping
    # ModMap: 2 setups × 2 classes × (maps, volume) + PCA, pretraining, mapping curves, instance scores;
    # PatchCore: 2 × 2 × (maps, volume) + instance scores
    assert (demo / "figures" / "maps_synth2real_vase.png").is_file()
    assert html.count("<img ") == 21 and "4b ModMap fit" in html and "PatchCore: pictures" in html
    assert "Reference: PatchCore" in html and "EfficientNet-Lite0" in html

    # everything done: nothing runs again
    again = _make(demo, "demo")
    assert again.returncode == 0 and "==> [" not in again.stdout and "I-AUROC" in again.stdout
    assert len((demo / "timings.tsv").read_text().splitlines()) == len(STAGES)

    # one stage alone: the pictures and the report are redone, nothing before them
    shutil.rmtree(demo / "figures")
    alone = _make(demo, "demo-report")
    assert alone.returncode == 0, alone.stderr[-4000:]
    redone = [line.split("\t")[0] for line in (demo / "timings.tsv").read_text().splitlines()][len(STAGES):]
    assert redone == ["5c pictures", "5d report"] and (demo / "figures" / "figures.json").is_file()
