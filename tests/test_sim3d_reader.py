"""SiM3D reader (detect/data/sim3d.py), EXR codec and camera/voxel geometry helpers: round trip of the
generator's output, view order, component-wise pairing, pluggable readers, and every bad-input error."""

import base64
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from detect.data.sim3d import (
    CalibReader,
    GTVolume,
    SiM3DClass,
    SiM3DDataset,
    SiM3DError,
    ViewCalib,
    get_calib_reader,
    get_gt_reader,
    list_classes,
    natural_key,
    pair_image_path,
    register_calib_reader,
    register_gt_reader,
    sort_stems,
)
from shared import exr
from shared.geometry import (
    VoxelGrid,
    backproject_depth,
    invert_rigid,
    look_at_c2w,
    pixel_rays,
    project_points,
)

# ---------------------------------------------------------------------------------------------------
# A hand-made SiM3D-style class (no generator needed): known arrays, known cameras
# ---------------------------------------------------------------------------------------------------

H, W = 12, 16
STEMS = [str(i) for i in range(1, 13)]  # not zero-padded: lexicographic != natural


def _cam(i: int) -> tuple[np.ndarray, np.ndarray]:
    K = np.array([[20.0 + i, 0.0, 7.5], [0.0, 20.0 + i, 5.5], [0.0, 0.0, 1.0]])
    az = 2 * np.pi * i / len(STEMS)
    T = look_at_c2w(np.array([np.cos(az), np.sin(az), 0.5]), np.zeros(3))
    return K, T


def _write_view(inst: Path, stem: str, i: int, synth: bool = False, depth_value: float = 0.8) -> None:
    import cv2

    rng = np.random.default_rng(i)
    depth = np.full((H, W), depth_value, np.float32) + rng.random((H, W)).astype(np.float32) * 0.01
    depth[0, :3] = np.inf  # no surface
    image = (rng.random((H, W)) * 255).astype(np.uint8)
    if synth:
        (inst / "DEPTH").mkdir(parents=True, exist_ok=True)
        (inst / "RGB").mkdir(parents=True, exist_ok=True)
        d = np.where(np.isfinite(depth), depth, np.float32(1e10))
        (inst / "DEPTH" / f"{stem}_depth.exr").write_bytes(exr.encode_exr(d))
        cv2.imwrite(str(inst / "RGB" / f"{stem}_2.png"), image)
    else:
        (inst / "depth").mkdir(parents=True, exist_ok=True)
        (inst / "rgb").mkdir(parents=True, exist_ok=True)
        np.save(inst / "depth" / f"{stem}.npy", depth)
        cv2.imwrite(str(inst / "rgb" / f"{stem}_2.png"), image)
    K, T = _cam(i)
    (inst / "calib").mkdir(exist_ok=True)
    np.savez(inst / "calib" / f"{stem}.npz", K=K, T_c2w=T, width=W, height=H, depth_scale=1.0, depth_type="z",
             pixel_center=0.0)


def make_class(root: Path, cls: str = "widget", tests=("widget_01", "widget_02_bad"), synth: bool = True) -> Path:
    c = root / cls
    for name, is_synth in [(f"{cls}_real", False), *([(f"{cls}_synth", True)] if synth else []),
                           *[(t, False) for t in tests]]:
        for i, stem in enumerate(STEMS):
            _write_view(c / name, stem, i, synth=is_synth)
    for name in (t for t in tests if "bad" in t):
        gt = c / name / "gt"
        gt.mkdir(parents=True, exist_ok=True)
        labels = np.zeros((4, 5, 6), bool)
        labels[1, 2, 3] = True
        np.savez_compressed(gt / "volume.npz", labels=labels, occupancy=labels | (np.arange(6) < 2),
                            origin=np.array([-0.1, -0.2, 0.0]), voxel_size=0.002)
    return c


@pytest.fixture
def handmade(tmp_path) -> Path:
    root = tmp_path / "data"
    make_class(root)
    return root


