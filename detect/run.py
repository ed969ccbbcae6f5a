"""ModMap detection: train on one nominal instance per class, predict anomaly volumes, evaluate.

    python detect/run.py --ckpt dinodepth.pth --data DIR --image-encoder-weights dinov2_vitb14_reg4_pretrain.pth
    python -m detect.run --config configs/detect/paper.yaml --ckpt dinodepth.pth --data DIR epochs=100

Modes (``--mode``): ``fit`` (train the mapping networks of every class and setup), ``predict`` (per-view
maps, anomaly volumes and instance scores of the test instances), ``evaluate`` (metrics and the
per-class results table from the saved predictions), ``all`` (default: the three in order).
``python detect/run.py ablate --config configs/detect/ablate/tiny.yaml ...`` runs the paper's ablation
tables instead (:mod:`detect.ablate`).

Settings come from :class:`DetectConfig` defaults ← ``--config`` YAML ← ``--flag`` options ←
``key=value`` overrides; the resolved config is saved as ``<out>/config.yaml``. Outputs
(``../shared/spec/modmap.md`` §18)::

    <out>/config.yaml, results.md, results.csv, results.json
    <out>/<setup>/<class>/model.pt, train_log.jsonl, scores.csv, metrics.json, timing.json,
                          volumes/<instance>.npz (.ply), maps/<instance>/<view>_{img2depth,depth2img,combined}.npy (.png)
"""

if __package__ in (None, ""):  # run as a script: put the repo root on sys.path instead of the script dir
    import pathlib
    import sys

    sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import argparse
import csv
import dataclasses
import json
import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args, get_origin, get_type_hints

import numpy as np

# Light imports only at module level, so that `--help` and config errors answer instantly; torch and
# the model code are imported when a run starts.
from detect.metrics import DEFAULT_PRO_LIMITS
from shared.cli import ArgumentParser, fail, run_main
from shared.config import ConfigError, save_config
from shared.io import atomic_write_json, atomic_write_text

if TYPE_CHECKING:
    import torch

    from detect.features import FeatureExtractor
    from detect.model import ModMap

MODEL_FORMAT_VERSION = 1
SETUPS = ("real2real", "synth2real")
# Paper column names (Table 1) of the SiM3D classes, in the paper's order.
PAPER_COLUMNS = {
    "plastic_stool": "Pl. Stool", "rubbish_bin": "Rub. Bin", "wicker_vase": "W. Vase",
    "bathroom_forniture": "B. Furn.", "container": "Cont.", "plastic_vase": "Pl. Vase",
    "wooden_stool": "W. Stool", "sink_cabinet": "Sink Cab.",
}


class RunError(RuntimeError):
    """A user-facing problem with the inputs of a run (printed without a traceback)."""


