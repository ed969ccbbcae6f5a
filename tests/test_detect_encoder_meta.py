"""The transductive-risk warning of single-view runs (modmap.md §20) reads the DINO-Depth export's
``train_meta`` from every form ``--ckpt`` takes: a .pth, the HF folder of ``pretrain.export --format hf``,
and a hub id (its snapshot; the resolver is mocked, tests never touch the hub)."""

import pytest
import torch

from detect.encoders import load_depth_encoder
from detect.pipeline.single_view import depth_training_data
from shared import hub

SAW_TEST = {"data": {"splits": ["train", "test"], "sources": ["mvtec3d"]}}
TRAIN_ONLY = {"data": {"splits": ["train"], "sources": ["mvtec3d"]}}


@pytest.fixture
def exports(tmp_path):
    from pretrain.export import default_depth_input_norm, export_hf, write_export
    from shared.vit import create_vit

    torch.manual_seed(0)
    vit = create_vit("vit_small_patch14", embed_dim=48, depth=1, num_heads=2, img_size=28, in_chans=1)
    args = (vit.state_dict(), vit.cfg.to_dict(), default_depth_input_norm())
    return {"pth": write_export(tmp_path / "dd.pth", *args, SAW_TEST, safetensors=False),
            "hf": export_hf(*args, SAW_TEST, tmp_path / "hf"),
            "hf_train_only": export_hf(*args, TRAIN_ONLY, tmp_path / "hf_train")}


def test_every_ckpt_form_keeps_the_transductive_warning(exports, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "_snapshot_download", lambda repo_id, revision, local_files_only: str(exports["hf"]))
    for ckpt in (str(exports["pth"]), str(exports["hf"]), "user/dinodepth-vits14"):
        weights = load_depth_encoder(ckpt).info.weights  # what the runner passes: the resolved export
        with pytest.warns(UserWarning, match=f"checkpoint {ckpt} records pretraining splits.*transductive"):
            record = depth_training_data(weights, "mvtec3d", ckpt)
        assert record == {"splits": ["train", "test"], "sources": ["mvtec3d"], "transductive_risk": True}
    assert "transductive_risk" not in depth_training_data(str(exports["hf_train_only"]), "mvtec3d")
