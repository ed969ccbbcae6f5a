"""Per-view token extraction and the on-disk feature cache (``../shared/spec/modmap.md`` §4–§5).

ModMap uses no augmentation, so the tokens of every view are deterministic: each instance is encoded
once (2N encoder passes) and training/inference read the cached tokens. Tokens are written view by view
into ``.npy`` files opened as memory maps, so extracting a 36-view instance never holds more than one
encoder batch of inputs in memory, and readers map the files instead of loading them.

Cache entries live in ``<cache_dir>/<instance>-<key>/`` where the key hashes the encoder weights'
sha256, every preprocessing setting and the view stems plus each source file's size and mtime; a
stale entry simply gets a new key and is rebuilt. Entries are written to a temporary folder and
renamed when complete, so an interrupted extraction never leaves a half entry behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from detect.encoders import FrozenEncoder, check_token_grids, resample_tokens
from detect.preprocess import (
    GRAY_MEAN,
    GRAY_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ViewGeometry,
    preprocess_depth,
    preprocess_image,
    token_validity,
)

CACHE_FORMAT_VERSION = 1


@dataclass(frozen=True)
class FeatureSettings:
    """Everything besides the encoder weights that determines the tokens."""

    image_size: int = 896
    depth_input_size: int = 0  # 0: same as image_size
    image_norm: str = "gray"
    depth_norm: str = "nearness"
    depth_eps: float = 0.1
    depth_pct: tuple[float, float] = (0.5, 99.5)
    depth_kind: str = "metric_z"
    pad_mode: str = "edge"
    depth_encoder: str = "dino_depth"  # or "dinov2_on_depth"
    depth_token_resample: str = "none"
    encoder_dtype: str = "fp32"

    @property
    def depth_size(self) -> int:
        return self.depth_input_size or self.image_size

    def to_dict(self) -> dict:
        d = asdict(self)
        d["depth_pct"] = list(self.depth_pct)
        return d


@dataclass
class ViewSource:
    """One view to encode: loaders for its image and raw depth, plus identifying info for the cache key."""

    stem: str
    load: Callable[[], tuple[np.ndarray, np.ndarray]]  # → (image, raw depth)
    files: tuple[str, ...] = ()  # source files, for the cache key (size + mtime)


@dataclass
class InstanceFeatures:
    """Cached tokens of an instance: image (N, T, c_I), depth (N, T, c_D), validity (N, T)."""

    image: np.ndarray
    depth: np.ndarray
    token_valid: np.ndarray
    grid: tuple[int, int]
    stems: list[str]
    geometries: list[ViewGeometry]

    @property
    def n_views(self) -> int:
        return int(self.image.shape[0])

    def tensors(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Copies on ``device`` (fp16 caches are upcast)."""
        # np.array copies out of the (read-only) memory map; the copy is what gets moved/upcast.
        img = torch.from_numpy(np.array(self.image)).to(device=device, dtype=dtype)
        dep = torch.from_numpy(np.array(self.depth)).to(device=device, dtype=dtype)
        val = torch.from_numpy(np.array(self.token_valid)).to(device=device)
        return img, dep, val


