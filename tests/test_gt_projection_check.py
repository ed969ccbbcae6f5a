"""detect/gt_projection_check.py: the pixel-level and token-grid oracles (issue 18)."""

import json

import numpy as np
import pytest

pytest.importorskip("open3d")  # the generator ray-casts with open3d

from data_prep import synthetic as syn
from detect import gt_projection_check as chk


def test_token_oracle_map_is_the_token_coverage_through_the_real_chain():
    depth = np.full((240, 320), 0.5, np.float32)
    mask = np.zeros((240, 320), np.uint8)
    mask[0:40, 100:140] = 255  # 2×2 tokens of 20 px (320 px padded to 320², 224 input, patch 14); pad_top = 40
    scores, fg = chk.token_oracle_map(mask, depth, 224, 14)
    assert scores.shape == (240, 320) and fg.all()
    assert scores[20, 120] == pytest.approx(1.0, abs=1e-5)  # inside: fully covered tokens
    assert scores[200, 20] == 0.0  # far away: nothing
    assert 0.0 < scores[20, 145] < 1.0  # just outside: bilinear spill-over of the token grid
    half = np.zeros_like(mask)
    half[0:40, 100:110] = 255  # half a token wide, two tokens tall
    s2, _ = chk.token_oracle_map(half, depth, 224, 14)
    assert s2.max() < 0.6
    with pytest.raises(ValueError, match="multiple of the patch"):
        chk.token_oracle_map(mask, depth, 225, 14)


@pytest.fixture(scope="module")
def small_bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("gtcheck") / "bench"
    cfg = syn.SynthConfig(classes=("vase", "stool"), n_views=6, width=160, height=120, n_test=4, seed=2,
                          voxels_across=64, setups=("real2real",))
    syn.generate_benchmark(root, cfg, progress=False)
    return root


def test_pixel_oracle_reaches_the_observed_gt(small_bench, tmp_path):
    """The 2D masks projected as perfect maps reach the 3D labels (GT format 2): V-AUPRO@1% ≥ 0.90."""
    out_md, out_json = tmp_path / "check.md", tmp_path / "check.json"
    assert chk.main(["--data", str(small_bench), "--n-boot", "50", "--out", str(out_md), "--json",
                     str(out_json), "--size", "112"]) == 0
    doc = json.loads(out_json.read_text())
    assert doc["mean_voxel_aupro@0.01"]["pixel"] >= 0.90
    for row in doc["classes"]:
        px = row["pixel"]
        assert px["voxel_aupro"]["0.01"]["value"] >= 0.90 and px["gt_voxels_reached"] >= 0.95
        assert px["voxel_aupro"]["0.01"]["low"] <= px["voxel_aupro"]["0.01"]["value"] + 1e-9
        assert 0.0 <= row["token"]["voxel_aupro"]["0.01"]["value"] <= 1.0
    text = out_md.read_text()
    assert "pixel-level oracle" in text and "token-grid oracle (112 px input, patch 14)" in text


def test_cli_errors(small_bench, capsys):
    assert chk.main(["--data", str(small_bench), "--oracles", "voxel"]) != 0
    assert chk.main(["--data", str(small_bench / "nope")]) != 0
