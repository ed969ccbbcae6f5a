"""Frozen encoders for ModMap (``../shared/spec/modmap.md`` §3): DINOv2 image encoder and DINO-Depth.

Image encoder (``--image-encoder``):

* ``dinov2_vitb14_reg4`` (default) / ``dinov2_vitb14``: DINOv2 ViT-B/14 with / without 4 registers;
* ``auto``: any DINOv2-layout ViT, architecture inferred from the weights (tests, other sizes), or an
  image encoder exported by our own ``pretrain/`` in image mode (``input_norm.modality == "image"``;
  rebuilt from its stored architecture record, a 1-channel one is spread over the 3 gray channels);
* ``random``: randomly initialised (tests and demos only; every output is marked as such).

Weights (``--image-encoder-weights``) are read from a local file or folder (or a Hugging Face hub id,
downloaded and cached where there is internet: :func:`shared.hub.resolve_model_path`), in any of
the common forms: the official DINOv2 ``.pth`` state dict, a timm checkpoint (``.pth``/``.bin``/
``.safetensors``, ``reg_token`` layout), or a Hugging Face ``Dinov2Model`` /
``Dinov2WithRegistersModel`` folder (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``,
sharded or not). All of them are converted to the flat DINOv2 layout of :mod:`shared.vit`.
Positional embeddings are interpolated bicubically with offset 0 + antialias for register models and
offset 0.1 without antialias for plain models (the official DINOv2 hub behaviour).

Depth encoder: the DINO-Depth export given by ``--ckpt`` (:func:`shared.encoder_export.load_dinodepth`: a
``dinodepth.pth``/``.safetensors`` file, the Hugging Face folder of ``pretrain.export --format hf``, or its
hub id),
``dinov2_on_depth`` (the image encoder applied to the normalised depth replicated to 3 channels), or
``random`` (:func:`load_random_depth_encoder`: DINO-Depth's architecture, randomly initialised — the
"random init" row of the depth-encoder ablation).

Both run frozen (eval mode, no grad). :func:`check_token_grids` refuses encoders whose token grids
differ at the configured input sizes.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from shared.checkpoint import CheckpointError, file_sha256, load_checkpoint
from shared.encoder_export import export_sha256
from shared.hf_dinov2 import (
    HFDinov2Error,
    hf_dinov2_to_dinov2,
    is_hf_dinov2_state_dict,
    read_hf_folder,
    vit_config_from_hf,
)
from shared.hub import resolve_model_path
from shared.vit import (
    DinoVisionTransformer,
    ViTConfig,
    convert_state_dict,
    create_vit,
    infer_config_from_state_dict,
    load_backbone_weights,
    vit_from_config,
)

IMAGE_ENCODERS: tuple[str, ...] = ("dinov2_vitb14_reg4", "dinov2_vitb14", "auto", "random")
DEPTH_ENCODERS: tuple[str, ...] = ("dino_depth", "dinov2_on_depth", "cnn_on_depth", "random")
# Depth "encoders" that are the image encoder applied to the depth replicated to 3 channels.
IMAGE_ENCODER_ON_DEPTH: tuple[str, ...] = ("dinov2_on_depth", "cnn_on_depth")
# Expected architecture of the named image encoders: (embed_dim, depth, patch, registers).
_NAMED_IMAGE_ENCODERS = {"dinov2_vitb14_reg4": (768, 12, 14, 4), "dinov2_vitb14": (768, 12, 14, 0)}
EXPECTED_DEPTH_ARCH = "DINO-Depth ViT-S/14 export (vit_small_patch14, in_chans=1, embed 384, 12 blocks)"


class EncoderError(ValueError):
    """Missing, malformed or mismatched encoder weights, or incompatible encoders."""


@dataclass
class EncoderInfo:
    """What an encoder is, for checkpoints, caches and reports."""

    name: str
    weights: str  # path, or "random"
    sha256: str  # of the weights file(s); of the initial tensors for random encoders
    arch: dict = field(default_factory=dict)
    input_norm: dict = field(default_factory=dict)
    random: bool = False

    def to_dict(self) -> dict:
        return {"name": self.name, "weights": self.weights, "sha256": self.sha256, "arch": self.arch,
                "input_norm": self.input_norm, "random": self.random}


class FrozenEncoder(nn.Module):
    """A :class:`DinoVisionTransformer` in eval mode without gradients, returning patch tokens."""

    def __init__(self, backbone: DinoVisionTransformer, info: EncoderInfo, dtype: str = "fp32") -> None:
        super().__init__()
        self.backbone = backbone.eval().requires_grad_(False)
        self.info = info
        if dtype not in ("fp32", "bf16"):
            raise EncoderError(f"encoder dtype must be 'fp32' or 'bf16', got {dtype!r}")
        self.dtype_name = dtype
        self.train(False)

    @property
    def patch_size(self) -> int:
        return self.backbone.patch_size

    @property
    def embed_dim(self) -> int:
        return self.backbone.embed_dim

    @property
    def in_chans(self) -> int:
        return self.backbone.cfg.in_chans

    def grid(self, input_size: int) -> tuple[int, int]:
        if input_size % self.patch_size:
            raise EncoderError(f"input size {input_size} is not a multiple of the patch size {self.patch_size} "
                               f"of {self.info.name}")
        return (input_size // self.patch_size, input_size // self.patch_size)

    def train(self, mode: bool = True) -> FrozenEncoder:  # frozen: stays in eval mode
        return super().train(False)

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Patch tokens (B, h·w, D) float32 (``x_norm_patchtokens``) and the grid (h, w)."""
        device = next(self.backbone.parameters()).device
        x = x.to(device, non_blocking=True)
        if self.dtype_name == "bf16":
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
                tokens, grid = self.backbone.get_patch_tokens(x)
        else:
            tokens, grid = self.backbone.get_patch_tokens(x.float())
        return tokens.float(), grid


