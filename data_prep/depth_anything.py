"""Depth-Anything-V2 relative depth through Hugging Face transformers (data_formats.md §6).

The model predicts **relative inverse depth** (disparity-like, larger = nearer, unknown scale and
shift). It is stored raw as ``kind: rel_disparity``; only the per-image nearness normalisation of
:mod:`shared.depth` makes it comparable across images and model sizes. Never invert it to metres.
"""

from __future__ import annotations

import os
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import numpy as np

if TYPE_CHECKING:
    import torch

# torch is imported inside the functions: `python data_prep/pseudo_depth.py --help` must not load it.
# Default Large, as data_formats.md §6 decides: the paper does not name the variant, Large gives the best
# relative depth, and its CC-BY-NC-4.0 licence adds nothing to the NC licences of the MVTec sources it
# runs on. Small (Apache-2.0, 24.8 M parameters) is the permissive and lighter choice.
DEFAULT_MODEL = "depth-anything/Depth-Anything-V2-Large-hf"
PERMISSIVE_MODEL = "depth-anything/Depth-Anything-V2-Small-hf"
DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}  # --dtype → torch attribute


class ModelUnavailableError(RuntimeError):
    """The model is neither a local folder, nor in the local cache, nor downloadable now."""


@dataclass
class DepthAnythingRunner:
    """A loaded model + processor on a device, with what the shard metadata records about it."""

    model: torch.nn.Module
    processor: object
    device: torch.device
    dtype: torch.dtype
    model_id: str
    model_revision: str | None
    transformers_version: str

    @property
    def dtype_name(self) -> str:
        import torch

        return {getattr(torch, v): k for k, v in DTYPE_NAMES.items()}[self.dtype]

    def preprocess(self, image) -> torch.Tensor:
        """One RGB PIL image → normalised pixel tensor (3, h, w) at the processed resolution."""
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]

    def predict(self, pixel_values: torch.Tensor) -> np.ndarray:
        """(B, 3, h, w) of one shared shape → predicted relative disparity (B, h, w) float32, ≥ 0."""
        import torch
        import torch.nn.functional as F

        with torch.inference_mode():
            pixel_values = pixel_values.to(self.device, self.dtype, non_blocking=True)
            out = self.model(pixel_values=pixel_values).predicted_depth
            if out.shape[-2:] != pixel_values.shape[-2:]:  # heads of other sizes: back to the input grid
                out = F.interpolate(out[:, None].float(), size=pixel_values.shape[-2:], mode="bicubic",
                                    align_corners=False)[:, 0]
            return out.float().cpu().numpy()


def to_original_size(disparity: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bicubic resize of one prediction to the source image size, clamped at 0 (bicubic overshoots)."""
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(disparity, dtype=np.float32))[None, None]
    out = F.interpolate(t, size=(height, width), mode="bicubic", align_corners=False)[0, 0]
    return out.clamp_min_(0).numpy()


def resolve_device(device: str = "auto") -> torch.device:
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {device} requested but CUDA is not available on this machine")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    import torch

    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {dtype!r}; expected auto, {', '.join(DTYPE_NAMES)}")
    if device.type != "cuda" and dtype != "fp32":
        warnings.warn(f"dtype {dtype} on {device}: half precision is meant for GPUs, using fp32 instead", stacklevel=2)
        return torch.float32
    return getattr(torch, DTYPE_NAMES[dtype])


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Can the Hugging Face Hub be reached right now? (Quick TCP probe, never hangs.)"""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(endpoint)
    host, port = parsed.hostname or "huggingface.co", parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _offline_help(model: str) -> str:
    return (
        f"Depth-Anything-V2 model {model!r} is not a local folder, not in the Hugging Face cache, and the Hub "
        "cannot be reached from this machine. Download it where there is internet, e.g.\n"
        f"    huggingface-cli download {model} --local-dir ./models/{model.split('/')[-1]}\n"
        "copy the folder here and pass it with --model ./models/<name> (it must hold config.json, "
        "preprocessor_config.json and the weights)."
    )


def load_depth_anything(model: str = DEFAULT_MODEL, device: str = "auto", dtype: str = "auto",
                        size: int | None = None) -> DepthAnythingRunner:
    """Load model + processor from a local folder or a hub id (cache first; fail fast when offline).

    ``size`` (multiple of the patch size, 14 for the real models) overrides the processor's 518.
    """
    import transformers
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    path = Path(model)
    kwargs: dict = {}
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelUnavailableError(f"model folder {path} has no config.json (expected a save_pretrained folder)")
        source = str(path)
    else:
        source = model
        try:  # already cached? then no network is needed at all
            AutoModelForDepthEstimation.from_pretrained(source, local_files_only=True, dtype=torch_dtype)
            kwargs["local_files_only"] = True
        except OSError:
            if not hub_reachable():
                raise ModelUnavailableError(_offline_help(model)) from None
    try:
        net = AutoModelForDepthEstimation.from_pretrained(source, dtype=torch_dtype, **kwargs)
        processor = AutoImageProcessor.from_pretrained(source, **kwargs)
    except OSError as exc:
        raise ModelUnavailableError(f"could not load {model!r}: {exc}") from None
    if size is not None:
        patch = getattr(getattr(net.config, "backbone_config", None), "patch_size", None) or net.config.patch_size
        if size % patch:
            raise ValueError(f"--da-size {size} is not a multiple of the model's patch size {patch}")
        processor.size = {"height": size, "width": size}
    net = net.to(dev).eval()
    return DepthAnythingRunner(
        model=net, processor=processor, device=dev, dtype=torch_dtype, model_id=model,
        model_revision=getattr(net.config, "_commit_hash", None), transformers_version=transformers.__version__,
    )
