"""ModMap detection: train on one nominal instance per class, predict anomaly volumes, evaluate.

    python detect/run.py --ckpt dinodepth.pth --data DIR --image-encoder-weights dinov2_vitb14_reg4_pretrain.pth
    python -m detect.run --config configs/detect/paper.yaml --ckpt dinodepth.pth --data DIR epochs=100

Modes (``--mode``): ``fit`` (train the mapping networks of every class and setup), ``predict`` (per-view
maps, anomaly volumes and instance scores of the test instances), ``evaluate`` (metrics and the
per-class results table from the saved predictions), ``all`` (default: the three in order).
``python detect/run.py ablate --config configs/detect/ablate/tiny.yaml ...`` runs the paper's ablation
tables instead (:mod:`detect.ablate`).

Settings come from :class:`DetectConfig` defaults ← ``--config`` YAML ← ``--flag`` options ←
``key=value`` overrides; the resolved config is saved as ``<out>/config.yaml``. Outputs
(``../shared/spec/modmap.md`` §18)::

    <out>/config.yaml, results.md, results.csv, results.json
    <out>/<setup>/<class>/model.pt, train_log.jsonl, scores.csv, metrics.json, timing.json,
                          volumes/<instance>.npz (.ply), maps/<instance>/<view>_{img2depth,depth2img,combined}.npy (.png)
"""

if __package__ in (None, ""):  # run as a script: put the repo root on sys.path instead of the script dir
    import pathlib
    import sys

    sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import sys
from pathlib import Path

# Light imports only at module level, so that `--help` and config errors answer instantly; torch and
# the model code are imported when a run starts.
from detect.config import DetectConfig, build_parser, parse_config
from shared.cli import fail, run_main
from shared.config import ConfigError

__all__ = ["DetectConfig", "build_parser", "main", "parse_config", "run"]


def run(cfg: DetectConfig) -> dict:
    """Execute a configured run (:func:`detect.pipeline.run`)."""
    from detect.pipeline import run as run_pipeline

    return run_pipeline(cfg)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] == ["ablate"]:  # `python detect/run.py ablate ...` = `python detect/ablate.py ...`
        from detect.ablate import main as ablate_main

        return ablate_main(args[1:])
    try:
        cfg = parse_config(args)
    except ConfigError as exc:
        return fail(exc)
    import torch

    from detect.encoders import EncoderError
    from detect.pipeline.base import RunError
    from shared.checkpoint import CheckpointError
    from shared.memory import keep_freed_memory

    if cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()):
        keep_freed_memory()  # the CPU mapping stage then skips a first-touch page fault per page (performance.md)
    try:
        results = run(cfg)
    except (RunError, EncoderError, ConfigError, CheckpointError, FileNotFoundError) as exc:
        return fail(exc)
    if results:
        print((Path(cfg.out) / "results.md").read_text())
    print(f"outputs in {cfg.out} (resolved config: {Path(cfg.out) / 'config.yaml'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
