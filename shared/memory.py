"""Process-level memory settings for CPU-heavy work (loader workers, CPU training and inference).

:func:`keep_freed_memory` stops glibc from returning freed memory to the kernel. numpy and PyTorch
(CPU) allocate their multi-megabyte arrays with ``malloc``; with glibc's defaults those are mmap'ed
(or trimmed back) on free, so the next array of that size is fresh memory again and every page of it
costs a first-touch page fault. Code that allocates and frees large temporaries in a loop — a loader
worker decoding, normalising and cropping depth maps, the ModMap mapping stage on CPU (28 MB
activations per target at N = 36) — then spends a large share of its time in the kernel: measured
25–75 % of a loader worker's time and ~35 % of the CPU mapping stage on a VM (``docs/performance.md``).
Keeping the memory costs at most the process's peak working set.
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD = -1  # <malloc.h>
M_MMAP_THRESHOLD = -3


def keep_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 1 << 30) -> bool:
    """glibc: serve allocations below ``mmap_threshold`` bytes from the heap and keep up to
    ``trim_threshold`` bytes of freed heap memory instead of giving it back to the kernel.

    Process-wide and irreversible (call it once, early, in a process that does heavy CPU array work).
    Returns False — changing nothing — where glibc's ``mallopt`` is unavailable (macOS, musl, Windows).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, int(mmap_threshold)) == 1
                and mallopt(M_TRIM_THRESHOLD, int(trim_threshold)) == 1)
