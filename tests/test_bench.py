"""Smoke tests of the benchmark suite (bench/): structure of the results, ratios and checks computed.

Timing targets are measured by the benchmarks (``python bench/run.py``), never asserted here: these
tests run every benchmark's code path at toy sizes and check the shape of what comes out.
"""

from __future__ import annotations

import hashlib
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import common
from bench import run as runner


# -- runner and helpers -------------------------------------------------------------------------------
def _fake_module(name: str, fn) -> types.ModuleType:
    mod = types.ModuleType(f"bench.bench_{name}")
    mod.run = fn
    return mod


def test_check_and_with_checks():
    up = common.check("speed-up", 6.0, 5.0)
    down = common.check("time ratio", 3.5, 3.0, "<=", unit="x")
    assert up["passed"] and not down["passed"] and down["unit"] == "x"
    res = common.with_checks({"a": 1}, [up, down])
    assert res["ratio"] == 6.0 and res["target"] == 5.0 and res["passed"] is False
    assert common.with_checks({}, [up])["passed"] is True
    with pytest.raises(ValueError):
        common.check("x", 1, 1, "==")


def test_linear_fit_recovers_a_line():
    fit = common.linear_fit([6, 12, 24, 36], [10 + 2 * n for n in (6, 12, 24, 36)])
    assert fit["slope"] == pytest.approx(2) and fit["intercept"] == pytest.approx(10) and fit["r2"] == pytest.approx(1)


def test_runner_writes_results_checks_and_summary(tmp_path, monkeypatch, capsys):
    def good(quick):
        assert quick is True
        return common.with_checks({"figure": np.float64(2.5), "n": np.int64(3)},
                                  [common.check("fake ratio", 2.5, 2.0), common.check("fake time", 4.0, 3.0, "<=")])

    def legacy(quick):
        return {"ratio": 1.5, "target": 3.0, "passed": False}

    def broken(quick):
        raise RuntimeError("boom")

    fakes = {"fakegood": good, "fakelegacy": legacy, "fakebroken": broken,
             "fakeskip": lambda quick: common.skipped("needs CUDA")}
    for name, fn in fakes.items():
        monkeypatch.setitem(sys.modules, f"bench.bench_{name}", _fake_module(name, fn))
    monkeypatch.setattr(runner, "available", lambda: sorted(fakes))
    monkeypatch.delenv(common.DEVICE_ENV, raising=False)
    out = tmp_path / "res.json"
    code = runner.main([*fakes, "--quick", "--device", "cpu", "--out", str(out)])
    assert code == 1  # one benchmark raised
    data = json.loads(out.read_text())
    assert data["quick"] is True and data["device"] == "cpu"
    assert {"cpu_count", "torch", "load_avg_1_5_15", "load_avg_end"} <= set(data["machine"])
    res = data["results"]
    assert res["fakegood"]["ratio"] == 2.5 and res["fakegood"]["passed"] is False
    assert [c["passed"] for c in res["fakegood"]["checks"]] == [True, False]
    assert res["fakegood"]["n"] == 3 and len(res["fakegood"]["load_avg_before_after"]) == 2
    assert "boom" in res["fakebroken"]["error"] and res["fakeskip"]["skipped"] == "needs CUDA"
    rows = runner.summary_rows(res)
    met = {(r[0], r[1]): r[4] for r in rows}
    assert met[("fakegood", "fake ratio")] == "yes" and met[("fakegood", "fake time")] == "NO"
    assert met[("fakelegacy", "ratio")] == "NO" and met[("fakeskip", "(skipped)")] == "-"
    assert met[("fakebroken", "(error)")] == "ERROR"
    printed = capsys.readouterr().out
    assert "met?" in printed and "fake ratio" in printed


def test_runner_rejects_unknown_names(capsys):
    with pytest.raises(SystemExit):
        runner.main(["no_such_benchmark"])
    assert {"augment", "detect", "matmul", "pretrain", "shards", "table8"} <= set(runner.available())


