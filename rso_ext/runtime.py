"""Process-level settings for long training and benchmark runs (not applied on import).

The per-weight passes of every backend allocate and free tensors of tens of MB; glibc returns
such blocks to the kernel at once (mmap/munmap), so each pass starts on fresh zeroed pages and
the page faults cost as much as the pass (an 80 MB ``torch.empty`` + ``fill_`` takes 23 ms with
glibc's defaults and 5 ms with freed memory kept). :func:`reuse_freed_memory` asks glibc to keep
freed memory for reuse; the CLI's ``train`` and the benchmarks call it, for every backend alike.
"""
from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


def reuse_freed_memory(mmap_threshold: int = 1 << 30, trim_threshold: int = (1 << 31) - 1) -> bool:
    """Serve blocks below ``mmap_threshold`` bytes from the heap and return free heap memory to
    the kernel only above ``trim_threshold`` bytes (glibc ``mallopt``). The process keeps up to
    ``trim_threshold`` bytes of freed memory. Returns False where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and \
        bool(mallopt(M_TRIM_THRESHOLD, trim_threshold))


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def heap_free_bytes() -> int:
    """Bytes freed to glibc's heap and kept by this process (``mallinfo2().fordblks``): the
    next allocations reuse them, so they count as available (0 where not glibc >= 2.33)."""
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c")).mallinfo2
    except (OSError, AttributeError, TypeError):
        return 0
    fn.restype = _MallInfo2
    return int(fn().fordblks)

