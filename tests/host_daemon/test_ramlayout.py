"""The GPA -> RAM-file map (host_daemon/ramlayout.py): translation, holes, bad maps."""

from __future__ import annotations

import numpy as np
import pytest

from host_daemon.ramlayout import (
    CONTIGUOUS_LIMIT,
    LayoutError,
    RamLayout,
    RamRegion,
    from_mtree,
    needs_map,
)

from .vmm.fakeqemu import GIB, mtree

PAGES_PER_GIB = GIB >> 12
U64 = np.uint64


def pc(memory_gib: int) -> RamLayout:
    """An x86 ``pc`` guest of that size above 3.5 GiB: 3 GiB low, the rest from 4 GiB."""
    return RamLayout([RamRegion(0, 3 * GIB, 0), RamRegion(4 * GIB, (memory_gib - 3) * GIB, 3 * GIB)])


def translate(layout, ranges):
    pfns = np.array([p for p, _ in ranges], dtype=U64)
    counts = np.array([c for _, c in ranges], dtype=U64)
    out = layout.translate(pfns, counts)
    return sorted(zip(out[0].tolist(), out[1].tolist(), strict=True))


def test_the_pc_split_as_measured_in_a_real_guest():
    layout = pc(8)
    assert layout.span_pages == 9 * PAGES_PER_GIB
    assert layout.ram_pages == 8 * PAGES_PER_GIB
    assert layout.file_bytes == 8 * GIB
    assert layout.holes == ((3 * PAGES_PER_GIB, 4 * PAGES_PER_GIB),)
    # GPA 4 GiB is file byte 3 GiB (off = gpa - 4 GiB + below_4g); below the hole GPA == offset
    assert translate(layout, [(4 * PAGES_PER_GIB, 512), (100, 8)]) == [(100, 8), (3 * PAGES_PER_GIB, 512)]


def test_ranges_are_split_at_region_edges_and_parts_outside_ram_dropped():
    layout = RamLayout([RamRegion(0, GIB, 0), RamRegion(GIB, GIB, 5 * GIB)])  # adjacent GPAs, far apart in the file
    assert translate(layout, [(PAGES_PER_GIB - 2, 4)]) == [(PAGES_PER_GIB - 2, 2), (5 * PAGES_PER_GIB, 2)]
    assert translate(pc(8), [(3 * PAGES_PER_GIB - 1, 2)]) == [(3 * PAGES_PER_GIB - 1, 1)]  # the hole part: gone
    assert translate(pc(8), [(9 * PAGES_PER_GIB, 5)]) == []  # past the map


def test_identity_is_flat_and_clips_at_the_end():
    layout = RamLayout.identity(1000)
    assert layout.flat and layout.holes == () and layout.span_pages == 1000
    assert translate(layout, [(990, 20), (5, 1)]) == [(5, 1), (990, 10)]


@pytest.mark.parametrize("entries, message", [
    ([], "at least one region"),
    ("0-1G", "must be a list"),
    ([{"gpa": 0, "size": GIB}], "exactly the keys"),
    ([{"gpa": 0, "size": GIB, "offset": "0"}], "integers"),
    ([{"gpa": 0, "size": 4097, "offset": 0}], "whole number"),
    ([{"gpa": 0, "size": 0, "offset": 0}], "must not be 0"),
    ([{"gpa": 0, "size": 2 * GIB, "offset": 0}, {"gpa": GIB, "size": GIB, "offset": 2 * GIB}], "overlap"),
    ([{"gpa": 0, "size": GIB, "offset": 0}, {"gpa": 4 * GIB, "size": GIB, "offset": 0}], "file offsets"),
    ([{"gpa": i * GIB, "size": GIB, "offset": i * GIB} for i in range(65)], "at most 64"),
])
def test_a_bad_ram_map_is_refused_with_its_reason(entries, message):
    with pytest.raises(LayoutError, match=message):
        RamLayout.parse(entries)


def test_the_inventory_form_round_trips():
    layout = pc(5)
    assert RamLayout.parse(layout.to_json()) == layout


@pytest.mark.parametrize("memory, below, regions", [
    (8 * GIB, 3 * GIB, 2), (5 * GIB, 3 * GIB, 2), (3 * GIB, 2 * GIB, 2), (GIB, 3 * GIB, 1)])
def test_info_mtree_as_qemu_prints_it(memory, below, regions):
    layout, backend = from_mtree(mtree(memory, below) * 2)  # printed once per address space
    assert backend == "mem" and len(layout.regions) == regions
    assert layout.ram_pages * 4096 == memory and layout.file_bytes == memory


def test_info_mtree_without_the_aliases_is_refused():
    with pytest.raises(LayoutError, match="no ram-below-4g"):
        from_mtree("address-space: memory\n  0000000000000000-ffffffffffffffff (prio 0, i/o): system\n")


def test_which_sizes_need_a_map():
    assert not needs_map(CONTIGUOUS_LIMIT - 4096) and needs_map(CONTIGUOUS_LIMIT)
    assert not needs_map(2 * GIB) and needs_map(3 * GIB)
