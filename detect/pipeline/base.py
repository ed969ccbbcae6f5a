"""What every detection run shares: the user-facing error, device choice, progress bars, deterministic
torch state, and the one class loop that drives fit → predict → evaluate for every kind of run."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
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
def cuda_precision(allow_tf32: bool) -> Iterator[None]:
    """TF32 for CUDA matmuls and cuDNN convolutions as ``--allow-tf32`` says (off: strict fp32, the CPU's
    results to rounding; cuDNN's own default would be on); the previous settings come back on exit.
    bench/bench_table8.py times inference under the same switch."""
    import torch

    previous = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = allow_tf32
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


@contextlib.contextmanager
def deterministic(cfg: DetectConfig) -> Iterator[None]:
    """Deterministic algorithms (``cfg.deterministic``), CUDA matmul precision (``cfg.allow_tf32``) and the
    run's seed; a library call must not leave global torch state changed, so the previous settings come
    back on exit."""
    import torch

    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with cuda_precision(cfg.allow_tf32):
            torch.manual_seed(cfg.seed)
            yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


STAGES = ("fit", "predict", "evaluate")
FINISHED_MARKER = "finished.json"
# Settings that choose which classes and stages run, or how progress shows, not what a class's outputs are.
_NOT_OUTPUT_SETTINGS = ("mode", "classes", "progress", "skip_finished")


def mode_stages(mode: str) -> tuple[str, ...]:
    """The stages ``--mode`` runs, in order."""
    return STAGES if mode == "all" else (mode,)


class FinishedClasses:
    """Which classes of a run are finished (``--skip-finished``): a class is when its folder holds
    ``finished.json`` recording every stage this run asks for under the same resolved config (all settings
    but :data:`_NOT_OUTPUT_SETTINGS`). The marker is removed before a class's outputs are rewritten and
    written (atomically) only once its stages are done, so a killed task never leaves one."""

    def __init__(self, cfg: DetectConfig, class_dir: Callable[[Any, str], Path]) -> None:
        from shared.config import to_dict

        self.enabled = bool(cfg.skip_finished)
        self.stages = mode_stages(cfg.mode)
        settings = {k: v for k, v in to_dict(cfg).items() if k not in _NOT_OUTPUT_SETTINGS}
        self.settings = json.loads(json.dumps(settings))  # as read back from the marker
        self.class_dir = class_dir
        self.ran: list[tuple[Any, str]] = []
        self.skipped: list[tuple[Any, str]] = []

    def _marker(self, setup: Any, class_name: str) -> Path:
        return self.class_dir(setup, class_name) / FINISHED_MARKER

    def done_stages(self, setup: Any, class_name: str) -> list[str]:
        """The stages the class's marker records under this run's settings ([] without one, or other settings)."""
        try:
            marker = json.loads(self._marker(setup, class_name).read_text())
        except (OSError, ValueError):
            return []
        if not isinstance(marker, dict) or marker.get("settings") != self.settings:
            return []
        return [s for s in marker.get("stages", []) if s in STAGES]

    def is_finished(self, setup: Any, class_name: str) -> bool:
        return self.enabled and set(self.stages) <= set(self.done_stages(setup, class_name))

    def all_finished(self, setups: Sequence[Any], classes: Sequence[str]) -> bool:
        return all(self.is_finished(s, c) for s in setups for c in classes)

    def skip(self, setup: Any, class_name: str) -> None:
        self.skipped.append((setup, class_name))
        where = class_name if setup is None else f"{setup}/{class_name}"
        print(f"[{where}] skipped: finished ({self._marker(setup, class_name)} records {', '.join(self.stages)} "
              "with the same settings)", file=sys.stderr)

    def start(self, setup: Any, class_name: str) -> list[str]:
        """Before a class's outputs change: remove its marker; returns the stages that stay valid (those
        before the first stage this run redoes)."""
        done = self.done_stages(setup, class_name)
        self._marker(setup, class_name).unlink(missing_ok=True)
        first = STAGES.index(self.stages[0])
        return [s for s in done if STAGES.index(s) < first]

    def finish(self, setup: Any, class_name: str, kept: Sequence[str]) -> None:
        from shared.io import atomic_write_json

        self.ran.append((setup, class_name))
        stages = [s for s in STAGES if s in kept or s in self.stages]
        atomic_write_json(self._marker(setup, class_name), {"stages": stages, "settings": self.settings})

    def metrics(self, setup: Any, class_name: str) -> dict:
        """A finished class's saved ``metrics.json``."""
        path = self.class_dir(setup, class_name) / "metrics.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise RunError(f"{path}: a finished class's metrics cannot be read ({exc}); run without "
                           "--skip-finished") from None


def run_classes(mode: str, setups: Sequence[Setup], classes: Sequence[str],
                fit: Callable[[Setup, str], Any] | None, predict: Callable[[Setup, str], Any],
                evaluate: Callable[[Setup, str], dict],
                fit_all: Callable[[Setup], Any] | None = None,
                finished: FinishedClasses | None = None) -> dict[Setup, dict[str, dict]]:
    """The one class loop of every run: per setup, ``fit_all(setup)`` once (a model shared by the
    classes) or ``fit(setup, class)`` per class, then ``predict`` and ``evaluate`` per class, as ``mode``
    (all, fit, predict, evaluate) asks. Returns ``{setup: {class: metrics}}`` (empty unless evaluating).
    With ``finished``, its finished classes are skipped (their saved metrics stand in) and the others
    get a marker once their stages are done."""
    fitting, predicting, evaluating = mode in ("all", "fit"), mode in ("all", "predict"), mode in ("all", "evaluate")
    results: dict = {}
    for setup in setups:
        pending = list(classes)
        if finished is not None:
            pending = [c for c in classes if not finished.is_finished(setup, c)]
        if finished is not None and fit_all is not None and fitting and pending:
            pending = list(classes)  # the shared model is refitted: every class's predictions follow it
        kept = {c: finished.start(setup, c) for c in pending} if finished is not None else {}
        if fitting and fit_all is not None and pending:
            fit_all(setup)
        for class_name in classes:
            if class_name not in pending:
                assert finished is not None
                finished.skip(setup, class_name)
                if evaluating:
                    results.setdefault(setup, {})[class_name] = finished.metrics(setup, class_name)
                continue
            if fitting and fit is not None:
                fit(setup, class_name)
            if predicting:
                predict(setup, class_name)
            if evaluating:
                results.setdefault(setup, {})[class_name] = evaluate(setup, class_name)
            if finished is not None:
                finished.finish(setup, class_name, kept[class_name])
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
