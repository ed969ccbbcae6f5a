"""Per-view token extraction and the on-disk feature cache (``../shared/spec/modmap.md`` §4–§5).

ModMap uses no augmentation, so the tokens of every view are deterministic: each instance is encoded
once (2N encoder passes) and training/inference read the cached tokens. Tokens are written view by view
into ``.npy`` files opened as memory maps, so extracting a 36-view instance never holds more than one
encoder batch of inputs in memory, and readers map the files instead of loading them.

Cache entries live in ``<cache_dir>/<instance>-<key>/`` where the key hashes the encoder weights'
sha256, every preprocessing setting and the view stems plus each source file's size and mtime; a
stale entry simply gets a new key and is rebuilt. Entries are written to a temporary folder and
renamed when complete, so an interrupted extraction never leaves a half entry behind.

One protocol (:func:`read_entry`, :func:`writing_entry`, :func:`payload_key`) serves two entry layouts:
:class:`FeatureCache` (both modalities of the N views of one multiview instance) and :class:`TokenCache`
(one modality of the M samples of a single-view class, ``<cache_dir>/<dataset>-<class>-<role>-<modality>-<key>/``),
because a single-view run encodes only the modalities its scoring uses.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from detect.encoders import IMAGE_ENCODER_ON_DEPTH, FrozenEncoder, check_token_grids, resample_tokens
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
TOKEN_CACHE_VERSION = 1  # single-view entries
T = TypeVar("T")


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
    depth_encoder: str = "dino_depth"  # or one of IMAGE_ENCODER_ON_DEPTH
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
        if settings.depth_encoder in IMAGE_ENCODER_ON_DEPTH:
            depth_encoder = image_encoder
        elif depth_encoder is None:
            raise ValueError(f"a depth encoder is required unless depth_encoder is one of {IMAGE_ENCODER_ON_DEPTH}")
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
        valid_input = dep if s.depth_size == s.image_size else None
        return {"image": img, "depth": depth_network_input(dep, s), "depth_plain": dep, "geometry": geom,
                "valid_input": valid_input}

    def encode_batch(self, images: torch.Tensor, depths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        img_tokens, g = self.image_encoder(images)
        dep_tokens, gd = self.depth_encoder(depths)
        if gd != g:
            dep_tokens = resample_tokens(dep_tokens, gd, g)
        return img_tokens, dep_tokens

    def token_valid(self, depth_plain: torch.Tensor) -> torch.Tensor:
        return token_valid(depth_plain, self.settings.image_size, self.grid)

    def encode_shifted(self, views: Sequence[ViewSource], shift: tuple[int, int], with_depth: bool = True
                       ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Tokens (N, T, c) of the views with every network input moved by ``shift`` = (dy, dx) input
        pixels (edges replicated), and their token validity (N, T): PatchCore's bank from shifted copies
        of the training views (issue 23), so that a test token whose patch boundaries fall between the
        training view's still finds a close match. Not cached (only the training instance needs it).
        ``with_depth=False``: the depth encoder is skipped (depth tokens None), for image-only banks."""
        imgs, deps, vals = [], [], []
        f = self.settings.depth_size / self.settings.image_size  # depth inputs may be smaller than the image's
        dshift = (round(shift[0] * f), round(shift[1] * f))
        for start in range(0, len(views), self.batch_size):
            prepared = [self.prepare_view(*v.load()) for v in views[start:start + self.batch_size]]
            images = torch.stack([shift_pixels(p["image"], shift) for p in prepared])
            if with_depth:
                ti, td = self.encode_batch(images, torch.stack([shift_pixels(p["depth"], dshift) for p in prepared]))
                deps.append(td.float().cpu())
            else:
                ti, _ = self.image_encoder(images)
            imgs.append(ti.float().cpu())
            vals += [self.token_valid(shift_pixels(p["depth_plain"], dshift)) for p in prepared]
        return torch.cat(imgs), torch.cat(deps) if deps else None, torch.stack(vals)


def shift_pixels(x: torch.Tensor, shift: tuple[int, int]) -> torch.Tensor:
    """``x`` (..., H, W) moved by (dy, dx) pixels (positive: down/right), the uncovered edge replicated."""
    dy, dx = int(shift[0]), int(shift[1])
    h, w = x.shape[-2:]
    if abs(dy) >= h or abs(dx) >= w:
        raise ValueError(f"shift {shift} is not smaller than the image {h}×{w}")
    if dy == 0 and dx == 0:
        return x
    lead = x.shape[:-2]
    y = torch.nn.functional.pad(x.reshape(1, -1, h, w).float(), (max(dx, 0), max(-dx, 0), max(dy, 0), max(-dy, 0)),
                                mode="replicate")
    y = y[..., max(-dy, 0):max(-dy, 0) + h, max(-dx, 0):max(-dx, 0) + w]
    return y.reshape(*lead, h, w).to(x.dtype)