def test_handmade_round_trip(handmade):
    ds = SiM3DClass(handmade, "widget")
    assert ds.view_order == "lexicographic"  # not our benchmark: the authors' convention
    assert ds.stems == sorted(STEMS)  # "1", "10", "11", "12", "2", ...
    assert [r.name for r in ds.test_records] == ["widget_01", "widget_02_bad"]
    assert [r.label for r in ds.test_records] == [0, 1]
    assert set(ds.train_records) == {"real2real", "synth2real"}
    inst = ds[1]
    assert inst.gt is not None and inst.gt.labels.sum() == 1 and inst.gt.voxel_size == 0.002
    assert ds[0].gt is None
    for v in inst.views:
        i = STEMS.index(v.stem)
        raw = np.load(handmade / "widget" / "widget_02_bad" / "depth" / f"{v.stem}.npy")
        assert v.depth.dtype == np.float32 and np.isnan(v.depth[0, :3]).all()
        np.testing.assert_array_equal(v.depth[1:], raw[1:])
        assert v.image.dtype == np.uint8 and v.image.shape == (H, W)
        K, T = _cam(i)
        np.testing.assert_array_equal(v.K, K)
        np.testing.assert_array_equal(v.T_c2w, T)
        assert v.view_id == ds.stems.index(v.stem)
    # synth training instance: EXR background (= the map's maximum) becomes NaN, values exact
    synth = ds.load_instance(ds.train_record("synth2real"))
    real = ds.load_instance(ds.train_record("real2real"))
    assert synth.stems == real.stems == ds.stems
    for vs, vr in zip(synth.views, real.views):
        np.testing.assert_array_equal(np.isnan(vs.depth), np.isnan(vr.depth))
        np.testing.assert_array_equal(vs.depth[1:], vr.depth[1:])


def test_view_orders(handmade, tmp_path):
    nat = SiM3DClass(handmade, "widget", view_order="natural")
    assert nat.stems == STEMS
    lex = SiM3DClass(handmade, "widget", view_order="lexicographic")
    assert lex.stems[:5] == ["1", "10", "11", "12", "2"]
    # the view id follows the order; the calibration follows the stem
    v_nat, v_lex = nat.load_view(nat.test_records[0], 1), lex.load_view(lex.test_records[0], 1)
    assert (v_nat.stem, v_lex.stem) == ("2", "10")
    np.testing.assert_array_equal(v_lex.K, _cam(9)[0])
    # "auto" = natural for our synthetic benchmark
    (handmade / "benchmark.json").write_text(json.dumps({"format": "synthetic-sim3d"}))
    assert SiM3DClass(handmade, "widget").view_order == "natural"
    assert sort_stems(["b10", "b2", "a10", "a9"], "natural") == ["a9", "a10", "b2", "b10"]
    assert sort_stems(["b10", "b2", "a10", "a9"], "lexicographic") == ["a10", "a9", "b10", "b2"]
    assert natural_key("C2") < natural_key("C10")
    with pytest.raises(ValueError):
        SiM3DClass(handmade, "widget", view_order="random")


def test_pairing_replaces_path_components_not_substrings(tmp_path):
    root = tmp_path / "depth_maps" / "depth"  # "depth" in the root must not confuse the pairing
    make_class(root)
    ds = SiM3DClass(root, "widget")
    vf = ds.test_records[0].views[0]
    assert vf.image_path == root / "widget" / "widget_01" / "rgb" / f"{vf.stem}_2.png"
    inst = root / "widget" / "widget_01"
    assert pair_image_path(inst / "depth" / "7.npy", inst) == inst / "rgb" / "7_2.png"
    assert pair_image_path(inst / "DEPTH" / "7_depth.exr", inst) == inst / "RGB" / "7_2.png"
    with pytest.raises(SiM3DError):
        pair_image_path(inst / "other" / "7.npy", inst)


def test_dataset_and_class_listing(handmade):
    make_class(handmade, "gadget", tests=("gadget_01",), synth=False)
    assert list_classes(handmade) == ["gadget", "widget"]
    ds = SiM3DDataset(handmade, view_order="natural")
    assert [c.class_name for c in ds] == ["gadget", "widget"]
    with pytest.raises(SiM3DError, match="no training instance for synth2real"):
        ds["gadget"].train_record("synth2real")
    with pytest.raises(SiM3DError, match="not found"):
        SiM3DDataset(handmade, classes=["nope"])


