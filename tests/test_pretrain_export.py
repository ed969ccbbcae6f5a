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


# -- ecosystem formats: Hugging Face and timm folders ------------------------------------------------------
def _tiny_export(tmp_path, registers: int = 0):
    """A random ViT-S/14-shaped (but tiny) DINO-Depth export with non-trivial LayerScale and tokens."""
    from pretrain.export import write_export
    from shared.encoder_export import default_depth_input_norm

    torch.manual_seed(registers)
    vit = create_vit("vit_small_patch14", embed_dim=48, depth=2, num_heads=2, img_size=56, in_chans=1,
                     num_register_tokens=registers)
    with torch.no_grad():
        for name, p in vit.named_parameters():
            if name.endswith("gamma") or name in ("cls_token", "register_tokens"):
                p.normal_(0, 0.5)
    meta = {"iteration": 5, "data": {"preset": "B", "sources": ["mvtec3d"], "splits": ["train"]},
            "fingerprint": "f" * 64, "config": {"train": {"lr": 1e-4}}}
    path = write_export(tmp_path / "dd.pth", vit.state_dict(), vit.cfg.to_dict(), default_depth_input_norm(), meta)
    return path, vit.eval()


def _normalised_depth(n: int = 2, size: int = 56) -> torch.Tensor:
    """Real inputs: nearness-normalised depth maps (the encoder's input convention)."""
    import numpy as np

    from shared.depth import normalize_depth

    rng = np.random.default_rng(0)
    maps = []
    for _ in range(n):
        z = (0.6 + 0.05 * rng.random((size, size))).astype(np.float32)
        z[rng.random((size, size)) < 0.05] = np.nan
        x, _ = normalize_depth(z, "metric_z")[:2]
        maps.append(torch.from_numpy(x))
    return torch.stack(maps)[:, None]


@pytest.mark.parametrize("registers", [0, 4])
def test_hf_export_round_trips_through_automodel(tmp_path, monkeypatch, registers):
    from transformers import AutoModel

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    pth, vit = _tiny_export(tmp_path, registers)
    out = tmp_path / "hf"
    results = tmp_path / "results.json"
    results.write_text('{"mvtec3d I-AUROC": "0.81 [0.77, 0.85]"}')
    assert main(["--ckpt", str(pth), "--format", "hf", "--out", str(out), "--results", str(results)]) == 0
    cfg = __import__("json").loads((out / "config.json").read_text())
    assert cfg["num_channels"] == 1 and cfg["model_type"] == ("dinov2_with_registers" if registers else "dinov2")
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    card = (out / "README.md").read_text()
    for needle in ("Input normalisation", "nearness", "iterations 5", "preset B", "0.81 [0.77, 0.85]", "f" * 64):
        assert needle in card
    hf = AutoModel.from_pretrained(out).eval()
    assert type(hf).__name__ == ("Dinov2WithRegistersModel" if registers else "Dinov2Model")
    x = _normalised_depth()
    with torch.no_grad():
        theirs = hf(pixel_values=x).last_hidden_state[:, 1 + registers:]
        ours = vit.get_patch_tokens(x)[0]
    assert (theirs - ours).abs().max().item() <= 1e-4
    if not registers:  # same positional-embedding resizing at other sizes (bicubic to the grid, no antialias)
        x70 = _normalised_depth(1, 70)
        with torch.no_grad():
            diff = hf(pixel_values=x70).last_hidden_state[:, 1:] - vit.get_patch_tokens(x70)[0]
        assert diff.abs().max().item() <= 1e-4
    # our loader (and so detect --ckpt DIR) reads the folder back to the same encoder
    again, norm = load_dinodepth(out)
    assert norm["mode"] == "nearness" and again.cfg.num_register_tokens == registers
    with torch.no_grad():
        assert (again.get_patch_tokens(x)[0] - ours).abs().max().item() <= 1e-6


@pytest.mark.parametrize("registers", [0, 4])
def test_timm_export_loads_with_the_matching_timm_name(tmp_path, registers):
    import json

    import timm

    pth, vit = _tiny_export(tmp_path, registers)
    out = tmp_path / "timm"
    assert main(["--ckpt", str(pth), "--format", "timm", "--out", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    name = "vit_small_patch14_reg4_dinov2" if registers else "vit_small_patch14_dinov2"
    assert cfg["architecture"] == name and cfg["model_args"]["in_chans"] == 1
    x = _normalised_depth()
    with torch.no_grad():
        ours = vit.get_patch_tokens(x)[0]
        local = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
        by_name = timm.create_model(name, pretrained=True, in_chans=1, num_classes=0, img_size=56, embed_dim=48,
                                    depth=2, num_heads=2, pretrained_cfg_overlay={"file": str(out / "model.safetensors")}
                                    ).eval()
        for model in (local, by_name):
            theirs = model.forward_features(x)[:, 1 + registers:]
            assert (theirs - ours).abs().max().item() <= 1e-4
    assert "timm.create_model" in (out / "README.md").read_text()


def test_hf_export_refuses_what_transformers_cannot_express(tmp_path):
    from pretrain.export import export_hf
    from shared.encoder_export import default_depth_input_norm

    vit = create_vit("vit_small_patch14", embed_dim=48, depth=1, num_heads=2, img_size=28, in_chans=1, proj_bias=False)
    with pytest.raises(ValueError, match="proj_bias=False"):
        export_hf(vit.state_dict(), vit.cfg.to_dict(), default_depth_input_norm(), {}, tmp_path / "x")
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.tmp-*"))


def test_hf_export_of_a_training_run_carries_its_recipe(trained_run, tmp_path, monkeypatch):
    from transformers import AutoModel

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run, trainer = trained_run
    out = tmp_path / "hf"
    assert main(["--ckpt", str(run), "--format", "hf", "--out", str(out)]) == 0
    card = (out / "README.md").read_text()
    assert "iterations 2" in card and "resolved training config" in card and "No probe or detection results" in card
    hf = AutoModel.from_pretrained(out).eval()
    x = _normalised_depth(1, 56)
    with torch.no_grad():
        ours = trainer.teacher.backbone.eval().get_patch_tokens(x)[0]
        assert (hf(pixel_values=x).last_hidden_state[:, 1:] - ours).abs().max().item() <= 1e-4
    from shared.encoder_export import export_train_meta

    assert export_train_meta(out)["iteration"] == 2 == export_train_meta(run / "dinodepth.pth")["iteration"]
    assert export_train_meta(tmp_path / "missing") == {}
    assert main(["--ckpt", str(run), "--format", "hf", "--out", str(out)]) == 0  # replaces the folder
    assert not list(tmp_path.glob(".hf.*"))
