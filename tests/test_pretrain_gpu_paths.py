"""The GPU paths of the pretraining loop (issue 21 part B), exercised on CPU: the device warp inside the
loop, deterministic settings, host–device synchronisations per step, activation checkpointing,
per-rank RNG. Multi-rank cases (FSDP2 EMA, DCP, one-rank process group) are in
``test_distributed_gpu_paths.py``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from test_distributed_utils import EXACT
from test_pretrain_utils import memory_table, single_thread, tiny_config  # noqa: F401

from pretrain.train import Trainer, configure_determinism


def records(run: Path) -> dict[int, dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {r["iteration"]: r for r in map(json.loads, lines) if "event" not in r}


def test_warp_on_auto_is_numpy_on_cpu_and_device_warp_trains_identically(tmp_path):
    """warp_on=auto means numpy on CPU; the device warp run through DevicePrefetcher inside the loop
    gives bit-identical losses (its crops are bit-identical on CPU torch)."""
    over = {**EXACT, "train.epoch_length": 3, "train.log_period": 1, "train.ckpt_period": 0}
    auto = Trainer(tiny_config(tmp_path / "auto", **over), table=memory_table(8))
    assert auto.warp == "numpy" and auto.dataset.warp == "numpy"
    auto.run()
    device = Trainer(tiny_config(tmp_path / "dev", **over, **{"aug.warp_on": "device"}), table=memory_table(8))
    assert device.warp == "device" and device.dataset.warp == "device"
    device.run()
    a, b = records(tmp_path / "auto"), records(tmp_path / "dev")
    assert sorted(a) == sorted(b) == [0, 1, 2]
    for it in a:
        for key in ("dino_local", "dino_global", "ibot", "total"):
            assert a[it][key] == b[it][key], (it, key)


def test_deterministic_sets_cublas_workspace_and_disables_autotuning(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    was = torch.are_deterministic_algorithms_enabled()
    try:
        configure_determinism(False)
        assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ and torch.backends.cudnn.benchmark
        configure_determinism(True)
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert not torch.backends.cudnn.benchmark and torch.are_deterministic_algorithms_enabled()
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # a user's value is kept
        configure_determinism(True)
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    finally:
        torch.use_deterministic_algorithms(was)
