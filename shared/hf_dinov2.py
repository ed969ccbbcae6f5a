"""Hugging Face ``Dinov2Model`` / ``Dinov2WithRegistersModel`` ↔ the flat DINOv2 layout of
:mod:`shared.vit`, both directions, and the ``config.json`` that goes with it.

Reading (detection's ``--image-encoder-weights`` / ``--ckpt`` HF folders, :mod:`shared.encoder_export`)
and writing (``python -m pretrain.export --format hf``) share this one mapping.

Names: transformers ≥ 5 calls the attention projections ``attention.{q,k,v,o}_proj``, older releases
``attention.attention.{query,key,value}`` / ``attention.output.dense``; both are read, and writing
uses the names of the installed transformers (the weights are loaded into a freshly built model and
saved by ``save_pretrained``, so the folder is exactly what that version writes).

Positional-embedding interpolation at other input sizes (the only place the two implementations may
differ): transformers' ``Dinov2Model`` resizes bicubically to the target grid without antialias
(our ``interpolate_offset=0, interpolate_antialias=False``), ``Dinov2WithRegistersModel`` with
antialias (``interpolate_antialias=True``). At the stored grid both are the identity.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from shared.vit import ViTConfig


class HFDinov2Error(ValueError):
    """Not a (supported) Hugging Face DINOv2 model or state dict."""


HF_MODEL_TYPES = ("dinov2", "dinov2_with_registers")
_HF_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
_HF_LAYER_MAP = {
    "norm1.weight": "norm1.weight", "norm1.bias": "norm1.bias",
    "norm2.weight": "norm2.weight", "norm2.bias": "norm2.bias",
    "layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma",
    "mlp.fc1.weight": "mlp.fc1.weight", "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight", "mlp.fc2.bias": "mlp.fc2.bias",
    # attention output projection: transformers ≥ 5 (o_proj) and older releases (output.dense)
    "attention.o_proj.weight": "attn.proj.weight", "attention.o_proj.bias": "attn.proj.bias",
    "attention.output.dense.weight": "attn.proj.weight", "attention.output.dense.bias": "attn.proj.bias",
}
_HF_QKV = {  # (new name, old name) per projection
    "q": ("attention.q_proj", "attention.attention.query"),
    "k": ("attention.k_proj", "attention.attention.key"),
    "v": ("attention.v_proj", "attention.attention.value"),
}
_HF_DIRECT = {
    "embeddings.cls_token": "cls_token",
    "embeddings.mask_token": "mask_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.register_tokens": "register_tokens",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}


def is_hf_dinov2_state_dict(state_dict: dict[str, torch.Tensor]) -> bool:
    return any(k.startswith(("embeddings.patch_embeddings.", "dinov2.embeddings.")) for k in state_dict)


def hf_dinov2_to_dinov2(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face ``Dinov2Model``/``Dinov2WithRegistersModel`` state dict → flat DINOv2 layout.

    Handles both attention namings, the ``dinov2.`` prefix of task models (heads are dropped), and
    refuses SwiGLU models (ViT-g), which the ViT of :mod:`shared.vit` lacks.
    """
    sd = dict(state_dict)
    if any(k.startswith("dinov2.") for k in sd):
        sd = {k[len("dinov2."):]: v for k, v in sd.items() if k.startswith("dinov2.")}
    if any(".mlp.weights_in." in k or ".mlp.w12." in k for k in sd):
        raise HFDinov2Error("SwiGLU DINOv2 (ViT-g) checkpoints are not supported; use ViT-S/B/L weights")
    out: dict[str, torch.Tensor] = {}
    layers: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        if key in _HF_DIRECT:
            out[_HF_DIRECT[key]] = value
            continue
        m = _HF_LAYER.match(key)
        if m:
            layers.setdefault(int(m.group(1)), {})[m.group(2)] = value
    for i, layer in sorted(layers.items()):
        for hf_name, ours in _HF_LAYER_MAP.items():
            if hf_name in layer:
                out[f"blocks.{i}.{ours}"] = layer[hf_name]
        for suffix in ("weight", "bias"):
            parts = []
            for new, old in _HF_QKV.values():
                t = layer.get(f"{new}.{suffix}", layer.get(f"{old}.{suffix}"))
                if t is not None:
                    parts.append(t)
            if len(parts) == 3:
                out[f"blocks.{i}.attn.qkv.{suffix}"] = torch.cat(parts, dim=0)
            elif parts:
                raise HFDinov2Error(f"layer {i}: incomplete q/k/v {suffix} tensors in the Hugging Face state dict")
    if "pos_embed" not in out or "patch_embed.proj.weight" not in out:
        raise HFDinov2Error("not a Hugging Face DINOv2 state dict (no embeddings found)")
    return out


