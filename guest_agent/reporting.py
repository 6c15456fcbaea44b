"""Free page reporting, the way mm/page_reporting.c does it.

Linux's page reporting works in passes. When a block of order >= ``page_reporting_order``
(pageblock_order, 9 = 2 MiB) is freed, ``page_reporting_notify_free`` requests a pass,
which runs ``PAGE_REPORTING_DELAY`` (2 s) later, so short-lived frees are not reported.
A pass pulls free, not-yet-reported blocks off the free lists (isolates them) up to
``PAGE_REPORTING_CAPACITY`` (32) at a time, hands them to the device and waits for it;
then it puts them back flagged *reported*, so later passes skip them. Frees during a pass
request another pass, again after the delay.

Here a pass is a sequence of REPORT operations: the blocks of one report stay isolated
(unallocatable) from the moment they are put in the batch until its ACK, and go back to
the free lists unreported if the session dies first. Adjacent blocks are coalesced into
one range, so a run of order-9 blocks travels as one word (or two, with the escape).
"""

from __future__ import annotations

import enum
import logging
import math

import numpy as np

from shared.ranges import RangeBuffer, sort_and_coalesce
from shared.runtime.config import format_size
from shared.vocabulary import PAGE_SIZE, REPORT

from .batches import Op, block_counts, payloads_for


def low_watermark_pages(total_pages: int) -> int:
    """A zone's low watermark, as Linux sizes it for this much memory.

    min_free_kbytes = sqrt(16 * memory in KiB), clamped to 128 KiB .. 256 MiB
    (mm/page_alloc.c ``calculate_min_free_kbytes``); low = min + max(min / 4,
    memory * watermark_scale_factor (10) / 10000) (``__setup_per_zone_wmarks``).
    """
    kib = total_pages * 4
    min_free_kib = min(max(int(math.isqrt(kib * 16)), 128), 256 * 1024)
    min_pages = min_free_kib // 4
    return min_pages + max(min_pages // 4, total_pages * 10 // 10000)


log = logging.getLogger("guest_agent.reporting")


class PassState(enum.Enum):
    IDLE = "idle"  # nothing requested
    REQUESTED = "requested"  # a free of reportable order happened; waiting out the delay
    ACTIVE = "active"  # isolating and reporting until nothing eligible is left


class FreePageReporting:
    """Decides when to report and builds REPORT operations from the allocator."""

    def __init__(self, allocator, order: int = 9, delay: float = 2.0, capacity: int = 32) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1 range")
        self.allocator = allocator
        self.order = order
        self.delay = delay
        self.capacity = capacity
        self.state = PassState.IDLE
        self.deadline: float | None = None
        self._again = False
        self.isolated_pages = 0  # pages this reporter holds isolated in unacked reports
        self.passes = 0
        # page_reporting_process_zone(): report only while the zone stays above its low
        # watermark plus one full report (PAGE_REPORTING_CAPACITY << page_reporting_order),
        # so reporting never takes the memory the workload is about to need. One report is
        # 64 MiB by default, sized for real machines; a simulated guest below 512 MiB keeps
        # an eighth of its memory instead, or it would never report at all.
        total = int(allocator.total_pages)
        self.reserve_pages = low_watermark_pages(total) + min(capacity << order, total // 8)
        self.watermark_waits = 0
        self.watermark_logged = False  # once per shortage, not per pass
        self._largest_block = 1 << int(getattr(allocator, "max_order", 10))

    # -- when -------------------------------------------------------------------------

    def unreported_eligible_pages(self) -> int:
        """Free pages in blocks of reportable order that are not flagged reported."""
        by_order = self.allocator.free_pages_by_order()
        eligible = sum(int(n) << o for o, n in enumerate(by_order) if o >= self.order)
        return max(0, eligible - int(self.allocator.reported_pages))

    def check(self, now: float) -> None:
        """Called after the workload ran: request a pass if a reportable block is free.

        Linux requests on every free of order >= page_reporting_order; looking at the
        free lists after each step gives the same trigger without hooking every free.
        """
        if self.unreported_eligible_pages() >= 1 << self.order:
            self.request(now)

    def request(self, now: float, delay: float | None = None) -> None:
        if self.state is PassState.IDLE:
            self.state = PassState.REQUESTED
            self.deadline = now + (self.delay if delay is None else delay)
        elif self.state is PassState.ACTIVE:
            self._again = True

    def wake_at(self) -> float | None:
        """When the agent must look again without a message: the end of the reporting delay."""
        return self.deadline if self.state is PassState.REQUESTED else None

    def due(self, now: float) -> bool:
        if self.state is PassState.REQUESTED and now >= self.deadline:
            self.state = PassState.ACTIVE
            self.deadline = None
            self.passes += 1
        return self.state is PassState.ACTIVE

    def restart(self, now: float) -> None:
        """A new session (device probe): everything eligible is reported again, after the delay."""
        self.state = PassState.IDLE
        self._again = False
        self.isolated_pages = 0
        self.request(now)

    def _finish_pass(self, now: float) -> None:
        self.state = PassState.IDLE
        if self._again:
            self._again = False
            self.request(now)

    # -- what -------------------------------------------------------------------------

    def build(self, now: float, encoding: str, max_ranges: int, buffer: RangeBuffer) -> Op | None:
        """Isolate up to ``capacity`` blocks and wrap them in a REPORT operation."""
        if not self.due(now):
            return None
        room = int(self.allocator.free_pages) - self.reserve_pages
        if room < 0:
            self.watermark_waits += 1
            if self.isolated_pages:
                # Our own reports in flight hold the pages: the ACKs bring them back. Not a
                # shortage worth a log line (an idle guest passes here on every large pass).
                return None
            if not self.watermark_logged:
                self.watermark_logged = True
                free = int(self.allocator.free_pages) * PAGE_SIZE
                log.info(f"reporting paused: {format_size(free)} free is below the reserve of "
                         f"{format_size(self.reserve_pages * PAGE_SIZE)} (low watermark plus one report, Linux "
                         f"page_reporting_process_zone); a smaller --capacity lowers it",
                         extra={"free_mib": free >> 20, "reserve_mib": self.reserve_pages * PAGE_SIZE >> 20})
            self._finish_pass(now)  # nothing in flight will bring pages back: stop
            return None
        self.watermark_logged = False
        # Linux has one report in flight; with a window of them, each batch is also cut so
        # that free memory stays within one top-order block of the reserve.
        max_blocks = max(1, min(self.capacity, max_ranges, room // self._largest_block + 1))
        pfns, orders = self.allocator.isolate_unreported(self.order, max_blocks)
        pfns = np.asarray(pfns, dtype=np.uint64)
        orders = np.asarray(orders)
        if not pfns.size:
            self._finish_pass(now)
            return None
        counts = block_counts(orders)
        pages = int(counts.sum())
        self.isolated_pages += pages
        ranges = sort_and_coalesce(pfns, counts)

        def acked(op: Op) -> None:
            # As page_reporting_drain(): back on the free lists, flagged reported.
            self.isolated_pages -= pages
            self.allocator.return_isolated(pfns, orders, reported=True)

        def aborted(op: Op) -> None:
            # The host may never have seen them: free again, unreported.
            self.isolated_pages -= pages
            self.allocator.return_isolated(pfns, orders, reported=False)

        return Op(REPORT, pages, payloads_for(*ranges, encoding, buffer), on_ack=acked, on_abort=aborted)
