"""The synthetic multiview benchmark generator (data_prep/synthetic.py): layout, multiview geometric
consistency, GT volumes vs injected anomalies, artefacts, determinism, CLI."""

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("open3d")  # the generator ray-casts with open3d (needs libusb-1.0, see shared/sysdeps)

from data_prep import synthetic as syn
from detect.data.sim3d import SiM3DClass, load_depth
from shared.geometry import backproject_depth, project_points

TINY = {"classes": ("stool", "bin"), "n_views": 6, "width": 192, "height": 144, "n_test": 4, "seed": 3,
        "depth_noise_m": 0.0, "voxels_across": 96}


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "bench"
    syn.generate_benchmark(root, syn.SynthConfig(**TINY), progress=False)
    return root


def test_layout_and_file_formats(bench):
    summary = json.loads((bench / "benchmark.json").read_text())
    assert summary["format"] == "synthetic-sim3d" and summary["status"] == "complete"
    for cls in TINY["classes"]:
        c = bench / cls
        stems = summary["classes"][cls]["stems"]
        assert stems == [str(i) for i in range(1, 7)]
        tests = summary["classes"][cls]["test"]
        assert len(tests) == 4 and sum(t["label"] == "anomalous" for t in tests) == 2  # 50 %
        for t in tests:
            assert ("bad" in t["name"]) == (t["label"] == "anomalous")
            assert bool(t["anomalies"]) == (t["label"] == "anomalous")
        for inst in [f"{cls}_real"] + [t["name"] for t in tests]:
            for stem in stems:
                depth = np.load(c / inst / "depth" / f"{stem}.npy")
                assert depth.dtype == np.float32 and depth.shape == (144, 192)
                assert not np.isnan(depth).any() and np.isposinf(depth).any()  # +inf = no surface
                assert np.isfinite(depth).any() and (depth[np.isfinite(depth)] > 0).all()
                import cv2

                img = cv2.imread(str(c / inst / "rgb" / f"{stem}_2.png"), cv2.IMREAD_UNCHANGED)
                assert img.dtype == np.uint8 and img.shape == (144, 192)
                with np.load(c / inst / "calib" / f"{stem}.npz") as cal:
                    assert cal["K"].shape == (3, 3) and cal["T_c2w"].shape == (4, 4)
                    assert int(cal["width"]) == 192 and int(cal["height"]) == 144
                    assert str(cal["depth_type"]) == "z" and float(cal["pixel_center"]) == 0.0
                    assert float(cal["depth_scale"]) == 1.0
        synth = c / f"{cls}_synth"
        assert sorted(p.name for p in (synth / "DEPTH").iterdir()) == sorted(f"{s}_depth.exr" for s in stems)
        assert sorted(p.name for p in (synth / "RGB").iterdir()) == sorted(f"{s}_2.png" for s in stems)
        for t in tests:
            with np.load(c / t["name"] / "gt" / "volume.npz") as gt:
                assert gt["labels"].dtype == bool and gt["labels"].ndim == 3
                assert gt["occupancy"].shape == gt["labels"].shape and gt["origin"].shape == (3,)
                assert gt["labels"].any() == (t["label"] == "anomalous")
                assert not (gt["labels"] & ~gt["occupancy"]).any()  # anomalous voxels are in the domain
                # the object spans about voxels_across voxels
                extent = np.ptp(np.argwhere(gt["occupancy"]), axis=0).max() + 1
                assert 0.75 * TINY["voxels_across"] <= extent <= 1.05 * TINY["voxels_across"]
            assert len(list((c / t["name"] / "gt" / "masks").iterdir())) == 6
        cams = json.loads((c / "cameras.json").read_text())
        assert [v["stem"] for v in cams["views"]] == stems


