"""shared/exr.py: the OpenEXR bindings behind the toolkit's EXR conventions (channel 0 in OpenCV's
order, float32, ExrError naming the file for every bad input)."""

from __future__ import annotations

import io

import numpy as np
import OpenEXR
import pytest

from shared import exr


def _write(path, channels: dict, compression=OpenEXR.ZIP_COMPRESSION, tiled: bool = False) -> None:
    header = {"compression": compression, "type": OpenEXR.tiledimage if tiled else OpenEXR.scanlineimage}
    if tiled:
        tiles = OpenEXR.TileDescription()
        tiles.xSize = tiles.ySize = 8
        header["tiles"] = tiles
    OpenEXR.File(header, channels).write(str(path))


def _depth(h=11, w=13, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).random((h, w)).astype(np.float32) + 0.5


@pytest.mark.parametrize("compression", [OpenEXR.NO_COMPRESSION, OpenEXR.RLE_COMPRESSION, OpenEXR.ZIPS_COMPRESSION,
                                         OpenEXR.ZIP_COMPRESSION, OpenEXR.PIZ_COMPRESSION])
def test_every_lossless_compression_and_tiled_files(tmp_path, compression):
    d = _depth()
    _write(tmp_path / "a.exr", {"Z": d}, compression)
    np.testing.assert_array_equal(exr.read_exr_channel0(tmp_path / "a.exr"), d)
    _write(tmp_path / "t.exr", {"Z": d}, compression, tiled=True)  # the old hand-written codec refused these
    np.testing.assert_array_equal(exr.read_exr_channel0(tmp_path / "t.exr"), d)


def test_opencv_channel_order_and_half(tmp_path):
    r, g, b = _depth(seed=1), _depth(seed=2), _depth(seed=3)
    _write(tmp_path / "rgb.exr", {"R": r, "G": g, "B": b})
    np.testing.assert_array_equal(exr.read_exr_channel0(tmp_path / "rgb.exr"), b)  # OpenCV's channel 0 is B
    half = _depth(seed=4).astype(np.float16)
    _write(tmp_path / "h.exr", {"Y": half, "A": np.ones_like(half)})
    out = exr.read_exr_channel0(tmp_path / "h.exr")
    assert out.dtype == np.float32 and np.array_equal(out, half.astype(np.float32))
    _write(tmp_path / "two.exr", {"U": r, "V": g})
    with pytest.raises(exr.ExrError, match=r"two\.exr: cannot tell which of the channels"):
        exr.read_exr_channel0(tmp_path / "two.exr")


def test_encode_is_a_real_exr_the_library_reads(tmp_path):
    d = _depth(37, 53)
    d[0, 0] = np.inf
    for compression in ("ZIP", "NONE"):
        data = exr.encode_exr(d, compression)
        with OpenEXR.File(io.BytesIO(data), separate_channels=True) as f:
            assert list(f.channels()) == ["Y"]
            np.testing.assert_array_equal(f.channels()["Y"].pixels, d)
            assert f.header()["compression"] == (OpenEXR.ZIP_COMPRESSION if compression == "ZIP"
                                                 else OpenEXR.NO_COMPRESSION)
    assert len(exr.encode_exr(np.zeros((64, 64), np.float32), "ZIP")) < 64 * 64 * 4 // 4  # compressed
    with pytest.raises(ValueError, match="compression"):
        exr.encode_exr(d, "PIZ")
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        exr.encode_exr(np.zeros((2, 3, 4), np.float32))


def test_bad_inputs_are_exr_errors_naming_the_file(tmp_path):
    good = exr.encode_exr(_depth(40, 50))
    for name, data in (("cut.exr", good[: len(good) // 2]), ("header.exr", good[:60]),
                       ("garbage.exr", exr.EXR_MAGIC + b"\x02\x00\x00\x00" + b"\xff" * 200)):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(exr.ExrError, match=name.replace(".", r"\.")):
            exr.read_exr_channel0(tmp_path / name)
    (tmp_path / "png.exr").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    with pytest.raises(exr.ExrError, match="magic"):
        exr.read_exr_channel0(tmp_path / "png.exr")


def test_a_header_promising_more_pixels_than_the_file_holds_is_refused(tmp_path):
    """A corrupt data window must not make the library allocate gigabytes."""
    data = bytearray(exr.encode_exr(np.zeros((4, 4), np.float32), "NONE"))
    pos = data.index(b"dataWindow\x00box2i\x00") + len(b"dataWindow\x00box2i\x00") + 4
    data[pos + 8: pos + 16] = np.array([60000, 60000], "<i4").tobytes()  # x_max, y_max
    with pytest.raises(exr.ExrError, match="more than the"):
        exr.decode_exr_channel0(bytes(data), "big.exr")
