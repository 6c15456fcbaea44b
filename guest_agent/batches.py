"""Operations the host must acknowledge, and how their ranges become payloads.

An *operation* is one logical batch — a free page report of up to ``--capacity`` blocks,
a set of pages taken back (REUSE), a slice of balloon (INFLATE/DEFLATE) or of hints. In
the default encoding it is one message; in the legacy ``pfn32`` encoding it becomes as
many 256-PFN messages as it needs, one ack each, exactly like the legacy virtio balloon.
Its completion callback runs once every message of it is acked — that is the moment a
report's blocks stop being isolated, or a deflate's pages may be freed.

Payloads are produced lazily, so a large inflate in pfn32 mode never holds more than one
message's bytes at a time, and the ranges52 encoding goes through the protocol's fixed
:class:`~shared.ranges.RangeBuffer` (the seed's preallocated buffer).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from shared.messages import BATCH_CLASSES, Hint
from shared.ranges import RangeBuffer, encode_pfn32, expand_pages
from shared.vocabulary import BATCH_KINDS, HINT, PFN32, PFN32_MAX_PER_MESSAGE

KINDS = BATCH_KINDS

#: Pages expanded at a time for the legacy encoding (a bound on the temporary arrays).
_PFN32_CHUNK_PAGES = 64 * PFN32_MAX_PER_MESSAGE


def block_counts(orders: np.ndarray) -> np.ndarray:
    """Pages per buddy block: ``2**order`` as uint64."""
    return np.left_shift(np.uint64(1), np.asarray(orders, dtype=np.uint64))


class Ranges52Payloads:
    """The payloads of one operation in ``ranges52``, encoded one at a time into the fixed buffer.

    The seed's rule: one preallocated buffer per queue, filled, sent, refilled — never a
    bigger one, never a copy. ``next()`` encodes the next batch's ranges straight into the
    buffer and returns a view of it; the caller sends it (msgpack packs the message from
    the view) before asking for the next one.
    """

    __slots__ = ("_pfns", "_counts", "_buffer", "_start")

    def __init__(self, pfns: np.ndarray, counts: np.ndarray, buffer: RangeBuffer) -> None:
        self._pfns = pfns
        self._counts = counts
        self._buffer = buffer
        self._start = 0

    @property
    def more(self) -> bool:
        return self._start < self._pfns.size

    def next(self) -> memoryview:
        buffer = self._buffer
        buffer.clear()
        taken = buffer.extend(self._pfns[self._start :], self._counts[self._start :])
        if taken == 0:  # cannot happen with capacity >= 2 words; guard against a spin
            raise ValueError("range buffer refused a range")
        self._start += taken
        return buffer.view()


class Pfn32Payloads:
    """The legacy encoding's messages, 256 PFNs each, expanded a bounded chunk at a time."""

    __slots__ = ("_messages", "_next")

    def __init__(self, pfns: np.ndarray, counts: np.ndarray) -> None:
        self._messages = pfn32_payloads(pfns, counts)
        self._next = next(self._messages, None)

    @property
    def more(self) -> bool:
        return self._next is not None

    def next(self) -> bytes:
        payload = self._next
        self._next = next(self._messages, None)
        return payload


class NoPayloads:
    """What is left of an operation whose unsent part was dropped."""

    __slots__ = ()
    more = False

    def next(self):
        raise RuntimeError("no payload left in this operation")


def split_ranges(pfns: np.ndarray, counts: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut every range longer than ``limit`` pages into pieces of at most ``limit``."""
    pieces = (counts + np.uint64(limit - 1)) // np.uint64(limit)
    if not pieces.size or int(pieces.max()) <= 1:
        return pfns, counts
    reps = pieces.astype(np.intp)
    first = np.cumsum(reps) - reps
    offset = (np.arange(int(reps.sum())) - np.repeat(first, reps)).astype(np.uint64) * np.uint64(limit)
    new_pfns = np.repeat(pfns, reps) + offset
    new_counts = np.minimum(np.uint64(limit), np.repeat(counts, reps) - offset)
    return new_pfns, new_counts


def pfn32_payloads(pfns: np.ndarray, counts: np.ndarray) -> Iterator[bytes]:
    """One legacy message per 256 pages, expanded a bounded chunk at a time."""
    pfns, counts = split_ranges(pfns, counts, _PFN32_CHUNK_PAGES)
    cum = np.cumsum(counts)
    i = 0
    while i < pfns.size:
        base = int(cum[i - 1]) if i else 0
        j = int(np.searchsorted(cum, base + _PFN32_CHUNK_PAGES, side="right"))
        pages = expand_pages(pfns[i:j], counts[i:j])
        for start in range(0, pages.size, PFN32_MAX_PER_MESSAGE):
            yield encode_pfn32(pages[start : start + PFN32_MAX_PER_MESSAGE])
        i = j


def payloads_for(pfns, counts, encoding: str, buffer: RangeBuffer):
    """The payload source of one operation: ``.more`` and ``.next()``."""
    pfns = np.asarray(pfns, dtype=np.uint64)
    counts = np.asarray(counts, dtype=np.uint64)
    if encoding == PFN32:
        return Pfn32Payloads(pfns, counts)
    return Ranges52Payloads(pfns, counts, buffer)


class Op:
    """One logical batch awaiting its acks; see the module docstring."""

    __slots__ = ("kind", "pages", "cmd_id", "on_ack", "on_abort", "_payloads",
                 "outstanding", "sent", "rejected_pages", "aborted")

    def __init__(self, kind: str, pages: int, payloads,
                 on_ack: Callable[[Op], None] | None = None,
                 on_abort: Callable[[Op], None] | None = None, cmd_id: int | None = None) -> None:
        if kind not in BATCH_CLASSES:
            raise ValueError(f"unknown batch kind {kind!r}")
        self.kind = kind
        self.pages = pages
        self.cmd_id = cmd_id
        self.on_ack = on_ack
        self.on_abort = on_abort
        self._payloads = payloads
        self.outstanding = 0
        self.sent = 0
        self.rejected_pages = 0
        self.aborted = False

    @property
    def has_unsent(self) -> bool:
        return self._payloads.more

    @property
    def done(self) -> bool:
        return not self._payloads.more and self.outstanding == 0

    def next_message(self):
        """The next message of this op, to be sent at once (its payload may be a view of
        the shared buffer); its seq is assigned by the connection (``conn.last_seq``)."""
        if not self._payloads.more:
            raise RuntimeError("no payload left in this operation")
        payload = self._payloads.next()
        self.outstanding += 1
        self.sent += 1
        if self.kind == HINT:
            return Hint(payload=payload, cmd_id=self.cmd_id or 0)
        return BATCH_CLASSES[self.kind](payload=payload)

    def acked(self, rejected_pages: int) -> bool:
        """Count one ack; True when the whole op is now complete."""
        self.outstanding -= 1
        self.rejected_pages += rejected_pages
        return self.done

    def drop_unsent(self) -> None:
        """Stop sending what is left (a hint command was stopped)."""
        self._payloads = NoPayloads()

    def __repr__(self) -> str:
        return f"Op({self.kind}, pages={self.pages}, outstanding={self.outstanding})"
