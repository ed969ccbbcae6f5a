"""CMDR-IAD-style scoring: fusion formulas against hand computations, decoders, modality isolation,
every mode end to end (single view and multiview)."""

from __future__ import annotations

import math
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from data_prep import fixtures
from detect.cmdr import (
    POST_SIGMA_FRAC,
    PRE_SIGMA_FRAC,
    Decoders,
    DecoderSettings,
    ReconstructionDecoder,
    ScoringSettings,
    TokenScores,
    box_mean,
    cfm_distance,
    cfm_normalizations,
    cmdr_fusion,
    confidence_weighted_reconstruction,
    fit_decoder,
    gaussian_smooth,
    psi_to_distance,
    reconstruction_distance,
    reliability_gated_mapping,
    score_tokens,
)
from detect.config import parse_config
from detect.pipeline import run

TINY = ["--image-encoder", "random", "--random-encoder-arch", "vit_tiny_patch14", "--random-encoder-depth", "1",
        "--image-size", "56", "--epochs", "2", "--cmdr-epochs", "2", "--no-progress", "--encoder-batch-size", "8",
        "--device", "cpu"]


# -- hand computations (plain loops, independent of the implementation) ---------------------------
def hand_box_mean(x: np.ndarray, k: int) -> np.ndarray:
    H, W = x.shape
    r = k // 2
    out = np.zeros_like(x, dtype=np.float64)
    for i in range(H):
        for j in range(W):
            s = 0.0
            for di in range(-r, r + 1):
                for dj in range(-r, r + 1):
                    if 0 <= i + di < H and 0 <= j + dj < W:
                        s += x[i + di, j + dj]
            out[i, j] = s / (k * k)  # zero padding counted (AvgPool2d count_include_pad=True)
    return out


def hand_gate(d2: np.ndarray, d3: np.ndarray, k: int) -> np.ndarray:
    dj = d2 * d3
    mu = dj.mean()
    sigma = np.sqrt(hand_box_mean((dj - mu) ** 2, k))
    w = 4.0 + 2.0 * sigma / (sigma.mean() + 1e-8)
    return dj / (1.0 + np.exp(-w * dj))


def hand_rec(d2: np.ndarray, d3: np.ndarray) -> np.ndarray:
    w2, w3 = np.exp(-0.3 * d2), np.exp(-0.3 * d3)
    return (w2 * d2 + w3 * d3) / (w2 + w3 + 1e-8)


D2 = np.array([[0.1, 0.2, 0.0, 0.4], [0.3, 1.2, 0.9, 0.2], [0.0, 0.5, 1.6, 0.1]])
D3 = np.array([[0.2, 0.1, 0.0, 0.3], [0.1, 0.8, 1.1, 0.2], [0.0, 0.6, 1.9, 0.3]])


def t(x: np.ndarray) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


def test_box_mean_is_avgpool_with_counted_zero_padding():
    x = np.arange(12, dtype=np.float64).reshape(3, 4)
    np.testing.assert_allclose(box_mean(t(x), 3).numpy(), hand_box_mean(x, 3), rtol=1e-6)
    np.testing.assert_allclose(box_mean(t(x), 7).numpy(), hand_box_mean(x, 7), rtol=1e-6)
    ref = torch.nn.AvgPool2d(3, stride=1, padding=1)(t(x)[None, None])[0, 0]
    torch.testing.assert_close(box_mean(t(x), 3), ref)
    with pytest.raises(ValueError, match="odd"):
        box_mean(t(x), 4)


def test_reliability_gated_mapping_matches_hand_computation():
    for k in (3, 7):
        np.testing.assert_allclose(reliability_gated_mapping(t(D2), t(D3), k).numpy(), hand_gate(D2, D3, k),
                                   rtol=1e-5, atol=1e-7)
    # a tiny case computed fully by hand: d_joint = [[0, 1]], μ = 0.5, window 1 → σ_local = [0.5, 0.5],
    # W = 4 + 2·0.5/0.5 = 6, A_map = [0, sigmoid(6)·1]
    a = reliability_gated_mapping(t(np.array([[0.0, 1.0]])), t(np.array([[1.0, 1.0]])), 1)
    np.testing.assert_allclose(a.numpy(), [[0.0, 1.0 / (1.0 + math.exp(-6.0))]], rtol=1e-6)


