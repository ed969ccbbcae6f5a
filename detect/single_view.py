"""Single-view evaluation (MVTec 3D-AD, Eyecandies, one view per SiM3D-layout instance) with 2D metrics.

Selected by ``detect/run.py --dataset mvtec3d|eyecandies|sim3d_single``; the same :class:`DetectConfig`
drives it. Every sample is an instance with N = 1 view, so:

* ``--scoring modmap`` is ModMap with one view — CFM with DINO-Depth, scored with ModMap's 1 − cos maps
  combined by Ξ (``--aggregation``, default max);
* ``--scoring cfm`` scores the same networks the CFM way (product of √(2 − 2 cos) maps, σ ≈ 4.7 px at
  224 Gaussian smoothing, CFM's three per-image normalisations, ``modmap.md`` §20);
* ``--scoring cmdr`` adds the CMDR-IAD reconstruction decoders and fusion (:mod:`detect.cmdr`), with
  ``--modality image|depth`` (the available modality's reconstruction branch alone: only that
  modality's encoder, decoder and files are used) and ``--missing-depth image_fallback``.

Training uses every training image of the class (``train_set``): the mapping networks (one view code)
with ModMap's optimiser and schedule over images instead of view pairs (``--batch-size`` images per
step), and the decoders with Adam (``--cmdr-lr``) for ``--cmdr-epochs`` epochs. Tokens are encoded once
per image and modality and cached on disk (``<cache>/<dataset>-<class>-<role>-<modality>-<key>/``).

Metrics (``metrics.md``): I-AUROC over per-image scores, P-AUROC over all pixels, exact AUPRO at
every ``--pro-limits`` (8-connected GT regions), per class and the unweighted mean, at the GT's native
resolution (``--eval-res 0``) or CFM's 224 convention (``--eval-res 224``: GT square-padded with edge
replication and nearest-resized). Outputs per class in ``<out>/<dataset>/<class>/``: ``model.pt``
(ModMap's format), ``decoders.pt``, ``train_log.jsonl``, ``scores.csv``, ``metrics.json``,
``timing.json``, ``maps/`` (``--save-maps``/``--viz``); tables in ``<out>/results.{md,csv,json}``.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from detect.run import RunError
from shared.io import atomic_write_json, atomic_write_text

if TYPE_CHECKING:
    from detect.cmdr import Decoders, ScoringSettings
    from detect.data.single_view import SingleViewClass
    from detect.encoders import FrozenEncoder
    from detect.model import ModMap
    from detect.run import DetectConfig

TOKEN_CACHE_VERSION = 1
MAIN_METRICS = (("I-AUROC", "image_auroc"), ("P-AUROC", "pixel_auroc"), ("AUPRO@30%", "pixel_aupro@0.3"),
                ("AUPRO@1%", "pixel_aupro@0.01"))


class SingleViewRunError(RunError):
    """A user-facing problem with the inputs of a single-view run (printed without a traceback)."""


# -- configuration helpers -------------------------------------------------------------------------
def scoring_settings(cfg: DetectConfig) -> ScoringSettings:
    from detect.cmdr import scoring_from_config

    try:
        return scoring_from_config(cfg)
    except ValueError as exc:
        raise SingleViewRunError(str(exc)) from None


def score_norm(cfg: DetectConfig) -> str:
    """``auto``: CFM's normalisations for the CFM-style scorings, raw maps for ModMap's."""
    if cfg.score_norm != "auto":
        return cfg.score_norm
    return "none" if cfg.scoring == "modmap" else "cfm"


def method_name(cfg: DetectConfig) -> str:
    """Short label of the scoring configuration (results tables, folder names)."""
    if cfg.scoring != "cmdr":
        return cfg.scoring
    name = "cmdr" if cfg.modality == "both" else f"cmdr_{cfg.modality}_only"
    return name + ("_image_fallback" if cfg.missing_depth == "image_fallback" else "")


def dataset_options(cfg: DetectConfig) -> dict:
    if cfg.dataset == "mvtec3d":
        return {"bg_removal": cfg.bg_removal, "train_splits": tuple(cfg.train_splits or ("train",))}
    if cfg.dataset == "eyecandies":
        return {"image_index": cfg.eyecandies_image, "train_splits": tuple(cfg.train_splits or ("train",))}
    if cfg.dataset == "sim3d_single":
        return {"views": tuple(cfg.single_views), "view_order": cfg.view_order}
    raise SingleViewRunError(f"{cfg.dataset!r} is not a single-view dataset")


def _limit(records: list, n: int) -> list:
    """Evenly spaced subset of ``n`` records (deterministic); all when n is 0 or larger."""
    if not n or n >= len(records):
        return list(records)
    idx = np.unique(np.linspace(0, len(records) - 1, n).round().astype(int))
    return [records[i] for i in idx]


# -- per-modality encoding with an on-disk cache ---------------------------------------------------
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
        from detect.preprocess import (
            GRAY_MEAN,
            GRAY_STD,
            IMAGENET_MEAN,
            IMAGENET_STD,
            preprocess_depth,
            preprocess_image,
        )

        s = self.settings
        if self.modality == "image":
            inp, geom = preprocess_image(x, s.image_size, s.image_norm, s.pad_mode)
            return inp, geom, None
        dep, geom = preprocess_depth(x, s.depth_size, s.depth_norm, s.depth_eps, s.depth_pct, s.pad_mode,
                                     s.depth_kind)
        if s.depth_encoder == "dinov2_on_depth":  # the image encoder on the normalised depth, 3 channels
            x3 = dep.expand(3, -1, -1)
            if s.image_norm == "gray":
                inp = (x3 - GRAY_MEAN) / GRAY_STD
            else:
                inp = (x3 - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
        else:
            inp = dep
        return inp.contiguous(), geom, dep

    def encode(self, inputs: torch.Tensor) -> torch.Tensor:
        from detect.encoders import resample_tokens

        tokens, g = self.encoder(inputs)
        if tuple(g) != tuple(self.grid):
            tokens = resample_tokens(tokens, g, self.grid)
        return tokens

    def validity(self, dep: torch.Tensor) -> np.ndarray:
        """Tokens whose patch (on the image grid) is ≥ 50 % valid depth."""
        from detect.preprocess import token_validity

        size = self.settings.image_size
        if dep.shape[-1] != size:
            dep = torch.nn.functional.interpolate(dep[None], size=(size, size), mode="nearest")[0]
        return token_validity(dep, size // self.grid[0]).numpy()


def _file_signature(path: Path) -> list:
    try:
        st = os.stat(path)
        return [str(path), st.st_size, int(st.st_mtime_ns)]
    except OSError:
        return [str(path), None, None]


class TokenCache:
    """Encode-once store of per-modality tokens for a list of single-view records."""

    def __init__(self, cache_dir: Path | None, dtype: str = "fp32") -> None:
        self.cache_dir = cache_dir
        self.np_dtype = np.float16 if dtype == "fp16" else np.float32

    def get(self, enc: ModalityEncoder, ds: SingleViewClass, records: Sequence, tag: str, extra_key: dict,
            progress: Callable[[int], None] | None = None) -> ModalityTokens:
        from detect.preprocess import ViewGeometry

        files = [r.views[0].image_path if enc.modality == "image" else r.views[0].depth_path for r in records]
        payload = {"fp": enc.fingerprint(), "extra": extra_key, "dtype": np.dtype(self.np_dtype).name,
                   "samples": [[r.name, _file_signature(f)] for r, f in zip(records, files)]}
        key = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]
        entry = None
        if self.cache_dir is not None:
            entry = self.cache_dir / f"{tag}-{enc.modality}-{key}"
            if (entry / "meta.json").is_file():
                try:
                    meta = json.loads((entry / "meta.json").read_text())
                    tokens = np.load(entry / "tokens.npy", mmap_mode="r")
                    valid = np.load(entry / "valid.npy") if (entry / "valid.npy").is_file() else None
                    if progress is not None:
                        progress(len(records))
                    return ModalityTokens(tokens, valid, [ViewGeometry(**g) for g in meta["geometries"]],
                                          list(meta["names"]))
                except (OSError, ValueError, KeyError):
                    shutil.rmtree(entry, ignore_errors=True)  # unreadable entry: rebuild
        return self._compute(enc, ds, records, entry, progress)

    def _compute(self, enc: ModalityEncoder, ds: SingleViewClass, records: Sequence, entry: Path | None,
                 progress: Callable[[int], None] | None) -> ModalityTokens:
        n, t, c = len(records), enc.grid[0] * enc.grid[1], enc.encoder.embed_dim
        tmp = None
        if entry is not None:
            entry.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
            tokens = np.lib.format.open_memmap(tmp / "tokens.npy", mode="w+", dtype=self.np_dtype, shape=(n, t, c))
        else:
            tokens = np.empty((n, t, c), dtype=self.np_dtype)
        valid = np.zeros((n, t), bool) if enc.modality == "depth" else None
        geoms = []
        try:
            for start in range(0, n, enc.batch_size):
                batch = records[start:start + enc.batch_size]
                inputs = []
                for j, rec in enumerate(batch):
                    view = ds.load_view(rec, 0, modalities=(enc.modality,))
                    try:
                        inp, geom, dep = enc.prepare(view.image if enc.modality == "image" else view.depth)
                    except ValueError as exc:
                        raise SingleViewRunError(f"{rec.class_name}/{rec.name}: {exc}") from None
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
            if entry.exists():  # another process finished first: keep theirs
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                os.replace(tmp, entry)
            tmp = None
            return self.get_loaded(entry)
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)

    @staticmethod
    def get_loaded(entry: Path) -> ModalityTokens:
        from detect.preprocess import ViewGeometry

        meta = json.loads((entry / "meta.json").read_text())
        valid = np.load(entry / "valid.npy") if (entry / "valid.npy").is_file() else None
        return ModalityTokens(np.load(entry / "tokens.npy", mmap_mode="r"), valid,
                              [ViewGeometry(**g) for g in meta["geometries"]], list(meta["names"]))


# -- training --------------------------------------------------------------------------------------
def fit_single_view_mapping(image: torch.Tensor, depth: torch.Tensor, settings, token_valid: torch.Tensor | None = None,
                            log: Callable[[dict], None] | None = None,
                            progress: Callable[[int], None] | None = None) -> ModMap:
    """ModMap's mapping networks with one view, trained on M images (M, T, c): CFM with ModMap's loss,
    optimiser and OneCycle schedule; an epoch visits every image once (``settings.batch_size`` images
    per step, ``drop_last`` but at least one batch)."""
    from detect.model import ModMap
    from detect.modmap import batch_plan, make_optimizer, mapping_loss, run_mapping_epochs

    if image.shape[:2] != depth.shape[:2]:
        raise ValueError(f"image tokens {tuple(image.shape)} and depth tokens {tuple(depth.shape)} differ in M or T")
    if settings.loss_mask not in ("all", "foreground"):
        raise ValueError(f"loss_mask must be 'all' or 'foreground', got {settings.loss_mask!r}")
    torch.manual_seed(settings.seed)
    model = ModMap(1, image.shape[-1], depth.shape[-1], settings.modulator_hidden, settings.variant).to(image.device)
    model.train()
    batch, iters = batch_plan(image.shape[0], settings.batch_size)
    opt, sched = make_optimizer(model, settings, settings.epochs * iters)
    view = torch.zeros(batch, dtype=torch.long, device=image.device)
    mask = token_valid if settings.loss_mask == "foreground" else None
    gen = torch.Generator().manual_seed(settings.seed)

    def batch_loss(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pred_d, pred_i = model(image[idx], depth[idx], view, view)
        return mapping_loss(pred_d, depth[idx], pred_i, image[idx], None if mask is None else mask[idx])

    run_mapping_epochs(opt, sched, settings.epochs, iters, batch,
                       epoch_order=lambda _: torch.randperm(image.shape[0], generator=gen).to(image.device),
                       batch_loss=batch_loss, log=log, progress=progress)
    model.eval()
    return model


# -- per-sample maps -------------------------------------------------------------------------------
def eval_frame(score_map: torch.Tensor, geom, mask: np.ndarray, eval_res: int) -> tuple[np.ndarray, np.ndarray]:
    """(map, GT) at the evaluation resolution (metrics.md §8): native = the map's padding undone and
    bilinearly resized to the GT; ``eval_res`` R > 0 = CFM's convention (map resized to R×R, GT padded
    to a square with edge replication, nearest-resized to R×R, > 0.5)."""
    from detect.preprocess import undo_geometry

    if eval_res <= 0:
        return undo_geometry(score_map, geom, "bilinear"), mask
    m = torch.nn.functional.interpolate(score_map.detach().float().cpu()[None, None], size=(eval_res, eval_res),
                                        mode="bilinear", align_corners=False)[0, 0].numpy()
    g = torch.from_numpy(mask.astype(np.float32))[None, None]
    if geom.side != geom.height or geom.side != geom.width:
        g = torch.nn.functional.pad(g, geom.pads, mode="replicate")
    g = torch.nn.functional.interpolate(g, size=(eval_res, eval_res), mode="nearest")[0, 0].numpy() > 0.5
    return m, g


@dataclass
class SampleInputs:
    """What scoring one sample needs (None where the mode does not use a modality)."""

    image: torch.Tensor | None  # (1, T, c_I)
    depth: torch.Tensor | None  # (1, T, c_D)
    depth_raw: np.ndarray | None  # (H, W) NaN-invalid, for the foreground
    geometry: Any


def sample_map(inputs: SampleInputs, model: ModMap | None, decoders: Decoders | None, grid: tuple[int, int],
               size: int, depth_norm: dict, cfg: DetectConfig, scoring: ScoringSettings) -> torch.Tensor:
    """The (size, size) anomaly map of one single-view sample (before any per-image normalisation)."""
    from detect.cmdr import (
        TokenScores,
        gaussian_smooth,
        iter_view_maps_cmdr,
        reconstruction_distance,
        score_tokens,
        token_foreground,
    )
    from detect.modmap import InferenceSettings, depth_input_for_mask, iter_view_maps
    from detect.preprocess import foreground_mask, upsample_tokens

    inf = InferenceSettings(aggregation=cfg.aggregation, blur_sigma=cfg.blur_sigma, fg_connectivity=cfg.fg_connectivity,
                            seed=cfg.seed)
    d_in = None
    if inputs.depth_raw is not None:
        d_in = depth_input_for_mask(inputs.depth_raw, size, depth_norm["mode"], depth_norm["eps"],
                                    tuple(depth_norm["pct"]), depth_norm.get("pad_mode", "edge"))
    if scoring.scoring == "modmap":  # ModMap with one view (= CFM networks), ModMap's maps
        (maps,) = iter_view_maps(model, inputs.image, inputs.depth, grid, lambda t: d_in, size, inf)
        return maps.combined
    if scoring.uses_mapping:  # CFM scoring or the full CMDR fusion: ModMap's per-view path
        (maps,) = iter_view_maps_cmdr(model, inputs.image, inputs.depth, grid, lambda t: d_in, size, inf,
                                      decoders=decoders, scoring=scoring)
        return maps.combined
    # Single-modality CMDR: the available modality's reconstruction branch alone.
    if scoring.modality == "image":
        fg = np.ones((size, size), bool)  # no depth: every pixel is scored
        ts = TokenScores(d_image_rec=reconstruction_distance(decoders.image, inputs.image[0], grid).reshape(grid))
    else:
        fg = foreground_mask(d_in, cfg.fg_connectivity)
        ts = TokenScores(d_depth_rec=reconstruction_distance(decoders.depth, inputs.depth[0], grid).reshape(grid))
    dev = (inputs.image if inputs.image is not None else inputs.depth).device
    fused = score_tokens(ts, scoring, token_foreground(fg, grid).to(dev))
    m = upsample_tokens(fused.reshape(-1), grid, size) * torch.from_numpy(np.ascontiguousarray(fg)).to(dev)
    return gaussian_smooth(m, scoring.post_sigma_frac * size)


# -- the runner ------------------------------------------------------------------------------------
def depth_training_data(ckpt: str, dataset: str) -> dict:
    """What the DINO-Depth export says it was pretrained on (``train_meta.data``), for the run report.

    Evaluating an encoder that saw MVTec 3D-AD / Eyecandies *test* splits on that benchmark is
    transductive (``modmap.md`` §20): warn, and record it in ``predict_info.json``.
    """
    from shared.checkpoint import CheckpointError, load_checkpoint

    try:
        meta = load_checkpoint(ckpt).get("train_meta") or {}
    except CheckpointError:
        return {}
    data = meta.get("data") or {}
    splits = list(data.get("splits") or [])
    sources = data.get("sources") or data.get("preset")
    record = {"splits": splits or "unknown", "sources": sources or "unknown"}
    src_text = json.dumps(sources).lower() if sources else ""
    if dataset in ("mvtec3d", "eyecandies") and (not splits or "test" in splits or "all" in splits) \
            and (not sources or dataset in src_text):
        record["transductive_risk"] = True
        warnings.warn(f"the DINO-Depth checkpoint {ckpt} records pretraining splits {splits or 'unknown'} (sources "
                      f"{sources or 'unknown'}): if they include the {dataset} test split, this evaluation is "
                      "transductive (modmap.md §20)", stacklevel=3)
    return record


class SingleViewRunner:
    """Fit / predict / evaluate on a single-view dataset (module docstring)."""

    def __init__(self, cfg: DetectConfig) -> None:
        from detect.run import _device

        self.cfg = cfg
        self.out = Path(cfg.out)
        self.device = _device(cfg.device)
        self.scoring = scoring_settings(cfg)
        self.norm = score_norm(cfg)
        self._encoders: dict[str, ModalityEncoder] | None = None
        self.depth_norm: dict = {}
        self.grid: tuple[int, int] = (0, 0)
        cache_dir = (Path(cfg.cache_dir) if cfg.cache_dir else self.out / "features") if cfg.feature_cache else None
        self.cache = TokenCache(cache_dir, cfg.cache_dtype)
        self.random_encoder = cfg.image_encoder == "random" and self.scoring.uses_image
        self.depth_training_data: dict = {}

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(m for m, used in (("image", self.scoring.uses_image), ("depth", self.scoring.uses_depth)) if used)

    # -- encoders -------------------------------------------------------------------------------
    def encoders(self) -> dict[str, ModalityEncoder]:
        """The encoders of the modalities in use (an image-only run never loads a depth encoder, nor
        a depth-only run an image encoder — unless ``dinov2_on_depth`` makes the image encoder the
        depth encoder)."""
        if self._encoders is not None:
            return self._encoders
        from detect.encoders import check_token_grids, load_depth_encoder, load_image_encoder
        from detect.features import FeatureSettings
        from shared.depth import DepthNormConfig

        cfg = self.cfg
        need_image = self.scoring.uses_image or (self.scoring.uses_depth and cfg.depth_encoder == "dinov2_on_depth")
        image_enc = depth_enc = None
        if need_image:
            image_enc = load_image_encoder(
                cfg.image_encoder, cfg.image_encoder_weights or None, cfg.encoder_dtype, self.device,
                random_arch=cfg.random_encoder_arch, random_overrides={"depth": cfg.random_encoder_depth},
                seed=cfg.seed)
            if image_enc.info.random:
                warnings.warn("--image-encoder random: randomly initialised image encoder, outputs are NOT real "
                              "results (tests/demos only)", stacklevel=2)
                self.random_encoder = True
        stored: dict = {}
        if self.scoring.uses_depth:
            if cfg.depth_encoder == "dino_depth":
                depth_enc = load_depth_encoder(cfg.ckpt or None, cfg.encoder_dtype, self.device)
                stored = depth_enc.info.input_norm
                self.depth_training_data = depth_training_data(cfg.ckpt, cfg.dataset)
            elif cfg.depth_encoder == "random":  # DINO-Depth's architecture, random weights (ablations)
                from detect.encoders import load_random_depth_encoder

                depth_enc = load_random_depth_encoder(cfg.ckpt or None, cfg.encoder_dtype, self.device, seed=cfg.seed)
                stored = depth_enc.info.input_norm
            else:
                depth_enc = image_enc
        base = DepthNormConfig.from_dict(stored) if stored else DepthNormConfig()
        mode = base.mode if cfg.depth_norm == "auto" else cfg.depth_norm
        eps = base.eps if cfg.depth_norm_eps is None else cfg.depth_norm_eps
        pct = tuple(base.pct if cfg.depth_norm_pct is None else cfg.depth_norm_pct)
        if len(pct) != 2:
            raise SingleViewRunError(f"depth_norm_pct needs two percentiles, got {list(pct)}")
        self.depth_norm = {"mode": mode, "eps": float(eps), "pct": [float(p) for p in pct], "pad_mode": cfg.pad_mode}
        settings = FeatureSettings(
            image_size=cfg.image_size, depth_input_size=cfg.depth_input_size, image_norm=cfg.image_norm,
            depth_norm=mode, depth_eps=float(eps), depth_pct=(float(pct[0]), float(pct[1])), pad_mode=cfg.pad_mode,
            depth_encoder=cfg.depth_encoder, depth_token_resample=cfg.depth_token_resample,
            encoder_dtype=cfg.encoder_dtype)
        if image_enc is not None and depth_enc is not None:
            grid = check_token_grids(image_enc, depth_enc, cfg.image_size, settings.depth_size,
                                     cfg.depth_token_resample)
        elif image_enc is not None:
            grid = image_enc.grid(cfg.image_size)
        else:
            if settings.depth_size != cfg.image_size:
                raise SingleViewRunError("depth-only mode encodes depth at --image-size; leave --depth-input-size 0")
            grid = depth_enc.grid(cfg.image_size)
        self.grid = tuple(grid)
        encs = {}
        if self.scoring.uses_image:
            encs["image"] = ModalityEncoder("image", image_enc, settings, self.grid, cfg.encoder_batch_size)
        if self.scoring.uses_depth:
            encs["depth"] = ModalityEncoder("depth", depth_enc, settings, self.grid, cfg.encoder_batch_size)
        self._encoders = encs
        return encs

    def encoder_record(self) -> dict:
        encs = self.encoders()
        rec: dict = {"modalities": list(encs), "grid": list(self.grid), "depth_norm": dict(self.depth_norm)}
        for m, e in encs.items():
            rec[f"{m}_encoder"] = e.encoder.info.to_dict()
            rec["feature_settings"] = e.settings.to_dict()
        return rec

    # -- data -----------------------------------------------------------------------------------
    def dataset(self, class_name: str) -> SingleViewClass:
        from detect.data.single_view import SingleViewError, open_single_view_class

        try:
            return open_single_view_class(self.cfg.dataset, self.cfg.data_root, class_name,
                                          **dataset_options(self.cfg))
        except (SingleViewError, ValueError) as exc:
            raise SingleViewRunError(str(exc)) from None

    def classes(self) -> list[str]:
        from detect.data.single_view import SingleViewError, list_single_view_classes

        try:
            available = list_single_view_classes(self.cfg.dataset, self.cfg.data_root)
        except SingleViewError as exc:
            raise SingleViewRunError(str(exc)) from None
        if not self.cfg.classes:
            return available
        missing = [c for c in self.cfg.classes if c not in available]
        if missing:
            raise SingleViewRunError(f"classes {missing} not found under {self.cfg.data_root}; available: {available}")
        return list(self.cfg.classes)

    def class_dir(self, class_name: str) -> Path:
        return self.out / self.cfg.dataset / class_name

    def tokens(self, ds: SingleViewClass, records: list, role: str, desc: str) -> dict[str, ModalityTokens]:
        from detect.run import _bar

        out = {}
        for m, enc in self.encoders().items():
            bar = _bar(len(records), f"encode {desc} ({m})", self.cfg.progress, "image")
            try:
                out[m] = self.cache.get(enc, ds, records, f"{self.cfg.dataset}-{ds.class_name}-{role}",
                                        dataset_options(self.cfg), bar.update)
            finally:
                bar.close()
        return out

    def _train_records(self, ds: SingleViewClass) -> list:
        from detect.data.single_view import SingleViewError

        setup = self.cfg.setup if self.cfg.setup != "both" else "real2real"
        try:
            records = ds.train_set(setup)
        except SingleViewError as exc:
            raise SingleViewRunError(str(exc)) from None
        return _limit(records, self.cfg.train_limit)

    # -- fit ------------------------------------------------------------------------------------
    def fit(self, class_name: str) -> None:
        from detect.cmdr import decoder_steps, fit_class_decoders
        from detect.modmap import TrainSettings, batch_plan
        from detect.run import MODEL_FORMAT_VERSION, _bar
        from shared.checkpoint import save_checkpoint

        cfg = self.cfg
        ds = self.dataset(class_name)
        records = self._train_records(ds)
        t0 = time.perf_counter()
        feats = self.tokens(ds, records, "train", f"{class_name}/train")
        encode_s = time.perf_counter() - t0
        out_dir = self.class_dir(class_name)
        out_dir.mkdir(parents=True, exist_ok=True)
        image = feats["image"].tensor(device=self.device) if "image" in feats else None
        depth = feats["depth"].tensor(device=self.device) if "depth" in feats else None
        valid = torch.from_numpy(feats["depth"].valid).to(self.device) if "depth" in feats else None
        log_lines: list[str] = []
        meta_common = {"format_version": MODEL_FORMAT_VERSION, "dataset": cfg.dataset, "class_name": class_name,
                       "classes": [class_name], "n_views": 1, "view_stems": list(ds.stems), "view_order": "natural",
                       "n_train_images": len(records), "train_images": [r.name for r in records],
                       "dataset_options": {k: list(v) if isinstance(v, tuple) else v
                                           for k, v in dataset_options(cfg).items()},
                       "random_image_encoder": self.random_encoder, "seed": cfg.seed,
                       "encode_seconds": round(encode_s, 3), **self.encoder_record()}
        if self.scoring.uses_mapping or self.scoring.scoring != "cmdr":
            settings = TrainSettings(variant=cfg.variant, epochs=cfg.epochs, batch_size=cfg.batch_size, lr_max=cfg.lr_max,
                                     loss_mask=cfg.loss_mask, modulator_hidden=cfg.modulator_hidden, seed=cfg.seed)
            _, iters = batch_plan(len(records), cfg.batch_size)
            bar = _bar(cfg.epochs * iters, f"fit mapping {class_name}", cfg.progress, "step")

            def log(rec: dict) -> None:
                log_lines.append(json.dumps({"network": "mapping", **rec}))
                bar.set_postfix(loss=f"{rec['loss']:.4f}")

            t1 = time.perf_counter()
            try:
                model = fit_single_view_mapping(image, depth, settings, valid, log, bar.update)
            finally:
                bar.close()
            meta = {**meta_common, "variant": cfg.variant, "image_dim": int(image.shape[-1]),
                    "depth_dim": int(depth.shape[-1]), "modulator_hidden": cfg.modulator_hidden,
                    "train_settings": {**dataclasses.asdict(settings), "betas": list(settings.betas)},
                    "total_steps": cfg.epochs * iters, "train_seconds": round(time.perf_counter() - t1, 3)}
            save_checkpoint({**{k: {n: t.detach().cpu() for n, t in sd.items()}
                                for k, sd in model.component_state_dicts().items()}, "config": meta},
                            out_dir / "model.pt")
        if self.scoring.scoring == "cmdr":
            dec_settings = self.decoder_settings()
            n_dec = int(image is not None) + int(depth is not None)
            bar = _bar(decoder_steps(len(records), dec_settings, n_dec), f"fit decoders {class_name}", cfg.progress,
                       "step")
            mask = valid if cfg.loss_mask == "foreground" and valid is not None else None
            t1 = time.perf_counter()
            try:
                decs, dlog = fit_class_decoders(image, depth, self.grid, dec_settings, mask, bar.update,
                                                meta={**meta_common, "modality": cfg.modality})
            finally:
                bar.close()
            decs.meta["train_seconds"] = round(time.perf_counter() - t1, 3)
            decs.save(out_dir / "decoders.pt")
            log_lines += [json.dumps({"network": "decoder", **r}) for r in dlog]
        atomic_write_text(out_dir / "train_log.jsonl", "\n".join(log_lines) + "\n")

    def decoder_settings(self):
        from detect.cmdr import decoder_settings_from_config

        return decoder_settings_from_config(self.cfg)

    def _check_encoders(self, meta: dict, path: Path) -> None:
        current = self.encoder_record()
        for m in current["modalities"]:
            key = f"{m}_encoder"
            if key not in meta:
                raise SingleViewRunError(f"{path} was trained without the {m} modality; refit with this --modality")
            if meta[key]["sha256"] != current[key]["sha256"]:
                raise SingleViewRunError(f"{path} was trained with a different {m} encoder ({meta[key]['weights']}) "
                                         f"than this run ({current[key]['weights']})")
        if meta.get("feature_settings") != current.get("feature_settings"):
            raise SingleViewRunError(f"{path} was trained with other preprocessing settings: "
                                     f"{meta.get('feature_settings')} vs {current.get('feature_settings')}")

    def load_models(self, class_name: str) -> tuple[ModMap | None, Decoders | None]:
        from detect.cmdr import Decoders
        from detect.model import ModMap
        from shared.checkpoint import CheckpointError, load_checkpoint

        out_dir = self.class_dir(class_name)
        model = decoders = None
        if self.scoring.uses_mapping or self.scoring.scoring != "cmdr":
            path = out_dir / "model.pt"
            if not path.is_file():
                raise SingleViewRunError(f"no trained model {path}: run --mode fit (or all) first")
            try:
                obj = load_checkpoint(path)
                meta = obj["config"]
                model = ModMap(1, int(meta["image_dim"]), int(meta["depth_dim"]), int(meta["modulator_hidden"]),
                               meta["variant"])
                model.load_component_state_dicts(obj)
            except (CheckpointError, KeyError, RuntimeError, ValueError, TypeError) as exc:
                raise SingleViewRunError(f"{path} is not a single-view ModMap model file: {exc}") from None
            self._check_encoders(meta, path)
            model = model.to(self.device).eval()
        if self.scoring.scoring == "cmdr":
            path = out_dir / "decoders.pt"
            if not path.is_file():
                raise SingleViewRunError(f"no trained decoders {path}: run --mode fit with --scoring cmdr first")
            try:
                decoders = Decoders.load(path, self.device)
            except (CheckpointError, KeyError, RuntimeError, ValueError) as exc:
                raise SingleViewRunError(f"{path} is not a decoders file: {exc}") from None
            self._check_encoders(decoders.meta, path)
            for m in self.modalities:
                if getattr(decoders, m) is None:
                    raise SingleViewRunError(f"{path} has no {m} decoder; refit with --modality {self.cfg.modality}")
        return model, decoders

    # -- predict --------------------------------------------------------------------------------
    def predict(self, class_name: str) -> None:
        from detect.metrics import SegmentationAccumulator
        from detect.run import _bar, _write_csv

        cfg = self.cfg
        ds = self.dataset(class_name)
        if not ds.test_records:
            raise SingleViewRunError(f"{cfg.dataset} class {class_name}: no test samples under {ds.path}")
        model, decoders = self.load_models(class_name)
        feats = self.tokens(ds, ds.test_records, "test", f"{class_name}/test")
        out_dir = self.class_dir(class_name)
        size = cfg.image_size
        acc_px = SegmentationAccumulator(connectivity=8)
        acc_pro = SegmentationAccumulator(connectivity=8) if self.norm == "cfm" else acc_px
        rows, map_times = [], []
        bar = _bar(len(ds.test_records), f"predict {class_name}", cfg.progress, "image")
        for i, rec in enumerate(ds.test_records):
            # The depth gives the foreground; the image is read again only for overlays (or when it is the
            # only modality, for the mask's shape). Tokens come from the cache.
            wanted = ["depth"] if "depth" in feats else ["image"]
            if cfg.viz and "image" in feats and "image" not in wanted:
                wanted.append("image")
            view = ds.load_view(rec, 0, modalities=tuple(wanted))
            geom = next(iter(feats.values())).geometries[i]
            inputs = SampleInputs(
                image=feats["image"].tensor(slice(i, i + 1), self.device) if "image" in feats else None,
                depth=feats["depth"].tensor(slice(i, i + 1), self.device) if "depth" in feats else None,
                depth_raw=view.depth, geometry=geom)
            t0 = time.perf_counter()
            with torch.no_grad():
                m = sample_map(inputs, model, decoders, self.grid, size, self.depth_norm, cfg, self.scoring)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            map_times.append(time.perf_counter() - t0)
            score_map, gt = eval_frame(m, geom, view.mask, cfg.eval_res)
            if self.norm == "cfm":
                from detect.cmdr import cfm_normalizations

                image_score, pixel_map, pro_map = cfm_normalizations(score_map)
                acc_px.add(pixel_map, gt)
                acc_pro.add(pro_map, gt)
            else:
                image_score = float(np.max(score_map))
                acc_px.add(score_map, gt)
            rows.append({"instance": rec.name, "gt_label": rec.label, "pred_score": image_score,
                         "defect_type": ds.load_meta(rec).get("defect_type") or ""})
            self._save_maps(out_dir, rec.name, view, m, score_map)
            bar.update(1)
        bar.close()
        out_dir.mkdir(parents=True, exist_ok=True)
        _write_csv(out_dir / "scores.csv", rows, ["instance", "gt_label", "pred_score", "defect_type"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            px = acc_px.compute(cfg.pro_limits, prefix="pixel")
            pro = acc_pro.compute(cfg.pro_limits, prefix="pixel") if acc_pro is not acc_px else px
        info = {"pixel_auroc": px["pixel_auroc"], "pixel_aupro": {str(k): v for k, v in pro["pixel_aupro"].items()},
                "pro_variant": "exact", "connectivity": pro["connectivity"], "eval_domain": "all",
                "eval_res": "native" if cfg.eval_res <= 0 else cfg.eval_res, "score_norm": self.norm,
                "n_gt_regions": pro["n_regions"], "random_image_encoder": self.random_encoder,
                "depth_encoder_training_data": self.depth_training_data,
                "bg_notes": list(getattr(ds, "bg_notes", []))[:50]}
        atomic_write_json(out_dir / "predict_info.json", _jsonable(info))
        atomic_write_json(out_dir / "timing.json", {
            "definition": "per image, map = scoring from cached tokens to the map at the input size (encoding "
                          "excluded; tokens are cached)", "device": str(self.device),
            "mean_map_s": float(np.mean(map_times)) if map_times else None})

    def _save_maps(self, out_dir: Path, name: str, view, m: torch.Tensor, eval_map: np.ndarray) -> None:
        cfg = self.cfg
        if cfg.save_maps == "none" and not cfg.viz:
            return
        from detect.run import save_overlay

        folder = out_dir / "maps" / name
        folder.mkdir(parents=True, exist_ok=True)
        if cfg.save_maps in ("896", "input"):
            np.save(folder / "combined.npy", m.detach().cpu().numpy().astype(np.float16))
        elif cfg.save_maps == "orig":
            np.save(folder / "combined.npy", eval_map.astype(np.float16))
        if cfg.viz:
            if view.image is not None and cfg.eval_res <= 0:
                img = view.image if view.image.ndim == 2 else view.image.mean(axis=2).astype(np.uint8)
            else:
                img = np.zeros(eval_map.shape, np.uint8)
            save_overlay(img, eval_map, folder / "combined.png")

    # -- evaluate -------------------------------------------------------------------------------
    def evaluate(self, class_name: str) -> dict:
        from detect.metrics import instance_auroc

        cfg = self.cfg
        out_dir = self.class_dir(class_name)
        scores_path = out_dir / "scores.csv"
        if not scores_path.is_file():
            raise SingleViewRunError(f"no predictions {scores_path}: run --mode predict (or all) first")
        with open(scores_path, newline="") as handle:
            rows = list(csv.DictReader(handle))
        try:
            labels = np.array([int(r["gt_label"]) for r in rows])
            scores = np.array([float(r["pred_score"]) for r in rows])
        except (KeyError, ValueError) as exc:
            raise SingleViewRunError(f"{scores_path} is not a scores file ({exc})") from None
        info_path = out_dir / "predict_info.json"
        info = json.loads(info_path.read_text()) if info_path.is_file() else {}
        metrics: dict = {"class": class_name, "dataset": cfg.dataset, "method": method_name(cfg),
                         "scoring": cfg.scoring, "modality": cfg.modality, "missing_depth": cfg.missing_depth,
                         "n_images": len(rows), "n_anomalous": int(labels.sum()), **info}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            metrics["image_auroc"] = instance_auroc(scores, labels)
        atomic_write_json(out_dir / "metrics.json", _jsonable(metrics))
        return metrics


def _jsonable(obj: Any) -> Any:
    from detect.run import _jsonable as run_jsonable

    return run_jsonable(obj)


def _metric(m: dict, key: str) -> float | None:
    if key.startswith("pixel_aupro@"):
        return (m.get("pixel_aupro") or {}).get(key.split("@", 1)[1])
    return m.get(key)


def _fmt(v: Any) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.3f}"


def results_table(results: dict[str, dict[str, dict]], limits: Sequence[float]) -> tuple[list[str], list[dict]]:
    """Markdown lines and CSV rows: ``results[method][class] = metrics``; classes as columns + Mean."""
    classes = sorted({c for per in results.values() for c in per})
    metrics = [("I-AUROC", "image_auroc"), ("P-AUROC", "pixel_auroc")]
    metrics += [(f"AUPRO@{_pct(a)}", f"pixel_aupro@{a}") for a in limits]
    lines = ["| Method | Metric | " + " | ".join(classes) + " | Mean |", "|---|---|" + "---|" * (len(classes) + 1)]
    rows = []
    for method, per in results.items():
        for label, key in metrics:
            vals = [_metric(per[c], key) if c in per else None for c in classes]
            ok = [v for v in vals if v is not None and math.isfinite(v)]
            mean = float(np.mean(ok)) if ok and len(ok) == len(vals) else None
            lines.append(f"| {method} | {label} | " + " | ".join(_fmt(v) for v in vals) + f" | {_fmt(mean)} |")
            rows.append({"method": method, "metric": key, **{c: vals[i] for i, c in enumerate(classes)}, "mean": mean})
    return lines, rows


def _pct(a: float) -> str:
    return f"{a * 100:g}%"


def write_single_view_results(out: Path, cfg: DetectConfig, results: dict[str, dict], random_encoder: bool) -> None:
    from detect.run import _write_csv

    method = method_name(cfg)
    lines = [f"# Single-view results — {cfg.dataset}, {method}", ""]
    if random_encoder:
        lines += ["**RANDOM IMAGE ENCODER (--image-encoder random): test/demo output, not a real result.**", ""]
    table, rows = results_table({method: results}, cfg.pro_limits)
    lines += table
    any_m = next(iter(results.values()), {})
    lines += ["", f"I-AUROC over per-image scores; P-AUROC over all pixels; AUPRO = exact PRO (8-connected GT regions), "
              f"integrated to the FPR limit and divided by it (metrics.md). Evaluation resolution: "
              f"{any_m.get('eval_res', 'native')}; per-image score normalisation: {any_m.get('score_norm', 'none')}.", ""]
    atomic_write_text(out / "results.md", "\n".join(lines))
    classes = sorted(results)
    _write_csv(out / "results.csv", [{k: ("" if v is None else v) for k, v in r.items()} for r in rows],
               ["method", "metric", *classes, "mean"])
    atomic_write_json(out / "results.json", _jsonable({"dataset": cfg.dataset, "method": method,
                                                       "random_image_encoder": random_encoder, "results": results}))


def run_single_view(cfg: DetectConfig) -> dict:
    """Execute a configured single-view run; returns ``{method: {class: metrics}}`` (empty unless evaluating)."""
    from detect.data.sim3d import SiM3DError
    from shared.config import save_config
    from shared.formats import FormatError

    runner = SingleViewRunner(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    results: dict[str, dict] = {}
    try:
        for class_name in runner.classes():
            if cfg.mode in ("all", "fit"):
                runner.fit(class_name)
            if cfg.mode in ("all", "predict"):
                runner.predict(class_name)
            if cfg.mode in ("all", "evaluate"):
                results[class_name] = runner.evaluate(class_name)
    except (SiM3DError, FormatError) as exc:  # bad or missing dataset files: the message names them
        raise SingleViewRunError(str(exc)) from None
    if not results:
        return {}
    random_encoder = runner.random_encoder or any(m.get("random_image_encoder") for m in results.values())
    write_single_view_results(out, cfg, results, random_encoder)
    return {method_name(cfg): results}
