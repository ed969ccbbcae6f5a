"""Streaming inference: min-ensembling, modality combination, O(N) memory, per-instance prediction."""

import numpy as np
import pytest
import torch

from detect.infer import (
    InferenceSettings,
    combine_maps,
    iter_view_maps,
    occluded_context,
    predict_instance,
    source_views_for,
    target_token_maps,
    target_views_for,
)
from detect.model import ModMap, cosine_similarity
from detect.preprocess import ViewGeometry, gaussian_blur, preprocess_depth, undo_geometry
from detect.volume import ViewCalibration, VolumeAccumulator, bounding_grid
from shared.geometry import look_at_c2w


def _trained_like_model(n_views=4, ci=12, cd=8, seed=0, variant="modmap"):
    torch.manual_seed(seed)
    model = ModMap(n_views, ci, cd, hidden=16, variant=variant)
    with torch.no_grad():  # leave the identity init so that the views matter
        for mod in (model.modulator_image, model.modulator_depth):
            if hasattr(mod, "fc2"):
                mod.fc2.weight.normal_(std=0.3)
    return model.eval()


def _brute_force(model, image, depth, t, sources):
    """Materialise every (s, t) map, then take the minimum: the reference for the streaming code."""
    maps_d, maps_i = [], []
    for s in sources:
        with torch.no_grad():
            pd, pi = model(image[[s]], depth[[s]], torch.tensor([s]), torch.tensor([t]))
        maps_d.append(1 - cosine_similarity(pd[0], depth[t]))
        maps_i.append(1 - cosine_similarity(pi[0], image[t]))
    return torch.stack(maps_d).min(0).values, torch.stack(maps_i).min(0).values


@pytest.mark.parametrize("chunk", [0, 1, 3])
def test_min_ensembling_equals_brute_force(chunk):
    n = 5
    model = _trained_like_model(n)
    image, depth = torch.randn(n, 9, 12), torch.randn(n, 9, 8)
    for t in range(n):
        psi_d, psi_i = target_token_maps(model, image, depth, t, range(n), chunk)
        ref_d, ref_i = _brute_force(model, image, depth, t, range(n))
        assert torch.allclose(psi_d, ref_d, atol=1e-6) and torch.allclose(psi_i, ref_i, atol=1e-6)
        assert psi_d.min() >= 0 and psi_d.max() <= 2


def test_vc_cfm_equals_modmap_restricted_to_same_view():
    n = 4
    modmap = _trained_like_model(n)
    vc = ModMap(n, 12, 8, hidden=16, variant="vc_cfm")
    vc.load_state_dict(modmap.state_dict())
    vc.eval()
    image, depth = torch.randn(n, 6, 12), torch.randn(n, 6, 8)
    for t in range(n):
        a = target_token_maps(modmap, image, depth, t, [t])
        b = target_token_maps(vc, image, depth, t, source_views_for(n, "vc_cfm")[t])
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_source_and_target_subsampling():
    full = source_views_for(6, "modmap")
    assert full == [list(range(6))] * 6
    sub = source_views_for(6, "modmap", num_source_views=3, seed=1)
    assert all(len(s) == 3 and t in s for t, s in enumerate(sub))
    assert sub == source_views_for(6, "modmap", num_source_views=3, seed=1)  # seeded
    assert source_views_for(6, "cfm") == [[t] for t in range(6)]
    assert len(target_views_for(6, 2)) == 2 and target_views_for(6, 0) == list(range(6))


def test_combination_modes():
    a, b = torch.tensor([0.2, 0.8]), torch.tensor([0.5, 0.1])
    assert combine_maps(a, b, "max").tolist() == pytest.approx([0.5, 0.8])
    assert combine_maps(a, b, "min").tolist() == pytest.approx([0.2, 0.1])
    assert combine_maps(a, b, "prod").tolist() == pytest.approx([0.1, 0.08])
    assert combine_maps(a, b, "mean").tolist() == pytest.approx([0.35, 0.45])
    with pytest.raises(ValueError):
        combine_maps(a, b, "sum")


def test_gaussian_blur_preserves_mass_and_constant_maps():
    m = torch.zeros(1, 21, 21)
    m[0, 10, 10] = 1.0
    out = gaussian_blur(m, 2.0)
    assert float(out.sum()) == pytest.approx(1.0, abs=1e-5)
    assert torch.allclose(gaussian_blur(torch.ones(2, 9, 9), 1.5), torch.ones(2, 9, 9), atol=1e-6)
    assert gaussian_blur(m, 0.0) is m


