"""The rules of a batch: which ranges a guest may report, reuse, inflate, deflate or hint.

The guest is untrusted (docs/PROTOCOL.md §8; Firecracker checks every range against guest memory,
QEMU skips bad ranges and still acks). ``GuestTracker.apply`` therefore validates every
range of a batch, skips and counts the bad ones by reason, and never raises on guest
data; the session acks the batch with ``rejected_pages`` either way.

The rules are applied **in one pass, in batch order** — what a C device model or driver
can do with one loop and a bitmap — and a range gets at most one rejection reason; a
rejected range changes nothing (it is skipped whole, never clipped) and does not count
against later ranges:

``zero-length``
    count == 0 (the decoder already refuses escaped zero counts; kept for direct callers).
``out-of-range``
    pfn >= pages, or the range runs past the guest's last page. Checked as
    ``count - 1 < pages - pfn`` so a count up to 2**64-1 cannot wrap ``pfn + count``.
``overlap``
    The range shares a page with a range accepted earlier in the same batch:
    REPORT (3000,10),(2995,10) accepts (3000,10) and rejects (2995,10), 10 pages.
``conflict``
    A REPORT or REUSE range that touches any page in the balloon (inflated): a page the
    guest gave away can be neither free in the guest nor taken back without DEFLATE.
``not-ram``
    Inside the guest's span but touching a hole in its RAM map (QEMU's PCI hole below
    4 GiB, host_daemon/ramlayout.py): those guest-physical pages are no RAM.
``stale``
    HINT batches whose cmd_id is not the current hinting command (virtio-balloon: hints
    for an old command id are ignored). The whole batch is skipped and counted.

What an accepted range does (every operation is idempotent — repeating a report of
pages that are already reported is accepted and changes nothing):

- REPORT adds the pages to ``reported``; REUSE removes them (pages not reported: no-op).
- INFLATE adds them to ``inflated`` and removes them from ``reported``: a ballooned page
  is given away, not "free and reported", so the two sets stay disjoint and
  ``reported_pages + inflated_pages`` is what the host may reclaim. As in Linux, inflating
  a reported page is legal (the balloon takes pages from the buddy allocator).
- DEFLATE removes them from ``inflated`` (pages not inflated: no-op).
- HINT adds them to ``hinted``, the set of the current command; a new command starts an
  empty set. Hints are "possibly reclaimable" only, never discarded.

``ApplyResult.discard`` holds the ranges now safe to give back to the kernel: the accepted
REPORT ranges not wholly reported before and the accepted INFLATE ranges not wholly
inflated before (whole ranges: punching a partly punched range again is harmless and
cheaper than splitting it), joined where one ends where the next starts.

One implementation: ``apply_batch`` below, over the flat bitmaps of host_daemon/pageset.py,
compiled with them by numba (``load_kernels``) and the same code interpreted without it.
Figures: bench/tracker.py, docs/PERFORMANCE.md ``## Tracker``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np

from shared.vocabulary import BATCH_KINDS, DEFLATE, HINT, INFLATE, REPORT, REUSE, U64_MAX

from . import pageset
from .pageset import (
    BATCH,
    FLAT_LIMIT,
    HINTED,
    INFLATED,
    LIMIT,
    REPORTED,
    SET_FIELDS,
    any_in_range,
    clear_range,
    set_range,
    widen,
)

MAX_PAGES = FLAT_LIMIT
KINDS = BATCH_KINDS
REASONS = ("zero-length", "out-of-range", "overlap", "conflict", "stale", "not-ram")
NOT_RAM = "not-ram"
KIND_CODES = {kind: code for code, kind in enumerate(BATCH_KINDS)}
_REPORT, _REUSE, _INFLATE = KIND_CODES[REPORT], KIND_CODES[REUSE], KIND_CODES[INFLATE]
_DEFLATE, _HINT = KIND_CODES[DEFLATE], KIND_CODES[HINT]

# ``result`` (uint64), rewritten by every batch: accepted pages, rejected ranges, then per
# reason (zero-length, out-of-range, overlap, conflict): ranges, low and high 32 bits of pages.
ACCEPTED, REJECTED, REASONS_AT = 0, 1, 2
RESULT_SIZE = REASONS_AT + 3 * 4
ZERO_LENGTH, OUT_OF_RANGE, OVERLAP, CONFLICT = 0, 1, 2, 3

U64 = np.uint64
_EMPTY = np.empty(0, dtype=U64)
#: ``ApplyResult.rejected`` of a batch with nothing rejected (nearly all): read-only, shared
_NONE_REJECTED = MappingProxyType({})
_NO_DISCARD = (_EMPTY, _EMPTY)
_U0 = np.uint64(0)
_U1 = np.uint64(1)
_U32 = np.uint64(32)
_LOW32 = np.uint64(0xFFFFFFFF)


def reject(result, reason, count):
    at = REASONS_AT + 3 * reason
    result[at] += _U1
    result[at + 1] += count & _LOW32  # exact even when counts sum past 2**64
    result[at + 2] += count >> _U32
    result[REJECTED] += _U1


def apply_batch(kind, pfns, counts, bits, sets, result, out, accepted):
    """Validate and apply one batch in batch order (rules: the module docstring).

    Writes the discard ranges to ``out`` (pfns at [0, k), counts at [n, n + k); REPORT and
    INFLATE only) and returns k; accepted pages and rejections by reason go to ``result``.
    ``accepted`` (n intp) holds the indexes of the accepted ranges. The exact overlap test
    needs the ``BATCH`` row only once a range starts below the end of an accepted one and
    ends above the start of another — never for a batch in address order.
    """
    n = pfns.size
    for i in range(RESULT_SIZE):
        result[i] = _U0
    limit = sets[LIMIT]
    reported = bits[REPORTED]
    inflated = bits[INFLATED]
    hinted = bits[HINTED]
    batch = bits[BATCH]
    check_balloon = (kind == _REPORT or kind == _REUSE) and sets[INFLATED * SET_FIELDS] != _U0
    reach = _U0  # highest end of an accepted range
    lowest = limit  # lowest start of an accepted range
    exact = False  # the BATCH row holds every accepted range
    taken = 0
    pages = _U0
    k = 0
    for i in range(n):
        start = pfns[i]
        count = counts[i]
        if count == _U0:
            reject(result, ZERO_LENGTH, count)
            continue
        if start >= limit or count - _U1 >= limit - start:
            reject(result, OUT_OF_RANGE, count)
            continue
        end = start + count
        if taken > 0 and start < reach and end > lowest:
            if not exact:
                for j in range(taken):
                    a = accepted[j]
                    set_range(batch, pfns[a], pfns[a] + counts[a])
                exact = True
            if any_in_range(batch, start, end):
                reject(result, OVERLAP, count)
                continue
        if check_balloon and any_in_range(inflated, start, end):
            reject(result, CONFLICT, count)
            continue
        accepted[taken] = i
        taken += 1
        if exact:
            set_range(batch, start, end)
        if end > reach:
            reach = end
        if start < lowest:
            lowest = start
        pages += count
        fresh = False
        if kind == _REPORT:
            added = set_range(reported, start, end)
            if added:
                sets[REPORTED * SET_FIELDS] += added
                widen(sets, REPORTED, start, end)
                fresh = True
        elif kind == _REUSE:
            if sets[REPORTED * SET_FIELDS]:
                sets[REPORTED * SET_FIELDS] -= clear_range(reported, start, end)
        elif kind == _INFLATE:
            added = set_range(inflated, start, end)
            if added:
                sets[INFLATED * SET_FIELDS] += added
                widen(sets, INFLATED, start, end)
                fresh = True
            if sets[REPORTED * SET_FIELDS]:
                sets[REPORTED * SET_FIELDS] -= clear_range(reported, start, end)
        elif kind == _DEFLATE:
            if sets[INFLATED * SET_FIELDS]:
                sets[INFLATED * SET_FIELDS] -= clear_range(inflated, start, end)
        else:  # hint
            added = set_range(hinted, start, end)
            if added:
                sets[HINTED * SET_FIELDS] += added
                widen(sets, HINTED, start, end)
        if fresh:  # discard the whole range, joined to the previous one if touching
            if k and out[k - 1] + out[n + k - 1] == start:
                out[n + k - 1] += count
            else:
                out[k] = start
                out[n + k] = count
                k += 1
    if exact:  # leave the scratch row empty for the next batch
        for j in range(taken):
            a = accepted[j]
            clear_range(batch, pfns[a], pfns[a] + counts[a])
    result[ACCEPTED] = pages
    return k


_compiled = False


def load_kernels() -> bool:
    """Compile the page-set loops and ``apply_batch`` (numba, from its on-disk cache when it
    is warm); True when compiled. Thread-safe; the host calls it off the event loop at start,
    and the first batch calls it if nobody did."""
    global _compiled, apply_batch, any_in_range, clear_range, set_range, widen
    if _compiled:
        return True
    if not pageset.compile_kernels():
        return False
    module = sys.modules[__name__]
    with pageset.kernel_lock:
        if not _compiled:
            any_in_range, clear_range = pageset.any_in_range, pageset.clear_range
            set_range, widen = pageset.set_range, pageset.widen
            pageset.compile_kernels(module, ("reject", "apply_batch"), frozenset({"reject"}))
            _compiled = True
    return True


@dataclass(slots=True)
class ApplyResult:
    """What one batch did, for the ACK (``rejected_pages``) and the metrics."""

    kind: str
    ranges: int = 0
    pages: int = 0
    accepted_pages: int = 0
    rejected_pages: int = 0
    rejected: dict[str, int] = field(default_factory=dict)  # reason -> pages
    rejected_ranges: dict[str, int] = field(default_factory=dict)  # reason -> ranges
    discard: tuple[np.ndarray, np.ndarray] = (_EMPTY, _EMPTY)

    @property
    def ack_rejected_pages(self) -> int:
        """``rejected_pages`` clamped to what an ACK's uint64 field can carry."""
        return min(self.rejected_pages, U64_MAX)

    @property
    def discard_pages(self) -> int:
        return int(self.discard[1].sum(dtype=U64)) if self.discard[1].size else 0