def depth_network_input(dep: torch.Tensor, s: FeatureSettings) -> torch.Tensor:
    """The depth encoder's input: the normalised depth, or for ``dinov2_on_depth`` the normalised depth
    replicated to 3 channels and normalised with the image constants."""
    if s.depth_encoder not in IMAGE_ENCODER_ON_DEPTH:
        return dep.contiguous()
    x = dep.expand(3, -1, -1)
    if s.image_norm == "gray":
        out = (x - GRAY_MEAN) / GRAY_STD
    else:
        out = (x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return out.contiguous()


def token_valid(depth_plain: torch.Tensor, image_size: int, grid: tuple[int, int]) -> torch.Tensor:
    """Tokens whose patch (on the image grid) is ≥ 50 % valid depth."""
    if depth_plain.shape[-1] != image_size:
        depth_plain = torch.nn.functional.interpolate(depth_plain[None], size=(image_size, image_size),
                                                      mode="nearest")[0]
    return token_validity(depth_plain, image_size // grid[0])


# -- the one on-disk protocol of both token caches -------------------------------------------------
def file_signature(path: str | os.PathLike, full_path: bool = False) -> list:
    """(name, size, mtime) of a source file: a changed file changes the cache key."""
    name = str(path) if full_path else os.path.basename(path)
    try:
        st = os.stat(path)
        return [name, st.st_size, int(st.st_mtime_ns)]
    except OSError:
        return [name, None, None]


def payload_key(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


def read_entry(entry: Path | None, load: Callable[[Path], T]) -> T | None:
    """A complete entry (its ``meta.json`` is written last) loaded by ``load``; None when absent. An
    unreadable entry is removed, to be rebuilt."""
    if entry is None or not (entry / "meta.json").is_file():
        return None
    try:
        return load(entry)
    except (OSError, ValueError, KeyError):
        shutil.rmtree(entry, ignore_errors=True)
        return None


@contextlib.contextmanager
def writing_entry(entry: Path | None) -> Iterator[Path | None]:
    """A temporary folder next to ``entry`` (None: no cache) that becomes ``entry`` when the block
    completes, so an interrupted extraction never leaves a half entry; if another process finished the
    same entry first, theirs is kept."""
    if entry is None:
        yield None
        return
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp: Path | None = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    try:
        yield tmp
        if entry.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.replace(tmp, entry)
        tmp = None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def cache_key(fingerprint: dict, instance_id: str, views: Sequence[ViewSource]) -> str:
    return payload_key({"fp": fingerprint, "instance": instance_id,
                        "views": [[v.stem, [file_signature(f) for f in v.files]] for v in views]})


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
        feats = read_entry(entry, self._load)
        if feats is not None:
            self.hits += 1
            return feats
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
        with writing_entry(entry) as tmp_dir:
            if tmp_dir is not None:
                image = np.lib.format.open_memmap(tmp_dir / "image.npy", mode="w+", dtype=self.np_dtype,
                                                  shape=(n, t, c_img))
                depth = np.lib.format.open_memmap(tmp_dir / "depth.npy", mode="w+", dtype=self.np_dtype,
                                                  shape=(n, t, c_dep))
            else:
                image = np.empty((n, t, c_img), dtype=self.np_dtype)
                depth = np.empty((n, t, c_dep), dtype=self.np_dtype)
            valid = np.zeros((n, t), dtype=bool)
            geoms: list[ViewGeometry] = []
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
        return self._load(entry)


# -- single view: per-modality tokens of M samples, same cache protocol -----------------------------
@dataclass
class ModalityTokens:
    """Cached tokens of a list of samples for one modality: (M, T, c), validity (M, T) for depth."""

    tokens: np.ndarray
    valid: np.ndarray | None
    geometries: list  # ViewGeometry per sample
    names: list[str]

    def tensor(self, index: int | slice | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
        x = self.tokens if index is None else self.tokens[index]
        return torch.from_numpy(np.array(x, dtype=np.float32)).to(device)


class ModalityEncoder:
    """Preprocess and encode one modality (same preprocessing as :class:`detect.features.FeatureExtractor`)."""

    def __init__(self, modality: str, encoder: FrozenEncoder, settings, grid: tuple[int, int],
                 batch_size: int = 4) -> None:
        if modality not in ("image", "depth"):
            raise ValueError(f"modality must be 'image' or 'depth', got {modality!r}")
        self.modality, self.encoder, self.settings, self.grid = modality, encoder, settings, grid
        self.batch_size = max(1, int(batch_size))

    def fingerprint(self) -> dict:
        return {"version": TOKEN_CACHE_VERSION, "modality": self.modality, "sha256": self.encoder.info.sha256,
                "arch": self.encoder.info.arch, "settings": self.settings.to_dict(), "grid": list(self.grid)}

    def prepare(self, x: np.ndarray) -> tuple[torch.Tensor, Any, torch.Tensor | None]:
        """(network input, geometry, plain normalised depth for validity or None)."""
        s = self.settings
        if self.modality == "image":
            inp, geom = preprocess_image(x, s.image_size, s.image_norm, s.pad_mode)
            return inp, geom, None
        dep, geom = preprocess_depth(x, s.depth_size, s.depth_norm, s.depth_eps, s.depth_pct, s.pad_mode,
                                     s.depth_kind)
        return depth_network_input(dep, s), geom, dep

    def encode(self, inputs: torch.Tensor) -> torch.Tensor:
        tokens, g = self.encoder(inputs)
        if tuple(g) != tuple(self.grid):
            tokens = resample_tokens(tokens, g, self.grid)
        return tokens

    def validity(self, dep: torch.Tensor) -> np.ndarray:
        return token_valid(dep, self.settings.image_size, self.grid).numpy()


class TokenCache:
    """Encode-once store of per-modality tokens of a list of single-view samples
    (``<cache>/<dataset>-<class>-<role>-<modality>-<key>/``)."""

    def __init__(self, cache_dir: Path | None, dtype: str = "fp32") -> None:
        self.cache_dir = cache_dir
        self.np_dtype = np.float16 if dtype == "fp16" else np.float32

    def get(self, enc: ModalityEncoder, ds, records: Sequence, tag: str, extra_key: dict,
            progress: Callable[[int], None] | None = None) -> ModalityTokens:
        """Tokens of ``records`` (single-view samples of ``ds``) for ``enc``'s modality, from the cache or
        encoded now; ``tag`` names the entry, ``extra_key`` (dataset options) enters its key."""
        files = [r.views[0].image_path if enc.modality == "image" else r.views[0].depth_path for r in records]
        key = payload_key({"fp": enc.fingerprint(), "extra": extra_key, "dtype": np.dtype(self.np_dtype).name,
                           "samples": [[r.name, file_signature(f, full_path=True)] for r, f in zip(records, files)]})
        entry = self.cache_dir / f"{tag}-{enc.modality}-{key}" if self.cache_dir is not None else None
        tokens = read_entry(entry, self.load)
        if tokens is not None:
            if progress is not None:
                progress(len(records))
            return tokens
        return self._compute(enc, ds, records, entry, progress)

    def _compute(self, enc: ModalityEncoder, ds, records: Sequence, entry: Path | None,
                 progress: Callable[[int], None] | None) -> ModalityTokens:
        n, t, c = len(records), enc.grid[0] * enc.grid[1], enc.encoder.embed_dim
        with writing_entry(entry) as tmp:
            if tmp is not None:
                tokens = np.lib.format.open_memmap(tmp / "tokens.npy", mode="w+", dtype=self.np_dtype,
                                                   shape=(n, t, c))
            else:
                tokens = np.empty((n, t, c), dtype=self.np_dtype)
            valid = np.zeros((n, t), bool) if enc.modality == "depth" else None
            geoms = []
            for start in range(0, n, enc.batch_size):
                batch = records[start:start + enc.batch_size]
                inputs = []
                for j, rec in enumerate(batch):
                    view = ds.load_view(rec, 0, modalities=(enc.modality,))
                    try:
                        inp, geom, dep = enc.prepare(view.image if enc.modality == "image" else view.depth)
                    except ValueError as exc:
                        raise ValueError(f"{rec.class_name}/{rec.name}: {exc}") from None
                    inputs.append(inp)
                    geoms.append(geom)
                    if valid is not None:
                        valid[start + j] = enc.validity(dep)
                tokens[start:start + len(batch)] = enc.encode(torch.stack(inputs)).cpu().numpy().astype(self.np_dtype)
                if progress is not None:
                    progress(len(batch))
            names = [r.name for r in records]
            if tmp is None:
                return ModalityTokens(tokens, valid, geoms, names)
            tokens.flush()
            del tokens
            if valid is not None:
                np.save(tmp / "valid.npy", valid)
            (tmp / "meta.json").write_text(json.dumps({"names": names, "geometries": [g.to_dict() for g in geoms],
                                                       "modality": enc.modality}, indent=1))
        return self.load(entry)

    @staticmethod
    def load(entry: Path) -> ModalityTokens:
        meta = json.loads((entry / "meta.json").read_text())
        valid = np.load(entry / "valid.npy") if (entry / "valid.npy").is_file() else None
        return ModalityTokens(np.load(entry / "tokens.npy", mmap_mode="r"), valid,
                              [ViewGeometry(**g) for g in meta["geometries"]], list(meta["names"]))