# ---------------------------------------------------------------------------------------------------
# Bad input: clear errors naming the instance and the file
# ---------------------------------------------------------------------------------------------------


def test_missing_view_is_reported(handmade):
    (handmade / "widget" / "widget_01" / "depth" / "7.npy").unlink()
    with pytest.raises(SiM3DError, match=r"widget_01.*11 views.*missing views \['7'\]"):
        SiM3DClass(handmade, "widget")


def test_extra_view_is_reported(handmade):
    _write_view(handmade / "widget" / "widget_02_bad", "13", 13)
    with pytest.raises(SiM3DError, match=r"widget_02_bad.*13 views.*extra views \['13'\]"):
        SiM3DClass(handmade, "widget")


def test_missing_image_is_reported(handmade):
    (handmade / "widget" / "widget_01" / "rgb" / "3_2.png").unlink()
    with pytest.raises(SiM3DError, match=r"widget_01.*view '3'.*3_2.png missing"):
        SiM3DClass(handmade, "widget")


def test_size_mismatch_is_reported(handmade):
    import cv2

    cv2.imwrite(str(handmade / "widget" / "widget_01" / "rgb" / "5_2.png"), np.zeros((H, W + 2), np.uint8))
    ds = SiM3DClass(handmade, "widget")
    with pytest.raises(SiM3DError, match=r"widget_01.*view '5'.*5_2.png is 18×12 but depth .*5.npy is 16×12"):
        ds.load_instance(ds.test_records[0])


def test_all_invalid_depth_is_reported(handmade):
    np.save(handmade / "widget" / "widget_01" / "depth" / "4.npy", np.full((H, W), np.inf, np.float32))
    ds = SiM3DClass(handmade, "widget")
    with pytest.raises(SiM3DError, match=r"widget_01.*view '4'.*4.npy has no valid pixel"):
        ds.load_instance(ds.test_records[0])
    np.save(handmade / "widget" / "widget_01" / "depth" / "4.npy", np.zeros((H, W, 3), np.float32))
    with pytest.raises(SiM3DError, match=r"4.npy has shape \(12, 16, 3\)"):
        ds.load_instance(ds.test_records[0])


def test_missing_calibration_and_2d_only_mode(handmade):
    shutil.rmtree(handmade / "widget" / "widget_01" / "calib")
    ds = SiM3DClass(handmade, "widget")
    with pytest.raises(SiM3DError, match=r"widget_01.*calibration missing.*calib_reader=None"):
        ds.load_instance(ds.test_records[0])
    ds2d = SiM3DClass(handmade, "widget", calib_reader=None)
    assert not ds2d.has_calibration
    inst = ds2d.load_instance(ds2d.test_records[0])
    assert all(v.calib is None and v.K is None for v in inst.views)


def test_bad_calibration_is_reported(handmade):
    K, T = _cam(0)
    T[:3, :3] *= 2.0  # not a rotation
    np.savez(handmade / "widget" / "widget_01" / "calib" / "1.npz", K=K, T_c2w=T, width=W, height=H)
    ds = SiM3DClass(handmade, "widget")
    with pytest.raises(SiM3DError, match=r"widget_01.*view '1'.*bad calibration.*rigid"):
        ds.load_view(ds.test_records[0], ds.stems.index("1"))
    np.savez(handmade / "widget" / "widget_01" / "calib" / "1.npz", K=K, T_c2w=_cam(0)[1], width=W + 1, height=H)
    with pytest.raises(SiM3DError, match=r"calibration is for 17×12"):
        ds.load_view(ds.test_records[0], ds.stems.index("1"))


