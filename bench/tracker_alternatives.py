"""Measured alternatives to the host's page sets (bench only; the daemon never imports this).

Before the flat bitmaps and the one-pass kernel (host_daemon/pageset.py, host_daemon/tracker.py)
the host kept a guest's pages in pyroaring ``BitMap64`` (``RoaringPageSet``), and sorted numpy
interval arrays (``IntervalSet``) were measured against it. ``SetTracker`` runs batches over
either with the validation vectorized in numpy, so bench/tracker.py can show what each set
structure costs per batch. It is not the daemon's rule book: on clean batches (sorted,
disjoint, in range — what the bench feeds) it does what host_daemon/tracker.py does; it judges
overlap in PFN order, the daemon in batch order (docs/PROTOCOL.md §8).
"""

from __future__ import annotations

import numpy as np
from pyroaring import BitMap64

from host_daemon.tracker import ApplyResult, TrackerViews
from shared.ranges import coalesce_ranges, pages_to_ranges
from shared.vocabulary import BATCH_KINDS, INFLATE, MAX_GUEST_PAGES, PFN_BITS, REPORT, REUSE

MAX_PAGES = MAX_GUEST_PAGES
KINDS = BATCH_KINDS
REASONS = ("zero-length", "out-of-range", "overlap", "conflict", "stale")
U64 = np.uint64
_EMPTY = np.empty(0, dtype=U64)


def _total(counts: np.ndarray) -> int:
    """Exact sum of uint64 counts as a Python int (a batch of 2**64-1 counts must not wrap)."""
    if not counts.size:
        return 0
    if counts.size < 4096 and counts.max() < _SMALL:  # cannot reach 2**64: one pass
        return int(counts.sum(dtype=U64))
    low = (counts & U64(0xFFFFFFFF)).sum(dtype=U64)
    high = (counts >> U64(32)).sum(dtype=U64)
    return (int(high) << 32) + int(low)


_SMALL = U64(1 << 52)
_ZERO = U64(0)
_ONE = U64(1)


def _sweep(a_starts, a_ends, b_starts, b_ends):
    """Walk the boundaries of two sorted interval lists (each disjoint, touching allowed).

    Returns the distinct boundary points and, for the segment from each point to the
    next, whether it lies in A and in B. The boundary array is the concatenation of two
    sorted runs, so the stable sort (timsort) is a single linear merge.
    """
    na, nb = a_starts.size, b_starts.size
    coords = np.empty(2 * (na + nb), dtype=U64)
    coords[0 : 2 * na : 2] = a_starts
    coords[1 : 2 * na : 2] = a_ends
    coords[2 * na :: 2] = b_starts
    coords[2 * na + 1 :: 2] = b_ends
    delta = np.empty(coords.size, dtype=np.int32)  # A counts in units of 1, B of 1 << 16
    delta[0 : 2 * na : 2] = 1
    delta[1 : 2 * na : 2] = -1
    delta[2 * na :: 2] = 1 << 16
    delta[2 * na + 1 :: 2] = -(1 << 16)
    order = np.argsort(coords, kind="stable")
    coords = coords[order]
    cover = np.cumsum(delta[order])
    # The state after the last event at a coordinate holds up to the next coordinate.
    last = np.empty(coords.size, dtype=bool)
    np.not_equal(coords[1:], coords[:-1], out=last[:-1])
    last[-1] = True
    cover = cover[last]
    return coords[last], (cover & 0xFFFF) > 0, cover > 0xFFFF


