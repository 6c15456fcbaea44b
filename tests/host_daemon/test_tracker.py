"""GuestTracker against a plain Python-set model of the documented rules.

Every model test runs on each implementation: the compiled flat bitmaps (the default for
guests up to ``pageset.FLAT_LIMIT`` pages), pyroaring (bigger guests, numba missing or
``BALLOON_TRACKER=roaring``) and the interval arrays kept as the measured alternative.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from host_daemon import pageset
from host_daemon.tracker import MAX_PAGES, GuestTracker
from shared.ranges import pages_to_ranges

U64_MAX = (1 << 64) - 1


class Model:
    """The module docstring's rules, one range and one page at a time."""

    def __init__(self, pages: int) -> None:
        self.pages = pages
        self.reported: set[int] = set()
        self.inflated: set[int] = set()
        self.hinted: set[int] = set()
        self.command: int | None = None

    def apply(self, kind, pfns, counts, cmd_id=None):
        rejected: dict[str, int] = {}
        ranges = list(zip(pfns, counts, strict=True))

        def reject(reason, count):
            rejected[reason] = rejected.get(reason, 0) + count

        if kind == "hint" and (cmd_id is None or cmd_id != self.command):
            for _, count in ranges:
                reject("stale", count)
            return rejected, set()
        accepted = set()
        fresh = {"report": self.reported, "inflate": self.inflated}.get(kind, set())
        discard = set()
        for pfn, count in ranges:  # in batch order; only accepted ranges count for overlap
            if count == 0:
                reject("zero-length", 0)
                continue
            if pfn >= 2**52 or pfn + count > self.pages:
                reject("out-of-range", count)
                continue
            pages = set(range(pfn, pfn + count))
            if pages & accepted:
                reject("overlap", count)
            elif kind in ("report", "reuse") and pages & self.inflated:
                reject("conflict", count)
            else:
                accepted |= pages
                if kind in ("report", "inflate") and not pages <= fresh:
                    discard |= pages  # whole ranges not wholly given back before
        if kind == "report":
            self.reported |= accepted
        elif kind == "reuse":
            self.reported -= accepted
        elif kind == "inflate":
            self.inflated |= accepted
            self.reported -= accepted
        elif kind == "deflate":
            self.inflated -= accepted
        else:
            self.hinted |= accepted
        return rejected, discard


def pages_of(pfns, counts) -> set[int]:
    return {int(p) + i for p, c in zip(pfns, counts, strict=True) for i in range(int(c))}


def check_same(tracker: GuestTracker, model: Model) -> None:
    assert pages_of(*tracker.reported_ranges()) == model.reported
    assert pages_of(*tracker.inflated_ranges()) == model.inflated
    assert pages_of(*tracker.hinted_ranges()) == model.hinted
    assert tracker.reported_pages == len(model.reported)
    assert tracker.inflated_pages == len(model.inflated)
    assert tracker.hinted_pages == len(model.hinted)
    for starts, counts in (tracker.reported_ranges(), tracker.inflated_ranges()):
        ends = starts + counts
        assert np.all(counts > 0)
        assert np.all(starts[1:] > ends[:-1])  # sorted, disjoint, not touching


PAGES = 96
batch = st.lists(
    st.tuples(
        st.one_of(st.integers(0, PAGES + 4), st.sampled_from([2**52, U64_MAX - 1, U64_MAX])),
        st.one_of(st.integers(0, 12), st.sampled_from([U64_MAX, 2**63, PAGES])),
    ),
    max_size=10,
)


@st.composite
def clean_batch(draw):
    """Sorted, disjoint, in-range ranges: what a well-behaved guest sends (the fast path)."""
    cuts = sorted(draw(st.sets(st.integers(0, PAGES), max_size=12)))
    pairs = list(zip(cuts[::2], cuts[1::2], strict=False))
    return [(start, end - start) for start, end in pairs if end > start]


