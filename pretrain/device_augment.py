"""Depth crops on the training device (``../shared/spec/dino_depth.md`` §8; issue 21).

The loader workers keep reading, normalising and drawing every crop's parameters with the seeded
generator of :mod:`pretrain.augment` (redraws below ``aug.min_crop_valid`` and replaced samples
included: :func:`pretrain.augment.depth_crop_params`); they send the normalised maps, their validity
and the parameters (:func:`pack_sources`). The warp itself — flips, quarter turns, rotation, scaled
window, masked bilinear (or nearest) sampling with the clamp to the span of the valid neighbours and
the nearest-valid-neighbour edge rule, invalid = 0 — runs here as batched torch ops
(:func:`warp_crops`), operation for operation the arithmetic of :func:`pretrain.augment.resample`:

* coordinates in float64, weights and values in float32, sums in the same order, the edge rule's
  "largest weight, first on ties" as strict comparisons in tap order, ``clip`` as max-then-min;
* so on CPU torch the crops and validity are **bit-identical** to numpy's (tests), and on CUDA they
  differ at most by rounding of the individual IEEE operations (none is fused in eager mode: in
  practice equal, tested at ≤ 2 ulp by the GPU-marked test);
* no host–device synchronisation: scalars are device fills, nothing is read back (the GPU test runs
  it under ``torch.cuda.set_sync_debug_mode("error")``).

``grid_sample`` on (value·valid, valid) would reproduce the masked average only, not the clamp and
edge rule: the four neighbours are gathered explicitly.

:class:`DevicePrefetcher` feeds the device: each batch's host tensors are copied into a pinned buffer
and sent to the device on a side stream one batch ahead of the step, then warped on the main stream.
The numpy path (``aug.warp_on=numpy``) stays for CPU runs and as the reference.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch

from pretrain.augment import CropParams

# Columns of a crop-parameter row (float64): window centre, output-pixel → source scale per axis,
# rotation as cos/sin computed by Python's math (the numpy path's very values), flags, source sample.
PARAM_COLUMNS = ("cy", "cx", "sy", "sx", "cos", "sin", "rotated", "rot90_k", "hflip", "vflip", "sample")
_COL = {name: i for i, name in enumerate(PARAM_COLUMNS)}
_BIG = 1e30  # the numpy path's finite stand-in for ±inf at invalid taps
_CHUNK_PIXELS = 1 << 22  # output pixels warped at once (bounds the temporaries: ~0.3 GB at 4 M)
WARP_KEYS = ("sources", "sources_valid", "source_shapes", "global_params", "local_params")


def resolve_warp(warp_on: str, device: torch.device | str, modality: str = "depth") -> str:
    """``aug.warp_on`` → ``"device"`` or ``"numpy"``: auto = device on CUDA (depth), numpy otherwise."""
    device = torch.device(device)
    if warp_on == "auto":
        return "device" if device.type == "cuda" and modality == "depth" else "numpy"
    if warp_on not in ("device", "numpy"):
        raise ValueError(f"aug.warp_on must be auto, device or numpy, got {warp_on!r}")
    if warp_on == "device" and modality != "depth":
        raise ValueError("aug.warp_on=device makes depth crops only; image mode warps in the loader workers")
    return warp_on


def params_rows(params: Sequence[CropParams], size: int, samples: Sequence[int]) -> np.ndarray:
    """(n, len(PARAM_COLUMNS)) float64 rows of crops of output size ``size`` taken from ``samples``."""
    rows = np.zeros((len(params), len(PARAM_COLUMNS)), np.float64)
    for row, p, sample in zip(rows, params, samples):
        theta = math.radians(p.angle_deg)
        # p.w / size etc. exactly as augment._grid_coordinates computes them (Python floats).
        row[:] = (p.cy, p.cx, p.h / size, p.w / size, math.cos(theta), math.sin(theta), float(p.angle_deg != 0.0),
                  p.rot90_k % 4, p.hflip, p.vflip, sample)
    return rows


def pack_sources(maps: Sequence[np.ndarray], valids: Sequence[np.ndarray], global_params: Sequence[Sequence[CropParams]],
                 local_params: Sequence[Sequence[CropParams]], global_size: int, local_size: int) -> dict:
    """A batch's warp inputs: the B maps flattened one after the other (``sources`` float32,
    ``sources_valid`` bool), ``source_shapes`` (B, 3) = (offset, H, W), and crop-major parameter rows
    (``global_params``: row c·B + k = global crop c of sample k; ``local_params`` likewise).

    In a loader worker the buffers are allocated in shared memory and filled in place, so handing the
    batch to the main process copies nothing more."""
    B = len(maps)
    sizes = [m.size for m in maps]
    total = int(sum(sizes))
    in_worker = torch.utils.data.get_worker_info() is not None
    values = torch.empty(total, dtype=torch.float32)
    valid = torch.empty(total, dtype=torch.bool)
    if in_worker:
        values.share_memory_()
        valid.share_memory_()
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64) if B else np.zeros(0, np.int64)
    if B:
        np.concatenate([np.ravel(m) for m in maps], out=values.numpy())
        np.concatenate([np.ravel(v) for v in valids], out=valid.numpy())
    shapes = np.array([(o, *m.shape) for o, m in zip(offsets, maps)], np.int64).reshape(B, 3)
    n_global = len(global_params[0]) if B else 2
    n_local = len(local_params[0]) if B else 0
    g = params_rows([global_params[k][c] for c in range(n_global) for k in range(B)], global_size,
                    [k for _ in range(n_global) for k in range(B)])
    loc = params_rows([local_params[k][j] for j in range(n_local) for k in range(B)], local_size,
                      [k for _ in range(n_local) for k in range(B)])
    return {"sources": values, "sources_valid": valid, "source_shapes": torch.from_numpy(shapes),
            "global_params": torch.from_numpy(g), "local_params": torch.from_numpy(loc),
            "global_crops_size": global_size, "local_crops_size": local_size}


def _coordinates(params: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source (y, x) of every output pixel centre, (n, size, size) float64, in each crop's *canonical*
    frame, and which crops are transposed in it (odd quarter turns).

    augment._grid_coordinates with the structure made explicit: after flips and k quarter turns the
    x offset varies along one output axis and the y offset along the other (columns / rows for even k,
    rows / columns for odd k), each ± the centred pixel index times the scale, so both are vectors.
    The full grid is ``cos·x − sin·y + cx`` and ``sin·x + cos·y + cy`` (x along columns, y along rows):
    the true grid for even k, its transpose for odd k. Every element is the same IEEE expression as
    numpy's (sign changes are exact; where θ = 0, cos = 1 and sin = 0 leave x and y unchanged before
    the centre is added), and the per-pixel steps after this are position-independent, so warping in
    the canonical frame and transposing the result gives numpy's crop bit for bit."""
    col = {name: params[:, i:i + 1] for name, i in _COL.items()}  # (n, 1) each
    u = torch.arange(size, dtype=torch.float64, device=params.device) + 0.5 - size / 2  # (S,)
    k = col["rot90_k"]
    odd = (k == 1) | (k == 3)
    flip_a = torch.where(col["hflip"] != 0, -1.0, 1.0).to(torch.float64)
    flip_b = torch.where(col["vflip"] != 0, -1.0, 1.0).to(torch.float64)
    # (a, b) → k quarter turns → (A, B): k=0 (a, b), k=1 (b, −a), k=2 (−a, −b), k=3 (−b, a)
    sign_x = torch.where(odd, flip_b, flip_a) * torch.where((k == 2) | (k == 3), -1.0, 1.0).to(torch.float64)
    sign_y = torch.where(odd, flip_a, flip_b) * torch.where((k == 1) | (k == 2), -1.0, 1.0).to(torch.float64)
    x = (sign_x * u) * col["sx"]  # (n, S): ±u exactly, then the scale, as numpy
    y = (sign_y * u) * col["sy"]
    cos, sin = col["cos"], col["sin"]
    xs = ((cos * x)[:, None, :] - (sin * y)[:, :, None]) + col["cx"][:, :, None]
    ys = ((sin * x)[:, None, :] + (cos * y)[:, :, None]) + col["cy"][:, :, None]
    return ys, xs, odd[:, 0]