@dataclass
class DetectConfig:
    """All settings of a detection run (defaults = the paper's, modmap.md §3–§18)."""

    mode: Literal["all", "fit", "predict", "evaluate"] = "all"
    # data
    data_root: str = ""
    classes: list[str] = field(default_factory=list)
    setup: Literal["real2real", "synth2real", "both"] = "real2real"
    view_order: Literal["auto", "natural", "lexicographic"] = "auto"
    calib_reader: str = "npz"
    gt_reader: str = "npz"
    out: str = "runs/detect"
    # encoders
    ckpt: str = ""
    depth_encoder: Literal["dino_depth", "dinov2_on_depth", "random"] = "dino_depth"
    image_encoder: Literal["dinov2_vitb14_reg4", "dinov2_vitb14", "auto", "random"] = "dinov2_vitb14_reg4"
    image_encoder_weights: str = ""
    random_encoder_arch: str = "vit_base_patch14"
    random_encoder_depth: int = 12
    image_size: int = 896
    depth_input_size: int = 0
    depth_token_resample: Literal["none", "bilinear"] = "none"
    encoder_dtype: Literal["fp32", "bf16"] = "fp32"
    encoder_batch_size: int = 4
    image_norm: Literal["gray", "imagenet"] = "gray"
    depth_norm: Literal["auto", "nearness", "max"] = "auto"
    depth_norm_eps: float | None = None
    depth_norm_pct: list[float] | None = None
    pad_mode: Literal["edge", "constant"] = "edge"
    feature_cache: bool = True
    cache_dir: str = ""
    cache_dtype: Literal["fp32", "fp16"] = "fp32"
    # training
    variant: Literal["modmap", "vc_cfm", "cfm"] = "modmap"
    epochs: int = 200
    batch_size: int = 48
    lr_max: float = 5e-4
    loss_mask: Literal["all", "foreground"] = "all"
    match_steps: bool = False
    modulator_hidden: int = 128
    multi_class: bool = False
    class_balanced: bool = False
    seed: int = 42
    # inference
    aggregation: Literal["max", "min", "prod", "mean"] = "max"
    blur_sigma: float = 0.0
    fg_connectivity: Literal[4, 8] = 4
    num_source_views: int = 0
    num_target_views: int = 0
    source_chunk: int = 0
    project_stride: int = 1
    voxel_size: float = 0.002
    # evaluation and outputs
    eval_domain: Literal["occupied", "grid"] = "occupied"
    pro_limits: list[float] = field(default_factory=lambda: list(DEFAULT_PRO_LIMITS))
    save_maps: Literal["none", "896", "input", "orig"] = "none"
    viz: bool = False
    save_ply: bool = False
    device: str = "auto"
    deterministic: bool = True
    progress: bool = True
    # single-view datasets (detect/single_view.py) and CMDR-IAD-style scoring (detect/cmdr.py)
    dataset: Literal["sim3d", "mvtec3d", "eyecandies", "sim3d_single"] = "sim3d"
    bg_removal: Literal["none", "plane", "ransac_dbscan"] = "none"
    single_views: list[str] = field(default_factory=list)
    train_splits: list[str] = field(default_factory=list)
    train_limit: int = 0
    eyecandies_image: int = 0
    eval_res: int = 0
    scoring: Literal["modmap", "cfm", "cmdr"] = "modmap"
    modality: Literal["both", "image", "depth"] = "both"
    missing_depth: Literal["ignore", "image_fallback"] = "ignore"
    score_norm: Literal["auto", "none", "cfm"] = "auto"
    cmdr_window: int = 7
    cmdr_epochs: int = 0
    cmdr_lr: float = 1e-3
    cmdr_batch_size: int = 8
    cmdr_hidden_ratio: float = 0.5
    cmdr_bottleneck_ratio: float = 0.25
    cmdr_kernel: int = 3
    cmdr_pre_sigma: float = -1.0
    cmdr_post_sigma: float = -1.0

    def validate(self) -> None:
        if self.mode != "evaluate" and self.image_size % 14:
            raise ConfigError(f"image_size {self.image_size} must be a multiple of 14")
        for name in ("epochs", "batch_size", "encoder_batch_size", "project_stride", "modulator_hidden"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("num_source_views", "num_target_views", "source_chunk", "depth_input_size"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0")
        if not self.voxel_size > 0:
            raise ConfigError("voxel_size must be > 0")
        if not self.data_root:
            raise ConfigError("--data (data_root) is required")
        if any(not 0 < a <= 1 for a in self.pro_limits):
            raise ConfigError(f"pro_limits must lie in (0, 1], got {self.pro_limits}")
        self._validate_scoring()

    def _validate_scoring(self) -> None:
        """Single-view datasets and the CMDR-IAD-style scoring options (detect/single_view.py, detect/cmdr.py)."""
        if self.modality != "both" and self.scoring != "cmdr":
            raise ConfigError(f"--modality {self.modality} needs --scoring cmdr (with one modality only its "
                              "reconstruction branch can score; the mapping needs both)")
        if self.missing_depth != "ignore" and (self.scoring != "cmdr" or self.modality != "both"):
            raise ConfigError("--missing-depth image_fallback needs --scoring cmdr with --modality both")
        if self.cmdr_window < 1 or self.cmdr_window % 2 == 0:
            raise ConfigError(f"cmdr_window must be a positive odd number of tokens, got {self.cmdr_window}")
        for name in ("cmdr_batch_size", "cmdr_kernel"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1")
        if self.cmdr_kernel % 2 == 0:
            raise ConfigError(f"cmdr_kernel must be odd, got {self.cmdr_kernel}")
        if self.train_limit < 0 or self.cmdr_epochs < 0 or self.eval_res < 0:
            raise ConfigError("train_limit, cmdr_epochs and eval_res must be >= 0")
        if self.dataset == "sim3d":
            if self.modality != "both":
                raise ConfigError(f"--modality {self.modality} is a single-view option (--dataset mvtec3d, "
                                  "eyecandies or sim3d_single): multiview volumes need depth and both branches")
            if self.scoring != "modmap" and self.multi_class:
                raise ConfigError(f"--scoring {self.scoring} is not available with --multi-class")
            if self.score_norm == "cfm":
                raise ConfigError("--score-norm cfm is per-image (single-view datasets); multiview volumes are not "
                                  "normalised")


# Help text of every setting (shown by --help); aliases are extra flag names.
FIELD_HELP: dict[str, str] = {
    'mode': 'what to run',
    'data_root': 'dataset root in the SiM3D layout (class folders)',
    'classes': 'classes to run (empty: every class under --data-root)',
    'setup': 'training setup',
    'view_order': 'view one-hot order (auto: lexicographic for SiM3D, natural for our synthetic benchmark)',
    'calib_reader': "calibration reader name; 'none' = 2D-only detection (no volumes)",
    'gt_reader': "GT volume reader name; 'none' = no voxel metrics",
    'out': 'output folder',
    'ckpt': 'DINO-Depth export (python -m pretrain.export ... --out dinodepth.pth)',
    'depth_encoder': "depth encoder (random: DINO-Depth's architecture, randomly initialised; ablations)",
    'image_encoder': "image encoder; 'random' only for tests/demos (marks every output)",
    'image_encoder_weights': 'local DINOv2 weights: official .pth, timm checkpoint or HF folder',
    'random_encoder_arch': 'architecture of --image-encoder random',
    'random_encoder_depth': 'blocks of --image-encoder random',
    'image_size': 'network input side (multiple of 14)',
    'depth_input_size': 'depth encoder input side (0: --image-size)',
    'depth_token_resample': 'resample depth tokens to the image grid',
    'encoder_dtype': 'encoder precision',
    'encoder_batch_size': 'views per encoder batch',
    'image_norm': 'image normalisation constants',
    'depth_norm': "depth normalisation (auto: the DINO-Depth checkpoint's input_norm mode)",
    'depth_norm_eps': 'nearness eps (default: from the checkpoint)',
    'depth_norm_pct': 'nearness percentiles (default: from the checkpoint)',
    'pad_mode': 'square padding of images and depth maps',
    'feature_cache': 'cache per-view tokens on disk',
    'cache_dir': 'feature cache folder (default <out>/features)',
    'cache_dtype': 'dtype of cached tokens',
    'variant': 'method variant (modmap.md §16)',
    'epochs': 'training epochs',
    'batch_size': 'view pairs per batch',
    'lr_max': 'OneCycleLR max learning rate',
    'loss_mask': 'tokens entering the loss',
    'match_steps': 'same-view variants: as many optimizer steps as modmap',
    'modulator_hidden': 'FiLM modulator hidden width',
    'multi_class': 'one model for all classes, class one-hot in the modulators (modmap.md §15)',
    'class_balanced': 'multi-class: resample pairs so every class contributes equally per epoch',
    'seed': 'random seed (init, pair shuffling, view subsampling)',
    'aggregation': 'modality combination Ξ',
    'blur_sigma': 'Gaussian smoothing of the upsampled maps (pixels at input size)',
    'fg_connectivity': "connectivity of the foreground's largest component",
    'num_source_views': 'source views per target (0: all)',
    'num_target_views': 'target views (0: all)',
    'source_chunk': 'sources per mapping batch (0: all at once)',
    'project_stride': 'back-project every k-th pixel row/column',
    'voxel_size': 'voxel edge in metres when no GT grid is available',
    'eval_domain': 'voxel evaluation domain (metrics.md §7)',
    'pro_limits': 'AUPRO integration limits',
    'save_maps': "save per-view maps (float16 .npy) at the input size ('896'/'input') or the original size",
    'viz': 'PNG overlays of the combined per-view maps',
    'save_ply': 'also write volumes as .ply point sets of voxel centres',
    'device': 'cpu, cuda, cuda:1, ... (auto: cuda when available)',
    'deterministic': 'deterministic algorithms where available',
    'progress': 'progress bars',
    'dataset': 'dataset layout: sim3d (multiview, volumes) or a single-view benchmark with 2D metrics '
               '(mvtec3d, eyecandies, sim3d_single = one view per instance of a SiM3D-layout root)',
    'bg_removal': 'mvtec3d: background removal of the xyz scans (in memory; the TIFFs are never rewritten)',
    'single_views': "sim3d_single: view stems used as single-view samples (empty: the first stem; 'all')",
    'train_splits': 'single-view training splits (mvtec3d: train,validation; eyecandies: train,val; '
                    'empty: train)',
    'train_limit': 'single-view: use at most this many training images, evenly spaced (0: all)',
    'eyecandies_image': 'eyecandies: which <idx>_image_<k>.png is the image (0 = all spotlights on)',
    'eval_res': 'single-view metrics resolution: 0 = GT native; R = CFM/CMDR parity (maps and GT at R×R)',
    'scoring': 'per-view scoring: modmap (1 - cos maps, Ξ), cfm (product of sqrt(2-2cos) maps, smoothing) '
               'or cmdr (CMDR-IAD reconstruction decoders + reliability-gated fusion)',
    'modality': "cmdr, single-view: 'image'/'depth' = that modality's reconstruction branch alone (the other "
                'modality is never read)',
    'missing_depth': 'cmdr: image_fallback = foreground holes without valid depth are scored by the image branch',
    'score_norm': 'single-view per-image normalisation (auto: cfm for cfm/cmdr scoring, none for modmap)',
    'cmdr_window': 'cmdr: reliability-gate window (tokens, odd)',
    'cmdr_epochs': 'cmdr: decoder training epochs (0: --epochs)',
    'cmdr_lr': 'cmdr: decoder Adam learning rate',
    'cmdr_batch_size': 'cmdr: decoder batch (views or images)',
    'cmdr_hidden_ratio': 'cmdr: decoder hidden width / feature dim',
    'cmdr_bottleneck_ratio': 'cmdr: decoder bottleneck width / feature dim',
    'cmdr_kernel': 'cmdr: decoder spatial kernel (tokens, odd)',
    'cmdr_pre_sigma': 'cmdr: smoothing of the image reconstruction distance, fraction of the image side '
                      '(-1: CMDR-IAD\'s 3.74 px at 224)',
    'cmdr_post_sigma': 'cfm/cmdr: smoothing of the final map, fraction of the image side (-1: 4.69 px at 224)',
}
FLAG_ALIASES: dict[str, str] = {'data_root': '--data'}


# -- command line ----------------------------------------------------------------------------------
def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python detect/run.py",
        description="ModMap multiview 3D anomaly detection (fit / predict / evaluate).",
        epilog="Any setting can also be given as key=value (e.g. epochs=10 classes=[vase,stool]). "
               "Precedence: defaults < --config YAML < flags < key=value.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", help="YAML file with settings (e.g. configs/detect/paper.yaml)")
    hints = get_type_hints(DetectConfig)
    for f in dataclasses.fields(DetectConfig):
        names = [_flag(f.name)]
        if f.name in FLAG_ALIASES:
            names.append(FLAG_ALIASES[f.name])
        hint = hints[f.name]
        kwargs: dict = {"dest": f.name, "default": argparse.SUPPRESS, "help": FIELD_HELP.get(f.name, "")}
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        kwargs["help"] += f" (default: {default})"
        if hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif get_origin(hint) is Literal:
            choices = get_args(hint)
            if all(isinstance(c, int) for c in choices):
                kwargs["type"] = int
            kwargs["choices"] = list(choices)
        elif get_origin(hint) is list or any(get_origin(a) is list for a in get_args(hint)):
            # comma-separated and/or repeated (never greedy: positional key=value stay overrides)
            kwargs["action"] = "append"
            kwargs["metavar"] = "A,B,..."
        parser.add_argument(*names, **kwargs)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return parser


def parse_config(argv: list[str] | None = None) -> DetectConfig:
    """Defaults ← ``--config`` YAML ← ``--flag`` options ← ``key=value`` overrides, then validated."""
    from shared.config import from_dict, load_yaml, merge_dicts, parse_overrides

    args = vars(build_parser().parse_args(argv))
    overrides = list(args.pop("overrides", []))
    hints = get_type_hints(DetectConfig)
    for name, value in list(args.items()):
        if name in hints and isinstance(value, list) and (get_origin(hints[name]) is list or any(
                get_origin(a) is list for a in get_args(hints[name]))):
            args[name] = [item.strip() for chunk in value for item in str(chunk).split(",") if item.strip()]
    config_path = args.pop("config", None)
    data = load_yaml(config_path) if config_path else {}
    data = merge_dicts(data, args)  # flag values are strings; from_dict converts and checks them
    data = merge_dicts(data, parse_overrides(overrides))
    cfg = from_dict(DetectConfig, data)
    cfg.validate()
    return cfg


# -- helpers ---------------------------------------------------------------------------------------
def _device(name: str) -> "torch.device":
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RunError(f"device {name} requested but CUDA is not available")
    return dev


def _bar(total: int, desc: str, enabled: bool, unit: str = "it"):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, leave=False, dynamic_ncols=True)


def _setups(cfg: DetectConfig) -> list[str]:
    return list(SETUPS) if cfg.setup == "both" else [cfg.setup]


def _class_dataset(cfg: DetectConfig, class_name: str):
    from detect.data.sim3d import SiM3DClass, SiM3DError

    try:
        return SiM3DClass(cfg.data_root, class_name, view_order=cfg.view_order,
                          calib_reader=None if cfg.calib_reader == "none" else cfg.calib_reader,
                          gt_reader=None if cfg.gt_reader == "none" else cfg.gt_reader)
    except (SiM3DError, KeyError) as exc:
        raise RunError(str(exc).strip("'\"")) from None


def _classes(cfg: DetectConfig) -> list[str]:
    from detect.data.sim3d import SiM3DError, list_classes

    try:
        available = list_classes(cfg.data_root)
    except SiM3DError as exc:
        raise RunError(str(exc)) from None
    if not cfg.classes:
        if not available:
            raise RunError(f"no class folders with instances under {cfg.data_root}")
        return available
    missing = [c for c in cfg.classes if c not in available]
    if missing:
        raise RunError(f"classes {missing} not found under {cfg.data_root}; available: {available}")
    return list(cfg.classes)


def _load_view(ds, record, view_id: int):
    from detect.data.sim3d import SiM3DError

    try:
        return ds.load_view(record, view_id)
    except SiM3DError as exc:
        msg = str(exc)
        if "calibration" in msg:
            msg += "\nhint: --calib-reader none runs 2D-only detection (per-view maps and I-AUROC, no volumes)"
        raise RunError(msg) from None


def _view_sources(ds, record) -> list:
    from detect.features import ViewSource

    def loader(i: int):
        def load():
            v = _load_view(ds, record, i)
            return v.image, v.depth
        return load

    return [ViewSource(vf.stem, loader(i), (str(vf.depth_path), str(vf.image_path)))
            for i, vf in enumerate(record.views)]


class Runner:
    """Holds the encoders and feature cache shared by every class of a run."""

    def __init__(self, cfg: DetectConfig) -> None:
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.device = _device(cfg.device)
        self._extractor: FeatureExtractor | None = None
        self._cache = None
        self.random_encoder = cfg.image_encoder == "random"
        self.depth_norm: dict = {}

    # -- encoders and features (built lazily: evaluate needs none) --------------------------------
    def extractor(self) -> "FeatureExtractor":
        from detect.encoders import load_depth_encoder, load_image_encoder
        from detect.features import FeatureCache, FeatureExtractor, FeatureSettings

        if self._extractor is not None:
            return self._extractor
        cfg = self.cfg
        image_enc = load_image_encoder(
            cfg.image_encoder, cfg.image_encoder_weights or None, cfg.encoder_dtype, self.device,
            random_arch=cfg.random_encoder_arch, random_overrides={"depth": cfg.random_encoder_depth},
            seed=cfg.seed)
        if image_enc.info.random:
            warnings.warn("--image-encoder random: randomly initialised image encoder, outputs are NOT real "
                          "results (tests/demos only)", stacklevel=2)
        depth_enc = None
        stored_norm: dict = {}
        if cfg.depth_encoder == "dino_depth":
            depth_enc = load_depth_encoder(cfg.ckpt or None, cfg.encoder_dtype, self.device)
            stored_norm = depth_enc.info.input_norm
        elif cfg.depth_encoder == "random":
            from detect.encoders import load_random_depth_encoder

            depth_enc = load_random_depth_encoder(cfg.ckpt or None, cfg.encoder_dtype, self.device, seed=cfg.seed)
            stored_norm = depth_enc.info.input_norm
        from shared.depth import DepthNormConfig

        base = DepthNormConfig.from_dict(stored_norm) if stored_norm else DepthNormConfig()
        mode = base.mode if cfg.depth_norm == "auto" else cfg.depth_norm
        eps = base.eps if cfg.depth_norm_eps is None else cfg.depth_norm_eps
        pct = tuple(base.pct if cfg.depth_norm_pct is None else cfg.depth_norm_pct)
        if len(pct) != 2:
            raise RunError(f"depth_norm_pct needs two percentiles, got {list(pct)}")
        if stored_norm and mode != stored_norm.get("mode", "nearness"):
            warnings.warn(f"depth normalisation {mode!r} differs from the one DINO-Depth was trained with "
                          f"({stored_norm.get('mode')!r})", stacklevel=2)
        self.depth_norm = {"mode": mode, "eps": float(eps), "pct": [float(p) for p in pct], "pad_mode": cfg.pad_mode}
        settings = FeatureSettings(
            image_size=cfg.image_size, depth_input_size=cfg.depth_input_size, image_norm=cfg.image_norm,
            depth_norm=mode, depth_eps=float(eps), depth_pct=(float(pct[0]), float(pct[1])),
            pad_mode=cfg.pad_mode, depth_encoder=cfg.depth_encoder, depth_token_resample=cfg.depth_token_resample,
            encoder_dtype=cfg.encoder_dtype)
        self._extractor = FeatureExtractor(image_enc, depth_enc, settings, cfg.encoder_batch_size)
        cache_dir = (Path(cfg.cache_dir) if cfg.cache_dir else self.out / "features") if cfg.feature_cache else None
        self._cache = FeatureCache(self._extractor, cache_dir, cfg.cache_dtype)
        return self._extractor

    def features(self, ds, record, desc: str):
        self.extractor()
        assert self._cache is not None
        sources = _view_sources(ds, record)
        bar = _bar(len(sources), f"encode {desc}", self.cfg.progress, "view")
        self._cache.progress = bar.update
        t0 = time.perf_counter()
        try:
            feats = self._cache.get(str(record.path.resolve()), sources)
        finally:
            bar.close()
        return feats, time.perf_counter() - t0

    def encoder_record(self) -> dict:
        ex = self.extractor()
        return {
            "image_encoder": ex.image_encoder.info.to_dict(),
            "depth_encoder": ex.depth_encoder.info.to_dict() | {"kind": self.cfg.depth_encoder},
            "depth_norm": dict(self.depth_norm),
            "feature_settings": ex.settings.to_dict(),
            "grid": list(ex.grid),
        }

    def class_dir(self, setup: str, class_name: str) -> Path:
        return self.out / setup / class_name

    # -- fit ------------------------------------------------------------------------------------
    def fit(self, setup: str, class_name: str) -> Path:
        from detect.modmap import TrainSettings, fit_modmap, total_training_steps
        from shared.checkpoint import save_checkpoint

        cfg = self.cfg
        ds = _class_dataset(cfg, class_name)
        from detect.data.sim3d import SiM3DError

        try:
            record = ds.train_record(setup)
        except SiM3DError as exc:
            raise RunError(str(exc)) from None
        feats, encode_s = self.features(ds, record, f"{class_name}/{record.name}")
        image, depth, valid = feats.tensors(self.device)
        settings = TrainSettings(variant=cfg.variant, epochs=cfg.epochs, batch_size=cfg.batch_size,
                                 lr_max=cfg.lr_max, loss_mask=cfg.loss_mask, match_steps=cfg.match_steps,
                                 modulator_hidden=cfg.modulator_hidden, seed=cfg.seed)
        _, _, total = total_training_steps(feats.n_views, settings)
        out_dir = self.class_dir(setup, class_name)
        out_dir.mkdir(parents=True, exist_ok=True)
        log_lines: list[str] = []
        bar = _bar(total, f"fit {setup}/{class_name}", cfg.progress, "step")

        def log(rec: dict) -> None:
            log_lines.append(json.dumps(rec))
            bar.set_postfix(loss=f"{rec['loss']:.4f}")

        t0 = time.perf_counter()
        try:
            model = fit_modmap(image, depth, settings, valid, log=log, progress=bar.update)
        finally:
            bar.close()
        train_s = time.perf_counter() - t0
        atomic_write_text(out_dir / "train_log.jsonl", "\n".join(log_lines) + "\n")
        meta = {
            "format_version": MODEL_FORMAT_VERSION, "variant": cfg.variant, "n_views": feats.n_views,
            "view_stems": feats.stems, "view_order": ds.view_order, "classes": [class_name],
            "class_name": class_name, "setup": setup, "train_instance": record.name,
            "image_dim": int(image.shape[-1]), "depth_dim": int(depth.shape[-1]),
            "modulator_hidden": cfg.modulator_hidden, "seed": cfg.seed,
            "train_settings": dataclasses.asdict(settings), "total_steps": total,
            "random_image_encoder": self.random_encoder, "train_seconds": round(train_s, 3),
            "encode_seconds": round(encode_s, 3), **self.encoder_record(),
        }
        meta["train_settings"]["betas"] = list(settings.betas)
        path = out_dir / "model.pt"
        save_checkpoint({**{k: {n: t.detach().cpu() for n, t in sd.items()}
                            for k, sd in model.component_state_dicts().items()}, "config": meta}, path)
        if cfg.scoring == "cmdr":  # CMDR-IAD reconstruction decoders on the same cached tokens (detect/cmdr.py)
            from detect.cmdr import fit_multiview_decoders

            fit_multiview_decoders(cfg, out_dir, image, depth, valid, feats.grid, meta,
                                   lambda n: _bar(n, f"fit decoders {setup}/{class_name}", cfg.progress, "step"))
        return path

    def load_model(self, setup: str, class_name: str, n_views: int, stems: list[str]) -> "tuple[ModMap, dict]":
        from detect.model import ModMap
        from shared.checkpoint import CheckpointError, load_checkpoint

        if self.cfg.multi_class:
            from detect.multiclass import load_multiclass_model

            return load_multiclass_model(self, setup, class_name, n_views, stems)
        path = self.class_dir(setup, class_name) / "model.pt"
        if not path.is_file():
            raise RunError(f"no trained model {path}: run --mode fit (or all) first")
        try:
            obj = load_checkpoint(path)
            meta = obj["config"]
            trained_views, trained_stems = int(meta["n_views"]), list(meta["view_stems"])
        except (CheckpointError, KeyError, TypeError) as exc:
            raise RunError(f"{path} is not a ModMap model file: {exc}") from None
        if trained_views != n_views or trained_stems != list(stems):
            raise RunError(f"view mismatch for {setup}/{class_name}: the model in {path} was trained on "
                           f"{trained_views} views {trained_stems} but the test instances have {n_views} "
                           f"views {stems}")
        try:
            model = ModMap(trained_views, int(meta["image_dim"]), int(meta["depth_dim"]),
                           int(meta["modulator_hidden"]), meta["variant"])
            model.load_component_state_dicts(obj)
        except (KeyError, RuntimeError, ValueError) as exc:
            raise RunError(f"{path} is not a ModMap model file: {exc}") from None
        self.check_model_meta(path, meta)
        return model.to(self.device).eval(), meta

    def check_model_meta(self, path: Path, meta: dict) -> None:
        """A model must be used with the encoders and preprocessing it was trained with."""
        current = self.encoder_record()
        for key in ("image_encoder", "depth_encoder"):
            if meta[key]["sha256"] != current[key]["sha256"]:
                raise RunError(f"{path} was trained with a different {key.replace('_', ' ')} "
                               f"({meta[key]['weights']}, sha256 {meta[key]['sha256'][:12]}…) than this run "
                               f"({current[key]['weights']}, {current[key]['sha256'][:12]}…)")
        if meta["feature_settings"] != current["feature_settings"]:
            raise RunError(f"{path} was trained with other preprocessing settings: {meta['feature_settings']} "
                           f"vs {current['feature_settings']}")

    # -- predict --------------------------------------------------------------------------------
    def predict(self, setup: str, class_name: str) -> None:
        from detect.metrics import SegmentationAccumulator
        from detect.modmap import InferenceSettings, predict_instance
        from detect.volume import bounding_grid

        cfg = self.cfg
        ds = _class_dataset(cfg, class_name)
        if not ds.test_records:
            raise RunError(f"class {class_name}: no test instances under {ds.path}")
        out_dir = self.class_dir(setup, class_name)
        model, model_meta = self.load_model(setup, class_name, ds.n_views, ds.stems)
        class_id = model_meta.get("class_index")  # multi-class models only
        from detect.cmdr import multiview_view_maps

        try:  # cfm/cmdr scoring (detect/cmdr.py); None = ModMap's own maps
            view_maps = multiview_view_maps(cfg, out_dir, self.encoder_record(), self.device)
        except (FileNotFoundError, ValueError) as exc:
            raise RunError(str(exc)) from None
        inf = InferenceSettings(aggregation=cfg.aggregation, blur_sigma=cfg.blur_sigma,
                                fg_connectivity=cfg.fg_connectivity, num_source_views=cfg.num_source_views,
                                num_target_views=cfg.num_target_views, source_chunk=cfg.source_chunk,
                                project_stride=cfg.project_stride, seed=cfg.seed)
        rows, timings = [], []
        pixel_acc = SegmentationAccumulator()
        has_pixel_gt = True
        no_volume_reason = None
        bar = _bar(len(ds.test_records), f"predict {setup}/{class_name}", cfg.progress, "instance")
        for record in ds.test_records:
            feats, encode_s = self.features(ds, record, f"{class_name}/{record.name}")
            image, depth, _ = feats.tensors(self.device)
            gt = ds.load_gt(record)
            grid = None
            if ds.has_calibration:
                if gt is not None:
                    grid = gt.grid
                else:
                    views = [(v.depth, v.calib) for v in (_load_view(ds, record, i) for i in range(ds.n_views))]
                    grid = bounding_grid(views, cfg.voxel_size, cfg.project_stride)
                    del views
            else:
                no_volume_reason = "no calibration reader (--calib-reader none): 2D-only detection"
            current: dict = {}

            def load(t: int, _rec=record, _cur=current):
                v = _load_view(ds, _rec, t)
                _cur["view"] = v
                return v.depth, v.calib

            def on_view(maps, combined_orig, _rec=record, _cur=current, _geoms=feats.geometries):
                nonlocal has_pixel_gt
                view = _cur["view"]
                if view.mask is not None and has_pixel_gt:
                    pixel_acc.add(combined_orig, view.mask)
                else:
                    has_pixel_gt = False
                self._save_maps(out_dir, _rec.name, view, maps, combined_orig, _geoms[maps.view])

            pred = predict_instance(model, image, depth, feats.grid, load, feats.geometries, cfg.image_size,
                                    self.depth_norm, inf, grid, on_view, class_id, view_maps)
            pred.timing.encode_s = encode_s
            if pred.volume is not None:
                vol_dir = out_dir / "volumes"
                vol_dir.mkdir(parents=True, exist_ok=True)
                pred.volume.save_npz(vol_dir / f"{record.name}.npz", label=np.int64(record.label),
                                     random_image_encoder=np.bool_(self.random_encoder))
                if cfg.save_ply:
                    write_volume_ply(pred.volume, vol_dir / f"{record.name}.ply")
            rows.append({"instance": record.name, "gt_label": record.label, "pred_score": pred.pred_score,
                         "pred_score_2d": pred.pred_score_2d,
                         "dropped_points": pred.volume.dropped if pred.volume is not None else 0})
            timings.append({"instance": record.name, **pred.timing.to_dict()})
            bar.update(1)
        bar.close()
        out_dir.mkdir(parents=True, exist_ok=True)
        _write_csv(out_dir / "scores.csv", rows, ["instance", "gt_label", "pred_score", "pred_score_2d",
                                                  "dropped_points"])
        mean = {k: float(np.mean([t[k] for t in timings])) for k in ("encode_s", "map_s", "volume_s")}
        atomic_write_json(out_dir / "timing.json", {
            "definition": "per instance; encode = preprocessing + both encoders (0 when cached), map = "
                          "min-ensembled per-view maps incl. upsampling/foreground/combination, volume = "
                          "undo geometry + back-projection + voxel max (modmap.md §13)",
            "device": str(self.device), "mean": mean, "instances": timings})
        extra = {"random_image_encoder": self.random_encoder, "volumes": no_volume_reason is None}
        if no_volume_reason:
            extra["no_volume_reason"] = no_volume_reason
            print(f"[{setup}/{class_name}] {no_volume_reason}", file=sys.stderr)
        if has_pixel_gt and pixel_acc.n_samples:
            px = pixel_acc.compute(cfg.pro_limits, prefix="pixel")
            extra["pixel"] = {"pixel_auroc": px["pixel_auroc"],
                              "pixel_aupro": {str(k): v for k, v in px["pixel_aupro"].items()},
                              "pixel_connectivity": px["connectivity"], "pixel_eval_domain": "all",
                              "pixel_eval_res": "original (GT native resolution)"}
        atomic_write_json(out_dir / "predict_info.json", extra)

    def _save_maps(self, out_dir: Path, instance: str, view, maps, combined_orig: np.ndarray, geom) -> None:
        cfg = self.cfg
        if cfg.save_maps == "none" and not cfg.viz:
            return
        from detect.preprocess import undo_geometry

        folder = out_dir / "maps" / instance
        folder.mkdir(parents=True, exist_ok=True)
        if cfg.save_maps in ("896", "input"):
            for name, m in (("img2depth", maps.img2depth), ("depth2img", maps.depth2img),
                            ("combined", maps.combined)):
                np.save(folder / f"{view.stem}_{name}.npy", m.detach().cpu().numpy().astype(np.float16))
        elif cfg.save_maps == "orig":
            for name, m in (("img2depth", maps.img2depth), ("depth2img", maps.depth2img)):
                np.save(folder / f"{view.stem}_{name}.npy", undo_geometry(m, geom).astype(np.float16))
            np.save(folder / f"{view.stem}_combined.npy", combined_orig.astype(np.float16))
        if cfg.viz:
            save_overlay(view.image, combined_orig, folder / f"{view.stem}_combined.png")

    # -- evaluate -------------------------------------------------------------------------------
    def evaluate(self, setup: str, class_name: str) -> dict:
        from detect.metrics import SegmentationAccumulator, instance_auroc
        from detect.volume import SparseVolume, resample_to_grid

        cfg = self.cfg
        out_dir = self.class_dir(setup, class_name)
        scores_path = out_dir / "scores.csv"
        if not scores_path.is_file():
            raise RunError(f"no predictions {scores_path}: run --mode predict (or all) first")
        with open(scores_path, newline="") as handle:
            rows = list(csv.DictReader(handle))
        info_path = out_dir / "predict_info.json"
        info = json.loads(info_path.read_text()) if info_path.is_file() else {}
        try:
            labels = np.array([int(r["gt_label"]) for r in rows])
            scores = np.array([float(r["pred_score"]) for r in rows])
        except (KeyError, ValueError) as exc:
            raise RunError(f"{scores_path} is not a ModMap scores file ({exc})") from None
        metrics: dict = {"class": class_name, "setup": setup, "n_instances": len(rows),
                         "n_anomalous": int(labels.sum()),
                         "random_image_encoder": bool(info.get("random_image_encoder", False))}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            metrics["image_auroc"] = instance_auroc(scores, labels)
        if info.get("pixel"):
            metrics.update(info["pixel"])
        ds = _class_dataset(cfg, class_name) if cfg.gt_reader != "none" else None
        if ds is not None and info.get("volumes", True):
            acc = SegmentationAccumulator()
            by_name = {r.name: r for r in ds.test_records}
            bar = _bar(len(rows), f"evaluate {setup}/{class_name}", cfg.progress, "instance")
            for r in rows:
                record = by_name.get(r["instance"])
                if record is None:
                    raise RunError(f"{scores_path}: instance {r['instance']} is not in the dataset {ds.path}")
                bar.update(1)
                gt = ds.load_gt(record)
                vol_path = out_dir / "volumes" / f"{r['instance']}.npz"
                try:
                    vol = SparseVolume.load(vol_path)
                except (FileNotFoundError, ValueError) as exc:
                    raise RunError(str(exc)) from None
                if gt is None:
                    if record.label:
                        warnings.warn(f"{class_name}/{record.name}: anomalous instance without a GT volume is "
                                      "left out of the voxel metrics", stacklevel=2)
                        continue
                    # A nominal instance without GT: every voxel of its own grid is nominal.
                    pred, labels, occ_gt, grid = vol.dense(), np.zeros(vol.grid.shape, bool), None, vol.grid
                else:
                    pred = resample_to_grid(vol.dense(), vol.grid, gt.grid)
                    labels, occ_gt, grid = gt.labels, gt.occupancy, gt.grid
                if cfg.eval_domain == "occupied":
                    if occ_gt is None:  # the voxels hit by valid depth (metrics.md §7), on the GT grid
                        occ_gt = resample_to_grid(vol.occupancy().astype(np.float32), vol.grid, grid) > 0
                    domain = occ_gt | labels
                else:
                    domain = None
                acc.add(pred, labels, domain)
            bar.close()
            if acc.n_samples:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    vox = acc.compute(cfg.pro_limits, prefix="voxel")
                metrics["voxel_auroc"] = vox["voxel_auroc"]
                metrics["voxel_aupro"] = {str(k): v for k, v in vox["voxel_aupro"].items()}
                metrics.update(pro_variant="exact", connectivity=vox["connectivity"], eval_domain=cfg.eval_domain,
                               n_voxels=vox["n_elements"], n_gt_regions=vox["n_regions"])
        atomic_write_json(out_dir / "metrics.json", _jsonable(metrics))
        return metrics


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return None if not math.isfinite(float(obj)) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def _write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow(r)
    atomic_write_text(path, buf.getvalue())


def save_overlay(image: np.ndarray, score_map: np.ndarray, path: Path, max_side: int = 1024) -> None:
    """The grayscale image with the anomaly map as a translucent colour layer (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import colormaps
    from PIL import Image

    img = image.astype(np.float32) / 255.0
    peak = float(score_map.max())
    norm = score_map / peak if peak > 0 else score_map
    color = colormaps["jet"](np.clip(norm, 0, 1))[..., :3]
    alpha = 0.5 * (norm > 0)[..., None]
    rgb = (1 - alpha) * img[..., None] + alpha * color
    pil = Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8))
    if max(pil.size) > max_side:
        pil.thumbnail((max_side, max_side))
    path.parent.mkdir(parents=True, exist_ok=True)
    pil.save(path)


def write_volume_ply(volume, path: Path) -> None:
    """Binary PLY of the hit voxels' centres with a float ``anomaly`` property."""
    hit = np.flatnonzero(volume.hit)
    idx = np.stack(np.unravel_index(hit, volume.grid.shape), axis=1)
    centres = volume.grid.centers(idx).astype(np.float32)
    data = np.empty(len(hit), dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("anomaly", "<f4")])
    data["x"], data["y"], data["z"] = centres.T
    data["anomaly"] = volume.scores[hit]
    header = ("ply\nformat binary_little_endian 1.0\n"
              f"element vertex {len(hit)}\nproperty float x\nproperty float y\nproperty float z\n"
              "property float anomaly\nend_header\n").encode()
    from shared.io import atomic_write_bytes

    atomic_write_bytes(path, header + data.tobytes())


