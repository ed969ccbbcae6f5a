"""Argument parsers of the pretraining entry points (``train.py``, ``launch.py``, ``export.py``).

Kept apart from the scripts, free of torch: each script parses its command line with these before
its torch import, so ``--help`` and argument errors answer at once (:func:`shared.cli.preparse`).
"""

from __future__ import annotations

import argparse

from shared.cli import ArgumentParser

_OVERRIDES_EPILOG = "Overrides: key=value pairs, e.g. train.output_dir=runs/x optim.base_lr=5e-4 data.shards=[shards/]"


def train_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        description="DINO-Depth self-supervised pretraining (DINOv2 recipe on depth; image mode optional). "
                    "Exit status: 0 done, 1 configuration or checkpoint error, 2 bad arguments or non-finite "
                    "loss, 3 distributed failure, 75 preempted (checkpoint written: rerun to resume).",
        epilog=_OVERRIDES_EPILOG)
    parser.add_argument("--config", help="YAML config (layered over the built-in defaults)")
    parser.add_argument("--resume", default="auto",
                        help="checkpoint file or run directory to resume from (default: the run directory's latest)")
    parser.add_argument("--no-resume", action="store_true", help="start from scratch even if a checkpoint exists")
    parser.add_argument("--allow-data-change", action="store_true", help="resume although the sample table changed")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")
    return parser


def launch_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        description="Submit DINO-Depth pretraining with submitit (SLURM or this machine).",
        epilog="Overrides: key=value pairs, e.g. slurm.nodes=2 slurm.gpus_per_node=8 slurm.partition=gpu "
               "train.output_dir=/shared/runs/x")
    parser.add_argument("--config", help="YAML config (layered over the built-in defaults)")
    parser.add_argument("--cluster", choices=["auto", "slurm", "local", "debug"], default="auto",
                        help="auto: SLURM when sbatch is available, else this machine")
    parser.add_argument("--allow-data-change", action="store_true", help="resume although the sample table changed")
    parser.add_argument("--rehearse-preemption-at", type=int, default=None, metavar="N",
                        help="signal rank 0 at iteration N of the first attempt (tests the requeue path)")
    parser.add_argument("--wait", action="store_true", help="wait for the job (and its requeues) and print the result")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")
    return parser


def export_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description="Export the DINO-Depth teacher backbone of a training checkpoint.")
    parser.add_argument("--ckpt", required=True, help="training checkpoint, or a run directory (uses its latest)")
    parser.add_argument("--format", default="dinodepth", choices=["dinodepth", "hf", "timm"],
                        help="dinodepth: our .pth (+ .safetensors twin); hf: a Hugging Face Dinov2Model folder "
                             "(AutoModel.from_pretrained); timm: a timm folder (timm.create_model('local-dir:DIR', pretrained=True)). "
                             "For hf/timm, --ckpt may also be a dinodepth.pth export")
    parser.add_argument("--out", required=True,
                        help="output .pth (a .safetensors twin is written beside it); a folder for --format hf/timm")
    parser.add_argument("--no-safetensors", action="store_true", help="write only the .pth file (--format dinodepth)")
    parser.add_argument("--results", default=None,
                        help="JSON file of probe/detection results to put into the model card (hf/timm)")
    return parser


def model_card_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description="Install a finished pretraining run's export under models/zoo/ with its "
                                        "model card (probe results, entropies, confirmation probes, sha256).")
    parser.add_argument("--run", required=True, help="run directory (metrics.jsonl, dinodepth.pth)")
    parser.add_argument("--install", required=True, help="destination .pth (the card is written beside it as .md)")
    parser.add_argument("--command", action="append", default=[], help="a command that reproduces it (repeatable)")
    parser.add_argument("--data-note", action="append", default=[], help="a line about the data, e.g. its generator seed")
    parser.add_argument("--confirm-root", default=None, help="a second held-out probe set, probed on the installed file")
    parser.add_argument("--timings", default=None, help="stage<TAB>wall<TAB>user<TAB>sys file (Makefile timing log)")
    parser.add_argument("--note", action="append", default=[], help="a free-text note for the card (repeatable)")
    parser.add_argument("--name", default=None, help="card title (default: the file stem)")
    return parser
