"""OpenEXR depth maps through the official ``OpenEXR`` Python bindings (package ``openexr``):
reading (SiM3D synthetic training renders, data_formats.md §7) and writing (our synthetic
benchmark's ``<class>_synth`` instances).

This module only adapts the library to the toolkit's conventions:

* :func:`read_exr_channel0` returns the channel the spec reads — channel 0 in OpenCV's order (B of an
  R, G, B(, A) file; the luminance ``Y`` or the only channel otherwise) — as float32 (H, W), values
  untouched (HALF channels widened exactly). Every compression, tiled and multi-part files are the
  library's business.
* Every failure (not an EXR, cut or corrupt bytes, a header promising more pixels than the file can
  hold) is an :class:`ExrError` naming the file, which the readers report or skip.
* :func:`encode_exr` writes a single-part scan-line file with one FLOAT channel ``Y`` (ZIP or no
  compression), readable by OpenCV, the OpenEXR library and Blender.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

EXR_MAGIC = b"\x76\x2f\x31\x01"  # 20000630, little-endian
# Compressed EXR data expands at most ~1032:1 (zlib): a header declaring more pixel bytes than that is
# corrupt and must not make the library allocate gigabytes.
_MAX_EXPANSION = 1100
_COMPRESSIONS = ("NONE", "ZIP")


class ExrError(ValueError):
    """The file is not an EXR the OpenEXR library can decode (or its header is implausible)."""


def _openexr():
    try:
        import OpenEXR
    except ImportError as exc:  # a declared dependency; a clear message if an environment lacks it
        raise ImportError("reading/writing EXR depth needs the official OpenEXR bindings: "
                          "pip install openexr") from exc
    return OpenEXR


def opencv_channel0(names: list[str], where: str) -> str:
    """The channel OpenCV returns as channel 0 (it reorders R, G, B(, A) to B, G, R(, A))."""
    if "B" in names:
        return "B"
    if "Y" in names:
        return "Y"
    if len(names) == 1:
        return names[0]
    raise ExrError(f"{where}: cannot tell which of the channels {sorted(names)} is channel 0 in OpenCV's "
                   "order (expected R/G/B, Y, or a single channel)")


def read_exr_channel0(path: str | os.PathLike) -> np.ndarray:
    """Channel 0 (OpenCV channel order) of an EXR file as float32 (H, W), values untouched."""
    path = Path(path)
    data = path.read_bytes()
    if data[:4] != EXR_MAGIC:
        raise ExrError(f"{path}: not an OpenEXR file (bad magic number)")
    return decode_exr_channel0(data, str(path))


def decode_exr_channel0(data: bytes, where: str = "<bytes>") -> np.ndarray:
    """:func:`read_exr_channel0` of an in-memory file; ``where`` names it in errors."""
    OpenEXR = _openexr()
    if data[:4] != EXR_MAGIC:
        raise ExrError(f"{where}: not an OpenEXR file (bad magic number)")
    try:
        with OpenEXR.File(io.BytesIO(data), header_only=True) as f:  # the header is the File's: read it inside
            header = f.header()
            (x0, y0), (x1, y1) = (np.asarray(v, dtype=np.int64) for v in header["dataWindow"])
            width, height = int(x1 - x0 + 1), int(y1 - y0 + 1)
            n_channels = len(header.get("channels", ())) or 1
    except (RuntimeError, ValueError, TypeError, KeyError, OverflowError) as exc:
        raise ExrError(f"{where}: corrupt or truncated EXR file ({type(exc).__name__}: {exc})") from None
    if width < 1 or height < 1:
        raise ExrError(f"{where}: EXR data window {width}×{height} holds no pixels")
    if width * height * n_channels * 4 > _MAX_EXPANSION * len(data):
        raise ExrError(f"{where}: EXR header declares {width}×{height} pixels in {n_channels} channel(s), more "
                       f"than the {len(data)}-byte file can hold")
    try:
        with OpenEXR.File(io.BytesIO(data), separate_channels=True) as f:
            channels = f.channels()
            name = opencv_channel0(list(channels), where)
            pixels = np.array(channels[name].pixels)
    except ExrError:
        raise
    except (RuntimeError, ValueError, TypeError, KeyError, OverflowError, MemoryError) as exc:
        raise ExrError(f"{where}: corrupt or truncated EXR file ({type(exc).__name__}: {exc})") from None
    if pixels.ndim != 2 or pixels.dtype.kind not in "fu":
        raise ExrError(f"{where}: EXR channel {name!r} has shape {pixels.shape} {pixels.dtype}, "
                       "expected a 2-D numeric image")
    return np.ascontiguousarray(pixels, dtype=np.float32)


def encode_exr(depth: np.ndarray, compression: str = "ZIP") -> bytes:
    """Encode a float32 (H, W) array as a single-channel (``Y``, FLOAT) scan-line EXR file."""
    arr = np.ascontiguousarray(depth, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"encode_exr expects an (H, W) array, got shape {arr.shape}")
    if compression not in _COMPRESSIONS:
        raise ValueError(f"compression must be one of {sorted(_COMPRESSIONS)}")
    OpenEXR = _openexr()
    header = {"compression": OpenEXR.ZIP_COMPRESSION if compression == "ZIP" else OpenEXR.NO_COMPRESSION,
              "type": OpenEXR.scanlineimage}
    buf = io.BytesIO()
    OpenEXR.File(header, {"Y": arr}).write(buf)
    return buf.getvalue()
