"""The detect/run.py command: configuration, bad inputs and end-to-end runs on the synthetic benchmark."""

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from detect.config import DetectConfig, parse_config
from detect.pipeline import run
from detect.pipeline.base import RunError
from detect.run import main

REPO = Path(__file__).resolve().parents[1]
TINY = ["--image-encoder", "random", "--random-encoder-arch", "vit_tiny_patch14", "--random-encoder-depth", "1",
        "--image-size", "56", "--epochs", "2", "--no-progress", "--encoder-batch-size", "4"]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """A tiny synthetic benchmark (1 class, 3 views, 1 nominal + 1 anomalous test instance) and a tiny
    DINO-Depth export."""
    from data_prep.synthetic import SynthConfig, generate_benchmark
    from pretrain.export import default_depth_input_norm, write_export
    from shared.vit import create_vit

    root = tmp_path_factory.mktemp("bench")
    data = root / "data"
    generate_benchmark(data, SynthConfig(classes=("vase",), n_views=3, width=64, height=48, n_test=2,
                                         setups=("real2real",)), progress=False)
    torch.manual_seed(0)
    vit = create_vit("vit_tiny_patch14", in_chans=1, depth=1)
    ckpt = write_export(root / "dd.pth", vit.state_dict(), vit.cfg.to_dict(), default_depth_input_norm(), {},
                        safetensors=False)
    return data, ckpt


def test_config_precedence(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump({"epochs": 7, "batch_size": 8, "aggregation": "mean"}))
    cfg = parse_config(["--config", str(cfg_file), "--data", "/d", "--epochs", "9", "--fg-connectivity", "8",
                        "--classes", "a,b", "aggregation=prod", "pro_limits=[0.3]"])
    assert (cfg.epochs, cfg.batch_size, cfg.aggregation) == (9, 8, "prod")
    assert cfg.classes == ["a", "b"] and cfg.fg_connectivity == 8 and cfg.pro_limits == [0.3]
    assert cfg.data_root == "/d"
    with pytest.raises(Exception, match="unknown config key"):
        parse_config(["--data", "/d", "nonsense=1"])
    with pytest.raises(Exception, match="multiple of 14"):
        parse_config(["--data", "/d", "--image-size", "100"])


def test_presets_load():
    for preset in sorted((REPO / "configs" / "detect").glob("*.yaml")):
        cfg = parse_config(["--config", str(preset), "--data", "/d"])
        assert isinstance(cfg, DetectConfig)
    paper = parse_config(["--config", str(REPO / "configs/detect/paper.yaml"), "--data", "/d"])
    assert (paper.epochs, paper.batch_size, paper.lr_max, paper.image_size) == (200, 48, 5e-4, 896)


