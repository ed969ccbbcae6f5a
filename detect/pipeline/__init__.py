"""Orchestration of detection runs: fit → predict → evaluate per class (layout: ../shared/design/layout.md).

Layers inside detect/, imports pointing down only (tests/test_layering.py): entry scripts (``run.py``,
``ablate.py``, ``single_view_report.py``, ...) → ``experiments/`` → ``pipeline/`` → ``config.py`` → the
library (``features``, ``fit``, ``infer``, ``cmdr``, ``model``, ``encoders``, ``preprocess``, ``volume``,
``metrics``, ``data/``), which takes settings dataclasses and never the command-line config.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from detect.config import DetectConfig


def run(cfg: DetectConfig) -> dict:
    """Execute a configured run: multiview (SiM3D layout) ``{setup: {class: metrics}}`` or single view
    ``{method: {class: metrics}}`` (empty unless evaluating)."""
    from detect.pipeline.base import deterministic

    with deterministic(cfg):
        if cfg.dataset != "sim3d":  # single-view benchmark, 2D metrics (N = 1: ModMap = CFM)
            from detect.pipeline.single_view import run_single_view

            return run_single_view(cfg)
        from detect.pipeline.multiview import run_multiview

        return run_multiview(cfg)