def dinov2_to_hf_dinov2(state_dict: dict[str, torch.Tensor], cfg: ViTConfig,
                        hf_keys: list[str]) -> dict[str, torch.Tensor]:
    """Flat DINOv2 state dict → the keys ``hf_keys`` of a Hugging Face model built for ``cfg`` (so the
    names are those of the installed transformers). Without LayerScale the HF ``lambda1`` is 1
    (identity), which is exact."""
    hf: dict[str, torch.Tensor] = {}
    inverse_direct = {v: k for k, v in _HF_DIRECT.items()}
    for ours, key in inverse_direct.items():
        if ours in state_dict:
            hf[key] = state_dict[ours]
    dim = cfg.embed_dim
    for i in range(cfg.depth):
        prefix = f"encoder.layer.{i}."
        for hf_name, ours in _HF_LAYER_MAP.items():
            if prefix + hf_name in hf_keys:
                src = f"blocks.{i}.{ours}"
                if src in state_dict:
                    hf[prefix + hf_name] = state_dict[src]
                elif ours.startswith(("ls1.", "ls2.")):  # no LayerScale in our model: scale 1
                    hf[prefix + hf_name] = torch.ones(dim)
        for suffix in ("weight", "bias"):
            qkv = state_dict.get(f"blocks.{i}.attn.qkv.{suffix}")
            if qkv is None:
                continue
            for chunk, (new, old) in zip(qkv.split(dim, dim=0), _HF_QKV.values()):
                name = prefix + (f"{new}.{suffix}" if prefix + f"{new}.{suffix}" in hf_keys else f"{old}.{suffix}")
                hf[name] = chunk
    return {k: v.contiguous() for k, v in hf.items()}


def hf_config_dict(cfg: ViTConfig) -> dict:
    """The ``Dinov2Config`` / ``Dinov2WithRegistersConfig`` fields describing ``cfg``; refuses what the
    Hugging Face models cannot express (bias-free projections)."""
    if not (cfg.proj_bias and cfg.ffn_bias):
        raise HFDinov2Error("transformers' DINOv2 always has attention-output and MLP biases; this model has "
                            f"proj_bias={cfg.proj_bias}, ffn_bias={cfg.ffn_bias} and cannot be exported to it")
    if not float(cfg.mlp_ratio).is_integer():  # transformers' Dinov2Config takes an integer ratio
        raise HFDinov2Error(f"mlp_ratio {cfg.mlp_ratio} is not an integer, which transformers' DINOv2 requires")
    if cfg.embed_dim % cfg.num_heads:
        raise HFDinov2Error(f"embed_dim {cfg.embed_dim} is not divisible by num_heads {cfg.num_heads}")
    out = {
        "model_type": "dinov2_with_registers" if cfg.num_register_tokens else "dinov2",
        "hidden_size": cfg.embed_dim, "num_hidden_layers": cfg.depth, "num_attention_heads": cfg.num_heads,
        "mlp_ratio": int(cfg.mlp_ratio), "hidden_act": "gelu", "layer_norm_eps": 1e-6,
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "drop_path_rate": 0.0,
        "image_size": cfg.img_size, "patch_size": cfg.patch_size, "num_channels": cfg.in_chans,
        "qkv_bias": cfg.qkv_bias, "layerscale_value": float(cfg.layerscale or 1.0), "use_swiglu_ffn": False,
    }
    if cfg.num_register_tokens:
        out["num_register_tokens"] = cfg.num_register_tokens
    return out


def hf_interpolation(model_type: str) -> dict:
    """Our interpolation settings that match transformers' positional-embedding resizing."""
    return {"interpolate_offset": 0.0, "interpolate_antialias": model_type == "dinov2_with_registers"}


def vit_config_from_hf(hf_cfg: dict, where: str) -> dict:
    """:class:`shared.vit.ViTConfig` overrides that tensor shapes cannot tell, checked for what the ViT of
    :mod:`shared.vit` supports (GELU, LayerNorm eps 1e-6, no SwiGLU)."""
    overrides: dict = {}
    if hf_cfg.get("num_attention_heads"):  # head count is not visible in the tensor shapes
        overrides["num_heads"] = int(hf_cfg["num_attention_heads"])
    if abs(float(hf_cfg.get("layer_norm_eps", 1e-6)) - 1e-6) > 1e-12:
        raise HFDinov2Error(f"{where}: layer_norm_eps {hf_cfg['layer_norm_eps']} differs from DINOv2's 1e-6")
    if hf_cfg.get("hidden_act", "gelu") != "gelu":
        raise HFDinov2Error(f"{where}: activation {hf_cfg['hidden_act']!r} is not supported (DINOv2 uses gelu)")
    if hf_cfg.get("use_swiglu_ffn"):
        raise HFDinov2Error(f"{where}: SwiGLU DINOv2 (ViT-g) models are not supported; use ViT-S/B/L weights")
    return overrides


def read_hf_folder(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict, list[Path]]:
    """A Hugging Face DINOv2 folder (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``,
    sharded or not) → (its state dict, the parsed config, the weight files read). Never unpickles code."""
    from shared.checkpoint import load_checkpoint

    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise HFDinov2Error(f"{folder} is a folder without config.json: not a Hugging Face model folder")
    try:
        hf_cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as exc:
        raise HFDinov2Error(f"{cfg_path}: unreadable config ({exc})") from None
    if hf_cfg.get("model_type") not in HF_MODEL_TYPES:
        raise HFDinov2Error(f"{cfg_path}: model_type {hf_cfg.get('model_type')!r} is not a DINOv2 model")
    files: list[Path] = []
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            files = sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
            break
    if not files:
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (folder / name).is_file():
                files = [folder / name]
                break
    if not files:
        raise HFDinov2Error(f"{folder} holds no model.safetensors or pytorch_model.bin")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        obj = load_checkpoint(f)
        inner = obj.get("model", obj) if isinstance(obj.get("model"), dict) else obj
        sd.update({k: v for k, v in inner.items() if isinstance(v, torch.Tensor)})
    return sd, hf_cfg, files


__all__ = [
    "HFDinov2Error",
    "HF_MODEL_TYPES",
    "dinov2_to_hf_dinov2",
    "hf_config_dict",
    "hf_dinov2_to_dinov2",
    "hf_interpolation",
    "is_hf_dinov2_state_dict",
    "read_hf_folder",
    "vit_config_from_hf",
]