def test_unreadable_files_are_reported(handmade):
    (handmade / "widget" / "widget_01" / "depth" / "2.npy").write_bytes(b"not numpy")
    (handmade / "widget" / "widget_real" / "rgb" / "2_2.png").write_bytes(b"not png")
    ds = SiM3DClass(handmade, "widget")
    with pytest.raises(SiM3DError, match=r"widget_01.*cannot read depth .*2.npy"):
        ds.load_view(ds.test_records[0], ds.stems.index("2"))
    with pytest.raises(SiM3DError, match=r"widget_real.*cannot read image .*2_2.png"):
        ds.load_view(ds.train_record(), ds.stems.index("2"))


def test_bad_gt_is_reported(handmade):
    np.savez(handmade / "widget" / "widget_02_bad" / "gt" / "volume.npz", labels=np.zeros((2, 2), bool),
             origin=np.zeros(3), voxel_size=0.002)
    ds = SiM3DClass(handmade, "widget")
    with pytest.raises(SiM3DError, match=r"widget_02_bad.*bad GT volume.*3D volume"):
        ds.load_gt(ds.test_records[1])


def test_bad_instance_without_depth_folder(handmade):
    (handmade / "widget" / "widget_03_bad").mkdir()
    with pytest.raises(SiM3DError, match="widget_03_bad.*no depth/ folder"):
        SiM3DClass(handmade, "widget")


# ---------------------------------------------------------------------------------------------------
# Pluggable readers
# ---------------------------------------------------------------------------------------------------


def test_registry_and_custom_reader(handmade):
    with pytest.raises(KeyError, match="unknown calibration reader"):
        get_calib_reader("does-not-exist")
    assert get_gt_reader("none").read(handmade) is None

    @register_calib_reader("test_constant")
    class Constant(CalibReader):
        def read(self, instance_dir, view_id, view_stem):
            K, T = _cam(0)
            return ViewCalib(K=K, T_c2w=T, width=W, height=H)

    ds = SiM3DClass(handmade, "widget", calib_reader="test_constant")
    assert ds.calib_reader.name == "test_constant"
    views = list(ds.iter_views(ds.test_records[0]))
    assert all(np.array_equal(v.K, _cam(0)[0]) for v in views)
    register_calib_reader("test_constant")(Constant)  # the same factory again: allowed
    with pytest.raises(ValueError, match="calibration reader 'test_constant' is already registered"):
        register_calib_reader("test_constant")(type("Other", (Constant,), {}))
    with pytest.raises(ValueError, match="GT reader 'none' is already registered"):
        register_gt_reader("none")(lambda: None)


def test_pose_txt_reader_matches_npz(handmade):
    inst = handmade / "widget" / "widget_01"
    ds = SiM3DClass(handmade, "widget", view_order="natural")
    poses = [_cam(i)[1] for i in range(len(STEMS))]
    # a Blender-style (camera looks down −z) pose file: the reader applies diag(1, −1, −1, 1)
    flip = np.diag([1.0, -1.0, -1.0, 1.0])
    (inst / "poses.txt").write_text("\n".join(" ".join(map(repr, (T @ flip).ravel().tolist())) for T in poses))
    (inst / "intrinsics.txt").write_text(
        "# fx fy cx cy per view\n" + "\n".join(f"{20.0 + i} {20.0 + i} 7.5 5.5" for i in range(len(STEMS))))
    reader = get_calib_reader("pose_txt", blender_to_opencv=True, depth_scale=0.001)
    for view_id, stem in enumerate(ds.stems):
        cal = reader.read(inst, view_id, stem)
        ref = get_calib_reader("npz").read(inst, view_id, stem)
        np.testing.assert_allclose(cal.T_c2w, ref.T_c2w, atol=1e-12)
        np.testing.assert_allclose(cal.K, ref.K)
        assert (cal.width, cal.height, cal.depth_scale) == (W, H, 0.001)  # size from the image header
    with pytest.raises(ValueError, match="16 floats on line 13"):
        reader.read(inst, 12, "13")