step = st.tuples(
    st.sampled_from(["report", "reuse", "inflate", "deflate", "hint", "hint-start", "hint-stop"]),
    st.one_of(batch, clean_batch()),
    st.integers(0, 3),
)


@settings(max_examples=300, deadline=None)
@given(steps=st.lists(step, max_size=25))
def test_tracker_matches_the_set_model(steps):
    run_model(GuestTracker(PAGES), Model(PAGES), steps)


def run_model(tracker, model, steps):
    for kind, ranges, cmd in steps:
        if kind == "hint-start":
            tracker.set_hint_command(cmd)
            if cmd != model.command:
                model.hinted.clear()
            model.command = cmd
            continue
        if kind == "reset":
            tracker.reset()
            model.reported.clear()
            model.inflated.clear()
            model.hinted.clear()
            model.command = None
            continue
        if kind == "hint-stop":
            tracker.set_hint_command(None)
            model.command = None
            continue
        pfns = np.array([r[0] for r in ranges], dtype=np.uint64)
        counts = np.array([r[1] for r in ranges], dtype=np.uint64)
        result = tracker.apply(kind, pfns, counts, cmd_id=cmd)
        rejected, discard = model.apply(kind, [r[0] for r in ranges], [r[1] for r in ranges], cmd)
        assert result.rejected == rejected
        assert result.rejected_pages == sum(rejected.values())
        assert result.pages == sum(r[1] for r in ranges)
        assert result.accepted_pages + result.rejected_pages == result.pages
        assert result.ranges == len(ranges)
        assert sum(result.rejected_ranges.values()) <= len(ranges)
        assert pages_of(*result.discard) == discard
        assert result.discard_pages == len(discard)
        if result.discard[0].size > 1:  # merged where touching (in batch order)
            assert np.all(result.discard[0][1:] != result.discard[0][:-1] + result.discard[1][:-1])
        check_same(tracker, model)


@pytest.fixture
def make():
    return GuestTracker


def apply(tracker, kind, ranges, cmd_id=None):
    pfns = np.array([p for p, _ in ranges], dtype=np.uint64)
    counts = np.array([c for _, c in ranges], dtype=np.uint64)
    return tracker.apply(kind, pfns, counts, cmd_id=cmd_id)


def test_exact_counts_by_reason(make):
    tracker = make(1000)
    apply(tracker, "inflate", [(900, 10)])
    result = apply(
        tracker,
        "report",
        [
            (0, 10),  # accepted
            (5, 10),  # overlap with (0, 10): 10 pages
            (15, 5),  # touches (5, 10), which was rejected and does not count: accepted
            (995, 6),  # one page past the end: out-of-range, 6 pages
            (999, 1),  # last page: accepted
            (20, 0),  # zero-length
            (905, 3),  # inside the balloon: conflict, 3 pages
            (2**52, 1),  # past 2**52: out-of-range
        ],
    )
    assert result.rejected == {"overlap": 10, "out-of-range": 7, "zero-length": 0, "conflict": 3}
    assert result.rejected_ranges == {
        "overlap": 1,
        "out-of-range": 2,
        "zero-length": 1,
        "conflict": 1,
    }
    assert result.rejected_pages == 20
    assert result.accepted_pages == 16
    assert tracker.reported_pages == 16
    assert pages_of(*tracker.reported_ranges()) == set(range(10)) | set(range(15, 20)) | {999}
    assert [list(a) for a in tracker.reported_ranges()] == [[0, 15, 999], [10, 5, 1]]


def test_counts_that_would_wrap_are_out_of_range(make):
    tracker = make(1 << 20)
    result = apply(tracker, "report", [(U64_MAX, 2), (10, U64_MAX), (2**52 - 1, 2**12 + 1)])
    assert result.rejected_ranges == {"out-of-range": 3}
    assert result.rejected_pages == 2 + U64_MAX + 2**12 + 1  # exact, beyond uint64
    assert result.ack_rejected_pages == U64_MAX
    assert tracker.reported_pages == 0


