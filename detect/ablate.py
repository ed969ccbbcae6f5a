"""The paper's ablation tables with one command (:mod:`detect.experiments.ablation` does the work).

    python detect/ablate.py --config configs/detect/ablate/tiny.yaml --data data/synthetic \
        --ckpt dinodepth_tiny.pth --out runs/ablate
    python detect/run.py ablate --config configs/detect/ablate/paper.yaml --data SiM3D --ckpt dinodepth.pth \
        --image-encoder-weights dinov2_vitb14_reg4_pretrain.pth --out runs/ablate_sim3d
    python detect/ablate.py ... tables=[aggregation] detect.epochs=50      # key=value overrides
"""

if __package__ in (None, ""):  # run as a script: put the repo root on sys.path instead of the script dir
    import pathlib
    import sys

    sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from detect.experiments.ablation import TABLE_NAMES, AblateConfig, run_ablation
from shared.cli import ArgumentParser, fail, run_main
from shared.config import ConfigError, from_dict, load_yaml, merge_dicts, parse_overrides


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python detect/ablate.py",
        description="Run the paper's ablation tables (3, 4, 6, 7, 8, 10) of ModMap on a dataset.",
        epilog="key=value overrides set AblateConfig fields (tables=[aggregation], source_views=[0,4]) or "
               "DetectConfig fields under detect. (detect.epochs=50). Precedence: defaults < --config < flags "
               "< key=value.")
    p.add_argument("--config", help="ablation YAML (configs/detect/ablate/tiny.yaml or paper.yaml)")
    p.add_argument("--data", "--data-root", dest="data_root", help="dataset root (SiM3D layout)")
    p.add_argument("--ckpt", help="DINO-Depth export")
    p.add_argument("--image-encoder-weights", help="local DINOv2 weights (not needed for image_encoder=random)")
    p.add_argument("--out", help="output folder (default runs/ablate)")
    p.add_argument("--setup", choices=["real2real", "synth2real", "both"])
    p.add_argument("--classes", help="comma-separated classes (default: all)")
    p.add_argument("--tables", help=f"comma-separated tables (default: all of {','.join(TABLE_NAMES)})")
    p.add_argument("--device", help="cpu, cuda, ... (default: the base config's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-reuse", action="store_true", help="recompute runs finished by an earlier invocation")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p


def parse_args(argv: list[str] | None = None) -> AblateConfig:
    args = build_parser().parse_args(argv)
    data = load_yaml(args.config) if args.config else {}
    if args.config and data.get("detect_config"):
        # a relative base config is looked up next to the ablation YAML first
        rel = Path(args.config).parent / data["detect_config"]
        if not Path(data["detect_config"]).is_file() and rel.is_file():
            data["detect_config"] = os.path.normpath(rel)
    flags: dict[str, Any] = {}
    detect: dict[str, Any] = {}
    for name in ("data_root", "ckpt", "image_encoder_weights", "device"):
        if getattr(args, name):
            detect[name] = getattr(args, name)
    if args.no_progress:
        detect["progress"] = False
    if detect:
        flags["detect"] = detect
    for name in ("out", "setup"):
        if getattr(args, name):
            flags[name] = getattr(args, name)
    for name in ("classes", "tables"):
        if getattr(args, name):
            flags[name] = [x.strip() for x in getattr(args, name).split(",") if x.strip()]
    if args.no_reuse:
        flags["reuse"] = False
    data = merge_dicts(merge_dicts(data, flags), parse_overrides(args.overrides))
    acfg = from_dict(AblateConfig, data)
    acfg.validate()
    return acfg


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        acfg = parse_args(argv)
    except ConfigError as exc:
        return fail(exc)
    from detect.encoders import EncoderError
    from detect.pipeline.base import RunError
    from shared.checkpoint import CheckpointError

    command = "python detect/ablate.py " + " ".join(shlex.quote(a) for a in argv)
    try:
        report = run_ablation(acfg, command)
    except (RunError, EncoderError, ConfigError, CheckpointError, FileNotFoundError) as exc:
        return fail(exc)
    print(report.read_text())
    print(f"report: {report}; tables: {report.parent / 'tables'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
