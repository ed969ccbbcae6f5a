"""Miniature datasets in the exact on-disk formats of ``data_formats.md`` §2-4 (tests, benchmark, demo).

Each writer creates a small tree under ``root`` and returns the expected float32 depth (NaN =
invalid) per sample, keyed by the ``rel_path`` the reader records, computed here independently
of the readers. Our own generators; nothing is downloaded.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np

DEFAULT_MVTEC_LAYOUT = {"train": {"good": 2}, "validation": {"good": 1}, "test": {"good": 1, "crack": 1}}
DEFAULT_EYECANDIES_COUNTS = {"train": 2, "val": 1, "test_public": 2, "test_private": 1}


def _scene(hw: tuple[int, int], rng: np.random.Generator, z0: float = 0.65, bump: float = 0.02
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x, y, z (metres) of a tilted plane with a smooth object bump nearer to the camera."""
    H, W = hw
    v, u = np.mgrid[0:H, 0:W].astype(np.float64)
    x = (u - W / 2) * 0.0005
    y = (v - H / 2) * 0.0005
    cu, cv = W * (0.4 + 0.2 * rng.random()), H * (0.4 + 0.2 * rng.random())
    r2 = ((u - cu) / (0.2 * W)) ** 2 + ((v - cv) / (0.2 * H)) ** 2
    z = z0 + 0.02 * u / W + 0.01 * v / H - bump * np.exp(-r2) + rng.normal(0, 2e-5, (H, W))
    return x, y, z


def _holes(hw: tuple[int, int], rng: np.random.Generator, frac: float = 0.05, margin: int = 4) -> np.ndarray:
    """Random invalid pixels away from the image corners (the plane fit reads the corners)."""
    H, W = hw
    mask = rng.random((H, W)) < frac
    mask[:margin, :margin] = mask[:margin, -margin:] = False
    mask[-margin:, :margin] = mask[-margin:, -margin:] = False
    return mask


