"""A guest's page sets: flat bitmaps, one bit per guest page, one row per set.

Rows: ``REPORTED``, ``INFLATED``, ``HINTED`` — the sets the tracker keeps (rules:
host_daemon/tracker.py) — and ``BATCH``, a scratch row that holds the pages accepted by the
batch being applied when the overlap rule needs an exact answer (always empty between
batches). ``sets`` (uint64) holds per set [pages, first word written, last word written + 1]
and the guest's page count at ``LIMIT``.

Memory: ``np.zeros`` is calloc, so the kernel maps pages of the bitmap only where a batch
first writes: an 8 GiB guest reserves 4 x 256 KiB of address space and keeps resident only
the stretches its ranges fall in. A flat bitmap cannot cover the 2**52 pages the protocol
allows, so ``FLAT_LIMIT`` (16 TiB of guest RAM) is the largest guest the host tracks.

The word loops below (partial masks for the first and last word of a range, whole words in
between, popcount of the changed bits for exact page counts) are plain Python over numpy
scalars; ``compile_kernels`` hands them to numba (host only, loaded lazily: bench/tracker.py
shows why it is needed — a pyroaring or numpy page set costs 6-40x more per batch) and they
run as written, slowly, where numba is missing or ``BALLOON_TRACKER=python`` is set.
"""

from __future__ import annotations

import sys
import threading

import numpy as np

#: Largest guest (in pages) the host tracks: 2**32 pages = 16 TiB of guest RAM.
FLAT_LIMIT = 1 << 32

REPORTED, INFLATED, HINTED, BATCH = 0, 1, 2, 3
ROWS = 4
SET_FIELDS = 3
LIMIT = 3 * SET_FIELDS
SETS_SIZE = LIMIT + 1

_ALL = np.uint64(0xFFFFFFFFFFFFFFFF)
_M1 = np.uint64(0x5555555555555555)
_M2 = np.uint64(0x3333333333333333)
_M4 = np.uint64(0x0F0F0F0F0F0F0F0F)
_H01 = np.uint64(0x0101010101010101)
_U0 = np.uint64(0)
_U1 = np.uint64(1)
_U2 = np.uint64(2)
_U4 = np.uint64(4)
_U6 = np.uint64(6)
_U56 = np.uint64(56)
_U63 = np.uint64(63)
_U64 = np.uint64(64)


def new_sets(pages: int) -> tuple[np.ndarray, np.ndarray]:
    """Zeroed bitmaps (``ROWS`` rows of ceil(pages / 64) words) and their bookkeeping."""
    if not 0 < pages <= FLAT_LIMIT:
        raise ValueError(f"the host tracks guests of 1..{FLAT_LIMIT} pages, got {pages}")
    words = (pages + 63) // 64
    bits = np.zeros((ROWS, words), dtype=np.uint64)
    sets = np.zeros(SETS_SIZE, dtype=np.uint64)
    for row in (REPORTED, INFLATED, HINTED):
        sets[row * SET_FIELDS + 1] = words  # empty span: first > last
    sets[LIMIT] = pages
    return bits, sets


def clear_set(bits: np.ndarray, sets: np.ndarray, row: int) -> None:
    """Empty one set: zero the span it wrote (those pages stay mapped, reused next time)."""
    base = row * SET_FIELDS
    low, high = int(sets[base + 1]), int(sets[base + 2])
    if high > low:
        bits[row, low:high] = 0
    sets[base] = 0
    sets[base + 1] = bits.shape[1]
    sets[base + 2] = 0


def span_bytes(sets: np.ndarray, row: int) -> int:
    """Bytes of the bitmap between the first and last word the set wrote since it was cleared."""
    base = row * SET_FIELDS
    return max(0, int(sets[base + 2]) - int(sets[base + 1])) * 8


# -- the word loops (compiled by compile_kernels) ------------------------------------------


def popcount(x):
    """Set bits of a word (SWAR; LLVM turns it into one popcnt where the CPU has it)."""
    x = x - ((x >> _U1) & _M1)
    x = (x & _M2) + ((x >> _U2) & _M2)
    x = (x + (x >> _U4)) & _M4
    return (x * _H01) >> _U56


def masks(start, end):
    """First word, last word, and the masks of [start, end) within them (end > start)."""
    last_page = end - _U1
    return (
        np.intp(start >> _U6),
        np.intp(last_page >> _U6),
        _ALL << (start & _U63),
        _ALL >> (_U63 - (last_page & _U63)),
    )


