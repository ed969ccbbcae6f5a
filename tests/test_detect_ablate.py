"""Ablation variants, multi-class conditioning, view subsampling, the table writer and a tiny ablation run."""

import csv
import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from detect.ablate import main, parse_args
from detect.config import DetectConfig
from detect.experiments.ablation import (
    TABLES,
    AblateConfig,
    Row,
    fit_key,
    plan,
    render_table,
    run_key,
)
from detect.fit import (
    CLASS,
    TrainSettings,
    class_pairs,
    epoch_order,
    fit_modmap,
    fit_multiclass,
    pairs_per_epoch,
    total_multiclass_steps,
)
from detect.infer import InferenceSettings, iter_view_maps, source_views_for
from detect.model import IdentityModulator, ModMap, ViewModulator, training_pairs
from shared.config import ConfigError

CLASSES = ["vase", "stool"]


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny tensors: with 2 threads on a busy 2-core machine, thread hand-offs cost far more than the maths.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _base(**kw) -> DetectConfig:
    return DetectConfig(data_root="/d", classes=list(CLASSES), setup="both", **kw)


def _randomised(model: ModMap, seed: int = 0) -> ModMap:
    """Leave the identity init so that view and class codes matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in (model.modulator_image, model.modulator_depth):
            if isinstance(mod, ViewModulator):
                mod.fc2.weight.copy_(0.3 * torch.randn(mod.fc2.weight.shape, generator=g))
    return model.eval()


# -- variants resolve to the right pair sets and modulator settings ---------------------------------
def test_tables_resolve_to_the_right_variants_and_share_runs():
    acfg = AblateConfig(out="/tmp/x", source_views=[0, 2, 1])
    rows, runs = plan(acfg, _base())
    cfgs = {t: [runs[name].cfg for _, name in rows[t]] for t in rows}
    # PatchCore is the reference row of the method comparisons (one run shared by tables 3 and 6)
    assert [c.method for c in cfgs["view_conditioning"]] == ["patchcore", "modmap", "modmap"]
    assert rows["view_conditioning"][0][1] == rows["cross_view"][0][1]
    assert [c.variant for c in cfgs["view_conditioning"][1:]] == ["cfm", "vc_cfm"]
    assert [(c.variant, c.depth_encoder) for c in cfgs["depth_encoder"]] == [
        ("vc_cfm", "random"), ("vc_cfm", "dinov2_on_depth"), ("vc_cfm", "dino_depth")]
    assert [c.variant for c in cfgs["cross_view"][1:]] == ["vc_cfm", "modmap"]
    assert [c.multi_class for c in cfgs["multi_class"]] == [False, True]
    assert [c.num_source_views for c in cfgs["view_subsampling"]] == [0, 2, 1]
    assert [c.aggregation for c in cfgs["aggregation"]] == ["max", "min", "prod", "mean"]
    # ModMap (max, all views, class-specific) is one run shared by tables 6, 7, 8 and 10; vc_cfm +
    # DINO-Depth by tables 3, 4 and 6.
    modmap = rows["cross_view"][2][1]
    assert {rows["multi_class"][0][1], rows["view_subsampling"][0][1], rows["aggregation"][0][1]} == {modmap}
    assert rows["view_conditioning"][2][1] == rows["depth_encoder"][2][1] == rows["cross_view"][1][1]
    assert len(runs) == 12
    assert all(r.cfg.out.startswith("/tmp/x/runs/") for r in runs.values())
    # inference-only differences share the trained models, training differences do not
    agg = [runs[n].cfg for _, n in rows["aggregation"]] + [runs[n].cfg for _, n in rows["view_subsampling"]]
    assert len({fit_key(c) for c in agg}) == 1 and len({run_key(c) for c in agg}) == len(agg) - 1
    dep = [runs[n].cfg for _, n in rows["depth_encoder"]]
    assert len({fit_key(c) for c in dep}) == 3
    assert fit_key(cfgs["multi_class"][0]) != fit_key(cfgs["multi_class"][1])
    # the run key ignores where a run is written
    c = cfgs["cross_view"][2]
    assert run_key(c) == run_key(dataclasses.replace(c, out="/elsewhere", progress=False))


@pytest.mark.parametrize("variant, pairs", [("cfm", 3), ("vc_cfm", 3), ("modmap", 9)])
def test_variant_pairs_and_modulators(variant, pairs):
    p = training_pairs(3, variant)
    assert len(p) == pairs
    if variant != "modmap":
        assert torch.equal(p[:, 0], p[:, 1])
    model = _randomised(ModMap(3, 8, 6, hidden=8, variant=variant))
    if variant == "cfm":
        assert isinstance(model.modulator_image, IdentityModulator)
    else:
        assert model.modulator_image.fc1.in_features == 2 * 3
    img, dep = torch.randn(1, 5, 8), torch.randn(1, 5, 6)
    s, t = torch.tensor([0]), torch.tensor([2])
    a = model(img, dep, s, t)
    b = model(img, dep, t, t)
    same = all(torch.allclose(x, y) for x, y in zip(a, b))
    # cfm ignores both codes, vc_cfm sees [v_t ; v_t] whatever the source, modmap sees [v_s ; v_t]
    assert same == (variant != "modmap")


def test_random_depth_encoder_has_the_dino_depth_architecture(tmp_path):
    from detect.encoders import load_depth_encoder, load_random_depth_encoder
    from pretrain.export import default_depth_input_norm, write_export
    from shared.vit import create_vit

    torch.manual_seed(0)
    vit = create_vit("vit_tiny_patch14", in_chans=1, depth=1)
    ckpt = write_export(tmp_path / "dd.pth", vit.state_dict(), vit.cfg.to_dict(), default_depth_input_norm(), {},
                        safetensors=False)
    trained = load_depth_encoder(ckpt)
    rand = load_random_depth_encoder(ckpt, seed=3)
    assert rand.info.arch == trained.info.arch and rand.info.random and rand.info.weights == "random"
    assert rand.info.input_norm == trained.info.input_norm
    assert rand.info.sha256 != trained.info.sha256
    assert load_random_depth_encoder(ckpt, seed=3).info.sha256 == rand.info.sha256  # seeded
    assert load_random_depth_encoder(ckpt, seed=4).info.sha256 != rand.info.sha256
    x = torch.rand(1, 1, 28, 28)
    assert rand(x)[0].shape == trained(x)[0].shape


# -- multi-class ------------------------------------------------------------------------------------
def test_class_code_is_one_hot_after_the_view_codes():
    mod = ViewModulator(n_views=4, dim=6, hidden=8, n_classes=3)
    code = mod.condition(torch.tensor([1, 2]), torch.tensor([3, 0]), torch.tensor([2, 0]))
    assert code.shape == (2, 4 + 4 + 3)
    assert code[0].tolist() == [0, 1, 0, 0, 0, 0, 0, 1, 0, 0, 1]
    assert code[1].tolist() == [0, 0, 1, 0, 1, 0, 0, 0, 1, 0, 0]
    with pytest.raises(ValueError, match="class_id is required"):
        mod.condition(torch.tensor([0]), torch.tensor([0]))


def test_multi_class_changes_the_output_only_through_the_class_code():
    n, c_img, c_dep, n_cls = 3, 8, 6, 3
    torch.manual_seed(0)
    multi = _randomised(ModMap(n, c_img, c_dep, hidden=8, n_classes=n_cls))
    img, dep = torch.randn(2, 5, c_img), torch.randn(2, 5, c_dep)
    s, t = torch.tensor([0, 2]), torch.tensor([1, 1])
    outs = [multi(img, dep, s, t, torch.tensor([k, k])) for k in range(n_cls)]
    assert not torch.allclose(outs[0][0], outs[1][0])  # the class code matters
    for k in range(n_cls):
        # a class-specific model whose first modulator layer absorbs class k's column into its bias
        single = ModMap(n, c_img, c_dep, hidden=8)
        single.load_state_dict({key: v for key, v in multi.state_dict().items()
                                if not (key.startswith("modulator_") and ".fc1." in key)}, strict=False)
        for name in ("modulator_image", "modulator_depth"):
            src, dst = getattr(multi, name).fc1, getattr(single, name).fc1
            with torch.no_grad():
                dst.weight.copy_(src.weight[:, : 2 * n])
                dst.bias.copy_(src.bias + src.weight[:, 2 * n + k])
        ref = single.eval()(img, dep, s, t)
        assert torch.allclose(outs[k][0], ref[0], atol=1e-6) and torch.allclose(outs[k][1], ref[1], atol=1e-6)


def test_class_pairs_union_and_balancing():
    pairs = class_pairs([3, 5], "modmap")
    assert len(pairs) == 9 + 25
    first, second = pairs[pairs[:, CLASS] == 0], pairs[pairs[:, CLASS] == 1]
    assert first[:, :2].max() == 2 and second[:, :2].min() == 3  # global rows offset by the first class's views
    assert torch.equal(second[:, 2:4] + 3, second[:, :2])  # local view ids
    assert len(class_pairs([3, 5], "vc_cfm")) == 8
    g = torch.Generator().manual_seed(0)
    order = epoch_order(pairs, 2, True, g)
    assert len(order) == pairs_per_epoch(pairs, 2, True) == 50
    counts = torch.bincount(pairs[order, CLASS], minlength=2)
    assert counts.tolist() == [25, 25]
    per_pair = torch.bincount(order, minlength=len(pairs))
    assert set(per_pair[:9].tolist()) <= {2, 3} and set(per_pair[9:].tolist()) == {1}
    assert sorted(epoch_order(pairs, 2, False, g).tolist()) == list(range(len(pairs)))
    # SiM3D: 6 classes of 12 views + 2 of 36 → 3,456 pairs, 72 iterations at batch 48 (modmap.md §15)
    assert total_multiclass_steps([12] * 6 + [36] * 2, TrainSettings(epochs=1)) == (1, 72, 72)


def test_fit_multiclass_trains_one_model_for_all_classes():
    torch.manual_seed(0)
    feats = [(torch.randn(n, 6, 8), torch.randn(n, 6, 4), torch.ones(n, 6, dtype=torch.bool)) for n in (2, 3)]
    logs = []
    settings = TrainSettings(epochs=10, batch_size=4, seed=1)
    model = fit_multiclass(feats, settings, log=logs.append)
    assert model.n_views == 3 and model.modulator_image.n_classes == 2
    assert logs[-1]["loss"] < logs[0]["loss"]
    again = fit_multiclass(feats, settings)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    balanced = fit_multiclass(feats, TrainSettings(epochs=2, batch_size=4, seed=1), class_balanced=True)
    assert not torch.equal(balanced.image2depth.fc1.weight, model.image2depth.fc1.weight)
    with pytest.raises(ValueError, match="same token count"):
        fit_multiclass([feats[0], (torch.randn(2, 7, 8), torch.randn(2, 7, 4), None)], settings)


def test_class_specific_training_is_unchanged():
    # the class-specific path still trains models without a class code
    torch.manual_seed(0)
    model = fit_modmap(torch.randn(2, 6, 8), torch.randn(2, 6, 4), TrainSettings(epochs=1, batch_size=4))
    assert model.modulator_image.n_classes == 0


# -- view subsampling -------------------------------------------------------------------------------
def test_view_subsampling_picks_k_distinct_seeded_sources():
    n = 12
    for k in (1, 2, 5, 11):
        sub = source_views_for(n, "modmap", k, seed=7)
        assert all(len(s) == k == len(set(s)) and t in s and all(0 <= v < n for v in s) for t, s in enumerate(sub))
        assert sub == source_views_for(n, "modmap", k, seed=7)
    assert source_views_for(n, "modmap", 5, seed=7) != source_views_for(n, "modmap", 5, seed=8)
    assert source_views_for(n, "modmap", n, seed=7) == source_views_for(n, "modmap", 0) == [list(range(n))] * n


def test_view_subsampling_with_k_equal_n_equals_the_full_method():
    n, size = 4, 28
    torch.manual_seed(0)
    model = _randomised(ModMap(n, 12, 8, hidden=16))
    image, depth = torch.randn(n, 16, 12), torch.randn(n, 16, 8)
    depth_in = torch.ones(size, size)

    def maps(k):
        return list(iter_view_maps(model, image, depth, (4, 4), lambda t: depth_in, size,
                                   InferenceSettings(num_source_views=k)))

    full, same, fewer = maps(0), maps(n), maps(2)
    assert all(torch.equal(a.combined, b.combined) for a, b in zip(full, same))
    # fewer sources: the minimum over a subset can only be larger or equal
    assert all(bool((b.combined >= a.combined - 1e-6).all()) for a, b in zip(full, fewer))
    assert any(not torch.equal(a.combined, b.combined) for a, b in zip(full, fewer))


# -- table writer -----------------------------------------------------------------------------------
def _fake_data(rows, values, timing=False):
    data = {}
    for (_row, name), (det, seg) in zip(rows, values):
        res = {s: {c: {"image_auroc": det[i], "voxel_aupro": {"0.01": seg[i]}} for i, c in enumerate(CLASSES)}
               for s in ("real2real", "synth2real")}
        tim = ({s: {c: {"median_map_s": 0.01 * (1 + len(data)), "pairs_per_instance": 12.0} for c in CLASSES}
                for s in ("real2real", "synth2real")} if timing else {})
        data[name] = {"results": res, "timings": tim}
    return data


def test_table_writer_format():
    spec = TABLES["aggregation"]
    rows = [(Row("max", {}), "a"), (Row("min", {}), "b")]
    data = _fake_data(rows, [([0.9, 0.7], [0.5, 0.3]), ([0.8, float("nan")], [0.6, 0.2])])
    data["b"]["results"]["real2real"]["stool"]["image_auroc"] = None  # a metric that could not be computed
    md, records = render_table(spec, rows, data, ["real2real"])
    lines = md.splitlines()
    assert lines[0] == "## Table 10 — Aggregation function of the two modality maps"
    header = next(line for line in lines if line.startswith("| Variant"))
    assert header == ("| Variant | Det. vase | Det. stool | **Det. mean** | Seg. vase | Seg. stool | "
                      "**Seg. mean** |")
    # best per column in bold; no bold where there is nothing to compare (one value, or all equal)
    assert "| max | **0.900** | 0.700 | 0.800 | 0.500 | **0.300** | 0.400 |" in lines
    assert "| min | 0.800 | n/a | n/a | **0.600** | 0.200 | 0.400 |" in lines
    assert [(r["row"], r["metric"]) for r in records] == [("max", "I-AUROC"), ("max", "V-AUPRO@1%"),
                                                          ("min", "I-AUROC"), ("min", "V-AUPRO@1%")]
    assert records[0]["mean"] == pytest.approx(0.8) and records[2]["mean"] is None
    # view subsampling: time and pairs columns; multi-class: setups as column groups
    rows8 = [(Row("all", {}), "a"), (Row("2", {}), "b")]
    md8, rec8 = render_table(TABLES["view_subsampling"], rows8, _fake_data(rows8, [([1, 1], [1, 1])] * 2, True),
                             ["real2real"])
    assert "| Views (K) | time/instance [ms] | pairs/instance |" in md8
    assert "| all | 10.0 | 12 |" in md8 and rec8[0]["time_ms"] == pytest.approx(10.0)
    md7, _ = render_table(TABLES["multi_class"], rows, data, ["real2real", "synth2real"])
    assert ("| Model | real2real I-AUROC | real2real V-AUPRO@1% | synth2real I-AUROC | synth2real V-AUPRO@1% |"
            in md7)


@pytest.mark.parametrize("preset", ["tiny", "paper", "demo"])
def test_ablation_presets_resolve(preset):
    from detect.experiments.ablation import REPO, resolve_base

    acfg = parse_args(["--config", str(REPO / "configs" / "detect" / "ablate" / f"{preset}.yaml"), "--data", "/d",
                       "--classes", "a,b", "--out", "/tmp/x"])
    base = resolve_base(acfg)
    assert base.classes == ["a", "b"] and base.cache_dir == "/tmp/x/features"
    assert base.setup == ("real2real" if preset == "demo" else "both")
    if preset == "paper":
        assert (base.epochs, base.image_size, base.image_encoder) == (200, 896, "dinov2_vitb14_reg4")
        assert acfg.source_views == [0, 18, 9, 5] and acfg.timing_classes == ["sink_cabinet"]
    elif preset == "demo":  # the demo's detector settings, PatchCore's included
        assert (base.image_encoder, base.image_size, base.patchcore_bank, base.patchcore_bank_tokens) == (
            "cnn", 448, "class", "all")
    else:
        assert base.image_encoder == "random" and base.device == "cpu"
    rows, runs = plan(acfg, base)
    # PatchCore + ...; paper: Table 8 runs on sink_cabinet only (one more run); demo: Table 7 on both setups
    # (class-specific ModMap once more, on both setups)
    assert len(runs) == 13 + (preset != "tiny")
    if preset == "demo":
        assert acfg.setups_of("multi_class") == ["real2real", "synth2real"]
        assert acfg.all_setups() == ["real2real", "synth2real"]
        assert {runs[n].cfg.setup for _, n in rows["multi_class"]} == {"both"}
        assert {runs[n].cfg.setup for t in rows if t != "multi_class" for _, n in rows[t]} == {"real2real"}


def test_table_setups_are_checked():
    with pytest.raises(ConfigError, match="unknown table"):
        AblateConfig(table_setups={"nonsense": "both"}).validate()
    with pytest.raises(ConfigError, match="table_setups.multi_class"):
        AblateConfig(table_setups={"multi_class": "all"}).validate()


def test_cli_parsing(tmp_path):
    cfg_file = tmp_path / "a.yaml"
    cfg_file.write_text("detect_config: paper.yaml\ndetect: {epochs: 3}\ntables: [aggregation]\n")
    (tmp_path / "paper.yaml").write_text("epochs: 9\nbatch_size: 4\n")
    acfg = parse_args(["--config", str(cfg_file), "--data", "/d", "--tables", "cross_view,aggregation",
                       "detect.seed=3", "source_views=[0,4]"])
    assert acfg.detect_config == str(tmp_path / "paper.yaml")  # found next to the ablation YAML
    assert acfg.detect == {"epochs": 3, "data_root": "/d", "seed": 3}
    assert acfg.tables == ["cross_view", "aggregation"] and acfg.source_views == [0, 4]
    assert main(["tables=[nonsense]"]) == 2


# -- end to end -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    from data_prep.synthetic import SynthConfig, generate_benchmark
    from pretrain.export import default_depth_input_norm, write_export
    from shared.vit import create_vit

    root = tmp_path_factory.mktemp("ablate")
    data = root / "data"
    generate_benchmark(data, SynthConfig(classes=("vase", "stool"), n_views=3, width=64, height=48, n_test=2,
                                         setups=("real2real",)), progress=False)
    torch.manual_seed(0)
    vit = create_vit("vit_tiny_patch14", in_chans=1, depth=1)
    ckpt = write_export(root / "dd.pth", vit.state_dict(), vit.cfg.to_dict(), default_depth_input_norm(), {},
                        safetensors=False)
    return data, ckpt


@pytest.mark.slow
def test_tiny_ablation_end_to_end(bench, tmp_path):
    from detect.run import main as run_main

    data, ckpt = bench
    out = tmp_path / "abl"
    args = ["--data", str(data), "--ckpt", str(ckpt), "--out", str(out), "--setup", "real2real", "--no-progress",
            "detect_config=configs/detect/tiny_cpu.yaml",
            "detect.image_size=56", "detect.random_encoder_depth=1", "detect.epochs=2", "source_views=[0,2]"]
    assert run_main(["ablate", *args]) == 0  # through detect/run.py
    report = (out / "report.md").read_text()
    assert "RANDOM" in report or "randomly initialised" in report
    for stem in ("table03_view_conditioning", "table04_depth_encoder", "table06_cross_view", "table07_multi_class",
                 "table08_view_subsampling", "table10_aggregation"):
        assert (out / "tables" / f"{stem}.md").is_file() and (out / "tables" / f"{stem}.csv").is_file()
        assert (out / "tables" / f"{stem}.md").read_text() in report
    abl = json.loads((out / "ablation.json").read_text())
    runs = abl["runs"]
    # every variant ran: PatchCore, cfm, vc_cfm × 3 depth encoders, modmap × 3 more aggregations, K = 2,
    # multi-class
    assert len(runs) == 11
    assert len(list((out / "configs").glob("*.yaml"))) == 11
    assert "PatchCore (reference" in report
    # one model per (class, setup) was trained for modmap and adopted by the K=2 run; one multi-class model
    k2 = next(r for n, r in runs.items() if "-k2-" in n)
    full = next(r for n, r in runs.items() if n.startswith("modmap") and "-k" not in n and "multiclass" not in n)
    mc = next(r for n, r in runs.items() if "multiclass" in n)
    from pathlib import Path

    for c in ("stool", "vase"):
        a = (Path(full["out"]) / "real2real" / c / "model.pt").read_bytes()
        assert a == (Path(k2["out"]) / "real2real" / c / "model.pt").read_bytes()
        assert not (Path(mc["out"]) / "real2real" / c / "model.pt").exists()
        assert k2["timings"]["real2real"][c]["pairs_per_instance"] == 3 * 2
        assert full["timings"]["real2real"][c]["pairs_per_instance"] == 3 * 3
    assert (Path(mc["out"]) / "real2real" / "_multiclass" / "model.pt").is_file()
    # the encoders ran once per instance: every run after the first found its features in the cache
    cached = list((out / "features").iterdir())
    assert len(cached) == 2 * 3 * 3  # 2 classes × (1 training + 2 test instances) × 3 depth encoders
    rows08 = list(csv.DictReader((out / "tables" / "table08_view_subsampling.csv").open()))
    table = [r for r in rows08 if r["metric"] in ("I-AUROC", "V-AUPRO@1%")]
    assert [r["row"] for r in table] == ["all", "all", "2", "2"]
    # every value with its interval, every row against the reference (K = all) with the paired interval
    assert all(float(r["mean_ci95_low"]) <= float(r["mean"]) <= float(r["mean_ci95_high"]) for r in table)
    diffs = [r for r in rows08 if r["metric"].endswith("- reference")]
    assert [(r["row"], r["reference"]) for r in diffs] == [("2", "all")] * 2
    assert all(float(r["mean_ci95_low"]) <= float(r["mean"]) <= float(r["mean_ci95_high"]) for r in diffs)
    assert report.count("Paired differences, row − **") >= 6
    assert all(0 <= float(r["mean"]) <= 1 for r in table if r["mean"])
    assert all(float(r["time_ms"]) > 0 for r in table)
    # a repeated command reuses the finished runs
    before = {n: (Path(r["out"]) / "results.json").stat().st_mtime_ns for n, r in runs.items()}
    assert run_main(["ablate", *args]) == 0
    after = {n: (Path(r["out"]) / "results.json").stat().st_mtime_ns for n, r in runs.items()}
    assert before == after
    metrics = json.loads((Path(mc["out"]) / "real2real" / "vase" / "metrics.json").read_text())
    assert not math.isnan(metrics["image_auroc"])
    assert np.isfinite(metrics["voxel_aupro"]["0.01"])


def test_gt_projection_check(bench, tmp_path, capsys):
    from detect.gt_projection_check import check_class
    from detect.gt_projection_check import main as check_main

    data, _ = bench
    res = check_class(str(data), "vase")
    assert 0 <= res["voxel_auroc"] <= 1 and 0 <= res["gt_voxels_reached"] <= 1
    assert set(res["voxel_aupro"]) == {"0.3", "0.01"}
    assert check_main(["--data", str(data), "--out", str(tmp_path / "c.md")]) == 0
    assert "| **mean** |" in (tmp_path / "c.md").read_text()
    assert check_main(["--data", str(tmp_path / "nope")]) == 2
