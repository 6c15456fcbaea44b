"""The flat-bitmap kernels (host_daemon/pageset.py) against a numpy array of booleans."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from host_daemon import pageset, tracker
from shared.ranges import pages_to_ranges

tracker.load_kernels()  # compiled when numba is there; the same loops interpreted otherwise

PAGES = 640  # ten words
operation = st.tuples(
    st.sampled_from(["set", "clear"]),
    st.integers(0, PAGES - 1),
    st.integers(1, PAGES),
)


@settings(max_examples=200, deadline=None)
@given(ops=st.lists(operation, max_size=30))
def test_word_ops_match_a_bool_array(ops):
    bits, _ = pageset.new_sets(PAGES)
    row = bits[0]
    model = np.zeros(PAGES, dtype=bool)
    for op, start, count in ops:
        end = min(start + count, PAGES)
        before = int(model[start:end].sum())
        assert pageset.any_in_range(row, np.uint64(start), np.uint64(end)) == (before > 0)
        if op == "set":
            changed = pageset.set_range(row, np.uint64(start), np.uint64(end))
            assert changed == (end - start) - before
            model[start:end] = True
        else:
            changed = pageset.clear_range(row, np.uint64(start), np.uint64(end))
            assert changed == before
            model[start:end] = False
        unpacked = np.unpackbits(row.view(np.uint8), bitorder="little").astype(bool)
        assert np.array_equal(unpacked[:PAGES], model)
        pfns, counts = pageset.set_runs(row, 0, row.size)
        expected = pages_to_ranges(np.flatnonzero(model).astype(np.uint64))
        assert pfns.tolist() == expected[0].tolist()
        assert counts.tolist() == expected[1].tolist()


def test_runs_within_a_span():
    """Listing reads only the written span, and a run ending at the span's last word ends there."""
    guest = tracker.GuestTracker(1 << 12)
    assert guest.apply("report", np.array([130, 1000], np.uint64), np.array([60, 24], np.uint64)).accepted_pages == 84
    sets = guest._sets
    assert int(sets[0]) == 84
    assert (int(sets[1]), int(sets[2])) == (130 // 64, 1024 // 64)
    assert pageset.span_bytes(sets, 0) == (1024 // 64 - 130 // 64) * 8
    starts, lengths = guest.reported_ranges()
    assert starts.tolist() == [130, 1000] and lengths.tolist() == [60, 24]
    pageset.clear_set(guest._bits, sets, 0)
    assert not guest._bits.any() and pageset.span_bytes(sets, 0) == 0 and int(sets[0]) == 0


def test_discard_ranges_join_when_touching():
    guest = tracker.GuestTracker(1 << 12)
    pfns = np.array([0, 64, 200, 128], dtype=np.uint64)  # out of order: joined in batch order
    counts = np.array([64, 64, 8, 64], dtype=np.uint64)
    result = guest.apply("report", pfns, counts)
    assert [a.tolist() for a in result.discard] == [[0, 200, 128], [128, 8, 64]]
    assert result.accepted_pages == 200 and result.rejected_pages == 0
