"""Keep freed memory in the process heap for jobs that allocate volume-sized arrays again and again.

By default glibc serves every allocation over its mmap threshold (128 KiB, rising to at most
32 MiB) with a fresh `mmap` and unmaps it on free, so each new CT-sized array
(a 512x512x300 float32 volume is 315 MB) starts as untouched pages, and the first write to each
page is a page fault. On the 2-core VMs of docs/benchmarks.md that costs up to 3 s per fresh
300 MB array, several times per prediction. With the settings below large arrays come from the
heap, freed memory stays there for the next array, and the heap grows in 256 MiB steps:
`lnfm predict`'s pipeline around the network took 0.6-0.7x the time, for about 10 % more peak
memory (docs/benchmarks.md, "Freed memory kept in the heap").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# mallopt parameters (glibc malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
_INT_MAX = 2**31 - 1
TOP_PAD = 256 * 2**20  # heap growth step: fewer, larger brk calls


def keep_freed_memory() -> bool:
    """Serve large allocations from the heap, never trim it, and grow it in TOP_PAD steps (glibc
    `mallopt`). Returns False, changing nothing, where the C library is not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
        if not hasattr(libc, "gnu_get_libc_version"):  # musl's mallopt is a no-op stub
            return False
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in
               ((M_MMAP_THRESHOLD, _INT_MAX), (M_TRIM_THRESHOLD, _INT_MAX), (M_TOP_PAD, TOP_PAD)))