# -- results tables --------------------------------------------------------------------------------
def _fmt(v: Any) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.3f}"


def write_results(out: Path, results: dict[str, dict[str, dict]], random_encoder: bool,
                  title: str = "ModMap results") -> None:
    """Per-class table in the layout of the paper's Table 1 (classes as columns + Mean) under ``title``."""
    classes = sorted({c for per in results.values() for c in per},
                     key=lambda c: (list(PAPER_COLUMNS).index(c) if c in PAPER_COLUMNS else len(PAPER_COLUMNS), c))
    headline = [("I-AUROC", lambda m: m.get("image_auroc")),
                ("V-AUPRO@1%", lambda m: (m.get("voxel_aupro") or {}).get("0.01"))]
    full = [("image_auroc", lambda m: m.get("image_auroc")), ("voxel_auroc", lambda m: m.get("voxel_auroc"))]
    for lim in ("0.3", "0.1", "0.05", "0.01"):
        full.append((f"voxel_aupro@{lim}", lambda m, lim=lim: (m.get("voxel_aupro") or {}).get(lim)))
    full += [("pixel_auroc", lambda m: m.get("pixel_auroc")),
             ("pixel_aupro@0.3", lambda m: (m.get("pixel_aupro") or {}).get("0.3"))]

    def mean(vals: list) -> float | None:
        ok = [v for v in vals if v is not None and math.isfinite(v)]
        return float(np.mean(ok)) if ok and len(ok) == len(vals) else None

    lines = [f"# {title}", ""]
    if random_encoder:
        lines += ["**RANDOM IMAGE ENCODER (--image-encoder random): test/demo output, not a real result.**", ""]
    cols = [PAPER_COLUMNS.get(c, c) for c in classes]
    lines.append("| Setup | Metric | " + " | ".join(cols) + " | Mean |")
    lines.append("|---|---|" + "---|" * (len(cols) + 1))
    csv_rows = []
    for setup, per in results.items():
        for name, get in headline:
            vals = [get(per[c]) if c in per else None for c in classes]
            lines.append(f"| {setup} | {name} | " + " | ".join(_fmt(v) for v in vals) + f" | {_fmt(mean(vals))} |")
        for name, get in full:
            vals = [get(per[c]) if c in per else None for c in classes]
            row = {"setup": setup, "metric": name, **{c: vals[i] for i, c in enumerate(classes)}, "mean": mean(vals)}
            csv_rows.append(row)
    lines += ["", "V-AUPRO@1% = exact voxel AUPRO at FPR 0.01 (metrics.md); eval domain: "
              + ", ".join(sorted({str(m.get('eval_domain')) for per in results.values() for m in per.values()})), ""]
    atomic_write_text(out / "results.md", "\n".join(lines))
    _write_csv(out / "results.csv", [{k: ("" if v is None else v) for k, v in r.items()} for r in csv_rows],
               ["setup", "metric", *classes, "mean"])
    atomic_write_json(out / "results.json", _jsonable({"random_image_encoder": random_encoder, "results": results}))


