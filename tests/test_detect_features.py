"""Feature extraction and the on-disk token cache (modmap.md §5)."""

import dataclasses

import numpy as np
import pytest
import torch

from detect.encoders import EncoderInfo, FrozenEncoder
from detect.features import FeatureCache, FeatureExtractor, FeatureSettings, ViewSource
from shared.vit import create_vit


def _encoders():
    torch.manual_seed(0)
    img = FrozenEncoder(create_vit("vit_tiny_patch14", in_chans=3, depth=1), EncoderInfo("img", "r", "a" * 64))
    dep = FrozenEncoder(create_vit("vit_tiny_patch14", in_chans=1, depth=1, embed_dim=96, num_heads=2),
                        EncoderInfo("dep", "r", "b" * 64))
    return img, dep


def _views(n=3, h=30, w=40, calls=None):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (h, w), dtype=np.uint8) for _ in range(n)]
    depths = [(1 + rng.random((h, w))).astype(np.float32) for _ in range(n)]

    def loader(i):
        def load():
            if calls is not None:
                calls.append(i)
            return images[i], depths[i]
        return load

    return [ViewSource(str(i), loader(i)) for i in range(n)]


def test_extraction_shapes_and_validity():
    img, dep = _encoders()
    ex = FeatureExtractor(img, dep, FeatureSettings(image_size=56), batch_size=2)
    feats = FeatureCache(ex, None).get("inst", _views())
    assert feats.image.shape == (3, 16, 192) and feats.depth.shape == (3, 16, 96)
    assert feats.grid == (4, 4) and feats.stems == ["0", "1", "2"]
    # 30×40 padded to 40×40: the top and bottom 5 rows are edge-replicated valid depth
    assert feats.token_valid.all()
    assert feats.geometries[0].pad_top == 5
    # batching does not change the tokens
    one = FeatureCache(FeatureExtractor(img, dep, FeatureSettings(image_size=56), batch_size=1), None)
    assert np.allclose(one.get("inst", _views()).image, feats.image, atol=1e-5)


def test_cache_is_reused_and_keyed_on_settings(tmp_path):
    img, dep = _encoders()
    calls = []
    ex = FeatureExtractor(img, dep, FeatureSettings(image_size=56))
    cache = FeatureCache(ex, tmp_path, dtype="fp16")
    a = cache.get("/data/cls/inst", _views(calls=calls))
    assert cache.misses == 1 and len(calls) == 3
    b = cache.get("/data/cls/inst", _views(calls=calls))
    assert cache.hits == 1 and len(calls) == 3  # nothing re-encoded
    assert isinstance(b.image, np.memmap) and b.image.dtype == np.float16
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    img_t, _dep_t, _ = b.tensors()
    assert img_t.dtype == torch.float32  # fp16 cache upcast
    # other preprocessing → another key → recomputed
    ex2 = FeatureExtractor(img, dep, dataclasses.replace(ex.settings, image_norm="imagenet"))
    FeatureCache(ex2, tmp_path, dtype="fp16").get("/data/cls/inst", _views(calls=calls))
    assert len(calls) == 6
    entries = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert len(entries) == 2 and all(p.name.startswith("inst-") for p in entries)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary leftovers


def test_dinov2_on_depth_uses_the_image_encoder():
    img, _ = _encoders()
    ex = FeatureExtractor(img, None, FeatureSettings(image_size=56, depth_encoder="dinov2_on_depth"))
    feats = FeatureCache(ex, None).get("x", _views(2))
    assert feats.depth.shape == (2, 16, 192) and ex.depth_encoder is img


def test_misaligned_view_is_reported():
    img, dep = _encoders()
    ex = FeatureExtractor(img, dep, FeatureSettings(image_size=56))
    bad = [ViewSource("7", lambda: (np.zeros((10, 12), np.uint8), np.ones((10, 13), np.float32)))]
    with pytest.raises(ValueError, match="view 7.*pixel-aligned"):
        FeatureCache(ex, None).get("inst", bad)