def _total(counts: np.ndarray) -> int:
    """Exact sum of uint64 counts as a Python int (a batch of 2**64-1 counts must not wrap)."""
    low = (counts & U64(0xFFFFFFFF)).sum(dtype=U64)
    high = (counts >> U64(32)).sum(dtype=U64)
    return (int(high) << 32) + int(low)


class PageSetView:
    """One set of a tracker, read side: page count, maximal runs, the span it wrote.

    Made on demand by the tracker's properties, never stored on it: a stored view would
    make every tracker a reference cycle, and a forgotten guest's bitmaps would then wait
    for the cyclic collector's oldest generation instead of going back when dropped.
    """

    __slots__ = ("owner", "row")

    def __init__(self, owner: GuestTracker, row: int) -> None:
        self.owner = owner
        self.row = row

    def clear(self) -> None:
        pageset.clear_set(self.owner._bits, self.owner._sets, self.row)

    @property
    def pages(self) -> int:
        return int(self.owner._sets[self.row * SET_FIELDS])

    @property
    def ranges(self) -> int:
        return int(self.as_ranges()[0].size)

    def memory_bytes(self) -> int:
        """The span of the bitmap this set wrote since it was cleared (what can be resident)."""
        return pageset.span_bytes(self.owner._sets, self.row)

    def as_ranges(self) -> tuple[np.ndarray, np.ndarray]:
        sets = self.owner._sets
        base = self.row * SET_FIELDS
        if not sets[base]:
            return _EMPTY, _EMPTY
        return pageset.set_runs(self.owner._bits[self.row], int(sets[base + 1]), int(sets[base + 2]))


