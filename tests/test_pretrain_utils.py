"""Shared helpers of the pretraining tests: synthetic depth maps, an in-memory sample table and the
spec's tiny config (``dino_depth.md`` §16). Imported by the other ``test_pretrain_*`` modules."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain.config import PretrainConfig
from shared.config import load_config


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny models run fastest on one intra-op thread (and do not fight over a shared machine).
    Import this fixture into a test module to make it apply there."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def synthetic_depth(seed: int, size: tuple[int, int] = (96, 112), holes: bool = True) -> np.ndarray:
    """Metric z map (mm): tilted plane + a few bumps and dents + NaN holes (invalid pixels)."""
    rng = np.random.default_rng(seed)
    H, W = size
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    z = 500 + rng.uniform(-0.2, 0.2) * xx + rng.uniform(-0.2, 0.2) * yy
    for _ in range(rng.integers(1, 4)):
        cy, cx = rng.uniform(0, H), rng.uniform(0, W)
        r = rng.uniform(6, 25)
        z -= rng.uniform(-15, 30) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
    if holes:
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.integers(0, H), rng.integers(0, W)
            z[max(0, cy - 5):cy + 5, max(0, cx - 8):cx + 8] = np.nan
    return z.astype(np.float32)


class MemoryTable:
    """In-memory implementation of the SampleTable contract (len, key, read, fingerprint)."""

    def __init__(self, maps: list[np.ndarray], kind: str = "metric_z") -> None:
        self.maps = maps
        self.kind = kind

    def __len__(self) -> int:
        return len(self.maps)

    def key(self, i: int) -> str:
        return f"memory/synthetic/train/{i:04d}"

    def read(self, i: int) -> tuple[np.ndarray, dict]:
        return self.maps[i].copy(), {"key": self.key(i), "kind": self.kind}

    @property
    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for m in self.maps:
            digest.update(np.ascontiguousarray(m).tobytes())
        return digest.hexdigest()


def memory_table(n: int = 12, seed: int = 0) -> MemoryTable:
    return MemoryTable([synthetic_depth(seed + i) for i in range(n)])


def write_depth_folder(folder: Path, n: int = 12, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        np.save(folder / f"scan_{i:03d}.npy", synthetic_depth(seed + i))
    return folder


def write_shards(tmp: Path, n: int = 12, seed: int = 0) -> Path:
    """Synthetic depth maps → webdataset shards through the real ``data_prep`` folder converter."""
    from data_prep.convert import convert

    folder = write_depth_folder(tmp / "maps", n=n, seed=seed)
    out = tmp / "shards"
    summary = convert("folder", folder, out, folder_kind="metric_z", folder_unit="mm", folder_glob="*.npy",
                      splits="train", progress=False)
    assert summary["ok"], summary
    return out


def tiny_config(output_dir: Path | str, **extra: str) -> PretrainConfig:
    """§16 tiny config: in_chans 1, patch 14, embed 48, depth 2, heads 2, globals 56 px, locals 28 px,
    K = 64, bottleneck 16, hidden 32, B = 4 (fp32 CPU, no workers)."""
    overrides = {
        "student.img_size": 56, "student.embed_dim": 48, "student.depth": 2, "student.num_heads": 2,
        "student.drop_path_rate": 0.1,
        "dino.head_n_prototypes": 64, "dino.head_bottleneck_dim": 16, "dino.head_hidden_dim": 32,
        "crops.global_crops_size": 56, "crops.local_crops_size": 28,
        "train.batch_size_per_gpu": 4, "train.epoch_length": 10, "optim.epochs": 1, "optim.warmup_epochs": 0.3,
        "optim.freeze_last_layer_epochs": 0.2, "teacher.warmup_teacher_temp_epochs": 0.5,
        "train.num_workers": 0, "train.progress": False, "train.eval_period": 0, "train.export_period": 0,
        "train.ckpt_period": 1000, "train.log_period": 1, "train.device": "cpu",
        "train.output_dir": str(output_dir),
    }
    overrides.update(extra)
    return load_config(PretrainConfig, None, [f"{k}={v}" for k, v in overrides.items()])


def test_synthetic_depth_has_holes_and_relief():
    z = synthetic_depth(3)
    assert np.isnan(z).any() and np.isfinite(z).mean() > 0.5
    assert np.nanmax(z) - np.nanmin(z) > 1.0


def test_memory_table_contract():
    table = memory_table(3)
    depth, meta = table.read(1)
    assert len(table) == 3 and meta["kind"] == "metric_z" and depth.dtype == np.float32
    assert table.key(2).endswith("0002") and len(table.fingerprint) == 64
