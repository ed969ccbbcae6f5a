"""Teacher-backbone export and loaders (``../shared/spec/dino_depth.md`` §11).

``dinodepth.pth`` (``torch.load(weights_only=True)``-safe dict):

| key | content |
|---|---|
| ``format_version`` | 1 |
| ``model`` | teacher backbone state dict, flat DINOv2 keys (``cls_token``, ``pos_embed``, ``blocks.{i}.…``) |
| ``config`` | architecture record (:meth:`shared.vit.ViTConfig.to_dict`: arch, img_size (pos-embed grid · patch), patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio, qkv/proj/ffn bias, layerscale, num_register_tokens, drop_path_rate 0, interpolate_offset, interpolate_antialias, attn_impl) |
| ``arch`` | the same record (the key :func:`shared.checkpoint.save_model` readers look for) |
| ``input_norm`` | depth: ``{modality: depth, mode, eps, pct, invalid_value: 0}``; image: ``{modality: image, in_chans, scale: 255, max_normalize, mean, std}`` |
| ``train_meta`` | iteration, modality, data preset / sources / splits / shard folders, sample-table fingerprint, global batch, world size, seed, code version, the resolved training config |

plus ``dinodepth.safetensors`` (same tensors, the other keys as JSON metadata) and a ``.sha256``
sidecar for each file. ``detect`` rebuilds the encoder from ``config`` alone via
:func:`shared.encoder_export.load_dinodepth` (re-exported here).

CLI: ``python -m pretrain.export --ckpt RUN_DIR_OR_CHECKPOINT --out dinodepth.pth`` (also accepts an
upstream DINOv2 training checkpoint ``{"teacher": {"backbone.*": …}}``, chunked blocks included).
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a script: put the repo root on sys.path instead of the script dir
    import pathlib
    import sys

    sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

if __name__ == "__main__":  # --help and argument errors answer before the torch import below
    from pretrain.cli import export_parser
    from shared.cli import preparse

    preparse(export_parser)

import functools
import os
import subprocess
from pathlib import Path
from typing import Any

import torch

from pretrain.cli import export_parser
from shared.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    load_checkpoint,
    save_model,
    write_sha256_sidecar,
)
from shared.cli import fail, run_main
from shared.encoder_export import default_depth_input_norm, load_dinodepth  # noqa: F401  (re-exported)
from shared.vit import (
    DinoVisionTransformer,
    convert_state_dict,
    infer_config_from_state_dict,
    load_backbone_weights,
    vit_from_config,
)

EXPORT_FORMAT_VERSION = FORMAT_VERSION


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """Package version plus the git commit of the code, when known (computed once per process)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        pkg = version("dinodepth-modmap")
    except PackageNotFoundError:
        pkg = "unknown"
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5, check=False)
        commit = rev.stdout.strip() if rev.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):  # no git, or a hung call
        commit = ""
    return f"{pkg}+{commit}" if commit else pkg


