"""Buddy allocator: unit tests for the rules and errors, a hypothesis state machine for the rest."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
)

from guest_agent.memory.buddy import BuddyAllocator
from shared.ranges import expand_pages


def free_block_set(a: BuddyAllocator) -> set[tuple[int, int]]:
    pfns, orders = a.free_blocks()
    return set(zip(pfns.tolist(), orders.tolist(), strict=True))


# ------------------------------------------------------------------ layout, alloc, free
def test_fresh_allocator_holds_maximal_aligned_blocks():
    a = BuddyAllocator(1000, max_order=4)  # 62 blocks of 16, then 8 (=992..999)
    assert free_block_set(a) == {(p, 4) for p in range(0, 992, 16)} | {(992, 3)}
    assert a.free_pages == a.total_pages == 1000
    a.check()


def test_alloc_splits_and_free_merges_back():
    a = BuddyAllocator(16, max_order=4)
    p = a.alloc(0)
    assert p == 0
    # expand(): 16 -> 8 + 4 + 2 + 1 + the page handed out
    assert free_block_set(a) == {(8, 3), (4, 2), (2, 1), (1, 0)}
    a.free(p, 0)
    assert free_block_set(a) == {(0, 4)}
    a.check()


def test_alloc_returns_none_when_no_block_is_large_enough():
    a = BuddyAllocator(8, max_order=3)
    assert a.alloc(3) == 0
    assert a.alloc(0) is None
    a.free(0, 3)
    assert a.alloc(2) is not None and a.alloc(2) is not None and a.alloc(0) is None


@pytest.mark.parametrize("order", [-1, 11, 1.5, "2", None])
def test_bad_order_raises(order):
    a = BuddyAllocator(64)
    with pytest.raises(ValueError):
        a.alloc(order)
    with pytest.raises(ValueError):
        a.free(0, order)
    with pytest.raises(ValueError):
        a.isolate_unreported(order, 1)


def test_free_errors():
    a = BuddyAllocator(64, max_order=3)
    p = a.alloc(2)
    with pytest.raises(ValueError, match="aligned"):
        a.free(p + 1, 2)
    with pytest.raises(ValueError, match="outside"):
        a.free(64, 0)
    with pytest.raises(ValueError, match="outside"):
        a.free(-4, 0)
    with pytest.raises(ValueError, match="order"):
        a.free(p, 1)  # allocated with order 2
    with pytest.raises(ValueError, match="not an allocated"):
        a.free(p + 8, 0)  # never allocated
    a.free(p, 2)
    with pytest.raises(ValueError, match="double free"):
        a.free(p, 2)
    a.check()


def test_constructor_errors():
    with pytest.raises(ValueError):
        BuddyAllocator(0)
    with pytest.raises(ValueError):
        BuddyAllocator(10, max_order=-1)


def test_alloc_largest():
    a = BuddyAllocator(64, max_order=4)
    assert a.alloc_largest(0) is None
    assert a.alloc_largest(100) == (0, 4)  # capped at max_order
    assert a.alloc_largest(5) == (16, 2)  # 4 <= 5 < 8, splits a 16-block
    pfn, order = a.alloc_largest(64)
    assert order == 4  # a whole free 16-block still exists
    rest = a.free_pages
    got = 0
    while (r := a.alloc_largest(1 << 10)) is not None:
        got += 1 << r[1]
    assert got == rest and a.free_pages == 0
    a.check()


def test_eight_gib_guest_has_no_per_page_objects():
    import tracemalloc

    tracemalloc.start()
    a = BuddyAllocator(2 * 1024 * 1024)
    current, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert a.free_blocks_by_order()[10] == 2048
    assert current < 8 * 2**20, current  # two byte maps (4 MiB) + 2048 set entries


# ------------------------------------------------------------------ reporting rules
def test_isolated_blocks_are_not_allocatable_and_count_separately():
    a = BuddyAllocator(32, max_order=3)
    pfns, orders = a.isolate_unreported(3, 3)
    assert orders.tolist() == [3, 3, 3] and a.isolated_pages == 24 and a.free_pages == 8
    assert a.alloc(3) not in set(pfns.tolist())
    assert a.alloc(0) is None
    assert a.free_pages + a.allocated_pages + a.isolated_pages == 32
    with pytest.raises(ValueError):
        a.return_isolated(pfns[:1], np.array([2], np.uint64), reported=True)  # wrong order
    with pytest.raises(ValueError):
        a.return_isolated(np.r_[pfns[:1], pfns[:1]], np.r_[orders[:1], orders[:1]], reported=True)
    a.return_isolated(pfns, orders, reported=False)
    assert a.isolated_pages == 0 and a.reported_pages == 0
    a.check()


def test_isolate_respects_min_order_and_max_blocks():
    a = BuddyAllocator(64, max_order=4)
    a.alloc(0)  # leaves 1,2,4,8 pieces and three 16-blocks
    pfns, orders = a.isolate_unreported(2, 2)
    assert orders.tolist() == [2, 3]  # lowest order first, as page_reporting_process_zone
    pfns2, orders2 = a.isolate_unreported(2, 100)
    assert sorted(orders2.tolist()) == [4, 4, 4]
    assert a.isolate_unreported(2, 100)[0].size == 0
    a.check()


def test_reported_block_that_does_not_merge_stays_reported():
    a = BuddyAllocator(32, max_order=3)
    pfns, orders = a.isolate_unreported(3, 1)
    a.return_isolated(pfns, orders, reported=True)
    assert a.reported_pages == 8
    more, _ = a.isolate_unreported(3, 100)
    assert pfns[0] not in set(more.tolist())  # already reported: skipped
    a.return_isolated(more, _, reported=False)
    a.check()


def test_merge_clears_reported_flag_even_when_both_halves_were_reported():
    # page_reporting_drain: flagged only "if page was not commingled with another page"
    a = BuddyAllocator(16, max_order=4)
    lo, hi = a.alloc(3), a.alloc(3)
    a.free(lo, 3)
    iso_lo = a.isolate_unreported(3, 1)
    a.free(hi, 3)  # buddy of an isolated block: no merge while isolated
    iso_hi = a.isolate_unreported(3, 1)
    a.return_isolated(*iso_lo, reported=True)
    assert a.reported_pages == 8 and a.isolate_unreported(3, 9)[0].size == 0
    a.return_isolated(*iso_hi, reported=True)  # merges with the reported lower half
    assert a.reported_pages == 16  # the host holds all 16 pages ...
    again = a.isolate_unreported(3, 9)
    assert again[0].tolist() == [0] and again[1].tolist() == [
        4
    ]  # ... but the merged block is unflagged
    a.return_isolated(*again, reported=True)
    assert a.reported_pages == 16 and a.isolate_unreported(0, 9)[0].size == 0
    a.check()


def test_free_next_to_reported_block_merges_unflagged_and_reuse_is_exact():
    a = BuddyAllocator(16, max_order=4)
    lo = a.alloc(3)
    pfns, orders = a.isolate_unreported(3, 1)  # the upper half, 8..15
    a.return_isolated(pfns, orders, reported=True)
    assert a.reported_pages == 8
    a.free(lo, 3)  # merges 0..7 (unreported) with 8..15 (reported): one unflagged 16-block
    assert free_block_set(a) == {(0, 4)}
    assert a.reported_pages == 8
    # take the whole block: only the 8 pages the host holds are REUSE
    assert a.alloc(4) == 0
    assert a.reported_pages == 0
    p, c = a.drain_reused()
    assert p.tolist() == [8] and c.tolist() == [8]
    assert a.drain_reused()[0].size == 0
    a.check()


def test_split_of_reported_block_keeps_halves_reported_and_reuses_only_the_part_taken():
    a = BuddyAllocator(16, max_order=4)
    pfns, orders = a.isolate_unreported(4, 1)
    a.return_isolated(pfns, orders, reported=True)
    p = a.alloc(1)
    assert a.reported_pages == 14
    rp, rc = a.drain_reused()
    assert rp.tolist() == [p] and rc.tolist() == [2]
    assert a.isolate_unreported(0, 99)[0].size == 0  # halves still flagged
    a.check()


def test_unreported_blocks_are_allocated_before_reported_ones():
    a = BuddyAllocator(32, max_order=3)
    pfns, orders = a.isolate_unreported(3, 2)
    a.return_isolated(pfns, orders, reported=True)
    got = {a.alloc(3), a.alloc(3)}
    assert not got & set(pfns.tolist())
    assert a.drain_reused()[0].size == 0


def test_clear_reported_forgets_everything_reported():
    a = BuddyAllocator(64, max_order=3)
    pfns, orders = a.isolate_unreported(3, 8)
    a.return_isolated(pfns, orders, reported=True)
    a.alloc(0)
    a.clear_reported()
    assert a.reported_pages == 0 and a.drain_reused()[0].size == 0
    again, _ = a.isolate_unreported(3, 99)
    assert again.size == 7  # every whole free 8-block is eligible again
    a.check()


# ------------------------------------------------------------------ state machine
class BuddyMachine(RuleBasedStateMachine):
    """Model: allocated and isolated blocks, host-reported pages, pages pending REUSE.

    Bundles may hold blocks that were freed since (``free_everything``); the model's
    ``blocks``/``iso`` dicts say what is live, and stale ones must be refused."""

    allocated = Bundle("allocated")
    isolated = Bundle("isolated")

    @initialize(pages=st.integers(1, 300), max_order=st.integers(0, 5))
    def setup(self, pages, max_order):
        self.a = BuddyAllocator(pages, max_order)
        self.pages = pages
        self.max_order = max_order
        self.owner = np.zeros(pages, dtype=np.int8)  # 0 free, 1 allocated, 2 isolated
        self.blocks: dict[int, int] = {}
        self.iso: dict[int, int] = {}
        self.host: set[int] = set()
        self.pending: set[int] = set()

    def _take(self, pfn, order, kind):
        size = 1 << order
        assert 0 <= pfn and pfn + size <= self.pages and pfn % size == 0
        assert not self.owner[pfn : pfn + size].any(), "block handed out twice"
        self.owner[pfn : pfn + size] = kind

    def _allocated(self, pfn, order):
        self._take(pfn, order, 1)
        self.blocks[pfn] = order
        taken = self.host & set(range(pfn, pfn + (1 << order)))
        self.host -= taken
        self.pending |= taken

    def _freed(self, pfn, order):
        del self.blocks[pfn]
        self.owner[pfn : pfn + (1 << order)] = 0

    def _returned(self, pfn, order, reported):
        del self.iso[pfn]
        self.owner[pfn : pfn + (1 << order)] = 0
        if reported:
            self.host |= set(range(pfn, pfn + (1 << order)))

    @rule(target=allocated, order=st.integers(0, 5))
    def alloc(self, order):
        order = min(order, self.max_order)
        pfn = self.a.alloc(order)
        if pfn is None:
            assert sum(self.a.free_blocks_by_order()[order:]) == 0
            return multiple()
        self._allocated(pfn, order)
        return (pfn, order)

    @rule(target=allocated, max_pages=st.integers(1, 70))
    def alloc_largest(self, max_pages):
        got = self.a.alloc_largest(max_pages)
        if got is None:
            assert self.a.free_pages == 0
            return multiple()
        pfn, order = got
        assert 1 << order <= max_pages
        by_order = self.a.free_blocks_by_order()
        # nothing larger that would have fitted was left behind
        assert not any(
            by_order[k] for k in range(order + 1, self.max_order + 1) if 1 << k <= max_pages
        )
        self._allocated(pfn, order)
        return (pfn, order)

    @rule(block=consumes(allocated))
    def free(self, block):
        pfn, order = block
        if self.blocks.get(pfn) == order:
            self.a.free(pfn, order)
            self._freed(pfn, order)
        else:  # freed already (double free) or the PFN now heads another block
            with pytest.raises(ValueError):
                self.a.free(pfn, order)

    @rule(block=allocated, shift=st.integers(1, 31))
    def misaligned_free_is_refused(self, block, shift):
        pfn, order = block
        if order == 0:
            return
        shift %= 1 << order
        shift = shift or 1
        with pytest.raises(ValueError):
            self.a.free(pfn + shift, order)

    @rule(target=isolated, min_order=st.integers(0, 5), max_blocks=st.integers(0, 6))
    def isolate(self, min_order, max_blocks):
        min_order = min(min_order, self.max_order)
        pfns, orders = self.a.isolate_unreported(min_order, max_blocks)
        assert pfns.size <= max_blocks
        for pfn, order in zip(pfns.tolist(), orders.tolist(), strict=True):
            assert order >= min_order
            self._take(pfn, order, 2)
            self.iso[pfn] = order
        if pfns.size < max_blocks:
            # what is left at these orders is flagged reported: every page of it is host-reported
            rest_p, rest_o = self.a.free_blocks(min_order)
            for pfn, order in zip(rest_p.tolist(), rest_o.tolist(), strict=True):
                assert set(range(pfn, pfn + (1 << order))) <= self.host
        return multiple(*zip(pfns.tolist(), orders.tolist(), strict=True))

    @rule(block=consumes(isolated), reported=st.booleans())
    def return_isolated(self, block, reported):
        pfn, order = block
        if self.iso.get(pfn) != order:
            with pytest.raises(ValueError):
                self.a.return_isolated([pfn], [order], reported=reported)
            return
        size = 1 << order
        buddy_free = (
            (pfn ^ size, order) in free_block_set(self.a) if order < self.max_order else False
        )
        self.a.return_isolated([pfn], [order], reported=reported)
        self._returned(pfn, order, reported)
        flagged = set(zip(*(x.tolist() for x in self.a.free_blocks(0, reported=True)), strict=True))
        if buddy_free:  # merged: the merged block is unflagged (page_reporting_drain)
            assert not any(p <= pfn < p + (1 << o) for p, o in flagged)
        else:
            assert ((pfn, order) in flagged) == reported

    @rule()
    def drain_reused(self):
        p, c = self.a.drain_reused()
        assert (np.diff(p.astype(np.int64)) > 0).all()
        assert set(expand_pages(p, c).tolist()) == self.pending
        assert int(c.sum()) == len(self.pending)
        self.pending = set()

    @precondition(lambda self: self.a.isolated_pages == 0)
    @rule()
    def clear_reported(self):
        self.a.clear_reported()
        self.host = set()
        self.pending = set()

    @rule(reported=st.booleans())
    def free_everything(self, reported):
        for pfn, order in list(self.blocks.items()):
            self.a.free(pfn, order)
            self._freed(pfn, order)
        pfns = list(self.iso)
        orders = [self.iso[p] for p in pfns]
        self.a.return_isolated(pfns, orders, reported=reported)
        for pfn, order in zip(pfns, orders, strict=True):
            self._returned(pfn, order, reported)
        # buddies merge exactly: back to the maximal aligned blocks
        assert free_block_set(self.a) == set(
            BuddyAllocator.maximal_blocks(self.pages, self.max_order)
        )

    @invariant()
    def counters_add_up(self):
        a = self.a
        assert a.free_pages + a.allocated_pages + a.isolated_pages == a.total_pages
        assert a.allocated_pages == int(np.count_nonzero(self.owner == 1))
        assert a.isolated_pages == int(np.count_nonzero(self.owner == 2))
        assert a.reported_pages == len(self.host)
        # the host never holds a page the guest is using
        assert not any(self.owner[p] == 1 for p in self.host)
        a.check()


TestBuddyMachine = BuddyMachine.TestCase
TestBuddyMachine.settings = settings(
    max_examples=80,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
