"""Atomic checkpoint writes, safe loading, safetensors and architecture records."""

import os
import pickle
from pathlib import Path

import pytest
import torch

from shared.checkpoint import (
    CheckpointError,
    check_state_dict_compat,
    load_checkpoint,
    save_checkpoint,
    save_model,
    verify_sha256_sidecar,
    write_sha256_sidecar,
)
from shared.io import atomic_open
from shared.vit import create_vit, vit_from_config


def _tiny_vit(**kw):
    return create_vit("vit_small_patch14", embed_dim=32, depth=2, num_heads=2, img_size=28, in_chans=1, **kw)


def test_save_load_roundtrip_weights_only(tmp_path: Path):
    obj = {"iteration": 3, "model": {"w": torch.randn(3, 4)}, "rng": [1, 2, 3], "name": "x"}
    path = save_checkpoint(obj, tmp_path / "ckpt.pth")
    back = load_checkpoint(path)
    assert back["iteration"] == 3 and back["name"] == "x"
    assert torch.equal(back["model"]["w"], obj["model"]["w"])


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/_should_not_exist",))


def test_malicious_pickle_is_refused_and_never_executed(tmp_path: Path):
    marker = Path("/tmp/_should_not_exist")
    marker.unlink(missing_ok=True)
    path = tmp_path / "evil.pth"
    with open(path, "wb") as fh:
        torch.save({"model": _Exploit()}, fh, pickle_module=pickle)
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_checkpoint(path)
    assert not marker.exists()


def test_truncated_and_missing_checkpoints_are_clear_errors(tmp_path: Path):
    path = save_checkpoint({"model": {"w": torch.randn(100, 100)}}, tmp_path / "c.pth")
    data = path.read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.pth"):
        load_checkpoint(tmp_path / "cut.pth")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "none.pth")


def test_failed_write_leaves_previous_file_intact(tmp_path: Path):
    path = save_checkpoint({"v": torch.tensor(1)}, tmp_path / "c.pth")
    with pytest.raises(OSError):
        with atomic_open(path, "wb") as fh:
            fh.write(b"partial")
            raise OSError(28, "No space left on device")  # simulated disk full mid-write
    assert load_checkpoint(path)["v"].item() == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pth"]  # no temp file left


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_model_with_arch_record_rebuilds_without_guessing(tmp_path: Path, suffix):
    model = _tiny_vit(num_register_tokens=2)
    path = save_model(model.state_dict(), tmp_path / f"m{suffix}", model.arch_record(), note="hello")
    loaded = load_checkpoint(path)
    rebuilt = vit_from_config(loaded["arch"])
    rebuilt.load_state_dict(loaded["model"])
    assert loaded["note"] == "hello"
    x = torch.randn(2, 1, 28, 28)
    model.eval(), rebuilt.eval()
    with torch.no_grad():
        assert torch.equal(model(x)["x_norm_patchtokens"], rebuilt(x)["x_norm_patchtokens"])


def test_mismatch_error_lists_missing_unexpected_and_shapes():
    small, other = _tiny_vit(), create_vit("vit_small_patch14", embed_dim=32, depth=3, num_heads=2, img_size=42)
    with pytest.raises(CheckpointError) as err:
        check_state_dict_compat(small.state_dict(), other.state_dict(), "other.pth")
    msg = str(err.value)
    assert "other.pth" in msg and "unexpected keys" in msg and "blocks.2.norm1.weight" in msg
    assert "shape mismatches" in msg and "pos_embed" in msg
    sd = dict(small.state_dict())
    sd.pop("norm.weight")
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): norm.weight"):
        check_state_dict_compat(small.state_dict(), sd)


def test_sha256_sidecar(tmp_path: Path):
    path = save_checkpoint({"v": torch.tensor(1)}, tmp_path / "c.pth")
    assert verify_sha256_sidecar(path) is None
    write_sha256_sidecar(path)
    assert verify_sha256_sidecar(path) is True
    save_checkpoint({"v": torch.tensor(2)}, path)
    assert verify_sha256_sidecar(path) is False


def test_atomic_files_get_normal_permissions(tmp_path: Path):
    old = os.umask(0o022)
    try:
        with atomic_open(tmp_path / "f.bin", "wb", fsync=False) as fh:
            fh.write(b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "f.bin").stat().st_mode & 0o777 == 0o644