class _Recorder(torch.nn.Module):
    """Wraps a model and records the largest batch of view pairs it is called with."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.variant = model.variant
        self.max_batch = 0

    def forward(self, image, depth, s, t, class_id=None):
        self.max_batch = max(self.max_batch, image.shape[0])
        return self.model(image, depth, s, t, class_id)


def test_streaming_memory_is_linear_in_views():
    # Peak intermediate size is one chunk of sources for one target, whatever N is; the running
    # minima are (T,) per direction — no (N, N, T) tensor is ever built.
    for n in (3, 8):
        model = _Recorder(_trained_like_model(n))
        image, depth = torch.randn(n, 16, 12), torch.randn(n, 16, 8)
        size = 28
        depth_in = torch.ones(size, size)
        maps = list(iter_view_maps(model, image, depth, (4, 4), lambda t, d=depth_in: d, size,
                                   InferenceSettings(source_chunk=2)))
        assert len(maps) == n
        assert model.max_batch == 2
        assert all(m.combined.shape == (size, size) for m in maps)


def _scene(n_views=3, h=30, w=40):
    rng = np.random.default_rng(0)
    calibs, depths = [], []
    K = np.array([[50.0, 0, (w - 1) / 2], [0, 50.0, (h - 1) / 2], [0, 0, 1]])
    for i in range(n_views):
        ang = 2 * np.pi * i / n_views
        T = look_at_c2w(np.array([0.6 * np.cos(ang), 0.6 * np.sin(ang), 0.3]), np.zeros(3))
        d = np.full((h, w), np.nan, np.float32)
        d[5:25, 8:32] = 0.65 + 0.01 * rng.random((20, 24))
        calibs.append(ViewCalibration(K, T))
        depths.append(d)
    return depths, calibs


def _instance(n=3, size=28):
    """A small calibrated instance and a model: what predict_instance takes."""
    depths, calibs = _scene(n)
    model = _trained_like_model(n)
    image, depth = torch.randn(n, 4, 12), torch.randn(n, 4, 8)
    geoms = [ViewGeometry.for_shape(30, 40, size)] * n
    grid = bounding_grid(list(zip(depths, calibs)), 0.004)
    norm = {"mode": "nearness", "eps": 0.1, "pct": [0.5, 99.5]}
    return depths, calibs, model, image, depth, geoms, grid, norm


def test_predict_instance_streams_views_into_the_volume():
    n, size = 3, 28
    depths, calibs, model, image, depth, geoms, grid, norm = _instance(n, size)
    seen = []
    pred = predict_instance(model, image, depth, (2, 2), lambda t: (depths[t], calibs[t]), geoms, size, norm,
                            InferenceSettings(), grid, on_view=lambda m, orig: seen.append((m, orig)))
    assert [m.view for m, _ in seen] == [0, 1, 2]
    # the volume is the voxel max over the views' foreground maps, brought back to original pixels
    ref = VolumeAccumulator(grid)
    for (m, orig), d, c, g in zip(seen, depths, calibs, geoms):
        assert orig.shape == (30, 40)
        ref.add_view(d, c, orig, undo_geometry(torch.from_numpy(m.foreground), g, "nearest"))
    assert np.array_equal(pred.volume.volume(), ref.volume())
    assert pred.pred_score == pytest.approx(float(ref.volume().max()))
    assert pred.pred_score <= pred.pred_score_2d + 1e-6  # bilinear resampling only shrinks maxima
    assert pred.timing.n_views == 3 and pred.timing.n_pairs == 9
    # foreground = valid depth of the preprocessed view; background pixels score 0
    fg_in = preprocess_depth(depths[0], size)[0][0] != 0
    assert np.array_equal(seen[0][0].foreground, fg_in.numpy())
    assert float(seen[0][0].combined[~torch.from_numpy(seen[0][0].foreground)].abs().max()) == 0.0


def test_predict_without_calibration_uses_the_2d_score():
    n, size = 2, 28
    depths, _ = _scene(n)
    model = _trained_like_model(n)
    image, depth = torch.randn(n, 4, 12), torch.randn(n, 4, 8)
    geoms = [ViewGeometry.for_shape(30, 40, size)] * n
    norm = {"mode": "nearness", "eps": 0.1, "pct": [0.5, 99.5]}
    pred = predict_instance(model, image, depth, (2, 2), lambda t: (depths[t], None), geoms, size, norm,
                            InferenceSettings(), None)
    assert pred.volume is None and pred.pred_score == pred.pred_score_2d > 0


def test_occluded_context_marks_what_a_view_sees_through_a_hole():
    """A front wall at 1.0 m with a hole onto a back wall at 1.3 m: back-wall pixels within the radius of
    the hole's rim are context; the rim, the back wall far from any nearer surface and invalid pixels are not."""
    depth = np.full((40, 40), 1.0, np.float32)
    depth[10:30, 10:30] = 1.3  # seen through the hole
    depth[0, 0] = np.nan
    ctx = occluded_context(depth, radius_px=3, tolerance_m=0.05)
    assert not ctx[0:10].any() and not ctx[:, 0:10].any()  # the front wall, rim included
    # back wall within the radius of its jump pixels (the first back-wall pixels next to the rim)
    assert ctx[10:14, 10:30].all() and ctx[26:30, 10:30].all()
    assert not ctx[14:26, 14:26].any()  # back wall farther than the radius from the rim
    assert not ctx[0, 0]
    # a dent shallower than the tolerance is no context, nor is a steep slope without a jump
    dent = np.full((40, 40), 1.0, np.float32)
    dent[15:25, 15:25] = 1.006
    assert not occluded_context(dent, 3, 0.05).any()
    slope = np.tile(1.0 + 0.04 * np.arange(40, dtype=np.float32), (40, 1))  # 4 cm per pixel, 1.6 m in all
    assert not occluded_context(slope, 3, 0.05).any()


