"""Per-view input preprocessing for ModMap and its exact inverse (``../shared/spec/modmap.md`` §4, §10, §12).

Image: [0, 1] → square pad (edge replication, or constant 0) → bicubic antialiased resize to ``size`` →
3 channels → divide by the resized maximum → normalise (``gray``: (x − 0.445)/0.269, or ``imagenet``).

Depth: ``nearness`` (default) normalises the full-resolution map with :func:`shared.depth.normalize_depth`
(invalid → 0) before padding and a legacy-nearest resize; ``max`` reproduces the authors' order exactly
(invalid → 0, pad, nearest resize, divide by the resized maximum).

Every view keeps a :class:`ViewGeometry` (original size, square side, pad offsets) so that maps at
``size × size`` are brought back to the original pixels (:func:`undo_geometry`) before back-projection.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from shared.depth import max_normalize, normalize_depth

ImageNorm = Literal["gray", "imagenet"]
DepthNorm = Literal["nearness", "max"]
PadMode = Literal["edge", "constant"]

GRAY_MEAN, GRAY_STD = 0.445, 0.269
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ViewGeometry:
    """How a (H, W) view was placed on the ``size × size`` network input."""

    height: int
    width: int
    side: int  # S = max(H, W)
    pad_top: int
    pad_left: int
    size: int  # network input side (e.g. 896)

    @classmethod
    def for_shape(cls, height: int, width: int, size: int) -> ViewGeometry:
        side = max(height, width)
        return cls(height, width, side, (side - height) // 2, (side - width) // 2, size)

    @property
    def pads(self) -> tuple[int, int, int, int]:
        """(left, right, top, bottom) as ``F.pad`` takes them."""
        return (self.pad_left, self.side - self.width - self.pad_left,
                self.pad_top, self.side - self.height - self.pad_top)

    def to_dict(self) -> dict:
        return asdict(self)


def _pad_square(x: torch.Tensor, geom: ViewGeometry, mode: PadMode, value: float = 0.0) -> torch.Tensor:
    """Pad (B, C, H, W) to (B, C, S, S) with the geometry's offsets."""
    if geom.side == geom.height == geom.width:
        return x
    if mode == "edge":
        return F.pad(x, geom.pads, mode="replicate")
    if mode == "constant":
        return F.pad(x, geom.pads, mode="constant", value=value)
    raise ValueError(f"unknown pad mode {mode!r}; expected 'edge' or 'constant'")


def preprocess_image(image: np.ndarray, size: int, norm: ImageNorm = "gray",
                     pad_mode: PadMode = "edge") -> tuple[torch.Tensor, ViewGeometry]:
    """Grayscale (H, W) or colour (H, W, 3) uint8/float image → normalised (3, size, size) float32.

    Integer images are scaled by their dtype maximum, float images are taken as [0, 1].
    """
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise ValueError(f"image must be (H, W) grayscale or (H, W, 3), got shape {image.shape}")
    if np.issubdtype(image.dtype, np.integer):
        x = torch.from_numpy(image.astype(np.float32) / float(np.iinfo(image.dtype).max))
    else:
        x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    x = x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1)
    geom = ViewGeometry.for_shape(x.shape[1], x.shape[2], size)
    x = _pad_square(x.unsqueeze(0), geom, pad_mode, 0.0)
    x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)[0]
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    peak = float(x.max())
    if peak > 0:
        x = x / peak
    if norm == "gray":
        x = (x - GRAY_MEAN) / GRAY_STD
    elif norm == "imagenet":
        mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        x = (x - mean) / std
    else:
        raise ValueError(f"unknown image normalisation {norm!r}; expected 'gray' or 'imagenet'")
    return x.contiguous().float(), geom


def preprocess_depth(depth: np.ndarray, size: int, mode: DepthNorm = "nearness", eps: float = 0.1,
                     pct: tuple[float, float] = (0.5, 99.5), pad_mode: PadMode = "edge",
                     kind: str = "metric_z") -> tuple[torch.Tensor, ViewGeometry]:
    """Raw depth (H, W) float (NaN/inf/≤0 invalid) → (1, size, size) float32 with invalid = 0.

    ``nearness``: valid pixels in [eps, 1] with near = 1 (shared normalisation on the full map).
    ``max``: the authors' parity order — invalid → 0, pad, nearest resize, divide by the resized max.
    """
    depth = np.asarray(depth, dtype=np.float32)
    if depth.ndim != 2:
        raise ValueError(f"depth map must be (H, W), got shape {depth.shape}")
    if mode == "nearness":
        x, _, _ = normalize_depth(depth, kind=kind, mode="nearness", eps=eps, pct=pct)
    elif mode == "max":
        valid = np.isfinite(depth) & (depth > 0)
        x = np.where(valid, depth, 0.0).astype(np.float32)
    else:
        raise ValueError(f"unknown depth normalisation {mode!r}; expected 'nearness' or 'max'")
    t = torch.from_numpy(x)[None, None]
    geom = ViewGeometry.for_shape(depth.shape[0], depth.shape[1], size)
    t = _pad_square(t, geom, pad_mode, 0.0)  # constant padding = invalid
    t = F.interpolate(t, size=(size, size), mode="nearest")[0]  # legacy nearest: src = floor(dst·in/out)
    if mode == "max":
        t = torch.from_numpy(max_normalize(t.numpy()))
    return t.contiguous().float(), geom


