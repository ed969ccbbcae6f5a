"""PatchCore and the CNN image encoder wired into the multiview pipeline (``--method patchcore``,
``--image-encoder cnn``, ``--depth-encoder cnn_on_depth``): one map loop, same volumes and metrics."""

import json

import numpy as np
import pytest
import torch

from detect.config import parse_config
from detect.infer import InferenceSettings, iter_view_maps
from detect.patchcore import PatchCoreBank, PatchCoreScorer, PatchCoreSettings, build_bank
from detect.run import main
from shared.config import ConfigError


@pytest.fixture(scope="module")
def bench(cnn_bench):
    """The tiny benchmark and random Lite0 weights of conftest.py."""
    return cnn_bench


def test_patchcore_scorer_in_the_one_map_loop():
    """Training tokens score 0; a token moved away from every bank token scores its distance, at its
    place in the upsampled map; sources are the target alone (no mapping networks)."""
    gen = torch.Generator().manual_seed(0)
    n, grid, d = 2, (4, 4), 8
    image, depth = torch.randn(n, 16, d, generator=gen), torch.randn(n, 16, 3, generator=gen)
    settings = PatchCoreSettings(features="image", bank="view")
    bank = build_bank(image, depth, None, settings)
    scorer = PatchCoreScorer(InferenceSettings(), bank)
    assert scorer.sources(None, 3) == [[0], [1], [2]]
    test = image.clone()
    test[1, 5] += 20.0  # token (1, 1) of view 1
    size = 56
    depth_in = torch.ones(1, size, size)  # all valid: the foreground is the whole view
    maps = list(iter_view_maps(None, test, depth, grid, lambda t: depth_in, size, InferenceSettings(), scorer=scorer))
    assert [m.view for m in maps] == [0, 1]
    assert float(maps[0].combined.abs().max()) < 1e-2  # sqrt of the l2 expansion's rounding
    m1 = maps[1].combined
    peak = np.unravel_index(int(m1.argmax()), m1.shape)
    assert 14 <= peak[0] < 28 and 14 <= peak[1] < 28  # inside token (1, 1)'s 14×14 patch
    want = float(torch.cdist(test[1, 5:6], image[1]).min())  # the moved token's nearest-neighbour distance
    # bilinear upsampling peaks near, not at, the token centre: a little below the token's value
    assert want > 20.0 and 0.85 * want < float(m1.max()) <= want
    # the banks survive a save/load round trip exactly
    again = PatchCoreBank.from_state(bank.state())
    torch.testing.assert_close(again.score(1, test[1]), bank.score(1, test[1]))


def test_patchcore_and_cnn_config_errors():
    with pytest.raises(ConfigError, match="needs --image-encoder cnn"):
        parse_config(["--data", "/d", "--depth-encoder", "cnn_on_depth"])
    with pytest.raises(ConfigError, match="multi-class"):
        parse_config(["--data", "/d", "--method", "patchcore", "--multi-class"])
    with pytest.raises(ConfigError, match="patchcore_coreset"):
        parse_config(["--data", "/d", "--method", "patchcore", "patchcore_coreset=0"])
    with pytest.raises(ConfigError, match="occlusion_gate_m"):
        parse_config(["--data", "/d", "occlusion_gate_m=-0.01"])
    with pytest.raises(ConfigError, match="view_aggregation max"):
        parse_config(["--data", "/d", "occlusion_gate_m=0.02", "view_aggregation=mean"])
    assert parse_config(["--data", "/d", "--occlusion-gate-m", "0.02"]).occlusion_gate_m == 0.02
    cfg = parse_config(["--data", "/d", "--image-encoder", "cnn", "--cnn-features", "1,2", "--method", "patchcore"])
    assert cfg.cnn_features == [1, 2] and cfg.method == "patchcore"
    assert parse_config(["--data", "/d", "--image-encoder", "cnn", "cnn_smooth=1"]).cnn_smooth == 1
    with pytest.raises(ConfigError, match="cnn_smooth"):
        parse_config(["--data", "/d", "--image-encoder", "cnn", "cnn_smooth=2"])


