"""Property-based fuzzing (hypothesis) of the readers and the depth normaliser: whatever the bytes
or the array, they return a valid result or raise their documented error type, nothing else.

| function | documented errors |
|---|---|
| ``shared.depth.normalize_depth`` / ``downsample_depth`` | ``ValueError`` |
| ``shared.exr.read_exr_channel0`` | ``ExrError`` |
| ``shared.formats.read_png_uint16`` / ``read_tiff`` / ``read_npy`` / ``xyz_to_z`` | ``FormatError`` |
| ``shared.shards.npy_from_buffer`` (shard samples) | ``ValueError`` |
| ``detect.data.sim3d.load_depth`` | ``SiM3DError`` |
| data preparation (``process_item`` of the folder reader) | none: a :class:`SkippedItem` |

Runs are derandomised (the same examples every time) and keep no example database.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from data_prep.shards import EncodedSample, SampleJob, SkippedItem, SourceItem, process_item
from data_prep.sources.folder import FolderSource
from detect.data.sim3d import SiM3DError, load_depth
from shared.depth import downsample_depth, normalize_depth, target_size
from shared.exr import ExrError, encode_exr, read_exr_channel0
from shared.formats import FormatError, read_npy, read_png_uint16, read_tiff, xyz_to_z
from shared.shards import npy_from_buffer

FUZZ = settings(max_examples=60, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

DTYPES = st.sampled_from([np.float16, np.float32, np.float64, np.int32, np.uint16, np.uint8, np.bool_])
NAN_OR = st.just(float("nan")).__or__


@st.composite
def depth_arrays(draw, max_dims: int = 3) -> np.ndarray:
    """Any small array of a numeric dtype: NaN, ±inf, zeros, negatives, constant maps, empty shapes."""
    dtype = np.dtype(draw(DTYPES))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=max_dims, min_side=0, max_side=24))
    elements = hnp.from_dtype(dtype, allow_nan=True, allow_infinity=True) if dtype.kind == "f" else None
    return draw(hnp.arrays(dtype, shape, elements=elements))


@st.composite
def mutated(draw, original: bytes) -> bytes:
    """Cuts, overwritten bytes and appended garbage applied to a valid file."""
    data = bytearray(original)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["cut", "flip", "overwrite", "append"]))
        if kind == "cut":
            data = data[: draw(st.integers(0, len(data)))]
        elif kind == "flip" and data:
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= draw(st.integers(1, 255))
        elif kind == "overwrite" and data:
            i = draw(st.integers(0, len(data) - 1))
            chunk = draw(st.binary(min_size=1, max_size=8))
            data[i:i + len(chunk)] = chunk
        else:
            data += draw(st.binary(max_size=64))
    return bytes(data)


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def _encoded(fmt: str) -> bytes:
    rng = np.random.default_rng(1)
    depth = (rng.random((9, 11)) + 0.5).astype(np.float32)
    if fmt == "exr":
        return encode_exr(depth)
    if fmt == "npy":
        return _npy(depth)
    buf = io.BytesIO()
    if fmt == "png":
        from PIL import Image

        Image.fromarray((depth * 30000).astype(np.uint16)).save(buf, format="PNG")
    else:
        import tifffile

        tifffile.imwrite(buf, np.stack([depth, depth, depth], -1))
    return buf.getvalue()


VALID = {fmt: _encoded(fmt) for fmt in ("exr", "npy", "png", "tif")}


def file_contents(fmt: str):
    """Random bytes, or a valid file of that format damaged at random."""
    return st.one_of(st.binary(max_size=300), mutated(VALID[fmt]))


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


# -- the depth normaliser ------------------------------------------------------------------------------
@FUZZ
@given(depth=depth_arrays(), kind=st.sampled_from(["metric_z", "rel_disparity", "disparity"]),
       mode=st.sampled_from(["nearness", "max", "min"]),
       eps=st.one_of(st.sampled_from([0.0, 0.1, 0.999, float("nan")]), st.floats(-1, 2)),
       pct=st.one_of(st.just((0.5, 99.5)), st.tuples(NAN_OR(st.floats(-10, 110)), NAN_OR(st.floats(-10, 110))),
                     st.lists(st.floats(0, 100), max_size=3)))
def test_normalize_depth_returns_a_valid_map_or_raises_value_error(depth, kind, mode, eps, pct):
    try:
        x, valid, degenerate = normalize_depth(depth, kind, mode=mode, eps=eps, pct=pct)
    except ValueError:
        return
    assert x.dtype == np.float32 and x.shape == depth.shape == valid.shape and valid.dtype == np.bool_
    assert np.isfinite(x).all() and (x[~valid] == 0).all()
    if mode == "nearness" and valid.any():
        assert (x[valid] >= np.float32(eps) - 1e-6).all() and (x[valid] <= 1.0).all()
    assert isinstance(degenerate, bool)


@FUZZ
@given(depth=depth_arrays(max_dims=3), max_side=st.integers(-2, 40),
       method=st.sampled_from(["nan_median", "nan_mean", "nearest", "bilinear"]),
       valid_frac_min=st.floats(0, 1))
def test_downsample_depth_keeps_its_contract(depth, max_side, method, valid_frac_min):
    try:
        out = downsample_depth(depth, max_side=max_side, method=method, valid_frac_min=valid_frac_min)
    except ValueError:
        return
    assert out.dtype == np.float32 and out.shape == target_size(*depth.shape, max_side)


# -- file readers ------------------------------------------------------------------------------------------
@FUZZ
@given(data=file_contents("exr"))
def test_exr_reader_raises_only_exr_error(scratch, data):
    path = scratch / "x.exr"
    path.write_bytes(data)
    try:
        arr = read_exr_channel0(path)
    except ExrError:
        return
    assert arr.dtype == np.float32 and arr.ndim == 2


@FUZZ
@given(fmt=st.sampled_from(["png", "tif", "npy"]), data=st.data())
def test_format_readers_raise_only_format_error(scratch, fmt, data):
    content = data.draw(file_contents(fmt))
    path = scratch / f"x.{fmt}"
    path.write_bytes(content)
    reader = {"png": read_png_uint16, "tif": read_tiff, "npy": read_npy}[fmt]
    try:
        arr = reader(path)
    except FormatError:
        return
    assert isinstance(arr, np.ndarray)
    if fmt == "png":
        assert arr.dtype == np.uint16 and arr.ndim == 2


@FUZZ
@given(xyz=depth_arrays(max_dims=4))
def test_xyz_to_z_raises_only_format_error(xyz):
    try:
        z = xyz_to_z(xyz, "x.tiff")
    except FormatError:
        return
    assert z.dtype == np.float32 and z.shape == xyz.shape[:2] and not (z == 0).any()


@FUZZ
@given(data=st.one_of(file_contents("npy"), st.builds(_npy, depth_arrays())))
def test_shard_sample_decoder_raises_only_value_error(data):
    try:
        arr = npy_from_buffer(bytearray(data), "shard.tar:key.depth.npy")
    except ValueError:
        return
    assert arr.dtype == np.float32 and arr.ndim == 2 and arr.flags.writeable


@FUZZ
@given(fmt=st.sampled_from(["npy", "exr"]), data=st.data())
def test_detection_depth_reader_raises_only_sim3d_error(scratch, fmt, data):
    content = data.draw(st.one_of(file_contents(fmt), st.builds(_npy, depth_arrays()) if fmt == "npy"
                                  else st.nothing()))
    path = scratch / f"3.{fmt}"
    path.write_bytes(content)
    try:
        depth = load_depth(path, where="fuzz view 3")
    except SiM3DError as exc:
        assert "3." + fmt in str(exc)
        return
    assert depth.dtype == np.float32 and depth.ndim == 2


@FUZZ
@given(fmt=st.sampled_from(["npy", "png", "tif"]), data=st.data())
def test_data_prep_skips_any_bad_file_instead_of_failing(scratch, fmt, data):
    content = data.draw(st.one_of(file_contents(fmt), st.builds(_npy, depth_arrays()) if fmt == "npy"
                                  else st.nothing()))
    root = scratch / "folder"
    root.mkdir(exist_ok=True)
    path = root / f"scan.{fmt}"
    path.write_bytes(content)
    source = FolderSource(root)
    item = SourceItem(category="c", split="train", split_orig="train", stem="scan", rel_path=path.name,
                      ref=str(path), size=len(content))
    job = SampleJob("folder", "metric_z", "unknown", 64, "nan_median", 0.5, "h")
    outcome = process_item(source, job, 0, item)
    assert isinstance(outcome, (EncodedSample, SkippedItem))
    if isinstance(outcome, SkippedItem):
        assert outcome.reason
