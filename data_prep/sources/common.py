"""Decoding helpers shared by the readers: exact, strict, and never writing to the source."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

from data_prep.shards import SkipSample

DEPTH_FILE_EXTS = (".npy", ".tif", ".tiff", ".png")


def rel_posix(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1


def read_tiff(src: str | os.PathLike | bytes) -> np.ndarray:
    """``tifffile.imread`` of a path or of in-memory bytes (zip members are never extracted)."""
    import tifffile

    if isinstance(src, (bytes, bytearray, memoryview)):
        return tifffile.imread(io.BytesIO(bytes(src)))
    return tifffile.imread(src)


def read_png_uint16(path: str | os.PathLike) -> np.ndarray:
    """A 16-bit grayscale PNG as uint16 — exactly, never through an 8-bit conversion.

    A default OpenCV read (``cv2.imread(p)``) returns 8-bit BGR and silently destroys depth; PIL
    keeps the 16 bits (mode ``I;16``). An 8-bit PNG is refused: it cannot hold depth.
    """
    from PIL import Image

    with Image.open(path) as im:
        im.load()  # decode now so truncated files fail here, inside the skip handler
        mode = im.mode
        if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
            arr = np.array(im)
        elif mode == "I":  # 32-bit container used by some PIL versions for 16-bit PNGs
            arr = np.array(im)
            if arr.size and (arr.min() < 0 or arr.max() > 65535):
                raise SkipSample(f"PNG mode 'I' with values outside the 16-bit range in {path}")
        else:
            raise SkipSample(f"PNG is {mode!r} ({'8-bit' if mode in ('L', 'P', 'RGB', 'RGBA', 'LA', '1') else mode}), "
                             "expected a 16-bit grayscale depth PNG")
    if arr.ndim != 2:
        raise SkipSample(f"16-bit PNG has shape {arr.shape}, expected (H, W)")
    return arr.astype(np.uint16, copy=False)


def read_npy(path: str | os.PathLike) -> np.ndarray:
    """``np.load`` without pickles (a pickled .npy could run code)."""
    arr = np.load(path, allow_pickle=False)
    if not isinstance(arr, np.ndarray):
        raise SkipSample(f"{path} is an .npz archive, expected a single .npy array")
    return arr


def xyz_to_z(xyz: np.ndarray, what: str, zero_invalid: bool = True) -> np.ndarray:
    """z channel of an organised (H, W, 3) float point cloud; invalid (0 / non-finite) → NaN."""
    if xyz.dtype == np.uint8 or (xyz.ndim == 3 and xyz.shape[-1] in (3, 4) and xyz.dtype.kind == "u"
                                 and xyz.dtype.itemsize == 1):
        raise SkipSample(
            f"{what} is an 8-bit RGB image {xyz.shape}, not an xyz point cloud: expected a float32 (H, W, 3) "
            "TIFF with x, y, z. This is an 8-bit preview/legacy export or a file from the wrong folder; "
            "use the original dataset TIFFs")
    if xyz.ndim != 3 or xyz.shape[-1] != 3:
        raise SkipSample(f"{what} has shape {xyz.shape} {xyz.dtype}, expected an organised (H, W, 3) point cloud")
    if xyz.dtype.kind != "f":
        raise SkipSample(f"{what} has dtype {xyz.dtype}, expected float32 x/y/z coordinates")
    z = np.array(xyz[..., 2], dtype=np.float32)  # copy: never a view into a reader-owned buffer
    invalid = ~np.isfinite(z)
    if zero_invalid:
        invalid |= z == 0
    z[invalid] = np.nan
    return z


def to_depth_2d(arr: np.ndarray, what: str) -> np.ndarray:
    """A generic depth array → float32 (H, W): (H, W), (H, W, 1) or an (H, W, 3) xyz cloud (z used)."""
    if arr.dtype == np.bool_ or arr.dtype.kind not in "fiu":
        raise SkipSample(f"{what} has dtype {arr.dtype}, expected numeric depth")
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 3 and arr.shape[-1] == 3:
        if arr.dtype.kind != "f":
            raise SkipSample(f"{what} is a {arr.dtype} (H, W, 3) image, not depth: expected a 2-D depth map "
                             "or a float (H, W, 3) xyz point cloud")
        return np.array(arr[..., 2], dtype=np.float32)
    if arr.ndim != 2:
        raise SkipSample(f"{what} has shape {arr.shape}, expected (H, W) depth")
    if arr.dtype == np.uint8:
        raise SkipSample(f"{what} is 8-bit: 256 levels cannot hold depth (expected float or 16-bit)")
    return np.array(arr, dtype=np.float32)