def test_cameras_json_reader_on_generated_benchmark(tmp_path):
    pytest.importorskip("open3d")
    from data_prep.synthetic import SynthConfig, generate_benchmark

    root = tmp_path / "bench"
    generate_benchmark(root, SynthConfig(classes=("vase",), n_views=12, width=40, height=30, n_test=2, seed=2),
                       progress=False)
    ds = SiM3DClass(root, "vase")
    assert ds.view_order == "natural" and ds.stems == [str(i) for i in range(1, 13)]
    js = SiM3DClass(root, "vase", calib_reader="cameras_json")
    for rec in ds.test_records:
        for a, b in zip(ds.iter_views(rec), js.iter_views(js.test_records[0])):
            np.testing.assert_allclose(a.K, b.K, rtol=1e-15)
            np.testing.assert_allclose(a.T_c2w, b.T_c2w, rtol=1e-15, atol=1e-15)
    # round trip of the generator's files through the reader
    rec = next(r for r in ds.test_records if r.label == 1)
    inst = ds.load_instance(rec)
    with np.load(rec.path / "gt" / "volume.npz") as z:
        np.testing.assert_array_equal(inst.gt.labels, z["labels"])
        np.testing.assert_array_equal(inst.gt.occupancy, z["occupancy"])
    assert inst.meta["label"] == "anomalous" and inst.meta["anomalies"]
    import cv2

    for v in inst.views:
        png = cv2.imread(str(rec.path / "gt" / "masks" / f"{v.stem}.png"), cv2.IMREAD_GRAYSCALE)
        assert v.mask.dtype == bool and np.array_equal(v.mask, png > 0)
    for v in inst.views:
        raw = np.load(rec.path / "depth" / f"{v.stem}.npy")
        np.testing.assert_array_equal(np.isnan(v.depth), ~np.isfinite(raw))
        np.testing.assert_array_equal(v.depth[np.isfinite(raw)], raw[np.isfinite(raw)])
    synth = ds.load_instance(ds.train_record("synth2real"))
    assert all(np.isnan(v.depth).any() and np.isfinite(v.depth).any() for v in synth.views)


def test_sparse_gt_volume(tmp_path):
    inst = tmp_path / "i"
    (inst / "gt").mkdir(parents=True)
    np.savez(inst / "gt" / "volume.npz", labels_idx=np.array([[0, 1, 2], [3, 3, 3]]), shape=np.array([4, 4, 4]),
             occupancy_idx=np.array([[0, 1, 2], [3, 3, 3], [0, 0, 0]]), origin=np.zeros(3), voxel_size=0.002)
    gt = get_gt_reader("npz").read(inst)
    assert gt.shape == (4, 4, 4) and gt.labels.sum() == 2 and gt.occupancy.sum() == 3 and gt.labels[3, 3, 3]
    with pytest.raises(ValueError, match="outside"):
        GTVolume.from_sparse(np.array([[4, 0, 0]]), (4, 4, 4), np.zeros(3), 0.002)


# ---------------------------------------------------------------------------------------------------
# EXR
# ---------------------------------------------------------------------------------------------------

# Written by the official OpenEXR library (Python package "openexr" 3.5): 7×5 px, depth
# d = 0.5 + 0.25·u + 0.125·v with d[0, 0] = 100; channels R = 3d, G = 2d, B = d (FLOAT, ZIP), and a
# single HALF channel "Z" = d (ZIPS).
OFFICIAL_ZIP_RGB = (
    "di8xAQIAAABjaGFubmVscwBjaGxpc3QANwAAAEIAAgAAAAAAAAABAAAAAQAAAEcAAgAAAAAAAAABAAAAAQAAAFIAAgAAAAAAAAABAAAAAQAAAABj"
    "b21wcmVzc2lvbgBjb21wcmVzc2lvbgABAAAAA2RhdGFXaW5kb3cAYm94MmkAEAAAAAAAAAAAAAAABgAAAAQAAABkaXNwbGF5V2luZG93AGJveDJp"
    "ABAAAAAAAAAAAAAAAAYAAAAEAAAAbGluZU9yZGVyAGxpbmVPcmRlcgABAAAAAHBpeGVsQXNwZWN0UmF0aW8AZmxvYXQABAAAAAAAgD9zY3JlZW5X"
    "aW5kb3dDZW50ZXIAdjJmAAgAAAAAAAAAAAAAAHNjcmVlbldpbmRvd1dpZHRoAGZsb2F0AAQAAAAAAIA/dHlwZQBzdHJpbmcADQAAAHNjYW5saW5l"
    "aW1hZ2UAXgEAAAAAAAAAAAAArwAAAHheY/DYccCBgUHhgcOBhAUNDScsHA40NCxIOODwQIGBQezVhIIDDh8EBD5o3HA4sCDhgYLAB4MLARsKJnRU"
    "KDxIWDChYEPABYMPAhw/CiasiLihwfJH5onJGZ8tyCZOKEA2UeADsokRK5BNnJGBbKLEC2QTU+Ygm7ggAdlEhQfIJhZMOGS33xEGDzgctgWRMHjY"
    "FsE+4IBQB1IDIRFy2FViyqFC0lXiVgGFAHHry8E=")
