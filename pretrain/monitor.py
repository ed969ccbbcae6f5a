"""What a pretraining run shows of itself (``../shared/spec/dino_depth.md`` §11): the iteration records
in ``metrics.jsonl`` (and TensorBoard), and the evaluation pictures ``eval/pca_<it>.png`` (the first three
principal components of the teacher's patch features on fixed samples). Rank 0 writes; the loop
(:mod:`pretrain.train`) decides when.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from pretrain.augment import CropParams, warp_crop
from pretrain.config import PretrainConfig
from pretrain.loader import SampleSource, prepare_sample
from shared.io import atomic_write_text

log = logging.getLogger("pretrain")


class MetricsLog:
    """``<out_dir>/metrics.jsonl`` (one JSON record per logged iteration or event) and, with
    ``tensorboard``, the same numbers as TensorBoard scalars; inactive off rank 0."""

    def __init__(self, out_dir: Path, is_main: bool) -> None:
        self.path = Path(out_dir) / "metrics.jsonl"
        self.is_main = is_main
        self._tb = None

    def open_tensorboard(self) -> None:
        if not self.is_main:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.path.parent / "tensorboard"))
        except ImportError:
            warnings.warn("train.tensorboard=true but tensorboard is not installed", stacklevel=3)

    def write(self, record: dict) -> None:
        if not self.is_main:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self._tb is not None and "event" not in record:
            it = record["iteration"]
            for key, value in flatten_numbers(record).items():
                if key != "iteration":
                    self._tb.add_scalar(key, value, it)

    def truncate(self, iteration: int) -> None:
        """Drop the records of iterations ≥ ``iteration``, where this run starts.

        A run killed after logging but before its next checkpoint repeats those iterations when it
        resumes (or starts over): without this the log would hold them twice (and a line cut by a
        crash would break every JSON-lines reader). The rewrite is atomic."""
        if not self.is_main or not self.path.is_file():
            return
        lines = self.path.read_text().splitlines()
        kept = [line for line in lines if logged_before(line, iteration)]
        if len(kept) < len(lines):
            atomic_write_text(self.path, "".join(f"{line}\n" for line in kept))
            log.info("metrics.jsonl: dropped %d record(s) of iterations >= %d (recomputed after the resume)",
                     len(lines) - len(kept), iteration)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def iteration_record(it: int, schedule: dict, metrics: dict, timing: dict, data_passes: float,
                     skipped_samples: int, nonfinite_skipped: int, device: torch.device) -> dict:
    """The ``metrics.jsonl`` record of iteration ``it``: the schedules' values, the loss components
    (already rank means), rank 0's entropies and prototype counts, timings and peak memory."""
    reduced = {k: metrics[k] for k in ("dino_local", "dino_global", "ibot", "koleo", "total")}
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        import resource

        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "iteration": it,
        **schedule,
        **reduced,
        "grad_norm": metrics.get("grad_norm", {}),
        "teacher_entropy": metrics.get("teacher_entropy"),
        "teacher_distinct_prototypes": metrics.get("teacher_distinct_prototypes"),
        "ibot_teacher_entropy": metrics.get("ibot_teacher_entropy"),
        "n_masked": metrics.get("n_masked"),
        "data_passes": data_passes,
        "time_per_iteration": timing["time"],
        "data_time": timing["data"],
        "peak_memory_mb": round(peak_mb, 1),
        "skipped_samples": skipped_samples,
        "nonfinite_skipped": nonfinite_skipped,
    }


def logged_before(line: str, iteration: int) -> bool:
    """A complete ``metrics.jsonl`` record of an iteration before ``iteration`` (False for a cut line)."""
    try:
        return int(json.loads(line)["iteration"]) < iteration
    except (ValueError, KeyError, TypeError):
        return False


def flatten_numbers(record: dict, prefix: str = "") -> dict[str, float]:
    out = {}
    for k, v in record.items():
        key = f"{prefix}/{k}" if prefix else k
        if isinstance(v, dict):
            out.update(flatten_numbers(v, key))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None:
            out[key] = float(v)
    return out


# -- evaluation pictures ---------------------------------------------------------------------------------
def fixed_eval_inputs(cfg: PretrainConfig, table: SampleSource, n: int) -> Tensor | None:
    """n evenly spaced samples, central square window, resized to the global crop size (no randomness)."""
    size = cfg.crops.global_crops_size
    inputs = []
    for index in np.linspace(0, len(table) - 1, num=min(n, len(table))).round().astype(int):
        raw, meta = table.read(int(index))
        prepared = prepare_sample(cfg, raw, meta)
        if prepared is None:
            continue
        values, valid = prepared
        _, H, W = values.shape
        side = float(min(H, W))
        params = CropParams(cy=H / 2, cx=W / 2, h=side, w=side)
        if cfg.data.modality == "image":
            from pretrain.augment import normalize_image

            crop, _ = warp_crop(values, None, params, size, "masked_bilinear", None)
            crop = normalize_image(crop, cfg.image_aug)
        else:
            crop, _ = warp_crop(values, valid, params, size, cfg.aug.interp, cfg.aug.edge_thresh)
        inputs.append(torch.from_numpy(crop))
    return torch.stack(inputs) if inputs else None


@torch.no_grad()
def pca_feature_image(backbone: nn.Module, inputs: Tensor, autocast: Callable | None = None) -> np.ndarray:
    """Rows of [input | first three principal components of the patch features as RGB], uint8."""
    backbone.eval()
    ctx = autocast() if autocast is not None else torch.autocast(inputs.device.type, enabled=False)
    with ctx:
        tokens, (h, w) = backbone.get_patch_tokens(inputs)
    x = tokens.float().reshape(-1, tokens.shape[-1])
    x = x - x.mean(dim=0, keepdim=True)
    _, _, v = torch.linalg.svd(x, full_matrices=False)
    proj = x @ v[:3].t()
    lo, hi = torch.quantile(proj, 0.01, dim=0), torch.quantile(proj, 0.99, dim=0)
    rgb = ((proj - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1).reshape(inputs.shape[0], h, w, 3)
    size = inputs.shape[-1]
    rgb = torch.nn.functional.interpolate(rgb.permute(0, 3, 1, 2), size=(size, size), mode="nearest").permute(0, 2, 3, 1)
    gray = inputs.float().mean(dim=1)
    gray = (gray - gray.amin(dim=(1, 2), keepdim=True)) / (gray.amax(dim=(1, 2), keepdim=True)
                                                            - gray.amin(dim=(1, 2), keepdim=True)).clamp_min(1e-6)
    gray = gray.unsqueeze(-1).expand(-1, -1, -1, 3)
    rows = torch.cat([gray, rgb], dim=2)  # (n, size, 2·size, 3)
    return (rows.reshape(-1, 2 * size, 3).cpu().numpy() * 255).round().astype(np.uint8)


def write_pca_image(out_dir: Path, iteration: int, image: np.ndarray) -> Path:
    """``<out_dir>/eval/pca_<it>.png``."""
    from PIL import Image

    path = Path(out_dir) / "eval" / f"pca_{iteration:08d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path
