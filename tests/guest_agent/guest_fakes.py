"""Test doubles for the agent's tests: a tiny page-state allocator and a sans-IO host.

``FakeBuddy`` implements the allocator API of guest_agent/memory/buddy.py with one numpy state per page
(slow, O(pages) per call, fine for a few thousand pages); it lets the agent's tests run
without the real allocator and check isolation exactly. ``FakeHost`` is a HostConnection
with a page set, so tests see what the host would believe.
"""

from __future__ import annotations

import numpy as np

from shared.messages import Ack, Welcome
from shared.protocol import GuestConnection, HostConnection, negotiate_features
from shared.ranges import expand_pages, pages_to_ranges

FREE, ALLOCATED, ISOLATED = 0, 1, 2


class FakeBuddy:
    def __init__(self, pages: int, max_order: int = 10) -> None:
        assert pages % (1 << max_order) == 0
        self.total_pages = pages
        self.max_order = max_order
        self.state = np.zeros(pages, np.int8)
        self.reported = np.zeros(pages, bool)
        self.orders: dict[int, int] = {}
        self._reused: list[np.ndarray] = []
        self.isolate_calls = 0

    # counts
    @property
    def free_pages(self) -> int:
        return int(np.count_nonzero(self.state == FREE))

    @property
    def allocated_pages(self) -> int:
        return int(np.count_nonzero(self.state == ALLOCATED))

    @property
    def isolated_pages(self) -> int:
        return int(np.count_nonzero(self.state == ISOLATED))

    @property
    def reported_pages(self) -> int:
        return int(np.count_nonzero((self.state == FREE) & self.reported))

    def _free_blocks(self, order: int, unreported: bool = False) -> np.ndarray:
        ok = self.state == FREE
        if unreported:
            ok = ok & ~self.reported
        return np.flatnonzero(ok.reshape(-1, 1 << order).all(axis=1)) << order

    def free_pages_by_order(self) -> list[int]:
        counts = [self._free_blocks(o).size for o in range(self.max_order + 1)] + [0]
        return [counts[o] - 2 * counts[o + 1] if o < self.max_order else counts[o]
                for o in range(self.max_order + 1)]

    # alloc/free
    def alloc(self, order: int):
        blocks = self._free_blocks(order)
        if not blocks.size:
            return None
        # prefer unreported blocks, like a buddy allocator's reported-to-tail placement
        unreported = self._free_blocks(order, unreported=True)
        pfn = int(unreported[0] if unreported.size else blocks[0])
        size = 1 << order
        self.state[pfn:pfn + size] = ALLOCATED
        was = np.flatnonzero(self.reported[pfn:pfn + size]) + pfn
        if was.size:
            self._reused.append(was.astype(np.uint64))
            self.reported[pfn:pfn + size] = False
        self.orders[pfn] = order
        return pfn

    def free(self, pfn: int, order: int) -> None:
        if self.orders.get(pfn) != order:
            raise ValueError(f"bad free {pfn} order {order}")
        del self.orders[pfn]
        self.state[pfn:pfn + (1 << order)] = FREE

    def alloc_largest(self, max_pages: int):
        top = min(self.max_order, int(max_pages).bit_length() - 1)
        for order in range(top, -1, -1):
            pfn = self.alloc(order)
            if pfn is not None:
                return pfn, order
        return None

    # reporting
    def isolate_unreported(self, min_order: int, max_blocks: int):
        self.isolate_calls += 1
        blocks = self._free_blocks(min_order, unreported=True)[:max_blocks]
        for pfn in blocks:
            self.state[pfn:pfn + (1 << min_order)] = ISOLATED
        return blocks.astype(np.uint64), np.full(blocks.size, min_order, np.uint8)

    def return_isolated(self, pfns, orders, reported: bool) -> None:
        pages = expand_pages(pfns, np.left_shift(1, np.asarray(orders, np.uint64)))
        assert (self.state[pages.astype(np.intp)] == ISOLATED).all(), "returning pages that are not isolated"
        self.state[pages.astype(np.intp)] = FREE
        self.reported[pages.astype(np.intp)] = reported

    def clear_reported(self) -> None:
        self.reported[:] = False

    def drain_reused(self):
        if not self._reused:
            return np.empty(0, np.uint64), np.empty(0, np.uint64)
        pages = np.unique(np.concatenate(self._reused))
        self._reused.clear()
        return pages_to_ranges(pages)


class FakeHost:
    """A HostConnection plus the set of pages it believes reported / inflated."""

    def __init__(self, window: int = 4, max_ranges: int = 4096, features=("ranges52", "pfn32",
                                                                             "deflate-on-oom", "stats")) -> None:
        self.conn = HostConnection()
        self.window = window
        self.max_ranges = max_ranges
        self.supported = features
        self.reported: set[int] = set()
        self.inflated: set[int] = set()
        self.unacked: list = []  # batches received, not acked yet
        self.max_unacked = 0
        self.others: list = []

    def receive(self, data: bytes) -> None:
        self.conn.receive_data(data)
        for event in self.conn.events():
            if event.TYPE.name == "HELLO":
                self.hello = event
            elif hasattr(event, "pfns"):
                self.unacked.append(event)
                self.max_unacked = max(self.max_unacked, len(self.unacked))
            else:
                self.others.append(event)

    def welcome(self) -> bytes:
        features = negotiate_features(self.hello.features, self.supported)
        return self.conn.send(Welcome(window=self.window, max_ranges=self.max_ranges, features=features))

    def apply(self, batch) -> None:
        pages = set(expand_pages(batch.pfns, batch.counts).tolist())
        kind = batch.TYPE.name
        if kind == "REPORT":
            self.reported |= pages
        elif kind == "REUSE":
            self.reported -= pages
        elif kind == "INFLATE":
            self.inflated |= pages
        elif kind == "DEFLATE":
            self.inflated -= pages

    def ack(self, count: int | None = None) -> bytes:
        """Apply and ack the oldest ``count`` unacked batches (all by default)."""
        out = b""
        count = len(self.unacked) if count is None else count
        for batch in self.unacked[:count]:
            self.apply(batch)
            out += self.conn.send(Ack(batch.seq, 0))
        del self.unacked[:count]
        return out


def connect(agent, host: FakeHost, now: float = 0.0, features=("ranges52", "deflate-on-oom", "stats"),
            guest: str = "g1") -> GuestConnection:
    """Handshake a GuestConnection with ``host`` without a socket and start the agent's session."""
    conn = GuestConnection(guest, agent.total_pages, features)
    host.receive(conn.hello())
    conn.receive_data(host.welcome())
    for event in conn.events():
        assert event.TYPE.name == "WELCOME"
    agent.start_session(conn, now)
    return conn