def _bilinear_depth(depth: np.ndarray, uv: np.ndarray, max_spread: float) -> np.ndarray:
    """Bilinear depth at continuous pixel coordinates; NaN where a neighbour is missing or where the
    four neighbours straddle a depth discontinuity."""
    H, W = depth.shape
    u0, v0 = np.floor(uv[:, 0]).astype(int), np.floor(uv[:, 1]).astype(int)
    inside = (u0 >= 0) & (v0 >= 0) & (u0 < W - 1) & (v0 < H - 1)
    out = np.full(len(uv), np.nan)
    u0, v0, fu, fv = u0[inside], v0[inside], uv[inside, 0] - u0[inside], uv[inside, 1] - v0[inside]
    q = np.stack([depth[v0, u0], depth[v0, u0 + 1], depth[v0 + 1, u0], depth[v0 + 1, u0 + 1]], axis=1)
    val = (q[:, 0] * (1 - fu) * (1 - fv) + q[:, 1] * fu * (1 - fv) + q[:, 2] * (1 - fu) * fv
           + q[:, 3] * fu * fv)
    smooth = np.isfinite(q).all(axis=1) & (np.ptp(q, axis=1) < max_spread)
    out[np.nonzero(inside)[0][smooth]] = val[smooth]
    return out


@pytest.mark.parametrize("instance", ["stool_synth", "first_bad"])
def test_multiview_geometric_consistency(bench, instance):
    """Back-project view i with its K and pose, reproject into view j: the depth there agrees to well
    below a millimetre wherever the point is visible in j."""
    ds = SiM3DClass(bench, "stool")
    rec = ds.train_record("synth2real") if instance == "stool_synth" else next(
        r for r in ds.test_records if r.label == 1)
    views = list(ds.iter_views(rec))
    diffs = []
    for vi in views:
        pts, _ = backproject_depth(vi.depth, vi.calib.K, vi.calib.T_c2w)
        for vj in views:
            if vj is vi:
                continue
            uv, z = project_points(pts, vj.calib.K, vj.calib.T_c2w)
            d = _bilinear_depth(vj.depth.astype(np.float64), uv, max_spread=0.004)
            diff = z - d
            diffs.append(diff[np.isfinite(diff) & (diff < 0.003)])  # larger positive: occluded in view j
    diffs = np.abs(np.concatenate(diffs))
    assert len(diffs) > 5000
    assert np.median(diffs) < 1e-4  # 0.1 mm, mostly the bilinear interpolation of a curved surface
    assert np.quantile(diffs, 0.99) < 1e-3  # sub-millimetre
    assert (diffs < 1e-3).mean() > 0.99


def test_synth_depth_lies_exactly_on_the_cad_mesh(bench):
    """The clean render of the nominal mesh: back-projected pixels are on the mesh to within float32
    rounding, which pins down K, the pose and the pixel-centre convention."""
    import open3d as o3d

    model = syn.OBJECT_MODELS["bin"]
    mesh = model.build(dict(model.nominal), syn.SynthConfig().mesh_spacing_m)
    scene = o3d.t.geometry.RaycastingScene()
    scene.add_triangles(o3d.core.Tensor(mesh.vertices.astype(np.float32)),
                        o3d.core.Tensor(mesh.triangles.astype(np.uint32)))
    ds = SiM3DClass(bench, "bin")
    for v in ds.iter_views(ds.train_record("synth2real")):
        pts, _ = backproject_depth(v.depth, v.calib.K, v.calib.T_c2w)
        dist = scene.compute_distance(o3d.core.Tensor(pts.astype(np.float32))).numpy()
        assert len(pts) > 1000 and np.quantile(dist, 0.999) < 1e-5  # 10 µm
        # half a pixel off would put points millimetres away from the surface at oblique angles
        shifted, _ = backproject_depth(v.depth, v.calib.K, v.calib.T_c2w, pixel_center=0.5)
        off = scene.compute_distance(o3d.core.Tensor(shifted.astype(np.float32))).numpy()
        assert np.quantile(off, 0.9) > 20 * np.quantile(dist, 0.9)


def test_same_rig_for_every_instance(bench):
    ds = SiM3DClass(bench, "bin")
    calibs = [[v.calib for v in ds.iter_views(r)] for r in [ds.train_record("real2real"), *ds.test_records]]
    for other in calibs[1:]:
        for a, b in zip(calibs[0], other):
            np.testing.assert_array_equal(a.K, b.K)
            np.testing.assert_array_equal(a.T_c2w, b.T_c2w)
    # intrinsics differ slightly between views, as after a real calibration
    assert not np.allclose(calibs[0][0].K, calibs[0][1].K)


