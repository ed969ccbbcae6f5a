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
