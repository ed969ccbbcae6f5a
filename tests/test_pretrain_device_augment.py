"""Depth crops on the training device (pretrain/device_augment.py) vs the numpy reference (issue 21)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_pretrain_utils import MemoryTable, synthetic_depth, tiny_config

from pretrain import augment
from pretrain.augment import (
    CropParams,
    crop_valid_fraction_reaches,
    depth_crop_params,
    depth_multicrop,
    warp_crop,
)
from pretrain.config import AugConfig, CropsConfig
from pretrain.device_augment import (
    DevicePrefetcher,
    pack_sources,
    params_rows,
    resolve_warp,
    warp_batch,
    warp_crops,
)
from pretrain.loader import MultiCropBatches, build_loader


def _map(seed: int, shape=(61, 83)) -> tuple[np.ndarray, np.ndarray]:
    """Nearness-like map with holes, sharp steps (edge rule) and values near the clamp's bounds."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.1, 1.0, shape).astype(np.float32)
    x[:, shape[1] // 2:] += 0.3  # a depth step across the map
    x = np.minimum(x, 1.0).astype(np.float32)
    valid = rng.random(shape) > 0.25
    valid[: shape[0] // 3, : shape[1] // 3] = False  # a large hole
    x[~valid] = 0.0
    return x, valid


def _random_params(rng: np.random.Generator, H: int, W: int) -> CropParams:
    return CropParams(cy=float(rng.uniform(-5, H + 5)), cx=float(rng.uniform(-5, W + 5)),
                      h=float(rng.uniform(3, 1.3 * H)), w=float(rng.uniform(3, 1.3 * W)),
                      angle_deg=float(rng.choice([0.0, rng.uniform(-180, 180)])), rot90_k=int(rng.integers(0, 4)),
                      hflip=bool(rng.random() < 0.5), vflip=bool(rng.random() < 0.5))


@pytest.mark.parametrize("interp", ["masked_bilinear", "nearest"])
def test_single_crops_bit_identical_to_numpy(interp):
    """The same parameters give the same crop and validity bit for bit (CPU torch vs numpy), with
    maps of different sizes packed in one batch, windows partly outside, rotations, flips, odd sizes."""
    rng = np.random.default_rng(1)
    maps = [_map(0), _map(1, (40, 57)), _map(2, (90, 33))]
    for size in (28, 31):
        params, samples = [], []
        for _ in range(40):
            k = int(rng.integers(len(maps)))
            params.append(_random_params(rng, *maps[k][0].shape))
            samples.append(k)
        batch = pack_sources([m for m, _ in maps], [v for _, v in maps], [[p] for p in params[:3]],
                             [[] for _ in maps], size, size)
        crops, valid = warp_crops(batch["sources"], batch["sources_valid"], batch["source_shapes"],
                                  torch.from_numpy(params_rows(params, size, samples)), size, interp, 0.05,
                                  chunk_pixels=5 * size * size)  # several chunks
        edges = 0
        for i, (p, k) in enumerate(zip(params, samples)):
            x, v = maps[k]
            ref, ref_valid = warp_crop(x[None], v, p, size, interp, 0.05)
            assert crops[i].numpy().tobytes() == ref.tobytes(), (i, p)
            assert np.array_equal(valid[i].numpy(), ref_valid), (i, p)
            edges += int(ref_valid.any())
        assert edges > 20  # most crops see valid pixels: the comparison is not between empty crops


def test_validity_decision_without_warping_matches_the_warp():
    rng = np.random.default_rng(2)
    x, valid = _map(3)
    decided = {True: 0, False: 0}
    for interp in ("masked_bilinear", "nearest"):
        for _ in range(60):
            p = _random_params(rng, *x.shape)
            _, crop_valid = warp_crop(x[None], valid, p, 30, interp)
            fraction = crop_valid.mean()
            # thresholds at, just above and just below the exact fraction, and far away
            for t in (fraction, np.nextafter(fraction, 2), np.nextafter(fraction, -1), 0.05, 0.9):
                expected = bool(crop_valid.mean() >= t)
                assert crop_valid_fraction_reaches(valid, p, 30, interp, float(t)) == expected
                decided[expected] += 1
    assert decided[True] and decided[False]


@pytest.mark.parametrize("aug", [AugConfig(), AugConfig(rot90=True), AugConfig(interp="nearest"),
                                 AugConfig(rot_fill="shrink"), AugConfig(min_crop_valid=0.8)],
                         ids=["default", "rot90", "nearest", "shrink", "redraws"])
def test_sample_crops_bit_identical_including_redraws(aug):
    x, valid = _map(4)
    crops = CropsConfig(global_crops_size=42, local_crops_number=3, local_crops_size=28)
    for seed in range(4):
        reference = depth_multicrop(x, valid, crops, aug, np.random.default_rng(seed))
        g, loc = depth_crop_params(valid, crops, aug, np.random.default_rng(seed))
        batch = warp_batch(pack_sources([x], [valid], [g], [loc], 42, 28), aug.interp, aug.edge_thresh)
        assert batch["global_crops"][:, None].numpy().tobytes() == reference.global_crops[:, None].tobytes()
        assert batch["local_crops"].numpy().tobytes() == reference.local_crops.tobytes()
        assert np.array_equal(batch["global_valid"].numpy(), reference.global_valid)
        assert np.array_equal(batch["local_valid"].numpy(), reference.local_valid)


def test_redraws_happen_in_the_redraw_case():
    """The redraw decision is exercised: with a high minimum valid fraction the generator is advanced
    by rejected tries, so the kept parameters differ from the first draws."""
    x, valid = _map(4)
    crops = CropsConfig(global_crops_size=42, local_crops_number=3, local_crops_size=28)
    first = depth_crop_params(valid, crops, AugConfig(min_crop_valid=0.0), np.random.default_rng(0))
    redrawn = depth_crop_params(valid, crops, AugConfig(min_crop_valid=0.8), np.random.default_rng(0))
    assert first != redrawn


def _table_with_unusable() -> MemoryTable:
    maps = [synthetic_depth(i, size=(60 + 4 * i, 70 + 3 * i)) for i in range(7)]
    maps[1] = np.full_like(maps[1], np.nan)  # no valid pixel: skipped and replaced
    maps[4] = np.full_like(maps[4], 3.0)  # degenerate: skipped and replaced
    return MemoryTable(maps)


def _assert_same_batch(numpy_batch: dict, device_batch: dict) -> None:
    for key in ("global_crops", "local_crops"):
        a, b = numpy_batch[key], device_batch[key].cpu()
        assert a.shape == b.shape and a.dtype == b.dtype
        assert a.numpy().tobytes() == b.numpy().tobytes(), key
    for key in ("masks", "mask_indices", "mask_weights", "positions"):
        assert torch.equal(numpy_batch[key], device_batch[key].cpu()), key
    for key in ("keys", "skipped", "iteration", "batch_size"):
        assert numpy_batch[key] == device_batch[key], key


def test_whole_batches_identical_with_skipped_samples_and_workers(tmp_path):
    table = _table_with_unusable()
    cfg = tiny_config(tmp_path, **{"crops.local_crops_number": 3, "aug.min_crop_valid": 0.5})
    reference = MultiCropBatches(cfg, table, 6)
    device = MultiCropBatches(cfg, table, 6, warp="device")
    raw = device[0]
    assert "global_crops" not in raw and raw["global_params"].shape == (12, 11)
    numpy_batches = list(build_loader(reference, 0, 3, num_workers=0))
    assert sum(b["skipped"] for b in numpy_batches) >= 2  # the replacement path is exercised
    via_workers = DevicePrefetcher(build_loader(device, 0, 3, num_workers=2), "cpu", cfg.aug.interp, cfg.aug.edge_thresh)
    batches = list(via_workers)
    assert [b["iteration"] for b in batches] == [0, 1, 2]
    for a, b in zip(numpy_batches, batches):
        _assert_same_batch(a, b)


def test_warp_choice_and_errors(tmp_path):
    assert resolve_warp("auto", "cpu") == "numpy"
    assert resolve_warp("auto", "cuda") == "device"
    assert resolve_warp("auto", "cuda", modality="image") == "numpy"
    assert resolve_warp("device", "cpu") == "device"
    with pytest.raises(ValueError, match="depth crops only"):
        resolve_warp("device", "cuda", modality="image")
    cfg = tiny_config(tmp_path, **{"data.modality": "image"})
    with pytest.raises(ValueError, match="image mode"):
        MultiCropBatches(cfg, MemoryTable([synthetic_depth(0)]), 2, warp="device")
    assert tiny_config(tmp_path).aug.warp_on == "auto"


def test_numpy_crop_path_unchanged_by_the_refactor():
    """augment.resample after moving its tap/weight code into helpers: same crops as warp_crop on a
    full (S, S) grid evaluated the straightforward way (source_coordinates)."""
    x, valid = _map(5)
    p = CropParams(30.5, 40.25, 50.0, 44.0, 33.0, 0, True, False)
    ys, xs = augment.source_coordinates(p, 32)
    a = augment.resample(x[None], valid, ys, xs)
    b = warp_crop(x[None], valid, p, 32)
    assert a[0].tobytes() == b[0].tobytes() and np.array_equal(a[1], b[1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_crops_within_two_ulp_of_cpu():
    rng = np.random.default_rng(7)
    maps = [_map(0, (300, 420)), _map(1, (256, 256))]
    params = [_random_params(rng, *maps[i % 2][0].shape) for i in range(64)]
    samples = [i % 2 for i in range(64)]
    batch = pack_sources([m for m, _ in maps], [v for _, v in maps], [[p] for p in params[:2]], [[], []], 98, 98)
    rows = torch.from_numpy(params_rows(params, 98, samples))
    cpu, cpu_valid = warp_crops(batch["sources"], batch["sources_valid"], batch["source_shapes"], rows, 98)
    cuda = {k: v.cuda() for k, v in batch.items() if torch.is_tensor(v)}
    rows_cuda = rows.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # the warp never waits for the device
    try:
        gpu, gpu_valid = warp_crops(cuda["sources"], cuda["sources_valid"], cuda["source_shapes"], rows_cuda, 98)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(cpu_valid, gpu_valid.cpu())
    ulp = torch.abs(cpu.view(torch.int32).long() - gpu.cpu().view(torch.int32).long())
    assert int(ulp.max()) <= 2


def test_bench_augment_device_variant(tmp_path, monkeypatch):
    """bench/bench_augment.py's device-path code at toy size: worker rate, stage split, traffic count,
    and the device path's crops equal to the numpy path's on the benchmark's shards."""
    from bench import bench_augment
    from shared import memory

    monkeypatch.setattr(memory, "keep_freed_memory", lambda *a, **k: False)  # no allocator change in pytest
    shards = bench_augment.make_shards(tmp_path, quick=True)
    assert bench_augment.device_path_identical(shards, ["eyecandies"], 2)
    row = bench_augment.loader_worker(str(shards), "eyecandies", "device", 2, 1)
    assert row["samples"] == 2 and row["cpu_s_per_sample"] > 0 and row["warp_cpu_s_per_sample"] > 0
    assert set(row["stages_ms"]) == {"read", "normalise", "params", "pack"}
    assert row["bytes_per_sample"] == 5 * 128 * 128  # float32 map + bool validity
    # at least the crops' output (float32 + bool) is written once
    n_out = 2 * 224 ** 2 + 8 * 98 ** 2
    assert row["warp_traffic_per_sample"] > 5 * n_out