def test_synth_is_clean_and_real_has_artefacts(bench):
    for cls in TINY["classes"]:
        ds = SiM3DClass(bench, cls)
        for v in ds.iter_views(ds.train_record("synth2real")):
            # CAD render: depth valid exactly on the object, no missing patches
            assert np.array_equal(np.isfinite(v.depth), v.image > 0)
    # across the real scans of the benchmark, missing-depth patches and specular highlights occur
    kinds = set()
    for meta in bench.glob("*/*/meta.json"):
        m = json.loads(meta.read_text())
        if m["role"] != "train_synth":
            kinds.update(k for v in m["artefacts"].values() for k in v)
        else:
            assert m["artefacts"] == {}
    assert {"missing_depth", "specular"} <= kinds


def test_missing_depth_patches_remove_object_pixels(bench):
    found = 0
    for meta_path in bench.glob("*/*/meta.json"):
        meta = json.loads(meta_path.read_text())
        for stem, kinds in meta["artefacts"].items():
            if "missing_depth" in kinds:
                depth = load_depth(meta_path.parent / "depth" / f"{stem}.npy")
                import cv2

                img = cv2.imread(str(meta_path.parent / "rgb" / f"{stem}_2.png"), cv2.IMREAD_GRAYSCALE)
                found += int((np.isnan(depth) & (img > 40)).sum() > 10)  # object visible, depth missing
    assert found >= 1


def _single_anomaly_instance(tmp_path: Path, kind: str, seed: int, **overrides):
    cfg = syn.SynthConfig(**{"classes": ("bin",), "n_views": 4, "width": 256, "height": 192, "seed": seed,
                             "depth_noise_m": 0.0, "artefact_view_prob": 0.0, "specular_view_prob": 0.0,
                             **overrides})
    setup = syn.build_class_setup("bin", cfg)
    job = syn.InstanceJob(setup, f"bin_01_bad_{kind}", "test", True, (kind,), [seed, 17], tmp_path / kind, cfg)
    meta = syn.generate_instance(job)
    return setup, job, meta


@pytest.mark.parametrize("kind", syn.ANOMALY_TYPES)
def test_gt_volume_is_the_observed_anomalous_surface(tmp_path, kind):
    """GT format 2: the label voxels are exactly the voxels that the masked pixels' measured depth
    (noise and artefacts included) back-projects into — every label is reachable from the 2D masks and
    every masked pixel with depth reaches a label. A cut's labels are its rim, never the removed ball."""
    setup, job, _ = _single_anomaly_instance(tmp_path, kind, seed=11, depth_noise_m=1.5e-4,
                                             artefact_view_prob=0.5, specular_view_prob=0.5)
    inst_dir = job.instance_dir
    meta = json.loads((inst_dir / "meta.json").read_text())
    an = meta["anomalies"][0]
    assert an["type"] == kind and an["visible_in_views"], "anomaly must be visible in at least one view"
    with np.load(inst_dir / "gt" / "volume.npz") as z:
        labels, occupancy, origin = z["labels"], z["occupancy"], z["origin"]
        assert int(z["format_version"]) == syn.GT_FORMAT_VERSION == 2
        assert str(z["labels_definition"]) == "observed"
    grid = setup.grid
    assert labels.shape == grid.shape and np.allclose(origin, grid.origin)
    assert labels.sum() >= 3 and not (labels & ~occupancy).any()
    import cv2

    reached = np.zeros(grid.shape, bool)
    for cam in setup.cameras:
        depth = load_depth(inst_dir / "depth" / f"{cam.stem}.npy")
        mask = cv2.imread(str(inst_dir / "gt" / "masks" / f"{cam.stem}.png"), cv2.IMREAD_GRAYSCALE) > 0
        pts, _ = backproject_depth(depth, cam.K, cam.T_c2w, mask=mask)
        idx, inside = grid.index(pts)
        assert inside.all()
        reached[idx[:, 0], idx[:, 1], idx[:, 2]] = True
    assert (reached == labels).all()
    # labels lie near the anomaly centre (within its radius, a cut's rim band, or half a scratch's length)
    centres = grid.centers(np.argwhere(labels))
    dist = np.linalg.norm(centres - np.asarray(an["center"]), axis=1)
    reach = (1 + syn.MISSING_RIM) * an["radius"] + an.get("length", 0.0) / 2 + 3 * grid.voxel_size
    assert dist.max() <= reach * 1.1 + syn.SynthConfig().mesh_spacing_m
    if kind == "missing":  # absent material is never labelled: nothing deep inside the removed ball
        assert dist.min() >= an["radius"] - 2 * grid.voxel_size
    size = an["largest_view"]
    assert size["view"] in an["visible_in_views"] and size["area_tokens"] > 0