def test_confidence_weighted_reconstruction_matches_hand_computation():
    np.testing.assert_allclose(confidence_weighted_reconstruction(t(D2), t(D3)).numpy(), hand_rec(D2, D3),
                               rtol=1e-5)
    # equal distances give that distance; a single modality is that distance alone
    np.testing.assert_allclose(confidence_weighted_reconstruction(t(D2), t(D2)).numpy(), D2, rtol=1e-5, atol=1e-7)
    assert confidence_weighted_reconstruction(None, t(D3)) is not None
    torch.testing.assert_close(confidence_weighted_reconstruction(None, t(D3)), t(D3))
    # weights exp(-0.3 d) lie in [0.55, 1] for d in [0, 2]: a mild soft-min, between min and mean
    r = confidence_weighted_reconstruction(t(np.array([0.0])), t(np.array([2.0])))
    assert 0.0 < float(r) < 1.0
    with pytest.raises(ValueError):
        confidence_weighted_reconstruction(None, None)


def test_cmdr_fusion_is_the_product_of_both_parts():
    r2, r3 = D2[::-1].copy(), D3[:, ::-1].copy()
    got = cmdr_fusion(t(D2), t(D3), t(r2), t(r3), 3).numpy()
    np.testing.assert_allclose(got, hand_gate(D2, D3, 3) * hand_rec(r2, r3), rtol=1e-5, atol=1e-7)