def _png_bytes(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _tiff_bytes(arr: np.ndarray) -> bytes:
    import tifffile

    buf = io.BytesIO()
    # (H, W, 3) as contiguous RGB samples, the layout of the datasets' organised point clouds
    photometric = "rgb" if arr.ndim == 3 and arr.shape[-1] == 3 else "minisblack"
    tifffile.imwrite(buf, arr, photometric=photometric)
    return buf.getvalue()


def _defect_box(hw: tuple[int, int], rng: np.random.Generator) -> tuple[slice, slice]:
    """A random rectangle covering about 2-6 % of the frame, away from the border."""
    H, W = hw
    h, w = max(2, H // 6), max(2, W // 6)
    r = int(rng.integers(H // 5, max(H // 5 + 1, H - H // 5 - h)))
    c = int(rng.integers(W // 5, max(W // 5 + 1, W - W // 5 - w)))
    return slice(r, r + h), slice(c, c + w)


# The real GT masks hold defect class ids (a category's class_ids.json maps names to grey values, e.g.
# 254 and 255; a "combined" mask holds several), never a binary 0/255 by design.
MVTEC3D_CLASS_IDS = {"cut": 254, "contamination": 255}


def mvtec3d_camera_parameters(hw: tuple[int, int]) -> dict:
    """A ``camera_parameters.json`` with the real file's HALCON keys (area scan, division model,
    metres): an 8.5 mm lens on 5.5 µm pixels with a small barrel distortion."""
    H, W = hw
    return {"camera_type": "area_scan_division", "focus": 0.0085, "kappa": -310.5, "sx": 5.5e-06,
            "sy": 5.5e-06, "cx": (W - 1) / 2 + 0.7, "cy": (H - 1) / 2 - 1.3, "image_width": W, "image_height": H}


def write_mvtec3d(root: str | Path, categories=("bagel", "foam"), hw: tuple[int, int] = (40, 50),
                  layout: dict | None = None, seed: int = 0, hole_frac: float = 0.05,
                  defects: bool = False) -> dict[str, np.ndarray]:
    """MVTec 3D-AD tree: float32 xyz TIFFs (tilted plane + bump, (0,0,0) holes), rgb, gt, calibration.

    ``defects=False``: defect samples have empty GT masks (enough for depth conversion). ``defects=True``
    (detection tests): each defect sample gets a rectangle that is dented in z, darkened in rgb and
    marked in its GT mask.
    """
    root = Path(root)
    layout = layout or DEFAULT_MVTEC_LAYOUT
    rng = np.random.default_rng(seed)
    expected: dict[str, np.ndarray] = {}
    for cat in categories:
        (root / cat / "calibration").mkdir(parents=True, exist_ok=True)
        (root / cat / "calibration" / "camera_parameters.json").write_text(
            json.dumps(mvtec3d_camera_parameters(hw), indent=4))
        (root / cat / "class_ids.json").write_text(json.dumps(MVTEC3D_CLASS_IDS, indent=4))
        for split, defects in layout.items():
            for defect, n in defects.items():
                d = root / cat / split / defect
                # the real test folders hold gt/ for good samples too (all-zero masks)
                for sub in ("rgb", "xyz") + (("gt",) if split == "test" else ()):
                    (d / sub).mkdir(parents=True, exist_ok=True)
                for i in range(n):
                    x, y, z = _scene(hw, rng)
                    holes = _holes(hw, rng, hole_frac)
                    gt = np.zeros(hw, np.uint8)
                    rgb = rng.integers(0, 255, (*hw, 3), np.uint8)
                    if defects and defect != "good":
                        box = _defect_box(hw, rng)
                        z[box] += 0.01
                        rgb[box] //= 4
                        # real masks hold the defect's class id (class_ids.json), not 255;
                        # "combined" defects hold several ids in one mask
                        ids = list(MVTEC3D_CLASS_IDS.values())
                        gt[box] = MVTEC3D_CLASS_IDS.get(defect, ids[-1] if defect == "combined" else ids[i % len(ids)])
                        if defect == "combined":
                            gt[box[0], box[1].start:(box[1].start + box[1].stop) // 2] = ids[0]
                        holes[box] = False
                    xyz = np.stack([x, y, z], axis=-1).astype(np.float32)
                    xyz[holes] = 0.0
                    (d / "xyz" / f"{i:03d}.tiff").write_bytes(_tiff_bytes(xyz))
                    (d / "rgb" / f"{i:03d}.png").write_bytes(_png_bytes(rgb))
                    if split == "test":
                        (d / "gt" / f"{i:03d}.png").write_bytes(_png_bytes(gt))
                    zz = xyz[..., 2].copy()
                    zz[zz == 0] = np.nan
                    expected[f"{cat}/{split}/{defect}/xyz/{i:03d}.tiff"] = zz
    return expected


def write_mvtec3d_legacy_rgb(root: str | Path, category: str = "bagel", hw: tuple[int, int] = (40, 50),
                             n: int = 2) -> list[str]:
    """An MVTec 3D-AD-shaped tree whose "xyz" TIFFs are 8-bit RGB images (must be rejected)."""
    root = Path(root)
    rng = np.random.default_rng(1)
    d = root / category / "train" / "good" / "xyz"
    d.mkdir(parents=True, exist_ok=True)
    rels = []
    for i in range(n):
        (d / f"{i:03d}.tiff").write_bytes(_tiff_bytes(rng.integers(0, 255, (*hw, 3), dtype=np.uint8)))
        rels.append(f"{category}/train/good/xyz/{i:03d}.tiff")
    return rels


def eyecandies_u16(hw: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A 16-bit depth image using the full range with fine steps (an 8-bit read loses them)."""
    H, W = hw
    v, u = np.mgrid[0:H, 0:W]
    base = (u * 65535 // max(W - 1, 1)).astype(np.int64)
    base = (base + v * 37 + rng.integers(0, 200, (H, W))) % 65536
    base[0, 0], base[0, 1] = 0, 65535
    return base.astype(np.uint16)


def write_eyecandies(root: str | Path, categories=("CandyCane", "GummyBear"), hw: tuple[int, int] = (40, 50),
                     counts: dict | None = None, seed: int = 0, masks: bool = False) -> dict[str, np.ndarray]:
    """Eyecandies underfolder tree: uint16 depth PNG + info_depth/metadata YAML + pose + RGB.

    ``masks=True`` (detection tests) also writes ``<idx>_mask.png`` for test_public samples: a rectangle
    (dented in depth, darkened in the images) for anomalous ones, empty for good ones.
    """
    import yaml

    root = Path(root)
    counts = counts or DEFAULT_EYECANDIES_COUNTS
    rng = np.random.default_rng(seed)
    expected: dict[str, np.ndarray] = {}
    for cat in categories:
        for split, n in counts.items():
            data = root / cat / split / "data"
            data.mkdir(parents=True, exist_ok=True)
            width = 2 if split.startswith("test") else 3
            for i in range(n):
                idx = f"{i:0{width}d}"
                u16 = eyecandies_u16(hw, rng)
                dmin = float(0.3 + 0.1 * rng.random())
                dmax = float(dmin + 0.2 + 0.2 * rng.random())
                image = rng.integers(0, 255, (*hw, 3), np.uint8)
                if masks and split == "test_public":
                    mask = np.zeros(hw, np.uint8)
                    if i % 2:  # the metadata below marks odd samples anomalous
                        box = _defect_box(hw, rng)
                        u16[box] = (u16[box].astype(np.int64) * 3 // 4).astype(np.uint16)
                        image[box] //= 4
                        mask[box] = 255
                    (data / f"{idx}_mask.png").write_bytes(_png_bytes(mask))
                (data / f"{idx}_depth.png").write_bytes(_png_bytes(u16))
                (data / f"{idx}_info_depth.yaml").write_text(
                    yaml.safe_dump({"normalization": {"min": dmin, "max": dmax}}))
                # a rigid camera-to-world pose (rotated about x, the way the camera looks down at the belt)
                a = 0.3 + 0.1 * i
                pose = np.eye(4)
                pose[1:3, 1:3] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
                pose[:3, 3] = [0.1 * i, -0.2, 0.5]
                np.savetxt(data / f"{idx}_pose.txt", pose)
                (data / f"{idx}_image_0.png").write_bytes(_png_bytes(image))
                if split != "test_private":
                    (data / f"{idx}_metadata.yaml").write_text(yaml.safe_dump({"anomalous": int(i % 2)}))
                expected[f"{cat}/{split}/data/{idx}_depth.png"] = (
                    u16.astype(np.float64) / 65535.0 * (dmax - dmin) + dmin).astype(np.float32)
    return expected


def write_realiad_d3(root: str | Path, categories=("audiojack", "pcb"), hw: tuple[int, int] = (40, 50),
                     n_train: int = 2, n_test: int = 2, zipped: bool = True, json_zipped: bool = False,
                     seed: int = 0) -> dict[str, np.ndarray]:
    """Real-IAD D³ distribution: ``realiad_d3_raw/<cat>.zip`` (or extracted folders) with float32 xyz
    TIFFs holding NaN, 0 and negative-z holes, and ``realiad_d3_jsons/<cat>.json`` split files. Expected maps are
    keyed by zip member name (zipped) or by path relative to ``root`` (extracted)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    expected: dict[str, np.ndarray] = {}
    json_files: dict[str, bytes] = {}
    for cat in categories:
        members: dict[str, bytes] = {}
        splits: dict[str, list] = {"train": [], "test": []}
        sample = 0
        for split, n in (("train", n_train), ("test", n_test)):
            for i in range(n):
                sample += 1
                cls = "OK" if (split == "train" or i % 2 == 0) else "missing_part"
                folder = "OK" if cls == "OK" else "NG/" + cls
                rel = f"{folder}/S{sample:04d}/{cat}_{sample:04d}_{'OK' if cls == 'OK' else 'NG'}_C1"
                x, y, z = _scene(hw, rng, z0=300.0, bump=5.0)  # millimetre-like values
                xyz = np.stack([x, y, z], axis=-1).astype(np.float32)
                nan_holes = _holes(hw, rng, 0.08)
                zero_holes = _holes(hw, rng, 0.02) & ~nan_holes
                xyz[nan_holes] = np.nan
                xyz[zero_holes, 2] = 0.0
                xyz[_holes(hw, rng, 0.01) & ~nan_holes, 2] = -1.5  # a few negative z (invalid too)
                members[f"{cat}/{rel}_xyz.tiff"] = _tiff_bytes(xyz)
                members[f"{cat}/{rel}_rgb.jpg"] = b"\xff\xd8placeholder"
                splits[split].append({"image_path": f"{rel}_rgb.jpg", "ps_path": f"{rel}_ps.png",
                                      "xyz_path": f"{rel}_xyz.tiff", "mask_path": None, "anomaly_class": cls})
                zz = xyz[..., 2].copy()
                with np.errstate(invalid="ignore"):
                    zz[~np.isfinite(zz) | (zz <= 0)] = np.nan
                key = f"{cat}/{rel}_xyz.tiff" if zipped else f"realiad_d3_raw/{cat}/{rel}_xyz.tiff"
                expected[key] = zz
        raw = root / "realiad_d3_raw"
        raw.mkdir(parents=True, exist_ok=True)
        if zipped:
            with zipfile.ZipFile(raw / f"{cat}.zip", "w", compression=zipfile.ZIP_DEFLATED) as zf:
                for name, data in members.items():
                    zf.writestr(name, data)
        else:
            for name, data in members.items():
                (raw / name).parent.mkdir(parents=True, exist_ok=True)
                (raw / name).write_bytes(data)
        json_files[f"{cat}.json"] = json.dumps({"meta": {"prefix": f"{cat}/", "normal_class": "OK"},
                                                **splits}).encode()
    if json_zipped:
        with zipfile.ZipFile(root / "realiad_d3_jsons.zip", "w") as zf:
            for name, data in json_files.items():
                zf.writestr(f"realiad_d3_jsons/{name}", data)
    else:
        (root / "realiad_d3_jsons").mkdir(parents=True, exist_ok=True)
        for name, data in json_files.items():
            (root / "realiad_d3_jsons" / name).write_bytes(data)
    return expected


def write_realiad_d3_folders(root: str | Path, categories=("audiojack", "pcb"), hw: tuple[int, int] = (40, 50),
                             n_train: int = 2, n_test_good: int = 1, n_test_bad: int = 1,
                             defect: str = "missing_part", seed: int = 0) -> dict[str, np.ndarray]:
    """The extracted folder layout the Real-IAD D³ authors' benchmark code reads (no JSON files):
    ``<cat>/{train,test}/{GOOD,<defect>}/xyz/*.tiff``, ``rgb/<sample>/*L05*RGB*.jpg``,
    ``<defect>/gt/rgb/*.png``. The xyz TIFFs hold NaN holes, zero holes and a few negative z values
    (all invalid for the reader). Expected maps are keyed by path relative to ``root``."""
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(seed)
    expected: dict[str, np.ndarray] = {}
    for cat in categories:
        sample = 0
        for split, folder, n in (("train", "GOOD", n_train), ("test", "GOOD", n_test_good),
                                 ("test", defect, n_test_bad)):
            d = root / cat / split / folder
            for _ in range(n):
                sample += 1
                name = f"{cat}_{sample:04d}"
                x, y, z = _scene(hw, rng, z0=300.0, bump=5.0)
                xyz = np.stack([x, y, z], axis=-1).astype(np.float32)
                xyz[_holes(hw, rng, 0.08)] = np.nan
                xyz[_holes(hw, rng, 0.02), 2] = 0.0
                xyz[_holes(hw, rng, 0.01), 2] = -1.5
                (d / "xyz").mkdir(parents=True, exist_ok=True)
                (d / "xyz" / f"{name}.tiff").write_bytes(_tiff_bytes(xyz))
                (d / "rgb" / name).mkdir(parents=True, exist_ok=True)
                rgb = rng.integers(0, 255, (*hw, 3), np.uint8)
                for light in ("L01", "L05"):
                    Image.fromarray(rgb).save(d / "rgb" / name / f"{name}_C1_{light}_RGB.jpg", quality=90)
                if folder != "GOOD":
                    (d / "gt" / "rgb").mkdir(parents=True, exist_ok=True)
                    mask = np.zeros(hw, np.uint8)
                    mask[_defect_box(hw, rng)] = 255
                    (d / "gt" / "rgb" / f"{name}.png").write_bytes(_png_bytes(mask))
                zz = xyz[..., 2].copy()
                with np.errstate(invalid="ignore"):
                    zz[~np.isfinite(zz) | (zz <= 0)] = np.nan
                expected[f"{cat}/{split}/{folder}/xyz/{name}.tiff"] = zz
    return expected


def write_depth_folder(root: str | Path, hw: tuple[int, int] = (40, 50), seed: int = 0) -> dict[str, np.ndarray]:
    """Generic folder: float32 .npy with NaN/0/negative, float32 .tif in a subfolder, 16-bit .PNG
    (upper-case extension). Expected maps follow the metric_z rule (non-finite or <= 0 invalid)."""
    import tifffile
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(seed)
    (root / "sub").mkdir(parents=True, exist_ok=True)
    expected = {}
    _, _, z = _scene(hw, rng)
    a = z.astype(np.float32)
    a[_holes(hw, rng, 0.05)] = np.nan
    a[_holes(hw, rng, 0.02)] = 0.0
    a[3, 3] = -1.0
    np.save(root / "a.npy", a)
    b = _scene(hw, rng)[2].astype(np.float32)
    b[_holes(hw, rng, 0.05)] = np.inf
    tifffile.imwrite(root / "sub" / "b.tif", b)
    c = rng.integers(0, 65536, hw, dtype=np.uint16)
    c[0, :5] = 0
    Image.fromarray(c).save(root / "c.PNG")
    for name, arr in (("a.npy", a), ("sub/b.tif", b), ("c.PNG", c.astype(np.float32))):
        e = arr.astype(np.float32).copy()
        with np.errstate(invalid="ignore"):
            e[~np.isfinite(e) | (e <= 0)] = np.nan
        expected[name] = e
    return expected


def write_synthetic_views(root: str | Path, classes=("plastic_stool",), n_views: int = 3,
                          hw: tuple[int, int] = (40, 50), seed: int = 0) -> dict[str, np.ndarray]:
    """Minimal SiM3D-like layout ``<class>/<instance>/depth/<view>.npy`` (+inf = no surface) with
    ``rgb/<view>_2.png``: one ``_real`` training instance, a good and a bad test instance."""
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(seed)
    expected = {}
    for cls in classes:
        for inst in (f"{cls}_real", f"{cls}_01_good", f"{cls}_02_bad"):
            (root / cls / inst / "depth").mkdir(parents=True, exist_ok=True)
            (root / cls / inst / "rgb").mkdir(parents=True, exist_ok=True)
            for v in range(n_views):
                z = _scene(hw, rng, z0=1.2)[2].astype(np.float32)
                z[_holes(hw, rng, 0.1)] = np.inf
                np.save(root / cls / inst / "depth" / f"{v}.npy", z)
                Image.fromarray(rng.integers(0, 255, hw, dtype=np.uint8)).save(root / cls / inst / "rgb" / f"{v}_2.png")
                e = z.copy()
                e[~np.isfinite(e)] = np.nan
                expected[f"{cls}/{inst}/depth/{v}.npy"] = e
    return expected


def truncate_file(path: str | Path, keep_frac: float = 0.5) -> None:
    """Cut a file to a fraction of its size (simulates an interrupted download)."""
    path = Path(path)
    data = path.read_bytes()
    path.write_bytes(data[: max(1, int(len(data) * keep_frac))])