class FeatureExtractor:
    """Preprocess and encode views with the two frozen encoders (equal token grids asserted)."""

    def __init__(self, image_encoder: FrozenEncoder, depth_encoder: FrozenEncoder | None,
                 settings: FeatureSettings, batch_size: int = 4) -> None:
        self.image_encoder = image_encoder
        self.settings = settings
        if settings.depth_encoder == "dinov2_on_depth":
            depth_encoder = image_encoder
        elif depth_encoder is None:
            raise ValueError("a depth encoder is required unless depth_encoder='dinov2_on_depth'")
        self.depth_encoder = depth_encoder
        self.grid = check_token_grids(image_encoder, depth_encoder, settings.image_size, settings.depth_size,
                                      settings.depth_token_resample)  # type: ignore[arg-type]
        self.depth_grid = depth_encoder.grid(settings.depth_size)
        self.batch_size = max(1, int(batch_size))

    @property
    def dims(self) -> tuple[int, int]:
        return self.image_encoder.embed_dim, self.depth_encoder.embed_dim

    @property
    def n_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    def fingerprint(self) -> dict:
        return {
            "format_version": CACHE_FORMAT_VERSION,
            "image_encoder": self.image_encoder.info.sha256,
            "depth_encoder": self.depth_encoder.info.sha256,
            "image_arch": self.image_encoder.info.arch,
            "depth_arch": self.depth_encoder.info.arch,
            "settings": self.settings.to_dict(),
        }

    def prepare_view(self, image: np.ndarray, depth: np.ndarray) -> dict:
        """Network inputs of one view plus what inference needs from preprocessing."""
        s = self.settings
        img, geom = preprocess_image(image, s.image_size, s.image_norm, s.pad_mode)  # type: ignore[arg-type]
        dep, dgeom = preprocess_depth(depth, s.depth_size, s.depth_norm, s.depth_eps, s.depth_pct,  # type: ignore[arg-type]
                                      s.pad_mode, s.depth_kind)  # type: ignore[arg-type]
        if (geom.height, geom.width) != (dgeom.height, dgeom.width):
            raise ValueError(f"image {geom.height}×{geom.width} and depth {dgeom.height}×{dgeom.width} are not "
                             "pixel-aligned (different sizes)")
        if s.depth_encoder == "dinov2_on_depth":
            # The normalised depth, replicated to 3 channels and normalised with the image constants.
            x = dep.expand(3, -1, -1)
            if s.image_norm == "gray":
                dep_in = (x - GRAY_MEAN) / GRAY_STD
            else:
                dep_in = (x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
        else:
            dep_in = dep
        valid_input = dep if s.depth_size == s.image_size else None
        return {"image": img, "depth": dep_in.contiguous(), "depth_plain": dep, "geometry": geom,
                "valid_input": valid_input}

    def encode_batch(self, images: torch.Tensor, depths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        img_tokens, g = self.image_encoder(images)
        dep_tokens, gd = self.depth_encoder(depths)
        if gd != g:
            dep_tokens = resample_tokens(dep_tokens, gd, g)
        return img_tokens, dep_tokens

    def token_valid(self, depth_plain: torch.Tensor) -> torch.Tensor:
        """Tokens whose patch (on the image grid) is ≥ 50 % valid depth."""
        size = self.settings.image_size
        if depth_plain.shape[-1] != size:
            depth_plain = torch.nn.functional.interpolate(depth_plain[None], size=(size, size), mode="nearest")[0]
        return token_validity(depth_plain, size // self.grid[0])


def _file_signature(path: str) -> list:
    try:
        st = os.stat(path)
        return [os.path.basename(path), st.st_size, int(st.st_mtime_ns)]
    except OSError:
        return [os.path.basename(path), None, None]


def cache_key(fingerprint: dict, instance_id: str, views: Sequence[ViewSource]) -> str:
    payload = {"fp": fingerprint, "instance": instance_id,
               "views": [[v.stem, [_file_signature(f) for f in v.files]] for v in views]}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


class FeatureCache:
    """Compute-once token cache; ``cache_dir=None`` keeps features in memory only."""

    def __init__(self, extractor: FeatureExtractor, cache_dir: str | os.PathLike | None,
                 dtype: str = "fp16", progress: Callable | None = None) -> None:
        if dtype not in ("fp16", "fp32"):
            raise ValueError(f"cache dtype must be fp16 or fp32, got {dtype!r}")
        self.extractor = extractor
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.np_dtype = np.float16 if dtype == "fp16" else np.float32
        self.progress = progress
        self.hits = 0
        self.misses = 0

    def entry_dir(self, instance_id: str, views: Sequence[ViewSource]) -> Path | None:
        if self.cache_dir is None:
            return None
        key = cache_key(self.extractor.fingerprint() | {"dtype": np.dtype(self.np_dtype).name}, instance_id, views)
        name = Path(instance_id).name or "instance"
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[-80:]
        return self.cache_dir / f"{safe}-{key}"

    def get(self, instance_id: str, views: Sequence[ViewSource]) -> InstanceFeatures:
        entry = self.entry_dir(instance_id, views)
        if entry is not None and (entry / "meta.json").is_file():
            try:
                feats = self._load(entry)
                self.hits += 1
                return feats
            except (OSError, ValueError, KeyError):
                shutil.rmtree(entry, ignore_errors=True)  # unreadable entry: rebuild
        self.misses += 1
        return self._compute(instance_id, views, entry)

    def _load(self, entry: Path) -> InstanceFeatures:
        meta = json.loads((entry / "meta.json").read_text())
        image = np.load(entry / "image.npy", mmap_mode="r")
        depth = np.load(entry / "depth.npy", mmap_mode="r")
        valid = np.load(entry / "token_valid.npy")
        geoms = [ViewGeometry(**g) for g in meta["geometries"]]
        return InstanceFeatures(image, depth, valid, tuple(meta["grid"]), list(meta["stems"]), geoms)

    def _compute(self, instance_id: str, views: Sequence[ViewSource], entry: Path | None) -> InstanceFeatures:
        ex = self.extractor
        n, t = len(views), ex.n_tokens
        c_img, c_dep = ex.dims
        tmp_dir = None
        if entry is not None:
            entry.parent.mkdir(parents=True, exist_ok=True)
            tmp_dir = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
            image = np.lib.format.open_memmap(tmp_dir / "image.npy", mode="w+", dtype=self.np_dtype, shape=(n, t, c_img))
            depth = np.lib.format.open_memmap(tmp_dir / "depth.npy", mode="w+", dtype=self.np_dtype, shape=(n, t, c_dep))
        else:
            image = np.empty((n, t, c_img), dtype=self.np_dtype)
            depth = np.empty((n, t, c_dep), dtype=self.np_dtype)
        valid = np.zeros((n, t), dtype=bool)
        geoms: list[ViewGeometry] = []
        try:
            for start in range(0, n, ex.batch_size):
                batch = views[start:start + ex.batch_size]
                prepared = []
                for v in batch:
                    try:
                        prepared.append(ex.prepare_view(*v.load()))
                    except ValueError as exc:
                        raise ValueError(f"{instance_id}, view {v.stem}: {exc}") from None
                imgs = torch.stack([p["image"] for p in prepared])
                deps = torch.stack([p["depth"] for p in prepared])
                tok_i, tok_d = ex.encode_batch(imgs, deps)
                sl = slice(start, start + len(batch))
                image[sl] = tok_i.cpu().numpy().astype(self.np_dtype)
                depth[sl] = tok_d.cpu().numpy().astype(self.np_dtype)
                for j, p in enumerate(prepared):
                    valid[start + j] = ex.token_valid(p["depth_plain"]).numpy()
                    geoms.append(p["geometry"])
                if self.progress is not None:
                    self.progress(len(batch))
            if tmp_dir is None:
                return InstanceFeatures(image, depth, valid, ex.grid, [v.stem for v in views], geoms)
            image.flush()
            depth.flush()
            del image, depth
            np.save(tmp_dir / "token_valid.npy", valid)
            meta = {"instance": instance_id, "stems": [v.stem for v in views], "grid": list(ex.grid),
                    "geometries": [g.to_dict() for g in geoms], "fingerprint": ex.fingerprint(),
                    "dtype": np.dtype(self.np_dtype).name}
            (tmp_dir / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
            if entry.exists():  # another process finished first: keep theirs
                shutil.rmtree(tmp_dir, ignore_errors=True)
            else:
                os.replace(tmp_dir, entry)
            tmp_dir = None
            return self._load(entry)
        finally:
            if tmp_dir is not None:
                shutil.rmtree(tmp_dir, ignore_errors=True)
