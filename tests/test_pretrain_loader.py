"""Indexed multi-crop stream over the real shard table (dino_depth.md §3, §9)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_pretrain_utils import (  # noqa: F401
    MemoryTable,
    single_thread,
    synthetic_depth,
    tiny_config,
    write_depth_folder,
    write_shards,
)

from pretrain.data import SampleTable
from pretrain.loader import (
    FolderTable,
    MultiCropBatches,
    build_loader,
    crops_for_position,
    open_sample_table,
    rank_positions,
    stream_order,
)


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("pretrain_shards"), n=10)


def test_rank_positions_partition_the_global_batch():
    G = 8
    single = rank_positions(3, G)
    assert single == list(range(24, 32))
    ranks = [rank_positions(3, G, r, 2) for r in (0, 1)]
    assert ranks[0] == [24, 26, 28, 30] and ranks[1] == [25, 27, 29, 31]
    assert sorted(ranks[0] + ranks[1]) == single


def test_each_pass_visits_every_sample_once():
    order = stream_order(MemoryTable([synthetic_depth(i) for i in range(7)]), seed=3)
    first, second = [order(q) for q in range(7)], [order(q) for q in range(7, 14)]
    assert sorted(first) == sorted(second) == list(range(7)) and first != second


def test_batches_from_real_shards_are_crop_major(shard_dir, tmp_path):
    cfg = tiny_config(tmp_path, **{"data.shards": f"[{shard_dir}]", "data.splits": "[train]"})
    table = open_sample_table(cfg)
    assert isinstance(table, SampleTable) and len(table) == 10
    ds = MultiCropBatches(cfg, table, global_batch_size=4)
    batch = ds[2]
    B = 4
    assert batch["global_crops"].shape == (2 * B, 1, 56, 56)
    assert batch["local_crops"].shape == (8 * B, 1, 28, 28)
    assert batch["masks"].shape == (2 * B, 16)  # global crops only: locals are never masked
    assert int((batch["masks"].sum(1) > 0).sum()) == B
    assert batch["positions"].tolist() == [8, 9, 10, 11]
    assert batch["n_masked"] == int(batch["masks"].sum()) == len(batch["mask_indices"])
    for k, q in enumerate(batch["positions"].tolist()):
        crops, key, _ = crops_for_position(cfg, table, ds.order, q)
        assert key == batch["keys"][k]
        for c in range(2):
            assert torch.equal(batch["global_crops"][c * B + k], torch.from_numpy(crops.global_crops[c]))
        for j in range(8):
            assert torch.equal(batch["local_crops"][j * B + k], torch.from_numpy(crops.local_crops[j]))
    g = batch["global_crops"]
    assert bool(((g == 0) | ((g >= 0.1) & (g <= 1))).all())


def test_same_keys_and_crops_for_one_and_two_ranks(shard_dir, tmp_path):
    cfg = tiny_config(tmp_path, **{"data.shards": f"[{shard_dir}]", "data.splits": "[train]"})
    table = open_sample_table(cfg)
    single = MultiCropBatches(cfg, table, 4)[5]
    ranks = [MultiCropBatches(cfg, table, 4, rank=r, world_size=2)[5] for r in (0, 1)]
    keys = [None] * 4
    for r, b in enumerate(ranks):
        for k, key in enumerate(b["keys"]):
            keys[r + 2 * k] = key
            for c in range(2):
                assert torch.equal(b["global_crops"][c * 2 + k], single["global_crops"][c * 4 + r + 2 * k])
                assert torch.equal(b["masks"][c * 2 + k], single["masks"][c * 4 + r + 2 * k])
    assert keys == single["keys"]


def test_worker_count_does_not_change_batches(tmp_path):
    cfg = tiny_config(tmp_path, **{"crops.local_crops_number": 2})
    ds = MultiCropBatches(cfg, MemoryTable([synthetic_depth(i) for i in range(6)]), 4)
    inline = list(build_loader(ds, 3, 6, num_workers=0))
    workers = list(build_loader(ds, 3, 6, num_workers=2))
    assert [b["iteration"] for b in workers] == [3, 4, 5]
    for a, b in zip(inline, workers):
        for key in ("global_crops", "local_crops", "masks", "mask_indices"):
            assert torch.equal(a[key], b[key])
        assert a["keys"] == b["keys"]


def test_unusable_samples_are_skipped_and_counted(tmp_path):
    maps = [synthetic_depth(i) for i in range(6)]
    maps[1] = np.full_like(maps[1], np.nan)  # no valid pixel
    maps[4] = np.full_like(maps[4], 3.0)  # constant: degenerate
    table = MemoryTable(maps)
    cfg = tiny_config(tmp_path)
    ds = MultiCropBatches(cfg, table, 6)
    batch = ds[0]
    assert batch["skipped"] >= 2
    assert not {table.key(1), table.key(4)} & set(batch["keys"])
    assert torch.isfinite(batch["global_crops"]).all()


def test_folder_tables(tmp_path):
    folder = write_depth_folder(tmp_path / "d" / "sub", n=3)
    table = FolderTable.from_glob(str(tmp_path / "d" / "**" / "*.npy"))
    assert len(table) == 3 and table.key(0) == "folder/scan_000"
    depth, meta = table.read(1)
    assert depth.dtype == np.float32 and meta["kind"] == "metric_z"
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(f"d/sub/{p.name}" for p in sorted(folder.iterdir())) + "\n")
    assert FolderTable.from_list(listing).fingerprint == table.fingerprint
    from PIL import Image

    img_dir = tmp_path / "img"
    img_dir.mkdir()
    Image.fromarray((np.arange(64 * 80) % 256).astype(np.uint8).reshape(64, 80)).save(img_dir / "a.png")
    img_table = FolderTable.from_glob(str(img_dir / "*.png"), modality="image", in_chans=3)
    image, meta = img_table.read(0)
    assert image.shape == (64, 80, 3) and image.dtype == np.uint8 and meta["kind"] == "image"
    with pytest.raises(ValueError, match="accepts"):
        FolderTable([img_dir / "a.png"], modality="depth")
