"""Compiled page sets: one flat bitmap per set, 1 bit per guest page, and one kernel per batch.

Why: with pyroaring every range of a batch is a Python-level C call (``add_range``) and
validation is a dozen numpy calls of fixed cost each, ~20 µs per 32-range batch — ten
times the whole bare host loop (docs/PERFORMANCE.md ``## Channel``). Here the three sets
of a guest (reported, inflated, hinted) are rows of one ``uint64`` array and
``apply_batch`` validates, sorts (only when the batch is not already in PFN order),
applies and counts a whole batch in one compiled call, word at a time (partial masks for
the first and last word, whole words in between, popcount of the changed bits for exact
page counts).

Memory: 3 bits per guest page of address space, from ``np.zeros`` (calloc: the kernel
maps pages of the bitmap only when a batch first writes them, so an 8 GiB guest reserves
768 KiB and keeps resident only the stretches its ranges fall in). A flat bitmap cannot
cover the 2**52 pages a guest may claim, so ``FLAT_LIMIT`` bounds it; bigger guests keep
the roaring tracker (host_daemon/tracker.py).

numba is a well-kept JIT on PyPI, already used by the codec (shared/_kernels.py); when it
is not importable, or ``BALLOON_TRACKER=roaring`` is set, ``AVAILABLE`` is False and the
tracker uses pyroaring, which the tests hold to the same answers.
"""

from __future__ import annotations

import numpy as np

from shared.jit import cached_njit
from shared.vocabulary import BATCH_KINDS

#: Largest guest (in pages) given flat bitmaps: 2**32 pages = 16 TiB of guest RAM,
#: 512 MiB of address space per set. Past it, pyroaring (bounded by the pages used).
FLAT_LIMIT = 1 << 32

KIND_CODES = {kind: code for code, kind in enumerate(BATCH_KINDS)}
REPORTED, INFLATED, HINTED = 0, 1, 2

# ``state`` (uint64): per set [pages, first word written, last word written + 1], then the
# guest's page count, then what the last batch did (rewritten by every call).
SET_FIELDS = 3
LIMIT = 9
ACCEPTED = 10  # pages accepted by the last batch
REJECTED = 11  # ranges rejected by the last batch (any reason)
REASONS_AT = 12  # per reason (zero-length, out-of-range, overlap, conflict): ranges, low, high
STATE_SIZE = REASONS_AT + 3 * 4

njit = cached_njit("BALLOON_TRACKER", "roaring")  # None without numba or when BALLOON_TRACKER=roaring

AVAILABLE = njit is not None


def new_state(pages: int) -> tuple[np.ndarray, np.ndarray]:
    """Zeroed bitmaps (3 rows of ceil(pages / 64) words) and their bookkeeping."""
    words = (pages + 63) // 64
    bits = np.zeros((3, words), dtype=np.uint64)
    state = np.zeros(STATE_SIZE, dtype=np.uint64)
    for row in range(3):
        state[row * SET_FIELDS + 1] = words  # empty span: first > last
    state[LIMIT] = pages
    return bits, state


def clear_set(bits: np.ndarray, state: np.ndarray, row: int) -> None:
    """Empty one set: zero the span it wrote (those pages stay mapped, reused next time)."""
    base = row * SET_FIELDS
    low, high = int(state[base + 1]), int(state[base + 2])
    if high > low:
        bits[row, low:high] = 0
    state[base] = 0
    state[base + 1] = bits.shape[1]
    state[base + 2] = 0


def span_bytes(state: np.ndarray, row: int) -> int:
    """Bytes of the bitmap between the first and last word the set wrote since it was cleared."""
    base = row * SET_FIELDS
    return max(0, int(state[base + 2]) - int(state[base + 1])) * 8