def test_repeats_are_idempotent_and_discard_only_fresh_ranges(make):
    tracker = make(4096)
    first = apply(tracker, "report", [(0, 512), (1024, 512)])
    assert pages_of(*first.discard) == set(range(512)) | set(range(1024, 1536))
    again = apply(tracker, "report", [(0, 512), (512, 512), (1024, 256), (1280, 512)])
    assert again.rejected_pages == 0 and again.accepted_pages == 1792
    # (0, 512) and (1024, 256) were wholly reported: not discarded again; (1280, 512) was
    # half reported: punched whole; (512, 512) is new.
    assert [list(a) for a in again.discard] == [[512, 1280], [512, 512]]
    assert apply(tracker, "report", [(0, 1792)]).discard_pages == 0
    assert tracker.reported_pages == 1792
    apply(tracker, "reuse", [(100, 10)])
    assert tracker.reported_pages == 1782
    assert apply(tracker, "reuse", [(100, 10)]).rejected_pages == 0  # reusing again: no-op
    assert apply(tracker, "reuse", [(100, 10)]).discard_pages == 0


def test_inflate_moves_reported_pages_into_the_balloon(make):
    tracker = make(4096)
    apply(tracker, "report", [(0, 1024)])
    result = apply(tracker, "inflate", [(512, 1024)])
    assert pages_of(*result.discard) == set(range(512, 1536))
    assert tracker.reported_pages == 512
    assert tracker.inflated_pages == 1024
    assert apply(tracker, "report", [(600, 1)]).rejected == {"conflict": 1}
    assert apply(tracker, "reuse", [(1535, 2)]).rejected == {"conflict": 2}
    assert apply(tracker, "inflate", [(512, 1024)]).discard_pages == 0  # repeat
    apply(tracker, "deflate", [(512, 512)])
    assert tracker.inflated_pages == 512
    assert apply(tracker, "report", [(600, 1)]).rejected_pages == 0


def test_hints_follow_the_command_id(make):
    tracker = make(4096)
    assert apply(tracker, "hint", [(0, 10)], cmd_id=1).rejected == {"stale": 10}
    tracker.set_hint_command(1)
    assert apply(tracker, "hint", [(0, 10)], cmd_id=1).rejected_pages == 0
    assert apply(tracker, "hint", [(20, 10)], cmd_id=0).rejected == {"stale": 10}
    assert tracker.hinted_pages == 10
    tracker.set_hint_command(None)  # done: the set stays readable, new hints are stale
    assert tracker.hinted_pages == 10
    assert apply(tracker, "hint", [(30, 1)], cmd_id=1).rejected == {"stale": 1}
    tracker.set_hint_command(2)
    assert tracker.hinted_pages == 0
    result = apply(tracker, "hint", [(30, 1)], cmd_id=2)
    assert result.discard_pages == 0 and tracker.hinted_pages == 1
    assert tracker.reported_pages == 0


def test_guest_size_is_bounded():
    with pytest.raises(ValueError):
        GuestTracker(0)
    with pytest.raises(ValueError):
        GuestTracker(MAX_PAGES + 1)
    with pytest.raises(ValueError):
        GuestTracker(10).apply("bogus", [], [])


def test_reset_and_memory(make):
    tracker = make(1 << 21)
    pages = np.arange(0, 1 << 21, 2, dtype=np.uint64)  # every other page: worst case
    pfns, counts = pages_to_ranges(pages)
    apply_result = tracker.apply("report", pfns, counts)
    assert apply_result.accepted_pages == 1 << 20
    assert tracker.reported.ranges == 1 << 20
    # Roaring bitset containers, or the flat bitmap: about one bit per guest page.
    assert (1 << 21) // 8 <= tracker.memory_bytes() <= (1 << 21) // 4
    tracker.reset()
    assert tracker.reported_pages == 0 and tracker.memory_bytes() == 0