def set_range(bits, start, end):
    """Set pages [start, end); returns how many were not set before."""
    first, last, head, tail = masks(start, end)
    if first == last:
        mask = head & tail
        old = bits[first]
        bits[first] = old | mask
        return popcount(mask & ~old)
    old = bits[first]
    changed = popcount(head & ~old)
    bits[first] = old | head
    for w in range(first + 1, last):
        old = bits[w]
        if old == _U0:
            changed += _U64
        elif old != _ALL:
            changed += popcount(~old)
        bits[w] = _ALL
    old = bits[last]
    changed += popcount(tail & ~old)
    bits[last] = old | tail
    return changed


def clear_range(bits, start, end):
    """Clear pages [start, end); returns how many were set before."""
    first, last, head, tail = masks(start, end)
    if first == last:
        mask = head & tail
        old = bits[first]
        bits[first] = old & ~mask
        return popcount(mask & old)
    old = bits[first]
    changed = popcount(head & old)
    bits[first] = old & ~head
    for w in range(first + 1, last):
        old = bits[w]
        if old == _ALL:
            changed += _U64
        elif old != _U0:
            changed += popcount(old)
        bits[w] = _U0
    old = bits[last]
    changed += popcount(tail & old)
    bits[last] = old & ~tail
    return changed


def any_in_range(bits, start, end):
    """Is any page of [start, end) set?"""
    first, last, head, tail = masks(start, end)
    if first == last:
        return (bits[first] & head & tail) != _U0
    if (bits[first] & head) != _U0 or (bits[last] & tail) != _U0:
        return True
    for w in range(first + 1, last):
        if bits[w] != _U0:
            return True
    return False


def widen(sets, row, start, end):
    """Grow the written span of ``row`` to cover [start, end)."""
    base = row * SET_FIELDS
    first = start >> _U6
    after = ((end - _U1) >> _U6) + _U1
    if first < sets[base + 1]:
        sets[base + 1] = first
    if after > sets[base + 2]:
        sets[base + 2] = after


def set_runs(bits, low, high):
    """The maximal runs of set bits in words [low, high), as (pfns, counts)."""
    runs = 0
    carry = _U0
    for w in range(low, high):
        word = bits[w]
        runs += np.intp(popcount(word & ~((word << _U1) | carry)))
        carry = word >> _U63
    pfns = np.empty(runs, dtype=np.uint64)
    counts = np.empty(runs, dtype=np.uint64)
    r = 0
    inside = False
    start = _U0
    for w in range(low, high):
        word = bits[w]
        base = np.uint64(w) << _U6
        if word == _U0 or word == _ALL:
            if (word == _ALL) != inside:
                if inside:
                    counts[r] = base - start
                    r += 1
                else:
                    start = base
                    pfns[r] = start
                inside = not inside
            continue
        for b in range(64):
            bit = (word >> np.uint64(b)) & _U1
            if (bit == _U1) != inside:
                if inside:
                    counts[r] = base + np.uint64(b) - start
                    r += 1
                else:
                    start = base + np.uint64(b)
                    pfns[r] = start
                inside = not inside
    if inside:
        counts[r] = (np.uint64(high) << _U6) - start
    return pfns, counts


#: In dependency order: a kernel is compiled after the ones it calls (numba resolves a
#: global function when it compiles the caller).
KERNELS = ("popcount", "masks", "set_range", "clear_range", "any_in_range", "widen", "set_runs")
INLINE = frozenset({"popcount", "masks", "widen"})

#: Held while kernels are swapped in (tracker.load_kernels swaps its own under it too).
kernel_lock = threading.RLock()
compiled = False  # True once numba compiled (or loaded from its cache) every kernel


def compile_kernels(module=None, names=KERNELS, inline=INLINE) -> bool:
    """Replace the word loops of ``module`` (this one by default) by numba-compiled ones.

    Thread-safe and idempotent; True when compiled, False when numba is missing or
    ``BALLOON_TRACKER=python`` (the loops then run as plain Python, same answers). The
    server calls this in a worker thread after its listeners are up, so neither
    ``balloon-host --help`` nor a cold start waits for numba.
    """
    from .jit import cached_njit

    module = sys.modules[__name__] if module is None else module
    with kernel_lock:
        if getattr(module, "_compiled_here", False):
            return True
        njit = cached_njit("BALLOON_TRACKER", "python")
        if njit is None:
            return False
        for name in names:
            function = getattr(module, name)
            options = {"inline": "always"} if name in inline else {}
            setattr(module, name, njit(cache=True, nogil=True, **options)(function))
        module._compiled_here = True
        if module is sys.modules[__name__]:
            global compiled
            compiled = True
        return True