def test_patchcore_end_to_end_with_cnn_encoders(bench, tmp_path, capsys):
    data, weights = bench
    out = tmp_path / "pc"
    args = ["--data", str(data), "--image-encoder", "cnn", "--image-encoder-weights", str(weights),
            "--depth-encoder", "cnn_on_depth", "--image-size", "56", "--no-progress", "--method", "patchcore",
            "--patchcore-features", "both", "--out", str(out)]
    assert main(args) == 0
    class_dir = out / "real2real" / "vase"
    obj = torch.load(class_dir / "patchcore.pt", weights_only=True)
    meta = obj["config"]
    assert meta["image_encoder"]["name"] == "cnn:tf_efficientnet_lite0"
    assert meta["feature_settings"]["depth_encoder"] == "cnn_on_depth"
    assert sorted(obj["patchcore"]["banks"]) == ["0", "1", "2"]
    # object tokens only: fewer than all 3 × 16 tokens of the 56-px views
    assert 0 < meta["bank_tokens"] < 3 * 16
    text = (out / "results.md").read_text()
    assert "PatchCore results" in text
    assert (class_dir / "scores.csv").is_file() and (class_dir / "metrics.json").is_file()
    m = json.loads((class_dir / "metrics.json").read_text())
    assert 0.0 <= m["image_auroc"] <= 1.0 or np.isnan(m["image_auroc"])
    assert "voxel_aupro" in m
    # every headline metric carries its 95 % bootstrap interval over instances; pixel domains are named
    for key in ("image_auroc_ci", "voxel_auroc_ci", "object_pixel_auroc_ci"):
        assert m[key]["level"] == 0.95 and m[key]["low"] <= m[key]["high"], key
    assert m["voxel_aupro_ci"]["0.01"]["n_boot"] > 0 and "valid depth" in m["object_pixel_eval_domain"]
    assert "O-P-AUROC" in text and "95 % stratified bootstrap interval" in text
    assert len(list((class_dir / "volumes").glob("*.npz"))) == 2
    # the demo report shows a reference run's table and names the CNN image encoder
    from detect.pipeline.report_html import build_report

    html = build_report(out, tmp_path / "report" / "index.html", references=[("PatchCore", out)]).read_text()
    assert "Reference: PatchCore" in html and "PatchCore results" in html
    assert "tf_efficientnet_lite0" in html and "cannot be downloaded" in html
    # banks built with one encoder refuse another (the one encoder check)
    other = tmp_path / "lite0_other.pth"
    sd = torch.load(weights, weights_only=True)
    sd = {k: v + 0.01 if v.is_floating_point() else v for k, v in sd.items()}
    torch.save(sd, other)
    capsys.readouterr()
    bad = [a if a != str(weights) else str(other) for a in args]
    assert main([*bad, "--mode", "predict", "--no-feature-cache"]) == 2
    assert "different image encoder" in capsys.readouterr().err


def test_fg_erosion_leaves_a_band_next_to_invalid_depth_unscored():
    from detect.infer import ViewScorer

    depth = torch.zeros(1, 40, 40)
    depth[0, 10:30, 5:40] = 1.0  # object touching the right image border, a hole inside
    depth[0, 18:21, 18:21] = 0.0
    plain = ViewScorer(InferenceSettings()).foreground(depth)
    eroded = ViewScorer(InferenceSettings(fg_erosion=2)).foreground(depth)
    assert plain[10, 10] and not eroded[10, 10] and not eroded[11, 10]  # silhouette band
    assert plain[17, 19] and not eroded[17, 19]  # next to the hole
    assert eroded[25, 39] and not eroded[11, 39]  # the image border is not an edge; the top silhouette is
    assert eroded.sum() < plain.sum() and not (eroded & ~plain).any()



