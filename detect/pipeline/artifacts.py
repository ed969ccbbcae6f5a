"""Files a detection run writes and reads back: fitted model sets (ONE check that a model is used with
the encoders and preprocessing it was trained with), scores.csv, per-view maps, overlays and PLY volumes."""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from detect.pipeline.base import RunError
from shared.io import atomic_write_bytes

if TYPE_CHECKING:
    import torch

    from detect.model import ModMap

MODEL_FORMAT_VERSION = 1


# -- fitted model sets -----------------------------------------------------------------------------
def check_encoders(path: Path, meta: Mapping, current: Mapping, modalities: Iterable[str] = ("image", "depth")
                   ) -> None:
    """A model (or decoder) file must be used with the encoders and preprocessing it was trained with:
    ``meta`` is what it recorded, ``current`` this run's :meth:`encoder_record`."""
    for m in modalities:
        key = f"{m}_encoder"
        if key not in meta:
            raise RunError(f"{path} was trained without the {m} modality; refit with this --modality")
        if meta[key]["sha256"] != current[key]["sha256"]:
            raise RunError(f"{path} was trained with a different {m} encoder "
                           f"({meta[key].get('weights')}, sha256 {str(meta[key]['sha256'])[:12]}…) than this run "
                           f"({current[key].get('weights')}, {str(current[key]['sha256'])[:12]}…)")
    if meta.get("feature_settings") != current.get("feature_settings"):
        raise RunError(f"{path} was trained with other preprocessing settings: {meta.get('feature_settings')} "
                       f"vs {current.get('feature_settings')}")


def save_model(model: ModMap, meta: dict, path: Path) -> None:
    """The mapping networks' state dicts and their ``config`` record (``model.pt``)."""
    from shared.checkpoint import save_checkpoint

    save_checkpoint({**{k: {n: t.detach().cpu() for n, t in sd.items()}
                        for k, sd in model.component_state_dicts().items()}, "config": meta}, path)


def load_model(path: Path, what: str, multi_class: bool = False,
               missing_hint: str = "run --mode fit (or all) first",
               check_meta: Callable[[dict], None] | None = None) -> tuple[ModMap, dict]:
    """A saved :class:`ModMap` (on the CPU) and its ``config`` record (``n_views``, ``n_classes``: as saved);
    ``check_meta(meta)`` may refuse the model (e.g. other views) before the networks are built."""
    from detect.model import ModMap
    from shared.checkpoint import CheckpointError, load_checkpoint

    if not path.is_file():
        raise RunError(f"no {what} {path}: {missing_hint}")
    try:
        obj = load_checkpoint(path)
        meta = dict(obj["config"])
        if check_meta is not None:
            check_meta(meta)
        model = ModMap(int(meta["n_views"]), int(meta["image_dim"]), int(meta["depth_dim"]),
                       int(meta["modulator_hidden"]), meta["variant"],
                       n_classes=int(meta["n_classes"]) if multi_class else 0)
        model.load_component_state_dicts(obj)
    except RunError:
        raise
    except (CheckpointError, KeyError, TypeError, RuntimeError, ValueError) as exc:
        raise RunError(f"{path} is not a {what} file: {exc}") from None
    return model, meta


# -- predictions -----------------------------------------------------------------------------------
def read_scores(path: Path, what: str = "scores file") -> tuple[list[dict], np.ndarray, np.ndarray]:
    """(rows, labels, scores) of a ``scores.csv``."""
    if not path.is_file():
        raise RunError(f"no predictions {path}: run --mode predict (or all) first")
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    try:
        labels = np.array([int(r["gt_label"]) for r in rows])
        scores = np.array([float(r["pred_score"]) for r in rows])
    except (KeyError, ValueError) as exc:
        raise RunError(f"{path} is not a {what} ({exc})") from None
    return rows, labels, scores


def save_maps(folder: Path, arrays: Mapping[str, np.ndarray | torch.Tensor],
              overlay: tuple[np.ndarray, np.ndarray, str] | None = None) -> None:
    """Per-view maps as float16 ``<folder>/<name>.npy`` and an optional overlay ``(image, map, name)``."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, m in arrays.items():
        a = m.detach().cpu().numpy() if hasattr(m, "detach") else np.asarray(m)
        np.save(folder / f"{name}.npy", a.astype(np.float16))
    if overlay is not None:
        image, score_map, name = overlay
        save_overlay(image, score_map, folder / name)


def save_overlay(image: np.ndarray, score_map: np.ndarray, path: Path, max_side: int = 1024) -> None:
    """The grayscale image with the anomaly map as a translucent colour layer (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import colormaps
    from PIL import Image

    img = image.astype(np.float32) / 255.0
    peak = float(score_map.max())
    norm = score_map / peak if peak > 0 else score_map
    color = colormaps["jet"](np.clip(norm, 0, 1))[..., :3]
    alpha = 0.5 * (norm > 0)[..., None]
    rgb = (1 - alpha) * img[..., None] + alpha * color
    pil = Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8))
    if max(pil.size) > max_side:
        pil.thumbnail((max_side, max_side))
    path.parent.mkdir(parents=True, exist_ok=True)
    pil.save(path)


def write_volume_ply(volume, path: Path) -> None:
    """Binary PLY of the hit voxels' centres with a float ``anomaly`` property."""
    volume.finish()  # the occlusion gate's second tier merged (a no-op once merged)
    hit = np.flatnonzero(volume.hit)
    idx = np.stack(np.unravel_index(hit, volume.grid.shape), axis=1)
    centres = volume.grid.centers(idx).astype(np.float32)
    data = np.empty(len(hit), dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("anomaly", "<f4")])
    data["x"], data["y"], data["z"] = centres.T
    data["anomaly"] = volume.scores[hit]
    header = ("ply\nformat binary_little_endian 1.0\n"
              f"element vertex {len(hit)}\nproperty float x\nproperty float y\nproperty float z\n"
              "property float anomaly\nend_header\n").encode()
    atomic_write_bytes(path, header + data.tobytes())