if AVAILABLE:
    _ALL = np.uint64(0xFFFFFFFFFFFFFFFF)
    _M1 = np.uint64(0x5555555555555555)
    _M2 = np.uint64(0x3333333333333333)
    _M4 = np.uint64(0x0F0F0F0F0F0F0F0F)
    _H01 = np.uint64(0x0101010101010101)
    _U0 = np.uint64(0)
    _U1 = np.uint64(1)
    _U6 = np.uint64(6)
    _U32 = np.uint64(32)
    _U56 = np.uint64(56)
    _U63 = np.uint64(63)
    _U64 = np.uint64(64)
    _LOW32 = np.uint64(0xFFFFFFFF)

    @njit(cache=True, nogil=True, inline="always")
    def _popcount(x):  # pragma: no cover - compiled
        """Set bits of a word (SWAR; LLVM turns it into one popcnt where the CPU has it)."""
        x = x - ((x >> _U1) & _M1)
        x = (x & _M2) + ((x >> np.uint64(2)) & _M2)
        x = (x + (x >> np.uint64(4))) & _M4
        return (x * _H01) >> _U56

    @njit(cache=True, nogil=True, inline="always")
    def _masks(start, end):  # pragma: no cover - compiled
        """First word, last word, and the masks of [start, end) within them (end > start)."""
        last_page = end - _U1
        return (
            np.intp(start >> _U6),
            np.intp(last_page >> _U6),
            _ALL << (start & _U63),
            _ALL >> (_U63 - (last_page & _U63)),
        )

    @njit(cache=True, nogil=True)
    def set_range(bits, start, end):  # pragma: no cover - compiled
        """Set pages [start, end); returns how many were not set before."""
        first, last, head, tail = _masks(start, end)
        if first == last:
            mask = head & tail
            old = bits[first]
            bits[first] = old | mask
            return _popcount(mask & ~old)
        old = bits[first]
        changed = _popcount(head & ~old)
        bits[first] = old | head
        for w in range(first + 1, last):
            old = bits[w]
            if old == _U0:
                changed += _U64
            elif old != _ALL:
                changed += _popcount(~old)
            bits[w] = _ALL
        old = bits[last]
        changed += _popcount(tail & ~old)
        bits[last] = old | tail
        return changed

    @njit(cache=True, nogil=True)
    def clear_range(bits, start, end):  # pragma: no cover - compiled
        """Clear pages [start, end); returns how many were set before."""
        first, last, head, tail = _masks(start, end)
        if first == last:
            mask = head & tail
            old = bits[first]
            bits[first] = old & ~mask
            return _popcount(mask & old)
        old = bits[first]
        changed = _popcount(head & old)
        bits[first] = old & ~head
        for w in range(first + 1, last):
            old = bits[w]
            if old == _ALL:
                changed += _U64
            elif old != _U0:
                changed += _popcount(old)
            bits[w] = _U0
        old = bits[last]
        changed += _popcount(tail & old)
        bits[last] = old & ~tail
        return changed

    @njit(cache=True, nogil=True)
    def any_in_range(bits, start, end):  # pragma: no cover - compiled
        """Is any page of [start, end) set?"""
        first, last, head, tail = _masks(start, end)
        if first == last:
            return (bits[first] & head & tail) != _U0
        if bits[first] & head or bits[last] & tail:
            return True
        for w in range(first + 1, last):
            if bits[w] != _U0:
                return True
        return False

    @njit(cache=True, nogil=True, inline="always")
    def _widen(state, row, start, end):  # pragma: no cover - compiled
        base = row * SET_FIELDS
        first = start >> _U6
        after = ((end - _U1) >> _U6) + _U1
        if first < state[base + 1]:
            state[base + 1] = first
        if after > state[base + 2]:
            state[base + 2] = after

    @njit(cache=True, nogil=True, inline="always")
    def _reject(state, reason, count):  # pragma: no cover - compiled
        at = REASONS_AT + 3 * reason
        state[at] += _U1
        state[at + 1] += count & _LOW32  # exact even when counts sum past 2**64
        state[at + 2] += count >> _U32
        state[REJECTED] += _U1

    @njit(cache=True, nogil=True)
    def apply_batch(kind, pfns, counts, bits, state, out):  # pragma: no cover - compiled
        """Validate and apply one batch (rules: host_daemon/tracker.py); returns discard ranges.

        Writes the merged discard ranges to ``out`` (pfns at [0, k), counts at
        [n, n + k); REPORT and INFLATE only) and returns k; accepted pages and the
        rejections by reason go to ``state``.
        """
        n = pfns.size
        for i in range(ACCEPTED, STATE_SIZE):
            state[i] = _U0
        limit = state[LIMIT]
        # Verdicts that need no order: zero-length, then out-of-range (written as
        # count - 1 >= limit - pfn so that no count can wrap pfn + count).
        valid = 0
        in_order = True
        previous = _U0
        for i in range(n):
            count = counts[i]
            pfn = pfns[i]
            if count == _U0:
                _reject(state, 0, count)
            elif pfn >= limit or count - _U1 >= limit - pfn:
                _reject(state, 1, count)
            else:
                if pfn < previous:
                    in_order = False
                previous = pfn
                valid += 1
        if valid == n and in_order:
            order = np.arange(n)
        else:
            order = np.empty(valid, dtype=np.intp)
            j = 0
            for i in range(n):
                count = counts[i]
                pfn = pfns[i]
                if count != _U0 and pfn < limit and count - _U1 < limit - pfn:
                    order[j] = i
                    j += 1
            if not in_order:  # stable: ties keep batch order
                order = order[np.argsort(pfns[order], kind="mergesort")]
        reported = bits[REPORTED]
        inflated = bits[INFLATED]
        hinted = bits[HINTED]
        check_balloon = (kind == 0 or kind == 1) and state[INFLATED * SET_FIELDS] != _U0
        reach = _U0
        accepted = _U0
        k = 0
        for j in range(valid):
            i = order[j]
            start = pfns[i]
            count = counts[i]
            end = start + count
            if start < reach:  # inside an earlier range of this batch (which still counts)
                _reject(state, 2, count)
                if end > reach:
                    reach = end
                continue
            reach = end
            if check_balloon and any_in_range(inflated, start, end):
                _reject(state, 3, count)
                continue
            accepted += count
            fresh = False
            if kind == 0:  # report
                added = set_range(reported, start, end)
                if added:
                    state[0] += added
                    _widen(state, REPORTED, start, end)
                    fresh = True
            elif kind == 1:  # reuse
                if state[0]:
                    state[0] -= clear_range(reported, start, end)
            elif kind == 2:  # inflate
                added = set_range(inflated, start, end)
                if added:
                    state[SET_FIELDS] += added
                    _widen(state, INFLATED, start, end)
                    fresh = True
                if state[0]:
                    state[0] -= clear_range(reported, start, end)
            elif kind == 3:  # deflate
                if state[SET_FIELDS]:
                    state[SET_FIELDS] -= clear_range(inflated, start, end)
            else:  # hint
                added = set_range(hinted, start, end)
                if added:
                    state[2 * SET_FIELDS] += added
                    _widen(state, HINTED, start, end)
            if fresh:  # discard the whole range, joined to the previous one if touching
                if k and out[k - 1] + out[n + k - 1] == start:
                    out[n + k - 1] += count
                else:
                    out[k] = start
                    out[n + k] = count
                    k += 1
        state[ACCEPTED] = accepted
        return k

    @njit(cache=True, nogil=True)
    def set_runs(bits, low, high):  # pragma: no cover - compiled
        """The maximal runs of set bits in words [low, high), as (pfns, counts)."""
        runs = 0
        carry = _U0
        for w in range(low, high):
            word = bits[w]
            runs += np.intp(_popcount(word & ~((word << _U1) | carry)))
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

else:  # pragma: no cover
    apply_batch = set_runs = set_range = clear_range = any_in_range = None


def warm_up() -> None:
    """Compile (or load from numba's cache) the kernels now, not on a guest's first batch."""
    if not AVAILABLE:
        return
    bits, state = new_state(256)
    pfns = np.array([0, 70], dtype=np.uint64)
    counts = np.array([70, 10], dtype=np.uint64)
    out = np.empty(4, dtype=np.uint64)
    for kind in KIND_CODES.values():
        apply_batch(kind, pfns, counts, bits, state, out)
    set_runs(bits[0], 0, bits.shape[1])
