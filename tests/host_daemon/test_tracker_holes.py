"""``not-ram``: ranges in a hole of the guest's RAM map (QEMU's PCI hole) are rejected whole."""

from __future__ import annotations

import numpy as np

from host_daemon.tracker import GuestTracker
from shared.vocabulary import INFLATE, REPORT

U64 = np.uint64
HOLE = (600, 800)  # a scaled-down PCI hole: guest pages 600..799 are no RAM


def batch(*ranges):
    return np.array([p for p, _ in ranges], dtype=U64), np.array([c for _, c in ranges], dtype=U64)


def test_ranges_touching_the_hole_are_not_ram_and_the_rest_applies():
    tracker = GuestTracker(1000, holes=(HOLE,))
    result = tracker.apply(REPORT, *batch((10, 5), (598, 4), (700, 1), (800, 10), (995, 10), (0, 0)))
    assert result.rejected == {"not-ram": 5, "out-of-range": 10, "zero-length": 0}
    assert result.rejected_ranges == {"not-ram": 2, "out-of-range": 1, "zero-length": 1}
    assert result.accepted_pages == 15 and result.ranges == 6
    assert result.rejected_pages == 15
    assert tracker.reported_pages == 15
    assert [r.tolist() for r in result.discard] == [[10, 800], [5, 10]]


def test_a_batch_wholly_in_the_hole_changes_nothing():
    tracker = GuestTracker(1000, holes=(HOLE,))
    result = tracker.apply(INFLATE, *batch((600, 200)))
    assert result.rejected == {"not-ram": 200} and result.accepted_pages == 0
    assert tracker.inflated_pages == 0 and result.discard[0].size == 0


def test_without_holes_the_same_ranges_are_ram():
    tracker = GuestTracker(1000)
    result = tracker.apply(REPORT, *batch((598, 4), (700, 1)))
    assert result.rejected_pages == 0 and tracker.reported_pages == 5