def _warp_chunk(values: torch.Tensor, valid: torch.Tensor, shapes: torch.Tensor, params: torch.Tensor, size: int,
                interp: str, edge_thresh: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    ys, xs, transposed = _coordinates(params, size)
    src = shapes[params[:, _COL["sample"]].long()]  # (n, 3): offset, H, W
    index_dtype = torch.int32 if int(values.numel()) < 2**31 else torch.int64
    offset = src[:, 0].view(-1, 1, 1).to(index_dtype)
    H = src[:, 1].view(-1, 1, 1).to(torch.float64)
    W = src[:, 2].view(-1, 1, 1).to(torch.float64)
    Hi = src[:, 1].view(-1, 1, 1).to(index_dtype)
    Wi = src[:, 2].view(-1, 1, 1).to(index_dtype)
    f0 = torch.zeros((), dtype=torch.float32, device=values.device)
    inside = ((ys >= 0) & (ys <= H)) & ((xs >= 0) & (xs <= W))
    if interp == "nearest":
        # clip(floor(·), 0, H−1) in float64 then to int == to int then clip: the floors are integers
        index = (torch.clamp(torch.floor(ys).to(index_dtype), 0).minimum(Hi - 1) * Wi + offset
                 + torch.clamp(torch.floor(xs).to(index_dtype), 0).minimum(Wi - 1))
        del ys, xs
        ok = inside & valid[index]
        out = torch.where(ok, values[index], f0)
        return _untranspose(out, ok, transposed)
    if interp != "masked_bilinear":
        raise ValueError(f"unknown interpolation {interp!r}: use 'masked_bilinear' or 'nearest'")
    yc = ys - 0.5
    del ys
    y0f = torch.floor(yc)
    fy = (yc - y0f).to(torch.float32)
    del yc
    y0 = y0f.to(index_dtype)  # integer-valued: exact (and clamping commutes with the conversion)
    del y0f
    xc = xs - 0.5
    del xs
    x0f = torch.floor(xc)
    fx = (xc - x0f).to(torch.float32)
    del xc
    x0 = x0f.to(index_dtype)
    del x0f
    row0 = torch.clamp(y0, 0).minimum(Hi - 1) * Wi + offset
    row1 = torch.clamp(y0 + 1, 0).minimum(Hi - 1) * Wi + offset
    col0 = torch.clamp(x0, 0).minimum(Wi - 1)
    col1 = torch.clamp(x0 + 1, 0).minimum(Wi - 1)
    del y0, x0
    taps = (row0 + col0, row0 + col1, row1 + col0, row1 + col1)
    del row0, row1, col0, col1
    gy, gx = 1 - fy, 1 - fx
    weights = (gy * gx, gy * fx, fy * gx, fy * fx)
    del gy, gx, fy, fx
    masks = [valid[t] for t in taps]
    wm = [w * m for w, m in zip(weights, masks)]  # float32 · bool → float32, as numpy
    del weights
    wsum = wm[0] + wm[1] + wm[2] + wm[3]
    ok = inside & (wsum >= 0.5)
    del inside
    v = [values[t] for t in taps]
    del taps
    acc = (v[0] * wm[0] + v[1] * wm[1] + v[2] * wm[2] + v[3] * wm[3]) / (wsum + (wsum == 0))
    del wsum
    # numpy: v ± (1e30 at invalid taps, 0 at valid ones) = v exactly at valid taps and ±1e30 at invalid
    # ones (|v| ≪ the spacing of float32 around 1e30), i.e. where(valid, v, ±1e30).
    big = torch.full((), _BIG, dtype=torch.float32, device=values.device)  # a fill, not a host copy
    lo = [torch.where(m, vi, big) for vi, m in zip(v, masks)]
    vmin = torch.minimum(torch.minimum(lo[0], lo[1]), torch.minimum(lo[2], lo[3]))
    del lo
    hi = [torch.where(m, vi, -big) for vi, m in zip(v, masks)]
    vmax = torch.maximum(torch.maximum(hi[0], hi[1]), torch.maximum(hi[2], hi[3]))
    del hi, masks
    acc = torch.minimum(torch.maximum(acc, vmin), vmax)  # np.clip(acc, vmin, vmax)
    if edge_thresh is not None:
        # numpy compares the float32 span with the threshold as float32
        edge = (vmax - vmin) > torch.full((), edge_thresh, dtype=torch.float32, device=values.device)
        del vmin, vmax
        best_v, best_w = v[0], wm[0]
        for vi, wi in zip(v[1:], wm[1:]):  # largest weight, first on ties (np.argmax)
            take = wi > best_w
            best_v, best_w = torch.where(take, vi, best_v), torch.where(take, wi, best_w)
        acc = torch.where(edge, best_v, acc)
    return _untranspose(torch.where(ok, acc, f0), ok, transposed)


def _untranspose(out: torch.Tensor, ok: torch.Tensor, transposed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """From the canonical frame back to the crop's own (odd quarter turns were computed transposed).
    Unconditional: asking whether any crop is transposed would synchronise with the device."""
    t = transposed.view(-1, 1, 1)
    return torch.where(t, out.transpose(1, 2), out), torch.where(t, ok.transpose(1, 2), ok)


def warp_crops(sources: torch.Tensor, sources_valid: torch.Tensor, source_shapes: torch.Tensor, params: torch.Tensor,
               size: int, interp: str = "masked_bilinear", edge_thresh: float | None = 0.05,
               chunk_pixels: int = _CHUNK_PIXELS) -> tuple[torch.Tensor, torch.Tensor]:
    """Crops (n, 1, size, size) float32 and validity (n, size, size) bool of the parameter rows
    ``params`` (:func:`params_rows`) from the flat maps, on the maps' device."""
    n = params.shape[0]
    out = torch.empty((n, 1, size, size), dtype=torch.float32, device=sources.device)
    ok = torch.empty((n, size, size), dtype=torch.bool, device=sources.device)
    step = max(1, chunk_pixels // (size * size))
    for start in range(0, n, step):
        stop = min(n, start + step)
        o, m = _warp_chunk(sources, sources_valid, source_shapes, params[start:stop], size, interp, edge_thresh)
        out[start:stop, 0] = o
        ok[start:stop] = m
    return out, ok


def warp_batch(batch: dict, interp: str = "masked_bilinear", edge_thresh: float | None = 0.05) -> dict:
    """The batch with ``global_crops`` / ``local_crops`` (and ``global_valid`` / ``local_valid``) made
    from its warp inputs (on whatever device they are); the warp inputs are dropped."""
    out = {k: v for k, v in batch.items() if k not in WARP_KEYS}
    args = (batch["sources"], batch["sources_valid"], batch["source_shapes"])
    out["global_crops"], out["global_valid"] = warp_crops(*args, batch["global_params"], batch["global_crops_size"],
                                                          interp, edge_thresh)
    out["local_crops"], out["local_valid"] = warp_crops(*args, batch["local_params"], batch["local_crops_size"],
                                                        interp, edge_thresh)
    return out


class DevicePrefetcher:
    """Iterate a loader's batches with their tensors on ``device`` and, for device-warp batches, the
    crops made there.

    On CUDA each batch's tensors are copied into a pinned host buffer (two, reused, grown as
    needed) and sent to the device with ``non_blocking`` copies on a side stream while the previous
    batch is being trained on; the main stream waits for that copy only when it takes the batch.
    Elsewhere the tensors are moved synchronously. Non-tensor fields pass through unchanged.
    """

    def __init__(self, loader: Iterable[dict], device: torch.device | str, interp: str = "masked_bilinear",
                 edge_thresh: float | None = 0.05) -> None:
        self.loader = loader
        self.device = torch.device(device)
        self.interp = interp
        self.edge_thresh = edge_thresh
        self.cuda = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._pinned: list[dict[tuple, torch.Tensor]] = [{}, {}]
        self._copied: list[torch.cuda.Event | None] = [None, None]  # last copy out of each pinned slot
        self._slot = 0

    def _pinned_copy(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        buffers = self._pinned[self._slot]
        flat = buffers.get((key, tensor.dtype))
        if flat is None or flat.numel() < tensor.numel():
            flat = torch.empty(max(tensor.numel(), 1), dtype=tensor.dtype, pin_memory=True)
            buffers[(key, tensor.dtype)] = flat
        view = flat[:tensor.numel()].view(tensor.shape)
        view.copy_(tensor)
        return view

    def _send(self, batch: dict) -> tuple[dict, torch.cuda.Event | None]:
        if not self.cuda:
            return {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in batch.items()}, None
        # A pinned slot is refilled two batches later: the host waits until its last copy is done
        # (normally long done: it ran while the previous step trained).
        if self._copied[self._slot] is not None:
            self._copied[self._slot].synchronize()
        moved = {}
        with torch.cuda.stream(self._stream):
            for key, value in batch.items():
                if torch.is_tensor(value):
                    source = value if value.is_pinned() else self._pinned_copy(key, value)
                    moved[key] = source.to(self.device, non_blocking=True)
                else:
                    moved[key] = value
            event = torch.cuda.Event()
            event.record(self._stream)
        self._copied[self._slot] = event
        self._slot ^= 1
        return moved, event

    def _finish(self, moved: dict, event: torch.cuda.Event | None) -> dict:
        if event is not None:
            main = torch.cuda.current_stream(self.device)
            main.wait_event(event)
            for value in moved.values():  # allocated on the side stream, used on the main one
                if torch.is_tensor(value):
                    value.record_stream(main)
        if "global_params" in moved:
            moved = warp_batch(moved, self.interp, self.edge_thresh)
        return moved

    def __iter__(self) -> Iterator[dict]:
        iterator = iter(self.loader)
        try:
            pending = self._send(next(iterator))
        except StopIteration:
            return
        for batch in iterator:
            upcoming = self._send(batch)  # the next batch travels while this one is used
            yield self._finish(*pending)
            pending = upcoming
        yield self._finish(*pending)
