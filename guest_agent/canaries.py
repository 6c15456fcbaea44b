"""The workload's view of the allocator: it sees every allocation and free.

The workload gets this proxy instead of the allocator, which lets the agent

* write a canary (PFN + generation, :class:`guest_agent.memory.ram.SharedRam`) into every page the workload
  allocates, and check it when the workload frees it and on a sampling sweep — a page
  the guest owns whose canary is gone is data the host lost (docs/OPERATIONS.md, BalloonCanaryFailures). Pages the
  guest reported or put in the balloon are treated as uninitialized: they are not
  checked, and get a fresh canary when the workload allocates them again;
* notice allocations that fail (for deflate-on-oom).

Without shared RAM the proxy only counts failures, so it costs one Python call per
allocation, which the allocator pays anyway.
"""

from __future__ import annotations

import random

import numpy as np


class WorkloadMemory:
    """Allocator proxy handed to the workload; anything else is delegated unchanged."""

    def __init__(self, allocator, ram=None, generation: int = 1, seed: int | None = None) -> None:
        self._allocator = allocator
        self.ram = ram
        self.generation = generation
        self.live: dict[int, int] = {}  # pfn -> order, only with canaries
        self.failed_pages = 0  # pages asked for and not granted since the last take_failed()
        self.alloc_failures = 0
        self.checked_pages = 0
        self.canary_failures = 0
        self._rng = random.Random(seed)  # not numpy.random: guest RSS (memory/workloads.py)

    def __getattr__(self, name):
        return getattr(self._allocator, name)

    def alloc(self, order: int):
        pfn = self._allocator.alloc(order)
        if pfn is None:
            self.failed_pages += 1 << order
            self.alloc_failures += 1
            return None
        if self.ram is not None:
            self.ram.write_canaries(np.array([pfn], np.uint64), np.array([1 << order], np.uint64), self.generation)
            self.live[int(pfn)] = order
        return pfn

    def free(self, pfn: int, order: int) -> None:
        if self.ram is not None and self.live.pop(int(pfn), None) is not None:
            self._check(np.array([pfn], np.uint64), np.array([1 << order], np.uint64))
        self._allocator.free(pfn, order)

    def take_failed(self) -> int:
        failed, self.failed_pages = self.failed_pages, 0
        return failed

    def _check(self, pfns: np.ndarray, counts: np.ndarray) -> int:
        failures = int(self.ram.check_canaries(pfns, counts, self.generation))
        self.checked_pages += int(counts.sum())
        self.canary_failures += failures
        return failures

    def sweep(self, samples: int) -> int:
        """Check the canaries of up to ``samples`` random live allocations; returns failures."""
        if self.ram is None or not self.live or samples <= 0:
            return 0
        keys = list(self.live) if len(self.live) <= samples else self._rng.sample(list(self.live), samples)
        chosen = np.array(keys, dtype=np.uint64)
        orders = np.fromiter((self.live[int(p)] for p in chosen), dtype=np.uint64, count=chosen.size)
        return self._check(chosen, np.left_shift(np.uint64(1), orders))