_U64_DTYPE = np.dtype(U64)


def _as_words(values) -> np.ndarray:
    """Any int sequence as a contiguous 1-D uint64 array (the hot path skips this)."""
    return np.ascontiguousarray(np.asarray(values).astype(U64, copy=False).ravel())


class TrackerViews:
    """The read side of a tracker, written once: page counts, runs and memory of its three
    sets, and the hinting command. A tracker provides ``reported``, ``inflated`` and
    ``hinted`` (each with ``pages``, ``as_ranges()``, ``memory_bytes()``, ``clear()``),
    ``_pages`` and ``hint_command``; bench/tracker_alternatives.py's set trackers do too.
    """

    __slots__ = ()

    @property
    def pages(self) -> int:
        return self._pages

    @property
    def reported_pages(self) -> int:
        return self.reported.pages

    @property
    def inflated_pages(self) -> int:
        return self.inflated.pages

    @property
    def hinted_pages(self) -> int:
        return self.hinted.pages

    def reported_ranges(self) -> tuple[np.ndarray, np.ndarray]:
        return self.reported.as_ranges()

    def inflated_ranges(self) -> tuple[np.ndarray, np.ndarray]:
        return self.inflated.as_ranges()

    def hinted_ranges(self) -> tuple[np.ndarray, np.ndarray]:
        return self.hinted.as_ranges()

    def memory_bytes(self) -> int:
        return self.reported.memory_bytes() + self.inflated.memory_bytes() + self.hinted.memory_bytes()

    def set_hint_command(self, cmd_id: int | None) -> None:
        """Start hinting command ``cmd_id`` (a fresh, empty hinted set), or end it (None).

        After ``None`` every hint is stale; the finished command's set stays readable
        until the next command starts (migration reads it after HINT_DONE).
        """
        if cmd_id is not None and cmd_id != self.hint_command:
            self.hinted.clear()
        self.hint_command = cmd_id

    def clear_hints(self) -> None:
        self.hinted.clear()


