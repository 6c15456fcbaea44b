"""Range codec: the seed's 52-bit PFN + 12-bit length word, vectorized with numpy.

Wire form (docs/PROTOCOL.md §3.1): each range is one unsigned 64-bit little-endian
word ``(pfn << 12) | count`` with ``count`` in 1..4095. A count field of 0 is the escape:
the *next* word holds the page count (>= 1). Encoders escape only counts >= 4096 — v6 of
the 2016 series inlined 4096, which spills into PFN bit 0; we never do.

No function here loops over ranges in Python, and there is no compiled code: a batch of
buddy blocks (no escapes, what free page reporting sends) is a few whole-array numpy
passes, and escapes are resolved on their indices, which are few. ``encode_into`` writes
straight into a caller's preallocated words — the guest's one fixed buffer (the seed's
rule, :class:`RangeBuffer`).
"""

from __future__ import annotations

import numpy as np

from .errors import RemoteProtocolError
from .vocabulary import (
    COUNT_BITS,
    MAX_INLINE_COUNT,
    MAX_PFN,
    PFN32_MAX_PER_MESSAGE,
    PFN_BITS,
    SEED_BUFFER_WORDS,
)

WORD = np.dtype("<u8")
COUNT_MASK = np.uint64(MAX_INLINE_COUNT)
SHIFT = np.uint64(COUNT_BITS)

#: Legacy balloon: one 32-bit PFN per 4 KiB page, at most 256 per message.
PFN32 = np.dtype("<u4")

#: From this many words on, the codec trades extra numpy calls for fewer bytes moved;
#: below it (every batch the daemons send) per-call overhead dominates.
BIG_BATCH = 1 << 15


