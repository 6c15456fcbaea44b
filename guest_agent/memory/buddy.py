"""Buddy allocator over the simulated guest's pages, with free page reporting support.

Allocation mirrors Linux mm/page_alloc.c: blocks of 2**order pages (orders 0..max_order,
10 by default as MAX_PAGE_ORDER), ``alloc`` takes the smallest order with a free block
and splits it down (``expand()``), ``free`` merges a block with its buddy
(``pfn ^ 2**order``) as long as the buddy is free at the same order
(``__free_one_page()``). Free blocks live in per-order sets of head PFNs; per-page state
is two flat byte maps (allocated-head order, host-reported bit) — no Python object per
page, so an 8 GiB guest (2M pages) costs a few MiB.

Free page reporting mirrors mm/page_reporting.c:

- ``isolate_unreported`` takes free blocks of order >= ``min_order`` that are not flagged
  reported off the free lists (``page_reporting_cycle`` → ``__isolate_free_page``); they
  cannot be allocated until ``return_isolated`` puts them back (``page_reporting_drain``).
- Returned with ``reported=True`` a block is flagged reported — unless it merged with its
  buddy on the way back: Linux sets PageReported only "if page was not commingled with
  another page ... otherwise we will need to report on the new larger page"
  (``page_reporting_drain``), and ``del_page_from_free_list`` clears PageReported of a
  buddy absorbed in a merge. So here too **any merge clears the flag** of the merged block,
  even when both halves were reported; the larger block is reported again later (the host
  treats repeats as idempotent).
- Within an order, unreported blocks are handed out before reported ones (Linux queues
  reported pages at the tail of the free list).

One thing Linux does not need and we do: REUSE. A real host discards reported pages and
refaults them on the guest's next touch; our host keeps a *set* of reported pages, so the
guest must say when it takes one back. The allocator therefore keeps, per page, a
"host-reported" bit (set when a block is returned reported, cleared when the page is
allocated) independent of the block flag above. Whenever an allocation (``alloc`` or
``alloc_largest``, whole block or a part split off it) hands out pages whose bit is set,
they are queued for ``drain_reused``; ``reported_pages`` counts the bits, i.e. exactly
the set the host must converge to. Split halves of a flagged block stay flagged (every
page of them is still host-reported; Linux would re-report them, harmlessly).
"""

from __future__ import annotations

import numpy as np

from shared.ranges import pages_to_ranges, sort_and_coalesce

#: Linux's MAX_PAGE_ORDER on x86-64 (4 MiB blocks).
MAX_ORDER = 10
#: pageblock_order: the smallest order Linux reports by default (2 MiB).
PAGEBLOCK_ORDER = 9


