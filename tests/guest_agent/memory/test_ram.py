"""SharedRam canaries on a real tmpfs file: they survive, holes are caught, nothing else is touched."""

from __future__ import annotations

import mmap
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

from guest_agent.memory.ram import PAGE_SIZE, SharedRam

PAGES = 256


@pytest.fixture
def ram_file():
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    folder = Path(tempfile.mkdtemp(prefix="g1-ram-", dir=base))
    path = folder / "g1.ram"
    with open(path, "wb") as f:
        f.truncate(PAGES * PAGE_SIZE)  # sparse, as the host creates it
    yield path
    shutil.rmtree(folder)


def punch(path: Path, pfn: int, count: int) -> None:
    """What the host does on REPORT/INFLATE: give the pages back to the kernel."""
    fd = os.open(path, os.O_RDWR)
    try:
        with mmap.mmap(fd, PAGES * PAGE_SIZE, flags=mmap.MAP_SHARED) as m:
            m.madvise(mmap.MADV_REMOVE, pfn * PAGE_SIZE, count * PAGE_SIZE)
    finally:
        os.close(fd)


def allocated_pages(path: Path) -> int:
    return os.stat(path).st_blocks * 512 // PAGE_SIZE


PFNS = np.array([0, 10, 100], dtype=np.uint64)
COUNTS = np.array([4, 30, 64], dtype=np.uint64)


def test_canaries_survive_and_are_seen_through_another_mapping(ram_file):
    with SharedRam(ram_file, PAGES) as ram:
        assert ram.write_canaries(PFNS, COUNTS, 7) == 98
        assert ram.check_canaries(PFNS, COUNTS, 7) == 0
    with SharedRam(ram_file, PAGES) as again:  # e.g. the agent restarted and mapped it anew
        assert again.check_canaries(PFNS, COUNTS, 7) == 0
        assert again.check_canaries(PFNS, COUNTS, 8) == 98  # wrong generation fails everywhere


def test_a_hole_under_an_allocated_page_is_a_failure(ram_file):
    with SharedRam(ram_file, PAGES) as ram:
        ram.write_canaries(PFNS, COUNTS, 3)
        punch(ram_file, 20, 5)  # inside the second range
        punch(ram_file, 0, 1)  # PFN 0: a zero page must not pass as (PFN 0, ...)
        assert ram.check_canaries(PFNS, COUNTS, 3) == 6
        assert ram.check_canaries(PFNS[2:], COUNTS[2:], 3) == 0
        assert ram.check_pages(np.arange(20, 25), 3) == 5


def test_pages_outside_the_ranges_are_untouched(ram_file):
    with SharedRam(ram_file, PAGES) as ram:
        ram.write_canaries(PFNS, COUNTS, 1)
        assert allocated_pages(ram_file) == 98  # tmpfs allocated exactly the written pages
    data = np.fromfile(ram_file, dtype=np.uint8).reshape(PAGES, PAGE_SIZE)
    inside = np.zeros(PAGES, dtype=bool)
    for p, c in zip(PFNS.tolist(), COUNTS.tolist(), strict=True):
        inside[p : p + c] = True
    assert not data[~inside].any()
    assert not data[inside, 16:].any()  # only the 16-byte canary of each page is written


def test_many_ranges_and_per_page_generations(ram_file):
    with SharedRam(ram_file, PAGES) as ram:
        pfns = np.arange(0, PAGES, 2, dtype=np.uint64)  # 128 one-page ranges: scatter path
        counts = np.ones(pfns.size, dtype=np.uint64)
        gens = np.arange(pfns.size, dtype=np.uint64) + 1
        ram.write_canaries(pfns, counts, gens)
        assert ram.check_canaries(pfns, counts, gens) == 0
        gens[5] += 1
        assert ram.check_canaries(pfns, counts, gens) == 1
        with pytest.raises(ValueError):
            ram.check_canaries(pfns, counts, gens[:3])


def test_sample_check_finds_holes_only_where_they_are(ram_file):
    rng = np.random.default_rng(1)
    with SharedRam(ram_file, PAGES) as ram:
        ram.write_canaries(PFNS, COUNTS, 2)
        checked, failed = ram.sample_check(PFNS, COUNTS, 2, 1000, rng)
        assert (checked, failed) == (98, 0)  # a sample larger than the ranges checks them all
        punch(ram_file, 100, 64)
        checked, failed = ram.sample_check(PFNS, COUNTS, 2, 50, rng)
        assert checked == 50 and 0 < failed < 50
        assert ram.sample_check(PFNS[:2], COUNTS[:2], 2, 50, rng) == (34, 0)


def test_bad_ranges_are_refused(ram_file):
    with SharedRam(ram_file, PAGES) as ram:
        with pytest.raises(ValueError):
            ram.write_canaries([PAGES - 1], [2], 1)
        with pytest.raises(ValueError):
            ram.write_canaries([0], [0], 1)
        with pytest.raises(ValueError):
            ram.check_canaries([1, 2], [1], 1)
        with pytest.raises(ValueError):
            ram.check_pages([PAGES], 1)


def test_file_too_small_is_refused(ram_file):
    with pytest.raises(ValueError, match="needs"):
        SharedRam(ram_file, PAGES + 1)


def test_anonymous_fallback_works_without_a_file():
    with SharedRam.anonymous(64) as ram:
        assert not ram.shared
        ram.write_canaries([3], [10], 9)
        assert ram.check_canaries([3], [10], 9) == 0
        assert ram.check_canaries([0], [3], 9) == 3  # never written
