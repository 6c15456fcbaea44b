"""Per-guest page tracker: which pages the guest reported free, put in the balloon, or hinted.

The guest is untrusted (DESIGN §2: Firecracker checks every range against guest memory,
QEMU skips bad ranges and still acks). ``GuestTracker.apply`` therefore validates every
range of a batch, skips and counts the bad ones by reason, and never raises on guest
data; the session acks the batch with ``rejected_pages`` either way.

Rules, applied in this order; a range gets at most one rejection reason and a rejected
range changes nothing (it is skipped whole, never clipped):

``zero-length``
    count == 0 (the decoder already refuses escaped zero counts; kept for direct callers).
``out-of-range``
    pfn >= 2**52, pfn >= pages, or the range runs past the guest's last page. Checked as
    ``count <= pages - pfn`` so a count up to 2**64-1 cannot wrap ``pfn + count`` around.
``overlap``
    The batch's remaining ranges are taken in PFN order (ties: batch order); a range whose
    first page lies inside an earlier range of the same batch is rejected (the earlier one
    stays, even if it was itself rejected as an overlap). Touching ranges do not overlap.
``conflict``
    A REPORT or REUSE range that touches any page in the balloon (inflated): a page the
    guest gave away can be neither free in the guest nor taken back without DEFLATE.
``stale``
    HINT batches whose cmd_id is not the current hinting command (virtio-balloon: hints
    for an old command id are ignored). The whole batch is skipped. Stale hints are
    counted like rejections so the guest learns they were ignored.

What an accepted range does (every operation is idempotent — repeating a report of
pages that are already reported is accepted and changes nothing):

- REPORT adds the pages to ``reported``.
- REUSE removes them from ``reported`` (pages not reported are a no-op).
- INFLATE adds them to ``inflated`` and removes them from ``reported``: a ballooned page
  is no longer "free and reported" but given away, and the two sets stay disjoint, so
  ``reported_pages + inflated_pages`` is what the host may reclaim. As in Linux,
  inflating a page that was reported is legal (the balloon takes pages from the buddy
  allocator, reported or not).
- DEFLATE removes them from ``inflated`` (pages not inflated are a no-op).
- HINT adds them to ``hinted``, the set of the current command; a new command starts an
  empty set. Hints are "possibly reclaimable" only, never discarded.

``ApplyResult.discard`` holds the merged ranges that are now safe to give back to the
kernel: for REPORT the accepted pages not reported before, for INFLATE the accepted
pages not inflated before (pages that were reported are included: the guest may have
written them since). Empty for REUSE, DEFLATE and HINT.

The sets are sorted numpy interval arrays (``IntervalSet``), chosen over pyroaring's
``BitMap64`` by bench/tracker.py (figures in docs/PERFORMANCE.md ``## Tracker``): every
operation is a handful of vectorized passes (sort of the touched window, prefix sums),
where BitMap64 needs one Python call per range (``add_range``) or per page (building
from an array). No Python loop per range or per page runs here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from shared.ranges import PFN_BITS

MAX_PAGES = 1 << PFN_BITS
KINDS = ("report", "reuse", "inflate", "deflate", "hint")
REASONS = ("zero-length", "out-of-range", "overlap", "conflict", "stale")
U64 = np.uint64
_EMPTY = np.empty(0, dtype=U64)


def _total(counts: np.ndarray) -> int:
    """Exact sum of uint64 counts as a Python int (a batch of 2**64-1 counts must not wrap)."""
    if not counts.size:
        return 0
    low = (counts & U64(0xFFFFFFFF)).sum(dtype=U64)
    high = (counts >> U64(32)).sum(dtype=U64)
    return (int(high) << 32) + int(low)


def _combine(a_starts, a_ends, b_starts, b_ends, keep) -> tuple[np.ndarray, np.ndarray]:
    """Boolean combination of two sorted interval lists by a sweep over their boundaries.

    Each list is sorted, its intervals disjoint (touching allowed). ``keep(in_a, in_b)``
    says which segments belong to the result. Returns sorted, disjoint, non-touching
    intervals. The boundary arrays are concatenations of two sorted runs, so the stable
    sort (timsort) is a single linear merge.
    """
    na, nb = a_starts.size, b_starts.size
    coords = np.empty(2 * (na + nb), dtype=U64)
    delta_a = np.zeros(coords.size, dtype=np.int32)
    delta_b = np.zeros(coords.size, dtype=np.int32)
    coords[0 : 2 * na : 2] = a_starts
    coords[1 : 2 * na : 2] = a_ends
    coords[2 * na :: 2] = b_starts
    coords[2 * na + 1 :: 2] = b_ends
    delta_a[0 : 2 * na : 2] = 1
    delta_a[1 : 2 * na : 2] = -1
    delta_b[2 * na :: 2] = 1
    delta_b[2 * na + 1 :: 2] = -1
    order = np.argsort(coords, kind="stable")
    coords = coords[order]
    cover_a = np.cumsum(delta_a[order])
    cover_b = np.cumsum(delta_b[order])
    # The state after the last event at a coordinate holds up to the next coordinate.
    last = np.empty(coords.size, dtype=bool)
    last[:-1] = coords[1:] != coords[:-1]
    last[-1] = True
    points = coords[last]
    inside = keep(cover_a[last] > 0, cover_b[last] > 0)
    before = np.empty_like(inside)
    before[0] = False
    before[1:] = inside[:-1]
    return points[inside & ~before], points[~inside & before]


class IntervalSet:
    """A set of page numbers as sorted, disjoint, non-touching [start, end) uint64 arrays.

    Operations touch only the window of stored intervals that meets the batch, then
    splice the recombined window back (one array copy, at memcpy speed).
    """

    __slots__ = ("starts", "ends", "_pages")

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.starts = _EMPTY
        self.ends = _EMPTY
        self._pages = 0

    @property
    def pages(self) -> int:
        return self._pages

    @property
    def ranges(self) -> int:
        return int(self.starts.size)

    def memory_bytes(self) -> int:
        return int(self.starts.nbytes + self.ends.nbytes)

    def as_ranges(self) -> tuple[np.ndarray, np.ndarray]:
        return self.starts.copy(), self.ends - self.starts

    def _window(self, starts: np.ndarray, ends: np.ndarray) -> tuple[int, int]:
        """Stored intervals that overlap or touch [min(starts), max(ends))."""
        low = int(np.searchsorted(self.ends, starts[0], side="left"))
        high = int(np.searchsorted(self.starts, ends.max(), side="right"))
        return low, max(low, high)

    def _splice(self, low: int, high: int, starts: np.ndarray, ends: np.ndarray) -> None:
        removed = int((self.ends[low:high] - self.starts[low:high]).sum(dtype=U64))
        self._pages += int((ends - starts).sum(dtype=U64)) - removed
        self.starts = np.concatenate((self.starts[:low], starts, self.starts[high:]))
        self.ends = np.concatenate((self.ends[:low], ends, self.ends[high:]))

    def update(self, starts: np.ndarray, ends: np.ndarray) -> None:
        """Add sorted, disjoint intervals (touching allowed)."""
        if not starts.size:
            return
        low, high = self._window(starts, ends)
        merged = _combine(starts, ends, self.starts[low:high], self.ends[low:high], np.logical_or)
        self._splice(low, high, *merged)

    def difference_update(self, starts: np.ndarray, ends: np.ndarray) -> None:
        """Remove sorted, disjoint intervals."""
        if not starts.size or not self.starts.size:
            return
        low, high = self._window(starts, ends)
        if low == high:
            return
        kept = _combine(
            starts, ends, self.starts[low:high], self.ends[low:high], lambda a, b: b & ~a
        )
        self._splice(low, high, *kept)

    def missing(self, starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The parts of sorted, disjoint intervals not in this set, merged."""
        if not starts.size:
            return _EMPTY, _EMPTY
        low, high = self._window(starts, ends)
        return _combine(
            starts, ends, self.starts[low:high], self.ends[low:high], lambda a, b: a & ~b
        )

    def touches(self, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
        """Per interval: does it share a page with this set? (any order, vectorized)"""
        if not self.starts.size:
            return np.zeros(starts.size, dtype=bool)
        # The last stored interval starting before `end` is the one reaching furthest
        # right among those that could overlap, since stored intervals are disjoint.
        index = np.searchsorted(self.starts, ends, side="left").astype(np.intp) - 1
        reach = self.ends[np.maximum(index, 0)]
        return (index >= 0) & (reach > starts)


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
        return min(self.rejected_pages, (1 << 64) - 1)

    @property
    def discard_pages(self) -> int:
        return int(self.discard[1].sum(dtype=U64)) if self.discard[1].size else 0


class GuestTracker:
    """The host's view of one guest's pages in this session (see the module docstring)."""

    #: The page-set class; bench/tracker.py swaps in a pyroaring BitMap64 one to compare.
    page_set = IntervalSet

    def __init__(self, pages: int) -> None:
        if not 0 < pages <= MAX_PAGES:
            raise ValueError(f"a guest has 1..2**{PFN_BITS} pages, got {pages}")
        self._pages = int(pages)
        self._limit = U64(pages)
        self.reported = self.page_set()
        self.inflated = self.page_set()
        self.hinted = self.page_set()
        self.hint_command: int | None = None

    # --- views ------------------------------------------------------------------------

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

    # --- commands ---------------------------------------------------------------------

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

    def reset(self) -> None:
        """A new session: the guest re-reports and re-inflates everything."""
        self.reported.clear()
        self.inflated.clear()
        self.hinted.clear()
        self.hint_command = None

    # --- the hot path -----------------------------------------------------------------

    def apply(self, kind: str, pfns, counts, cmd_id: int | None = None) -> ApplyResult:
        """Validate and apply one decoded batch; never raises on what the guest sent."""
        if kind not in KINDS:
            raise ValueError(f"unknown batch kind {kind!r}")
        pfns = np.asarray(pfns).astype(U64, copy=False).ravel()
        counts = np.asarray(counts).astype(U64, copy=False).ravel()
        if pfns.shape != counts.shape:
            raise ValueError(f"{pfns.size} pfns but {counts.size} counts")
        result = ApplyResult(kind=kind, ranges=int(pfns.size), pages=_total(counts))
        if not pfns.size:
            return result
        reason = np.zeros(pfns.size, dtype=np.int8)  # 0 = accepted, else 1 + REASONS index

        if kind == "hint" and (cmd_id is None or cmd_id != self.hint_command):
            reason[:] = 1 + REASONS.index("stale")
            return self._finish(result, reason, counts, _EMPTY, _EMPTY)

        zero = counts == 0
        room = np.where(pfns < self._limit, self._limit - pfns, U64(0))
        outside = ~zero & (counts > room)
        reason[zero] = 1 + REASONS.index("zero-length")
        reason[outside] = 1 + REASONS.index("out-of-range")

        valid = np.flatnonzero(reason == 0)
        order = valid[np.argsort(pfns[valid], kind="stable")]
        starts = pfns[order]
        ends = starts + counts[order]  # cannot wrap: counts <= pages - pfn
        if starts.size > 1:
            reach = np.maximum.accumulate(ends)
            overlap = np.zeros(starts.size, dtype=bool)
            overlap[1:] = starts[1:] < reach[:-1]
            if overlap.any():
                reason[order[overlap]] = 1 + REASONS.index("overlap")
                keep = ~overlap
                order, starts, ends = order[keep], starts[keep], ends[keep]
        if kind in ("report", "reuse") and starts.size:
            conflict = self.inflated.touches(starts, ends)
            if conflict.any():
                reason[order[conflict]] = 1 + REASONS.index("conflict")
                keep = ~conflict
                starts, ends = starts[keep], ends[keep]
        return self._finish(result, reason, counts, starts, ends)

    def _finish(self, result, reason, counts, starts, ends) -> ApplyResult:
        """Count the verdicts, then change the sets with the accepted (sorted, disjoint) ranges."""
        rejected = reason != 0
        if rejected.any():
            for code in np.unique(reason[rejected]):
                name = REASONS[int(code) - 1]
                hit = reason == code
                result.rejected[name] = _total(counts[hit])
                result.rejected_ranges[name] = int(np.count_nonzero(hit))
            result.rejected_pages = sum(result.rejected.values())
        if not starts.size:
            return result
        result.accepted_pages = int((ends - starts).sum(dtype=U64))
        kind = result.kind
        if kind == "report":
            fresh = self.reported.missing(starts, ends)
            self.reported.update(starts, ends)
            result.discard = (fresh[0], fresh[1] - fresh[0])
        elif kind == "reuse":
            self.reported.difference_update(starts, ends)
        elif kind == "inflate":
            fresh = self.inflated.missing(starts, ends)
            self.inflated.update(starts, ends)
            self.reported.difference_update(starts, ends)
            result.discard = (fresh[0], fresh[1] - fresh[0])
        elif kind == "deflate":
            self.inflated.difference_update(starts, ends)
        else:  # hint
            self.hinted.update(starts, ends)
        return result