def test_old_gt_format_is_refused_with_a_clear_message(bench, tmp_path):
    import shutil

    from detect.data.sim3d import SiM3DError

    root = tmp_path / "old"
    shutil.copytree(bench, root)
    rec = SiM3DClass(root, "stool").test_records[0]
    path = rec.path / "gt" / "volume.npz"
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    np.savez_compressed(path, **{**arrays, "format_version": np.int64(1)})
    with pytest.raises(SiM3DError, match="format version 1.*Regenerate"):
        SiM3DClass(root, "stool").load_gt(rec)
    arrays.pop("format_version")
    arrays.pop("labels_definition")
    np.savez_compressed(path, **arrays)  # a user's converted GT without a version is read as it is
    assert SiM3DClass(root, "stool").load_gt(rec).labels.shape == arrays["labels"].shape


def test_normal_instances_have_empty_gt_and_full_occupancy(bench):
    ds = SiM3DClass(bench, "stool")
    for rec in ds.test_records:
        inst = ds.load_instance(rec)
        assert inst.gt is not None
        if rec.label == 0:
            assert not inst.gt.labels.any()
        # depth is exact (depth_noise_m = 0): every valid pixel lies in an occupied voxel
        for v in inst.views:
            pts, _ = backproject_depth(v.depth, v.calib.K, v.calib.T_c2w)
            idx, inside = inst.gt.grid.index(pts)
            assert inside.all()
            assert inst.gt.occupancy[idx[:, 0], idx[:, 1], idx[:, 2]].mean() > 0.999


def _tree_bytes(root: Path) -> dict[str, bytes]:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != "benchmark.json":
            out[str(p.relative_to(root))] = p.read_bytes()
    return out


def test_deterministic_per_seed(tmp_path):
    cfg = {"classes": ("vase",), "n_views": 3, "width": 48, "height": 36, "n_test": 2, "seed": 5}
    syn.generate_benchmark(tmp_path / "a", syn.SynthConfig(**cfg), progress=False)
    syn.generate_benchmark(tmp_path / "b", syn.SynthConfig(**cfg), progress=False)
    syn.generate_benchmark(tmp_path / "c", syn.SynthConfig(**{**cfg, "seed": 6}), progress=False)
    a, b, c = (_tree_bytes(tmp_path / n) for n in "abc")
    assert a.keys() == b.keys() and len(a) > 20
    assert all(a[k] == b[k] for k in a)
    ja, jb = (json.loads((tmp_path / n / "benchmark.json").read_text()) for n in "ab")
    ja.pop("elapsed_s"), jb.pop("elapsed_s")
    assert ja == jb
    assert any(a[k] != c.get(k) for k in a if k.endswith(".npy"))


@pytest.mark.slow
def test_worker_processes_do_not_change_the_output(tmp_path):
    cfg = {"classes": ("ribbed_container",), "n_views": 3, "width": 48, "height": 36, "n_test": 2, "seed": 1}
    syn.generate_benchmark(tmp_path / "one", syn.SynthConfig(**cfg, workers=1), progress=False)
    syn.generate_benchmark(tmp_path / "two", syn.SynthConfig(**cfg, workers=2), progress=False)
    assert _tree_bytes(tmp_path / "one") == _tree_bytes(tmp_path / "two")