OFFICIAL_ZIPS_HALF = (
    "di8xAQIAAABjaGFubmVscwBjaGxpc3QAEwAAAFoAAQAAAAAAAAABAAAAAQAAAABjb21wcmVzc2lvbgBjb21wcmVzc2lvbgABAAAAAmRhdGFXaW5k"
    "b3cAYm94MmkAEAAAAAAAAAAAAAAABgAAAAQAAABkaXNwbGF5V2luZG93AGJveDJpABAAAAAAAAAAAAAAAAYAAAAEAAAAbGluZU9yZGVyAGxpbmVP"
    "cmRlcgABAAAAAHBpeGVsQXNwZWN0UmF0aW8AZmxvYXQABAAAAAAAgD9zY3JlZW5XaW5kb3dDZW50ZXIAdjJmAAgAAAAAAAAAAAAAAHNjcmVlbldp"
    "bmRvd1dpZHRoAGZsb2F0AAQAAAAAAIA/dHlwZQBzdHJpbmcADQAAAHNjYW5saW5laW1hZ2UAWgEAAAAAAABwAQAAAAAAAIYBAAAAAAAAnAEAAAAA"
    "AACyAQAAAAAAAAAAAAAOAAAAQFYAOgA8AD0APgA/AEABAAAADgAAAAA5ADuAPIA9gD6AP0BAAgAAAA4AAAAAOgA8AD0APgA/AECAQAMAAAAOAAAA"
    "ADuAPIA9gD6AP0BAwEAEAAAADgAAAAA8AD0APgA/AECAQABB")


def _expected_exr_depth() -> np.ndarray:
    v, u = np.mgrid[0:5, 0:7]
    d = (0.5 + 0.25 * u + 0.125 * v).astype(np.float32)
    d[0, 0] = 100.0
    return d


@pytest.mark.parametrize("blob", [OFFICIAL_ZIP_RGB, OFFICIAL_ZIPS_HALF])
def test_exr_files_of_the_official_library(tmp_path, blob):
    p = tmp_path / "d.exr"
    p.write_bytes(base64.b64decode(blob))
    np.testing.assert_array_equal(exr.read_exr_channel0(p), _expected_exr_depth())  # B (OpenCV order) or Z
    # the in-memory decoder gives the same
    np.testing.assert_array_equal(exr.decode_exr_channel0(p.read_bytes(), str(p)), _expected_exr_depth())


@pytest.mark.parametrize("compression", ["ZIP", "NONE"])
def test_exr_writer_round_trip(tmp_path, compression):
    rng = np.random.default_rng(0)
    d = rng.random((37, 53)).astype(np.float32)
    d[:3, :4] = 1e10
    d[5, 5] = np.inf
    p = tmp_path / "x_depth.exr"
    p.write_bytes(exr.encode_exr(d, compression))
    np.testing.assert_array_equal(exr.read_exr_channel0(p), d)
    from detect.data.sim3d import load_depth

    loaded = load_depth(p)
    assert np.isnan(loaded[:3, :4]).all() and np.isnan(loaded[5, 5])  # background (max) and inf → NaN
    assert np.isfinite(loaded).sum() == d.size - 13