# -- main ------------------------------------------------------------------------------------------
def run(cfg: DetectConfig) -> dict:
    """Execute a configured run; returns ``{setup: {class: metrics}}`` (empty unless evaluating)."""
    import torch

    previous = (torch.are_deterministic_algorithms_enabled(),
                torch.is_deterministic_algorithms_warn_only_enabled())
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        return _run(cfg)
    finally:  # a library call must not leave global torch state changed
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


def _run(cfg: DetectConfig) -> dict:
    import torch

    torch.manual_seed(cfg.seed)
    if cfg.dataset != "sim3d":  # single-view benchmark, 2D metrics (N = 1: ModMap = CFM)
        from detect.single_view import run_single_view

        return run_single_view(cfg)
    runner = Runner(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    classes = _classes(cfg)
    results: dict[str, dict[str, dict]] = {}
    for setup in _setups(cfg):
        if cfg.multi_class and cfg.mode in ("all", "fit"):
            from detect.multiclass import fit_multiclass_run

            fit_multiclass_run(runner, setup, classes)
        for class_name in classes:
            if cfg.mode in ("all", "fit") and not cfg.multi_class:
                runner.fit(setup, class_name)
            if cfg.mode in ("all", "predict"):
                runner.predict(setup, class_name)
            if cfg.mode in ("all", "evaluate"):
                results.setdefault(setup, {})[class_name] = runner.evaluate(setup, class_name)
    if results:
        random_encoder = cfg.image_encoder == "random" or any(
            m.get("random_image_encoder") for per in results.values() for m in per.values())
        title = {"modmap": "ModMap results", "cfm": "ModMap with CFM scoring: results",
                 "cmdr": "ModMap with CMDR-IAD scoring: results"}[cfg.scoring]
        write_results(out, results, random_encoder, title)
    return results


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] == ["ablate"]:  # `python detect/run.py ablate ...` = `python detect/ablate.py ...`
        from detect.ablate import main as ablate_main

        return ablate_main(args[1:])
    try:
        cfg = parse_config(args)
    except ConfigError as exc:
        return fail(exc)
    import torch

    from detect.encoders import EncoderError
    from shared.checkpoint import CheckpointError
    from shared.memory import keep_freed_memory

    if cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()):
        keep_freed_memory()  # the CPU mapping stage then skips a first-touch page fault per page (performance.md)
    try:
        results = run(cfg)
    except (RunError, EncoderError, ConfigError, CheckpointError, FileNotFoundError) as exc:
        return fail(exc)
    if results:
        print((Path(cfg.out) / "results.md").read_text())
    print(f"outputs in {cfg.out} (resolved config: {Path(cfg.out) / 'config.yaml'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
