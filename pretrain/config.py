"""DINO-Depth pretraining configuration (``../shared/spec/dino_depth.md`` §17).

Built-in defaults ← ``--config file.yaml`` ← command-line ``a.b=value`` overrides (see
:mod:`shared.config`). Key names follow upstream DINOv2 where a counterpart exists. The resolved
config is written to the run directory and embedded in every checkpoint.

Additions to the §17 table (all optional, defaults keep the paper recipe):

* ``student.img_size`` / ``embed_dim`` / ``depth`` / ``num_heads`` / ``mlp_ratio``: custom (tiny)
  backbones for tests and CPU presets; ``null`` = the value of ``student.arch``.
* ``data.modality`` ``depth`` (default) or ``image``; ``data.glob`` / ``data.list_file``: a plain
  folder source (``.npy`` depth maps, or 8-bit images in image mode) instead of shards.
* ``image_aug``: the DINOv2 photometric augmentations, used **only** in image mode.
* ``train.stop_at_iteration``: stop early (with a checkpoint) without changing the schedules,
  ``train.compile``, ``train.tensorboard``, ``train.eval_period`` (PCA images), ``train.device``.
* ``dist``: data-parallel strategy (DDP default, FSDP2 option), backend and collective timeout;
  ``slurm.job_name`` / ``mem_gb`` / ``folder`` / ``setup`` for ``pretrain/launch.py``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Literal

from shared.vit import ARCHS, ViTConfig

# Short names of §17 → shared.vit architecture names.
ARCH_ALIASES = {
    "vit_tiny": "vit_tiny_patch14",
    "vit_small": "vit_small_patch14",
    "vit_base": "vit_base_patch14",
    "vit_large": "vit_large_patch14",
}


@dataclass
class StudentConfig:
    arch: str = "vit_small"
    patch_size: int = 14
    in_chans: int = 1
    drop_path_rate: float = 0.1
    drop_path_uniform: bool = True
    layerscale: float | None = 1e-5
    num_register_tokens: int = 0
    qkv_bias: bool = True
    proj_bias: bool = True
    ffn_bias: bool = True
    interpolate_offset: float = 0.0
    interpolate_antialias: bool = False
    attn_impl: Literal["auto", "sdpa", "xformers", "naive"] = "auto"
    # Optional overrides of the architecture preset (tiny test / CPU backbones).
    img_size: int = 224  # reference size of the stored positional-embedding grid
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    mlp_ratio: float | None = None


@dataclass
class DinoConfig:
    head_n_prototypes: int = 65536
    head_bottleneck_dim: int = 256
    head_hidden_dim: int = 2048
    head_nlayers: int = 3
    loss_weight: float = 1.0
    koleo_loss_weight: float = 0.1


@dataclass
class IbotConfig:
    loss_weight: float = 1.0
    separate_head: bool = False
    mask_sample_probability: float = 0.5
    mask_ratio_min_max: tuple[float, float] = (0.1, 0.5)
    head_n_prototypes: int | None = None  # separate head only; null = dino.head_n_prototypes


@dataclass
class TeacherConfig:
    momentum_teacher: float = 0.992
    final_momentum_teacher: float = 1.0
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.07
    warmup_teacher_temp_epochs: float = 30


@dataclass
class OptimConfig:
    epochs: float = 100
    base_lr: float = 1e-3
    scaling_rule: Literal["sqrt_wrt_1024", "linear_wrt_1024", "none"] = "sqrt_wrt_1024"
    warmup_epochs: float = 10
    min_lr: float = 1e-6
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    layerwise_decay: float = 0.9
    patch_embed_lr_mult: float = 0.2
    clip_grad: float = 3.0
    freeze_last_layer_epochs: float = 1
    adamw_beta1: float = 0.9
    adamw_beta2: float = 0.999


@dataclass
class CropsConfig:
    global_crops_size: int = 224
    global_crops_scale: tuple[float, float] = (0.32, 1.0)
    local_crops_number: int = 8
    local_crops_size: int = 98
    local_crops_scale: tuple[float, float] = (0.05, 0.32)


@dataclass
class AugConfig:
    """Spatial augmentation (§8), shared by both modalities."""

    hflip_p: float = 0.5
    vflip_p: float = 0.5
    rot_p: float = 0.5
    rot_max_deg: float = 180.0
    rot90: bool = False
    rot_fill: Literal["invalid", "shrink"] = "invalid"
    interp: Literal["masked_bilinear", "nearest"] = "masked_bilinear"
    edge_thresh: float = 0.05
    min_crop_valid: float = 0.05
    min_sample_valid: float = 0.01
    # Where depth crops are warped: "device" = batched torch ops on the training device (workers send
    # maps + crop parameters, pretrain/device_augment.py), "numpy" = in the loader workers; "auto" =
    # device on CUDA, numpy otherwise. Same crops either way (bit-identical on CPU).
    warp_on: Literal["auto", "device", "numpy"] = "auto"


@dataclass
class ImageAugConfig:
    """DINOv2 photometric augmentations for ``data.modality: image`` (never applied to depth)."""

    color_jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2  # 3-channel only
    hue: float = 0.1  # 3-channel only
    grayscale_p: float = 0.2  # 3-channel only
    blur_kernel: int = 9
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    # The nominal DINOv2 probabilities (upstream's wrapper inverts them by mistake; we do not).
    blur_p_global1: float = 1.0
    blur_p_global2: float = 0.1
    blur_p_local: float = 0.5
    solarize_p_global2: float = 0.2
    solarize_threshold: float = 128 / 255
    # Input convention, recorded as the exported `input_norm`: x/255, optional division by the
    # per-image maximum (as detect's image preprocessing does), then (x - mean) / std.
    max_normalize: bool = True
    mean: list[float] = field(default_factory=lambda: [0.445])
    std: list[float] = field(default_factory=lambda: [0.269])


@dataclass
class DepthNormSettings:
    mode: Literal["nearness", "max"] = "nearness"
    eps: float = 0.1
    pct: tuple[float, float] = (0.5, 99.5)


@dataclass
class DataConfig:
    shards: list[str] = field(default_factory=list)
    sources: list[str] | None = None
    splits: list[str] = field(default_factory=lambda: ["train", "validation"])
    preset: str | None = None
    mode: Literal["indexed", "streaming"] = "indexed"
    source_weights: dict[str, float] | None = None
    depth_norm: DepthNormSettings = field(default_factory=DepthNormSettings)
    modality: Literal["depth", "image"] = "depth"
    # Plain folder source instead of shards: a glob (relative to the working dir or absolute) or a
    # text file listing one path per line. Depth: .npy float32 maps (NaN = invalid) of `folder_kind`.
    glob: str | None = None
    list_file: str | None = None
    folder_kind: Literal["metric_z", "rel_disparity"] = "metric_z"


@dataclass
class TrainConfig:
    centering: Literal["centering", "sinkhorn_knopp"] = "centering"
    center_momentum: float = 0.9
    student_temp: float = 0.1
    batch_size_per_gpu: int = 128
    epoch_length: int = 1250
    seed: int = 0
    num_workers: int = 8
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"  # CPU always runs fp32
    on_nonfinite: Literal["error", "skip"] = "error"
    ckpt_period: int = 1250
    keep: int = 3
    export_period: int = 12500
    log_period: int = 10
    output_dir: str | None = None
    # Additions.
    stop_at_iteration: int | None = None
    eval_period: int = 12500  # PCA-of-patch-features images; 0 disables
    eval_num_images: int = 4
    compile: bool = False
    tensorboard: bool = False
    progress: bool = True
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    deterministic: bool = False


@dataclass
class DistConfig:
    """Multi-process execution (§10); ignored by a single process. See ``pretrain/parallel.py``."""

    strategy: Literal["ddp", "fsdp"] = "ddp"  # fsdp: FSDP2 `fully_shard` per block, for larger backbones
    backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto: NCCL on CUDA, gloo on CPU
    # Rendezvous and every collective fail after this many seconds instead of hanging (a dead or stuck
    # rank). Must exceed the longest rank-0-only pause (checkpoint + export + PCA images).
    timeout_s: int = 900
    fsdp_reshard_after_forward: bool = True  # False: keep gathered params between forward and backward


@dataclass
class SlurmConfig:
    nodes: int = 1
    gpus_per_node: int | None = None  # required for submissions
    # Ranks per node: null = gpus_per_node (one per GPU), or 1 when gpus_per_node=0; with GPUs it must
    # equal gpus_per_node (each rank drives one GPU); on a CPU partition it sets the gloo ranks per node.
    tasks_per_node: int | None = None
    cpus_per_task: int = 10
    timeout_min: int = 2800
    signal_delay_s: int = 120
    max_num_timeout: int = 30
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    # Additions (pretrain/launch.py).
    job_name: str = "dinodepth"
    mem_gb: int | None = None  # null: the cluster default
    folder: str | None = None  # submitit logs and pickles; null: <train.output_dir>/submitit
    setup: list[str] = field(default_factory=list)  # shell lines run before the job (module load, ...)


@dataclass
class PretrainConfig:
    student: StudentConfig = field(default_factory=StudentConfig)
    dino: DinoConfig = field(default_factory=DinoConfig)
    ibot: IbotConfig = field(default_factory=IbotConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    crops: CropsConfig = field(default_factory=CropsConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    image_aug: ImageAugConfig = field(default_factory=ImageAugConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)

    # -- derived quantities -------------------------------------------------------------------------
    @property
    def total_iterations(self) -> int:
        return epochs_to_iterations(self.optim.epochs, self.train.epoch_length)

    def vit_config(self, teacher: bool = False) -> ViTConfig:
        """The backbone architecture; the teacher is built without stochastic depth."""
        s = self.student
        arch = ARCH_ALIASES.get(s.arch, s.arch)
        if arch not in ARCHS:
            raise ValueError(f"student.arch {s.arch!r} unknown; use one of {sorted(ARCH_ALIASES)}")
        overrides = {
            "img_size": s.img_size, "patch_size": s.patch_size, "in_chans": s.in_chans, "qkv_bias": s.qkv_bias,
            "proj_bias": s.proj_bias, "ffn_bias": s.ffn_bias, "layerscale": s.layerscale or None,
            "num_register_tokens": s.num_register_tokens,
            "drop_path_rate": 0.0 if teacher else s.drop_path_rate, "drop_path_uniform": s.drop_path_uniform,
            "interpolate_offset": s.interpolate_offset, "interpolate_antialias": s.interpolate_antialias,
            "attn_impl": s.attn_impl,
        }
        for key in ("embed_dim", "depth", "num_heads", "mlp_ratio"):
            if getattr(s, key) is not None:
                overrides[key] = getattr(s, key)
        return ViTConfig.from_arch(arch, **overrides)


def epochs_to_iterations(epochs: float, epoch_length: int) -> int:
    return round(epochs * epoch_length)


def validate(cfg: PretrainConfig, require_data: bool = True) -> None:
    """Reject settings that cannot work, with a message naming the key (``require_data``: a data
    source must be configured; False when the caller passes its own sample table)."""
    p = cfg.student.patch_size
    for key in ("global_crops_size", "local_crops_size"):
        size = getattr(cfg.crops, key)
        if size % p:
            raise ValueError(f"crops.{key}={size} is not a multiple of the patch size {p}")
    if cfg.student.img_size % p:
        raise ValueError(f"student.img_size={cfg.student.img_size} is not a multiple of the patch size {p}")
    if cfg.train.batch_size_per_gpu < 1:
        raise ValueError("train.batch_size_per_gpu must be >= 1")
    lo, hi = cfg.ibot.mask_ratio_min_max
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"ibot.mask_ratio_min_max must satisfy 0 <= min <= max <= 1, got {[lo, hi]}")
    if not 0.0 <= cfg.ibot.mask_sample_probability <= 1.0:
        raise ValueError("ibot.mask_sample_probability must be in [0, 1]")
    if cfg.total_iterations < 1:
        raise ValueError("optim.epochs * train.epoch_length must be at least 1 iteration")
    if cfg.data.modality == "depth" and cfg.student.in_chans != 1:
        raise ValueError("data.modality=depth needs student.in_chans=1 (one nearness channel)")
    if cfg.data.modality == "image":
        if cfg.student.in_chans not in (1, 3):
            raise ValueError("data.modality=image supports student.in_chans 1 or 3")
        for key in ("mean", "std"):
            values = getattr(cfg.image_aug, key)
            if len(values) not in (1, cfg.student.in_chans):
                raise ValueError(f"image_aug.{key} needs 1 or {cfg.student.in_chans} values, got {values}")
    if cfg.dist.timeout_s < 1:
        raise ValueError("dist.timeout_s must be at least 1 second")
    if cfg.train.centering not in ("centering", "sinkhorn_knopp"):
        raise ValueError(f"train.centering {cfg.train.centering!r} unknown")
    if cfg.data.mode != "indexed":
        raise ValueError("data.mode=streaming is not implemented in this trainer yet; use 'indexed'")
    if require_data and not cfg.data.shards and not cfg.data.glob and not cfg.data.list_file:
        raise ValueError("no training data: set data.shards (shard folders) or data.glob / data.list_file")
    if cfg.train.batch_size_per_gpu < 2 and cfg.dino.koleo_loss_weight > 0:
        warnings.warn("KoLeo needs at least 2 samples per rank: setting dino.koleo_loss_weight=0", stacklevel=2)
        cfg.dino.koleo_loss_weight = 0.0


def lr_scale(global_batch: int, rule: str) -> float:
    """Peak-lr multiplier for the global batch size G."""
    if rule == "sqrt_wrt_1024":
        return math.sqrt(global_batch / 1024)
    if rule == "linear_wrt_1024":
        return global_batch / 1024
    if rule == "none":
        return 1.0
    raise ValueError(f"optim.scaling_rule {rule!r} unknown")