def test_context_pixels_score_only_voxels_no_view_sees_plainly():
    """The second tier: a voxel scored plainly by one view ignores a higher context score of another;
    a voxel seen only as context keeps the context maximum."""
    depths, calibs = _scene(2)
    grid = bounding_grid(list(zip(depths, calibs)), 0.004)
    high = np.full(depths[0].shape, 5.0, np.float32)
    low = np.full(depths[1].shape, 1.0, np.float32)
    plain = VolumeAccumulator(grid)
    plain.add_view(depths[0], calibs[0], high, None)
    plain.add_view(depths[1], calibs[1], low, None)
    tiered = VolumeAccumulator(grid)
    tiered.add_view(depths[0], calibs[0], high, None, context=np.ones(high.shape, bool))  # all context
    tiered.add_view(depths[1], calibs[1], low, None)
    only0 = VolumeAccumulator(grid)
    only0.add_view(depths[0], calibs[0], high, None)
    only1 = VolumeAccumulator(grid)
    only1.add_view(depths[1], calibs[1], low, None)
    seen0, seen1 = only0.hit.reshape(grid.shape), only1.hit.reshape(grid.shape)
    vol = tiered.volume()
    assert (seen0 & seen1).any() and (seen0 & ~seen1).any()
    assert np.all(vol[seen0 & seen1] == 1.0)  # view 1 sees these plainly: its score wins
    assert np.all(vol[seen0 & ~seen1] == 5.0)  # only view 0 sees these: its context score stands
    assert np.array_equal(tiered.hit, plain.hit) and plain.volume().max() == 5.0
    with pytest.raises(ValueError, match="context mask"):
        tiered.add_view(depths[0], calibs[0], high, None, context=np.ones((3, 3), bool))


def test_predict_instance_applies_the_occlusion_gate_to_the_volume_only():
    n, size = 3, 28
    depths, calibs, model, image, depth, geoms, grid, norm = _instance(n, size)
    settings = InferenceSettings(occlusion_gate_m=1e-4, occlusion_gate_tokens=1.0)  # a tiny tolerance gates a lot
    seen = []
    pred = predict_instance(model, image, depth, (2, 2), lambda t: (depths[t], calibs[t]), geoms, size, norm,
                            settings, grid, on_view=lambda m, orig: seen.append((m, orig)))
    ref = VolumeAccumulator(grid)
    n_context = 0
    for (m, orig), d, c, g in zip(seen, depths, calibs, geoms):
        ctx = occluded_context(d * c.depth_scale, 1.0 * g.side / 2, 1e-4)
        n_context += int(ctx.sum())
        ref.add_view(d, c, orig, undo_geometry(torch.from_numpy(m.foreground), g, "nearest"), context=ctx)
    assert n_context > 0
    assert np.array_equal(pred.volume.volume(), ref.volume())
