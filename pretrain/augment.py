"""Multi-crop augmentation (``../shared/spec/dino_depth.md`` §3, §8).

**Depth** (default): spatial transforms only. The full map is normalised once (shared nearness
function: invalid 0, valid in [eps, 1]); every crop is then **one** affine warp of (value, validity)
from output-pixel coordinates to source coordinates,

    output pixel → flips → exact rot90 (option) → scale to the random-resized-crop window
                 → rotation by θ about the window centre → window centre → source position,

resampled once with a depth-safe interpolation (masked bilinear with an edge threshold, or
nearest). Outside the map the crop is invalid (value 0, the encoding of missing depth) unless
``rot_fill="shrink"`` shrinks the window until it fits. No intensity of a depth map is ever changed
except by the convex combinations of the interpolation.

**Image** (``data.modality: image``): the same spatial warp (plain bilinear, black outside), then the
standard DINOv2 photometric augmentations (colour jitter — brightness/contrast only on grayscale —,
random grayscale, Gaussian blur, solarize on the second global crop) and ``(x − mean) / std``.

All randomness comes from the ``numpy.random.Generator`` passed in; the loader keys it by
``(seed, stream position)`` so crops do not depend on worker count or world size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import correlate1d

from pretrain.config import AugConfig, CropsConfig, ImageAugConfig

_MAX_CROP_TRIES = 10


@dataclass(frozen=True)
class CropParams:
    """One crop's affine warp: window centre (cy, cx) and size (h, w) in source pixels (edge
    coordinates: pixel i spans [i, i+1)), rotation θ (degrees) of the window, exact quarter turns k
    of the output grid, flips of the output."""

    cy: float
    cx: float
    h: float
    w: float
    angle_deg: float = 0.0
    rot90_k: int = 0
    hflip: bool = False
    vflip: bool = False


def sample_rrc_window(height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
                      rng: np.random.Generator) -> tuple[float, float, float, float]:
    """torchvision-style random-resized-crop box → (cy, cx, h, w).

    Up to 10 attempts: area fraction ~ U(scale), log-aspect ~ U(log ratio); accept if the box fits.
    Fallback: the central box with the aspect clamped to ``ratio``.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top + h / 2, left + w / 2, float(h), float(w)
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        h, w = height, round(height * max(ratio))
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return top + h / 2, left + w / 2, float(h), float(w)


def shrink_to_fit(params: CropParams, height: int, width: int) -> CropParams:
    """Shrink the (rotated) window about its centre, keeping its aspect, until it lies in the map."""
    theta = math.radians(params.angle_deg)
    c, s = abs(math.cos(theta)), abs(math.sin(theta))
    half_x = (c * params.w + s * params.h) / 2
    half_y = (s * params.w + c * params.h) / 2
    factor = min(1.0, params.cx / half_x, (width - params.cx) / half_x,
                 params.cy / half_y, (height - params.cy) / half_y)
    if factor >= 1.0:
        return params
    factor *= 1.0 - 1e-9  # stay strictly inside despite rounding
    return CropParams(params.cy, params.cx, params.h * factor, params.w * factor, params.angle_deg,
                      params.rot90_k, params.hflip, params.vflip)


