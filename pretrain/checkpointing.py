"""Training checkpoints of DINO-Depth pretraining (``../shared/spec/dino_depth.md`` §8): the files
(``checkpoints/checkpoint_<it>.pth`` + ``checkpoints/latest``, written atomically, the last ``keep``
kept), finding the one to resume from, the compatibility check of a resumed config, and the RNG state
(weights_only-safe: lists and tensors, no numpy arrays). What a checkpoint holds is assembled by
:meth:`pretrain.train.Trainer.checkpoint_state`.
"""

from __future__ import annotations

import logging
import random
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pretrain import export as export_lib
from pretrain.config import PretrainConfig
from shared.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from shared.config import ConfigError, from_dict, to_dict
from shared.io import atomic_write_text

log = logging.getLogger("pretrain")

CHECKPOINT_FORMAT_VERSION = 1
CKPT_RE = re.compile(r"^checkpoint_(\d{8})\.pth$")
# Temp files of shared.io.atomic_open left by a process killed mid-write (kill -9, node failure).
CKPT_TMP_RE = re.compile(r"^\.(checkpoint_\d{8}\.pth|latest)\..*\.tmp$")
# Keys that may change between a run and its resumption without affecting the result.
RUNTIME_KEYS = {"train.stop_at_iteration", "train.num_workers", "train.progress", "train.log_period",
                "train.ckpt_period", "train.keep", "train.export_period", "train.eval_period", "train.device",
                "train.tensorboard", "train.output_dir", "train.compile", "train.eval_num_images"}
# How the run is executed (world size, strategy, cluster) never changes its result beyond round-off.
RUNTIME_PREFIXES = ("dist.", "slurm.")


# -- files -----------------------------------------------------------------------------------------------
def write_checkpoint(ckpt_dir: Path, iteration: int, state: dict, keep: int) -> Path:
    """Atomically write ``checkpoint_<it>.pth``, move ``latest``, prune to the last ``keep``; a failed
    write replaces nothing (the previous checkpoint stays the latest)."""
    name = f"checkpoint_{iteration:08d}.pth"
    try:
        path = save_checkpoint(state, ckpt_dir / name)
        atomic_write_text(ckpt_dir / "latest", name + "\n")
    except OSError as exc:  # disk full, quota, permissions: the previous checkpoint stays intact
        previous = latest_name(ckpt_dir)
        raise CheckpointError(
            f"could not write checkpoint {ckpt_dir / name}: {exc.strerror or exc}; nothing was "
            f"replaced, the latest checkpoint is still {previous or 'none'}; free space and rerun to "
            "resume") from exc
    existing = sorted(p for p in ckpt_dir.iterdir() if CKPT_RE.match(p.name))
    for old in existing[: max(0, len(existing) - max(1, keep))]:
        old.unlink(missing_ok=True)
    # Only this rank writes here, and its writes are complete: any temp file is a killed write's.
    for stale in (p for p in ckpt_dir.iterdir() if CKPT_TMP_RE.match(p.name)):
        stale.unlink(missing_ok=True)
    log.info("checkpoint %s", path)
    return path


def latest_name(ckpt_dir: Path) -> str | None:
    try:
        return (ckpt_dir / "latest").read_text().strip() or None
    except OSError:
        return None


def find_resume(out_dir: Path, resume: bool | str) -> Path | None:
    """The checkpoint to resume from: an explicit path, the run's latest (``True``/``"auto"``), or None."""
    if isinstance(resume, (str, Path)) and str(resume) not in ("", "auto"):
        return export_lib.resolve_checkpoint_path(resume)
    if resume is False:
        return None
    if (out_dir / "checkpoints" / "latest").is_file():
        return export_lib.resolve_checkpoint_path(out_dir)
    return None


def read_training_checkpoint(path: Path) -> dict:
    """A DINO-Depth training checkpoint (``weights_only`` load), or a :class:`CheckpointError`."""
    ckpt = load_checkpoint(path, map_location="cpu")
    if ckpt.get("format_version") != CHECKPOINT_FORMAT_VERSION or "student" not in ckpt:
        raise CheckpointError(f"{path} is not a DINO-Depth training checkpoint")
    return ckpt


# -- compatibility of a resumed run ----------------------------------------------------------------------
def compare_configs(cfg: PretrainConfig, saved: dict, same_global_batch: bool = False) -> None:
    """Warn about settings that differ from the checkpoint's (runtime-only keys excepted)."""
    current = to_dict(cfg)
    # A different world size at the same G changes B = G / W: expected, not worth a warning.
    ignored = {"train.batch_size_per_gpu"} if same_global_batch else set()
    try:
        from_dict(PretrainConfig, saved)
    except ConfigError as exc:
        warnings.warn(f"checkpoint config does not parse with this code version: {exc}", stacklevel=3)
    diffs = [k for k in flatten_keys(current) | flatten_keys(saved)
             if k not in RUNTIME_KEYS and k not in ignored and not k.startswith(RUNTIME_PREFIXES)
             and lookup(current, k) != lookup(saved, k)]
    if diffs:
        warnings.warn("resuming with a config that differs from the checkpoint's in: " + ", ".join(sorted(diffs)),
                      stacklevel=3)


def flatten_keys(d: dict, prefix: str = "") -> set[str]:
    keys = set()
    for k, v in d.items():
        path = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v and all(isinstance(x, str) for x in v) and k not in ("source_weights",):
            keys |= flatten_keys(v, path)
        else:
            keys.add(path)
    return keys


def lookup(d: dict, dotted: str) -> Any:
    node: Any = d
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


# -- RNG state -------------------------------------------------------------------------------------------
def get_rng_state() -> dict:
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_s = state["numpy"]
    np.random.set_state(("MT19937", np_s["key"].numpy().astype(np.uint32), np_s["pos"], np_s["has_gauss"],
                         np_s["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


__all__ = ["CHECKPOINT_FORMAT_VERSION", "compare_configs", "find_resume", "get_rng_state", "latest_name",
           "read_training_checkpoint", "set_rng_state", "write_checkpoint"]
