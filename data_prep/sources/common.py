"""Decoding helpers shared by the readers: exact, strict, and never writing to the source."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np

from data_prep.shards import SkipSample
from shared import formats
from shared.formats import FormatError

T = TypeVar("T")

DEPTH_FILE_EXTS = (".npy", ".tif", ".tiff", ".png")


def rel_posix(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1


def skip_on_format_error(func: Callable[..., T]) -> Callable[..., T]:
    """The shared decoder ``func`` with its :class:`shared.formats.FormatError` turned into a skipped sample."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs) -> T:
        try:
            return func(*args, **kwargs)
        except FormatError as exc:
            raise SkipSample(str(exc)) from None

    return wrapper


# The decoders live in shared/ (detection reads the same files); data preparation skips bad samples.
read_tiff = skip_on_format_error(formats.read_tiff)
read_png_uint16 = skip_on_format_error(formats.read_png_uint16)
xyz_to_z = skip_on_format_error(formats.xyz_to_z)
# np.load without pickles (a pickled .npy could run code), checked against the file size.
read_npy = skip_on_format_error(formats.read_npy)


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
