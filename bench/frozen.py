"""Code as it was at an earlier commit, loaded from the repository's git history: the "before" side of a
benchmark (e.g. the loader before issue 13's rewrites) without keeping a frozen copy in the tree, where
it would drift from the history it claims to be and duplicate the live code.

    depth = frozen_module("shared/depth.py", REFERENCE_COMMIT)
    depth.normalize_depth(...)        # the implementation of that commit

A module so loaded imports the *current* versions of whatever it imports; that is enough for leaf
modules such as ``pretrain/augment.py`` and ``shared/depth.py``.
"""

from __future__ import annotations

import functools
import subprocess
import sys
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# pretrain/augment.py and shared/depth.py before the benchmark-driven rewrites of issue 13
REFERENCE_COMMIT = "2c64201"


class FrozenCodeError(RuntimeError):
    """The commit or the file is not in this checkout's history (e.g. a shallow clone)."""


@functools.cache
def frozen_module(path: str, commit: str = REFERENCE_COMMIT) -> types.ModuleType:
    """The module at ``path`` (relative to the repository root) as of ``commit``, as a fresh module
    named ``frozen_<commit>.<dotted path>`` (registered under that name only: dataclasses need it)."""
    try:
        source = subprocess.run(["git", "show", f"{commit}:{path}"], cwd=REPO, capture_output=True, text=True,
                                check=True, timeout=30).stdout
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        raise FrozenCodeError(f"cannot read {path} at commit {commit} from the git history of {REPO} "
                              f"({detail.strip()}); a full clone has it") from None
    name = f"frozen_{commit}." + path.removesuffix(".py").replace("/", ".")
    module = types.ModuleType(name)
    module.__file__ = f"{commit}:{path}"
    sys.modules[name] = module
    exec(compile(source, module.__file__, "exec"), module.__dict__)  # noqa: S102  (our own history)
    return module


def reference_normalize_depth(depth, kind: str = "metric_z", mode: str = "nearness", eps: float = 0.1,
                              pct: tuple[float, float] = (0.5, 99.5), valid_range=None):
    """The nearness / max normalisation as it was: ``valid_range`` (the percentiles newer shards record)
    is ignored, the previous loader always searched for them."""
    return frozen_module("shared/depth.py").normalize_depth(depth, kind, mode, eps, pct)


def reference_depth_multicrop(*args, **kwargs):
    """The straightforward numpy depth crops as they were (``pretrain.augment.depth_multicrop``)."""
    return frozen_module("pretrain/augment.py").depth_multicrop(*args, **kwargs)
