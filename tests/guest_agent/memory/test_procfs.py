"""procfs source: generated kpageflags/kpagecount/iomem fixtures, and the real files when readable."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from guest_agent.memory import procfs
from guest_agent.memory.procfs import (
    KPF_BUDDY,
    scan,
    scan_free_runs,
    system_ram_pages,
    system_ram_ranges,
)
from shared.ranges import expand_pages

BUDDY = 1 << KPF_BUDDY
LRU_MMAP = (1 << 5) | (1 << 11)
PAGES = 8192


def make_tree(root: Path, flags: np.ndarray, counts: np.ndarray, iomem: str) -> Path:
    proc = root / "proc"
    proc.mkdir(parents=True, exist_ok=True)
    flags.astype("<u8").tofile(proc / "kpageflags")
    counts.astype("<u8").tofile(proc / "kpagecount")
    (proc / "iomem").write_text(iomem)
    return root


# System RAM: pages 1..159 (0x1000-0x9ffff) and 256..8191; a reserved hole between.
IOMEM = """\
00000000-00000fff : Reserved
00001000-0009ffff : System RAM
000a0000-000fffff : PCI Bus 0000:00
  000a0000-000bffff : Video RAM area
00100000-01ffffff : System RAM
  01000000-01bfffff : Kernel code
fee00000-fee00fff : Local APIC
"""


def layout(tails: bool):
    """Free blocks (pfn, order) written as a current (tails=True) or head-only kernel would."""
    flags = np.full(PAGES, LRU_MMAP, dtype=np.uint64)
    counts = np.ones(PAGES, dtype=np.uint64)
    blocks = [(2, 1), (8, 3), (160, 5), (512, 9), (1024, 10), (2048, 10), (4096, 0), (8190, 1)]
    for pfn, order in blocks:
        size = 1 << order
        counts[pfn : pfn + size] = 0
        flags[pfn : pfn + size] = BUDDY if tails else 0
        flags[pfn] = BUDDY
    counts[4097:4100] = 0  # flagless kernel pages after a free page (vmalloc-like)
    flags[4097:4100] = 0
    return flags, counts, blocks


def expected_pages(blocks, ram=((1, 159), (256, PAGES - 256))):
    pages = set()
    for pfn, order in blocks:
        pages |= set(range(pfn, pfn + (1 << order)))
    inside = set()
    for lo, n in ram:
        inside |= set(range(lo, lo + n))
    return pages & inside


def test_system_ram_ranges_and_pages(tmp_path):
    root = make_tree(tmp_path, np.zeros(1), np.zeros(1), IOMEM)
    p, c = system_ram_ranges(root)
    assert p.tolist() == [1, 256] and c.tolist() == [159, PAGES - 256]
    assert system_ram_pages(root) == PAGES  # the span, not the sum


def test_hidden_iomem_is_refused(tmp_path):
    root = make_tree(tmp_path, np.zeros(1), np.zeros(1), "00000000-00000000 : System RAM\n")
    with pytest.raises(PermissionError):
        scan_free_runs(root)


@pytest.mark.parametrize("chunk_pages", [1024, procfs.CHUNK_PAGES])
def test_current_kernel_layout_gives_exactly_the_free_blocks_in_system_ram(tmp_path, chunk_pages):
    flags, counts, blocks = layout(tails=True)
    root = make_tree(tmp_path, flags, counts, IOMEM)
    result = scan(root, chunk_pages=chunk_pages)
    assert result.mode == "all-pages"
    got = set(expand_pages(result.pfns, result.counts).tolist())
    # the block at 160 lies in the hole between the RAM ranges
    assert got == expected_pages(blocks)
    assert (np.diff(result.pfns.astype(np.int64)) > 0).all()
    # adjacent blocks 512 (order 9), 1024 and 2048 (order 10) come out as one coalesced run
    assert dict(zip(result.pfns.tolist(), result.counts.tolist(), strict=True))[512] == 512 + 2048
    assert result.free_pages == len(got)


def test_counted_buddy_pages_are_not_free(tmp_path):
    flags, counts, blocks = layout(tails=True)
    counts[520] = 1  # e.g. allocated between the two reads
    root = make_tree(tmp_path, flags, counts, IOMEM)
    got = set(expand_pages(*scan_free_runs(root)).tolist())
    assert 520 not in got and 519 in got and 521 in got


def test_head_only_kernel_blocks_are_recovered_and_auto_detected(tmp_path):
    flags, counts, blocks = layout(tails=False)
    root = make_tree(tmp_path, flags, counts, IOMEM)
    result = scan(root)
    assert result.mode == "heads"
    got = set(expand_pages(result.pfns, result.counts).tolist())
    expected = expected_pages(blocks)
    # the page at 4096 is followed by 3 flagless zero-count pages: read as an order-2 block
    assert got - expected == {4097, 4098, 4099}
    assert expected <= got
    # forcing the all-pages view on a head-only kernel sees only the heads
    assert scan(root, mode="all-pages").free_pages == len([b for b in blocks if b[0] != 160])


def test_limit_pages_stops_early(tmp_path):
    flags, counts, blocks = layout(tails=True)
    root = make_tree(tmp_path, flags, counts, IOMEM)
    result = scan(root, limit_pages=1024, chunk_pages=1024)
    assert result.ram_pages == 1024  # 159 pages of the first range + 865 of the second
    got = set(expand_pages(result.pfns, result.counts).tolist())
    assert got == {p for p in expected_pages(blocks) if p < 256 + 865}


def test_files_shorter_than_system_ram(tmp_path):
    flags, counts, blocks = layout(tails=True)
    root = make_tree(tmp_path, flags[:3000], counts[:3000], IOMEM)
    got = set(expand_pages(*scan_free_runs(root)).tolist())
    assert got == {p for p in expected_pages(blocks) if p < 3000}


def test_bad_arguments(tmp_path):
    root = make_tree(tmp_path, np.zeros(1), np.zeros(1), IOMEM)
    with pytest.raises(ValueError):
        scan(root, mode="guess")
    with pytest.raises(ValueError):
        scan(root, chunk_pages=1000)


def _real_files_readable() -> bool:
    try:
        with open("/proc/kpageflags", "rb") as f:
            os.pread(f.fileno(), 8, 0)
        system_ram_ranges("/")
        return True
    except (OSError, PermissionError):
        return False


@pytest.mark.slow
@pytest.mark.skipif(
    not _real_files_readable(), reason="needs root: /proc/kpageflags and iomem addresses"
)
def test_real_machine_scan_is_sane():
    result = scan("/", limit_pages=1 << 18)  # the first GiB of System RAM keeps it quick
    mem_total_kb = int(
        next(
            ln
            for ln in Path("/proc/meminfo").read_text().splitlines()
            if ln.startswith("MemTotal:")
        ).split()[1]
    )
    assert result.mode == "all-pages"  # this kernel flags every page of a free block
    assert 0 < result.free_pages <= mem_total_kb // 4
    ram_p, ram_c = system_ram_ranges("/")
    ends = result.pfns + result.counts
    # every run lies inside one System RAM range
    idx = np.searchsorted(ram_p, result.pfns, side="right") - 1
    assert (idx >= 0).all()
    assert (ends <= ram_p[idx] + ram_c[idx]).all()
    assert (np.diff(result.pfns.astype(np.int64)) > 0).all()
