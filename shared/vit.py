"""DINOv2-style Vision Transformer with patch 14, built from timm layers.

One class serves both encoders of the toolkit (``../shared/spec/dino_depth.md`` §1,
``../shared/spec/modmap.md`` §3):

* DINO-Depth: ViT-S/14 with ``in_chans=1``, trained from scratch by ``pretrain/``;
* the image encoder: DINOv2 ViT-B/14 (optionally with 4 registers), loaded from the official
  ``.pth`` state dict or a timm checkpoint (:func:`convert_state_dict`); ``detect/encoders.py`` adds
  Hugging Face ``Dinov2Model`` folders.

The state-dict layout is flat and DINOv2-compatible (``cls_token``, ``pos_embed``, ``mask_token``,
``register_tokens``, ``patch_embed.proj.*``, ``blocks.{i}.{norm1,attn.qkv,attn.proj,ls1.gamma,norm2,
mlp.fc1,mlp.fc2,ls2.gamma}.*``, ``norm.*``), so official weights load without renaming.

Factories: :func:`create_vit` (``create_vit("vit_small_patch14", in_chans=1)``) and the same
architectures registered in timm (``timm.create_model("dinodepth_vit_small_patch14", in_chans=1)``).
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import asdict, dataclass, fields
from typing import Literal

import torch
import torch.nn.functional as F
from timm.layers import DropPath, LayerScale, Mlp, trunc_normal_
from timm.models import register_model
from torch import nn

AttnImpl = Literal["auto", "sdpa", "xformers", "naive"]

try:  # optional accelerator, never required
    from xformers.ops import memory_efficient_attention as _xformers_attention  # type: ignore

    XFORMERS_AVAILABLE = True  # importable; whether it *works* here is what xformers_works() probes
except Exception:  # ImportError, or a broken CUDA extension
    _xformers_attention = None
    XFORMERS_AVAILABLE = False

_XFORMERS_DEVICES = ("cuda",)  # device types xformers' kernels run on
_xformers_probes: dict[tuple[str, torch.dtype], bool] = {}
_xformers_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _xformers_warned:
        _xformers_warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


@torch.compiler.disable
def xformers_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether xformers' attention really runs here: a tiny forward on ``device`` in ``dtype``,
    compared with SDPA (cached per device and dtype). A build that imports but does not match the
    installed torch/CUDA fails here instead of at a model's first forward."""
    key = (str(device), dtype)
    if key not in _xformers_probes:
        ok, why = False, "xformers is not installed"
        if _xformers_attention is not None and torch.device(device).type in _XFORMERS_DEVICES:
            try:
                gen = torch.Generator(device="cpu").manual_seed(0)
                q, k, v = (torch.randn(1, 8, 2, 64, generator=gen).to(device, dtype) for _ in range(3))  # (B, N, H, D)
                out = _xformers_attention(q, k, v)
                ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
                ok = out.shape == q.shape and torch.allclose(out.float(), ref.transpose(1, 2).float(), atol=2e-2)
                why = "its output differs from SDPA's" if not ok else ""
            except Exception as exc:  # a mismatched build raises at the first call
                why = f"its first call failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        elif _xformers_attention is not None:
            why = f"xformers does not run on {torch.device(device).type}"
        _xformers_probes[key] = ok
        if not ok and _xformers_attention is not None:
            _warn_once(f"xformers is installed but not usable on {device} ({dtype}): {why}; using SDPA")
    return _xformers_probes[key]


# Architecture presets: (embed_dim, depth, num_heads, mlp_ratio). Head dim 64 as in DINOv2.
ARCHS: dict[str, tuple[int, int, int, float]] = {
    "vit_tiny_patch14": (192, 12, 3, 4.0),
    "vit_small_patch14": (384, 12, 6, 4.0),
    "vit_base_patch14": (768, 12, 12, 4.0),
    "vit_large_patch14": (1024, 24, 16, 4.0),
}


