"""The balloon: pages the guest gives to the host on request (virtio-balloon inflate/deflate).

The host sets a TARGET (the whole balloon, in pages). As drivers/virtio/virtio_balloon.c
does in ``fill_balloon``/``leak_balloon``, the guest moves towards it in steps:

* inflate — take pages from the allocator (largest free blocks first, so a few ranges
  cover a lot) and tell the host in INFLATE batches; the host may discard them at once;
* deflate — tell the host in DEFLATE batches first, and put the pages back on the free
  lists only after the ACK (the host may still be discarding them before that);
* deflate-on-oom (VIRTIO_BALLOON_F_DEFLATE_ON_OOM) — when the workload cannot get memory
  and the balloon holds some, the guest deflates by itself (Linux's OOM notifier releases
  ``VIRTIO_BALLOON_OOM_NR_PAGES`` = 256 pages at a time); the host sees DEFLATE batches. The
  balloon stays below the target until the host sends a new one.

After a reconnect the host's tracker is empty, so every page still in the balloon is sent
again in INFLATE batches (re-inflate) before anything else changes.
"""

from __future__ import annotations

import logging

import numpy as np

from shared.ranges import RangeBuffer, sort_and_coalesce
from shared.runtime.config import format_size
from shared.vocabulary import DEFLATE, INFLATE, PFN32, PFN32_MAX_PER_MESSAGE

from .batches import Op, block_counts, payloads_for
from .reporting import low_watermark_pages

log = logging.getLogger("guest_agent.balloon")

#: Linux virtio_balloon: pages released per OOM notification.
OOM_NR_PAGES = 256


