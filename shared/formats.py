"""Pure decoders of the single-view depth datasets, shared by ``data_prep`` (shard conversion) and
``detect`` (single-view evaluation) — ``../shared/spec/data_formats.md`` §2–§3.

* MVTec 3D-AD: organised xyz TIFF → z channel in metres, (0, 0, 0) / non-finite → NaN
  (:func:`xyz_to_z`), optional background removal (:func:`plane_foreground`,
  :func:`ransac_dbscan_foreground`); the result is a mask, the source file is never rewritten.
* Eyecandies: 16-bit depth PNG + ``info_depth.yaml`` → metres (:func:`read_png_uint16`,
  :func:`read_info_depth`, :func:`decode_eyecandies_depth`).

Every format problem raises :class:`FormatError` with a message naming the file (``what``); the data
preparation readers turn it into a skipped sample, detection into a user-facing error. File-system
problems (a missing file, no read permission) stay :class:`OSError`.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np


class FormatError(ValueError):
    """An input file that cannot be decoded or fails a format check (the message says why)."""


# -- generic file readers --------------------------------------------------------------------------
# File-system problems stay OSErrors (their message names the path); anything a decoder raises on
# the bytes themselves becomes a FormatError. Decoders fail on corrupt input with every exception
# type there is (struct.error, IndexError, ZeroDivisionError, SyntaxError, MemoryError for a
# header declaring a giant image, ...): a reader must not crash a conversion or a detection run.
_FILE_SYSTEM_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def _undecodable(kind: str, what: object, exc: Exception) -> FormatError:
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return FormatError(f"unreadable {kind} {what}: {type(exc).__name__}{': ' + detail if detail else ''}")


def read_tiff(src: str | os.PathLike | bytes) -> np.ndarray:
    """``tifffile.imread`` of a path or of in-memory bytes (zip members are never extracted)."""
    import tifffile

    try:
        if isinstance(src, (bytes, bytearray, memoryview)):
            return tifffile.imread(io.BytesIO(bytes(src)))
        return tifffile.imread(src)
    except _FILE_SYSTEM_ERRORS:
        raise
    except Exception as exc:
        what = "(in-memory bytes)" if isinstance(src, (bytes, bytearray, memoryview)) else src
        raise _undecodable("TIFF", what, exc) from None


def read_npy(path: str | os.PathLike) -> np.ndarray:
    """One ``.npy`` array, never unpickling; a file shorter than its header declares is refused
    (memory-mapped first, so a crafted header cannot make it allocate more than the file holds)."""
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except _FILE_SYSTEM_ERRORS:
        raise
    except Exception as exc:  # truncated, empty, pickled, bad header, not an .npy file
        raise _undecodable(".npy file", path, exc) from None
    if not isinstance(arr, np.ndarray):
        arr.close()
        raise FormatError(f"{path} is an .npz archive, expected a single .npy array")
    return np.array(arr)  # a plain in-memory copy (the map is released)


def read_png_uint16(path: str | os.PathLike) -> np.ndarray:
    """A 16-bit grayscale PNG as uint16 — exactly, never through an 8-bit conversion.

    A default OpenCV read (``cv2.imread(p)``) returns 8-bit BGR and silently destroys depth; PIL
    keeps the 16 bits (mode ``I;16``). An 8-bit PNG is refused: it cannot hold depth.
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()  # decode now so truncated files fail here, not later
            mode = im.mode
            arr = np.array(im) if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I") else None
    except _FILE_SYSTEM_ERRORS:
        raise
    except Exception as exc:  # truncated, not a PNG, decompression bomb, ...
        raise _undecodable("PNG", path, exc) from None
    if mode == "I":  # 32-bit container used by some PIL versions for 16-bit PNGs
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise FormatError(f"PNG mode 'I' with values outside the 16-bit range in {path}")
    elif arr is None:
        raise FormatError(f"PNG is {mode!r} ({'8-bit' if mode in ('L', 'P', 'RGB', 'RGBA', 'LA', '1') else mode}), "
                          "expected a 16-bit grayscale depth PNG")
    if arr.ndim != 2:
        raise FormatError(f"16-bit PNG has shape {arr.shape}, expected (H, W)")
    return arr.astype(np.uint16, copy=False)


