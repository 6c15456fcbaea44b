"""Where each guest page lives in the VM's RAM file: the guest-physical → file-offset map.

A VMM does not lay guest RAM out flat. QEMU's x86 machines put a PCI hole below 4 GiB:
RAM is split into ``ram-below-4g`` (GPA 0 .. below_4g, file offset 0) and ``ram-above-4g``
(GPA 4 GiB on, file offset below_4g on), both aliases of one memory backend
(hw/i386/pc.c ``pc_memory_init``). ``pc`` splits once RAM reaches 3.5 GiB (below_4g =
3 GiB), ``q35`` once it reaches 2.75 GiB (below_4g = 2 GiB). So guest PFN 0x100000 of an
8 GiB ``pc`` guest is byte 3 GiB of its file, not 4 GiB, and the PFNs inside the hole are
no RAM at all.

The tracker keeps working in guest PFNs; only reclaim translates (``RamLayout.translate``).
A range that touches no RAM (the hole, or past the map) is rejected by the tracker with
reason ``not-ram`` (``RamLayout.holes``). The map comes from the VMM (QMP ``info mtree``,
:func:`from_mtree`) or from the inventory's ``ram_map``; without either, a guest whose RAM
is too large to be flat in every QEMU x86 machine is refused (:data:`CONTIGUOUS_LIMIT`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from shared.vocabulary import PAGE_SIZE

#: RAM of this many bytes or more is split around the PCI hole by QEMU's ``q35`` machine
#: (0xb0000000; ``pc`` splits from 0xe0000000): below it, GPA == file offset on both.
CONTIGUOUS_LIMIT = 0xB0000000
#: Most regions a map may have (QEMU x86 uses 2; NUMA or hotplugged DIMMs add a few).
MAX_REGIONS = 64
U64 = np.uint64


class LayoutError(ValueError):
    """A RAM map that cannot be used; the message says which region and why."""


@dataclass(frozen=True, slots=True)
class RamRegion:
    """``size`` bytes of RAM at guest-physical ``gpa``, stored at file ``offset``."""

    gpa: int
    size: int
    offset: int

    @property
    def end(self) -> int:
        return self.gpa + self.size

    def to_json(self) -> dict:
        return {"gpa": self.gpa, "size": self.size, "offset": self.offset}


class RamLayout:
    """An ordered, page-aligned, non-overlapping set of regions (in GPA and in the file)."""

    __slots__ = ("regions", "span_pages", "ram_pages", "file_bytes", "holes", "_starts", "_ends", "_deltas")

    def __init__(self, regions: Iterable[RamRegion]) -> None:
        regions = tuple(sorted(regions, key=lambda r: r.gpa))
        if not regions:
            raise LayoutError("a RAM map needs at least one region")
        if len(regions) > MAX_REGIONS:
            raise LayoutError(f"a RAM map has at most {MAX_REGIONS} regions, got {len(regions)}")
        for number, region in enumerate(regions):
            for name in ("gpa", "size", "offset"):
                value = getattr(region, name)
                if type(value) is not int or value < 0 or value % PAGE_SIZE:
                    raise LayoutError(f"region {number}: {name} must be a whole number of "
                                      f"{PAGE_SIZE}-byte pages, got {value!r:.40}")
            if not region.size:
                raise LayoutError(f"region {number}: size must not be 0")
            if region.end > (1 << 64) or region.offset + region.size > (1 << 63):
                raise LayoutError(f"region {number}: past the 64-bit address space")
        for before, after in zip(regions, regions[1:], strict=False):
            if after.gpa < before.end:
                raise LayoutError(f"regions at GPA {before.gpa:#x} and {after.gpa:#x} overlap")
        by_offset = sorted(regions, key=lambda r: r.offset)
        for before, after in zip(by_offset, by_offset[1:], strict=False):
            if after.offset < before.offset + before.size:
                raise LayoutError(f"regions at file offsets {before.offset:#x} and {after.offset:#x} overlap")
        self.regions = regions
        self.span_pages = regions[-1].end // PAGE_SIZE
        self.ram_pages = sum(r.size for r in regions) // PAGE_SIZE
        self.file_bytes = max(r.offset + r.size for r in regions)
        holes, at = [], 0
        for region in regions:
            if region.gpa > at:
                holes.append((at // PAGE_SIZE, region.gpa // PAGE_SIZE))
            at = region.end
        #: guest page ranges [start, end) below ``span_pages`` that are not RAM
        self.holes: tuple[tuple[int, int], ...] = tuple(holes)
        self._starts = np.array([r.gpa // PAGE_SIZE for r in regions], dtype=U64)
        self._ends = np.array([r.end // PAGE_SIZE for r in regions], dtype=U64)
        self._deltas = [r.offset // PAGE_SIZE - r.gpa // PAGE_SIZE for r in regions]

    # -- constructors -------------------------------------------------------------------

    @classmethod
    def identity(cls, pages: int) -> RamLayout:
        """Flat RAM: guest page N is file page N (small VMs, the simulated guests)."""
        return cls([RamRegion(0, pages * PAGE_SIZE, 0)])

    @classmethod
    def parse(cls, entries) -> RamLayout:
        """The inventory's ``ram_map``: a list of ``{gpa, size, offset}`` (integers, bytes)."""
        if not isinstance(entries, list | tuple):
            raise LayoutError("ram_map must be a list of {gpa, size, offset} tables")
        regions = []
        for number, entry in enumerate(entries[: MAX_REGIONS + 1]):
            if not isinstance(entry, Mapping) or sorted(entry) != ["gpa", "offset", "size"]:
                raise LayoutError(f"ram_map[{number}] must have exactly the keys gpa, size, offset")
            values = [entry[key] for key in ("gpa", "size", "offset")]
            if any(type(value) is not int for value in values):
                raise LayoutError(f"ram_map[{number}]: gpa, size and offset are byte counts (integers)")
            regions.append(RamRegion(*values))
        return cls(regions)

    # -- views --------------------------------------------------------------------------

    @property
    def flat(self) -> bool:
        """GPA == file offset everywhere and no hole: translation is the identity."""
        return len(self.regions) == 1 and self.regions[0].gpa == 0 and self.regions[0].offset == 0

    def to_json(self) -> list[dict]:
        return [region.to_json() for region in self.regions]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RamLayout) and self.regions == other.regions

    def __hash__(self) -> int:
        return hash(self.regions)

    def __repr__(self) -> str:
        parts = ", ".join(f"{r.gpa:#x}+{r.size:#x}@{r.offset:#x}" for r in self.regions)
        return f"RamLayout({parts})"

    # -- translation --------------------------------------------------------------------

    def translate(self, pfns: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Guest page ranges → file page ranges (uint64 arrays), split at region edges;
        parts in no region are dropped (the tracker rejected such ranges already)."""
        if self.flat:
            end = self._ends[0]
            inside = pfns < end
            pfns, counts = pfns[inside], counts[inside]
            return pfns, np.minimum(counts, end - pfns)
        out_pfns, out_counts = [], []
        ends = pfns + counts
        for start, stop, delta in zip(self._starts, self._ends, self._deltas, strict=True):
            low = np.maximum(pfns, start)
            high = np.minimum(ends, stop)
            keep = high > low
            if keep.any():
                low = low[keep]
                out_counts.append(high[keep] - low)
                out_pfns.append(low + U64(delta) if delta >= 0 else low - U64(-delta))
        if not out_pfns:
            empty = np.empty(0, dtype=U64)
            return empty, empty
        return np.concatenate(out_pfns), np.concatenate(out_counts)


#: One alias line of QEMU's ``info mtree`` (tree view), e.g.
#: ``0000000100000000-000000013fffffff (prio 0, ram): alias ram-above-4g @mem 00000000c0000000-00000000ffffffff``
_ALIAS = re.compile(
    r"^\s*([0-9a-f]+)-([0-9a-f]+) \(prio -?\d+, ram\): alias (ram-(?:below|above)-4g) "
    r"@(\S+) ([0-9a-f]+)-([0-9a-f]+)", re.MULTILINE)


def from_mtree(text: str) -> tuple[RamLayout, str]:
    """The map and the backing memory region's name, from HMP ``info mtree`` (tree view).

    QEMU's x86 machines always alias ``ram-below-4g`` (and, when RAM crosses the hole,
    ``ram-above-4g``) into the system address space; each line gives the GPA range and the
    backend range, which is the file range of a ``memory-backend-file``. The same tree is
    printed under several address spaces: repeats must agree.
    """
    found: dict[str, tuple[int, int, int, str]] = {}
    for match in _ALIAS.finditer(text):
        gpa, last, name, backend, offset, offset_last = match.groups()
        gpa, last, offset, offset_last = (int(x, 16) for x in (gpa, last, offset, offset_last))
        if last - gpa != offset_last - offset:
            raise LayoutError(f"info mtree: {name} maps {last - gpa + 1} bytes onto {offset_last - offset + 1}")
        value = (gpa, last - gpa + 1, offset, backend)
        if found.setdefault(name, value) != value:
            raise LayoutError(f"info mtree shows {name} twice, differently")
    if "ram-below-4g" not in found:
        raise LayoutError("info mtree has no ram-below-4g alias: not a QEMU x86 pc/q35 machine?")
    backends = {value[3] for value in found.values()}
    if len(backends) != 1:
        raise LayoutError(f"info mtree: RAM comes from several backends {sorted(backends)}")
    layout = RamLayout(RamRegion(gpa, size, offset) for gpa, size, offset, _ in found.values())
    return layout, backends.pop()


def needs_map(memory_bytes: int) -> bool:
    """True when a VM this large may have a hole in its RAM, so a flat map would be a guess."""
    return memory_bytes >= CONTIGUOUS_LIMIT