def _segments(points: np.ndarray, inside: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Maximal runs of segments marked inside, as (starts, ends)."""
    before = np.empty_like(inside)
    before[0] = False
    before[1:] = inside[:-1]
    return points[inside & ~before], points[~inside & before]


def _join_touching(starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Merge sorted, disjoint intervals where one ends exactly where the next starts."""
    if starts.size <= 1:
        return starts, ends
    gap = starts[1:] != ends[:-1]
    if np.count_nonzero(gap) == gap.size:
        return starts, ends
    first = np.empty(starts.size, dtype=bool)
    first[0] = True
    first[1:] = gap
    last = np.empty(starts.size, dtype=bool)
    last[-1] = True
    last[:-1] = gap
    return starts[first], ends[last]


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
        """Stored intervals that overlap or touch [starts[0], ends[-1]] (inputs sorted)."""
        low = int(self.ends.searchsorted(starts[0], side="left"))
        high = int(self.starts.searchsorted(ends[-1], side="right"))
        return low, max(low, high)

    def _splice(self, low: int, high: int, starts: np.ndarray, ends: np.ndarray) -> None:
        if high > low:
            self._pages -= int((self.ends[low:high] - self.starts[low:high]).sum(dtype=U64))
        self._pages += int((ends - starts).sum(dtype=U64))
        self.starts = np.concatenate((self.starts[:low], starts, self.starts[high:]))
        self.ends = np.concatenate((self.ends[:low], ends, self.ends[high:]))

    def update(self, starts: np.ndarray, ends: np.ndarray) -> None:
        """Add sorted, disjoint intervals (touching allowed)."""
        if not starts.size:
            return
        low, high = self._window(starts, ends)
        if low == high:  # nothing stored nearby: the batch goes in as it is
            self._splice(low, high, *_join_touching(starts, ends))
            return
        # Union: merge the two sorted runs, then join where an interval starts at or
        # before the furthest end seen so far.
        all_starts = np.concatenate((self.starts[low:high], starts))
        all_ends = np.concatenate((self.ends[low:high], ends))
        order = np.argsort(all_starts, kind="stable")
        all_starts = all_starts[order]
        reach = np.maximum.accumulate(all_ends[order])
        breaks = np.flatnonzero(all_starts[1:] > reach[:-1])
        first = np.empty(breaks.size + 1, dtype=np.intp)
        first[0] = 0
        first[1:] = breaks + 1
        last = np.empty(breaks.size + 1, dtype=np.intp)
        last[:-1] = breaks
        last[-1] = reach.size - 1
        self._splice(low, high, all_starts[first], reach[last])

    def add(self, starts: np.ndarray, ends: np.ndarray) -> np.ndarray | None:
        """``update``, returning which intervals were wholly in the set before (None: none)."""
        covered = self.covers(starts, ends) if self.starts.size else None
        self.update(starts, ends)
        return covered if covered is not None and covered.any() else None

    def difference_update(self, starts: np.ndarray, ends: np.ndarray) -> None:
        """Remove sorted, disjoint intervals."""
        if not starts.size or not self.starts.size:
            return
        low, high = self._window(starts, ends)
        if low == high:
            return
        points, in_batch, in_set = _sweep(starts, ends, self.starts[low:high], self.ends[low:high])
        self._splice(low, high, *_segments(points, in_set & ~in_batch))

    def covers(self, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
        """Per interval: is every page of it in this set already? (vectorized)"""
        if not self.starts.size:
            return np.zeros(starts.size, dtype=bool)
        index = self.starts.searchsorted(starts, side="right").astype(np.intp) - 1
        return (index >= 0) & (self.ends[np.maximum(index, 0)] >= ends)

    def touches(self, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
        """Per interval: does it share a page with this set? (any order, vectorized)"""
        if not self.starts.size:
            return np.zeros(starts.size, dtype=bool)
        # The last stored interval starting before `end` is the one reaching furthest
        # right among those that could overlap, since stored intervals are disjoint.
        index = self.starts.searchsorted(ends, side="left").astype(np.intp) - 1
        reach = self.ends[np.maximum(index, 0)]
        return (index >= 0) & (reach > starts)


class RoaringPageSet:
    """A set of page numbers in a pyroaring ``BitMap64`` (64-bit: ``BitMap`` would drop
    every PFN >= 2**32 without a word).

    Roaring keeps 2**16-page chunks as run, array or bitset containers, so its size is
    bounded by about one bit per guest page whatever the guest sends (every other page
    reported: 0.125 byte/page), where interval arrays pay 16 bytes per interval. Ranges
    go in with one C call each (``add_range``/``remove_range``): pyroaring has no bulk
    range call, and expanding ranges to pages would cost work per page instead.
    """

    __slots__ = ("bitmap",)

    #: Rough per-container overhead of CRoaring's 64-bit map (ART leaf + container header).
    CONTAINER_OVERHEAD = 48

    def __init__(self) -> None:
        self.bitmap = BitMap64()

    def clear(self) -> None:
        self.bitmap.clear()

    @property
    def pages(self) -> int:
        return len(self.bitmap)

    @property
    def ranges(self) -> int:
        return int(self.as_ranges()[0].size)

    def memory_bytes(self) -> int:
        stats = self.bitmap.get_statistics()
        return (
            stats["n_bytes_array_containers"]
            + stats["n_bytes_run_containers"]
            + stats["n_bytes_bitset_containers"]
            + stats["n_containers"] * self.CONTAINER_OVERHEAD
        )

    def as_ranges(self) -> tuple[np.ndarray, np.ndarray]:
        return _bitmap_ranges(self.bitmap)

    @staticmethod
    def _bitmap_of(starts: np.ndarray, ends: np.ndarray) -> BitMap64:
        bitmap = BitMap64()
        add = bitmap.add_range
        for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
            add(start, end)
        if starts.size > 64:
            # Many short ranges (pfn32 batches: single pages) land in array containers;
            # as runs they stay runs after the union (65 KiB -> 0.4 KiB for 2 GiB of pfn32
            # inflate, +4 us per batch).
            bitmap.run_optimize()
        return bitmap

    def update(self, starts: np.ndarray, ends: np.ndarray) -> None:
        add = self.bitmap.add_range
        for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
            add(start, end)

    def difference_update(self, starts: np.ndarray, ends: np.ndarray) -> None:
        remove = self.bitmap.remove_range
        for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
            remove(start, end)

    def add(self, starts: np.ndarray, ends: np.ndarray) -> np.ndarray | None:
        """``update``, returning which intervals were wholly in the set before (None: none).

        One C call per range builds the batch's bitmap; when it shares no page with the
        set (the usual fresh report or inflate) no per-range test is needed at all.
        """
        batch = self._bitmap_of(starts, ends)
        covered = None
        if self.bitmap and self.bitmap.intersect(batch):
            covered = self.covers(starts, ends)
        self.bitmap |= batch
        return covered

    def covers(self, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
        """Per interval: is every page of it in this set already?"""
        if not self.bitmap:
            return np.zeros(starts.size, dtype=bool)
        contains = self.bitmap.contains_range
        return np.fromiter(
            (contains(s, e) for s, e in zip(starts.tolist(), ends.tolist(), strict=True)),
            dtype=bool,
            count=starts.size,
        )

    def touches(self, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
        """Per interval: does it share a page with this set? One bulk test first."""
        if not self.bitmap or not self.bitmap.intersect(self._bitmap_of(starts, ends)):
            return np.zeros(starts.size, dtype=bool)
        cardinality = self.bitmap.range_cardinality
        return np.fromiter(
            (cardinality(s, e) > 0 for s, e in zip(starts.tolist(), ends.tolist(), strict=True)),
            dtype=bool,
            count=starts.size,
        )


def _bitmap_ranges(bitmap: BitMap64) -> tuple[np.ndarray, np.ndarray]:
    """The runs of a bitmap as (pfns, counts), without expanding huge sets to pages."""
    if not bitmap:
        return _EMPTY, _EMPTY
    if len(bitmap) <= _EXPAND_LIMIT:
        return pages_to_ranges(np.frombuffer(bitmap.to_array(), dtype=U64))
    # Huge sets: list one aligned window of pages at a time, skipping empty stretches
    # with next_set_bit and taking full windows whole, then join runs across windows.
    window = _EXPAND_LIMIT
    stop = bitmap.max() + 1
    pfns, counts = [], []
    position = bitmap.min()
    while True:
        low = position - position % window
        high = min(low + window, stop)
        span = BitMap64()
        span.add_range(low, high)
        part = bitmap & span
        if len(part) == high - low:
            pfns.append(np.array([low], dtype=U64))
            counts.append(np.array([high - low], dtype=U64))
        else:
            run_pfns, run_counts = pages_to_ranges(np.frombuffer(part.to_array(), dtype=U64))
            pfns.append(run_pfns)
            counts.append(run_counts)
        if high >= stop:
            break
        position = bitmap.next_set_bit(high)
    return coalesce_ranges(np.concatenate(pfns), np.concatenate(counts))


_EXPAND_LIMIT = 1 << 22  # pages; past this, walk runs instead of listing every page


class SetTracker(TrackerViews):
    """A tracker over a pluggable set structure (``page_set``), with the rules vectorized
    in numpy — the design before the one-pass kernel, kept to time the set structures."""

    #: The page-set class, picked by bench/tracker.py (IntervalSet is the measured alternative).
    page_set = RoaringPageSet

    def __init__(self, pages: int) -> None:
        if not 0 < pages <= MAX_PAGES:
            raise ValueError(f"a guest has 1..2**{PFN_BITS} pages, got {pages}")
        self._pages = int(pages)
        self._limit = U64(pages)
        self.reported = self.page_set()
        self.inflated = self.page_set()
        self.hinted = self.page_set()
        self.hint_command: int | None = None

    # --- commands (the views and the hinting command: tracker.TrackerViews) ----------

    def reset(self) -> None:
        """A new session: the guest re-reports and re-inflates everything."""
        self.reported.clear()
        self.inflated.clear()
        self.hinted.clear()
        self.hint_command = None

    # --- the hot path -----------------------------------------------------------------

    def apply(self, kind: str, pfns, counts, cmd_id: int | None = None) -> ApplyResult:
        """Validate and apply one decoded batch; never raises on what the guest sent.

        A clean batch (valid, sorted, no overlap — what a well-behaved guest sends) takes
        a fast path of a dozen numpy passes; anything else takes the general path.
        """
        if kind not in KINDS:
            raise ValueError(f"unknown batch kind {kind!r}")
        pfns = np.asarray(pfns).astype(U64, copy=False).ravel()
        counts = np.asarray(counts).astype(U64, copy=False).ravel()
        if pfns.shape != counts.shape:
            raise ValueError(f"{pfns.size} pfns but {counts.size} counts")
        result = ApplyResult(kind=kind, ranges=int(pfns.size))
        if not pfns.size:
            return result
        if kind == "hint" and (cmd_id is None or cmd_id != self.hint_command):
            result.pages = _total(counts)
            verdict = _Verdicts(counts)
            verdict.mark(np.arange(pfns.size), "stale")
            verdict.count(result)
            return result
        # The fast path: ends > pfns means every count >= 1 and no pfn + count wrapped
        # past 2**64; ends[i] <= pfns[i+1] means sorted and disjoint; then the last end
        # is the highest and bounds the whole batch.
        # (np.count_nonzero is a plain C loop; .all()/.any() cost ~3 us through ufunc
        # reduction machinery on arrays this small.)
        ends = pfns + counts
        if (
            not np.count_nonzero(ends <= pfns)
            and not np.count_nonzero(ends[:-1] > pfns[1:])
            and ends[-1] <= self._limit
        ):
            if kind in (REPORT, REUSE) and self.inflated.pages:
                conflict = self.inflated.touches(pfns, ends)
                if np.count_nonzero(conflict):
                    return self._general(result, kind, pfns, counts)
            result.accepted_pages = result.pages = int(counts.sum(dtype=U64))
            self._change(result, pfns, ends)
            return result
        return self._general(result, kind, pfns, counts)

    def _general(self, result, kind, pfns, counts) -> ApplyResult:
        """Every verdict of the module docstring, for batches with something to reject."""
        result.pages = _total(counts)
        verdict = _Verdicts(counts)
        # Valid iff 1 <= count <= limit - pfn: count - 1 wraps to 2**64-1 for a zero count,
        # and the room is 0 for pfn >= limit, so one comparison flags both.
        limit = self._limit
        bad = (counts - _ONE) >= (limit - np.minimum(pfns, limit))
        if bad.any():
            zero = counts == _ZERO
            verdict.mark(np.flatnonzero(zero), "zero-length")
            verdict.mark(np.flatnonzero(bad & ~zero), "out-of-range")
            index = np.flatnonzero(~bad)
            starts = pfns[index]
        else:
            index, starts = None, pfns
        if starts.size > 1 and not (starts[1:] >= starts[:-1]).all():
            order = np.argsort(starts, kind="stable")
            index = order if index is None else index[order]
            starts = starts[order]
        ends = starts + (counts if index is None else counts[index])  # no wrap: count <= room
        if starts.size > 1:
            reach = np.maximum.accumulate(ends)
            overlap = np.empty(starts.size, dtype=bool)
            overlap[0] = False
            np.less(starts[1:], reach[:-1], out=overlap[1:])
            if overlap.any():
                index, starts, ends = self._drop(verdict, "overlap", overlap, index, starts, ends)
        if kind in (REPORT, REUSE) and starts.size and self.inflated.pages:
            conflict = self.inflated.touches(starts, ends)
            if conflict.any():
                index, starts, ends = self._drop(verdict, "conflict", conflict, index, starts, ends)
        verdict.count(result)
        if starts.size:
            result.accepted_pages = int((ends - starts).sum(dtype=U64))
            self._change(result, starts, ends)
        return result

    @staticmethod
    def _drop(verdict, reason, mask, index, starts, ends):
        positions = np.flatnonzero(mask)
        verdict.mark(positions if index is None else index[positions], reason)
        keep = ~mask
        return (np.flatnonzero(keep) if index is None else index[keep]), starts[keep], ends[keep]

    def _change(self, result: ApplyResult, starts: np.ndarray, ends: np.ndarray) -> None:
        """Change the sets with the accepted ranges (sorted, disjoint)."""
        kind = result.kind
        if kind == "report":
            result.discard = _given_back(self.reported.add(starts, ends), starts, ends)
        elif kind == "reuse":
            self.reported.difference_update(starts, ends)
        elif kind == INFLATE:
            result.discard = _given_back(self.inflated.add(starts, ends), starts, ends)
            if self.reported.pages:
                self.reported.difference_update(starts, ends)
        elif kind == "deflate":
            self.inflated.difference_update(starts, ends)
        else:  # hint
            self.hinted.update(starts, ends)


def _given_back(covered, starts, ends) -> tuple[np.ndarray, np.ndarray]:
    """Accepted ranges that were not wholly in the set before, merged, as (pfns, counts)."""
    if covered is not None:
        fresh = ~covered
        starts, ends = starts[fresh], ends[fresh]
    starts, ends = _join_touching(starts, ends)
    return starts, ends - starts


class _Verdicts:
    """Rejections of one batch by reason, filled only when something is rejected."""

    __slots__ = ("counts", "found")

    def __init__(self, counts: np.ndarray) -> None:
        self.counts = counts
        self.found: list[tuple[str, np.ndarray]] = []

    def mark(self, positions: np.ndarray, reason: str) -> None:
        if positions.size:
            self.found.append((reason, positions))

    def count(self, result: ApplyResult) -> None:
        for reason, positions in self.found:
            result.rejected[reason] = _total(self.counts[positions])
            result.rejected_ranges[reason] = int(positions.size)
        result.rejected_pages = sum(result.rejected.values())


class RoaringTracker(SetTracker):
    """The pyroaring tracker whatever the guest's size (tests and benches pick it by name)."""