class Balloon:
    """Holds blocks taken from the allocator and builds INFLATE/DEFLATE operations."""

    def __init__(self, allocator, deflate_on_oom: bool = False) -> None:
        self.allocator = allocator
        self.oom_offered = deflate_on_oom  # offered in HELLO
        self.deflate_on_oom = deflate_on_oom  # and accepted by the current host (see negotiated)
        self.target = 0  # pages the host asked for
        self.oom_deflated = 0  # pages given back on OOM since the last TARGET
        self.oom_deflates = 0
        self._held: list[tuple[int, int]] = []  # acked by the host in this session
        self._unsent: list[tuple[int, int]] = []  # in the balloon; the host does not know yet
        self.inflating_pages = 0
        self.deflating_pages = 0
        self._held_pages = 0
        self._unsent_pages = 0
        self.stuck = False  # the allocator had nothing for inflate; retried next tick
        self.short_logged = False  # "target unreachable" said once per TARGET
        self.min_free_pages = low_watermark_pages(int(allocator.total_pages))

    # -- sizes --------------------------------------------------------------------------

    @property
    def pages(self) -> int:
        """Every page the balloon holds (acked, unsent, or with an INFLATE/DEFLATE in flight)."""
        return self._held_pages + self._unsent_pages + self.inflating_pages + self.deflating_pages

    @property
    def effective_target(self) -> int:
        return max(0, self.target - self.oom_deflated)

    def set_target(self, pages: int) -> None:
        self.target = max(0, min(int(pages), int(self.allocator.total_pages)))
        self.oom_deflated = 0
        self.stuck = False
        self.short_logged = False

    def wants_work(self) -> bool:
        size = self.pages - self.deflating_pages
        if self._unsent:
            return True
        if size > self.effective_target:
            return bool(self._held)
        return size < self.effective_target and not self.stuck

    def oom(self, pages_needed: int) -> bool:
        """The workload could not allocate: deflate by itself if the feature allows."""
        if not self.deflate_on_oom or self.pages - self.deflating_pages <= 0:
            return False
        give = max(OOM_NR_PAGES, int(pages_needed))
        before = self.oom_deflated
        self.oom_deflated = min(self.target, self.oom_deflated + give)
        if self.oom_deflated > before:
            self.oom_deflates += 1
            log.info("deflate on OOM", extra={"pages": self.oom_deflated - before})
            return True
        return False

    # -- sessions -----------------------------------------------------------------------

    def negotiated(self, features) -> None:
        """VIRTIO_BALLOON_F_DEFLATE_ON_OOM only counts when the device accepted it."""
        self.deflate_on_oom = self.oom_offered and "deflate-on-oom" in features

    def resend_all(self) -> None:
        """New session: the host knows nothing, so everything held must be inflated again."""
        self._unsent.extend(self._held)
        self._unsent_pages += self._held_pages
        self._held.clear()
        self._held_pages = 0

    # -- building operations ------------------------------------------------------------

    def build(self, encoding: str, max_ranges: int, buffer: RangeBuffer) -> Op | None:
        if self._unsent:
            return self._reinflate(encoding, max_ranges, buffer)
        size = self.pages - self.deflating_pages
        target = self.effective_target
        if size > target and self._held:
            return self._deflate(size - target, encoding, max_ranges, buffer)
        if size < target and not self.stuck:
            return self._inflate(target - size, encoding, max_ranges, buffer)
        return None

    @staticmethod
    def _limits(encoding: str, max_ranges: int) -> tuple[int, int | None]:
        """(blocks, pages) one operation may carry."""
        if encoding == PFN32:
            return PFN32_MAX_PER_MESSAGE, PFN32_MAX_PER_MESSAGE
        return max(1, min(max_ranges, 4096)), None

    def _op(self, kind: str, blocks: list[tuple[int, int]], encoding: str, buffer: RangeBuffer,
            on_ack, on_abort) -> Op:
        pfns = np.fromiter((b[0] for b in blocks), dtype=np.uint64, count=len(blocks))
        orders = np.fromiter((b[1] for b in blocks), dtype=np.uint64, count=len(blocks))
        counts = block_counts(orders)
        return Op(kind, int(counts.sum()), payloads_for(*sort_and_coalesce(pfns, counts), encoding, buffer),
                  on_ack=on_ack, on_abort=on_abort)

    def _take(self, source: list[tuple[int, int]], max_blocks: int, max_pages: int | None):
        taken, pages = [], 0
        while source and len(taken) < max_blocks:
            pfn, order = source[-1]
            if max_pages is not None and pages + (1 << order) > max_pages and taken:
                break
            taken.append(source.pop())
            pages += 1 << order
        return taken, pages

    def _reinflate(self, encoding, max_ranges, buffer) -> Op:
        max_blocks, max_pages = self._limits(encoding, max_ranges)
        blocks, pages = self._take(self._unsent, max_blocks, max_pages)
        self._unsent_pages -= pages
        self.inflating_pages += pages
        return self._op(INFLATE, blocks, encoding, buffer,
                        lambda op: self._inflate_acked(blocks, pages),
                        lambda op: self._inflate_aborted(blocks, pages))

    def _inflate(self, wanted: int, encoding, max_ranges, buffer) -> Op | None:
        max_blocks, max_pages = self._limits(encoding, max_ranges)
        budget = wanted if max_pages is None else min(wanted, max_pages)
        # fill_balloon() allocates with __GFP_NORETRY | __GFP_NOMEMALLOC: it gives up at
        # the watermark instead of taking the last free pages from the workload.
        budget = min(budget, int(self.allocator.free_pages) - self.min_free_pages)
        blocks, pages = [], 0
        while pages < budget and len(blocks) < max_blocks:
            got = self.allocator.alloc_largest(budget - pages)
            if got is None:
                break
            pfn, order = int(got[0]), int(got[1])
            blocks.append((pfn, order))
            pages += 1 << order
        if not blocks:
            self.stuck = True
            if not self.short_logged and not self.inflating_pages:
                self.short_logged = True
                size, page = self.pages, 4096
                log.warning(f"balloon target unreachable: {format_size(size * page)} of "
                            f"{format_size(self.effective_target * page)} inflated; the guest keeps its low "
                            f"watermark ({format_size(self.min_free_pages * page)}) free and the workload "
                            f"holds the rest (virtio_balloon fill_balloon gives up the same way)",
                            extra={"inflated_pages": size, "target_pages": self.effective_target,
                                   "free_pages": int(self.allocator.free_pages)})
            return None
        self.inflating_pages += pages
        return self._op(INFLATE, blocks, encoding, buffer,
                        lambda op: self._inflate_acked(blocks, pages),
                        lambda op: self._inflate_aborted(blocks, pages))

    def _inflate_acked(self, blocks, pages) -> None:
        self.inflating_pages -= pages
        self._held.extend(blocks)
        self._held_pages += pages

    def _inflate_aborted(self, blocks, pages) -> None:
        # The host may or may not have discarded them: they stay in the balloon, unsent.
        self.inflating_pages -= pages
        self._unsent.extend(blocks)
        self._unsent_pages += pages

    def _deflate(self, excess: int, encoding, max_ranges, buffer) -> Op:
        # Most recently inflated first; the last block may overshoot, and the next
        # inflate (alloc_largest of the difference) lands exactly on the target.
        max_blocks, max_pages = self._limits(encoding, max_ranges)
        blocks, pages = [], 0
        while self._held and pages < excess and len(blocks) < max_blocks:
            pfn, order = self._held[-1]
            if max_pages is not None and blocks and pages + (1 << order) > max_pages:
                break
            blocks.append(self._held.pop())
            pages += 1 << order
        self._held_pages -= pages
        self.deflating_pages += pages

        def acked(op: Op) -> None:
            # Only now may the guest use them again (the host is done with them).
            self.deflating_pages -= pages
            for pfn, order in blocks:
                self.allocator.free(pfn, order)

        def aborted(op: Op) -> None:
            self.deflating_pages -= pages
            self._unsent.extend(blocks)
            self._unsent_pages += pages

        return self._op(DEFLATE, blocks, encoding, buffer, acked, aborted)
