"""OpenEXR depth maps: reading (SiM3D synthetic training renders, data_formats.md §7) and writing
(our synthetic benchmark's ``<class>_synth`` instances).

Reading follows the spec: OpenCV with ``OPENCV_IO_ENABLE_OPENEXR=1`` set before OpenCV is imported,
channel 0 in OpenCV's channel order. OpenCV wheels are not always built with OpenEXR (the 5.x wheels
are not), so when OpenCV cannot decode the file we fall back to the official ``OpenEXR`` bindings if
installed, and otherwise to the small pure-numpy decoder of this module, which handles single-part
scan-line files with NONE, RLE, ZIPS or ZIP compression (what Blender and our generator write by
default). Every path returns the same array OpenCV would: one float32 (H, W) channel, with OpenCV's
channel order (B, G, R, A for RGBA files; the luminance ``Y`` or the only channel otherwise).

Writing produces a single-part scan-line file with one FLOAT channel ``Y`` and ZIP compression,
readable by OpenCV, the OpenEXR library and Blender.
"""

from __future__ import annotations

import os

# Must be set before the first ``import cv2`` in the process (OpenCV reads it once).
os.environ.setdefault("OPENCV_IO_ENABLE_OPENEXR", "1")

import struct
import zlib
from pathlib import Path

import numpy as np

EXR_MAGIC = 20000630
_PIXEL_DTYPES = {0: np.dtype("<u4"), 1: np.dtype("<f2"), 2: np.dtype("<f4")}  # UINT, HALF, FLOAT
_COMPRESSION_NAMES = {0: "NONE", 1: "RLE", 2: "ZIPS", 3: "ZIP", 4: "PIZ", 5: "PXR24", 6: "B44", 7: "B44A",
                      8: "DWAA", 9: "DWAB"}
_LINES_PER_CHUNK = {0: 1, 1: 1, 2: 1, 3: 16}


class ExrError(ValueError):
    """The file is not an EXR this module (or the available libraries) can decode."""


def read_exr_channel0(path: str | os.PathLike) -> np.ndarray:
    """Channel 0 (OpenCV channel order) of an EXR file as float32 (H, W), values untouched."""
    path = Path(path)
    data = path.read_bytes()
    if len(data) < 8 or struct.unpack_from("<i", data, 0)[0] != EXR_MAGIC:
        raise ExrError(f"{path}: not an OpenEXR file (bad magic number)")
    arr = _read_with_opencv(path)
    if arr is None:
        arr = _read_with_openexr(path)
    if arr is None:
        arr = _decode_numpy(data, str(path))
    return np.ascontiguousarray(arr, dtype=np.float32)


def _decode_numpy(data: bytes, where: str) -> np.ndarray:
    """:func:`_decode_file` with every failure on corrupt bytes reported as :class:`ExrError`.

    A cut or damaged file makes the parser fail with struct.error, IndexError, zlib.error, ... ; the
    callers (the SiM3D reader, the shard converter) expect a decoding error they can report."""
    try:
        return _decode_file(data, where)
    except ExrError:
        raise
    except (struct.error, IndexError, KeyError, ValueError, OverflowError, MemoryError, zlib.error) as exc:
        raise ExrError(f"{where}: corrupt or truncated EXR file ({type(exc).__name__}: {exc})") from None


def _read_with_opencv(path: Path) -> np.ndarray | None:
    try:
        import cv2
    except ImportError:
        return None
    try:
        if not cv2.haveImageReader(str(path)):
            return None  # OpenCV built without OpenEXR
        img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    except cv2.error:
        return None
    if img is None:
        return None
    return img if img.ndim == 2 else img[..., 0]


def _read_with_openexr(path: Path) -> np.ndarray | None:
    try:
        import OpenEXR  # official bindings (package "openexr"), optional
    except ImportError:
        return None
    try:
        with OpenEXR.File(str(path)) as f:
            channels = {name: ch.pixels for name, ch in f.channels().items()}
    except (AttributeError, TypeError, KeyError, OSError, RuntimeError, ValueError):
        # older binding versions have another API, or the file is unusual: use our decoder instead
        return None
    return channels[_opencv_channel0(list(channels), str(path))]


