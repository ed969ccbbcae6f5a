"""Indexed, exactly resumable multi-crop data stream (``../shared/spec/dino_depth.md`` §9).

* The sample at global stream position q is ``π_p(q mod S)``, p = q div S (S = table size, π_p a
  permutation seeded by (seed, p)): an infinite stream of shuffled passes.
* Global iteration i consumes positions [i·G, (i+1)·G); rank r takes positions i·G + r + k·W (k < B).
* Crops of position q come from a generator keyed by (seed, q), masks of iteration i from
  (seed, i) (:mod:`pretrain.masking`). Data order, crops and masks are therefore identical for any
  number of loader workers and any W at equal G, and resuming at iteration i is exact.
* A sample whose map is degenerate or has a valid fraction below ``aug.min_sample_valid`` is
  skipped: the slot takes a replacement drawn from (seed, q, attempt) and the skip is counted.

One loader item is the whole crop-major batch of one iteration (built by one worker), so workers
never interleave samples of different iterations.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import os
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from pretrain.augment import MultiCrop, depth_crop_params, depth_multicrop, image_multicrop, image_to_float
from pretrain.config import PretrainConfig
from pretrain.device_augment import pack_sources
from pretrain.masking import assign_masks, collate_mask_fields, masked_upper_bound
from shared.depth import normalize_depth, stored_valid_range
from shared.memory import keep_freed_memory

_AUG_STREAM = 0x61756720  # "aug "
_REPLACE_STREAM = 0x7265706C  # "repl"
MAX_REPLACEMENTS = 100


class SampleSource(Protocol):
    """What the stream needs from a sample table (``pretrain.data.SampleTable`` or :class:`FolderTable`)."""

    def __len__(self) -> int: ...
    def key(self, i: int) -> str: ...
    def read(self, i: int) -> tuple[np.ndarray, dict]: ...
    @property
    def fingerprint(self) -> str: ...


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


# -- folder source ------------------------------------------------------------------------------------
DEPTH_SUFFIXES = (".npy",)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class FolderTable:
    """A sample table over plain files: ``.npy`` depth maps (float32, NaN = invalid) or 8-bit images.

    Keys follow the ``folder`` source rule of the shard schema: path relative to the common root,
    without extension, ``/`` → ``_``.
    """

    def __init__(self, paths: Sequence[str | os.PathLike], modality: str = "depth", kind: str = "metric_z",
                 in_chans: int = 1) -> None:
        paths = sorted(Path(p).resolve() for p in paths)
        if not paths:
            raise FileNotFoundError("the folder source matched no files")
        suffixes = DEPTH_SUFFIXES if modality == "depth" else IMAGE_SUFFIXES
        bad = [str(p) for p in paths if p.suffix.lower() not in suffixes]
        if bad:
            raise ValueError(f"{modality} folder source accepts {suffixes}; got e.g. {bad[:3]}")
        self.paths = paths
        self.modality = modality
        self.kind = kind
        self.in_chans = in_chans
        root = Path(os.path.commonpath([str(p.parent) for p in paths]))
        self._keys = ["folder/" + str(p.relative_to(root).with_suffix("")).replace(os.sep, "_") for p in paths]
        if len(set(self._keys)) != len(self._keys):
            raise ValueError("folder source has duplicate keys (same relative path with different extensions)")

    @classmethod
    def from_glob(cls, pattern: str, **kwargs) -> FolderTable:
        return cls([p for p in globlib.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p)], **kwargs)

    @classmethod
    def from_list(cls, list_file: str | os.PathLike, **kwargs) -> FolderTable:
        base = Path(list_file).resolve().parent
        lines = [ln.strip() for ln in Path(list_file).read_text().splitlines()]
        paths = [Path(ln) if Path(ln).is_absolute() else base / ln for ln in lines if ln and not ln.startswith("#")]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} listed file(s) do not exist, e.g. {missing[:3]}")
        return cls(paths, **kwargs)

    def __len__(self) -> int:
        return len(self.paths)

    def key(self, i: int) -> str:
        return self._keys[i]

    def read(self, i: int) -> tuple[np.ndarray, dict]:
        path = self.paths[i]
        if self.modality == "depth":
            depth = np.load(path, allow_pickle=False)
            if depth.ndim != 2:
                raise ValueError(f"{path}: depth map must be 2-D, got shape {depth.shape}")
            return depth.astype(np.float32, copy=False), {"key": self._keys[i], "kind": self.kind}
        from PIL import Image

        with Image.open(path) as im:
            im = im.convert("L" if self.in_chans == 1 else "RGB")
            array = np.asarray(im, dtype=np.uint8)
        return array, {"key": self._keys[i], "kind": "image"}

    @property
    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for key, path in zip(self._keys, self.paths):
            digest.update(f"{key}\t{path.stat().st_size}\n".encode())
        return digest.hexdigest()


def open_sample_table(cfg: PretrainConfig) -> SampleSource:
    """The sample table of ``cfg.data``: shards via ``pretrain.data.SampleTable``, or a folder source."""
    data = cfg.data
    if data.shards:
        if data.modality != "depth":
            raise ValueError("data.shards hold depth maps; image mode reads data.glob or data.list_file")
        from pretrain.data import SampleTable

        return SampleTable.from_shard_dirs(data.shards, sources=data.sources, splits=data.splits, preset=data.preset)
    kwargs = {"modality": data.modality, "kind": data.folder_kind, "in_chans": cfg.student.in_chans}
    if data.list_file:
        return FolderTable.from_list(data.list_file, **kwargs)
    if data.glob:
        return FolderTable.from_glob(data.glob, **kwargs)
    raise ValueError("no training data: set data.shards or data.glob / data.list_file")


# -- stream positions -------------------------------------------------------------------------------
def stream_order(table: SampleSource, seed: int, source_weights: dict[str, float] | None = None):
    """q → table index (``pretrain.data.StreamOrder``): ``π_p(q mod S)`` with p = q div S and π_p
    seeded by (seed, p), or counter-based per-source weighted draws keyed by (seed, q)."""
    from pretrain.data import StreamOrder

    if source_weights:
        if not hasattr(table, "source_index"):
            raise ValueError("data.source_weights need a shard table (per-sample sources)")
        return StreamOrder.for_table(table, seed, source_weights)
    return StreamOrder(len(table), seed)


def rank_positions(iteration: int, global_batch_size: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """Stream positions of rank r at iteration i: i·G + r + k·W for k < B = G / W."""
    if global_batch_size % world_size:
        raise ValueError(f"global batch {global_batch_size} is not divisible by world size {world_size}")
    batch = global_batch_size // world_size
    return [iteration * global_batch_size + rank + k * world_size for k in range(batch)]


# -- per-sample processing --------------------------------------------------------------------------
class UnusableDataError(RuntimeError):
    """Too many consecutive unusable samples (degenerate or nearly empty maps)."""


def prepare_sample(cfg: PretrainConfig, raw: np.ndarray, meta: dict) -> tuple[np.ndarray, np.ndarray | None] | None:
    """Full-map input of the crops, or None when the sample must be skipped.

    Depth: nearness normalisation once on the full map → (x (1, H, W), valid); None if degenerate or
    the valid fraction is below ``aug.min_sample_valid``. Image: [0, 1] float (C, H, W), no mask.
    """
    if cfg.data.modality == "image":
        return image_to_float(raw, cfg.student.in_chans, cfg.image_aug.max_normalize), None
    norm = cfg.data.depth_norm
    kind = meta.get("kind")
    if kind not in ("metric_z", "rel_disparity"):
        raise ValueError(f"sample {meta.get('key')!r}: unknown depth kind {kind!r}")
    x, valid, degenerate = normalize_depth(raw, kind, mode=norm.mode, eps=norm.eps, pct=tuple(norm.pct),
                                           valid_range=stored_valid_range(meta, tuple(norm.pct)))
    if degenerate or valid.mean() < cfg.aug.min_sample_valid:
        return None
    return x[None], valid


def crops_for_position(cfg: PretrainConfig, table: SampleSource, order, q: int) -> tuple[MultiCrop, str, int]:
    """Crops of stream position q, the key used, and how many unusable samples were skipped.

    ``order``: the q → table index map (:func:`stream_order`)."""
    values, valid, index, skipped = source_for_position(cfg, table, order, q)
    rng = _rng(cfg.train.seed, _AUG_STREAM, q)
    if cfg.data.modality == "image":
        crops = image_multicrop(values, cfg.crops, cfg.aug, cfg.image_aug, rng)
    else:
        crops = depth_multicrop(values[0], valid, cfg.crops, cfg.aug, rng)
    return crops, table.key(index), skipped


def crop_params_for_position(cfg: PretrainConfig, table: SampleSource, order, q: int) -> tuple:
    """What the training device needs to make the crops of stream position q (depth only):
    ``(x (H, W) float32, valid (H, W), global CropParams, local CropParams, key, skipped)`` — the
    parameters :func:`crops_for_position` would warp, redraws and replacements included."""
    values, valid, index, skipped = source_for_position(cfg, table, order, q)
    g, loc = depth_crop_params(valid, cfg.crops, cfg.aug, _rng(cfg.train.seed, _AUG_STREAM, q))
    return values[0], valid, g, loc, table.key(index), skipped


def source_for_position(cfg: PretrainConfig, table: SampleSource, order, q: int) -> tuple:
    """(normalised input (C, H, W), valid (H, W) or None, table index used, unusable samples skipped)
    of stream position q: unusable samples are replaced by draws keyed by (seed, q, attempt)."""
    seed = cfg.train.seed
    index = order(q)
    skipped = 0
    while True:
        raw, meta = table.read(index)
        prepared = prepare_sample(cfg, raw, meta)
        if prepared is not None:
            break
        skipped += 1
        if skipped > MAX_REPLACEMENTS:
            raise UnusableDataError(f"{skipped} unusable samples in a row at stream position {q}: check the data "
                                    "(degenerate maps or valid fraction below aug.min_sample_valid)")
        index = int(_rng(seed, _REPLACE_STREAM, q, skipped).integers(len(table)))
    values, valid = prepared
    return values, valid, index, skipped


# -- batches ---------------------------------------------------------------------------------------------
class MultiCropBatches(torch.utils.data.Dataset):
    """Item i = the crop-major batch of global iteration i for one rank.

    ``global_crops`` (2B, C, S, S): rows c·B + k = global crop c of the k-th sample;
    ``local_crops`` (n·B, C, s, s): chunk j = local crop j of every sample; ``masks`` (2B, N) bool
    for the global crops (locals are never masked) plus the collated iBOT fields; ``keys`` (B) and
    ``positions`` (B) of the samples; ``skipped`` unusable samples replaced in this batch.

    ``warp="device"`` (depth only): instead of the crops, the batch carries the normalised maps and the
    crop parameters (:func:`pretrain.device_augment.pack_sources`); ``DeviceWarp`` makes the same
    crops on the training device.
    """

    def __init__(self, cfg: PretrainConfig, table: SampleSource, global_batch_size: int, rank: int = 0,
                 world_size: int = 1, warp: str = "numpy") -> None:
        if warp not in ("numpy", "device"):
            raise ValueError(f"warp must be 'numpy' or 'device' (resolve aug.warp_on first), got {warp!r}")
        if warp == "device" and cfg.data.modality != "depth":
            raise ValueError("the device warp makes depth crops; image mode (photometric augmentations) warps "
                             "in the loader workers: set aug.warp_on=numpy")
        self.warp = warp
        self.cfg = cfg
        self.table = table
        self.global_batch_size = global_batch_size
        self.rank = rank
        self.world_size = world_size
        self.order = stream_order(table, cfg.train.seed, cfg.data.source_weights)
        self.position_offset = 0  # stream position of iteration i = offset + i·G (≠ 0 only after a change of G)
        p = cfg.student.patch_size
        self.grid = (cfg.crops.global_crops_size // p, cfg.crops.global_crops_size // p)
        self.upper_bound = masked_upper_bound(global_batch_size, self.grid[0] * self.grid[1],
                                              cfg.ibot.mask_sample_probability, tuple(cfg.ibot.mask_ratio_min_max))

    def __len__(self) -> int:  # effectively infinite; the sampler decides which iterations run
        return 2**62

    def __getitem__(self, iteration: int) -> dict:
        cfg = self.cfg
        positions = [self.position_offset + q
                     for q in rank_positions(iteration, self.global_batch_size, self.rank, self.world_size)]
        if self.warp == "device":
            return self._device_batch(iteration, positions)
        samples = [crops_for_position(cfg, self.table, self.order, q) for q in positions]
        B = len(samples)
        global_crops = np.stack([s[0].global_crops[c] for c in range(2) for s in samples])
        n_local = cfg.crops.local_crops_number
        if n_local:
            local_crops = np.stack([s[0].local_crops[j] for j in range(n_local) for s in samples])
        else:
            local_crops = np.zeros((0,) + global_crops.shape[1:2] + (cfg.crops.local_crops_size,) * 2, np.float32)
        masks = assign_masks(iteration, cfg.train.seed, self.global_batch_size, self.grid, self.rank, self.world_size,
                             cfg.ibot.mask_sample_probability, tuple(cfg.ibot.mask_ratio_min_max))
        batch = {
            "iteration": iteration,
            "global_crops": torch.from_numpy(global_crops),
            "local_crops": torch.from_numpy(local_crops),
            "masks": masks,
            "keys": [s[1] for s in samples],
            "positions": torch.tensor(positions, dtype=torch.int64),
            "skipped": sum(s[2] for s in samples),
            "batch_size": B,
        }
        batch.update(collate_mask_fields(masks, self.upper_bound))
        return batch

    def _device_batch(self, iteration: int, positions: list[int]) -> dict:
        cfg = self.cfg
        samples = [crop_params_for_position(cfg, self.table, self.order, q) for q in positions]
        masks = assign_masks(iteration, cfg.train.seed, self.global_batch_size, self.grid, self.rank, self.world_size,
                             cfg.ibot.mask_sample_probability, tuple(cfg.ibot.mask_ratio_min_max))
        batch = {
            "iteration": iteration,
            **pack_sources([s[0] for s in samples], [s[1] for s in samples], [s[2] for s in samples],
                           [s[3] for s in samples], cfg.crops.global_crops_size, cfg.crops.local_crops_size),
            "masks": masks,
            "keys": [s[4] for s in samples],
            "positions": torch.tensor(positions, dtype=torch.int64),
            "skipped": sum(s[5] for s in samples),
            "batch_size": len(samples),
        }
        batch.update(collate_mask_fields(masks, self.upper_bound))
        return batch


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # workers do numpy work; avoid oversubscribing the cores
    keep_freed_memory()  # no page faults on every sample's fresh arrays (shared/memory.py)
    # Preemption signals are handled by the main process (checkpoint, then exit), not by workers.
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


def build_loader(dataset: MultiCropBatches, start_iteration: int, end_iteration: int, num_workers: int,
                 pin_memory: bool = False, prefetch_factor: int = 2, generator_seed: int = 0
                 ) -> torch.utils.data.DataLoader:
    """DataLoader yielding the batches of iterations [start, end) in order (one batch per item).

    The loader gets its own torch generator: creating it must not consume the global RNG, whose
    state is part of the exact-resume contract.
    """
    kwargs = {}
    if num_workers > 0:
        kwargs = {"prefetch_factor": prefetch_factor, "persistent_workers": False, "worker_init_fn": _worker_init}
    return torch.utils.data.DataLoader(dataset, batch_size=None, sampler=range(start_iteration, end_iteration),
                                       num_workers=num_workers, pin_memory=pin_memory,
                                       generator=torch.Generator().manual_seed(generator_seed), **kwargs)
