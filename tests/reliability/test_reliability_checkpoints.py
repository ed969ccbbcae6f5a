"""Untrusted checkpoints: no loading path ever executes pickled code.

Every loader goes through :func:`shared.checkpoint.load_checkpoint` (``torch.load(weights_only=True)``)
or safetensors. A crafted pickle whose unpickling would run a shell command is refused with a clear
error at each entry point a user can hand a file to: the trainer's resume, the export CLI, the
DINO-Depth encoder of detection, image-encoder weights; the command never runs.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch
from test_pretrain_utils import memory_table, single_thread, tiny_config  # noqa: F401

from shared.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


class Exploit:
    """Unpickling this runs ``touch <marker>`` (what a malicious checkpoint would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def evil(tmp_path) -> tuple[Path, Path]:
    """A .pth file that looks like a training checkpoint / export, with an exploit inside."""
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    payload = {"format_version": 1, "iteration": 3, "student": {"w": torch.zeros(2)},
               "model": {"cls_token": torch.zeros(1, 1, 8)}, "config": {"x": Exploit(marker)}}
    with open(path, "wb") as fh:
        torch.save(payload, fh, pickle_module=pickle)
    return path, marker


def test_load_checkpoint_refuses_the_pickle_and_never_runs_it(evil):
    path, marker = evil
    with pytest.raises(CheckpointError, match=r"refusing to load .*evil\.pth.*would execute arbitrary code"):
        load_checkpoint(path)
    assert not marker.exists()
    # torch's own default would have run it: the file really is malicious
    if tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 6):
        with pytest.raises(pickle.UnpicklingError):
            torch.load(path)  # weights_only=True is the default from torch 2.6
    assert not marker.exists()


def test_trainer_resume_refuses_a_malicious_checkpoint(evil, tmp_path, capfd, monkeypatch):
    from pretrain import train as train_mod

    path, marker = evil
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    path.rename(run / "checkpoints" / "checkpoint_00000003.pth")  # planted in a run directory
    (run / "checkpoints" / "latest").write_text("checkpoint_00000003.pth\n")
    monkeypatch.setattr(train_mod, "open_sample_table", lambda cfg: memory_table(4))
    code, _ = train_mod.run_job(tiny_config(run, **{"data.glob": str(tmp_path / "*.npy")}))  # auto-resume
    assert code == train_mod.EXIT_ERROR
    err = capfd.readouterr().err
    assert "refusing to load" in err and "checkpoint_00000003.pth" in err and "Traceback" not in err
    assert not marker.exists()


def test_export_cli_refuses_a_malicious_checkpoint(evil, tmp_path, capsys):
    from pretrain.export import main

    path, marker = evil
    assert main(["--ckpt", str(path), "--out", str(tmp_path / "out.pth")]) == 1
    assert "refusing to load" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "out.pth").exists()


def test_detection_encoders_refuse_a_malicious_file(evil):
    from detect.encoders import EncoderError, load_depth_encoder, read_encoder_weights

    path, marker = evil
    with pytest.raises(EncoderError, match="refusing to load"):
        load_depth_encoder(path)
    with pytest.raises(EncoderError, match="refusing to load"):
        read_encoder_weights(path)
    assert not marker.exists()


def test_safetensors_carry_no_code_and_corrupt_headers_are_clear_errors(tmp_path, evil):
    from shared.checkpoint import save_safetensors

    good = save_safetensors({"w": torch.arange(6.0)}, tmp_path / "m.safetensors", {"arch": {"depth": 2}})
    assert load_checkpoint(good)["arch"] == {"depth": 2}
    data = good.read_bytes()
    cases = {
        "huge_header": struct.pack("<Q", 1 << 40) + data[8:],  # a header length beyond the file
        "bad_json": struct.pack("<Q", 8) + b"{nojson!" + data[16:],
        "truncated": data[: len(data) - 10],
        "a_pickle_renamed": evil[0].read_bytes(),
    }
    for name, blob in cases.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(blob)
        with pytest.raises(CheckpointError, match=rf"{name}\.safetensors"):
            load_checkpoint(path)
    assert not evil[1].exists()


def test_foreign_objects_are_refused_even_when_harmless(tmp_path):
    """weights_only admits tensors, containers and plain values: a custom class or a numpy array in a
    checkpoint is refused with an explanation (our checkpoints never hold them)."""
    import numpy as np

    path = tmp_path / "numpy.pth"
    with open(path, "wb") as fh:
        torch.save({"rng": np.random.get_state()}, fh)
    with pytest.raises(CheckpointError, match="not a plain weights file"):
        load_checkpoint(path)
    ok = save_checkpoint({"rng": [1, 2], "t": torch.ones(1), "meta": json.loads('{"a": null}')}, tmp_path / "ok.pth")
    assert load_checkpoint(ok)["rng"] == [1, 2]
