"""detect/encoders.py loads an image encoder exported by our own pretrain/ in image mode (the demo's
stand-in for DINOv2 weights)."""

import pytest
import torch

from detect.encoders import EncoderError, is_pretrain_image_export, load_image_encoder
from detect.preprocess import GRAY_MEAN, GRAY_STD, preprocess_image
from pretrain.export import default_depth_input_norm, write_export
from shared.vit import create_vit


def image_norm(in_chans: int) -> dict:
    """What pretrain/train.py records for image mode with the default image_aug settings."""
    return {"modality": "image", "in_chans": in_chans, "scale": 255.0, "max_normalize": True,
            "mean": [GRAY_MEAN] * in_chans, "std": [GRAY_STD] * in_chans}


def tiny_vit(in_chans: int, seed: int = 0):
    torch.manual_seed(seed)
    # 3 heads of 32: a head count the DINOv2-file path (heads = dim / 64) would get wrong.
    return create_vit("vit_tiny_patch14", in_chans=in_chans, embed_dim=96, num_heads=3, depth=2, img_size=56,
                      layerscale=None).eval()


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_one_channel_export_matches_the_pretrained_backbone_on_gray_input(tmp_path, suffix):
    vit = tiny_vit(1)
    path = tmp_path / "image_encoder.pth"
    write_export(path, vit.state_dict(), vit.cfg.to_dict(), image_norm(1), {"modality": "image"})
    path = path.with_suffix(suffix)
    assert is_pretrain_image_export(path)
    enc = load_image_encoder("auto", path)
    assert enc.in_chans == 3 and enc.info.arch["num_heads"] == 3 and enc.info.input_norm["modality"] == "image"
    image = (torch.rand(75, 90) * 255).to(torch.uint8).numpy()
    x, _ = preprocess_image(image, 112)  # detect's preprocessing: 3 identical gray channels, gray norm
    tokens, grid = enc(x[None])
    with torch.no_grad():
        ref, ref_grid = vit.get_patch_tokens(x[None, :1])
    assert grid == ref_grid == (8, 8)
    torch.testing.assert_close(tokens, ref, atol=1e-5, rtol=1e-4)


def test_three_channel_export_and_named_encoder_check(tmp_path):
    vit = tiny_vit(3)
    path = write_export(tmp_path / "rgb.pth", vit.state_dict(), vit.cfg.to_dict(), image_norm(3), {},
                        safetensors=False)
    enc = load_image_encoder("auto", path)
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(enc(x)[0], vit.get_patch_tokens(x)[0])
    with pytest.raises(EncoderError, match="does not hold dinov2_vitb14_reg4"):
        load_image_encoder("dinov2_vitb14_reg4", path)


def test_other_norm_warns_and_depth_exports_are_not_image_encoders(tmp_path):
    vit = tiny_vit(1)
    other = dict(image_norm(1), mean=[0.5], std=[0.25])
    path = write_export(tmp_path / "other.pth", vit.state_dict(), vit.cfg.to_dict(), other, {}, safetensors=False)
    with pytest.warns(UserWarning, match="input_norm"):
        load_image_encoder("auto", path)
    depth = write_export(tmp_path / "dd.pth", vit.state_dict(), vit.cfg.to_dict(), default_depth_input_norm(), {},
                         safetensors=False)
    assert not is_pretrain_image_export(depth) and not is_pretrain_image_export(tmp_path / "missing.pth")
    # a depth export goes down the DINOv2-file path, which refuses its single input channel
    with pytest.raises(EncoderError, match="3 input channels"):
        load_image_encoder("auto", depth)
