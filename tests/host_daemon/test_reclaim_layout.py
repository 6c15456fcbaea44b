"""Punching a VM's RAM file through its GPA map: the pages above the PCI hole are stored lower."""

from __future__ import annotations

import numpy as np

from host_daemon.ramlayout import RamLayout, RamRegion
from host_daemon.reclaim import PAGE_SIZE, RamFile

from .test_reclaim import fill, first_words, ram_dir  # noqa: F401 - the fixture

U64 = np.uint64


def test_a_range_above_the_hole_punches_the_file_pages_below_it(ram_dir):  # noqa: F811
    # A scaled-down pc guest: 64 pages below the "hole", which spans GPA pages 64..96, and
    # 32 pages above it stored at file pages 64..96 (off = gpa - hole_end + below).
    layout = RamLayout([RamRegion(0, 64 * PAGE_SIZE, 0), RamRegion(96 * PAGE_SIZE, 32 * PAGE_SIZE, 64 * PAGE_SIZE)])
    ram = RamFile.open(ram_dir, "vm1", 96)
    ram.layout = layout
    mapping = fill(ram, 96)
    freed = ram.discard(np.array([100, 60], dtype=U64), np.array([4, 2], dtype=U64))
    assert freed == 6 * PAGE_SIZE
    words = first_words(mapping, 96)
    gone = {60, 61, 68, 69, 70, 71}  # GPA 60-61 in place, GPA 100-103 at file pages 68-71
    expected = [0 if page in gone else page + 1 for page in range(96)]
    assert words.tolist() == expected
    mapping.close()
    ram.close()