def sample_crop_params(height: int, width: int, scale: tuple[float, float], aug: AugConfig,
                       rng: np.random.Generator, ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> CropParams:
    """Draw window, rotation and flips of one crop (§8 steps 1–4)."""
    cy, cx, h, w = sample_rrc_window(height, width, scale, ratio, rng)
    angle, k = 0.0, 0
    if rng.random() < aug.rot_p:
        if aug.rot90:
            k = int(rng.integers(1, 4))
        else:
            angle = float(rng.uniform(-aug.rot_max_deg, aug.rot_max_deg))
    hflip = bool(rng.random() < aug.hflip_p)
    vflip = bool(rng.random() < aug.vflip_p)
    params = CropParams(cy, cx, h, w, angle, k, hflip, vflip)
    if aug.rot_fill == "shrink" and angle != 0.0:
        params = shrink_to_fit(params, height, width)
    return params


def _grid_coordinates(params: CropParams, size: int, rows: slice | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Source positions (y, x) of the output pixel centres as *broadcastable* float64 arrays: (S, 1) /
    (1, S) when the window is not freely rotated (flips and quarter turns only permute the axes), both
    (S, S) otherwise. Element for element the same arithmetic as a full (S, S) evaluation.
    ``rows``: only those output rows (the same values as those rows of the full grid)."""
    centred = np.arange(size, dtype=np.float64) + 0.5 - size / 2
    b, a = centred[:, None], centred[None, :]  # b: rows (y), a: columns (x)
    if rows is not None:
        b = b[rows]
    if params.hflip:
        a = -a
    if params.vflip:
        b = -b
    for _ in range(params.rot90_k % 4):  # quarter turn of the output grid
        a, b = b, -a
    x = a * (params.w / size)
    y = b * (params.h / size)
    if params.angle_deg:
        theta = math.radians(params.angle_deg)
        cos, sin = math.cos(theta), math.sin(theta)
        x, y = cos * x - sin * y, sin * x + cos * y
    return y + params.cy, x + params.cx


def source_coordinates(params: CropParams, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Source positions (y, x) in edge coordinates of every output pixel centre, each (size, size).

    Flips and quarter turns act on centred output coordinates, which they permute exactly (so a
    rot90 crop equals ``np.rot90`` of the unrotated crop bit for bit).
    """
    ys, xs = _grid_coordinates(params, size)
    shape = (size, size)
    return np.ascontiguousarray(np.broadcast_to(ys, shape)), np.ascontiguousarray(np.broadcast_to(xs, shape))


_BIG = np.float32(1e30)  # a finite stand-in for ±inf (values are ≪ 1e30; inf · 0 would be NaN)


def _bilinear_taps(ys: np.ndarray, xs: np.ndarray, H: int, W: int) -> tuple[tuple, tuple]:
    """Flat indices of the four bilinear neighbours (clamped to the map) and their float32 weights."""
    yc, xc = ys - 0.5, xs - 0.5  # pixel-centre coordinates
    y0f, x0f = np.floor(yc), np.floor(xc)
    fy, fx = (yc - y0f).astype(np.float32), (xc - x0f).astype(np.float32)
    row0 = np.clip(y0f, 0, H - 1).astype(np.intp) * W
    row1 = np.clip(y0f + 1, 0, H - 1).astype(np.intp) * W
    col0 = np.clip(x0f, 0, W - 1).astype(np.intp)
    col1 = np.clip(x0f + 1, 0, W - 1).astype(np.intp)
    taps = (row0 + col0, row0 + col1, row1 + col0, row1 + col1)  # full (h, w) from here on
    gy, gx = 1 - fy, 1 - fx
    return taps, (gy * gx, gy * fx, fy * gx, fy * fx)


def _valid_weights(flat_valid: np.ndarray | None, taps: tuple, weights: tuple, shape: tuple) -> tuple:
    """(validity of the taps or None, bilinear weights of the valid taps, their sum)."""
    if flat_valid is None:
        masks = None
        wm = [np.broadcast_to(w, shape) for w in weights]
    else:
        masks = [np.take(flat_valid, t) for t in taps]
        wm = [w * m for w, m in zip(weights, masks)]  # bilinear weights of the valid taps
    return masks, wm, wm[0] + wm[1] + wm[2] + wm[3]


def resample(values: np.ndarray, valid: np.ndarray | None, ys: np.ndarray, xs: np.ndarray,
             interp: str = "masked_bilinear", edge_thresh: float | None = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Sample ``values`` (C, H, W) at edge coordinates (ys, xs) → (out (C, h, w) float32, valid (h, w)).

    Positions outside [0, H]×[0, W] are invalid (value 0). ``masked_bilinear``: bilinear weights w_i
    restricted to valid neighbours, v = Σ w_i m_i v_i / Σ w_i m_i, valid iff Σ w_i m_i ≥ 0.5; if the
    valid neighbours span more than ``edge_thresh`` the nearest valid neighbour (largest weight) is
    taken instead (no flying pixels across depth edges); the result is clamped to the span of the
    valid neighbours (exactly convex despite rounding). ``edge_thresh=None`` disables the edge rule
    (images). ``nearest``: the source pixel containing the position.

    ``ys`` and ``xs`` may be any arrays that broadcast to the output shape (e.g. (h, 1) and (1, w) for
    an axis-aligned window: the per-row / per-column work is then done once per row / column). Values
    at invalid pixels must be finite. Performance: the gathers are ``np.take`` on flat indices, no
    stacked (4, n) temporaries, no ``np.where`` with scalars (both are slow in numpy); the arithmetic
    is the same, operation for operation, as the straightforward implementation
    (``bench/bench_augment.py`` checks bit-equality against it).
    """
    C, H, W = values.shape
    ys, xs = np.asarray(ys, np.float64), np.asarray(xs, np.float64)
    shape = np.broadcast_shapes(ys.shape, xs.shape)
    inside = ((ys >= 0) & (ys <= H)) & ((xs >= 0) & (xs <= W))
    flat_values = values.reshape(C, H * W)
    flat_valid = None if valid is None else valid.reshape(H * W)
    if interp == "nearest":
        index = (np.clip(np.floor(ys), 0, H - 1).astype(np.intp) * W
                 + np.clip(np.floor(xs), 0, W - 1).astype(np.intp))
        ok = np.broadcast_to(inside, shape)
        if flat_valid is not None:
            ok = ok & np.take(flat_valid, index)
        out = np.zeros((C, *shape), np.float32)
        for c in range(C):
            np.copyto(out[c], np.take(flat_values[c], index), where=ok)
        return out, np.array(ok)
    if interp != "masked_bilinear":
        raise ValueError(f"unknown interpolation {interp!r}: use 'masked_bilinear' or 'nearest' (never bicubic on depth)")
    taps, weights = _bilinear_taps(ys, xs, H, W)
    masks, wm, wsum = _valid_weights(flat_valid, taps, weights, shape)
    ok = inside & (wsum >= 0.5)
    safe = wsum + (wsum == 0)  # = np.where(wsum > 0, wsum, 1): wsum ≥ 0, and x + 0 = x exactly
    out = np.zeros((C, *shape), dtype=np.float32)
    for c in range(C):
        v = [np.take(flat_values[c], t) for t in taps]
        acc = (v[0] * wm[0] + v[1] * wm[1] + v[2] * wm[2] + v[3] * wm[3]) / safe
        if masks is None:
            vmin = np.minimum(np.minimum(v[0], v[1]), np.minimum(v[2], v[3]))
            vmax = np.maximum(np.maximum(v[0], v[1]), np.maximum(v[2], v[3]))
        else:  # over the valid taps only: ±1e30 at invalid taps (v ± 0 = v exactly at valid ones)
            penalty = [np.multiply(~m, _BIG, dtype=np.float32) for m in masks]
            lo = [vi + p for vi, p in zip(v, penalty)]
            vmin = np.minimum(np.minimum(lo[0], lo[1]), np.minimum(lo[2], lo[3]))
            hi = [vi - p for vi, p in zip(v, penalty)]
            vmax = np.maximum(np.maximum(hi[0], hi[1]), np.maximum(hi[2], hi[3]))
        with np.errstate(invalid="ignore"):
            acc = np.clip(acc, vmin, vmax)  # exactly convex despite rounding
            edge = (vmax - vmin) > edge_thresh if edge_thresh is not None else None
        if edge is not None and edge.any():
            # nearest valid neighbour = the valid tap with the largest bilinear weight (first on ties)
            w_edge = [w[edge] for w in wm]
            best = np.argmax(np.stack(w_edge), axis=0)
            acc[edge] = np.choose(best, [vi[edge] for vi in v])
        np.copyto(out[c], acc, where=ok)
    return out, ok


def warp_crop(values: np.ndarray, valid: np.ndarray | None, params: CropParams, size: int,
              interp: str = "masked_bilinear", edge_thresh: float | None = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """One crop (C, size, size) and its validity (size, size) from the source (C, H, W)."""
    ys, xs = _grid_coordinates(params, size)
    out, ok = resample(values, valid, ys, xs, interp, edge_thresh)
    return out, np.ascontiguousarray(np.broadcast_to(ok, (size, size)))


def crop_valid_fraction_reaches(valid: np.ndarray, params: CropParams, size: int, interp: str,
                                threshold: float, blocks: int = 16) -> bool:
    """Whether ``warp_crop(values, valid, params, size, interp)[1].mean() >= threshold`` — the same
    decision, without warping any value.

    The validity of an output pixel depends only on its own source position, so it is evaluated on
    interleaved blocks of output rows (the same arithmetic as :func:`resample`, element for element);
    the answer is yes as soon as the pixels counted so far reach the threshold (a lower bound of the
    full count), so a crop well above it costs one block. This is what lets the loader draw crop
    parameters, redraws included, without making the crops (``pretrain/device_augment.py``)."""
    H, W = valid.shape
    flat_valid = valid.reshape(H * W)
    n = size * size
    count = 0
    for first in range(blocks):
        y, x = _grid_coordinates(params, size, slice(first, None, blocks))  # those output rows only
        shape = np.broadcast_shapes(y.shape, x.shape)
        inside = ((y >= 0) & (y <= H)) & ((x >= 0) & (x <= W))
        if interp == "nearest":
            index = (np.clip(np.floor(y), 0, H - 1).astype(np.intp) * W
                     + np.clip(np.floor(x), 0, W - 1).astype(np.intp))
            ok = np.broadcast_to(inside, shape) & np.take(flat_valid, index)
        elif interp == "masked_bilinear":
            taps, weights = _bilinear_taps(y, x, H, W)
            _, _, wsum = _valid_weights(flat_valid, taps, weights, shape)
            ok = inside & (wsum >= 0.5)
        else:
            raise ValueError(f"unknown interpolation {interp!r}: use 'masked_bilinear' or 'nearest'")
        count += int(np.count_nonzero(ok))
        if count / n >= threshold:  # = np.mean of the bool crop (exact count / n, correctly rounded)
            return True
    return False


def draw_crop_params(valid: np.ndarray, size: int, scale: tuple[float, float], aug: AugConfig,
                     rng: np.random.Generator, interp: str) -> CropParams:
    """The parameters :func:`make_crop` ends with (same generator draws, same redraw decisions), for
    a depth map whose validity is ``valid``, without warping."""
    H, W = valid.shape
    for attempt in range(_MAX_CROP_TRIES):
        params = sample_crop_params(H, W, scale, aug, rng)
        if attempt == _MAX_CROP_TRIES - 1:  # the last try is kept whatever its validity
            break
        if crop_valid_fraction_reaches(valid, params, size, interp, aug.min_crop_valid):
            break
    return params


def depth_crop_params(valid: np.ndarray, crops: CropsConfig, aug: AugConfig,
                      rng: np.random.Generator) -> tuple[list[CropParams], list[CropParams]]:
    """(global, local) crop parameters of one depth sample: exactly those :func:`depth_multicrop`
    warps with the same generator."""
    g = [draw_crop_params(valid, crops.global_crops_size, tuple(crops.global_crops_scale), aug, rng, aug.interp)
         for _ in range(2)]
    loc = [draw_crop_params(valid, crops.local_crops_size, tuple(crops.local_crops_scale), aug, rng, aug.interp)
           for _ in range(crops.local_crops_number)]
    return g, loc


def make_crop(values: np.ndarray, valid: np.ndarray | None, size: int, scale: tuple[float, float], aug: AugConfig,
              rng: np.random.Generator, interp: str, edge_thresh: float | None) -> tuple[np.ndarray, np.ndarray, CropParams]:
    """Sample and warp one crop; redraw (≤ 10 tries, then keep the last) while the valid fraction is
    below ``aug.min_crop_valid``."""
    _, H, W = values.shape
    for _ in range(_MAX_CROP_TRIES):
        params = sample_crop_params(H, W, scale, aug, rng)
        crop, crop_valid = warp_crop(values, valid, params, size, interp, edge_thresh)
        if crop_valid.mean() >= aug.min_crop_valid:
            break
    return crop, crop_valid, params


@dataclass
class MultiCrop:
    """Crops of one sample: globals (2, C, S, S), locals (n, C, s, s), their validity."""

    global_crops: np.ndarray
    local_crops: np.ndarray
    global_valid: np.ndarray
    local_valid: np.ndarray


def depth_multicrop(x: np.ndarray, valid: np.ndarray, crops: CropsConfig, aug: AugConfig,
                    rng: np.random.Generator) -> MultiCrop:
    """2 global + n local crops of a nearness-normalised depth map (spatial transforms only)."""
    values = x[None].astype(np.float32, copy=False)
    g = [make_crop(values, valid, crops.global_crops_size, tuple(crops.global_crops_scale), aug, rng,
                   aug.interp, aug.edge_thresh) for _ in range(2)]
    loc = [make_crop(values, valid, crops.local_crops_size, tuple(crops.local_crops_scale), aug, rng,
                     aug.interp, aug.edge_thresh) for _ in range(crops.local_crops_number)]
    return _stack(g, loc, crops, values.shape[0])


def _stack(g, loc, crops: CropsConfig, channels: int) -> MultiCrop:
    s = crops.local_crops_size
    local_crops = np.stack([c for c, _, _ in loc]) if loc else np.zeros((0, channels, s, s), np.float32)
    local_valid = np.stack([v for _, v, _ in loc]) if loc else np.zeros((0, s, s), bool)
    return MultiCrop(np.stack([c for c, _, _ in g]), local_crops, np.stack([v for _, v, _ in g]), local_valid)


# -- image modality ---------------------------------------------------------------------------------
def image_to_float(image: np.ndarray, in_chans: int, max_normalize: bool = True) -> np.ndarray:
    """8-bit (H, W) or (H, W, 3) image → float32 (C, H, W) in [0, 1] (÷ per-image max if asked)."""
    x = np.asarray(image)
    if x.dtype != np.uint8:
        raise ValueError(f"image mode expects 8-bit images, got dtype {x.dtype}")
    x = x.astype(np.float32) / 255.0
    if x.ndim == 2:
        x = x[None]
    elif x.ndim == 3 and x.shape[2] in (3, 4):
        x = x[:, :, :3].transpose(2, 0, 1)
    else:
        raise ValueError(f"unsupported image shape {image.shape}")
    if in_chans == 1 and x.shape[0] == 3:
        x = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2])[None].astype(np.float32)
    elif in_chans == 3 and x.shape[0] == 1:
        x = np.repeat(x, 3, axis=0)
    if max_normalize:
        peak = float(x.max())
        if peak > 0:
            x = x / peak
    return np.ascontiguousarray(x, dtype=np.float32)


def _luma(x: np.ndarray) -> np.ndarray:
    if x.shape[0] == 1:
        return x[0]
    return 0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]


def _rotate_hue(x: np.ndarray, turn: float) -> np.ndarray:
    # Hue rotation as a rotation of the chroma plane in YIQ (linear approximation of HSV hue shift).
    to_yiq = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], np.float32)
    c, s = math.cos(2 * math.pi * turn), math.sin(2 * math.pi * turn)
    rot = np.array([[1, 0, 0], [0, c, -s], [0, s, c]], np.float32)
    mat = np.linalg.inv(to_yiq) @ rot @ to_yiq
    return np.einsum("ij,jhw->ihw", mat.astype(np.float32), x)


def color_jitter(x: np.ndarray, cfg: ImageAugConfig, rng: np.random.Generator) -> np.ndarray:
    """torchvision-style ColorJitter: the factors in a random order, each clipped to [0, 1]."""
    ops = ["brightness", "contrast"] + (["saturation", "hue"] if x.shape[0] == 3 else [])
    for op in rng.permutation(ops):
        if op == "brightness" and cfg.brightness > 0:
            x = x * rng.uniform(1 - cfg.brightness, 1 + cfg.brightness)
        elif op == "contrast" and cfg.contrast > 0:
            mean = float(_luma(x).mean())
            x = (x - mean) * rng.uniform(1 - cfg.contrast, 1 + cfg.contrast) + mean
        elif op == "saturation" and cfg.saturation > 0:
            gray = _luma(x)[None]
            x = (x - gray) * rng.uniform(1 - cfg.saturation, 1 + cfg.saturation) + gray
        elif op == "hue" and cfg.hue > 0:
            x = _rotate_hue(x, rng.uniform(-cfg.hue, cfg.hue))
        x = np.clip(x, 0.0, 1.0)
    return x.astype(np.float32)


def gaussian_blur(x: np.ndarray, sigma: float, kernel_size: int = 9) -> np.ndarray:
    """Separable Gaussian blur with reflect padding (as torchvision's GaussianBlur)."""
    half = kernel_size // 2
    t = np.arange(-half, half + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (t / sigma) ** 2)
    kernel /= kernel.sum()
    out = correlate1d(x, kernel, axis=-1, mode="reflect")
    return correlate1d(out, kernel, axis=-2, mode="reflect").astype(np.float32)


def photometric(x: np.ndarray, cfg: ImageAugConfig, rng: np.random.Generator, blur_p: float,
                solarize_p: float) -> np.ndarray:
    """Colour jitter (p), grayscale (p, 3 channels), blur (p), solarize (p) on a [0, 1] crop."""
    if rng.random() < cfg.color_jitter_p:
        x = color_jitter(x, cfg, rng)
    if x.shape[0] == 3 and rng.random() < cfg.grayscale_p:
        x = np.repeat(_luma(x)[None], 3, axis=0).astype(np.float32)
    if rng.random() < blur_p:
        x = gaussian_blur(x, float(rng.uniform(*cfg.blur_sigma)), cfg.blur_kernel)
    if rng.random() < solarize_p:
        x = np.where(x >= cfg.solarize_threshold, 1.0 - x, x).astype(np.float32)
    return x


def normalize_image(x: np.ndarray, cfg: ImageAugConfig) -> np.ndarray:
    mean = np.asarray(cfg.mean, np.float32).reshape(-1, 1, 1)
    std = np.asarray(cfg.std, np.float32).reshape(-1, 1, 1)
    return ((x - mean) / std).astype(np.float32)


def image_multicrop(x: np.ndarray, crops: CropsConfig, aug: AugConfig, image_aug: ImageAugConfig,
                    rng: np.random.Generator) -> MultiCrop:
    """2 global + n local crops of a [0, 1] image (C, H, W): spatial warp, photometric, normalise."""
    g, loc = [], []
    blur_global = (image_aug.blur_p_global1, image_aug.blur_p_global2)
    solarize_global = (0.0, image_aug.solarize_p_global2)
    for i in range(2):
        crop, valid, params = make_crop(x, None, crops.global_crops_size, tuple(crops.global_crops_scale), aug,
                                        rng, "masked_bilinear", None)
        crop = photometric(crop, image_aug, rng, blur_global[i], solarize_global[i])
        g.append((normalize_image(crop, image_aug), valid, params))
    for _ in range(crops.local_crops_number):
        crop, valid, params = make_crop(x, None, crops.local_crops_size, tuple(crops.local_crops_scale), aug,
                                        rng, "masked_bilinear", None)
        crop = photometric(crop, image_aug, rng, image_aug.blur_p_local, 0.0)
        loc.append((normalize_image(crop, image_aug), valid, params))
    return _stack(g, loc, crops, x.shape[0])
