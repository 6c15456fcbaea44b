"""Compiled loops for the range codec (numba), with the numpy codec as the fallback.

A numpy codec needs a handful of full passes per batch (shift, or, compare, compact)
and, for a 32-range batch, some twenty numpy calls of fixed cost each; one compiled
loop does a single pass and one call. numba is a well-kept JIT on PyPI; when it is not
importable, or ``BALLOON_CODEC=numpy`` is set, ``shared.ranges`` uses its numpy path,
which the tests hold to the same answers.

Pure computation: the kernels return status codes instead of raising, so the caller
maps them to the protocol's errors.
"""

from __future__ import annotations

import numpy as np

from .jit import cached_njit

OK = 0
ZERO_COUNT = 2  # decode: an escape announcing 0 pages
DANGLING_ESCAPE = 3  # decode: the payload ends in an escape

njit = cached_njit("BALLOON_CODEC", "numpy")  # None without numba or when BALLOON_CODEC=numpy

AVAILABLE = njit is not None

if AVAILABLE:

    @njit(cache=True, nogil=True)
    def encode_into(pfns, counts, out):  # pragma: no cover - compiled
        """Write the canonical words of the ranges into ``out`` (len >= 2*n + 1).

        Returns ``(bad, words)``: ``bad`` is nonzero when some PFN needs more than 52 bits
        or some count is 0, and then ``out`` is garbage (the caller finds which range).
        Branch-free: the count word is always written after the range word and simply
        overwritten by the next range when the count was inline, and bad input is OR-ed
        into one accumulator instead of tested per range, so the loop has no branch on
        the data at all.
        """
        used = 0
        bad = np.uint64(0)
        for i in range(pfns.size):
            pfn = pfns[i]
            count = counts[i]
            bad |= (pfn >> np.uint64(52)) | np.uint64(count == 0)
            escaped = count > np.uint64(4095)
            out[used] = (pfn << np.uint64(12)) | (count * np.uint64(not escaped))
            out[used + 1] = count
            used += 1 + escaped
        return bad, used

    @njit(cache=True, nogil=True)
    def encode_exact(pfns, counts, out):  # pragma: no cover - compiled
        """``encode_into`` for an ``out`` of exactly the canonical size (see ``escapes``).

        The unconditional count-word store is safe for every range but the last, whose
        inline word may be the last word of ``out``; that one range takes the branch.
        """
        n = pfns.size
        used = 0
        bad = np.uint64(0)
        for i in range(n - 1):
            pfn = pfns[i]
            count = counts[i]
            bad |= (pfn >> np.uint64(52)) | np.uint64(count == 0)
            escaped = count > np.uint64(4095)
            out[used] = (pfn << np.uint64(12)) | (count * np.uint64(not escaped))
            out[used + 1] = count
            used += 1 + escaped
        if n:
            pfn = pfns[n - 1]
            count = counts[n - 1]
            bad |= (pfn >> np.uint64(52)) | np.uint64(count == 0)
            if count > np.uint64(4095):
                out[used] = pfn << np.uint64(12)
                out[used + 1] = count
                used += 2
            else:
                out[used] = (pfn << np.uint64(12)) | count
                used += 1
        return bad, used

    @njit(cache=True, nogil=True)
    def escapes(counts):  # pragma: no cover - compiled
        """How many ranges need the escape (count >= 4096): the payload is n + this words."""
        extra = 0
        for i in range(counts.size):
            extra += counts[i] > np.uint64(4095)
        return extra

    @njit(cache=True, nogil=True)
    def decode_into(words, pfns, counts):  # pragma: no cover - compiled
        """Decode ``words`` into ``pfns``/``counts`` (len >= words); returns (status, ranges)."""
        n = words.size
        i = 0
        k = 0
        while i < n:
            word = words[i]
            count = word & np.uint64(4095)
            if count == 0:
                if i + 1 >= n:
                    return DANGLING_ESCAPE, k
                count = words[i + 1]
                if count == 0:
                    return ZERO_COUNT, k
                i += 2
            else:
                i += 1
            pfns[k] = word >> np.uint64(12)
            counts[k] = count
            k += 1
        return OK, k

else:  # pragma: no cover
    encode_into = encode_exact = escapes = decode_into = None


def warm_up() -> None:
    """Compile (or load from numba's cache) every kernel now, not on the first batch."""
    if not AVAILABLE:
        return
    pfns = np.array([1, 2], dtype=np.uint64)
    counts = np.array([1, 5000], dtype=np.uint64)
    out = np.empty(4, dtype=np.uint64)
    encode_into(pfns, counts, out)
    encode_exact(pfns, counts, out[:3])
    escapes(counts)
    decode_into(out[:3], np.empty(3, np.uint64), np.empty(3, np.uint64))