def test_exr_errors(tmp_path):
    p = tmp_path / "bad.exr"
    p.write_bytes(b"\x00" * 16)
    with pytest.raises(exr.ExrError, match="magic"):
        exr.read_exr_channel0(p)


# ---------------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------------


def test_backproject_project_round_trip_and_conventions():
    K = np.array([[300.0, 0.0, 159.3], [0.0, 310.0, 118.7], [0.0, 0.0, 1.0]])
    T = look_at_c2w(np.array([0.4, -0.5, 0.3]), np.array([0.0, 0.0, 0.1]))
    R = T[:3, :3]
    assert np.allclose(R.T @ R, np.eye(3)) and np.isclose(np.linalg.det(R), 1.0)
    assert np.allclose(invert_rigid(T) @ T, np.eye(4))
    # OpenCV axes: optical axis (+z) points at the target, image "down" (+y) points down in the world
    assert np.allclose(R[:, 2], (np.array([0.0, 0.0, 0.1]) - T[:3, 3]) / np.linalg.norm(T[:3, 3] - [0, 0, 0.1]))
    assert R[2, 1] < 0
    rng = np.random.default_rng(1)
    depth = rng.uniform(0.5, 0.9, (240, 320)).astype(np.float32)
    depth[rng.random(depth.shape) < 0.1] = np.nan
    for pc in (0.0, 0.5):
        pts, pix = backproject_depth(depth, K, T, pixel_center=pc)
        uv, z = project_points(pts, K, T, pixel_center=pc)
        np.testing.assert_allclose(uv[:, 0], pix[:, 1], atol=1e-6)  # integer pixel coordinates come back
        np.testing.assert_allclose(uv[:, 1], pix[:, 0], atol=1e-6)
        np.testing.assert_allclose(z, depth[pix[:, 0], pix[:, 1]], rtol=1e-6)
    # the principal point's ray is the optical axis; range == z there
    rays = pixel_rays(K, 240, 320)
    assert rays.shape == (240, 320, 3) and np.allclose(rays[..., 2], 1.0)
    d = np.full((240, 320), 0.7, np.float32)
    pz, _ = backproject_depth(d, K, T, depth_type="z")
    pr, _ = backproject_depth(d, K, T, depth_type="range")
    dist_r = np.linalg.norm(pr - T[:3, 3], axis=1)
    np.testing.assert_allclose(dist_r, 0.7, rtol=1e-6)
    assert np.linalg.norm(pz - T[:3, 3], axis=1).min() == pytest.approx(0.7, rel=1e-4)
    # depth_scale: millimetre maps give the same points
    pmm, _ = backproject_depth(d * 1000, K, T, depth_scale=0.001)
    np.testing.assert_allclose(pmm, pz, atol=1e-7)  # float32 rounding of d·1000
    with pytest.raises(ValueError):
        backproject_depth(d, K, T, depth_type="disparity")


def test_voxel_grid_index_centres_and_scatter_max():
    rng = np.random.default_rng(2)
    pts = rng.uniform(-0.1, 0.2, (5000, 3))
    grid = VoxelGrid.bounding(pts, 0.002, margin_voxels=1)
    assert np.allclose(grid.origin / 0.002, np.round(grid.origin / 0.002))
    idx, inside = grid.index(pts)
    assert inside.all()
    np.testing.assert_array_less(np.abs(grid.centers(idx) - pts), 0.001 + 1e-12)
    vals = rng.random(len(pts)).astype(np.float32)
    vol = np.zeros(grid.shape, np.float32)
    dropped = grid.scatter_max(vol, np.concatenate([pts, [[5.0, 5.0, 5.0]]]), np.concatenate([vals, [9.0]]))
    assert dropped == 1
    brute = np.zeros(grid.shape, np.float32)
    for (i, j, k), val in zip(idx, vals):
        brute[i, j, k] = max(brute[i, j, k], val)
    np.testing.assert_array_equal(vol, brute)
    occ = grid.occupancy(pts)
    assert occ.sum() == len({tuple(i) for i in idx})
