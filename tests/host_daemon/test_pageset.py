"""The flat-bitmap kernels (host_daemon/pageset.py) against a numpy array of booleans."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from host_daemon import pageset
from shared.ranges import pages_to_ranges

pytestmark = pytest.mark.skipif(not pageset.AVAILABLE, reason="numba not installed")

PAGES = 640  # ten words
operation = st.tuples(
    st.sampled_from(["set", "clear"]),
    st.integers(0, PAGES - 1),
    st.integers(1, PAGES),
)


@settings(max_examples=200, deadline=None)
@given(ops=st.lists(operation, max_size=30))
def test_word_ops_match_a_bool_array(ops):
    bits, _ = pageset.new_state(PAGES)
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
    bits, state = pageset.new_state(1 << 12)
    out = np.empty(4, dtype=np.uint64)
    pfns = np.array([130, 1000], dtype=np.uint64)
    counts = np.array([60, 24], dtype=np.uint64)
    assert pageset.apply_batch(0, pfns, counts, bits, state, out) == 2
    assert int(state[0]) == 84
    assert (int(state[1]), int(state[2])) == (130 // 64, 1024 // 64)
    assert pageset.span_bytes(state, 0) == (1024 // 64 - 130 // 64) * 8
    starts, lengths = pageset.set_runs(bits[0], int(state[1]), int(state[2]))
    assert starts.tolist() == [130, 1000] and lengths.tolist() == [60, 24]
    pageset.clear_set(bits, state, 0)
    assert not bits.any() and pageset.span_bytes(state, 0) == 0 and int(state[0]) == 0


def test_discard_ranges_join_when_touching():
    bits, state = pageset.new_state(1 << 12)
    out = np.empty(8, dtype=np.uint64)
    pfns = np.array([0, 64, 200, 128], dtype=np.uint64)  # unsorted: sorted in the kernel
    counts = np.array([64, 64, 8, 64], dtype=np.uint64)
    k = pageset.apply_batch(0, pfns, counts, bits, state, out)
    assert (out[:k].tolist(), out[4 : 4 + k].tolist()) == ([0, 200], [192, 8])
    assert int(state[pageset.ACCEPTED]) == 200 and int(state[pageset.REJECTED]) == 0