def test_help_as_script_and_module():
    for cmd in ([sys.executable, "detect/run.py", "--help"], [sys.executable, "-m", "detect.run", "--help"]):
        out = subprocess.run(cmd, check=False, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert "--image-encoder-weights" in out.stdout and "--ckpt" in out.stdout


def test_bad_inputs_give_clear_errors(bench, tmp_path, capsys):
    data, ckpt = bench
    assert main(["--data", str(data), "--ckpt", str(tmp_path / "nope.pth"), *TINY, "--out", str(tmp_path)]) == 2
    assert "ViT-S/14" in capsys.readouterr().err
    assert main(["--data", str(data), "--ckpt", str(ckpt), "--out", str(tmp_path), "--no-progress"]) == 2
    assert "--image-encoder-weights" in capsys.readouterr().err
    assert main(["--data", str(tmp_path / "missing"), "--ckpt", str(ckpt), *TINY, "--out", str(tmp_path)]) == 2
    assert "missing" in capsys.readouterr().err
    # calibration missing: the error names the view and says how to run without volumes
    broken = tmp_path / "broken"
    shutil.copytree(data, broken)
    for calib in broken.glob("vase/*/calib"):
        shutil.rmtree(calib)
    code = main(["--data", str(broken), "--ckpt", str(ckpt), *TINY, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "calibration" in err and "--calib-reader none" in err


def test_end_to_end_tiny_run(bench, tmp_path):
    data, ckpt = bench
    out = tmp_path / "run"
    assert main(["--data", str(data), "--ckpt", str(ckpt), *TINY, "--out", str(out), "--save-maps", "orig",
                 "--viz"]) == 0
    cls = out / "real2real" / "vase"
    for name in ("model.pt", "train_log.jsonl", "scores.csv", "metrics.json", "timing.json"):
        assert (cls / name).is_file(), name
    for name in ("config.yaml", "results.md", "results.csv", "results.json"):
        assert (out / name).is_file(), name
    assert yaml.safe_load((out / "config.yaml").read_text())["ckpt"] == str(ckpt)
    metrics = json.loads((cls / "metrics.json").read_text())
    assert metrics["random_image_encoder"] is True
    assert metrics["eval_domain"] == "occupied" and metrics["connectivity"] == 26
    assert metrics["pro_variant"] == "exact" and set(metrics["voxel_aupro"]) == {"0.3", "0.1", "0.05", "0.01"}
    assert 0 <= metrics["voxel_auroc"] <= 1 and 0 <= metrics["image_auroc"] <= 1
    assert "RANDOM IMAGE ENCODER" in (out / "results.md").read_text()
    rows = list(csv.DictReader((cls / "scores.csv").open()))
    assert sorted(int(r["gt_label"]) for r in rows) == [0, 1]
    for r in rows:
        with np.load(cls / "volumes" / f"{r['instance']}.npz") as vol:
            assert vol["indices"].shape[1] == 3 and vol["scores"].dtype == np.float32
            assert float(vol["instance_score"]) == pytest.approx(float(r["pred_score"]), rel=1e-6)
            assert bool(vol["random_image_encoder"])
        maps = cls / "maps" / r["instance"]
        assert (maps / "1_combined.npy").is_file() and (maps / "1_combined.png").is_file()
        assert np.load(maps / "1_img2depth.npy").shape == (48, 64)
    log = [json.loads(line) for line in (cls / "train_log.jsonl").read_text().splitlines()]
    assert [rec["epoch"] for rec in log] == [1, 2]
    # evaluate again from the saved predictions alone gives the same metrics
    cfg = parse_config(["--data", str(data), "--ckpt", str(ckpt), *TINY, "--out", str(out), "--mode", "evaluate"])
    again = run(cfg)["real2real"]["vase"]
    assert again["voxel_aupro"] == metrics["voxel_aupro"] and again["image_auroc"] == metrics["image_auroc"]


def test_view_mismatch_between_fit_and_predict(bench, tmp_path):
    from shared.checkpoint import load_checkpoint, save_checkpoint

    data, ckpt = bench
    out = tmp_path / "run"
    cfg = parse_config(["--data", str(data), "--ckpt", str(ckpt), *TINY, "--out", str(out), "--mode", "fit"])
    run(cfg)
    path = out / "real2real" / "vase" / "model.pt"
    obj = load_checkpoint(path)
    obj["config"]["n_views"] = 4
    obj["config"]["view_stems"] = ["1", "2", "3", "4"]
    save_checkpoint(obj, path)
    cfg = parse_config(["--data", str(data), "--ckpt", str(ckpt), *TINY, "--out", str(out), "--mode", "predict"])
    with pytest.raises(RunError, match="trained on 4 views"):
        run(cfg)


@pytest.mark.slow
def test_end_to_end_both_setups_2d_only_and_cache_reuse(tmp_path):
    """Both training setups (EXR synthetic training views), 2D-only mode and feature-cache reuse."""
    from data_prep.synthetic import SynthConfig, generate_benchmark
    from pretrain.export import default_depth_input_norm, write_export
    from shared.vit import create_vit

    data = tmp_path / "data"
    generate_benchmark(data, SynthConfig(classes=("vase", "stool"), n_views=4, width=80, height=60, n_test=4),
                       progress=False)
    vit = create_vit("vit_tiny_patch14", in_chans=1, depth=2)
    ckpt = write_export(tmp_path / "dd.pth", vit.state_dict(), vit.cfg.to_dict(), default_depth_input_norm(), {},
                        safetensors=False)
    out = tmp_path / "run"
    args = ["--data", str(data), "--ckpt", str(ckpt), *TINY, "--out", str(out), "--setup", "both"]
    assert main(args) == 0
    table = (out / "results.csv").read_text()
    assert "synth2real" in table and "real2real" in table
    results = json.loads((out / "results.json").read_text())["results"]
    assert set(results) == {"real2real", "synth2real"} and set(results["real2real"]) == {"vase", "stool"}
    # the test instances were encoded once and reused by the second setup
    n_entries = len([p for p in (out / "features").iterdir() if p.is_dir()])
    assert n_entries == 2 * (4 + 2)  # per class: 4 test + 2 training instances
    out2d = tmp_path / "run2d"
    assert main(["--data", str(data), "--ckpt", str(ckpt), *TINY, "--out", str(out2d), "--calib-reader", "none",
                 "--classes", "vase", "--cache-dir", str(out / "features")]) == 0
    metrics = json.loads((out2d / "real2real" / "vase" / "metrics.json").read_text())
    assert "voxel_aupro" not in metrics and metrics["image_auroc"] is not None