def test_volume_view_aggregation_mean_dilutes_what_one_view_sees():
    """The same view twice, once with a spike: max keeps the spike, mean halves it (a voxel's mean over
    the views that score it); a voxel scored by one view only keeps that view's value; default = max."""
    from detect.volume import ViewCalibration, VolumeAccumulator, bounding_grid
    from shared.geometry import look_at_c2w

    h, w, f = 24, 32, 40.0
    K = np.array([[f, 0, (w - 1) / 2], [0, f, (h - 1) / 2], [0, 0, 1.0]])
    calib = ViewCalibration(K, look_at_c2w(np.array([0.3, -0.2, 0.5]), np.zeros(3)))
    depth = np.full((h, w), 0.6, np.float32)
    grid = bounding_grid([(depth, calib)], 0.004)
    base = np.full((h, w), 0.2, np.float32)
    spike = base.copy()
    spike[10:12, 10:12] = 1.0
    fg = np.ones((h, w), bool)
    half = fg.copy()
    half[:, 16:] = False  # the second view scores only the left half
    acc_max, acc_mean = VolumeAccumulator(grid), VolumeAccumulator(grid, "mean")
    for acc in (acc_max, acc_mean):
        acc.add_view(depth, calib, spike, fg)
        acc.add_view(depth, calib, base, half)
    assert acc_max.instance_score() == pytest.approx(1.0)
    assert acc_mean.instance_score() == pytest.approx(0.6)  # (1.0 + 0.2) / 2
    vol = acc_mean.volume()
    assert np.isclose(vol[acc_mean.hit.reshape(grid.shape)], 0.2).mean() > 0.9  # elsewhere: 0.2 in both modes
    assert (acc_mean.hit == acc_max.hit).all()
    # second: the second highest view where two or more views score a voxel: the spike seen by one view of
    # two does not set it; seen by a second view too, it does
    acc_second = VolumeAccumulator(grid, "second")
    acc_second.add_view(depth, calib, spike, fg)
    acc_second.add_view(depth, calib, base, half)
    assert acc_second.instance_score() == pytest.approx(0.2)
    assert (acc_second.hit == acc_max.hit).all()
    acc_second.add_view(depth, calib, spike, fg)
    assert acc_second.instance_score() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="view_aggregation"):
        VolumeAccumulator(grid, "median")


def test_bank_tokens_all_banks_every_token_and_maxima_check_reports(bench, tmp_path, capsys):
    """``--patchcore-bank-tokens all`` banks all 3 × 16 tokens of the 56-px views through the CLI (the
    object bank above holds fewer); the maxima diagnostic reads the same run and names each maximum's place."""
    data, weights = bench
    out = tmp_path / "pc_all"
    args = ["--data", str(data), "--image-encoder", "cnn", "--image-encoder-weights", str(weights),
            "--depth-encoder", "cnn_on_depth", "--image-size", "56", "--no-progress", "--method", "patchcore",
            "--patchcore-bank", "class", "--patchcore-bank-tokens", "all", "--out", str(out)]
    assert main(args) == 0
    obj = torch.load(out / "real2real" / "vase" / "patchcore.pt", weights_only=True)
    assert obj["config"]["bank_tokens"] == 3 * 16 and sorted(obj["patchcore"]["banks"]) == ["-1"]
    assert obj["patchcore"]["settings"]["bank_tokens"] == "all"
    from detect.maxima_check import main as maxima_main

    capsys.readouterr()
    assert maxima_main([*args, "--json", str(tmp_path / "maxima.json")]) == 0
    records = json.loads((tmp_path / "maxima.json").read_text())
    assert len(records) == 2 and {r["label"] for r in records} <= {0, 1}
    for r in records:
        assert r["top_view"]["view"] in r["views_max"] and r["top_view"]["dist_invalid_px"] >= 0
        assert r["score"] == pytest.approx(max(r["views_max"].values()), rel=1e-3, abs=1e-3)
    assert "max within 1 voxel of GT" in capsys.readouterr().out


