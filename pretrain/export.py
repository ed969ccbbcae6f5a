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

Ecosystem formats (``--format``; ``--ckpt`` may then also be a ``dinodepth.pth`` export):

* ``hf``: a Hugging Face folder that ``transformers.AutoModel.from_pretrained(DIR)`` loads offline —
  ``Dinov2Model`` (``Dinov2WithRegistersModel`` for register models), ``config.json`` with
  ``num_channels: 1``, ``model.safetensors``, a model card ``README.md`` (recipe, data, results when
  recorded, input normalisation) and ``dinodepth.json`` (our architecture record, ``input_norm`` and
  ``train_meta``, which :func:`shared.encoder_export.load_dinodepth` and ``detect --ckpt DIR`` read).
* ``timm``: ``model.safetensors`` + timm's ``config.json`` (``architecture``, e.g.
  ``vit_small_patch14_dinov2``, and the exact ``model_args``) + the same model card, loadable with
  ``timm.create_model("local-dir:DIR", pretrained=True)`` or ``timm.create_model("vit_small_patch14_dinov2", in_chans=1,
  pretrained=True, pretrained_cfg_overlay={"file": "DIR/model.safetensors"}, ...)``. timm's register
  models add the cls positional entry to ``cls_token`` (``no_embed_class``); the export folds it in,
  which is exact.