# -- augmentation: the current crops are the reference crops, bit for bit ------------------------------
# The reference is the loader code before issue 13's rewrites; its outputs on these inputs are recorded
# (sha256 of the bytes) in tests/data/augment_reference.json. The benchmark times the reference itself,
# loaded from the git history (bench/frozen.py).
REFERENCE = json.loads((Path(__file__).parent / "data" / "augment_reference.json").read_text())


def _sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def test_augment_matches_reference_bit_for_bit():
    from pretrain import augment
    from pretrain.config import AugConfig, CropsConfig
    from shared.depth import normalize_depth

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:90, 0:120].astype(np.float32)
    z = 400 + 0.3 * xx + 40 * (((yy - 45) ** 2 + (xx - 60) ** 2) < 600)  # a step edge: the nearest rule
    z[rng.random(z.shape) < 0.05] = np.nan
    x, valid, _ = normalize_depth(z.astype(np.float32), "metric_z")
    crops = CropsConfig(global_crops_size=40, local_crops_size=18, local_crops_number=3)
    augs = {"default": AugConfig(), "rot90": AugConfig(rot90=True), "shrink": AugConfig(rot_fill="shrink"),
            "nearest": AugConfig(interp="nearest")}
    for name, aug in augs.items():
        for seed in range(2):
            a = augment.depth_multicrop(x, valid, crops, aug, np.random.default_rng(seed))
            got = {k: _sha(getattr(a, k)) for k in ("global_crops", "local_crops", "global_valid", "local_valid")}
            assert got == REFERENCE["crops"][f"{name}/{seed}"], (name, seed)


@pytest.mark.parametrize("kind", ["metric_z", "rel_disparity"])
def test_normalize_depth_matches_reference_bit_for_bit(kind):
    from shared.depth import normalize_depth

    rng = np.random.default_rng(1)
    for trial in range(6):  # ≥ 1024 valid pixels: the tail-selection path of the percentiles
        z = (rng.random((70, 90)) ** (1 + trial)).astype(np.float32) * 500
        r = rng.random(z.shape)
        z[r < 0.2] = np.nan
        z[(r > 0.2) & (r < 0.25)] = 0
        z[r > 0.99] = np.inf
        if trial % 2:
            z = np.round(z)  # ties
        for eps, pct in ((0.1, (0.5, 99.5)), (0.0, (2.0, 98.0))):
            x, valid, degenerate = normalize_depth(z, kind, "nearness", eps, pct)
            want = REFERENCE["normalize"][f"{kind}/{trial}/{eps}/{pct[0]}-{pct[1]}"]
            assert {"x": _sha(x), "valid": _sha(valid), "degenerate": bool(degenerate)} == want


def test_augment_loader_worker_and_mix(tmp_path, monkeypatch):
    from bench import bench_augment
    from bench.frozen import FrozenCodeError, frozen_module
    from pretrain import loader
    from shared import memory

    try:  # the "before" side is the reference code from the git history
        frozen_module("pretrain/augment.py")
    except FrozenCodeError as exc:
        pytest.skip(str(exc))
    monkeypatch.setattr(memory, "keep_freed_memory", lambda *a, **k: False)  # no allocator change in pytest
    monkeypatch.setattr(loader, "depth_multicrop", loader.depth_multicrop)  # both restored after "before"
    monkeypatch.setattr(loader, "normalize_depth", loader.normalize_depth)
    shards = bench_augment.make_shards(tmp_path, quick=True)
    assert bench_augment.bit_identical(shards, ["eyecandies"], 1)
    rows = [bench_augment.loader_worker(str(shards), src, variant, 2, 1)
            for src, variant in (("eyecandies", "after"), ("mvtec3d", "before"))]
    assert rows[0]["samples"] == 2 and rows[0]["cpu_s_per_sample"] > 0
    assert set(rows[0]["stages_ms"]) == {"read", "normalise", "crops"}
    per = [{"source": s, "x": 0.01} for s in bench_augment.PAPER_MIX_B]
    assert bench_augment.mix_rate(per, "x") == pytest.approx(100.0)


