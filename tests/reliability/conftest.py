"""Fault injection shared by the reliability tests (``docs/reliability.md``).

``disk_full``: a patched writer standing in for a full file system (a small tmpfs needs root and a
mount namespace, which CI machines do not give). Every file that :mod:`shared.io` opens for writing
under a chosen folder shares a byte budget; the write that exceeds it stores what still fits and
raises ``OSError(ENOSPC)``, like ``write(2)`` on a full disk.
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import pytest

# The helpers of the main suite (test_pretrain_utils, ...) are imported as top-level modules there.
_TESTS = str(Path(__file__).resolve().parents[1])
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

_real_fdopen = os.fdopen


class _FullDisk:
    def __init__(self, folder: Path, free_bytes: int) -> None:
        self.folder = str(Path(folder).resolve())
        self.free = int(free_bytes)
        self.hits = 0  # writes refused

    def fdopen(self, fd: int, mode: str = "r", *args, **kwargs):
        handle = _real_fdopen(fd, mode, *args, **kwargs)
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return handle
        if any(m in mode for m in "wax") and target.startswith(self.folder + os.sep):
            return _LimitedFile(handle, self)
        return handle


class _LimitedFile:
    """A binary/text file object whose writes draw from a shared budget."""

    def __init__(self, inner, disk: _FullDisk) -> None:
        self._inner = inner
        self._disk = disk

    def write(self, data) -> int:
        n = len(data) if isinstance(data, str) else memoryview(data).nbytes
        if n > self._disk.free:
            room = max(0, self._disk.free)
            if room:
                self._inner.write(data[:room] if isinstance(data, (str, bytes, bytearray))
                                  else memoryview(data).cast("B")[:room])
            self._disk.free = 0
            self._disk.hits += 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._disk.free -= n
        return self._inner.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._inner.close()

    def __getattr__(self, name):
        return getattr(self._inner, name)


@pytest.fixture
def disk_full(monkeypatch):
    """``disk_full(folder, free_bytes)``: from now on, writes through :mod:`shared.io` under ``folder``
    fail with ENOSPC once ``free_bytes`` are used. Returns the fault object (``.hits`` counts refusals)."""

    def arm(folder: str | os.PathLike, free_bytes: int) -> _FullDisk:
        disk = _FullDisk(Path(folder), free_bytes)
        monkeypatch.setattr(os, "fdopen", disk.fdopen)
        return disk

    return arm