def test_accepts_plain_integer_arrays(make):
    tracker = make(100)
    result = tracker.apply("report", [1, 5], [2, 3])
    assert result.accepted_pages == 5
    with pytest.raises(ValueError):
        tracker.apply("report", [1], [1, 2])


def test_listing_a_huge_set_window_by_window(make):
    """Roaring lists past 2**22 pages per window, the bitmap word by word: runs that
    cross windows or words join."""
    window = 1 << 22
    ranges = [(0, 2 * window), (2 * window + 5, 1), (2 * window + 7, 1), (3 * window - 10, 20)]
    tracker = make(1 << 30)
    apply(tracker, "report", ranges)
    assert tracker.reported_pages == 2 * window + 22
    starts, counts = tracker.reported_ranges()
    assert list(zip(starts.tolist(), counts.tolist(), strict=True)) == ranges


WIDE = 300  # pages: several words, the last one partial
wide_batch = st.lists(st.tuples(st.integers(0, WIDE + 70), st.integers(0, 200)), max_size=8)
wide_step = st.tuples(
    st.sampled_from(["report", "reuse", "inflate", "deflate", "hint", "hint-start", "reset"]),
    wide_batch,
    st.integers(0, 1),
)


@settings(max_examples=150, deadline=None)
@given(steps=st.lists(wide_step, max_size=20))
def test_ranges_across_words_match_the_set_model(steps):
    """Ranges that start, end and span inside and across 64-page words, and resets."""
    run_model(GuestTracker(WIDE), Model(WIDE), steps)


def test_overlap_is_judged_in_batch_order():
    """docs/PROTOCOL.md §8: the later range is the overlap, whatever the PFN order."""
    tracker = GuestTracker(1 << 16)
    result = apply(tracker, "report", [(3000, 10), (2995, 10)])
    assert result.rejected == {"overlap": 10} and pages_of(*tracker.reported_ranges()) == set(range(3000, 3010))
    # out of address order but disjoint: nothing to reject
    assert apply(tracker, "report", [(9000, 8), (100, 8), (5000, 8)]).rejected_pages == 0
    # a rejected range does not count against later ones
    result = apply(tracker, "inflate", [(20000, 10), (20005, 10), (20012, 3)])
    assert result.rejected == {"overlap": 10} and tracker.inflated_pages == 13
    # the scratch row is empty again: the same ranges in the next batch are no overlap
    assert apply(tracker, "report", [(2995, 5)]).rejected_pages == 0


def test_bitmap_at_its_size_limit():
    """The last pages of the largest guest (2**32 pages): no off-by-one at the top."""
    tracker = GuestTracker(pageset.FLAT_LIMIT)
    top = pageset.FLAT_LIMIT
    result = apply(tracker, "report", [(top - 70, 70), (2**31 - 1, 2), (top - 71, 1)])
    assert result.rejected_pages == 0 and tracker.reported_pages == 73
    assert [list(a) for a in tracker.reported_ranges()] == [[2**31 - 1, top - 71], [2, 71]]
    assert apply(tracker, "inflate", [(top - 1, 2)]).rejected == {"out-of-range": 2}
    assert tracker.memory_bytes() < 1 << 30  # the written span, not the 512 MiB reserved
    with pytest.raises(ValueError):
        GuestTracker(pageset.FLAT_LIMIT + 1)


def test_the_same_rules_interpreted_without_numba():
    """BALLOON_TRACKER=python runs the same loops as plain Python (a fresh interpreter)."""
    code = (
        "from host_daemon import tracker;"
        "assert not tracker.load_kernels();"
        "t = tracker.GuestTracker(1 << 12);"
        "r = t.apply('report', [3000, 2995, 64], [10, 10, 4000]);"
        "print(r.rejected, t.reported_pages, [a.tolist() for a in t.reported_ranges()])"
    )
    env = dict(os.environ, BALLOON_TRACKER="python")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.split("\n")[0] == "{'overlap': 4010} 10 [[3000], [10]]"
