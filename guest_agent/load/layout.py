"""Synthetic free-memory layouts, from one contiguous run to scattered single pages.

A layout is the set of free pages of a guest, as sorted, non-touching ``(pfn, count)``
runs. ``fragmentation`` F is the probability that a free page does *not* continue the
free run of the page before it: F = 0 gives one run, F = 0.01 runs of ~100 pages,
F = 1 only single pages separated by allocated ones. Used by balloon-load to build
batches and by bench/encodings.py to compare encodings over the same layouts.

Everything is vectorized (random compositions via sorted cut points), so an 8 GiB
guest (2M pages) takes a few tens of milliseconds.
"""

from __future__ import annotations

import numpy as np

#: The buddy allocator's largest block (order 10, 4 MiB): Linux reports free memory
#: block by block, so a run longer than this arrives as several ranges.
MAX_ORDER_PAGES = 1 << 10


def _composition(rng: np.random.Generator, total: int, parts: int, minimum: int) -> np.ndarray:
    """``parts`` random non-negative integers >= ``minimum`` summing to ``total``."""
    spare = total - parts * minimum
    if parts <= 0:
        return np.empty(0, np.int64)
    if spare < 0:
        raise ValueError(f"cannot split {total} into {parts} parts of at least {minimum}")
    # stars and bars: choose parts-1 bar positions among spare + parts - 1 slots
    slots = spare + parts - 1
    bars = np.sort(rng.choice(slots, size=parts - 1, replace=False)) if parts > 1 else np.empty(0, np.int64)
    edges = np.concatenate(([-1], bars, [slots]))
    return (np.diff(edges) - 1 + minimum).astype(np.int64)


def free_layout(pages: int, free_fraction: float = 0.5, fragmentation: float = 0.0,
                seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Free runs of a ``pages``-page guest: sorted, disjoint, never touching."""
    if pages < 2:
        raise ValueError("a layout needs at least two pages")
    if not 0.0 <= fragmentation <= 1.0:
        raise ValueError("fragmentation is a fraction from 0 to 1")
    if not 0.0 < free_fraction < 1.0:
        raise ValueError("free_fraction must be strictly between 0 and 1")
    rng = np.random.default_rng(seed)
    free = max(1, int(pages * free_fraction))
    used = pages - free
    runs = max(1, int(round(fragmentation * free)))
    runs = min(runs, free, used + 1)  # every inner gap needs at least one used page
    lengths = _composition(rng, free, runs, 1)
    # runs + 1 gaps: the inner ones at least one page so runs never touch
    inner = _composition(rng, used - (runs - 1), runs + 1, 0)
    inner[1:-1] += 1
    starts = np.cumsum(inner[:-1]) + np.concatenate(([0], np.cumsum(lengths)[:-1]))
    return starts.astype(np.uint64), lengths.astype(np.uint64)


def split_runs(pfns: np.ndarray, counts: np.ndarray, limit: int = MAX_ORDER_PAGES):
    """Cut every run into pieces of at most ``limit`` pages (as the buddy allocator holds them)."""
    pfns = np.asarray(pfns, dtype=np.uint64)
    counts = np.asarray(counts, dtype=np.uint64)
    pieces = ((counts + np.uint64(limit - 1)) // np.uint64(limit)).astype(np.intp)
    if not pieces.size or int(pieces.max()) <= 1:
        return pfns.copy(), counts.copy()
    owner = np.repeat(np.arange(pfns.size), pieces)
    first = np.cumsum(pieces) - pieces
    index = np.arange(owner.size) - first[owner]
    offset = index.astype(np.uint64) * np.uint64(limit)
    out_pfns = pfns[owner] + offset
    out_counts = np.minimum(counts[owner] - offset, np.uint64(limit))
    return out_pfns, out_counts


def free_bitmap(pages: int, pfns, counts) -> np.ndarray:
    """A boolean page map with the runs set (vectorized with a difference array).

    The runs must be disjoint; touching runs are fine (bincount adds the marks).
    """
    pfns = np.asarray(pfns, dtype=np.int64)
    ends = pfns + np.asarray(counts, dtype=np.int64)
    marks = np.bincount(pfns, minlength=pages + 1) - np.bincount(ends, minlength=pages + 1)
    return np.cumsum(marks[:pages]) > 0
