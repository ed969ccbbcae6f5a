"""What every detection run shares: the user-facing error, device choice, progress bars, deterministic
torch state, and the one class loop that drives fit → predict → evaluate for every kind of run."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import torch

    from detect.config import DetectConfig

Setup = TypeVar("Setup")


class RunError(RuntimeError):
    """A user-facing problem with the inputs of a run (printed without a traceback)."""


def device(name: str) -> torch.device:
    """``auto``: CUDA when available, else the CPU; a named CUDA device must exist."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RunError(f"device {name} requested but CUDA is not available")
    return dev


def progress_bar(total: int, desc: str, enabled: bool, unit: str = "it"):
    """A tqdm bar that vanishes when done (``enabled=False``: silent)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, leave=False, dynamic_ncols=True)


@contextlib.contextmanager
def deterministic(cfg: DetectConfig) -> Iterator[None]:
    """Deterministic algorithms (``cfg.deterministic``) and the run's seed; a library call must not leave
    global torch state changed, so the previous algorithm setting comes back on exit."""
    import torch

    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        torch.manual_seed(cfg.seed)
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


def run_classes(mode: str, setups: Sequence[Setup], classes: Sequence[str],
                fit: Callable[[Setup, str], Any] | None, predict: Callable[[Setup, str], Any],
                evaluate: Callable[[Setup, str], dict],
                fit_all: Callable[[Setup], Any] | None = None) -> dict[Setup, dict[str, dict]]:
    """The one class loop of every run: per setup, ``fit_all(setup)`` once (a model shared by the
    classes) or ``fit(setup, class)`` per class, then ``predict`` and ``evaluate`` per class, as ``mode``
    (all, fit, predict, evaluate) asks. Returns ``{setup: {class: metrics}}`` (empty unless evaluating)."""
    fitting, predicting, evaluating = mode in ("all", "fit"), mode in ("all", "predict"), mode in ("all", "evaluate")
    results: dict = {}
    for setup in setups:
        if fitting and fit_all is not None:
            fit_all(setup)
        for class_name in classes:
            if fitting and fit is not None:
                fit(setup, class_name)
            if predicting:
                predict(setup, class_name)
            if evaluating:
                results.setdefault(setup, {})[class_name] = evaluate(setup, class_name)
    return results


def train_with_progress(total: int, desc: str, enabled: bool, train: Callable[[Callable, Callable], Any],
                        log_fields: dict | None = None) -> tuple[Any, list[str], float]:
    """The fit bookkeeping of every run: ``train(log, progress)`` under a progress bar showing the loss;
    returns (its result, the JSON lines it logged (each with ``log_fields``), seconds)."""
    import json
    import time

    lines: list[str] = []
    bar = progress_bar(total, desc, enabled, "step")

    def log(rec: dict) -> None:
        lines.append(json.dumps({**(log_fields or {}), **rec}))
        bar.set_postfix(loss=f"{rec['loss']:.4f}")

    t0 = time.perf_counter()
    try:
        result = train(log, bar.update)
    finally:
        bar.close()
    return result, lines, time.perf_counter() - t0