class BuddyAllocator:
    """Buddy allocator over ``pages`` guest pages (PFN 0..pages-1), orders 0..max_order.

    Invariants (checked by the tests): free + allocated + isolated = total after every
    call; no page is in two blocks; after everything is freed the free lists hold
    exactly the maximal aligned blocks of [0, pages).
    """

    def __init__(self, pages: int, max_order: int = MAX_ORDER):
        pages = int(pages)
        max_order = int(max_order)
        if pages < 1:
            raise ValueError(f"pages must be >= 1, got {pages}")
        if not 0 <= max_order <= 30:
            raise ValueError(f"max_order must be in 0..30, got {max_order}")
        self._pages = pages
        self._max_order = max_order
        # Unreported and reported free block heads, per order.
        self._free: list[set[int]] = [set() for _ in range(max_order + 1)]
        self._free_rep: list[set[int]] = [set() for _ in range(max_order + 1)]
        # order + 1 at the head PFN of every allocated block, 0 elsewhere.
        self._head = bytearray(pages)
        # 1 where the host holds the page as reported (not yet reused).
        self._host = np.zeros(pages, dtype=np.bool_)
        # free or isolated block head -> how many of its pages are host-reported (> 0 only)
        self._host_in: dict[int, int] = {}
        self._isolated: dict[int, int] = {}
        self._reuse_pfns: list[int] = []
        self._reuse_counts: list[int] = []
        self._free_pages = 0
        self._allocated_pages = 0
        self._isolated_pages = 0
        self._reported_pages = 0
        for pfn, order in self.maximal_blocks(pages, max_order):
            self._free[order].add(pfn)
        self._free_pages = pages

    # ----------------------------------------------------------------- layout
    @staticmethod
    def maximal_blocks(pages: int, max_order: int = MAX_ORDER) -> list[tuple[int, int]]:
        """The largest naturally aligned blocks that tile [0, pages) (one loop per block)."""
        blocks = []
        pfn = 0
        while pfn < pages:
            order = max_order
            while (pfn & ((1 << order) - 1)) or pfn + (1 << order) > pages:
                order -= 1
            blocks.append((pfn, order))
            pfn += 1 << order
        return blocks

    # ---------------------------------------------------------------- counters
    @property
    def total_pages(self) -> int:
        return self._pages

    @property
    def max_order(self) -> int:
        return self._max_order

    @property
    def free_pages(self) -> int:
        """Pages on the free lists (allocatable now); isolated pages are not counted."""
        return self._free_pages

    @property
    def allocated_pages(self) -> int:
        return self._allocated_pages

    @property
    def isolated_pages(self) -> int:
        """Pages taken off the free lists for a report in flight."""
        return self._isolated_pages

    @property
    def reported_pages(self) -> int:
        """Pages the host holds as reported and not reused: what its tracker must converge to.

        They are all free or isolated (allocating one queues it for REUSE)."""
        return self._reported_pages

    def free_pages_by_order(self) -> list[int]:
        """Free pages (not blocks) on each order's free lists, isolated excluded."""
        return [
            (len(a) + len(b)) << k
            for k, (a, b) in enumerate(zip(self._free, self._free_rep, strict=True))
        ]

    def free_blocks_by_order(self) -> list[int]:
        return [len(a) + len(b) for a, b in zip(self._free, self._free_rep, strict=True)]

    def free_blocks(
        self, min_order: int = 0, reported: bool | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Free blocks of order >= min_order, sorted by PFN, without isolating them.

        ``reported`` selects flagged (True) or unflagged (False) blocks; None: both. For
        free page hinting, where the guest may reuse hinted pages at any time."""
        self._check_order(min_order)
        pfns, orders = [], []
        for k in range(min_order, self._max_order + 1):
            lists = (self._free[k], self._free_rep[k])
            if reported is not None:
                lists = lists[1:] if reported else lists[:1]
            for s in lists:
                if s:
                    pfns.append(np.fromiter(s, dtype=np.uint64, count=len(s)))
                    orders.append(np.full(len(s), k, dtype=np.uint64))
        if not pfns:
            return np.empty(0, np.uint64), np.empty(0, np.uint64)
        p = np.concatenate(pfns)
        o = np.concatenate(orders)
        idx = np.argsort(p, kind="stable")
        return p[idx], o[idx]

    def is_allocated(self, pfn: int, order: int) -> bool:
        return 0 <= pfn < self._pages and self._head[pfn] == order + 1

    # ------------------------------------------------------------- alloc/free
    def _check_order(self, order: int) -> None:
        if not (isinstance(order, (int, np.integer)) and 0 <= order <= self._max_order):
            raise ValueError(f"order must be an integer in 0..{self._max_order}, got {order!r}")

    def alloc(self, order: int) -> int | None:
        """Allocate a block of 2**order pages; its head PFN, or None when none is free."""
        self._check_order(order)
        free, free_rep = self._free, self._free_rep
        top = self._max_order + 1
        for k in range(order, top):
            s = free[k]
            if s:
                flagged = False
                break
            s = free_rep[k]
            if s:
                flagged = True
                break
        else:
            return None
        pfn = s.pop()
        host_in = self._host_in
        n_host = host_in.pop(pfn, 0) if host_in else 0
        if k != order:
            # expand(): hand the upper halves back to the lower orders.
            lists = free_rep if flagged else free
            size = 1 << k
            while k > order:
                k -= 1
                size >>= 1
                half = pfn + size
                lists[k].add(half)
                if n_host:
                    if n_host == size << 1:
                        n_high = size
                    else:
                        n_high = int(np.count_nonzero(self._host[half : half + size]))
                    if n_high:
                        host_in[half] = n_high
                        n_host -= n_high
        size = 1 << order
        self._head[pfn] = order + 1
        self._free_pages -= size
        self._allocated_pages += size
        if n_host:
            self._reuse(pfn, size, n_host)
        return pfn

    def _reuse(self, pfn: int, size: int, n_host: int) -> None:
        """Queue the host-reported pages of a block just handed out for REUSE."""
        if n_host == size:
            self._reuse_pfns.append(pfn)
            self._reuse_counts.append(size)
        else:
            pages = np.flatnonzero(self._host[pfn : pfn + size]) + pfn
            p, c = pages_to_ranges(pages)
            self._reuse_pfns.extend(p.tolist())
            self._reuse_counts.extend(c.tolist())
        self._host[pfn : pfn + size] = False
        self._reported_pages -= n_host

    def free(self, pfn: int, order: int) -> None:
        """Free an allocated block; merges with free buddies (``__free_one_page``).

        Raises ValueError on a bad order, a PFN outside guest RAM, a misaligned PFN, a
        double free or a free with another order than the allocation's."""
        self._check_order(order)
        pfn = int(pfn)
        if not 0 <= pfn < self._pages:
            raise ValueError(f"PFN {pfn} outside guest RAM (0..{self._pages - 1})")
        if pfn & ((1 << order) - 1):
            raise ValueError(f"PFN {pfn:#x} is not aligned to order {order}")
        head = self._head[pfn]
        if head == 0:
            raise ValueError(f"PFN {pfn:#x} is not an allocated block (double free?)")
        if head != order + 1:
            raise ValueError(
                f"PFN {pfn:#x} was allocated with order {head - 1}, freed with order {order}"
            )
        self._head[pfn] = 0
        size = 1 << order
        self._allocated_pages -= size
        self._free_pages += size
        self._insert(pfn, order, 0, False)

    def _insert(self, pfn: int, order: int, n_host: int, flagged: bool) -> None:
        free, free_rep, host_in = self._free, self._free_rep, self._host_in
        top = self._max_order
        while order < top:
            buddy = pfn ^ (1 << order)
            s = free[order]
            if buddy in s:
                s.remove(buddy)
            else:
                s = free_rep[order]
                if buddy in s:
                    s.remove(buddy)
                else:
                    break
            if host_in:
                n_host += host_in.pop(buddy, 0)
            flagged = False  # a merged block is unreported (page_reporting_drain)
            pfn &= ~(1 << order)
            order += 1
        (free_rep if flagged else free)[order].add(pfn)
        if n_host:
            host_in[pfn] = n_host

    def alloc_largest(self, max_pages: int) -> tuple[int, int] | None:
        """Allocate the largest free block of at most ``max_pages`` pages (balloon inflate).

        Splits a bigger block when every free block is bigger than ``max_pages``."""
        max_pages = int(max_pages)
        if max_pages < 1:
            return None
        target = min(self._max_order, max_pages.bit_length() - 1)
        for k in range(target, self._max_order + 1):
            if self._free[k] or self._free_rep[k]:
                return self.alloc(target), target
        for k in range(target - 1, -1, -1):
            if self._free[k] or self._free_rep[k]:
                return self.alloc(k), k
        return None

    # ------------------------------------------------------ page reporting
    def isolate_unreported(self, min_order: int, max_blocks: int) -> tuple[np.ndarray, np.ndarray]:
        """Take up to ``max_blocks`` unreported free blocks of order >= min_order off the lists.

        Lowest order first, as ``page_reporting_process_zone`` walks the orders. Returns
        ``(pfns, orders)`` uint64 arrays; the pages count as isolated until
        ``return_isolated``."""
        self._check_order(min_order)
        max_blocks = int(max_blocks)
        if max_blocks < 0:
            raise ValueError(f"max_blocks must be >= 0, got {max_blocks}")
        pfns: list[int] = []
        orders: list[int] = []
        isolated = self._isolated
        moved = 0
        for k in range(min_order, self._max_order + 1):
            s = self._free[k]
            while s and len(pfns) < max_blocks:
                pfn = s.pop()
                isolated[pfn] = k
                pfns.append(pfn)
                orders.append(k)
                moved += 1 << k
            if len(pfns) >= max_blocks:
                break
        self._free_pages -= moved
        self._isolated_pages += moved
        return np.array(pfns, dtype=np.uint64), np.array(orders, dtype=np.uint64)

    def return_isolated(self, pfns, orders, reported: bool) -> None:
        """Put isolated blocks back on the free lists (``page_reporting_drain``).

        ``reported=True`` after the host's ACK: the pages join the host-reported set and the
        block is flagged reported unless it merges. ``False`` on abort: as before."""
        pfn_list = np.asarray(pfns, dtype=np.uint64).tolist()
        order_list = np.asarray(orders, dtype=np.uint64).tolist()
        if len(pfn_list) != len(order_list):
            raise ValueError(f"{len(pfn_list)} pfns but {len(order_list)} orders")
        if len(set(pfn_list)) != len(pfn_list):
            raise ValueError("a block is returned twice")
        isolated = self._isolated
        for pfn, order in zip(pfn_list, order_list, strict=True):
            if isolated.get(pfn) != order:
                raise ValueError(f"block {pfn:#x} order {order} is not isolated")
        host, host_in = self._host, self._host_in
        for pfn, order in zip(pfn_list, order_list, strict=True):
            del isolated[pfn]
            size = 1 << order
            self._isolated_pages -= size
            self._free_pages += size
            n_host = host_in.pop(pfn, 0)
            if reported:
                if n_host != size:
                    host[pfn : pfn + size] = True
                    self._reported_pages += size - n_host
                n_host = size
            self._insert(pfn, order, n_host, bool(reported))

    def isolated_blocks(self) -> tuple[np.ndarray, np.ndarray]:
        """Blocks isolated now (e.g. to abort them all when the connection drops)."""
        return (
            np.fromiter(self._isolated.keys(), dtype=np.uint64, count=len(self._isolated)),
            np.fromiter(self._isolated.values(), dtype=np.uint64, count=len(self._isolated)),
        )

    def clear_reported(self) -> None:
        """New session: the host's tracker starts empty, so nothing counts as reported.

        Every flag and host-reported bit is cleared and pending REUSE is dropped (the new
        host never saw those pages); isolated blocks stay isolated."""
        for k in range(self._max_order + 1):
            if self._free_rep[k]:
                self._free[k] |= self._free_rep[k]
                self._free_rep[k].clear()
        self._host[:] = False
        self._host_in.clear()
        self._reported_pages = 0
        self._reuse_pfns.clear()
        self._reuse_counts.clear()

    def drain_reused(self) -> tuple[np.ndarray, np.ndarray]:
        """Host-reported pages allocated since the last drain, as sorted coalesced ranges.

        The agent sends them in REUSE batches before the workload touches them."""
        if not self._reuse_pfns:
            return np.empty(0, np.uint64), np.empty(0, np.uint64)
        pfns = np.array(self._reuse_pfns, dtype=np.uint64)
        counts = np.array(self._reuse_counts, dtype=np.uint64)
        self._reuse_pfns.clear()
        self._reuse_counts.clear()
        return sort_and_coalesce(pfns, counts)

    @property
    def pending_reuse_pages(self) -> int:
        return sum(self._reuse_counts)

    # ------------------------------------------------------------- debugging
    def check(self) -> None:
        """Assert every internal invariant (tests and debugging; O(pages), vectorized)."""
        cover = np.zeros(self._pages, dtype=np.int8)
        free_total = 0
        for k in range(self._max_order + 1):
            size = 1 << k
            for flagged, s in ((False, self._free[k]), (True, self._free_rep[k])):
                for pfn in s:
                    assert pfn % size == 0 and pfn + size <= self._pages, (pfn, k)
                    cover[pfn : pfn + size] += 1
                    free_total += size
                    n = int(np.count_nonzero(self._host[pfn : pfn + size]))
                    assert self._host_in.get(pfn, 0) == n, (pfn, k, n)
                    if flagged:
                        assert n == size, (pfn, k, n)
        iso_total = 0
        for pfn, k in self._isolated.items():
            size = 1 << k
            cover[pfn : pfn + size] += 1
            iso_total += size
            n = int(np.count_nonzero(self._host[pfn : pfn + size]))
            assert self._host_in.get(pfn, 0) == n
        heads = np.frombuffer(self._head, dtype=np.uint8)
        alloc_total = 0
        for pfn in np.flatnonzero(heads).tolist():
            size = 1 << (int(heads[pfn]) - 1)
            cover[pfn : pfn + size] += 1
            alloc_total += size
            assert not self._host[pfn : pfn + size].any(), pfn
        assert (cover == 1).all(), "a page is in no block or in two"
        assert free_total == self._free_pages
        assert iso_total == self._isolated_pages
        assert alloc_total == self._allocated_pages
        assert free_total + iso_total + alloc_total == self._pages
        assert int(np.count_nonzero(self._host)) == self._reported_pages