# -- pretraining step ------------------------------------------------------------------------------------
def test_pretrain_flops_and_tokens():
    from bench import bench_pretrain
    from pretrain.config import PretrainConfig
    from shared.config import load_config

    cfg = load_config(PretrainConfig, None, [f"{k}={v}" for k, v in bench_pretrain.TINY_MODEL.items()]
                      + ["train.output_dir=unused"])
    assert bench_pretrain.tokens_per_sample(cfg) == 2 * (16 + 1) + 4 * (4 + 1)
    flops = bench_pretrain.model_flops_per_sample(cfg, masked_per_sample=4)
    assert flops > bench_pretrain.model_flops_per_sample(cfg, masked_per_sample=1) > 0


def test_pretrain_step_worker_tiny():
    from bench import bench_pretrain

    row = bench_pretrain.step_worker(2, "cpu", steps=1, warmup=0, tiny=True, profile_below=2.0, matmul_n=128,
                                     matmul_seconds=0.05)
    assert row["flops_per_step"] > 0 and row["step_s"] > 0 and row["peak_bytes"] > 0
    m = bench_pretrain.mfus(row, "cpu")
    assert 0 < m["wall_mfu"] and 0 < m["cpu_time_mfu"] and m["mfu"] == m["cpu_time_mfu"]
    share = row["profile"]["share"]  # profiled: the MFU is below 200 %
    assert set(share) == {"matmul", "attention", "optimizer_ema_clip", "elementwise_norm_other"}
    assert sum(share.values()) == pytest.approx(1.0, abs=0.01)


# -- detection -------------------------------------------------------------------------------------------
def test_detect_parts_tiny():
    from bench import bench_detect

    args = bench_detect._settings(True, "cpu")
    sweep = bench_detect.chunk_sweep_worker(3, 4, 32, 16, "cpu", [0, 1], targets=2)
    assert [r["chunk"] for r in sweep["rows"]] == [0, 1]
    assert all(r["fraction_of_matmul"] > 0 and r["fraction_of_matmul_cpu_time"] > 0 for r in sweep["rows"])
    assert 0 < sweep["profile_matmul_share"] <= 1
    row = bench_detect.mapping_worker(3, 4, 32, 32, 16, "cpu", 0)
    assert row["n_maps"] == 3 and row["map_flops"] > 0 and row["matmul_flops"] > 0
    voxel = bench_detect.bench_voxel(args)  # asserts equality with the np.maximum.at baseline itself
    assert voxel["speedup"] > 0 and voxel["points"] > 0
    aupro = bench_detect.bench_aupro(args)
    assert aupro["ratio"] > 0 and 0 <= aupro["voxel_aupro@0.01"] <= 1
    cnn = bench_detect.bench_cnn_encoder(args)  # NHWC + early stop must give the plain forward's maps
    assert cnn["views_per_s"] > 0 and cnn["max_abs_diff"] < 1e-3
    geo = bench_detect.bench_geometry(args)  # the cylinder's 3 mm bump must read as ~3 mm after registration
    assert geo["register_s"] > 0 and 2.0 < geo["max_deviation_mm"] < 4.0


# -- Table 8 setting ---------------------------------------------------------------------------------------
def test_table8_code_path_on_cpu_at_toy_size():
    from bench import bench_table8

    out = bench_table8.measure_instance(n_views=2, size=28, dev="cpu", variant="bf16", instances=1, tiny=True)
    assert out["pairs"] == 4 and out["grid"] == [2, 2]
    # each figure is rounded to 0.01 ms on its own, so the sum may exceed the total by up to 3 × 0.005 ms
    assert out["total_ms"] >= out["encode_ms"] + out["maps_ms"] - 0.015 - 1e-9
    assert out["encode_ms"] > 0 and out["maps_ms"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_table8_skips_without_cuda():
    from bench import bench_table8

    res = bench_table8.run(quick=True)
    assert "CUDA" in res["skipped"] and res["paper_ms"] == pytest.approx(2886.768)
