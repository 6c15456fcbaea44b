"""Free-memory layouts and the pre-built batch payloads balloon-load sends."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guest_agent.load.layout import MAX_ORDER_PAGES, free_bitmap, free_layout, split_runs
from guest_agent.load.payloads import build_pool
from shared.ranges import decode_pfn32, decode_ranges


@given(pages=st.integers(2, 5000), free=st.floats(0.05, 0.95), frag=st.floats(0, 1), seed=st.integers(0, 99))
@settings(max_examples=150, deadline=None)
def test_layout_is_sorted_disjoint_and_inside_ram(pages, free, frag, seed):
    pfns, counts = free_layout(pages, free, frag, seed)
    assert counts.min() >= 1
    assert int(counts.sum()) == max(1, int(pages * free))
    assert int(pfns[-1] + counts[-1]) <= pages
    assert (pfns[1:] > pfns[:-1] + counts[:-1]).all()  # never touching: runs are maximal
    bitmap = free_bitmap(pages, pfns, counts)
    assert int(bitmap.sum()) == int(counts.sum())


def test_fragmentation_spans_one_run_to_single_pages():
    assert free_layout(1 << 16, 0.5, 0.0)[0].size == 1
    pfns, counts = free_layout(1 << 16, 0.5, 1.0)
    assert (counts == 1).all() and pfns.size == 1 << 15
    middle = free_layout(1 << 16, 0.5, 0.01)[0].size
    assert 200 < middle < 450  # about one run per 100 free pages


def test_split_runs_caps_blocks_at_the_largest_buddy_order():
    pfns, counts = split_runs(np.array([0, 5000], np.uint64), np.array([2500, 1], np.uint64))
    assert counts.tolist() == [MAX_ORDER_PAGES, MAX_ORDER_PAGES, 452, 1]
    assert pfns.tolist() == [0, 1024, 2048, 5000]


@pytest.mark.parametrize("frag", [0.0, 0.1, 1.0])
def test_ranges52_pool_batches_are_valid_for_a_tracker(frag):
    pages = 1 << 15
    pool = build_pool(pages, 32, frag, "ranges52", pool_size=64)
    assert len(pool) >= 1
    for payload, ranges, total in zip(pool.payloads, pool.ranges, pool.pages, strict=True):
        pfns, counts = decode_ranges(payload)
        assert pfns.size == ranges <= 32 and int(counts.sum()) == total
        assert int((pfns + counts).max()) <= pages
        order = np.argsort(pfns)
        assert (pfns[order][1:] >= (pfns + counts)[order][:-1]).all()  # no overlap inside a batch
    assert max(pool.ranges) == 32


def test_pfn32_pool_holds_at_most_256_pfns():
    pool = build_pool(1 << 15, 1000, 0.5, "pfn32", pool_size=8)
    for payload in pool.payloads:
        pfns, counts = decode_pfn32(payload)
        assert pfns.size <= 256 and (counts == 1).all() and int(pfns.max()) < 1 << 15
    assert pool.ranges[0] == 256
