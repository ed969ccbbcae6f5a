"""Teacher export → reload (dino_depth.md §11, §16)."""

from __future__ import annotations

import pytest
import torch
from test_pretrain_utils import memory_table, single_thread, tiny_config  # noqa: F401

from pretrain.export import export_from_checkpoint, load_dinodepth, load_upstream_teacher, main
from pretrain.train import Trainer
from shared.checkpoint import CheckpointError, load_checkpoint
from shared.vit import create_vit


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("export_run")
    torch.set_num_threads(1)
    trainer = Trainer(tiny_config(run, **{"train.epoch_length": 2}), table=memory_table(4))
    trainer.run()
    return run, trainer


def test_export_reloads_and_gives_64x64_tokens_at_896(trained_run):
    run, trainer = trained_run
    model, input_norm = load_dinodepth(run / "dinodepth.pth")
    assert not model.training and model.cfg.in_chans == 1 and model.cfg.drop_path_rate == 0.0
    assert input_norm == {"modality": "depth", "mode": "nearness", "eps": 0.1, "pct": [0.5, 99.5], "invalid_value": 0.0}
    x = torch.rand(1, 1, 896, 896)
    with torch.no_grad():
        tokens, grid = model.get_patch_tokens(x)
        reference = trainer.teacher.backbone.eval().get_patch_tokens(x)[0]
    assert grid == (64, 64) and tokens.shape == (1, 4096, 48)
    assert torch.allclose(tokens, reference, atol=1e-6)  # the export is the teacher backbone


def test_export_file_format(trained_run):
    run, _ = trained_run
    obj = load_checkpoint(run / "dinodepth.pth")  # weights_only=True
    assert obj["format_version"] == 1
    assert set(obj["model"]) >= {"cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.1.ls2.gamma", "norm.bias"}
    assert not any(k.startswith(("backbone.", "dino_head", "blocks.0.0")) for k in obj["model"])
    cfg = obj["config"]
    assert cfg["in_chans"] == 1 and cfg["patch_size"] == 14 and cfg["embed_dim"] == 48 and cfg["img_size"] == 56
    meta = obj["train_meta"]
    assert meta["iteration"] == 2 and meta["modality"] == "depth" and len(meta["fingerprint"]) == 64
    assert "code_version" in meta and meta["config"]["student"]["embed_dim"] == 48
    st_model, st_norm = load_dinodepth(run / "dinodepth.safetensors")
    assert st_norm["mode"] == "nearness"
    pth_model, _ = load_dinodepth(run / "dinodepth.pth")
    for (k, a), (_, b) in zip(pth_model.state_dict().items(), st_model.state_dict().items()):
        assert torch.equal(a, b), k


def test_export_cli_and_checksum(trained_run, tmp_path):
    run, _ = trained_run
    out = tmp_path / "exported.pth"
    assert main(["--ckpt", str(run), "--out", str(out)]) == 0
    assert (tmp_path / "exported.pth.sha256").is_file() and (tmp_path / "exported.safetensors").is_file()
    a, _ = load_dinodepth(out)
    b, _ = load_dinodepth(run / "dinodepth.pth")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    data = bytearray(out.read_bytes())
    data[-10] ^= 0xFF
    out.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_dinodepth(out)
    with pytest.raises(CheckpointError, match="not a DINO-Depth export"):
        load_dinodepth(run / "checkpoints" / "checkpoint_00000002.pth", verify=False)


def test_upstream_teacher_checkpoint_loader(tmp_path):
    torch.manual_seed(0)
    backbone = create_vit("vit_small_patch14", embed_dim=64, depth=2, num_heads=1, img_size=56, in_chans=1).eval()
    # Upstream layout: {"teacher": {"backbone.*", "dino_head.*"}} with chunked blocks.{chunk}.{i}.
    teacher = {f"backbone.{k.replace('blocks.', 'blocks.0.', 1)}": v for k, v in backbone.state_dict().items()}
    teacher["dino_head.mlp.0.weight"] = torch.zeros(4, 64)
    path = tmp_path / "teacher_checkpoint.pth"
    torch.save({"teacher": teacher, "iteration": 7}, path)
    model = load_upstream_teacher(path)
    x = torch.rand(2, 1, 56, 56)
    with torch.no_grad():
        assert torch.allclose(model(x)["x_norm_patchtokens"], backbone(x)["x_norm_patchtokens"], atol=1e-6)
    out = export_from_checkpoint(path, tmp_path / "converted.pth", safetensors=False)
    converted, norm = load_dinodepth(out)
    assert converted.cfg.embed_dim == 64 and norm["modality"] == "depth"