# -- MVTec 3D-AD (§2) ------------------------------------------------------------------------------
# background-removal constants of the spec (metres)
PLANE_PATCH = 3
PLANE_DIST = 0.005
CLOSE_ITERS = 3
RING_PX = 10
RANSAC_DIST = 0.004
RANSAC_N = 50
RANSAC_ITERS = 1000
RANSAC_REMOVE_DIST = 0.005
DBSCAN_EPS = 0.006
DBSCAN_MIN_POINTS = 30
BG_METHODS: tuple[str, ...] = ("none", "plane", "ransac_dbscan")


def xyz_to_z(xyz: np.ndarray, what: str, zero_invalid: bool = True) -> np.ndarray:
    """z channel of an organised (H, W, 3) float point cloud; invalid (0 / non-finite) → NaN."""
    if xyz.dtype == np.uint8 or (xyz.ndim == 3 and xyz.shape[-1] in (3, 4) and xyz.dtype.kind == "u"
                                 and xyz.dtype.itemsize == 1):
        raise FormatError(
            f"{what} is an 8-bit RGB image {xyz.shape}, not an xyz point cloud: expected a float32 (H, W, 3) "
            "TIFF with x, y, z. This is an 8-bit preview/legacy export or a file from the wrong folder; "
            "use the original dataset TIFFs")
    if xyz.ndim != 3 or xyz.shape[-1] != 3:
        raise FormatError(f"{what} has shape {xyz.shape} {xyz.dtype}, expected an organised (H, W, 3) point cloud")
    if xyz.dtype.kind != "f":
        raise FormatError(f"{what} has dtype {xyz.dtype}, expected float32 x/y/z coordinates")
    z = np.array(xyz[..., 2], dtype=np.float32)  # copy: never a view into a reader-owned buffer
    invalid = ~np.isfinite(z)
    if zero_invalid:
        invalid |= z == 0
    z[invalid] = np.nan
    return z


def _close(mask: np.ndarray, iterations: int) -> np.ndarray:
    import cv2

    kernel = np.ones((3, 3), np.uint8)
    return cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_CLOSE, kernel, iterations=iterations) > 0


def plane_foreground(xyz: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray | None, str | None]:
    """Spec recipe ``plane``: plane through the mean xyz of 3×3 patches at three image corners
    (top-left, top-right, bottom-left; valid points only), background = |distance| ≤ 5 mm,
    foreground closed with a 3×3 kernel (3 iterations). Returns (keep mask, None) or
    (None, reason) when the plane is undefined (a corner patch without valid points, collinear)."""
    H, W = valid.shape
    k = PLANE_PATCH
    if H < k or W < k:
        return None, "map smaller than the corner patches"
    xyz = np.asarray(xyz, dtype=np.float64)
    pts = []
    for r, c in ((0, 0), (0, W - k), (H - k, 0)):
        v = valid[r:r + k, c:c + k]
        if not v.any():
            return None, "a corner patch has no valid point"
        pts.append(xyz[r:r + k, c:c + k][v].mean(axis=0))
    p0, p1, p2 = pts
    normal = np.cross(p1 - p0, p2 - p0)
    norm = np.linalg.norm(normal)
    if not norm > 1e-12:
        return None, "corner points are collinear"
    normal /= norm
    with np.errstate(invalid="ignore"):  # invalid (NaN) points give NaN distances, masked by `valid`
        dist = np.abs((xyz - p0) @ normal)
        fg = valid & ~(dist <= PLANE_DIST)
    return _close(fg, CLOSE_ITERS) & valid, None