def foreground_mask(depth_input: np.ndarray | torch.Tensor, connectivity: int = 4) -> np.ndarray:
    """Foreground of a preprocessed depth map (§10): valid (≠ 0) → 3×3 opening → largest component.

    OpenCV semantics (the authors' code): the erosion treats the outside of the image as foreground,
    so the border is not eaten. If no component survives, the (empty) opened mask is returned.
    """
    import cv2

    d = depth_input.detach().cpu().numpy() if isinstance(depth_input, torch.Tensor) else np.asarray(depth_input)
    d = np.squeeze(d)
    if d.ndim != 2:
        raise ValueError(f"expected a single depth map, got shape {np.shape(depth_input)}")
    if connectivity not in (4, 8):
        raise ValueError(f"fg connectivity must be 4 or 8, got {connectivity}")
    valid = (d != 0).astype(np.uint8)
    opened = cv2.morphologyEx(valid, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8), iterations=1)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(opened, connectivity=connectivity)
    if n <= 1:
        return opened.astype(bool)
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return labels == largest


def token_validity(depth_input: torch.Tensor, patch_size: int, min_fraction: float = 0.5) -> torch.Tensor:
    """Per-token flag: at least ``min_fraction`` of the patch has valid depth (``--loss-mask foreground``)."""
    valid = (depth_input.reshape(1, 1, *depth_input.shape[-2:]) != 0).float()
    frac = F.avg_pool2d(valid, kernel_size=patch_size, stride=patch_size)
    return (frac >= min_fraction).reshape(-1)


def upsample_tokens(token_map: torch.Tensor, grid: tuple[int, int], size: int) -> torch.Tensor:
    """(…, h·w) token scores → (…, size, size) by bilinear interpolation (align_corners=False, §9)."""
    lead = token_map.shape[:-1]
    x = token_map.reshape(-1, 1, grid[0], grid[1]).float()
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.reshape(*lead, size, size)


def undo_geometry(values: torch.Tensor | np.ndarray, geom: ViewGeometry,
                  mode: Literal["bilinear", "nearest"] = "bilinear") -> np.ndarray:
    """A ``size × size`` map back to the original (H, W) pixels: resize to S×S, crop the padding (§12).

    Bilinear (align_corners=False) for scores, legacy nearest for masks (booleans come back as bool).
    Only the crop window is interpolated: each output pixel samples the map exactly as a full
    S×S resize followed by the crop would.
    """
    is_bool = (values.dtype == torch.bool) if isinstance(values, torch.Tensor) else (np.asarray(values).dtype == bool)
    x = values if isinstance(values, torch.Tensor) else torch.from_numpy(np.asarray(values))
    x = x.detach().cpu().float()
    if x.shape[-2:] != (geom.size, geom.size):
        raise ValueError(f"map shape {tuple(x.shape)} does not match the input size {geom.size}")
    scale = geom.size / geom.side
    rows = torch.arange(geom.pad_top, geom.pad_top + geom.height, dtype=torch.float64)
    cols = torch.arange(geom.pad_left, geom.pad_left + geom.width, dtype=torch.float64)
    if mode == "nearest":
        r = torch.clamp(torch.floor(rows * scale).long(), max=geom.size - 1)
        c = torch.clamp(torch.floor(cols * scale).long(), max=geom.size - 1)
        out = x[..., r[:, None], c[None, :]]
        return out.numpy().astype(bool) if is_bool else out.numpy()
    if mode != "bilinear":
        raise ValueError(f"unknown resampling mode {mode!r}")
    # PyTorch's bilinear source coordinate for align_corners=False: (dst + 0.5)/scale_out − 0.5, ≥ 0.
    r_src = torch.clamp((rows + 0.5) * scale - 0.5, min=0.0)
    c_src = torch.clamp((cols + 0.5) * scale - 0.5, min=0.0)
    r0 = torch.clamp(torch.floor(r_src).long(), max=geom.size - 1)
    c0 = torch.clamp(torch.floor(c_src).long(), max=geom.size - 1)
    r1 = torch.clamp(r0 + 1, max=geom.size - 1)
    c1 = torch.clamp(c0 + 1, max=geom.size - 1)
    wr = (r_src - r0).float()[:, None]
    wc = (c_src - c0).float()
    # Bilinear interpolation is separable: rows first (size → H), then columns (size → W).
    rows_done = x[..., r0, :] * (1 - wr) + x[..., r1, :] * wr
    return (rows_done[..., c0] * (1 - wc) + rows_done[..., c1] * wc).numpy()


def gaussian_blur(maps: torch.Tensor, sigma: float, padding: str = "reflect") -> torch.Tensor:
    """Separable Gaussian smoothing of (..., H, W) maps (truncated at 4σ); ``padding`` ``reflect``
    (ModMap's maps) or ``zeros`` (CFM's filters, used by the CMDR-IAD scoring)."""
    if sigma <= 0:
        return maps
    if padding not in ("reflect", "zeros"):
        raise ValueError(f"padding must be 'reflect' or 'zeros', got {padding!r}")
    radius = max(1, int(4.0 * sigma + 0.5))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=maps.device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = k / k.sum()
    lead = maps.shape[:-2]
    m = maps.reshape(-1, 1, *maps.shape[-2:])
    if padding == "zeros":
        m = torch.nn.functional.conv2d(m, k.view(1, 1, 1, -1), padding=(0, radius))
        m = torch.nn.functional.conv2d(m, k.view(1, 1, -1, 1), padding=(radius, 0))
    else:
        m = torch.nn.functional.pad(m, (radius, radius, 0, 0), mode="reflect")
        m = torch.nn.functional.conv2d(m, k.view(1, 1, 1, -1))
        m = torch.nn.functional.pad(m, (0, 0, radius, radius), mode="reflect")
        m = torch.nn.functional.conv2d(m, k.view(1, 1, -1, 1))
    return m.reshape(*lead, *maps.shape[-2:])
