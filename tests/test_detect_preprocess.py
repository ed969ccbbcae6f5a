"""Per-view preprocessing, its inverse and the foreground mask (modmap.md §4, §10, §12)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from detect.preprocess import (
    GRAY_MEAN,
    GRAY_STD,
    ViewGeometry,
    foreground_mask,
    preprocess_depth,
    preprocess_image,
    token_validity,
    undo_geometry,
    upsample_tokens,
)


@pytest.mark.parametrize("shape", [(30, 50), (50, 30), (37, 37), (3000 // 50, 4096 // 50)])
def test_geometry_offsets(shape):
    h, w = shape
    g = ViewGeometry.for_shape(h, w, 28)
    assert g.side == max(h, w)
    assert g.pad_top == (g.side - h) // 2 and g.pad_left == (g.side - w) // 2
    left, right, top, bottom = g.pads
    assert left + w + right == g.side and top + h + bottom == g.side


@pytest.mark.parametrize("shape", [(45, 70), (70, 45)])
def test_undo_geometry_returns_a_marked_pixel_to_its_original_place(shape):
    h, w = shape
    size = 70  # no resampling blur: the padded side equals the input size
    g = ViewGeometry.for_shape(h, w, size)
    r, c = 7, 11
    image = np.zeros((h, w), np.uint8)
    image[r, c] = 255
    x, _ = preprocess_image(image, size, "gray")
    marked = (x[0] == x[0].max()).float()
    back = undo_geometry(marked, g, "nearest")
    assert back.shape == (h, w)
    assert np.argwhere(back > 0.5).tolist() == [[r, c]]
    # with resampling (input smaller than the padded square) the maximum still lands there
    g2 = ViewGeometry.for_shape(4 * h, 4 * w, size)
    big = np.zeros((4 * h, 4 * w), np.float32)
    big[4 * r:4 * r + 4, 4 * c:4 * c + 4] = 1.0
    x2, _ = preprocess_image(big, size, "gray")
    back2 = undo_geometry(x2[0], g2, "bilinear")
    peak = np.unravel_index(np.argmax(back2), back2.shape)
    assert abs(peak[0] - (4 * r + 1.5)) <= 2 and abs(peak[1] - (4 * c + 1.5)) <= 2


@pytest.mark.parametrize("shape", [(30, 50), (50, 30), (33, 31)])
def test_undo_geometry_equals_full_resize_then_crop(shape):
    h, w = shape
    g = ViewGeometry.for_shape(h, w, 28)
    m = torch.rand(28, 28)
    full = F.interpolate(m[None, None], size=(g.side, g.side), mode="bilinear", align_corners=False)[0, 0]
    ref = full[g.pad_top:g.pad_top + h, g.pad_left:g.pad_left + w].numpy()
    assert np.allclose(undo_geometry(m, g, "bilinear"), ref, atol=1e-5)
    full_n = F.interpolate(m[None, None], size=(g.side, g.side), mode="nearest")[0, 0]
    ref_n = full_n[g.pad_top:g.pad_top + h, g.pad_left:g.pad_left + w].numpy()
    assert np.array_equal(undo_geometry(m, g, "nearest"), ref_n)
    mask = m > 0.5
    assert undo_geometry(mask, g, "nearest").dtype == bool


def test_image_preprocessing_steps():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 200, size=(20, 28), dtype=np.uint8)
    x, g = preprocess_image(img, 14, "gray")
    assert x.shape == (3, 14, 14) and x.dtype == torch.float32
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    raw = x[0] * GRAY_STD + GRAY_MEAN  # undo the normalisation: max is exactly 1 (per-image max division)
    assert float(raw.max()) == pytest.approx(1.0, abs=1e-6)
    # the pipeline: [0, 1] → edge pad → bicubic antialias resize → /max
    t = torch.from_numpy(img.astype(np.float32) / 255)[None, None]
    t = F.pad(t, g.pads, mode="replicate")
    t = F.interpolate(t, size=(14, 14), mode="bicubic", antialias=True, align_corners=False)[0, 0]
    assert torch.allclose(raw, t / t.max(), atol=1e-6)
    xi, _ = preprocess_image(img, 14, "imagenet")
    assert not torch.equal(xi[0], xi[1])  # per-channel constants


def test_depth_nearness_and_nearest_resize():
    depth = np.full((6, 4), 2.0, np.float32)
    depth[:, :2] = 1.0  # near half
    depth[0, 0] = np.nan
    x, g = preprocess_depth(depth, 6, "nearness", eps=0.1, pct=(0.0, 100.0))
    assert x.shape == (1, 6, 6) and g.pad_left == 1
    vals = np.unique(x.numpy())
    assert np.allclose(vals, [0.0, 0.1, 1.0])  # invalid 0, far = eps, near = 1; nearest resize mixes nothing
    assert x[0, 0, 1] == 0.0  # the NaN pixel (padding shifted it by one column)
    assert x[0, 0, 0] == 0.0  # edge replication copies the invalid value into the padding


def test_depth_max_mode_follows_the_authors_order():
    depth = np.array([[1.0, 2.0], [4.0, np.inf]], np.float32)
    x, _ = preprocess_depth(depth, 4, "max")
    assert float(x.max()) == 1.0
    assert sorted(np.unique(x.numpy()).tolist()) == [0.0, 0.25, 0.5, 1.0]
    xc, _ = preprocess_depth(np.ones((2, 4), np.float32), 4, "max", pad_mode="constant")
    assert xc[0, 0].tolist() == [0.0] * 4  # constant padding = invalid


def test_foreground_mask_opening_and_largest_component():
    d = np.zeros((20, 20), np.float32)
    d[2:12, 2:12] = 1.0  # the object
    d[15:18, 15:18] = 1.0  # a smaller blob
    d[0, 19] = 1.0  # a single pixel: removed by the opening
    fg = foreground_mask(d)
    assert fg[5, 5] and not fg[16, 16] and not fg[0, 19]
    assert fg.sum() == 100
    assert not foreground_mask(np.zeros((5, 5))).any()
    # the image border does not erode the object (OpenCV semantics)
    d2 = np.ones((6, 6), np.float32)
    assert foreground_mask(d2).all()


def test_token_validity_half_rule():
    d = torch.zeros(1, 28, 28)
    d[:, :7, :] = 1.0  # top half of the first patch row
    v = token_validity(d, 14)
    assert v.tolist() == [True, True, False, False]


def test_upsample_tokens_bilinear():
    m = torch.arange(4.0)
    up = upsample_tokens(m, (2, 2), 4)
    ref = F.interpolate(m.reshape(1, 1, 2, 2), size=(4, 4), mode="bilinear", align_corners=False)[0, 0]
    assert torch.equal(up, ref)
