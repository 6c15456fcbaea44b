"""The host's one allocator setting: large blocks are always mmap'ed, so they go back when freed.

glibc's malloc serves a request of at least ``M_MMAP_THRESHOLD`` bytes (128 KiB) with its
own mmap, returned by munmap on free — unless it has raised the threshold: by default it
moves the threshold up to the size of every mmap'ed block freed (up to 32 MiB, mallopt(3)
"M_MMAP_THRESHOLD"). After the first forgotten guest, a tracker's bitmaps (2 MiB for a
16 GiB guest) and every connection's buffers then come from the heap, where calloc must
zero reused memory (so an idle guest's untouched bitmap is resident) and a freed block
inside the heap is not given back. Measured (tests/attacks/test_host_memory.py, 60 idle
16 GiB guests at once): 185 KiB to 620 KiB per connected guest and up to 5 MiB kept after
they were forgotten with the default; 50 KiB and under 0.1 MiB kept with the threshold
fixed. Setting it once (mallopt turns the dynamic adjustment off) is what the host does.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger("balloon.host")

M_MMAP_THRESHOLD = -3  # <malloc.h>
MMAP_THRESHOLD = 128 * 1024  # glibc's own starting value, kept fixed


def pin_mmap_threshold(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold; False where the C library has no mallopt (musl)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    if mallopt(M_MMAP_THRESHOLD, threshold) != 1:
        log.warning("mallopt(M_MMAP_THRESHOLD) failed: freed guest memory may stay in the heap")
        return False
    return True
