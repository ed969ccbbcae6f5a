"""Nominal–actual surface comparison (detect/geometry.py): registration, deviation maps, fusion, wiring."""

import numpy as np
import pytest
import torch

from detect.config import parse_config
from detect.geometry import (
    GeometrySettings,
    InstanceSurface,
    SurfaceReference,
    TemplateView,
    deviation_map,
    edge_band,
    fuse_scores,
    register,
    see_through,
    template_support,
    view_points,
)
from detect.patchcore import PatchCoreSettings, leave_one_view_out_scale
from detect.volume import ViewCalibration
from shared.config import ConfigError


def _cup(step: float = 0.0015, bump: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Points and outward normals of a closed-bottom cylinder (r 0.1 m, h 0.2 m); ``bump`` metres of smooth
    outward relief (radius 3 cm) on the wall at angle 0, height 0.1 m."""
    n_theta, n_z = int(2 * np.pi * 0.1 / step), int(0.2 / step)
    th, z = np.meshgrid(np.linspace(0, 2 * np.pi, n_theta, endpoint=False), np.linspace(0, 0.2, n_z))
    th, z = th.ravel(), z.ravel()
    s = np.hypot(0.1 * np.angle(np.exp(1j * th)), z - 0.1) / 0.03
    r = 0.1 + bump * np.clip(1 - s * s, 0, None) ** 2
    wall = np.stack([r * np.cos(th), r * np.sin(th), z], 1)
    wall_n = np.stack([np.cos(th), np.sin(th), np.zeros_like(th)], 1)
    g = np.arange(-0.1, 0.1, step)
    x, y = np.meshgrid(g, g)
    keep = np.hypot(x, y) < 0.1
    bottom = np.stack([x[keep], y[keep], np.zeros(keep.sum())], 1)
    bottom_n = np.tile([0.0, 0.0, -1.0], (len(bottom), 1))
    return np.concatenate([wall, bottom]), np.concatenate([wall_n, bottom_n])


def test_affine_registration_absorbs_global_tolerances_and_keeps_the_bump():
    """A part 0.6 % wider in x, leaning 0.4 % and placed 1.5 mm / 0.6° off: after registration its nominal
    surface lies within the noise of the reference, while a 4 mm bump stands out at its full height.
    A rigid fit alone leaves the global shape error (larger nominal deviation)."""
    rng = np.random.default_rng(0)
    ref_pts, ref_n = _cup()
    reference = SurfaceReference(ref_pts, ref_n)
    test, _ = _cup(bump=0.004)
    test = test + rng.normal(0, 1e-4, test.shape)
    a = np.deg2rad(0.6)
    A = np.array([[1.006 * np.cos(a), -np.sin(a), 0.004], [np.sin(a), np.cos(a), 0.0], [0, 0, 1.0]])
    test = test @ A.T + [0.0015, -0.001, 0.0005]
    on_bump = np.linalg.norm(test - (A @ [0.104, 0, 0.1] + [0.0015, -0.001, 0.0005]), axis=1) < 0.006

    def deviations(settings):
        return reference.deviation(register(test, reference, settings).apply(test))

    affine = deviations(GeometrySettings())
    rigid = deviations(GeometrySettings(affine=False))
    far = ~on_bump & (np.abs(test[:, 2] - 0.1) > 0.06)
    assert np.quantile(affine[far], 0.99) < 0.0006
    assert np.quantile(rigid[far], 0.99) > np.quantile(affine[far], 0.99)
    assert np.median(affine[on_bump]) > 0.003


def _stepped_part(ledge_z: float, bump: float = 0.0, step: float = 0.0015) -> tuple[np.ndarray, np.ndarray]:
    """Points and outward normals of a lathe part: a body (r 0.1 m) up to ``ledge_z``, a ledge out to r 0.11 m,
    a lid skirt (r 0.11 m) up to a top disc at 0.25 m; ``bump`` metres of relief (radius 3 cm) on the body at
    angle 0, height 0.08 m."""
    def wall(r, z0, z1):
        th, z = np.meshgrid(np.linspace(0, 2 * np.pi, int(2 * np.pi * r / step), endpoint=False),
                            np.arange(z0, z1, step))
        th, z = th.ravel(), z.ravel()
        s = np.hypot(r * np.angle(np.exp(1j * th)), z - 0.08) / 0.03
        rr = r + (bump * np.clip(1 - s * s, 0, None) ** 2 if r < 0.105 else 0.0)
        return np.stack([rr * np.cos(th), rr * np.sin(th), z], 1), np.stack([np.cos(th), np.sin(th), 0 * th], 1)

    def disc(r0, r1, z, up):
        g = np.arange(-r1, r1, step)
        x, y = np.meshgrid(g, g)
        keep = (np.hypot(x, y) < r1) & (np.hypot(x, y) >= r0)
        return np.stack([x[keep], y[keep], np.full(keep.sum(), z)], 1), np.tile([0.0, 0.0, up], (keep.sum(), 1))

    parts = [wall(0.1, 0.0, ledge_z), disc(0.1, 0.11, ledge_z, 1.0), wall(0.11, ledge_z, 0.25),
             disc(0.0, 0.11, 0.25, 1.0), disc(0.0, 0.1, 0.0, -1.0)]
    return np.concatenate([p for p, _ in parts]), np.concatenate([n for _, n in parts])


def test_profile_warp_follows_a_feature_that_moved_as_a_whole_and_keeps_the_bump():
    """The ledge between body and lid sits 5 mm higher on the test part (its body is taller, its top is not):
    no affine map fits both, and the ledge deviates by millimetres all round. The profile warp (a shift along
    z and a scale across it per 1 cm knot) follows the ledge; a 4 mm bump on one side of the body stays."""
    ref_pts, ref_n = _stepped_part(0.2)
    reference = SurfaceReference(ref_pts, ref_n)
    test, _ = _stepped_part(0.205, bump=0.004)
    test = test + np.random.default_rng(0).normal(0, 1e-4, test.shape)
    near_ledge = np.abs(test[:, 2] - 0.205) < 0.008
    on_bump = np.linalg.norm(test - [0.104, 0, 0.08], axis=1) < 0.006

    affine_reg = register(test, reference, GeometrySettings())
    warp_reg = register(test, reference, GeometrySettings(warp_slab_m=0.01, warp_smoothness=0.01))
    affine, warped = (reference.deviation(r.apply(test)) for r in (affine_reg, warp_reg))
    assert np.mean(affine[near_ledge] > 0.002) > 0.2
    assert np.mean(warped[near_ledge] > 0.002) < 0.3 * np.mean(affine[near_ledge] > 0.002)
    assert np.median(warped[on_bump]) > 0.003
    # the warp is undone exactly enough for the see-through check's reference → instance mapping
    back = warp_reg.invert(warp_reg.apply(test))
    assert np.abs(back - test).max() < 1e-6
    with pytest.raises(ValueError, match="warp_slab_m must be >= 0"):
        GeometrySettings(warp_slab_m=-0.01)


def _plane_view(bump: float = 0.0, size: int = 64) -> tuple[np.ndarray, ViewCalibration]:
    """A camera 1 m in front of the plane z = 1 (world = camera frame), an optional bump towards the camera
    at the centre, and a 4-px border of invalid depth (the silhouette)."""
    K = np.array([[100.0, 0, size / 2], [0, 100.0, size / 2], [0, 0, 1]])
    v, u = np.mgrid[0:size, 0:size]
    r2 = ((u - size / 2) ** 2 + (v - size / 2) ** 2) / 8.0 ** 2
    depth = (1.0 - bump * np.clip(1 - r2, 0, None) ** 2).astype(np.float32)
    depth[:4], depth[-4:], depth[:, :4], depth[:, -4:] = 0, 0, 0, 0
    return depth, ViewCalibration(K, np.eye(4), width=size, height=size)


def test_deviation_map_finds_the_bump_and_leaves_edges_unscored():
    flat, calib = _plane_view()
    settings = GeometrySettings(voxel_m=0.002)
    reference = SurfaceReference.from_views([(flat, calib)], settings.voxel_m)
    bumped, _ = _plane_view(bump=0.01)
    dev = deviation_map(bumped, calib, np.eye(4), reference, settings)
    assert dev.shape == bumped.shape and dev.dtype == np.float32
    assert dev[32, 32] > 0.007  # the bump's top, ~1 cm in front of the plane
    assert np.abs(dev[12:20, 12:20]).max() < 1e-3  # plain surface
    assert (dev[:7] == 0).all() and (dev[:, -7:] == 0).all()  # invalid border + edge_px=3 band
    band = edge_band(bumped, 0.01, 0)
    assert band[0, 0] and not band[32, 32]


def test_template_support_keeps_what_differs_and_where_nothing_compares():
    """A stain on the test view (same camera, same surface) gets full weight, the plain surface around it a
    small one (only noise differs), a brighter exposure is absorbed by the photometric fit, and pixels the
    template cannot compare (saturated, outside its view's depth) keep weight 1."""
    rng = np.random.default_rng(0)
    depth, calib = _plane_view()
    v, u = np.mgrid[0:64, 0:64]
    texture = (100 + 40 * np.sin(u / 3.0) * np.cos(v / 4.0)).astype(np.float32)
    template = TemplateView(np.clip(texture + rng.normal(0, 1, texture.shape), 0, 255).astype(np.uint8),
                            depth, calib)
    test = 1.1 * texture + 5 + rng.normal(0, 1, texture.shape)  # another exposure
    test[28:36, 28:36] *= 0.6  # a stain
    test[10:14, 50:54] = 255  # a saturated highlight
    test = np.clip(test, 0, 255).astype(np.uint8)
    settings = GeometrySettings()
    w = template_support(test, depth, calib, np.eye(4), template, 0.05, settings)
    assert w.shape == depth.shape and w.dtype == np.float32
    assert w[30:34, 30:34].min() == 1.0  # the stain differs by far more than 5 % of full scale
    assert np.median(w[12:24, 12:24]) < 0.3  # plain surface: the fit absorbs the exposure
    assert (w[10:14, 50:54] == 1.0).all()  # saturated: no comparison, the score stands
    assert (w[:4] == 1.0).all()  # invalid depth
    # a template whose depth disagrees (another surface) compares nothing
    far = TemplateView(template.image, np.where(depth > 0, depth + 0.05, 0).astype(np.float32), calib)
    assert (template_support(test, depth, calib, np.eye(4), far, 0.05, settings) == 1.0).all()
    fused = fuse_scores(np.full(depth.shape, 0.2, np.float32), np.zeros(depth.shape, np.float32), 0.1, 0.001, w)
    assert fused[30, 30] == pytest.approx(0.2) and fused[18, 18] < 0.1


def test_see_through_moves_a_holes_scores_to_its_rim():
    """A plate (z = 1 m) with a hole of 8 cm radius in the test instance, a wall 20 cm behind it: the pixels
    that look through the hole are found (none elsewhere), their scores go to the measured rim on the plate,
    and a point right next to missing material keeps its own."""
    plate, calib = _plane_view(size=80)
    v, u = np.mgrid[0:80, 0:80]
    hole = (np.hypot(u - 40, v - 40) < 8) & (plate > 0)
    test = np.where(hole, 1.2, plate).astype(np.float32)
    settings = GeometrySettings()
    reference = SurfaceReference.from_views([(plate, calib)], settings.voxel_m)
    template = TemplateView(np.full(plate.shape, 128, np.uint8), plate, calib)
    measured = view_points(test, calib)[0]
    surface = InstanceSurface(measured, reference, np.eye(4), settings)
    assert len(surface.missing) > 0 and np.hypot(*surface.missing[:, :2].T).max() < 0.08  # the hole, not the rim
    moved, targets = see_through(test, calib, np.eye(4), template, surface, 0.03)
    assert moved.shape == test.shape and (moved == hole).all()
    assert targets.shape == (int(hole.sum()), 3)
    np.testing.assert_allclose(targets[:, 2], 1.0, atol=1e-6)  # on the plate ...
    radius = np.hypot(targets[:, 0], targets[:, 1])
    assert radius.min() > 0.07 and radius.max() < 0.095  # ... at the hole's rim
    # a wall only 2 cm behind: within the margin, nothing moves
    shallow = np.where(hole, 1.02, plate).astype(np.float32)
    assert not see_through(shallow, calib, np.eye(4), template, surface, 0.03)[0].any()
    # missing material right next to the far wall (here: a reference patch there): that wall keeps its scores
    patch = measured[np.abs(measured[:, 2] - 1.2) < 1e-6] + [0.0, 0.0, -0.02]
    near_ref = SurfaceReference(np.concatenate([reference.points, patch]),
                                np.concatenate([reference.normals, np.tile([0.0, 0.0, -1.0], (len(patch), 1))]))
    near = InstanceSurface(measured, near_ref, np.eye(4), settings)
    assert near.near_missing(patch, 0.03).all()
    assert not see_through(test, calib, np.eye(4), template, near, 0.03)[0].any()
    # no candidate pixels at all
    empty = see_through(plate, calib, np.eye(4), template, surface, 0.03)
    assert not empty[0].any() and empty[1].shape == (0, 3)


def test_template_comparisons_take_views_larger_than_cv2_remap_maps():
    """cv2.remap takes maps of fewer than 32 767 rows: a view of 200 × 200 valid pixels (a 1500 × 2048 scan has
    millions) is read as a block, with the same result as per point."""
    depth, calib = _plane_view(size=200)
    assert (depth > 0).sum() > 32767
    image = np.random.default_rng(0).integers(50, 200, (200, 200)).astype(np.uint8)  # no saturated pixel
    template = TemplateView(image, depth, calib)
    w = template_support(image, depth, calib, np.eye(4), template, 0.05, GeometrySettings())
    assert w.shape == depth.shape and np.median(w[depth > 0]) < 0.05  # the same image: nothing differs
    moved, targets = see_through(depth, calib, np.eye(4), template,
                                 InstanceSurface(view_points(depth, calib)[0],
                                                 SurfaceReference.from_views([(depth, calib)], 0.004),
                                                 np.eye(4), GeometrySettings()), 0.03)
    assert not moved.any() and targets.shape == (0, 3)


def test_template_reads_range_depth():
    """A template whose depth is the distance along the ray (depth_type "range", e.g. a time-of-flight scan)
    compares like the same template in z-depth."""
    from dataclasses import replace

    depth, calib = _plane_view()
    v, u = np.mgrid[0:64, 0:64]
    image = (100 + 40 * np.sin(u / 3.0) * np.cos(v / 4.0)).astype(np.uint8)
    test = image.copy()
    test[28:36, 28:36] //= 2
    rays = np.stack([u, v, np.ones_like(u)], -1) @ np.linalg.inv(calib.K).T
    ranged = TemplateView(image, (depth * np.linalg.norm(rays, axis=-1)).astype(np.float32),
                          replace(calib, depth_type="range"))
    settings = GeometrySettings()
    w_z = template_support(test, depth, calib, np.eye(4), TemplateView(image, depth, calib), 0.05, settings)
    w_range = template_support(test, depth, calib, np.eye(4), ranged, 0.05, settings)
    assert w_range[30, 30] == 1.0 and np.median(w_range[10:20, 10:20]) < 0.1
    np.testing.assert_allclose(w_range, w_z, atol=1e-5)


def test_fuse_scores_and_reference_round_trip(tmp_path):
    s = np.array([[0.1, 0.5]], np.float32)
    d = np.array([[0.002, 0.0005]], np.float32)
    np.testing.assert_allclose(fuse_scores(s, d, scale=0.1, tolerance_m=0.001), [[0.2, 0.5]])
    ref = SurfaceReference(np.eye(3), np.eye(3))
    again = SurfaceReference.load(ref.save(tmp_path / "ref.npz"))
    np.testing.assert_allclose(again.points, ref.points)
    np.savez(tmp_path / "bad.npz", points=np.zeros((5, 3)))
    with pytest.raises(ValueError, match="bad.npz is not a surface reference"):
        SurfaceReference.load(tmp_path / "bad.npz")
    with pytest.raises(ValueError, match=">= 3 points"):
        SurfaceReference(np.zeros((2, 3)), np.zeros((2, 3)))


def test_leave_one_view_out_scale():
    """Identical views: every token has its twin in another view (scale 0); distinct random views: > 0."""
    gen = torch.Generator().manual_seed(0)
    one = torch.randn(1, 16, 8, generator=gen)
    valid = torch.ones(3, 16, dtype=torch.bool)
    settings = PatchCoreSettings(metric="cosine", bank="class", bank_tokens="all")
    assert leave_one_view_out_scale(one.repeat(3, 1, 1), None, valid, settings) < 1e-5
    assert leave_one_view_out_scale(torch.randn(3, 16, 8, generator=gen), None, valid, settings) > 0.1


def test_geometry_config_errors():
    with pytest.raises(ConfigError, match="patchcore_geometry_tolerance_m must be >= 0"):
        parse_config(["--data", "/d", "--method", "patchcore", "patchcore_geometry_tolerance_m=-1"])
    assert parse_config(["--data", "/d", "--method", "patchcore", "--patchcore-geometry-tolerance-m", "0.001"]
                        ).patchcore_geometry_tolerance_m == 0.001
    with pytest.raises(ConfigError, match="needs patchcore_geometry_tolerance_m"):
        parse_config(["--data", "/d", "patchcore_template_tolerance=0.05"])
    with pytest.raises(ConfigError, match="patchcore_template_tolerance must be >= 0"):
        parse_config(["--data", "/d", "patchcore_template_tolerance=-1", "patchcore_geometry_tolerance_m=0.001"])
    with pytest.raises(ConfigError, match="patchcore_see_through_m must be >= 0 .* needs patchcore_geometry"):
        parse_config(["--data", "/d", "patchcore_see_through_m=0.03"])
    with pytest.raises(ConfigError, match="patchcore_see_through_m must be >= 0 .* view_aggregation max"):
        parse_config(["--data", "/d", "patchcore_see_through_m=0.03", "patchcore_geometry_tolerance_m=0.001",
                      "view_aggregation=mean"])
    with pytest.raises(ConfigError, match="patchcore_warp_slab_m .* needs patchcore_geometry_tolerance_m"):
        parse_config(["--data", "/d", "patchcore_warp_slab_m=0.02"])
    with pytest.raises(ConfigError, match="patchcore_warp_slab_m and patchcore_warp_smoothness must be >= 0"):
        parse_config(["--data", "/d", "patchcore_warp_slab_m=0.02", "patchcore_geometry_tolerance_m=0.001",
                      "patchcore_warp_smoothness=-1"])


def test_patchcore_with_the_surface_deviation_end_to_end(cnn_bench, tmp_path):
    """Fit saves the training surface and PatchCore's nominal score scale; predict fuses the deviation into
    the maps (never below PatchCore's own map) and the volumes."""
    from detect.run import main

    data, weights = cnn_bench
    base = ["--data", str(data), "save_maps=orig", "--image-encoder", "cnn", "--image-encoder-weights", str(weights),
            "--depth-encoder", "cnn_on_depth", "--image-size", "56", "--no-progress", "--method", "patchcore",
            "--cache-dir", str(tmp_path / "cache")]
    assert main([*base, "--out", str(tmp_path / "plain")]) == 0
    assert main([*base[:3], "patchcore_geometry_tolerance_m=0.001", *base[3:], "--out", str(tmp_path / "geo")]) == 0
    class_dir = tmp_path / "geo" / "real2real" / "vase"
    meta = torch.load(class_dir / "patchcore.pt", weights_only=True)["config"]
    assert meta["score_scale"] > 0 and meta["reference_points"] > 100
    assert SurfaceReference.load(class_dir / "surface_reference.npz").points.shape[1] == 3
    plain_maps = sorted((tmp_path / "plain" / "real2real" / "vase" / "maps").rglob("*_combined.npy"))
    geo_maps = sorted((class_dir / "maps").rglob("*_combined.npy"))
    assert len(plain_maps) == len(geo_maps) == 2 * 3
    raised = 0
    for p, g in zip(plain_maps, geo_maps):
        a, b = np.load(p).astype(np.float32), np.load(g).astype(np.float32)  # saved as float16
        assert (b >= a - 1e-3 * np.abs(a)).all()
        raised += int((b > a * 1.01 + 1e-4).sum())
    assert raised > 0
    assert (class_dir / "metrics.json").is_file()
    # the template support on top: the maps change where the template matches (the halo), and a template from
    # another training instance than the fit's is refused
    out = tmp_path / "tmpl"
    assert main([*base[:3], "patchcore_geometry_tolerance_m=0.001", "patchcore_template_tolerance=0.05", *base[3:],
                 "--out", str(out)]) == 0
    tmpl_maps = sorted((out / "real2real" / "vase" / "maps").rglob("*_combined.npy"))
    assert len(tmpl_maps) == 6
    assert any(not np.allclose(np.load(a), np.load(b)) for a, b in zip(geo_maps, tmpl_maps))
    # the see-through relocation: the same maps (it moves scores in the volume only), volumes written
    out = tmp_path / "see"
    assert main([*base[:3], "patchcore_geometry_tolerance_m=0.001", "patchcore_see_through_m=0.03", *base[3:],
                 "--out", str(out)]) == 0
    see_maps = sorted((out / "real2real" / "vase" / "maps").rglob("*_combined.npy"))
    assert all(np.array_equal(np.load(a), np.load(b)) for a, b in zip(geo_maps, see_maps))
    assert len(list((out / "real2real" / "vase" / "volumes").glob("*.npz"))) == 2
    # the profile warp refines the registration: the deviation part of the maps changes, the run completes
    out = tmp_path / "warp"
    assert main([*base[:3], "patchcore_geometry_tolerance_m=0.001", "patchcore_warp_slab_m=0.02", *base[3:],
                 "--out", str(out)]) == 0
    warp_maps = sorted((out / "real2real" / "vase" / "maps").rglob("*_combined.npy"))
    assert len(warp_maps) == 6 and (out / "real2real" / "vase" / "metrics.json").is_file()
    assert any(not np.allclose(np.load(a), np.load(b)) for a, b in zip(geo_maps, warp_maps))
