"""The bench's set trackers answer like the daemon's on the batches the bench feeds them
(clean: sorted, disjoint, in range), through the same views and the same ApplyResult — so
bench/tracker.py compares set structures, not two different rule books."""

from __future__ import annotations

import numpy as np
import pytest

from bench.tracker_alternatives import IntervalSet, RoaringPageSet, SetTracker
from host_daemon.tracker import ApplyResult, GuestTracker

PAGES = 1 << 16
BATCHES = [  # (kind, pfns, counts, hinting command)
    ("report", [0, 1024, 9000], [512, 5000, 1], None),
    ("inflate", [20000, 30000], [512, 64], None),
    ("reuse", [1024], [100], None),
    ("report", [20100, 40000], [10, 8], None),  # conflicts with the balloon: the rule is the same
    ("deflate", [30000], [64], None),
    ("hint", [50000], [512], 7),
    ("hint", [60000], [8], 6),  # stale command
]


def run(tracker) -> list[ApplyResult]:
    tracker.set_hint_command(7)
    results = []
    for kind, pfns, counts, cmd in BATCHES:
        results.append(tracker.apply(kind, np.array(pfns, np.uint64), np.array(counts, np.uint64), cmd))
    return results


@pytest.mark.parametrize("page_set", [RoaringPageSet, IntervalSet])
def test_a_set_tracker_answers_like_the_daemons_tracker(page_set):
    alternative = type("Alternative", (SetTracker,), {"page_set": page_set})(PAGES)
    daemon = GuestTracker(PAGES)
    for mine, theirs in zip(run(alternative), run(daemon), strict=True):
        assert type(mine) is ApplyResult
        assert (mine.accepted_pages, mine.rejected_pages, mine.rejected) == (
            theirs.accepted_pages, theirs.rejected_pages, theirs.rejected)
    for view in ("reported_ranges", "inflated_ranges", "hinted_ranges"):
        for mine, theirs in zip(getattr(alternative, view)(), getattr(daemon, view)(), strict=True):
            assert mine.tolist() == theirs.tolist(), view
    assert (alternative.pages, alternative.reported_pages, alternative.inflated_pages, alternative.hinted_pages) == (
        daemon.pages, daemon.reported_pages, daemon.inflated_pages, daemon.hinted_pages)
    assert alternative.hinted_pages == 512