@dataclass
class ViTConfig:
    """Everything needed to rebuild a backbone; stored with every checkpoint (``arch`` record)."""

    arch: str = "vit_small_patch14"
    img_size: int = 224  # reference size of the stored positional-embedding grid (224/14 = 16)
    patch_size: int = 14
    in_chans: int = 1
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    proj_bias: bool = True
    ffn_bias: bool = True
    layerscale: float | None = 1e-5
    num_register_tokens: int = 0
    drop_path_rate: float = 0.0
    drop_path_uniform: bool = True
    interpolate_offset: float = 0.0
    interpolate_antialias: bool = False
    attn_impl: str = "auto"

    @classmethod
    def from_arch(cls, arch: str, **overrides) -> ViTConfig:
        if arch not in ARCHS:
            raise ValueError(f"unknown ViT architecture {arch!r}; known: {', '.join(ARCHS)}")
        embed_dim, depth, heads, mlp_ratio = ARCHS[arch]
        cfg = cls(arch=arch, embed_dim=embed_dim, depth=depth, num_heads=heads, mlp_ratio=mlp_ratio)
        return cfg.replace(**overrides)

    def replace(self, **overrides) -> ViTConfig:
        known = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown ViT config key(s) {unknown}; known: {sorted(known)}")
        data = asdict(self)
        data.update(overrides)
        return ViTConfig(**data)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ViTConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"architecture record has unknown key(s) {unknown}")
        return cls(**data)

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size


class Attention(nn.Module):
    """Multi-head self-attention; SDPA by default, xformers on CUDA when installed and allowed."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, proj_bias: bool = True,
                 attn_impl: AttnImpl = "auto") -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.attn_impl = attn_impl

    def _use_xformers(self, x: torch.Tensor) -> bool:
        """``auto``: xformers only where it is probed working (:func:`xformers_works`), else SDPA.
        ``xformers`` (e.g. recorded by an export trained with it): the same, with a warning when it
        falls back to SDPA — the same attention up to rounding, so such encoders load anywhere."""
        if self.attn_impl not in ("auto", "xformers"):
            return False
        usable = (x.device.type in _XFORMERS_DEVICES and _xformers_attention is not None
                  and xformers_works(x.device, x.dtype))
        if self.attn_impl == "xformers" and not usable:
            reason = "not installed" if _xformers_attention is None else f"not usable on {x.device.type}"
            _warn_once(f"attn_impl='xformers' but xformers is {reason}: falling back to SDPA")
        return usable

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)
        if self._use_xformers(x):
            q, k, v = qkv.unbind(2)  # (B, N, H, D): xformers' layout
            out = _xformers_attention(q, k, v).reshape(B, N, C)
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, D)
            if self.attn_impl == "naive":
                attn = (q * self.scale) @ k.transpose(-2, -1)
                out = attn.softmax(dim=-1) @ v
            else:
                out = F.scaled_dot_product_attention(q, k, v)
            out = out.transpose(1, 2).reshape(B, N, C)
        return self.proj(out)


class Block(nn.Module):
    """Pre-norm transformer block with LayerScale and per-sample stochastic depth."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, proj_bias: bool,
                 ffn_bias: bool, layerscale: float | None, drop_path: float, attn_impl: AttnImpl) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias, attn_impl=attn_impl)
        self.ls1 = LayerScale(dim, init_values=layerscale) if layerscale else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU, bias=ffn_bias)
        self.ls2 = LayerScale(dim, init_values=layerscale) if layerscale else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