class GuestTracker(TrackerViews):
    """The host's view of one guest's pages in this session (rules: the module docstring)."""

    def __init__(self, pages: int, holes: tuple[tuple[int, int], ...] = ()) -> None:
        if not 0 < pages <= MAX_PAGES:
            raise ValueError(f"the host tracks guests of 1..{MAX_PAGES} pages, got {pages}")
        self._pages = int(pages)
        #: page ranges [start, end) inside the span that are not RAM (ramlayout.RamLayout.holes)
        self.holes = tuple((int(start), int(end)) for start, end in holes)
        self._bits, self._sets = pageset.new_sets(self._pages)
        self._result = np.zeros(RESULT_SIZE, dtype=U64)
        self._accepted = np.empty(64, dtype=np.intp)  # scratch of apply_batch, grown on demand
        self.hint_command: int | None = None

    # --- views ------------------------------------------------------------------------

    @property
    def reported(self) -> PageSetView:
        return PageSetView(self, REPORTED)

    @property
    def inflated(self) -> PageSetView:
        return PageSetView(self, INFLATED)

    @property
    def hinted(self) -> PageSetView:
        return PageSetView(self, HINTED)

    # --- commands ---------------------------------------------------------------------

    def _not_ram(self, pfns: np.ndarray, counts: np.ndarray) -> np.ndarray | None:
        """Which ranges, valid otherwise (non-zero, inside the span), touch a hole; None: none."""
        limit = U64(self._pages)
        with np.errstate(over="ignore"):
            inside = (counts != 0) & (pfns < limit) & (counts - _U1 < limit - pfns)
            ends = pfns + counts
        hit = np.zeros(pfns.size, dtype=bool)
        for start, end in self.holes:
            hit |= (pfns < U64(end)) & (ends > U64(start))
        hit &= inside
        return hit if hit.any() else None

    def _apply_around_holes(self, kind, pfns, counts, hit, cmd_id) -> ApplyResult:
        """Reject the ranges in a hole (``not-ram``), apply the others: a rejected range
        changes nothing and counts against no other, so dropping it first is the same pass."""
        keep = ~hit
        result = self._apply_kernel(kind, KIND_CODES[kind], pfns[keep], counts[keep]) if keep.any() else ApplyResult(kind)
        pages = _total(counts[hit])
        ranges = int(hit.sum())
        rejected = dict(result.rejected)
        rejected_ranges = dict(result.rejected_ranges)
        rejected[NOT_RAM] = pages
        rejected_ranges[NOT_RAM] = ranges
        return ApplyResult(kind, result.ranges + ranges, result.pages + pages, result.accepted_pages,
                           result.rejected_pages + pages, rejected, rejected_ranges, result.discard)

    def reset(self) -> None:
        """A new session: fresh (calloc) bitmaps, so the old ones' pages go back to the OS."""
        self._bits, self._sets = pageset.new_sets(self._pages)
        self.hint_command = None

    # --- the hot path -----------------------------------------------------------------

    def apply(self, kind: int | str, pfns, counts, cmd_id: int | None = None) -> ApplyResult:
        """Validate and apply one decoded batch in one kernel call; never raises on guest data.

        ``kind`` is the batch's kind code (its index in vocabulary.BATCH_KINDS, as the host's
        connection hands it over) or its name."""
        if kind.__class__ is int and 0 <= kind < len(KINDS):
            code, kind = kind, KINDS[kind]
        else:
            code = KIND_CODES.get(kind)
            if code is None:
                raise ValueError(f"unknown batch kind {kind!r}")
        if pfns.__class__ is not np.ndarray or pfns.dtype is not _U64_DTYPE or pfns.ndim != 1:
            pfns = _as_words(pfns)
        if counts.__class__ is not np.ndarray or counts.dtype is not _U64_DTYPE or counts.ndim != 1:
            counts = _as_words(counts)
        n = pfns.size
        if counts.size != n:
            raise ValueError(f"{n} pfns but {counts.size} counts")
        if not n:
            return ApplyResult(kind, 0)
        if code == _HINT and (cmd_id is None or cmd_id != self.hint_command):
            pages = _total(counts)
            return ApplyResult(kind, n, pages, 0, pages, {"stale": pages}, {"stale": n})
        if self.holes:
            hit = self._not_ram(pfns, counts)
            if hit is not None:
                return self._apply_around_holes(kind, pfns, counts, hit, cmd_id)
        return self._apply_kernel(kind, code, pfns, counts)

    def _apply_kernel(self, kind: str, code: int, pfns: np.ndarray, counts: np.ndarray) -> ApplyResult:
        """One call of ``apply_batch`` on checked uint64 arrays, and its result as an ApplyResult."""
        n = pfns.size
        if not _compiled:
            load_kernels()
        out = np.empty(2 * n, dtype=U64) if code == _REPORT or code == _INFLATE else _EMPTY
        result = self._result
        accepted = self._accepted
        if accepted.size < n:
            accepted = self._accepted = np.empty(n, dtype=np.intp)
        if _compiled:
            k = apply_batch(code, pfns, counts, self._bits, self._sets, result, out, accepted)
        else:  # the same loop, interpreted (numpy scalars wrap where the kernel's words do)
            with np.errstate(over="ignore"):
                k = apply_batch(code, pfns, counts, self._bits, self._sets, result, out, accepted)
        discard = (out[:k], out[n : n + k]) if k else _NO_DISCARD
        accepted = int(result[ACCEPTED])
        if not result[REJECTED]:
            return ApplyResult(kind, n, accepted, accepted, 0, _NONE_REJECTED, _NONE_REJECTED, discard)
        rejected, rejected_ranges = {}, {}
        at = REASONS_AT
        for reason in REASONS[:4]:
            ranges = int(result[at])
            if ranges:
                rejected[reason] = (int(result[at + 2]) << 32) + int(result[at + 1])
                rejected_ranges[reason] = ranges
            at += 3
        total = sum(rejected.values())
        return ApplyResult(kind, n, accepted + total, accepted, total, rejected, rejected_ranges, discard)
