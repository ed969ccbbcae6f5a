"""Zoo checkpoints and their model cards (pretrain/model_card.py, issue 22 item 3)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep.synthetic import SynthConfig, generate_benchmark
from pretrain import model_card
from pretrain.config import PretrainConfig
from shared.checkpoint import verify_sha256_sidecar
from shared.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def _bench(out: Path, seed: int) -> Path:
    generate_benchmark(out, SynthConfig(classes=("vase", "bin"), n_views=4, width=160, height=120, n_test=4,
                                        seed=seed, setups=("real2real",), anomaly_scale=3.0))
    return out


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A 3-iteration run of the zoo depth preset with probes at 2 and at the end, and a second held-out set."""
    from pretrain.train import train

    base = tmp_path_factory.mktemp("zoo")
    heldout = _bench(base / "probe_set", seed=7)
    confirm = _bench(base / "confirm_set", seed=8)
    run = base / "run"
    overrides = {"train.output_dir": str(run), "data.glob": f"{heldout}/*/*/depth/*.npy", "train.ckpt_period": 0,
                 "train.eval_period": 2, "train.num_workers": 0, "train.batch_size_per_gpu": 4, "optim.epochs": 1,
                 "train.epoch_length": 3, "probe.root": str(heldout), "probe.size": 112, "probe.bootstrap": 100}
    cfg = load_config(PretrainConfig, ROOT / "configs/pretrain/zoo_depth_cpu.yaml",
                      [f"{k}={v}" for k, v in overrides.items()])
    assert train(cfg)["status"] == "finished"
    return run, heldout, confirm


def test_run_summary_entropies_and_verdict():
    records = [{"iteration": i, "teacher_entropy": e, "ibot_teacher_entropy": 1.0, "time_per_iteration": 0.5}
               for i, e in [(10, 6.0), (20, 5.0), (30, 4.0)]]
    good = {"event": "probe", "iteration": 30, "knn_class": {"beats_random": True}, "mask_knn": {"beats_random": True}}
    bad = {"event": "probe", "iteration": 30, "knn_class": {"beats_random": True}, "mask_knn": {"beats_random": False}}
    s = model_card.run_summary(records + [good], n_prototypes=1024, n_last=2)
    assert s["teacher_entropy_last"] == 4.0 and s["teacher_entropy_mean_last"] == pytest.approx(4.5)
    assert s["ln_k"] == pytest.approx(math.log(1024)) and s["probes"] == [good]
    assert model_card.beats_random_everywhere(good) and not model_card.beats_random_everywhere(bad)
    assert not model_card.beats_random_everywhere({"event": "probe", "iteration": 1})  # no probe: no claim


def test_install_writes_checkpoint_sidecar_and_card(finished_run, tmp_path):
    run, heldout, confirm = finished_run
    dest = tmp_path / "models" / "zoo" / "tiny_depth.pth"
    timings = tmp_path / "timings.tsv"
    timings.write_text("zoo depth pretraining\t12.5\t20.0\t1.0\n")
    out = model_card.install(run, dest, ["make zoo"], ["seed 7"], confirm_root=confirm, timings=timings)
    assert verify_sha256_sidecar(dest) is True and out["sha256"].read_text().split()[1] == dest.name
    card = out["card"].read_text()
    records = model_card.read_metrics(run)
    final = [r for r in records if r.get("event") == "probe"][-1]
    # The card carries the run's own numbers and a verdict computed from them.
    assert f"{final['mask_knn']['delta']:+.3f}" in card and f"{final['knn_class']['value']:.3f}" in card
    verdict = "yes" if model_card.beats_random_everywhere(final) else "no"
    assert f"iteration {final['iteration']}) every probe beats random init" in card
    assert f"above zero: **{verdict}**" in card
    assert "make zoo" in card and "21 s CPU" in card and "seed 7" in card
    confirm_record = json.loads(dest.with_suffix(".confirm.json").read_text())
    assert confirm_record["root"] == str(confirm) and set(confirm_record) >= {"knn_class", "mask_knn", "shape_ridge"}


def test_probe_export_reproduces_the_runs_final_probe(finished_run):
    """The probes recomputed on the exported file, on the run's own held-out set, equal the run's last
    probe event: the card's confirmation numbers are the same measurement on another set."""
    run, heldout, _ = finished_run
    final = [r for r in model_card.read_metrics(run) if r.get("event") == "probe"][-1]
    again = model_card.probe_export(run / "dinodepth.pth", heldout)
    for name in ("knn_class", "mask_knn", "shape_ridge"):
        assert again[name]["value"] == pytest.approx(final[name]["value"], abs=1e-6)
        assert again[name]["random"] == pytest.approx(final[name]["random"], abs=1e-6)
        assert again[name]["delta_ci95"] == pytest.approx(final[name]["delta_ci95"], abs=1e-6)


def test_install_refuses_an_unfinished_run(tmp_path):
    (tmp_path / "run").mkdir()
    with pytest.raises(FileNotFoundError, match="no final export"):
        model_card.install(tmp_path / "run", tmp_path / "x.pth", ["make zoo"])


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_zoo_depth_small(tmp_path):
    """`make zoo-depth` at toy size: data, probe sets, a resumable run, the installed checkpoint and card;
    a second call has nothing to do."""
    zoo, models = tmp_path / "zoo", tmp_path / "models"
    small = {"ZOO": str(zoo), "ZOO_MODELS": str(models), "ZOO_ENV": "", "PY": sys.executable,
             "ZOO_SYNTH_ARGS": "--classes vase stool --views 4 --size 96", "ZOO_NOMINAL_N": "1",
             "ZOO_PROBE_SYNTH": "--n-test 2 --anomaly-scale 3 --setup real2real",
             "ZOO_CONFIRM_SYNTH": "--n-test 2 --anomaly-scale 3 --setup real2real",
             "ZOO_DEPTH_ARGS": "optim.epochs=1 train.epoch_length=3 optim.warmup_epochs=0.5 train.eval_period=2 "
                               "train.batch_size_per_gpu=4 train.num_workers=0 probe.size=56 probe.bootstrap=50"}
    cmd = ["make", "--no-print-directory", "zoo-depth", *(f"{k}={v}" for k, v in small.items())]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    first = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    ckpt = models / "dinodepth_tiny_depth.pth"
    assert verify_sha256_sidecar(ckpt) is True
    card = ckpt.with_suffix(".md").read_text()
    assert "## Held-out probes during training" in card and "## Confirmation on a second held-out set" in card
    assert "zoo depth pretraining:" in card and "--seed 2026" in card and "zoo_depth_cpu.yaml" in card
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0 and "pretrain/train.py" not in again.stdout
