"""Evaluation during pretraining (pretrain/probes.py, issue 22): probes, intervals, collapse warning."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from data_prep.synthetic import SynthConfig, generate_benchmark
from pretrain import probes
from pretrain.config import PretrainConfig, ProbeConfig
from shared.config import load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def heldout(tmp_path_factory) -> Path:
    """A small held-out benchmark with large defects (2 classes × 4 test instances × 4 views)."""
    out = tmp_path_factory.mktemp("probe_set") / "bench"
    generate_benchmark(out, SynthConfig(classes=("vase", "bin"), n_views=4, width=160, height=120, n_test=4,
                                        seed=7, setups=("real2real",), anomaly_scale=3.0))
    return out


def _tiny_cfg(root: Path, modality: str = "depth", extra: list[str] | None = None) -> PretrainConfig:
    preset = "tiny_image_cpu.yaml" if modality == "image" else "tiny_cpu.yaml"
    return load_config(PretrainConfig, ROOT / "configs/pretrain" / preset,
                       [f"probe.root={root}", "probe.size=112", "probe.bootstrap=100", "probe.max_views_per_instance=0",
                        *(extra or [])])


def test_auroc_matches_pair_counting():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, 60).astype(float)  # many ties
    labels = rng.random(60) < 0.3
    pos, neg = scores[labels], scores[~labels]
    pairs = (pos[:, None] > neg[None]).mean() + 0.5 * (pos[:, None] == neg[None]).mean()
    assert probes.auroc(scores, labels) == pytest.approx(pairs)
    assert math.isnan(probes.auroc(scores, np.zeros(60, bool)))


def test_knn_predict_votes_nearest_labels():
    train = np.eye(3)
    test = np.array([[0.9, 0.1, 0.0], [0.0, 0.2, 0.9]])
    test /= np.linalg.norm(test, axis=1, keepdims=True)
    assert probes.knn_predict(train, np.array([0, 1, 2]), test, k=1, temperature=0.07).tolist() == [0, 2]


def test_discover_reads_benchmark_layout(heldout):
    items = probes.discover_probe_items(heldout, "depth")
    assert {it.label for it in items} == {"vase", "bin"}
    bad = [it for it in items if it.anomalous]
    assert bad and all(it.mask_path is not None for it in bad)
    assert [it.view for it in items[:4]] == ["1", "2", "3", "4"]
    image_items = probes.discover_probe_items(heldout, "image", max_views_per_instance=2)
    assert len(image_items) == len(items) // 2 and all(it.depth_path is not None for it in image_items)
    with pytest.raises(probes.ProbeDataError, match="no file matches"):
        probes.discover_probe_items(heldout, "depth", glob="*/*/nothing/*.npy")
    with pytest.raises(probes.ProbeDataError, match="not a folder"):
        probes.discover_probe_items(heldout / "missing", "depth")


def test_mask_probe_scores_an_oracle_feature_perfectly(heldout):
    """Tokens whose feature encodes the GT mask give AUROC 1; identical features give 0.5."""
    cfg = _tiny_cfg(heldout)
    ps = probes.load_probe_set(cfg)
    assert ps.token_defect is not None and (ps.token_defect >= cfg.probe.mask_min_fraction).any()
    n, t = ps.token_valid.shape
    oracle = np.zeros((n, t, 2), np.float32)
    defect = np.nan_to_num(ps.token_defect) >= cfg.probe.mask_min_fraction
    oracle[..., 0] = ~defect
    oracle[..., 1] = defect
    per = probes.mask_knn_per_instance(ps, oracle, cfg.probe)
    assert probes.bootstrap_compare(per, None, 50, 0)["value"] == pytest.approx(1.0)
    constant = np.ones((n, t, 2), np.float32) / math.sqrt(2)
    per_const = probes.mask_knn_per_instance(ps, constant, cfg.probe)
    assert probes.bootstrap_compare(per_const, None, 50, 0)["value"] == pytest.approx(0.5)


@pytest.mark.parametrize("modality", ["depth", "image"])
def test_probes_record_and_random_reference(heldout, modality):
    cfg = _tiny_cfg(heldout, modality)
    rng_before = torch.get_rng_state()
    p = probes.PretrainProbes(cfg, cfg.vit_config(teacher=True), torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), rng_before)  # the training RNG stream is untouched
    assert p.data.inputs.shape[1:] == (1, 112, 112)
    torch.manual_seed(3)
    from shared.vit import vit_from_config

    record = p.evaluate(vit_from_config(cfg.vit_config(teacher=True)), iteration=5)
    assert record["event"] == "probe" and record["iteration"] == 5
    for name in probes.PROBE_NAMES:
        r = record[name]
        assert r["ci95"][0] <= r["value"] <= r["ci95"][1]
        assert r["delta_ci95"][0] <= r["delta"] <= r["delta_ci95"][1]
        assert r["delta"] == pytest.approx(r["value"] - r["random"])
    # The random reference of the same seed is the same numbers (computed once per run, resumable).
    again = probes.PretrainProbes(cfg, cfg.vit_config(teacher=True), torch.device("cpu"))
    ids = np.array(sorted(p.random_per_instance["knn_class"].groups))
    assert probes._stat(again.random_per_instance["knn_class"], ids) == probes._stat(p.random_per_instance["knn_class"], ids)
    # The reference encoder scored against itself: a difference of exactly zero.
    same = probes.PretrainProbes(cfg, cfg.vit_config(teacher=True), torch.device("cpu"))
    torch.manual_seed(cfg.probe.random_init_seed)
    rec = same.evaluate(vit_from_config(cfg.vit_config(teacher=True)), iteration=0)
    assert all(rec[name]["delta"] == 0 for name in probes.PROBE_NAMES)


def test_collapse_monitor_fires_only_on_a_uniform_teacher():
    k = 256
    monitor = probes.CollapseMonitor(k, margin=0.1, window=50)
    events = [monitor.observe(it, math.log(k) - 0.05) for it in range(0, 120, 10)]
    fired = [e for e in events if e is not None]
    assert len(fired) == 1 and fired[0]["iteration"] == 50 and fired[0]["event"] == "collapse_warning"
    learning = probes.CollapseMonitor(k, margin=0.1, window=50)
    assert all(learning.observe(it, math.log(k) - 1.5) is None for it in range(0, 120, 10))
    # Fires once at 50; the dip at 80 ends the collapsed stretch and keeps the window clear until 130.
    dip = probes.CollapseMonitor(k, margin=0.1, window=50)
    values = [math.log(k)] * 12
    values[8] = math.log(k) - 0.5
    assert [dip.observe(it * 10, v) for it, v in enumerate(values)].count(None) == 12 - 1


def test_probe_config_validation():
    cfg = PretrainConfig()
    cfg.probe = ProbeConfig(size=100)
    from pretrain.config import validate

    with pytest.raises(ValueError, match="probe.size"):
        validate(cfg, require_data=False)


@pytest.mark.slow  # ~60 s on 2 busy cores: 300 iterations of the old preset
def test_collapse_warning_fires_on_the_old_tiny_preset(tmp_path):
    """The pre-issue-22 tiny preset (tests/data/tiny_cpu_collapsed.yaml) ends uniform: the warning fires."""
    from pretrain.train import train

    data = tmp_path / "data"
    generate_benchmark(data, SynthConfig(classes=("vase", "stool"), n_views=6, width=160, height=120, n_test=2,
                                         anomalous_fraction=0.0, seed=3, setups=("real2real",)))
    cfg = load_config(PretrainConfig, ROOT / "tests/data/tiny_cpu_collapsed.yaml",
                      [f"train.output_dir={tmp_path / 'run'}", f"data.glob={data}/*/*/depth/*.npy",
                       "train.progress=false", "train.ckpt_period=0", "train.eval_period=0", "train.num_workers=0"])
    result = train(cfg)
    assert result["status"] == "finished"
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    warnings_ = [r for r in records if r.get("event") == "collapse_warning"]
    assert warnings_, "the old preset collapsed but no warning was logged"
    assert warnings_[0]["teacher_entropy_min"] >= math.log(cfg.dino.head_n_prototypes) - cfg.probe.collapse_margin


def test_presets_validate_and_the_full_size_recipe_keeps_probes_off():
    from pretrain.config import validate

    for path in sorted((ROOT / "configs/pretrain").glob("*.yaml")):
        cfg = load_config(PretrainConfig, path, [])
        validate(cfg, require_data=False)
        if path.name == "dinodepth_vits14.yaml":
            assert cfg.probe.root is None  # no held-out probes unless asked: today's behaviour


def test_trainer_logs_probes_every_eval_period_and_at_the_end(heldout, tmp_path):
    """The trainer's call sites: probe events in metrics.jsonl at eval_period and at the end, pictures."""
    from pretrain.train import train

    run = tmp_path / "run"
    overrides = {"train.output_dir": str(run), "data.glob": f"{heldout}/*/*/depth/*.npy", "train.progress": False,
                 "train.ckpt_period": 0, "train.eval_period": 2, "train.num_workers": 0, "train.batch_size_per_gpu": 4,
                 "optim.epochs": 1, "train.epoch_length": 3}
    cfg = _tiny_cfg(heldout, extra=[f"{k}={v}" for k, v in overrides.items()])
    assert train(cfg)["status"] == "finished"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    probe_its = [r["iteration"] for r in records if r.get("event") == "probe"]
    assert probe_its == [2, 3]
    last = [r for r in records if r.get("event") == "probe"][-1]
    assert set(probes.PROBE_NAMES) <= set(last) and "beats_random" in last["mask_knn"]
    assert (run / "eval" / "probe_00000002.png").is_file() and (run / "eval" / "probe_00000003.png").is_file()