def _as_u64(values, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.dtype == np.uint64 and array.ndim == 1:
        return array  # the common case: no pass over the data at all
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional")
    if array.size and array.dtype.kind == "i" and array.min() < 0:
        raise ValueError(f"{name} must not be negative")
    if array.dtype.kind not in "iu" and array.size:
        raise ValueError(f"{name} must be integers, got {array.dtype}")
    return array.astype(np.uint64, copy=False)


def check_ranges(pfns, counts) -> tuple[np.ndarray, np.ndarray]:
    """Validate encoder input; raise ValueError for what the wire cannot carry."""
    pfns = _as_u64(pfns, "pfns")
    counts = _as_u64(counts, "counts")
    if pfns.shape != counts.shape:
        raise ValueError(f"{pfns.size} pfns but {counts.size} counts")
    if pfns.size:  # reductions: no temporary array the size of the input
        if int(pfns.max()) > MAX_PFN:
            raise ValueError(f"PFN {int(pfns.max()):#x} does not fit in {PFN_BITS} bits")
        if int(counts.min()) == 0:
            raise ValueError("a range must cover at least one page")
    return pfns, counts


def words_needed(counts) -> int:
    """Words the canonical encoding of these counts takes (escaped ranges take two)."""
    counts = np.asarray(counts, dtype=np.uint64)
    return int(counts.size + np.count_nonzero(np.right_shift(counts, SHIFT)))


def _flatnonzero_sparse(mask: np.ndarray) -> np.ndarray:
    """``np.flatnonzero`` of a mostly-False bool array, about twice as fast.

    Escapes are a few percent of a batch. Viewing the mask as uint64 finds the 8-bool
    blocks holding any True in one cheap pass; only those blocks are scanned bool by bool.
    """
    if mask.size < BIG_BATCH:  # a batch-sized mask: fewer numpy calls beat fewer bytes
        return np.flatnonzero(mask)
    whole = mask.size & ~7
    blocks = mask[:whole].view(np.uint64)
    hit = np.flatnonzero(blocks != 0)
    inner = np.flatnonzero(blocks[hit].view(np.bool_))
    found = hit[inner >> 3] * 8 + (inner & 7)
    if whole == mask.size:
        return found
    return np.concatenate((found, np.flatnonzero(mask[whole:]) + whole))


def encode_into(pfns, counts, out: np.ndarray) -> int:
    """Write the canonical words of the ranges into ``out[:n]``; returns ``n``.

    ``out`` is a uint64 array with room for ``words_needed(counts)`` words (ValueError
    otherwise, nothing written). Ranges without escapes — buddy blocks — are two passes
    written in place, with no temporary array; escaped ranges cost a few more passes.
    """
    pfns, counts = check_ranges(pfns, counts)
    return _encode_checked(pfns, counts, int(np.count_nonzero(counts > COUNT_MASK)), out)


def _encode_checked(pfns: np.ndarray, counts: np.ndarray, extra: int, out: np.ndarray) -> int:
    n = pfns.size
    used = n + extra
    if used > out.size:
        raise ValueError(f"{used} words do not fit in a buffer of {out.size}")
    if not extra:
        words = out[:n]
        np.left_shift(pfns, SHIFT, out=words)
        np.bitwise_or(words, counts, out=words)
        return n
    # Escapes: the inline words of every range, then one masked copy that leaves a slot
    # after each escape word for its count word.
    long_at = _flatnonzero_sparse(counts > COUNT_MASK)
    words = np.left_shift(pfns, SHIFT)
    np.bitwise_or(words, counts, out=words)
    words[long_at] = pfns[long_at] << SHIFT  # the escape: count field 0
    count_at = long_at + np.arange(1, extra + 1)  # each count word follows its escape
    range_slot = np.ones(used, dtype=bool)
    range_slot[count_at] = False
    target = out[:used]
    target[range_slot] = words
    target[count_at] = counts[long_at]
    return used


def encode_words(pfns, counts) -> np.ndarray:
    """Encode ranges to a new uint64 word array (canonical: escape only for counts >= 4096)."""
    pfns, counts = check_ranges(pfns, counts)
    extra = int(np.count_nonzero(counts > COUNT_MASK))
    out = np.empty(pfns.size + extra, dtype=WORD)
    _encode_checked(pfns, counts, extra, out)
    return out


def encode_ranges(pfns, counts) -> bytes:
    """Pack ranges into the bytes of a batch payload."""
    return encode_words(pfns, counts).tobytes()


#: True when no element is zero (empty: True) — a ufunc reduction, called straight from C: the
#: per-batch test for escapes costs one call, not numpy's Python wrappers (count_nonzero, all).
_all_nonzero = np.logical_and.reduce


def decode_ranges(data) -> tuple[np.ndarray, np.ndarray]:
    """Unpack a batch payload into ``(pfns, counts)`` uint64 arrays.

    Accepts any escaped count >= 1 (a non-canonical escape of a small count is legal).
    Raises RemoteProtocolError ``bad-payload`` for a payload that is not whole words,
    ends in an escape, or escapes a count of zero.
    """
    size = len(data)
    if size % WORD.itemsize:
        raise RemoteProtocolError("bad-payload", f"{size} bytes is not a whole number of 8-byte words")
    words = np.frombuffer(data, dtype=WORD)
    low = np.bitwise_and(words, COUNT_MASK)  # also the counts when nothing is escaped
    if _all_nonzero(low):  # no escapes: every free page report of buddy blocks
        return np.right_shift(words, SHIFT), low
    # A word whose count field is 0 is either an escape (a range word) or the count word
    # that follows an escape. Every maximal run of such words starts at a range word, so
    # inside a run even offsets are escapes and odd offsets are count words; a run of odd
    # length ends in an escape whose count word is the (nonzero-low) word after the run.
    # Such words are few, so the runs are found on their indices, not on the whole batch.
    zero_at = _flatnonzero_sparse(low == 0)
    apart = np.diff(zero_at) != 1
    if apart.all():  # every run is one word long: each is an escape (the usual case)
        escape_at = zero_at
    else:
        k = np.arange(zero_at.size)
        run_start = np.concatenate(([True], apart))
        first = np.maximum.accumulate(np.where(run_start, k, 0))
        escape_at = zero_at[((k - first) & 1) == 0]
    if escape_at[-1] == words.size - 1:
        raise RemoteProtocolError("bad-payload", "the payload ends in an escape with no count word")
    count_at = escape_at + 1
    escaped_counts = words[count_at]
    if np.count_nonzero(escaped_counts) != escaped_counts.size:
        raise RemoteProtocolError("bad-payload", "an escape announces a count of zero")
    range_word = np.ones(words.size, dtype=bool)
    range_word[count_at] = False
    kept = words[range_word]
    # low is no longer needed: the counts go into its first kept.size slots (one fewer
    # fresh batch-sized allocation, which costs page faults on large batches).
    counts = np.bitwise_and(kept, COUNT_MASK, out=low[: kept.size])
    counts[escape_at - np.arange(escape_at.size)] = escaped_counts  # escape positions once count words are gone
    return np.right_shift(kept, SHIFT, out=kept), counts


def count_ranges(data) -> int:
    """How many ranges a payload holds, without building the arrays (for limit checks)."""
    pfns, _ = decode_ranges(data)
    return int(pfns.size)


def coalesce_ranges(pfns, counts) -> tuple[np.ndarray, np.ndarray]:
    """Merge ranges sorted by PFN where they overlap or touch; returns new arrays."""
    pfns = np.asarray(pfns, dtype=np.uint64)
    counts = np.asarray(counts, dtype=np.uint64)
    if pfns.size <= 1:
        return pfns.copy(), counts.copy()
    ends = pfns + counts
    reach = np.maximum.accumulate(ends)
    starts_group = np.empty(pfns.size, dtype=bool)
    starts_group[0] = True
    starts_group[1:] = pfns[1:] > reach[:-1]
    first = np.flatnonzero(starts_group)
    last = np.append(first[1:], pfns.size) - 1
    merged_pfns = pfns[first]
    return merged_pfns, reach[last] - merged_pfns


def sort_and_coalesce(pfns, counts) -> tuple[np.ndarray, np.ndarray]:
    """Coalesce ranges given in any order."""
    pfns = np.asarray(pfns, dtype=np.uint64)
    order = np.argsort(pfns, kind="stable")
    return coalesce_ranges(pfns[order], np.asarray(counts, dtype=np.uint64)[order])


def expand_pages(pfns, counts) -> np.ndarray:
    """Every PFN the ranges cover, in order (for the legacy one-PFN-per-page form)."""
    pfns = np.asarray(pfns, dtype=np.uint64)
    counts = np.asarray(counts, dtype=np.uint64)
    total = int(counts.sum()) if counts.size else 0
    if not total:
        return np.empty(0, np.uint64)
    starts = np.repeat(pfns - (np.cumsum(counts) - counts), counts.astype(np.intp))
    return starts + np.arange(total, dtype=np.uint64)


def pages_to_ranges(pages) -> tuple[np.ndarray, np.ndarray]:
    """Collapse a sorted PFN array into (pfn, count) runs of consecutive pages."""
    pages = np.asarray(pages, dtype=np.uint64)
    if not pages.size:
        return np.empty(0, np.uint64), np.empty(0, np.uint64)
    breaks = np.flatnonzero(np.diff(pages) != 1) + 1
    first = np.concatenate(([0], breaks))
    last = np.concatenate((breaks, [pages.size]))
    return pages[first], (last - first).astype(np.uint64)


def encode_pfn32(pages) -> bytes:
    """Legacy payload: little-endian 32-bit PFNs, one per 4 KiB page, at most 256."""
    pages = np.asarray(pages)
    if pages.size > PFN32_MAX_PER_MESSAGE:
        raise ValueError(f"{pages.size} PFNs exceed the legacy limit of {PFN32_MAX_PER_MESSAGE}")
    if pages.size and (int(pages.max()) >= 1 << 32 or (pages.dtype.kind == "i" and pages.min() < 0)):
        raise ValueError("legacy PFNs must fit in 32 bits")
    return pages.astype(PFN32).tobytes()


def decode_pfn32(data) -> tuple[np.ndarray, np.ndarray]:
    """Decode a legacy payload to ``(pfns, counts)`` with every count 1."""
    if len(data) % PFN32.itemsize:
        raise RemoteProtocolError("bad-payload", f"{len(data)} bytes is not a whole number of 32-bit PFNs")
    pfns = np.frombuffer(data, dtype=PFN32).astype(np.uint64)
    if pfns.size > PFN32_MAX_PER_MESSAGE:
        raise RemoteProtocolError("too-many-ranges", f"{pfns.size} legacy PFNs exceed {PFN32_MAX_PER_MESSAGE}")
    return pfns, np.ones(pfns.size, dtype=np.uint64)


class RangeBuffer:
    """The seed's fixed, preallocated batch buffer.

    As Liang Li explains in the seed thread, the guest fills one buffer of a fixed
    number of words and sends it when full — it never allocates a bigger one on the hot
    path, because that allocation can fail or stall migration. ``append``/``extend``
    encode into it and refuse what does not fit; ``view`` is the payload to send (no
    copy), ``clear`` empties it for refilling; ``take`` copies out (tests, benchmarks).
    """

    __slots__ = ("_words", "_used", "_ranges", "_pages", "max_ranges")

    def __init__(self, capacity_words: int = SEED_BUFFER_WORDS, max_ranges: int | None = None) -> None:
        if capacity_words < 2:
            raise ValueError("a range buffer needs room for at least one escaped range (2 words)")
        self._words = np.zeros(capacity_words, dtype=WORD)
        self._used = 0
        self._ranges = 0
        self._pages = 0
        self.max_ranges = capacity_words if max_ranges is None else max_ranges

    @property
    def capacity(self) -> int:
        return self._words.size

    def __len__(self) -> int:
        """Ranges held."""
        return self._ranges

    @property
    def pages(self) -> int:
        return self._pages

    @property
    def used_words(self) -> int:
        return self._used

    @property
    def full(self) -> bool:
        return self._ranges >= self.max_ranges or self._used >= self._words.size

    def append(self, pfn: int, count: int) -> bool:
        """Add one range; False (and nothing added) when it does not fit."""
        if not 0 <= pfn <= MAX_PFN or count < 1:
            raise ValueError(f"cannot encode range pfn={pfn} count={count}")
        need = 1 if count <= MAX_INLINE_COUNT else 2
        if self._ranges >= self.max_ranges or self._used + need > self._words.size:
            return False
        if need == 1:
            self._words[self._used] = (pfn << COUNT_BITS) | count
        else:
            self._words[self._used] = pfn << COUNT_BITS
            self._words[self._used + 1] = count
        self._used += need
        self._ranges += 1
        self._pages += count
        return True

    def extend(self, pfns, counts) -> int:
        """Add as many leading ranges as fit; returns how many were taken.

        The words are encoded straight into the buffer's free tail: nothing is copied and,
        for ranges without escapes, no temporary array is made. What can fit is checked
        once (``check_ranges``) and encoded as checked: the guest never validates a range
        array twice.
        """
        pfns = _as_u64(pfns, "pfns")
        counts = _as_u64(counts, "counts")
        if pfns.shape != counts.shape:
            raise ValueError(f"{pfns.size} pfns but {counts.size} counts")
        room = self._words.size - self._used
        take = min(self.max_ranges - self._ranges, pfns.size, room)
        if take <= 0:
            return 0
        pfns, counts = check_ranges(pfns[:take], counts[:take])  # only what can fit is looked at
        escaped = counts > COUNT_MASK
        extra = int(np.count_nonzero(escaped))
        if extra:  # escaped ranges take two words: cut where the room ends
            ends = np.cumsum(escaped, dtype=np.intp)
            ends += np.arange(1, take + 1, dtype=np.intp)
            take = int(np.searchsorted(ends, room, side="right"))
            if take <= 0:
                return 0
            pfns, counts = pfns[:take], counts[:take]
            extra = int(ends[take - 1]) - take
        used = _encode_checked(pfns, counts, extra, self._words[self._used :])
        self._used += used
        self._ranges += take
        self._pages += int(counts.sum())
        return take

    def view(self) -> memoryview:
        """The filled words as bytes, without copying (valid until the next change).

        This is the payload the guest sends: msgpack packs it into the message straight
        from the buffer, which is then cleared and refilled for the next batch.
        """
        return memoryview(self._words[: self._used]).cast("B")

    def take(self) -> bytes:
        """Copy the filled words out as a payload and empty the buffer for refilling."""
        payload = self._words[: self._used].tobytes()
        self.clear()
        return payload

    def clear(self) -> None:
        self._used = 0
        self._ranges = 0
        self._pages = 0