def test_distance_helpers_of_the_maxima_check():
    from detect.maxima_check import _distance_to_invalid, _distance_to_labels

    depth = np.ones((9, 9), np.float32)
    depth[:, 0] = np.inf  # an invalid column: distance grows by one pixel per column
    d = _distance_to_invalid(depth)
    assert d[4, 0] == 0 and d[4, 1] == pytest.approx(1, abs=0.05) and d[4, 5] == pytest.approx(5, abs=0.1)
    labels = np.zeros((5, 5, 5), bool)
    labels[0, 0, 0] = True
    dl = _distance_to_labels(labels)
    assert dl[0, 0, 0] == 0 and dl[0, 0, 3] == pytest.approx(3) and dl[4, 4, 4] == pytest.approx(4 * 3 ** 0.5)
    assert np.isinf(_distance_to_labels(np.zeros((2, 2, 2), bool))).all()


def test_shift_pixels_moves_content_and_replicates_the_edge():
    from detect.features import shift_pixels

    x = torch.arange(20, dtype=torch.float32).reshape(1, 4, 5)
    down_right = shift_pixels(x, (1, 2))
    torch.testing.assert_close(down_right[0, 1:, 2:], x[0, :3, :3])
    torch.testing.assert_close(down_right[0, 0, 2:], x[0, 0, :3])  # top row replicated
    torch.testing.assert_close(down_right[0, 1:, 0], x[0, :3, 0])  # left column replicated
    up_left = shift_pixels(x, (-1, -1))
    torch.testing.assert_close(up_left[0, :3, :4], x[0, 1:, 1:])
    assert shift_pixels(x, (0, 0)) is x
    with pytest.raises(ValueError, match="not smaller"):
        shift_pixels(x, (4, 0))


def test_bank_shift_adds_three_shifted_copies_of_the_training_views(bench, tmp_path):
    """``patchcore_bank_shift=7``: the bank holds the training views' tokens plus those of the copies
    shifted down, right and both by 7 px; the originals stay in it unchanged, the copies differ."""
    data, weights = bench
    base = ["--data", str(data), "--image-encoder", "cnn", "--image-encoder-weights", str(weights),
            "--depth-encoder", "cnn_on_depth", "--image-size", "56", "--no-progress", "--method", "patchcore",
            "--patchcore-bank", "class", "--patchcore-bank-tokens", "all", "--mode", "fit"]
    assert main([*base, "--out", str(tmp_path / "plain")]) == 0
    assert main([*base, "--out", str(tmp_path / "shift"), "patchcore_bank_shift=7"]) == 0
    plain = torch.load(tmp_path / "plain" / "real2real" / "vase" / "patchcore.pt", weights_only=True)
    shift = torch.load(tmp_path / "shift" / "real2real" / "vase" / "patchcore.pt", weights_only=True)
    p, s = plain["patchcore"]["banks"]["-1"], shift["patchcore"]["banks"]["-1"]
    assert p.shape[0] == 3 * 16 and s.shape[0] == 4 * 3 * 16
    torch.testing.assert_close(s[:48], p)
    for k in range(1, 4):
        assert (s[48 * k:48 * (k + 1)] - p).abs().mean() > 1e-3, k
    with pytest.raises(ConfigError, match="patchcore_bank_shift"):
        parse_config(["--data", "/d", "patchcore_bank_shift=-1"])


def test_cnn_token_patch_gives_a_finer_token_grid(bench, tmp_path):
    """``cnn_token_patch=7``: the CNN's tokens on a 4× finer grid (8×8 at 56 px instead of 4×4), banked
    and scored end to end."""
    data, weights = bench
    out = tmp_path / "tp7"
    assert main(["--data", str(data), "--image-encoder", "cnn", "--image-encoder-weights", str(weights),
                 "--depth-encoder", "cnn_on_depth", "--image-size", "56", "--no-progress", "--method", "patchcore",
                 "--patchcore-bank", "class", "--patchcore-bank-tokens", "all", "--out", str(out),
                 "cnn_token_patch=7"]) == 0
    obj = torch.load(out / "real2real" / "vase" / "patchcore.pt", weights_only=True)
    assert obj["config"]["bank_tokens"] == 3 * 64 and obj["config"]["grid"] == [8, 8]
    assert (out / "real2real" / "vase" / "scores.csv").is_file()
    with pytest.raises(ConfigError, match="cnn_token_patch"):
        parse_config(["--data", "/d", "--image-encoder", "cnn", "cnn_token_patch=0"])