def ransac_dbscan_foreground(xyz: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray | None, str | None]:
    """Spec recipe ``ransac_dbscan`` (open3d): RANSAC plane on the valid points of a 10-px border
    ring, drop points within 5 mm of it, DBSCAN (eps 6 mm, 30 points) on the rest, keep the largest
    cluster. open3d's RNG is seeded so that results are reproducible."""
    import open3d as o3d

    xyz = np.asarray(xyz, dtype=np.float64)
    ring = np.zeros_like(valid)
    ring[:RING_PX, :] = ring[-RING_PX:, :] = True
    ring[:, :RING_PX] = ring[:, -RING_PX:] = True
    border = valid & ring
    if int(border.sum()) < RANSAC_N:
        return None, f"only {int(border.sum())} valid border points (< ransac_n {RANSAC_N})"
    o3d.utility.random.seed(0)
    pcd = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(xyz[border]))
    plane, _ = pcd.segment_plane(distance_threshold=RANSAC_DIST, ransac_n=RANSAC_N,
                                 num_iterations=RANSAC_ITERS)
    a, b, c, d = plane
    n = np.array([a, b, c], dtype=np.float64)
    norm = np.linalg.norm(n)
    if not norm > 0:
        return None, "degenerate RANSAC plane"
    with np.errstate(invalid="ignore"):
        dist = np.abs(xyz @ n + d) / norm
        rest = valid & (dist > RANSAC_REMOVE_DIST)
    if not rest.any():
        return None, "every point lies on the background plane"
    rest_pcd = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(xyz[rest]))
    labels = np.asarray(rest_pcd.cluster_dbscan(eps=DBSCAN_EPS, min_points=DBSCAN_MIN_POINTS))
    if labels.size == 0 or labels.max() < 0:
        return None, "DBSCAN found no cluster"
    largest = int(np.argmax(np.bincount(labels[labels >= 0])))
    keep = np.zeros_like(valid)
    keep[rest] = labels == largest
    return keep, None


def remove_background(xyz: np.ndarray, z: np.ndarray, method: str) -> tuple[np.ndarray, str, str | None]:
    """Apply a background removal recipe to ``z`` (NaN-invalid, from :func:`xyz_to_z`).

    Returns (z with removed pixels set to NaN, method actually applied, note). A degenerate scan falls
    back to ``none`` with a note instead of failing (peers crash there, data_formats §2).
    """
    if method not in BG_METHODS:
        raise ValueError(f"unknown background removal {method!r}; expected one of {BG_METHODS}")
    if method == "none":
        return z, "none", None
    valid = np.isfinite(z)
    if method == "plane":
        keep, note = plane_foreground(xyz, valid)
    else:
        keep, note = ransac_dbscan_foreground(xyz, valid)
    if keep is None:
        return z, "none", f"{method}: {note}; kept without background removal"
    return np.where(keep, z, np.float32(np.nan)).astype(np.float32), method, None


# -- Eyecandies (§3) -------------------------------------------------------------------------------
EYECANDIES_FOCAL_PX = 711.11


def decode_eyecandies_depth(u16: np.ndarray, dmin: float, dmax: float) -> np.ndarray:
    """Official formula ``d = u16 / 65535 · (max − min) + min``, in float64, stored as float32 metres."""
    if u16.dtype != np.uint16:
        raise FormatError(f"depth PNG decoded as {u16.dtype}, expected uint16")
    return (u16.astype(np.float64) / 65535.0 * (dmax - dmin) + dmin).astype(np.float32)


def read_info_depth(path: Path) -> tuple[float, float]:
    """``normalization: {min, max}`` of an Eyecandies ``<idx>_info_depth.yaml``."""
    import yaml

    path = Path(path)
    try:
        info = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise FormatError(f"missing {path.name} (needed to decode the depth PNG)") from None
    except yaml.YAMLError as exc:
        raise FormatError(f"{path.name} is not valid YAML: {exc}") from None
    try:
        norm = info["normalization"]
        dmin, dmax = float(norm["min"]), float(norm["max"])
    except (TypeError, KeyError, ValueError):
        raise FormatError(f"{path.name} has no numeric normalization: {{min, max}}") from None
    if not (np.isfinite(dmin) and np.isfinite(dmax) and dmax > dmin):
        raise FormatError(f"{path.name}: invalid normalization range min={dmin}, max={dmax}")
    return dmin, dmax


def read_eyecandies_depth(png: str | os.PathLike) -> np.ndarray:
    """Decoded depth (metres, float32) of ``<idx>_depth.png`` with its ``<idx>_info_depth.yaml``."""
    png = Path(png)
    if not png.name.endswith("_depth.png"):
        raise FormatError(f"{png} is not an Eyecandies <idx>_depth.png")
    idx = png.name[: -len("_depth.png")]
    u16 = read_png_uint16(png)
    dmin, dmax = read_info_depth(png.with_name(f"{idx}_info_depth.yaml"))
    return decode_eyecandies_depth(u16, dmin, dmax)


__all__ = [
    "BG_METHODS", "EYECANDIES_FOCAL_PX", "FormatError", "decode_eyecandies_depth", "plane_foreground",
    "ransac_dbscan_foreground", "read_eyecandies_depth", "read_info_depth", "read_npy", "read_png_uint16", "read_tiff",
    "remove_background", "xyz_to_z",
]