# -- weight files ----------------------------------------------------------------------------------
def _sha256_of(paths: list[Path]) -> str:
    if len(paths) == 1:
        return file_sha256(paths[0])
    digest = hashlib.sha256()
    for p in sorted(paths):
        digest.update(file_sha256(p).encode())
    return digest.hexdigest()


def tensors_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """Hash of tensor names, shapes and values (for encoders without a weights file)."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach().cpu().contiguous()
        digest.update(key.encode())
        digest.update(str(tuple(t.shape)).encode())
        digest.update(t.float().numpy().tobytes())
    return digest.hexdigest()


def _unwrap_state_dict(obj: dict, source: str) -> dict[str, torch.Tensor]:
    """The tensor dict inside a loaded checkpoint (``model``/``state_dict``/``teacher``… wrappers)."""
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    for key in ("model", "state_dict", "model_state_dict", "teacher", "module", "model_ema", "state_dict_ema"):
        inner = obj.get(key)
        if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            return inner
    raise EncoderError(f"{source} holds no state dict of tensors (keys: {sorted(obj)[:10]})")


def read_encoder_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict, list[Path]]:
    """Read encoder weights from a file or a Hugging Face folder → (flat DINOv2 state dict, overrides
    for :class:`shared.vit.ViTConfig`, files read)."""
    path = Path(path)
    if not path.exists():
        raise EncoderError(f"image encoder weights {path} do not exist")
    overrides: dict = {}
    if path.is_dir():
        try:  # the Hugging Face mapping lives in shared/ (pretrain's export writes the same folders)
            raw, hf_cfg, files = read_hf_folder(path)
            overrides.update(vit_config_from_hf(hf_cfg, str(path)))
        except HFDinov2Error as exc:
            raise EncoderError(str(exc)) from None
    else:
        try:
            raw = _unwrap_state_dict(load_checkpoint(path), str(path))
        except CheckpointError as exc:
            raise EncoderError(str(exc)) from None
        files = [path]
    if is_hf_dinov2_state_dict(raw):
        try:
            raw = hf_dinov2_to_dinov2(raw)
        except HFDinov2Error as exc:
            raise EncoderError(f"{path}: {exc}") from None
    sd = convert_state_dict(raw)
    if "patch_embed.proj.weight" not in sd:
        raise EncoderError(f"{path} holds no ViT backbone (no patch embedding): not DINOv2 weights")
    return sd, overrides, files


def _interp_settings(num_registers: int) -> dict:
    # modmap §3: register models interpolate with offset 0 + antialias, plain models with offset 0.1.
    if num_registers:
        return {"interpolate_offset": 0.0, "interpolate_antialias": True}
    return {"interpolate_offset": 0.1, "interpolate_antialias": False}


def _check_named_arch(name: str, cfg: ViTConfig, weights: str | os.PathLike) -> None:
    """A named image encoder (``dinov2_vitb14_reg4``…) must be the architecture its name promises."""
    if name not in _NAMED_IMAGE_ENCODERS:
        return
    dim, depth, patch, regs = _NAMED_IMAGE_ENCODERS[name]
    got = (cfg.embed_dim, cfg.depth, cfg.patch_size, cfg.num_register_tokens)
    if got != (dim, depth, patch, regs):
        raise EncoderError(
            f"{weights} does not hold {name} (expected ViT-B/14: embed {dim}, {depth} blocks, patch {patch}, "
            f"{regs} registers; found embed {got[0]}, {got[1]} blocks, patch {got[2]}, {got[3]} registers). "
            "Pass the matching --image-encoder (dinov2_vitb14_reg4 / dinov2_vitb14 / auto).")


def is_pretrain_image_export(path: str | os.PathLike) -> bool:
    """True for an encoder exported by our ``pretrain/`` in image mode (``input_norm.modality == "image"``).

    Only peeks: safetensors metadata, or a memory-mapped ``torch.load``, so that a 300 MB DINOv2 file
    is not read twice. Anything it cannot peek into is left to :func:`read_encoder_weights`.
    """
    import pickle

    path = Path(path)
    if not path.is_file():
        return False
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                raw = (handle.metadata() or {}).get("input_norm")
            norm = json.loads(raw) if raw else None
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            norm = obj.get("input_norm") if isinstance(obj, dict) else None
    except (OSError, RuntimeError, ValueError, pickle.UnpicklingError):  # not ours / not a zip checkpoint
        return False
    return isinstance(norm, dict) and norm.get("modality") == "image"


def _load_pretrain_image_export(name: str, path: Path, dtype: str, device: str | torch.device) -> FrozenEncoder:
    """Our image-mode export, rebuilt from its architecture record (the head count is not visible in
    the tensor shapes, so inferring it as for DINOv2 files would be wrong for custom sizes)."""
    import warnings

    from detect.preprocess import GRAY_MEAN, GRAY_STD
    from shared.encoder_export import load_dinodepth

    try:
        backbone, input_norm = load_dinodepth(path)
    except (CheckpointError, ValueError, KeyError, TypeError) as exc:
        raise EncoderError(f"cannot load the image encoder exported by pretrain/ from {path}: {exc}") from None
    cfg = backbone.cfg
    _check_named_arch(name, cfg, path)
    if cfg.in_chans not in (1, 3):
        raise EncoderError(f"{path}: an image encoder takes 1 or 3 input channels, found {cfg.in_chans}")
    if cfg.in_chans == 1:
        # detect feeds grayscale as 3 identical channels: a third of the 1-channel patch embedding on
        # each gives exactly the pretrained response (and the channel mean for colour images).
        state = backbone.state_dict()
        state["patch_embed.proj.weight"] = state["patch_embed.proj.weight"].repeat(1, 3, 1, 1) / 3
        cfg = cfg.replace(in_chans=3)
        backbone = vit_from_config(cfg)
        backbone.load_state_dict(state)
    mean, std = list(input_norm.get("mean", [])), list(input_norm.get("std", []))
    if not input_norm.get("max_normalize", False) or any(
            abs(m - GRAY_MEAN) > 1e-6 for m in mean) or any(abs(s - GRAY_STD) > 1e-6 for s in std):
        warnings.warn(f"{path} was pretrained with input_norm {input_norm}; detect's default image "
                      f"preprocessing (--image-norm gray) is x/max, (x - {GRAY_MEAN}) / {GRAY_STD}", stacklevel=3)
    info = EncoderInfo(name, str(path), file_sha256(path), cfg.to_dict(), dict(input_norm))
    return FrozenEncoder(backbone, info, dtype).to(device)


def load_image_encoder(name: str = "dinov2_vitb14_reg4", weights: str | os.PathLike | None = None,
                       dtype: str = "fp32", device: str | torch.device = "cpu",
                       random_arch: str = "vit_base_patch14", random_overrides: dict | None = None,
                       seed: int = 0) -> FrozenEncoder:
    """Build the frozen image encoder; see the module docstring for ``name`` and ``weights``."""
    if name not in IMAGE_ENCODERS:
        raise EncoderError(f"unknown image encoder {name!r}; expected one of {IMAGE_ENCODERS}")
    if name == "random":
        overrides = {"in_chans": 3, "num_register_tokens": 4, "img_size": 518, "layerscale": 1.0,
                     **(random_overrides or {})}
        overrides.update(_interp_settings(overrides["num_register_tokens"]))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            backbone = create_vit(random_arch, **overrides)
        info = EncoderInfo("random", "random", tensors_sha256(backbone.state_dict()), backbone.cfg.to_dict(),
                           random=True)
        return FrozenEncoder(backbone, info, dtype).to(device)
    if not weights:
        raise EncoderError(
            f"the image encoder {name} needs local weights: pass --image-encoder-weights PATH with the "
            "official DINOv2 state dict (e.g. dinov2_vitb14_reg4_pretrain.pth from the DINOv2 release), a timm "
            "checkpoint, or a Hugging Face folder saved from facebook/dinov2-with-registers-base "
            "(Dinov2WithRegistersModel.from_pretrained(...).save_pretrained(DIR)), or where there is internet the hub "
            "id facebook/dinov2-with-registers-base. "
            "For tests and demos only: --image-encoder random.")
    weights = resolve_model_path(weights)  # a hub id → its local snapshot where there is internet
    if is_pretrain_image_export(weights):
        return _load_pretrain_image_export(name, Path(weights), dtype, device)
    sd, overrides, files = read_encoder_weights(weights)
    try:
        cfg = infer_config_from_state_dict(sd, **overrides)
    except ValueError as exc:
        raise EncoderError(f"{weights}: {exc}") from None
    cfg = cfg.replace(**_interp_settings(cfg.num_register_tokens), drop_path_rate=0.0)
    _check_named_arch(name, cfg, weights)
    if cfg.in_chans != 3:
        raise EncoderError(f"{weights}: the image encoder must take 3 input channels, found {cfg.in_chans}")
    backbone = vit_from_config(cfg)
    try:
        load_backbone_weights(backbone, sd, source=str(weights))
    except (CheckpointError, ValueError) as exc:
        raise EncoderError(str(exc)) from None
    info = EncoderInfo(name, str(weights), _sha256_of(files), cfg.to_dict())
    return FrozenEncoder(backbone, info, dtype).to(device)


def load_depth_encoder(ckpt: str | os.PathLike | None, dtype: str = "fp32",
                       device: str | torch.device = "cpu") -> FrozenEncoder:
    """The DINO-Depth encoder exported by ``pretrain.export`` (``--ckpt``), frozen; ``info.input_norm``
    carries the stored depth normalisation (mode, eps, pct)."""
    if not ckpt:
        raise EncoderError(f"--ckpt is required: the {EXPECTED_DEPTH_ARCH} written by "
                           "`python -m pretrain.export --ckpt RUN --out dinodepth.pth`")
    path = resolve_model_path(ckpt)  # a hub id → its local snapshot; a folder = a Hugging Face export
    if not path.exists():
        raise EncoderError(f"DINO-Depth checkpoint {path} does not exist (expected the {EXPECTED_DEPTH_ARCH})")
    from shared.encoder_export import load_dinodepth

    try:
        backbone, input_norm = load_dinodepth(path)
    except (CheckpointError, ValueError, KeyError, TypeError) as exc:
        raise EncoderError(f"cannot load the depth encoder from {path}: {exc}\n"
                           f"expected the {EXPECTED_DEPTH_ARCH} with keys model/config/input_norm") from None
    if backbone.cfg.in_chans != 1:
        raise EncoderError(f"{path}: the depth encoder takes {backbone.cfg.in_chans} input channels; DINO-Depth "
                           f"has 1 (expected the {EXPECTED_DEPTH_ARCH})")
    if input_norm.get("modality", "depth") != "depth":
        raise EncoderError(f"{path}: input_norm says modality {input_norm.get('modality')!r}, not a depth encoder")
    info = EncoderInfo("dino_depth", str(path), export_sha256(path), backbone.cfg.to_dict(), dict(input_norm))
    return FrozenEncoder(backbone, info, dtype).to(device)


def load_random_depth_encoder(like: str | os.PathLike | None = None, dtype: str = "fp32",
                              device: str | torch.device = "cpu", arch: str = "vit_small_patch14",
                              seed: int = 0) -> FrozenEncoder:
    """A randomly initialised 1-channel depth encoder (depth-encoder ablation, "random init").

    With ``like`` (a DINO-Depth export) the architecture and the stored depth normalisation are taken
    from it, so that the comparison with the pretrained encoder changes the weights only; otherwise
    ``arch`` with one input channel and the default normalisation. Seeded: the same ``seed`` gives the
    same weights (and so the same feature-cache key).
    """
    from shared.encoder_export import default_depth_input_norm

    if like:
        path = resolve_model_path(like)
        if not path.exists():
            raise EncoderError(f"DINO-Depth checkpoint {path} does not exist (its architecture defines the random "
                               "depth encoder; without --ckpt a ViT-S/14 with one input channel is used)")
        from shared.encoder_export import load_dinodepth

        try:
            template, input_norm = load_dinodepth(path)
        except (CheckpointError, ValueError, KeyError, TypeError) as exc:
            raise EncoderError(f"cannot read the architecture of {path}: {exc}") from None
        cfg = template.cfg
        del template
    else:
        cfg = ViTConfig.from_arch(arch, in_chans=1)
        input_norm = default_depth_input_norm()
    if cfg.in_chans != 1:
        raise EncoderError(f"a depth encoder takes 1 input channel, the template has {cfg.in_chans}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone = vit_from_config(cfg.replace(drop_path_rate=0.0))
    info = EncoderInfo("random_depth", "random", tensors_sha256(backbone.state_dict()), backbone.cfg.to_dict(),
                       dict(input_norm), random=True)
    return FrozenEncoder(backbone, info, dtype).to(device)


TokenResample = Literal["none", "bilinear"]


def check_token_grids(image_encoder: FrozenEncoder, depth_encoder: FrozenEncoder, image_size: int,
                      depth_input_size: int, resample: TokenResample = "none") -> tuple[int, int]:
    """Token grid shared by both encoders; a clear error when they differ and no resampling is allowed.

    Token k of the image must describe the same image location as token k of the depth map (§3).
    """
    g_img = image_encoder.grid(image_size)
    g_dep = depth_encoder.grid(depth_input_size)
    if g_img != g_dep and resample == "none":
        raise EncoderError(
            f"token grids differ: the image encoder ({image_encoder.info.name}, patch {image_encoder.patch_size}) "
            f"gives {g_img[0]}×{g_img[1]} tokens at {image_size} px, the depth encoder "
            f"({depth_encoder.info.name}, patch {depth_encoder.patch_size}) gives {g_dep[0]}×{g_dep[1]} at "
            f"{depth_input_size} px. ModMap compares token k of one modality with token k of the other, so the "
            f"grids must match: set --depth-input-size {g_img[0] * depth_encoder.patch_size} (so that the depth "
            f"grid is {g_img[0]}×{g_img[1]}) or --depth-token-resample bilinear.")
    if resample not in ("none", "bilinear"):
        raise EncoderError(f"unknown token resampling {resample!r}")
    return g_img


def resample_tokens(tokens: torch.Tensor, grid_from: tuple[int, int], grid_to: tuple[int, int]) -> torch.Tensor:
    """(B, h·w, D) tokens bilinearly resampled to another grid (``--depth-token-resample bilinear``)."""
    if tuple(grid_from) == tuple(grid_to):
        return tokens
    B, _, D = tokens.shape
    x = tokens.transpose(1, 2).reshape(B, D, *grid_from)
    x = torch.nn.functional.interpolate(x, size=tuple(grid_to), mode="bilinear", align_corners=False)
    return x.reshape(B, D, -1).transpose(1, 2).contiguous()


__all__ = [
    "DEPTH_ENCODERS",
    "IMAGE_ENCODERS",
    "EncoderError",
    "EncoderInfo",
    "FrozenEncoder",
    "ViTConfig",
    "check_token_grids",
    "hf_dinov2_to_dinov2",
    "is_pretrain_image_export",
    "load_depth_encoder",
    "load_image_encoder",
    "load_random_depth_encoder",
    "read_encoder_weights",
    "resample_tokens",
    "tensors_sha256",
]
