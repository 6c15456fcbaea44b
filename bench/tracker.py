"""Tracker benchmark: compiled flat bitmaps vs pyroaring BitMap64 vs numpy intervals, same batches.

Measures ``GuestTracker.apply`` throughput (ranges/s, µs per batch) for the batch shapes a host sees —
contiguous order-9 blocks (what mm/page_reporting.c sends), single pages scattered over
the guest (the worst a hostile or fragmented guest can send), legacy pfn32-style
batches of 256 consecutive single pages — and the memory the sets take per guest page.
The set-structure variants plug into the same GuestTracker (``page_set``), so their
validation and bookkeeping are identical; only the set structure differs. Two ways to
feed BitMap64 are measured: one ``add_range`` call per range (RoaringPageSet, the
tracker before the flat bitmaps; bench/tracker_alternatives.py) and building a bitmap
from the expanded page array (no Python loop, but work per page). The daemon's tracker
(host_daemon/tracker.py over host_daemon/pageset.py) validates and applies a batch in one
numba call; this bench is why that kernel exists (docs/PERFORMANCE.md ``## Tracker``).

    python -m bench.tracker            # 8 GiB guest
    python -m bench.tracker --quick    # 1 GiB guest, fewer batches (smoke test)
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
from pyroaring import BitMap64

from bench.tracker_alternatives import IntervalSet, RoaringPageSet, SetTracker
from host_daemon import tracker as host_tracker
from shared.ranges import expand_pages

U64 = np.uint64


class RoaringFromPages(RoaringPageSet):
    """BitMap64 fed from the expanded page array (no Python loop, but work per page)."""

    @staticmethod
    def _bitmap_of(starts, ends) -> BitMap64:
        return BitMap64(expand_pages(starts, ends - starts))

    def update(self, starts, ends) -> None:
        self.bitmap |= self._bitmap_of(starts, ends)

    def difference_update(self, starts, ends) -> None:
        self.bitmap -= self._bitmap_of(starts, ends)


def tracker_class(page_set):
    return type(f"Tracker_{page_set.__name__}", (SetTracker,), {"page_set": page_set})


def _interpreted(pages: int):
    """The daemon's tracker with its loops as plain Python (what runs without numba)."""
    return host_tracker.GuestTracker(pages)


STRUCTURES = {
    "flat bitmap, numba (the daemon's)": host_tracker.GuestTracker,
    "bitmap64 add_range": tracker_class(RoaringPageSet),
    "bitmap64 from pages": tracker_class(RoaringFromPages),
    "numpy intervals": tracker_class(IntervalSet),
}
if not host_tracker.load_kernels():  # numba missing or BALLOON_TRACKER=python
    STRUCTURES = {"flat bitmap, interpreted (no numba)": _interpreted, **dict(list(STRUCTURES.items())[1:])}


def workloads(pages: int, rng: np.random.Generator, scattered_ranges: int):
    """(name, batch kind, list of (pfns, counts) batches, then the undo kind)."""
    block = 512  # order 9, pageblock_order: what free page reporting sends
    blocks = np.arange(0, pages - block + 1, block, dtype=U64)
    rng.shuffle(blocks)
    contiguous = [
        (np.sort(b), np.full(b.size, block, U64)) for b in np.array_split(blocks, blocks.size // 32)
    ]
    # Every other page, in random batches of 256 single pages: 1 interval per page reported.
    singles = rng.choice(np.arange(0, pages, 2, dtype=U64), size=scattered_ranges, replace=False)
    scattered = [
        (np.sort(b), np.ones(b.size, U64)) for b in np.array_split(singles, singles.size // 256)
    ]
    # Legacy inflate: 256 consecutive single pages per batch, in address order.
    legacy_pages = np.arange(0, min(pages, 256 * 2048), dtype=U64)
    legacy = [
        (b, np.ones(b.size, U64)) for b in np.array_split(legacy_pages, legacy_pages.size // 256)
    ]
    return [
        ("contiguous order-9 blocks, 32/batch", "report", contiguous, "reuse"),
        ("scattered single pages, 256/batch", "report", scattered, "reuse"),
        ("pfn32-style consecutive pages, 256/batch", "inflate", legacy, "deflate"),
    ]


def run(
    pages: int, scattered_ranges: int, seed: int, budget_s: float, repeats: int = 3
) -> list[dict]:
    rows = []
    for name, kind, batches, undo in workloads(
        pages, np.random.default_rng(seed), scattered_ranges
    ):
        ranges = sum(b[0].size for b in batches)
        for structure, cls in STRUCTURES.items():
            best, best_undo = float("inf"), float("inf")
            for _ in range(repeats):  # best of N: the machine is shared and noisy
                tracker = cls(pages)
                done = applied = 0
                start = time.perf_counter()
                for pfns, counts in batches:
                    tracker.apply(kind, pfns, counts)
                    done += pfns.size
                    applied += 1
                    if time.perf_counter() - start > budget_s:
                        break
                best = min(best, time.perf_counter() - start)
                held = tracker.reported_pages + tracker.inflated_pages
                memory = tracker.memory_bytes()
                undo_start = time.perf_counter()
                undone = 0
                for pfns, counts in batches[: max(1, len(batches) // 8)]:
                    tracker.apply(undo, pfns, counts)
                    undone += pfns.size
                best_undo = min(best_undo, time.perf_counter() - undo_start)
            elapsed, undo_elapsed = best, best_undo
            rows.append(
                {
                    "workload": name,
                    "structure": structure,
                    "ranges": done,
                    "complete": done == ranges,
                    "apply_ranges_per_s": done / elapsed,
                    "apply_us_per_batch": 1e6 * elapsed / applied,
                    "undo_ranges_per_s": undone / undo_elapsed,
                    "pages_held": held,
                    "memory_bytes": memory,
                    "bytes_per_held_page": memory / held if held else 0.0,
                    "bytes_per_guest_page": memory / pages,
                }
            )
    return rows


def table(rows: list[dict], pages: int) -> str:
    lines = [
        f"Guest: {pages} pages ({pages * 4096 / 2**30:.0f} GiB). {platform.processor() or platform.machine()},"
        f" Python {platform.python_version()}, numpy {np.__version__}.",
        "",
        "| workload | structure | apply ranges/s | apply µs/batch | undo ranges/s | memory | bytes/guest page |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        note = "" if r["complete"] else f" (first {r['ranges']} ranges, time budget)"
        lines.append(
            f"| {r['workload']} | {r['structure']} | {r['apply_ranges_per_s']:,.0f}{note} |"
            f" {r['apply_us_per_batch']:.1f} | {r['undo_ranges_per_s']:,.0f} | {r['memory_bytes'] / 1024:,.0f} KiB |"
            f" {r['bytes_per_guest_page']:.4f} |"
        )
    lines.append("")
    lines.append(
        "memory: roaring's containers; for the flat bitmap, the span of it the batches wrote"
        " (it reserves 3 bits per guest page of address space with calloc, resident only"
        " where written)."
    )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 GiB guest, small batches")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--budget", type=float, default=20.0, help="seconds per structure and workload"
    )
    parser.add_argument("--repeats", type=int, default=3, help="best of N passes")
    parser.add_argument("--markdown", action="store_true", help="print only the markdown table")
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args(argv)
    pages = (1 << 18) if args.quick else (1 << 21)
    scattered = 8192 if args.quick else 1 << 18
    rows = run(pages, scattered, args.seed, 2.0 if args.quick else args.budget, args.repeats)
    print(table(rows, pages))
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"pages": pages, "rows": rows}, out, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