def _opencv_channel0(names: list[str], where: str) -> str:
    """The channel OpenCV returns as channel 0 (it reorders R, G, B(, A) to B, G, R(, A))."""
    if "B" in names:
        return "B"
    if "Y" in names:
        return "Y"
    if len(names) == 1:
        return names[0]
    raise ExrError(f"{where}: cannot tell which of the channels {sorted(names)} is channel 0 in OpenCV's "
                   "order (expected R/G/B, Y, or a single channel)")


def _read_cstr(data: bytes, pos: int) -> tuple[str, int]:
    end = data.index(b"\x00", pos)
    return data[pos:end].decode("latin-1"), end + 1


def _decode_file(data: bytes, where: str) -> np.ndarray:
    version = struct.unpack_from("<i", data, 4)[0]
    if version & 0xFF != 2:
        raise ExrError(f"{where}: unsupported EXR version {version & 0xFF}")
    if version & 0x1A00:  # tiled (0x200), deep (0x800) or multi-part (0x1000)
        raise ExrError(f"{where}: tiled, deep or multi-part EXR files need OpenCV with OpenEXR or the "
                       "'openexr' Python package")
    pos, attrs = 8, {}
    while data[pos] != 0:
        name, pos = _read_cstr(data, pos)
        type_name, pos = _read_cstr(data, pos)
        size = struct.unpack_from("<i", data, pos)[0]
        pos += 4
        attrs[name] = (type_name, data[pos:pos + size])
        pos += size
    pos += 1  # end of header
    try:
        channels = _parse_chlist(attrs["channels"][1])
        compression = attrs["compression"][1][0]
        x_min, y_min, x_max, y_max = struct.unpack("<4i", attrs["dataWindow"][1])
    except KeyError as exc:
        raise ExrError(f"{where}: EXR header lacks the required attribute {exc}") from None
    if compression not in _LINES_PER_CHUNK:
        raise ExrError(f"{where}: EXR compression {_COMPRESSION_NAMES.get(compression, compression)} is not "
                       "supported by the built-in decoder; install the 'openexr' Python package or an "
                       "OpenCV build with OpenEXR")
    if any(xs != 1 or ys != 1 for _, _, xs, ys in channels):
        raise ExrError(f"{where}: sub-sampled EXR channels are not supported")
    width, height = x_max - x_min + 1, y_max - y_min + 1
    if width < 1 or height < 1 or not channels:
        raise ExrError(f"{where}: EXR data window {width}×{height} with {len(channels)} channel(s) holds no pixels")
    if any(ptype not in _PIXEL_DTYPES for _, ptype, _, _ in channels):
        raise ExrError(f"{where}: unknown EXR pixel type in channels {channels}")
    lines = _LINES_PER_CHUNK[compression]
    n_chunks = -(-height // lines)
    line_bytes = sum(width * _PIXEL_DTYPES[ptype].itemsize for _, ptype, _, _ in channels)
    # zlib expands at most ~1032:1: a header promising more pixels than that is corrupt (and must not
    # make us allocate gigabytes).
    if height * line_bytes > 1100 * len(data):
        raise ExrError(f"{where}: EXR header declares {width}×{height} pixels, more than the "
                       f"{len(data)}-byte file can hold")
    offsets = struct.unpack_from(f"<{n_chunks}Q", data, pos)
    planes = {name: np.empty((height, width), _PIXEL_DTYPES[ptype]) for name, ptype, _, _ in channels}
    for offset in offsets:
        y, size = struct.unpack_from("<ii", data, offset)
        row0 = y - y_min
        if not 0 <= row0 < height:
            raise ExrError(f"{where}: EXR chunk at line {y} lies outside the data window")
        n_lines = min(lines, height - row0)
        raw_size = n_lines * line_bytes
        payload = data[offset + 8: offset + 8 + size]
        raw = payload if size == raw_size else _decompress(payload, compression, raw_size, where)
        cursor = 0
        for r in range(row0, row0 + n_lines):
            for name, ptype, _, _ in channels:  # channels are stored in the header's (sorted) order
                nbytes = width * _PIXEL_DTYPES[ptype].itemsize
                planes[name][r] = np.frombuffer(raw, _PIXEL_DTYPES[ptype], width, cursor)
                cursor += nbytes
    return planes[_opencv_channel0(list(planes), where)].astype(np.float32)


def _parse_chlist(blob: bytes) -> list[tuple[str, int, int, int]]:
    out, pos = [], 0
    while blob[pos] != 0:
        name, pos = _read_cstr(blob, pos)
        ptype, _plinear, xs, ys = struct.unpack_from("<iB3xii", blob, pos)
        pos += 16
        out.append((name, ptype, xs, ys))
    return out


def _decompress(payload: bytes, compression: int, raw_size: int, where: str) -> bytes:
    if compression == 1:  # RLE: signed run lengths, then the same predictor/interleave as ZIP
        buf = bytearray()
        i = 0
        while i < len(payload):
            count = struct.unpack_from("b", payload, i)[0]
            i += 1
            if count < 0:
                buf += payload[i:i - count]
                i -= count
            else:
                buf += payload[i:i + 1] * (count + 1)
                i += 1
        packed = bytes(buf)
    else:  # ZIPS / ZIP: zlib stream
        packed = zlib.decompress(payload)
    if len(packed) != raw_size:
        raise ExrError(f"{where}: corrupt EXR chunk ({len(packed)} bytes decoded, {raw_size} expected)")
    t = np.frombuffer(packed, np.uint8).astype(np.int64)
    # Undo the byte predictor: t[i] = t[i-1] + t[i] - 128 (mod 256).
    t[1:] -= 128
    t = (np.cumsum(t) & 0xFF).astype(np.uint8)
    # Undo the interleaving: the first half holds the even bytes, the second half the odd bytes.
    out = np.empty_like(t)
    half = (raw_size + 1) // 2
    out[0::2] = t[:half]
    out[1::2] = t[half:]
    return out.tobytes()


def encode_exr(depth: np.ndarray, compression: str = "ZIP") -> bytes:
    """Encode a float32 (H, W) array as a single-channel (``Y``, FLOAT) scan-line EXR file."""
    arr = np.ascontiguousarray(depth, dtype="<f4")
    if arr.ndim != 2:
        raise ValueError(f"encode_exr expects an (H, W) array, got shape {arr.shape}")
    codes = {"NONE": 0, "ZIP": 3}
    if compression not in codes:
        raise ValueError(f"compression must be one of {sorted(codes)}")
    code = codes[compression]
    height, width = arr.shape

    def attr(name: str, type_name: str, value: bytes) -> bytes:
        return name.encode() + b"\x00" + type_name.encode() + b"\x00" + struct.pack("<i", len(value)) + value

    chlist = b"Y\x00" + struct.pack("<iB3xii", 2, 0, 1, 1) + b"\x00"
    window = struct.pack("<4i", 0, 0, width - 1, height - 1)
    header = (struct.pack("<ii", EXR_MAGIC, 2)
              + attr("channels", "chlist", chlist)
              + attr("compression", "compression", bytes([code]))
              + attr("dataWindow", "box2i", window)
              + attr("displayWindow", "box2i", window)
              + attr("lineOrder", "lineOrder", b"\x00")
              + attr("pixelAspectRatio", "float", struct.pack("<f", 1.0))
              + attr("screenWindowCenter", "v2f", struct.pack("<2f", 0.0, 0.0))
              + attr("screenWindowWidth", "float", struct.pack("<f", 1.0))
              + b"\x00")
    lines = _LINES_PER_CHUNK[code]
    chunks = []
    for row0 in range(0, height, lines):
        raw = arr[row0:row0 + lines].tobytes()
        payload = raw if code == 0 else _zip_compress(raw)
        chunks.append(struct.pack("<ii", row0, len(payload)) + payload)
    table_end = len(header) + 8 * len(chunks)
    offsets, pos = [], table_end
    for chunk in chunks:
        offsets.append(pos)
        pos += len(chunk)
    return header + struct.pack(f"<{len(offsets)}Q", *offsets) + b"".join(chunks)


def _zip_compress(raw: bytes) -> bytes:
    t = np.frombuffer(raw, np.uint8)
    half = (len(t) + 1) // 2
    inter = np.empty_like(t)
    inter[:half] = t[0::2]
    inter[half:] = t[1::2]
    pred = inter.astype(np.int64)
    pred[1:] = (pred[1:] - pred[:-1] + 128 + 256) & 0xFF
    packed = zlib.compress(pred.astype(np.uint8).tobytes(), 6)
    # The format stores a chunk raw when compression does not make it smaller.
    return packed if len(packed) < len(raw) else raw