def test_36_views_rig():
    rings = syn.hemisphere_rings(36)
    assert sum(n for _, n in rings) == 36 and len(rings) == 3
    cfg = syn.SynthConfig(classes=("stool",), n_views=36)
    setup = syn.build_class_setup("stool", cfg)
    centers = np.array([c.center for c in setup.cameras])
    assert len(centers) == 36 and (centers[:, 2] > 0).all()
    assert len({c.stem for c in setup.cameras}) == 36
    assert len(np.unique(np.round(centers, 6), axis=0)) == 36


def test_lathe_mesh_is_closed_and_outward():
    mesh = syn.OBJECT_MODELS["ribbed_container"].build(dict(syn.OBJECT_MODELS["ribbed_container"].nominal), 0.004)
    n, area = mesh.face_normals_areas()
    centroid = mesh.vertices[mesh.triangles].mean(axis=1)
    # signed volume via the divergence theorem: positive and close to the enclosed volume
    volume = float(np.sum(area * np.einsum("ij,ij->i", centroid, n)) / 3.0)
    approx = np.pi * 0.104 ** 2 * 0.2  # the body alone
    assert approx < volume < 1.6 * approx


def test_cli_help_errors_and_overwrite(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        syn.main(["--help"])
    assert exc.value.code == 0 and "--views" in capsys.readouterr().out
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("user data")
    args = ["--classes", "vase", "--views", "2", "--size", "32", "--n-test", "1", "--quiet", "--workers", "1"]
    assert syn.main(["--out", str(foreign), *args]) == 2
    assert "refusing" in capsys.readouterr().err and (foreign / "keep.txt").exists()
    out = tmp_path / "bench"
    assert syn.main(["--out", str(out), *args]) == 0
    assert syn.main(["--out", str(out), *args]) == 2  # exists: needs --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert syn.main(["--out", str(out), *args, "--overwrite", "--classes", "bin", "--setup", "real2real"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["benchmark.json", "bin"]
    assert not (out / "bin" / "bin_synth").exists()
    assert syn.main(["--out", str(out), "--classes", "nope", "--overwrite", "--quiet"]) == 2
    assert "unknown class" in capsys.readouterr().err


def test_npy_synth_layout(tmp_path):
    cfg = syn.SynthConfig(classes=("vase",), n_views=2, width=40, height=30, n_test=0, synth_depth_format="npy",
                          setups=("synth2real",))
    syn.generate_benchmark(tmp_path / "b", cfg, progress=False)
    assert sorted(p.name for p in (tmp_path / "b" / "vase").iterdir()) == ["cameras.json", "vase_synth"]
    assert (tmp_path / "b" / "vase" / "vase_synth" / "depth" / "1.npy").is_file()



def test_anomaly_scale_grows_the_same_anomaly(tmp_path):
    """--anomaly-scale multiplies the radius of the same random draw (same centre); the GT grows with it."""
    metas, gt_voxels = {}, {}
    for scale in (0.5, 1.25):
        cfg = syn.SynthConfig(classes=("bin",), n_views=4, width=256, height=192, seed=11, depth_noise_m=0.0,
                              artefact_view_prob=0.0, specular_view_prob=0.0, anomaly_scale=scale)
        setup = syn.build_class_setup("bin", cfg)
        job = syn.InstanceJob(setup, "bin_01_bad", "test", True, ("stain",), [11, 17], tmp_path / str(scale), cfg)
        metas[scale] = syn.generate_instance(job)
        with np.load(tmp_path / str(scale) / "gt" / "volume.npz") as z:
            gt_voxels[scale] = int(z["labels"].sum())
    small, large = (json.loads((tmp_path / str(s) / "meta.json").read_text())["anomalies"][0] for s in (0.5, 1.25))
    assert large["center"] == small["center"]
    assert large["radius"] == pytest.approx(2.5 * small["radius"])
    assert gt_voxels[1.25] > 3 * gt_voxels[0.5] > 0
    with pytest.raises(syn.SynthError, match="anomaly_scale"):
        syn.SynthConfig(anomaly_scale=0.0).validate()


def test_speckles_are_the_small_pieces_beside_a_defects_largest_piece():
    from shared.geometry import VoxelGrid

    grid = VoxelGrid(np.zeros(3), 0.01, (40, 40, 40))
    labels = np.zeros(grid.shape, bool)
    labels[5:10, 5:10, 5:10] = True  # defect A: main piece (125 voxels) ...
    labels[14, 5, 5] = True  # ... and a one-voxel piece nearby
    labels[30:32, 30:32, 30:33] = True  # defect B: a lone small piece (12 voxels) stays
    a = syn.Anomaly("stain", np.array([0.075, 0.075, 0.075]), np.array([0.0, 0.0, 1.0]), 0.05)
    b = syn.Anomaly("bump", np.array([0.31, 0.31, 0.315]), np.array([0.0, 0.0, 1.0]), 0.02)
    specks = syn._speckles(labels, grid, [a, b])
    assert specks.sum() == 1 and specks[14, 5, 5]


def test_footprint_views_counts_the_views_that_see_enough_of_the_whole_footprint():
    """A view counts when the footprint (same part, same sheet, within reach) covers ≥ min_px of it."""
    pts = np.array([[0, 0, 0], [0.01, 0, 0], [0.02, 0, 0], [0.2, 0, 0], [0.01, 0, 0.001]], float)
    nrm = np.array([[0, 0, 1]] * 4 + [[0, 0, -1]], float)  # the last one: the other skin of a thin wall
    part = np.array([0, 0, 0, 0, 0])
    view_px = np.array([[5, 0, 0, 0], [5, 0, 0, 0], [0, 3, 0, 0], [0, 0, 9, 0], [0, 0, 0, 9]], float)
    min_px = np.full(4, 7.0)
    # from point 0 with reach 3 cm: view 0 sees 10 px (counts), view 1 3 px (does not), view 2 is out of reach
    assert syn.footprint_views(np.array([0]), 0.03, pts, nrm, part, view_px, min_px).tolist() == [1]
    assert syn.footprint_views(np.array([0]), 0.03, pts, nrm, part, view_px, np.full(4, 3.0)).tolist() == [2]
    assert syn.footprint_views(np.array([0]), 0.3, pts, nrm, part, view_px, min_px).tolist() == [2]
    # a cut goes through the wall: its footprint includes the other skin
    assert syn.footprint_views(np.array([0]), 0.03, pts, nrm, part, view_px, min_px, both_skins=True).tolist() == [2]
    assert syn.footprint_views(np.array([0]), 0.3, pts, nrm, np.array([0, 0, 0, 1, 0]), view_px, min_px).tolist() == [1]


def test_hidden_placement_yields_defects_few_views_see(tmp_path, monkeypatch):
    """Hidden draws put the defect where at most three views see it, by the measure of meta.json
    (``visible_in_views``); ordinary draws of the same defects are seen by more views."""
    cfg = syn.SynthConfig(classes=("bin",), n_views=12, width=192, height=144, seed=5, depth_noise_m=0.0,
                          artefact_view_prob=0.0, specular_view_prob=0.0, setups=("real2real",))
    setup = syn.build_class_setup("bin", cfg)
    views: dict[float, list[int]] = {}
    for prob in (1.0, 0.0):
        monkeypatch.setattr(syn, "FEW_VIEWS_PROB", prob)
        views[prob] = []
        for i, kind in enumerate(("bump", "stain", "dent", "scratch")):
            job = syn.InstanceJob(setup, f"bin_{i}_bad", "test", True, (kind,), [5, i], tmp_path / f"{prob}_{i}", cfg)
            syn.generate_instance(job)
            meta = json.loads((tmp_path / f"{prob}_{i}" / "meta.json").read_text())
            views[prob] += [len(a["visible_in_views"]) for a in meta["anomalies"]]
    assert all(1 <= v for v in views[1.0]), views  # hidden, but seen by some view
    assert sum(v <= 3 for v in views[1.0]) >= 3, views
    assert sum(v <= 3 for v in views[0.0]) < sum(v <= 3 for v in views[1.0]), views