def teacher_backbone_state(teacher_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Flat backbone keys from a teacher state dict with a ``backbone.`` prefix (ours or upstream's)."""
    prefix = "backbone."
    if any(k.startswith(prefix) for k in teacher_state):
        teacher_state = {k[len(prefix):]: v for k, v in teacher_state.items() if k.startswith(prefix)}
    return convert_state_dict(teacher_state)


def write_export(path: str | os.PathLike, backbone_state: dict[str, torch.Tensor], arch: dict[str, Any],
                 input_norm: dict[str, Any], train_meta: dict[str, Any], safetensors: bool = True) -> Path:
    """Write ``path`` (.pth) and, optionally, the ``.safetensors`` twin, each with a sha256 sidecar."""
    path = Path(path)
    arch = dict(arch, drop_path_rate=0.0)
    state = {k: v.detach().float().cpu().contiguous() for k, v in backbone_state.items()}
    # Validate before writing: the record must rebuild a model that takes these weights.
    probe = vit_from_config(arch)
    load_backbone_weights(probe, state, source="export")
    meta = {"config": arch, "input_norm": input_norm, "train_meta": train_meta}
    save_model(state, path, arch, **meta)
    write_sha256_sidecar(path)
    if safetensors:
        st_path = path.with_suffix(".safetensors")
        save_model(state, st_path, arch, **meta)
        write_sha256_sidecar(st_path)
    return path


def export_from_checkpoint(checkpoint: dict | str | os.PathLike, out: str | os.PathLike, safetensors: bool = True) -> Path:
    """Export the teacher backbone of a training checkpoint (ours, or upstream's) to ``out``."""
    if not isinstance(checkpoint, dict):
        checkpoint = load_checkpoint(resolve_checkpoint_path(checkpoint))
    if "teacher" not in checkpoint:
        raise CheckpointError("checkpoint has no 'teacher' state dict: not a training checkpoint")
    backbone = teacher_backbone_state(checkpoint["teacher"])
    if "arch" in checkpoint:  # ours: the architecture record is stored, never guessed
        arch = dict(checkpoint["arch"])
        input_norm = checkpoint.get("input_norm") or default_depth_input_norm()
        train_meta = dict(checkpoint.get("train_meta") or {}, iteration=int(checkpoint.get("iteration", 0)))
    else:  # upstream DINOv2 checkpoint: derive the architecture from the tensor shapes
        arch = infer_config_from_state_dict(backbone).to_dict()
        input_norm = default_depth_input_norm()
        train_meta = {"source": "upstream teacher checkpoint", "iteration": checkpoint.get("iteration")}
    train_meta.setdefault("code_version", code_version())
    return write_export(out, backbone, arch, input_norm, train_meta, safetensors=safetensors)


def resolve_checkpoint_path(path: str | os.PathLike) -> Path:
    """A checkpoint file, or a run directory / checkpoint folder with a ``latest`` pointer."""
    path = Path(path)
    if path.is_dir():
        for folder in (path / "checkpoints", path):
            pointer = folder / "latest"
            if pointer.is_file():
                target = folder / pointer.read_text().strip()
                if target.is_file():
                    return target
                raise CheckpointError(f"{pointer} points to {target}, which does not exist")
        raise CheckpointError(f"{path} holds no 'latest' checkpoint pointer")
    return path


def load_upstream_teacher(checkpoint: dict | str | os.PathLike, map_location: str | torch.device = "cpu",
                          **overrides) -> DinoVisionTransformer:
    """Backbone of an upstream-style teacher checkpoint (``{"teacher": {"backbone.*": …}}``, chunked
    ``blocks.{c}.{i}`` keys allowed, or a bare backbone state dict). The architecture is inferred from
    the tensor shapes (heads = dim / 64); ``overrides`` fix anything shapes cannot tell
    (``num_heads``, ``interpolate_offset``, …)."""
    if not isinstance(checkpoint, dict):
        checkpoint = load_checkpoint(checkpoint)
    state = checkpoint.get("teacher", checkpoint.get("model", checkpoint))
    backbone = teacher_backbone_state(state)
    cfg = infer_config_from_state_dict(backbone, **overrides)
    model = vit_from_config(cfg)
    load_backbone_weights(model, backbone, source="upstream teacher")
    return model.eval().requires_grad_(False).to(map_location)


def main(argv: list[str] | None = None) -> int:
    args = export_parser().parse_args(argv)
    try:
        out = export_from_checkpoint(args.ckpt, args.out, safetensors=not args.no_safetensors)
    except (CheckpointError, ValueError) as exc:
        return fail(CheckpointError(f"export failed: {exc}"), status=1)
    model, norm = load_dinodepth(out)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"wrote {out} ({n_params:,} backbone parameters, in_chans {model.cfg.in_chans}, input_norm {norm})")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main, status=1))