Both folders are written to a temporary sibling and renamed when complete.
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
import json
import os
import shutil
import subprocess
import tempfile
import warnings
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
from shared.encoder_export import (  # noqa: F401  (re-exported)
    DINODEPTH_JSON,
    default_depth_input_norm,
    load_dinodepth,
)
from shared.vit import (
    DinoVisionTransformer,
    ViTConfig,
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


def backbone_from_checkpoint(checkpoint: dict | str | os.PathLike
                             ) -> tuple[dict[str, torch.Tensor], dict, dict, dict]:
    """(backbone state, architecture record, input_norm, train_meta) of a training checkpoint (ours or
    upstream's, a run folder or a file) or of an existing ``dinodepth.pth`` / ``.safetensors`` export."""
    if not isinstance(checkpoint, dict):
        path = resolve_checkpoint_path(checkpoint)
        checkpoint = load_checkpoint(path)
        if "dcp" in checkpoint and "teacher" not in checkpoint:  # FSDP: the tensors are in a DCP folder
            from pretrain.parallel import load_sharded_full

            checkpoint = {**checkpoint, "teacher": load_sharded_full(str(Path(path).parent / checkpoint["dcp"]))[1]}
    if "teacher" not in checkpoint:
        if isinstance(checkpoint.get("model"), dict) and isinstance(checkpoint.get("config"), dict):  # an export
            arch = dict(checkpoint["config"], drop_path_rate=0.0)
            return (convert_state_dict(checkpoint["model"]), arch,
                    dict(checkpoint.get("input_norm") or default_depth_input_norm()),
                    dict(checkpoint.get("train_meta") or {}))
        raise CheckpointError("checkpoint has no 'teacher' state dict: not a training checkpoint or an export")
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
    return backbone, arch, dict(input_norm), train_meta


def export_from_checkpoint(checkpoint: dict | str | os.PathLike, out: str | os.PathLike, safetensors: bool = True) -> Path:
    """Export the teacher backbone of a training checkpoint (ours, or upstream's) to ``out``."""
    backbone, arch, input_norm, train_meta = backbone_from_checkpoint(checkpoint)
    return write_export(out, backbone, arch, input_norm, train_meta, safetensors=safetensors)


# -- ecosystem formats -----------------------------------------------------------------------------------
EXPORT_FORMATS = ("dinodepth", "hf", "timm")
_TIMM_SIZES = {"vit_small_patch14": "small", "vit_base_patch14": "base", "vit_large_patch14": "large"}


def _validated(backbone_state: dict[str, torch.Tensor], arch: dict) -> tuple[DinoVisionTransformer, ViTConfig]:
    cfg = ViTConfig.from_dict(dict(arch, drop_path_rate=0.0))
    model = vit_from_config(cfg)
    load_backbone_weights(model, backbone_state, source="export")
    return model.eval(), cfg


def _write_folder_atomically(out: Path, fill) -> Path:
    """Call ``fill(tmp_dir)`` on a temporary sibling of ``out`` and rename it to ``out`` when complete
    (an existing ``out`` is replaced only then)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--out {out} exists and is not a folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        fill(tmp)
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def json_block(obj: Any) -> str:
    return "```json\n" + json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n```"


def model_card(fmt: str, cfg: ViTConfig, input_norm: dict, train_meta: dict, results: dict | None,
               load_snippet: str, notes: list[str]) -> str:
    """README.md of an exported folder: what the encoder is, how it was trained, on which data, the
    results recorded with it and exactly how inputs must be normalised."""
    data = train_meta.get("data") or {}
    modality = input_norm.get("modality", "depth")
    lines = ["---", "library_name: " + ("transformers" if fmt == "hf" else "timm"),
             "tags:", "- dinov2", "- depth", "- anomaly-detection", "- dinodepth", "---", "",
             f"# DINO-Depth ({'depth' if modality == 'depth' else 'image'} encoder, "
             f"{cfg.arch}, {cfg.in_chans} input channel{'s' if cfg.in_chans != 1 else ''})", "",
             "A DINOv2-architecture ViT trained self-supervised (DINO + iBOT + KoLeo, teacher backbone) by the "
             "DINO-Depth recipe of this toolkit" + (" on single-channel depth maps." if modality == "depth" else "."),
             "", "## Load", "", "```python", load_snippet, "```", "",
             "## Input normalisation (required)", ""]
    if modality == "depth":
        lines += [f"One channel, the toolkit's canonical nearness map (`shared.depth.normalize_depth`, mode "
                  f"`{input_norm.get('mode')}`): valid pixels x = eps + (1 − eps)·clip((hi − z)/(hi − lo), 0, 1) "
                  f"for metric depth z (near = 1; for relative disparity d: (d − lo)/(hi − lo)), with "
                  f"lo, hi the {input_norm.get('pct')} percentiles of the valid values and eps = "
                  f"{input_norm.get('eps')}; invalid pixels = {input_norm.get('invalid_value', 0.0)}. No mean/std "
                  "step follows.", ""]
    else:
        lines += [f"Image input: divide by {input_norm.get('scale')}, then (x − mean)/std with mean "
                  f"{input_norm.get('mean')}, std {input_norm.get('std')}.", ""]
    lines += [json_block({"input_norm": input_norm}), "",
              "## Architecture", "",
              f"patch {cfg.patch_size}, embed dim {cfg.embed_dim}, {cfg.depth} blocks, {cfg.num_heads} heads, "
              f"MLP ratio {cfg.mlp_ratio}, LayerScale {cfg.layerscale}, {cfg.num_register_tokens} register tokens, "
              f"positional grid {cfg.grid_size}×{cfg.grid_size} ({cfg.img_size} px); positional embeddings are "
              f"resized bicubically for other sizes (offset {cfg.interpolate_offset}, antialias "
              f"{cfg.interpolate_antialias} in the toolkit).", ""]
    lines += ["## Training recipe", "",
              f"iterations {train_meta.get('iteration', 'unknown')}, global batch "
              f"{train_meta.get('global_batch_size', 'unknown')}, world size {train_meta.get('world_size', 'unknown')}, "
              f"seed {train_meta.get('seed', 'unknown')}, code {train_meta.get('code_version', 'unknown')}.", ""]
    if train_meta.get("config"):
        lines += ["<details><summary>resolved training config</summary>", "", json_block(train_meta["config"]),
                  "", "</details>", ""]
    lines += ["## Data", ""]
    if data or train_meta.get("fingerprint"):
        lines += [f"preset {data.get('preset')}, sources {data.get('sources')}, splits {data.get('splits')}, "
                  f"{train_meta.get('table_size', 'unknown')} maps, shard fingerprint "
                  f"`{train_meta.get('fingerprint', 'unknown')}`.", ""]
    else:
        lines += ["not recorded with this checkpoint.", ""]
    lines += ["## Results", ""]
    recorded = results or train_meta.get("probe_results") or train_meta.get("results")
    if recorded:
        lines += ["Recorded with this export (as given; see the source for instances and intervals):", "",
                  json_block(recorded), ""]
    else:
        lines += ["No probe or detection results were recorded with this export.", ""]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    lines += ["## Licence", "", "The weights inherit the licences of the training data (several depth datasets are "
              "CC BY-NC-SA 4.0): check the data listed above before any commercial use.", ""]
    return "\n".join(lines)


def export_hf(backbone_state: dict[str, torch.Tensor], arch: dict, input_norm: dict, train_meta: dict,
              out: str | os.PathLike, results: dict | None = None) -> Path:
    """Write a Hugging Face ``Dinov2Model`` (``Dinov2WithRegistersModel``) folder; returns it."""
    from transformers import AutoConfig, AutoModel

    from shared.hf_dinov2 import dinov2_to_hf_dinov2, hf_config_dict, hf_interpolation

    ours, cfg = _validated(backbone_state, arch)
    hf_fields = hf_config_dict(cfg)
    model_type = hf_fields.pop("model_type")
    config = AutoConfig.for_model(model_type, **hf_fields)
    model = AutoModel.from_config(config).eval()
    hf_state = dinov2_to_hf_dinov2(ours.state_dict(), cfg, list(model.state_dict()))
    missing, unexpected = model.load_state_dict(hf_state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"Hugging Face export: tensors missing {missing}, unexpected {unexpected}")
    notes = []
    interp = hf_interpolation(model_type)
    if (cfg.interpolate_offset, cfg.interpolate_antialias) != (interp["interpolate_offset"], interp["interpolate_antialias"]):
        note = (f"transformers resizes positional embeddings with offset {interp['interpolate_offset']}, antialias "
                f"{interp['interpolate_antialias']}; this encoder was used with offset {cfg.interpolate_offset}, "
                f"antialias {cfg.interpolate_antialias}: tokens are identical at {cfg.img_size} px and differ "
                "slightly at other input sizes")
        warnings.warn(note, stacklevel=2)
        notes.append(note)
    arch_name = type(model).__name__
    snippet = ("from transformers import AutoModel\n"
               f"model = AutoModel.from_pretrained(\"DIR\")  # {arch_name}, num_channels={cfg.in_chans}\n"
               f"tokens = model(pixel_values=x).last_hidden_state[:, {1 + cfg.num_register_tokens}:]  "
               "# x: (B, 1, H, W) normalised as below, H and W multiples of 14")
    card = model_card("hf", cfg, input_norm, train_meta, results, snippet, notes)
    record = {"format": "dinodepth-hf", "format_version": 1, "config": cfg.to_dict(), "input_norm": input_norm,
              "train_meta": train_meta}

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        (tmp / "README.md").write_text(card)
        (tmp / DINODEPTH_JSON).write_text(json.dumps(record, indent=2, sort_keys=True, default=str))

    return _write_folder_atomically(Path(out), fill)


def timm_model_name(cfg: ViTConfig) -> str:
    """The timm DINOv2 architecture matching ``cfg`` (other sizes use the small one with model_args)."""
    size = _TIMM_SIZES.get(cfg.arch, "small")
    return f"vit_{size}_patch14_reg4_dinov2" if cfg.num_register_tokens else f"vit_{size}_patch14_dinov2"


def timm_model_args(cfg: ViTConfig) -> dict:
    if not cfg.ffn_bias:
        raise CheckpointError("timm's ViT MLP always has biases; this model has ffn_bias=False")
    args = {"img_size": cfg.img_size, "patch_size": cfg.patch_size, "in_chans": cfg.in_chans,
            "embed_dim": cfg.embed_dim, "depth": cfg.depth, "num_heads": cfg.num_heads, "mlp_ratio": cfg.mlp_ratio,
            "qkv_bias": cfg.qkv_bias, "proj_bias": cfg.proj_bias, "init_values": cfg.layerscale,
            "num_classes": 0}
    if cfg.num_register_tokens:
        args.update(reg_tokens=cfg.num_register_tokens, no_embed_class=True)
    return args


def dinov2_to_timm(state_dict: dict[str, torch.Tensor], cfg: ViTConfig) -> dict[str, torch.Tensor]:
    """Flat DINOv2 state dict → timm ``VisionTransformer`` keys (inverse of :func:`convert_state_dict`)."""
    sd = {k: v for k, v in state_dict.items() if k != "mask_token"}
    if cfg.num_register_tokens:  # timm (no_embed_class): cls positional entry folded into cls_token
        pos = sd.pop("pos_embed")
        sd["cls_token"] = sd["cls_token"] + pos[:, :1]
        sd["pos_embed"] = pos[:, 1:].contiguous()
        sd["reg_token"] = sd.pop("register_tokens")
    return sd


def export_timm(backbone_state: dict[str, torch.Tensor], arch: dict, input_norm: dict, train_meta: dict,
                out: str | os.PathLike, results: dict | None = None) -> Path:
    """Write a timm folder (``model.safetensors`` + ``config.json`` + model card); returns it."""
    import timm
    from timm.models import save_for_hf

    ours, cfg = _validated(backbone_state, arch)
    name, args = timm_model_name(cfg), timm_model_args(cfg)
    model = timm.create_model(name, pretrained=False, **args).eval()
    missing, unexpected = model.load_state_dict(dinov2_to_timm(ours.state_dict(), cfg), strict=False)
    if missing or unexpected:
        raise CheckpointError(f"timm export: tensors missing {missing}, unexpected {unexpected}")
    if cfg.in_chans == 1:
        mean, std = (0.0,), (1.0,)  # inputs are already normalised (nearness map), see the card
    else:
        mean, std = tuple(input_norm.get("mean", (0.0,) * cfg.in_chans)), tuple(input_norm.get("std", (1.0,) * cfg.in_chans))
    overrides = ", ".join(f"{k}={v!r}" for k, v in args.items() if k not in ("num_classes",))
    snippet = ("import timm\n"
               "model = timm.create_model(\"local-dir:DIR\", pretrained=True)  # or:\n"
               f"model = timm.create_model(\"{name}\", pretrained=True, num_classes=0, {overrides},\n"
               "                          pretrained_cfg_overlay={\"file\": \"DIR/model.safetensors\"})\n"
               f"tokens = model.forward_features(x)[:, {1 + cfg.num_register_tokens}:]  "
               "# x: (B, 1, H, W) normalised as below")
    notes = ["timm's ViT checks the input size (img_size); pass dynamic_img_size=True for other sizes "
             "(timm then resizes positional embeddings its own way)."]
    if cfg.num_register_tokens:
        notes.append("timm's register layout adds the cls positional embedding to cls_token (folded in exactly).")
    card = model_card("timm", cfg, input_norm, train_meta, results, snippet, notes)
    data_config = {"input_size": (cfg.in_chans, cfg.img_size, cfg.img_size), "mean": mean, "std": std,
                   "interpolation": "bicubic", "crop_pct": 1.0}

    def fill(tmp: Path) -> None:
        save_for_hf(model, str(tmp), model_args=args, safe_serialization=True, data_config=data_config)
        (tmp / "README.md").write_text(card)

    return _write_folder_atomically(Path(out), fill)


def export_any(checkpoint: dict | str | os.PathLike, out: str | os.PathLike, fmt: str = "dinodepth",
               safetensors: bool = True, results: dict | None = None) -> Path:
    """:func:`export_from_checkpoint` (``dinodepth``), :func:`export_hf` or :func:`export_timm`."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; expected one of {EXPORT_FORMATS}")
    backbone, arch, input_norm, train_meta = backbone_from_checkpoint(checkpoint)
    if fmt == "dinodepth":
        return write_export(out, backbone, arch, input_norm, train_meta, safetensors=safetensors)
    writer = export_hf if fmt == "hf" else export_timm
    return writer(backbone, arch, input_norm, train_meta, out, results=results)


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
        results = None
        if args.results:
            try:
                results = json.loads(Path(args.results).read_text())
            except (OSError, ValueError) as exc:
                raise CheckpointError(f"--results {args.results}: not a readable JSON file ({exc})") from None
        out = export_any(args.ckpt, args.out, fmt=args.format, safetensors=not args.no_safetensors, results=results)
    except (CheckpointError, ValueError) as exc:
        return fail(CheckpointError(f"export failed: {exc}"), status=1)
    if args.format == "timm":
        print(f"wrote {out} (timm {json.loads((out / 'config.json').read_text())['architecture']}, "
              "model.safetensors, config.json, README.md)")
        return 0
    model, norm = load_dinodepth(out)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"wrote {out} ({n_params:,} backbone parameters, in_chans {model.cfg.in_chans}, input_norm {norm})")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main, status=1))
