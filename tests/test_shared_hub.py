"""Hub ids for --image-encoder-weights / --ckpt (shared/hub.py): resolved through a mocked download
where there is "internet", the local cache offline, and today's error when neither has them. Tests
never touch the network: the real downloader only runs with local_files_only=True (offline mode)."""

from __future__ import annotations

import time

import pytest
import torch

from detect.encoders import EncoderError, load_depth_encoder, load_image_encoder
from shared import hub


def test_what_counts_as_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "owner").mkdir()
    (tmp_path / "owner" / "model").mkdir()
    assert hub.looks_like_hub_id("facebook/dinov2-with-registers-base")
    assert hub.looks_like_hub_id("user/dinodepth-vits14@v1.0")
    assert not hub.looks_like_hub_id("owner/model")  # an existing local folder
    assert not hub.looks_like_hub_id("runs/anything")  # inside an existing local folder
    assert not hub.looks_like_hub_id("exports/dinodepth.pth")  # a weights file name: a (missing) path
    assert not hub.looks_like_hub_id("dinodepth.pth") and not hub.looks_like_hub_id("/abs/path/x")
    assert not hub.looks_like_hub_id("a/b/c")


@pytest.fixture
def hf_dinodepth(tmp_path):
    """An exported DINO-Depth HF folder, as a hub snapshot would hold it."""
    from pretrain.export import export_hf
    from shared.encoder_export import default_depth_input_norm
    from shared.vit import create_vit

    torch.manual_seed(0)
    vit = create_vit("vit_small_patch14", embed_dim=48, depth=1, num_heads=2, img_size=28, in_chans=1)
    return export_hf(vit.state_dict(), vit.cfg.to_dict(), default_depth_input_norm(), {}, tmp_path / "snap"), vit


def test_hub_id_ckpt_downloads_through_the_resolver(hf_dinodepth, monkeypatch):
    folder, vit = hf_dinodepth
    calls = []

    def fake_download(repo_id, revision, local_files_only):
        calls.append((repo_id, revision, local_files_only))
        return str(folder)

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "_snapshot_download", fake_download)
    enc = load_depth_encoder("user/dinodepth-vits14@main")
    assert calls == [("user/dinodepth-vits14", "main", False)]
    assert enc.info.weights == str(folder) and len(enc.info.sha256) == 64
    x = torch.rand(1, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(enc(x)[0], vit.eval().get_patch_tokens(x)[0], atol=1e-5)
    # a local HF folder works the same way without any download
    calls.clear()
    assert load_depth_encoder(str(folder)).info.sha256 == enc.info.sha256 and calls == []


def test_hub_id_image_encoder(tmp_path, monkeypatch):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                             patch_size=14, mlp_ratio=2)).save_pretrained(tmp_path / "dinov2")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "_snapshot_download", lambda repo_id, revision, local_files_only: str(tmp_path / "dinov2"))
    enc = load_image_encoder("auto", "facebook/dinov2-small")
    assert enc.in_chans == 3 and enc.embed_dim == 32


def test_offline_fails_at_once_with_todays_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the real downloader, cache only: no network
    start = time.monotonic()
    with pytest.warns(UserWarning, match="local Hugging Face cache"), \
            pytest.raises(EncoderError, match="DINO-Depth checkpoint user/no-such-dinodepth does not exist"):
        load_depth_encoder("user/no-such-dinodepth")
    with pytest.warns(UserWarning, match="hub id"), \
            pytest.raises(EncoderError, match="image encoder weights facebook/no-such-dinov2 do not exist"):
        load_image_encoder("auto", "facebook/no-such-dinov2")
    assert time.monotonic() - start < 5.0


def test_download_failure_gives_todays_message(monkeypatch):
    def no_network(repo_id, revision, local_files_only):
        raise OSError("Network is unreachable")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "_snapshot_download", no_network)
    with pytest.warns(UserWarning, match="Network is unreachable"), \
            pytest.raises(EncoderError, match="does not exist"):
        load_depth_encoder("user/dinodepth-vits14")