class PatchEmbed(nn.Module):
    """Conv patchifier (no norm) that accepts any input size divisible by the patch size."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        if x.ndim != 4:
            raise ValueError(f"expected an input batch (B, C, H, W), got shape {tuple(x.shape)}")
        _, C, H, W = x.shape
        if C != self.in_chans:
            raise ValueError(f"input has {C} channel(s) but the model was built with in_chans={self.in_chans}")
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"input size {H}x{W} is not divisible by the patch size {p}")
        x = self.proj(x)  # (B, D, h, w)
        return x.flatten(2).transpose(1, 2), (H // p, W // p)


class DinoVisionTransformer(nn.Module):
    """ViT backbone with DINOv2 token assembly: patches (mask token where masked) → cls → pos → registers."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        dim = cfg.embed_dim
        self.embed_dim = self.num_features = dim
        self.patch_size = cfg.patch_size
        self.num_register_tokens = cfg.num_register_tokens
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, dim)
        grid = cfg.grid_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, dim))
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, cfg.num_register_tokens, dim)) if cfg.num_register_tokens else None
        )
        self.mask_token = nn.Parameter(torch.zeros(1, dim))
        if cfg.drop_path_uniform:
            rates = [cfg.drop_path_rate] * cfg.depth
        else:
            rates = torch.linspace(0, cfg.drop_path_rate, cfg.depth).tolist()
        self.blocks = nn.ModuleList(
            Block(dim, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias, cfg.proj_bias, cfg.ffn_bias,
                  cfg.layerscale, rate, cfg.attn_impl)  # type: ignore[arg-type]
            for rate in rates
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self._pos_cache: dict = {}
        self._interp_matrices: dict = {}
        self.pos_interpolation = "auto"  # see _deterministic_pos_interpolation
        self.init_weights()

    # -- initialisation ---------------------------------------------------------------------------
    def init_weights(self) -> None:
        trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        nn.init.zeros_(self.mask_token)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    # -- positional embedding ---------------------------------------------------------------------
    def interpolate_pos_encoding(self, h: int, w: int, dtype: torch.dtype) -> torch.Tensor:
        """Positional embedding (1, 1 + h·w, D) for an h×w patch grid (bicubic, in fp32)."""
        stored = self.pos_embed.shape[1] - 1
        g = int(round(math.sqrt(stored)))
        if (h, w) == (g, g):
            return self.pos_embed.to(dtype)
        # Cached in eval mode; the key includes the tensor version so loading new weights invalidates it.
        key = (h, w, dtype, self.pos_embed.device, self.pos_embed._version, self.pos_embed.data_ptr(),
               self.pos_interpolation)
        if not self.training and not torch.is_grad_enabled() and key in self._pos_cache:
            return self._pos_cache[key]
        cls_pos = self.pos_embed[:, :1].float()
        patch_pos = self.pos_embed[:, 1:].float().reshape(1, g, g, -1).permute(0, 3, 1, 2)
        offset = self.cfg.interpolate_offset
        if offset:
            # DINO v1 legacy kept by the non-register DINOv2 hub models.
            kwargs = {"scale_factor": ((h + offset) / g, (w + offset) / g)}
        else:
            kwargs = {"size": (h, w)}
        if self._deterministic_pos_interpolation():
            patch_pos = self._linear_map_interpolation(patch_pos, h, w, kwargs)
        else:
            patch_pos = F.interpolate(patch_pos, mode="bicubic", antialias=self.cfg.interpolate_antialias,
                                      align_corners=False, **kwargs)
        if patch_pos.shape[-2:] != (h, w):
            raise RuntimeError(f"positional-embedding interpolation gave {tuple(patch_pos.shape[-2:])}, wanted {(h, w)}")
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, h * w, -1)
        out = torch.cat([cls_pos, patch_pos], dim=1).to(dtype)
        if not self.training and not torch.is_grad_enabled():
            if len(self._pos_cache) > 16:
                self._pos_cache.clear()
            self._pos_cache[key] = out
        return out

    def _deterministic_pos_interpolation(self) -> bool:
        """Bicubic ``F.interpolate`` has no deterministic CUDA backward: under
        ``torch.use_deterministic_algorithms(True)`` with gradients, interpolate as a matrix
        product instead (:meth:`_linear_map_interpolation`). ``pos_interpolation`` = "bicubic" /
        "matmul" forces one (not part of the architecture record: same function up to rounding)."""
        mode = self.pos_interpolation
        if mode == "auto":
            return (torch.are_deterministic_algorithms_enabled() and torch.is_grad_enabled()
                    and self.pos_embed.requires_grad)
        if mode not in ("bicubic", "matmul"):
            raise ValueError(f"pos_interpolation must be auto, bicubic or matmul, got {mode!r}")
        return mode == "matmul"

    def _linear_map_interpolation(self, patch_pos: torch.Tensor, h: int, w: int, kwargs: dict) -> torch.Tensor:
        """The same bicubic resampling as ``F.interpolate`` (antialias and offset included) as one
        matrix product ``P · M``: interpolation is linear, so M (g², h·w) is ``F.interpolate`` of the g²
        basis images, computed once in float64 and cached. Matmul has a deterministic backward. Agrees
        with ``F.interpolate`` to float32 rounding (tests)."""
        _, D, g, g2 = patch_pos.shape
        key = (g, g2, h, w, tuple(sorted(kwargs.items())), self.cfg.interpolate_antialias, patch_pos.device)
        if key not in self._interp_matrices:
            basis = torch.eye(g * g2, dtype=torch.float64).reshape(g * g2, 1, g, g2)
            images = F.interpolate(basis, mode="bicubic", antialias=self.cfg.interpolate_antialias,
                                   align_corners=False, **kwargs)
            self._interp_matrices[key] = (images.reshape(g * g2, -1).to(patch_pos.device, torch.float32),
                                          tuple(images.shape[-2:]))
        matrix, out_hw = self._interp_matrices[key]
        return torch.matmul(patch_pos.reshape(1, D, g * g2), matrix).reshape(1, D, *out_hw)

    # -- forward ----------------------------------------------------------------------------------
    def prepare_tokens(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
        tokens, (h, w) = self.patch_embed(x)
        if masks is not None:
            if masks.shape != tokens.shape[:2]:
                raise ValueError(f"mask shape {tuple(masks.shape)} does not match the token grid {tuple(tokens.shape[:2])}")
            tokens = torch.where(masks.unsqueeze(-1), self.mask_token.to(tokens.dtype).unsqueeze(0), tokens)
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1).to(tokens.dtype), tokens], dim=1)
        tokens = tokens + self.interpolate_pos_encoding(h, w, tokens.dtype)
        if self.register_tokens is not None:
            regs = self.register_tokens.expand(tokens.shape[0], -1, -1).to(tokens.dtype)
            tokens = torch.cat([tokens[:, :1], regs, tokens[:, 1:]], dim=1)
        return tokens, (h, w)

    def forward_features(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> dict:
        tokens, grid = self.prepare_tokens(x, masks)
        for block in self.blocks:
            tokens = block(tokens)
        normed = self.norm(tokens)
        r = self.num_register_tokens
        return {
            "x_norm_clstoken": normed[:, 0],
            "x_norm_regtokens": normed[:, 1:r + 1],
            "x_norm_patchtokens": normed[:, r + 1:],
            "x_prenorm": tokens,
            "masks": masks,
            "grid": grid,
        }

    def forward(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> dict:
        return self.forward_features(x, masks)

    def get_patch_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Normalised patch tokens (B, h·w, D) (cls and registers dropped) and the grid (h, w)."""
        out = self.forward_features(x)
        return out["x_norm_patchtokens"], out["grid"]

    def arch_record(self) -> dict:
        return self.cfg.to_dict()


def create_vit(arch: str = "vit_small_patch14", **overrides) -> DinoVisionTransformer:
    """Build a backbone by name (``vit_{tiny,small,base,large}_patch14``) with config overrides."""
    return DinoVisionTransformer(ViTConfig.from_arch(arch, **overrides))


def vit_from_config(cfg: ViTConfig | dict) -> DinoVisionTransformer:
    """Rebuild a backbone from its stored architecture record."""
    return DinoVisionTransformer(cfg if isinstance(cfg, ViTConfig) else ViTConfig.from_dict(cfg))


# timm registry entries, so `timm.create_model("dinodepth_vit_small_patch14", in_chans=1)` works.
def _timm_factory(arch: str):
    def factory(pretrained: bool = False, **kwargs) -> DinoVisionTransformer:
        if pretrained:
            raise ValueError("no download here: load weights with shared.vit.load_backbone_weights(path)")
        kwargs.pop("pretrained_cfg", None)
        kwargs.pop("pretrained_cfg_overlay", None)
        kwargs.pop("cache_dir", None)
        if "reg_tokens" in kwargs:
            kwargs["num_register_tokens"] = kwargs.pop("reg_tokens")
        if "init_values" in kwargs:
            kwargs["layerscale"] = kwargs.pop("init_values")
        return create_vit(arch, **kwargs)

    factory.__name__ = f"dinodepth_{arch}"
    factory.__doc__ = f"DINOv2-layout {arch} (see shared.vit)."
    return factory


for _arch in ARCHS:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # re-registration on module reload
        globals()[f"dinodepth_{_arch}"] = register_model(_timm_factory(_arch))


# -- loading weights from the common checkpoint forms ---------------------------------------------
_PREFIXES = ("module.", "backbone.", "model.", "encoder.", "_orig_mod.")


def convert_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Bring an official-DINOv2, upstream-teacher or timm state dict into our flat DINOv2 layout.

    Handles: wrapper prefixes (``module.``, ``backbone.``, ``teacher.backbone.`` …), the chunked block
    layout ``blocks.{chunk}.{i}``, timm's ``reg_token`` (timm folds the cls positional entry into
    ``cls_token`` and drops it from ``pos_embed`` for register models: we restore an equivalent
    layout with a zero cls positional entry), and drops heads and other non-backbone keys.
    """
    sd = dict(state_dict)
    for prefix in ("teacher.backbone.", "student.backbone."):
        if any(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if sd and all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
                changed = True
    # Chunked FSDP layout blocks.{c}.{i}.… → blocks.{i}.…
    chunked = re.compile(r"^blocks\.(\d+)\.(\d+)\.(.*)$")
    if any(chunked.match(k) for k in sd):
        sd = {(f"blocks.{m.group(2)}.{m.group(3)}" if (m := chunked.match(k)) else k): v for k, v in sd.items()}
    if "reg_token" in sd:  # timm register model (no_embed_class)
        reg = sd.pop("reg_token")
        sd["register_tokens"] = reg
        pos = sd["pos_embed"]
        n = pos.shape[1]
        if int(math.isqrt(n)) ** 2 == n:  # no cls entry: cls position was folded into cls_token
            sd["pos_embed"] = torch.cat([torch.zeros_like(pos[:, :1]), pos], dim=1)
    keep = re.compile(r"^(cls_token|pos_embed|mask_token|register_tokens|patch_embed\.|blocks\.\d+\.|norm\.)")
    sd = {k: v for k, v in sd.items() if keep.match(k)}
    # timm's LayerScale is also `gamma`; older timm checkpoints may use `ls1.scale_factor` — rare: skip.
    return sd


def infer_config_from_state_dict(state_dict: dict[str, torch.Tensor], **overrides) -> ViTConfig:
    """Derive the architecture from tensor shapes (for checkpoints without an architecture record)."""
    sd = convert_state_dict(state_dict)
    if "patch_embed.proj.weight" not in sd or "pos_embed" not in sd:
        raise ValueError("state dict holds no ViT backbone (no patch_embed.proj.weight / pos_embed)")
    w = sd["patch_embed.proj.weight"]
    embed_dim, in_chans, patch, _ = w.shape
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    grid = int(math.isqrt(sd["pos_embed"].shape[1] - 1))
    mlp_hidden = sd["blocks.0.mlp.fc1.weight"].shape[0]
    regs = sd["register_tokens"].shape[1] if "register_tokens" in sd else 0
    arch = next((name for name, (d, n, _, _) in ARCHS.items() if d == embed_dim and n == depth), "custom")
    cfg = ViTConfig(
        arch=arch, img_size=grid * patch, patch_size=patch, in_chans=in_chans, embed_dim=embed_dim,
        depth=depth, num_heads=max(1, embed_dim // 64), mlp_ratio=mlp_hidden / embed_dim,
        qkv_bias="blocks.0.attn.qkv.bias" in sd, proj_bias="blocks.0.attn.proj.bias" in sd,
        ffn_bias="blocks.0.mlp.fc1.bias" in sd,
        layerscale=1e-5 if "blocks.0.ls1.gamma" in sd else None, num_register_tokens=regs,
    )
    return cfg.replace(**overrides)


def load_backbone_weights(model: DinoVisionTransformer, state_dict: dict[str, torch.Tensor], source: str = "weights") -> None:
    """Load converted weights strictly (mask token optional: inference-only exports may omit it).

    Raises a ValueError listing missing and unexpected keys and shape mismatches.
    """
    from shared.checkpoint import check_state_dict_compat

    sd = convert_state_dict(state_dict)
    own = model.state_dict()
    if "mask_token" not in sd:
        sd["mask_token"] = own["mask_token"]
    check_state_dict_compat(own, sd, source)
    model.load_state_dict(sd, strict=True)
