"""CPU runtime settings.

glibc returns every freed block above its mmap threshold to the OS, so each training step
page-faults its large [T*K, d] expert buffers back in (~0.5 ms per MiB). Keeping freed memory
in the process made the same sigma-MoE layer 2x faster at the 244M shape on a 2-core VM
(SPEC 3.8, [measured]). Training and benchmarks call `keep_freed_memory()` at start-up.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_done = False


def keep_freed_memory() -> bool:
    """mallopt(M_MMAP_MAX, 0) and mallopt(M_TRIM_THRESHOLD, 2^31-1) on glibc. Returns whether it
    applied (False on non-glibc platforms, where nothing is changed)."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    except (OSError, AttributeError):
        return False
    _done = ok
    return ok