def test_distances():
    torch.manual_seed(0)
    a, b = torch.randn(10, 8), torch.randn(10, 8)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    torch.testing.assert_close(cfm_distance(a, b), torch.sqrt(2 - 2 * cos), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cfm_distance(a, b), (a / a.norm(dim=-1, keepdim=True) - b / b.norm(dim=-1, keepdim=True)
                                                    ).norm(dim=-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(psi_to_distance(1 - cos), cfm_distance(a, b), rtol=1e-5, atol=1e-5)


def test_cfm_normalizations_match_hand_computation():
    m = np.array([[0.0, 1.0], [4.0, 0.0]])
    image_score, pixel, pro = cfm_normalizations(m)
    # mean over non-zero = 2.5, over all = 1.25
    assert image_score == pytest.approx(4.0 / math.sqrt(2.5))
    np.testing.assert_allclose(pixel, m / math.sqrt(1.25), rtol=1e-6)
    np.testing.assert_allclose(pro, m / 2.5, rtol=1e-6)
    s, p, q = cfm_normalizations(np.zeros((2, 2)))
    assert s == 0.0 and not p.any() and not q.any()


def test_smoothing_widths_follow_cmdr_box_filters():
    assert PRE_SIGMA_FRAC * 224 == pytest.approx(math.sqrt(14), rel=1e-9)  # 5×5 ×3 + 7×7 ×2
    assert POST_SIGMA_FRAC * 224 == pytest.approx(4.69, abs=0.01)  # 5×5 ×5 + 7×7 ×3 (modmap.md §20)
    x = torch.zeros(21, 21)
    x[10, 10] = 1.0
    y = gaussian_smooth(x, 2.0)
    assert float(y.sum()) == pytest.approx(1.0, abs=1e-5) and int(y.argmax()) == 10 * 21 + 10
    torch.testing.assert_close(gaussian_smooth(x, 0.0), x)


# -- score_tokens: modes on hand-built inputs ------------------------------------------------------
def _ts() -> TokenScores:
    g = torch.Generator().manual_seed(0)
    return TokenScores(psi_image=torch.rand(3, 4, generator=g), psi_depth=torch.rand(3, 4, generator=g),
                       d_image_rec=torch.rand(3, 4, generator=g), d_depth_rec=torch.rand(3, 4, generator=g))


def test_score_tokens_modes():
    ts = _ts()
    fg = torch.ones(3, 4, dtype=torch.bool)
    fg[0, 0] = False
    nopre = dict(pre_sigma_frac=0.0)
    full = score_tokens(ts, ScoringSettings("cmdr", window=3, **nopre), fg)
    expect = cmdr_fusion(*(x * fg for x in (psi_to_distance(ts.psi_image), psi_to_distance(ts.psi_depth),
                                            ts.d_image_rec, ts.d_depth_rec)), 3)
    torch.testing.assert_close(full, expect)
    assert float(full[0, 0]) == 0.0
    torch.testing.assert_close(score_tokens(ts, ScoringSettings("cmdr", "image", **nopre), fg), ts.d_image_rec * fg)
    torch.testing.assert_close(score_tokens(ts, ScoringSettings("cmdr", "depth", **nopre), fg), ts.d_depth_rec * fg)
    cfm = score_tokens(ts, ScoringSettings("cfm"), fg)
    torch.testing.assert_close(cfm, psi_to_distance(ts.psi_image) * psi_to_distance(ts.psi_depth) * fg)
    # the image reconstruction distance is pre-smoothed (CMDR's code), the others are not
    smoothed = score_tokens(ts, ScoringSettings("cmdr", "image", pre_sigma_frac=0.25), fg)
    torch.testing.assert_close(smoothed, gaussian_smooth(ts.d_image_rec, 1.0) * fg)


def test_missing_depth_fallback_uses_the_image_branch_on_holes_only():
    ts = _ts()
    fg = torch.ones(3, 4, dtype=torch.bool)
    depth_ok = torch.ones(3, 4, dtype=torch.bool)
    depth_ok[1, 1:3] = False  # a hole in the depth inside the object
    s = ScoringSettings("cmdr", missing_depth="image_fallback", window=3, pre_sigma_frac=0.0)
    got = score_tokens(ts, s, fg, depth_ok)
    hole = ~depth_ok
    d2r = ts.d_image_rec
    sub = [torch.where(hole, d2r, d) for d in (psi_to_distance(ts.psi_image), psi_to_distance(ts.psi_depth),
                                                 ts.d_depth_rec)]
    torch.testing.assert_close(got, cmdr_fusion(sub[0], sub[1], d2r, sub[2], 3))
    # on the hole tokens the score depends on the image branch only: depth values there do not matter
    ts2 = TokenScores(ts.psi_image, ts.psi_depth.clone(), ts.d_image_rec, ts.d_depth_rec.clone())
    ts2.psi_depth[hole] = 1.9
    ts2.d_depth_rec[hole] = 1.9
    torch.testing.assert_close(score_tokens(ts2, s, fg, depth_ok), got)
    # without holes the fallback mode equals plain CMDR
    plain = score_tokens(ts, ScoringSettings("cmdr", window=3, pre_sigma_frac=0.0), fg)
    torch.testing.assert_close(score_tokens(ts, s, fg, torch.ones(3, 4, dtype=torch.bool)), plain)


def test_scoring_settings_validation():
    with pytest.raises(ValueError, match="needs --scoring cmdr"):
        ScoringSettings("cfm", "image").validate()
    with pytest.raises(ValueError, match="image_fallback"):
        ScoringSettings("cmdr", "depth", "image_fallback").validate()
    with pytest.raises(ValueError, match="odd"):
        ScoringSettings("cmdr", window=2).validate()


# -- decoders -------------------------------------------------------------------------------------
def test_decoder_is_resolution_independent():
    dec = ReconstructionDecoder.with_ratios(32, 0.5, 0.25, 3)
    n_params = sum(p.numel() for p in dec.parameters())
    # 1×1 (32→16), 3×3 (16→8), 3×3 (8→16), 1×1 (16→32): nothing depends on the number of tokens
    assert n_params == (32 * 16 + 16) + (16 * 8 * 9 + 8) + (8 * 16 * 9 + 16) + (16 * 32 + 32)
    assert not any(isinstance(m, torch.nn.Linear) for m in dec.modules())
    for grid in ((4, 4), (7, 5), (64, 64)):
        x = torch.randn(2, grid[0] * grid[1], 32)
        assert dec(x, grid).shape == x.shape
    with pytest.raises(ValueError, match="expected"):
        dec(torch.randn(1, 10, 32), (4, 4))
    again = ReconstructionDecoder.from_config(dec.config())
    assert again.config() == dec.config()


def test_decoder_training_and_distance(tmp_path):
    torch.manual_seed(0)
    grid = (5, 5)
    basis = torch.randn(2, 16)
    nominal = torch.randn(8, 25, 2) @ basis  # nominal features live in a 2-d subspace
    settings = DecoderSettings(epochs=25, batch_size=8, lr=2e-2, hidden_ratio=0.5, bottleneck_ratio=0.25, seed=0)
    losses: list[float] = []
    dec = fit_decoder(nominal, grid, settings, log=lambda r: losses.append(r["loss"]))
    assert losses[-1] < 0.5 * losses[0]
    d_nom = reconstruction_distance(dec, nominal[:2], grid).mean()
    odd = nominal[:2].clone()
    odd[:, 12] = torch.randn(2, 16) * 3  # an off-subspace token
    d_odd = reconstruction_distance(dec, odd, grid)[:, 12].mean()
    assert d_odd > 2 * d_nom
    assert reconstruction_distance(dec, nominal[0], grid).shape == (25,)
    again = fit_decoder(nominal, grid, settings)  # seeded: the same weights
    torch.testing.assert_close(again(nominal[:1], grid), dec(nominal[:1], grid))
    decs = Decoders(image=dec, meta={"k": 1})
    decs.save(tmp_path / "d.pt")
    loaded = Decoders.load(tmp_path / "d.pt")
    assert loaded.depth is None and loaded.meta["k"] == 1
    torch.testing.assert_close(loaded.image(nominal[:1], grid), dec(nominal[:1], grid))


# -- end to end -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mvtec(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mvtec3d")
    fixtures.write_mvtec3d(root, categories=("bagel",), hw=(28, 28),
                           layout={"train": {"good": 2}, "test": {"good": 2, "hole": 2}}, defects=True)
    return root


def _run(args: list[str]) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run(parse_config(args))


MODES = {
    "modmap": [],
    "cfm": ["--scoring", "cfm"],
    "cmdr": ["--scoring", "cmdr"],
    "cmdr_image_only": ["--scoring", "cmdr", "--modality", "image"],
    "cmdr_depth_only": ["--scoring", "cmdr", "--modality", "depth"],
    "cmdr_image_fallback": ["--scoring", "cmdr", "--missing-depth", "image_fallback"],
}


def _modes_end_to_end(names, mvtec, tiny_ckpt, tmp_path):
    for name in names:
        extra = MODES[name]
        res = _run(["--dataset", "mvtec3d", "--data", str(mvtec), "--ckpt", str(tiny_ckpt), *TINY,
                    "--out", str(tmp_path / name), "--cache-dir", str(tmp_path / "cache"), *extra])
        m = res[name]["bagel"]
        assert m["method"] == name and m["n_images"] == 4
        assert np.isfinite(m["image_auroc"]) and np.isfinite(m["pixel_auroc"])
        assert all(np.isfinite(v) for v in m["pixel_aupro"].values())
        assert f"| {name} | AUPRO@1% |" in (tmp_path / name / "results.md").read_text()


def test_cfm_and_fallback_modes_end_to_end(mvtec, tiny_ckpt, tmp_path):
    # modmap, cmdr, image-only and depth-only run end to end in the other tests of this file and of
    # test_detect_single_view.py; the slow test below runs all six on one fixture.
    _modes_end_to_end(["cfm", "cmdr_image_fallback"], mvtec, tiny_ckpt, tmp_path)


@pytest.mark.slow
def test_every_single_view_mode_end_to_end(mvtec, tiny_ckpt, tmp_path):
    _modes_end_to_end(list(MODES), mvtec, tiny_ckpt, tmp_path)


def test_image_only_never_reads_depth(mvtec, tmp_path):
    root = tmp_path / "rgb_only"
    shutil.copytree(mvtec, root)
    for xyz in root.glob("bagel/*/*/xyz"):
        shutil.rmtree(xyz)  # no depth files at all, and no DINO-Depth checkpoint either
    res = _run(["--dataset", "mvtec3d", "--data", str(root), "--ckpt", str(tmp_path / "absent.pth"), *TINY,
                "--out", str(tmp_path / "o"), "--scoring", "cmdr", "--modality", "image"])
    assert np.isfinite(res["cmdr_image_only"]["bagel"]["pixel_auroc"])
    dec = Decoders.load(tmp_path / "o/mvtec3d/bagel/decoders.pt")
    assert dec.image is not None and dec.depth is None
    assert "depth_encoder" not in dec.meta


def test_depth_only_never_reads_images(mvtec, tiny_ckpt, tmp_path):
    root = tmp_path / "xyz_only"
    shutil.copytree(mvtec, root)
    for rgb in root.glob("bagel/*/*/rgb"):
        shutil.rmtree(rgb)
    # the default image encoder without --image-encoder-weights would fail if it were ever loaded
    args = [a for a in TINY if a not in ("random", "vit_tiny_patch14", "1")]
    args = [a for a in args if a not in ("--image-encoder", "--random-encoder-arch", "--random-encoder-depth")]
    res = _run(["--dataset", "mvtec3d", "--data", str(root), "--ckpt", str(tiny_ckpt), *args,
                "--out", str(tmp_path / "o"), "--scoring", "cmdr", "--modality", "depth"])
    m = res["cmdr_depth_only"]["bagel"]
    assert np.isfinite(m["pixel_auroc"]) and m["random_image_encoder"] is False
    assert "RANDOM IMAGE ENCODER" not in (tmp_path / "o/results.md").read_text()


def test_multiview_cmdr_two_d_only(tiny_ckpt, tmp_path):
    """The multiview pipeline with CMDR scoring (per-view fusion, ModMap's aggregation), no calibration."""
    root = tmp_path / "mv"
    fixtures.write_synthetic_views(root, classes=("stool",), n_views=3, hw=(30, 40))
    for scoring in ("cmdr", "cfm"):
        out = tmp_path / scoring
        res = _run(["--data", str(root), "--ckpt", str(tiny_ckpt), *TINY, "--out", str(out), "--scoring", scoring,
                    "--calib-reader", "none", "--gt-reader", "none", "--save-maps", "input"])
        assert 0.0 <= res["real2real"]["stool"]["image_auroc"] <= 1.0
        maps = sorted((out / "real2real/stool/maps/stool_02_bad").glob("*_combined.npy"))
        assert len(maps) == 3 and all(np.isfinite(np.load(p)).all() for p in maps)
    assert (tmp_path / "cmdr/real2real/stool/decoders.pt").is_file()
    assert not (tmp_path / "cfm/real2real/stool/decoders.pt").exists()


@pytest.mark.slow
def test_multiview_cmdr_with_volumes(tiny_ckpt, tmp_path):
    """CMDR scoring on the synthetic benchmark with calibration and GT: fused per-view maps are
    back-projected and max-aggregated into volumes exactly like ModMap's."""
    from data_prep.synthetic import SynthConfig, generate_benchmark

    data = tmp_path / "data"
    generate_benchmark(data, SynthConfig(classes=("vase",), n_views=3, width=64, height=48, n_test=2,
                                         setups=("real2real",)), progress=False)
    for extra in (["--scoring", "cmdr"], ["--scoring", "cmdr", "--missing-depth", "image_fallback"]):
        out = tmp_path / "-".join(extra)
        res = _run(["--data", str(data), "--ckpt", str(tiny_ckpt), *TINY, "--out", str(out), *extra])
        m = res["real2real"]["vase"]
        assert "voxel_aupro" in m and np.isfinite(m["voxel_auroc"])
        assert len(list((out / "real2real/vase/volumes").glob("*.npz"))) == 2
