"""Batch payloads built ahead of time, so the load generator never becomes the bottleneck.

A pool of encoded payloads is cut from one synthetic free-memory layout of the load
guest (see :mod:`.layout`): consecutive free blocks, at most ``batch_ranges`` per batch,
never overlapping inside a batch and always inside guest RAM, so a real host's tracker
accepts every range. Guests cycle through the pool from different offsets; re-reporting
a range is idempotent at the host (docs/PROTOCOL.md §8: repeats are not rejected).

``ranges52`` payloads hold the seed's 64-bit words; ``pfn32`` payloads hold one 32-bit
PFN per page, at most 256 per batch, exactly as the legacy virtio balloon sends them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shared.ranges import encode_ranges, expand_pages
from shared.vocabulary import ENCODINGS, PFN32, PFN32_MAX_PER_MESSAGE, RANGES52

from .layout import MAX_ORDER_PAGES, free_layout, split_runs


@dataclass(frozen=True, slots=True)
class PayloadPool:
    """Encoded payloads plus the ranges and pages each one carries."""

    payloads: tuple[bytes, ...]
    ranges: tuple[int, ...]
    pages: tuple[int, ...]
    encoding: str

    def __len__(self) -> int:
        return len(self.payloads)

    @property
    def mean_ranges(self) -> float:
        return float(np.mean(self.ranges)) if self.ranges else 0.0


def build_pool(guest_pages: int, batch_ranges: int, fragmentation: float, encoding: str = RANGES52,
               pool_size: int = 256, seed: int = 0) -> PayloadPool:
    """``pool_size`` payloads of ``batch_ranges`` ranges (pfn32: PFNs, at most 256) each."""
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown encoding {encoding!r} (one of {', '.join(ENCODINGS)})")
    if batch_ranges < 1 or pool_size < 1:
        raise ValueError("batch_ranges and pool_size must be at least 1")
    pfns, counts = free_layout(guest_pages, 0.5, fragmentation, seed)
    free = int(counts.sum())
    if encoding == PFN32:
        per_batch = min(batch_ranges, PFN32_MAX_PER_MESSAGE)
        # one PFN per page; only the pages of as many batches as the pool needs
        pages = expand_pages(*_limit_pages(pfns, counts, per_batch * pool_size))
        if int(pages.max(initial=0)) >= 1 << 32:
            raise ValueError("pfn32 cannot address a guest of more than 2**32 pages")
        chunks = [pages[i : i + per_batch] for i in range(0, pages.size, per_batch)]
        payloads = tuple(chunk.astype("<u4").tobytes() for chunk in chunks)
        sizes = tuple(int(chunk.size) for chunk in chunks)
        return PayloadPool(payloads, sizes, sizes, encoding)
    # Enough blocks for a varied pool: cut runs at the buddy's largest block, or finer
    # when the guest is too small (or too contiguous) for pool_size distinct batches.
    limit = MAX_ORDER_PAGES
    wanted = min(batch_ranges * pool_size, free)
    while limit > 1 and int(((counts + np.uint64(limit - 1)) // np.uint64(limit)).sum()) < wanted:
        limit //= 2
    pfns, counts = split_runs(pfns, counts, limit)
    payloads, ranges, pages = [], [], []
    for start in range(0, min(pfns.size, batch_ranges * pool_size), batch_ranges):
        batch_pfns, batch_counts = pfns[start : start + batch_ranges], counts[start : start + batch_ranges]
        payloads.append(encode_ranges(batch_pfns, batch_counts))
        ranges.append(int(batch_pfns.size))
        pages.append(int(batch_counts.sum()))
    return PayloadPool(tuple(payloads), tuple(ranges), tuple(pages), encoding)


def _limit_pages(pfns: np.ndarray, counts: np.ndarray, most: int) -> tuple[np.ndarray, np.ndarray]:
    """The leading runs covering at most ``most`` pages (the last run trimmed)."""
    reach = np.cumsum(counts)
    take = int(np.searchsorted(reach, most, side="left")) + 1
    pfns, counts = pfns[:take].copy(), counts[:take].copy()
    excess = int(counts.sum()) - most
    if excess > 0:
        counts[-1] -= np.uint64(excess)
    return pfns, counts
