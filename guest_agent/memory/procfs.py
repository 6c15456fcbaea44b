"""The procfs source: the real free pages of the Linux machine the agent runs on.

**What this reports is "possibly reclaimable" memory, never reclaimed memory.** The
agent cannot isolate kernel pages: a page free at scan time may be allocated a
microsecond later. So this source only feeds free page *hinting* (HINT batches for a
host hint command, as virtio-balloon's free page hinting, where the guest may reuse a
hinted page at any time), never REPORT or INFLATE.

How the free pages are found (Documentation/admin-guide/mm/pagemap.rst):

- ``/proc/kpageflags`` and ``/proc/kpagecount`` hold one little-endian u64 per PFN. They
  are read with ``pread`` at 8-byte aligned offsets in chunks (``CHUNK_PAGES``, aligned
  to 4 MiB so no buddy block straddles two chunks). Flags and counts are read for the same
  chunk one right after the other, which keeps the race between the two files short. A
  whole-file ``read`` of these files fails with EINVAL, and they need root.
- Only PFNs inside the top-level ``System RAM`` ranges of ``/proc/iomem`` are kept. As
  non-root, iomem shows zeros, so the scan refuses to run.
- Free = ``KPF_BUDDY`` (bit 10) set and a zero count. Current kernels set KPF_BUDDY on
  every page of a free block: fs/proc/page.c tests ``PageBuddy(page)`` on the head and
  ``page_count(page) == 0 && is_free_buddy_page(page)`` on the tails. Older kernels flag
  only the head page ("PG_buddy ... will only be set on the head page"), and kpageflags
  never shows a block's order. ``tools/mm/page-types`` simply lists the flagged pages.
  For head-only kernels we follow each BUDDY head with the flagless, zero-count pages
  after it. The extension stops at the next flagged page, is capped by the head's
  alignment and by order 10, and is rounded down to a power of two, so it yields the
  largest block the head can start. This can overestimate when flagless kernel pages
  (vmalloc, stacks) follow a small free block. ``mode="auto"`` computes both views in
  the same pass and uses the head-extension view only when it finds more than twice as
  many pages, which is what a head-only kernel looks like.

Runs are coalesced and returned as ``(pfns, counts)`` uint64 arrays, ready for
``shared.ranges``. ``root`` points at a directory tree that holds ``proc/``, so the tests
can use generated fixtures.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.ranges import coalesce_ranges
from shared.vocabulary import PAGE_SIZE

KPF_BUDDY = 10
MAX_ORDER = 10
#: Pages read per pread (512 KiB of flags); a multiple of 2**MAX_ORDER.
CHUNK_PAGES = 1 << 16
_BUDDY = np.uint64(1 << KPF_BUDDY)


def _proc(root, name: str) -> Path:
    return Path(root) / "proc" / name


class _Sysinfo(ctypes.Structure):
    """struct sysinfo (include/uapi/linux/sysinfo.h)."""

    _fields_ = [("uptime", ctypes.c_long), ("loads", ctypes.c_ulong * 3), ("totalram", ctypes.c_ulong),
                ("freeram", ctypes.c_ulong), ("sharedram", ctypes.c_ulong), ("bufferram", ctypes.c_ulong),
                ("totalswap", ctypes.c_ulong), ("freeswap", ctypes.c_ulong), ("procs", ctypes.c_ushort),
                ("pad", ctypes.c_ushort), ("totalhigh", ctypes.c_ulong), ("freehigh", ctypes.c_ulong),
                ("mem_unit", ctypes.c_uint), ("_f", ctypes.c_char * 8)]


_sysinfo = None


def free_bytes(root="/") -> int:
    """The machine's free memory, ``MemFree``, as cheaply as the kernel gives it.

    For the live machine that is sysinfo(2)'s ``freeram`` — the counter /proc/meminfo prints
    as MemFree (both are NR_FREE_PAGES: kernel/sys.c do_sysinfo → si_meminfo,
    fs/proc/meminfo.c) — one system call instead of the kernel formatting ~50 lines and the
    agent parsing them, which under TCG is most of a 1 s poll's cost. A fixture ``root``
    is read from its proc/meminfo. OSError when neither can be read.
    """
    global _sysinfo
    if str(root) == "/":
        if _sysinfo is None:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            _sysinfo = libc.sysinfo
            _sysinfo.argtypes = [ctypes.POINTER(_Sysinfo)]
        info = _Sysinfo()
        if _sysinfo(ctypes.byref(info)) != 0:
            raise OSError(ctypes.get_errno(), "sysinfo failed")
        return int(info.freeram) * int(info.mem_unit or 1)
    for line in _proc(root, "meminfo").read_text().splitlines():
        if line.startswith("MemFree:"):
            return int(line.split()[1]) * 1024
    raise OSError(f"{_proc(root, 'meminfo')} has no MemFree line")


def system_ram_ranges(root="/") -> tuple[np.ndarray, np.ndarray]:
    """Top-level ``System RAM`` ranges of /proc/iomem as page ranges (whole pages only)."""
    starts, counts = [], []
    for line in _proc(root, "iomem").read_text().splitlines():
        if line[:1].isspace():
            continue  # nested resources (kernel code, ...) are inside System RAM already
        span, sep, name = line.partition(" : ")
        if not sep or name.strip() != "System RAM":
            continue
        lo_text, _, hi_text = span.strip().partition("-")
        lo, hi = int(lo_text, 16), int(hi_text, 16)
        first = -(-lo // PAGE_SIZE)
        end = (hi + 1) // PAGE_SIZE
        if end > first:
            starts.append(first)
            counts.append(end - first)
    if not starts:
        raise PermissionError(
            f"no System RAM in {_proc(root, 'iomem')} (addresses are hidden unless root)"
        )
    order = np.argsort(starts)
    return np.array(starts, dtype=np.uint64)[order], np.array(counts, dtype=np.uint64)[order]


def system_ram_pages(root="/") -> int:
    """The PFN span of System RAM (end of the highest range): the ``pages`` to announce.

    The host checks every PFN against it, so it is the end, not the sum, of the ranges."""
    pfns, counts = system_ram_ranges(root)
    return int((pfns + counts).max())


def _pread_u64(fd: int, first: int, n: int) -> np.ndarray:
    """``n`` u64 entries starting at PFN ``first`` (fewer if the file ends)."""
    want = n * 8
    parts, got = [], 0
    while got < want:
        data = os.pread(fd, want - got, first * 8 + got)
        if not data:
            break
        parts.append(data)
        got += len(data)
    got -= got % 8
    return np.frombuffer(b"".join(parts)[:got], dtype="<u8")


def _runs(mask: np.ndarray, base: int) -> tuple[np.ndarray, np.ndarray]:
    edges = np.diff(np.concatenate(([False], mask, [False])).astype(np.int8))
    starts = np.flatnonzero(edges == 1)
    ends = np.flatnonzero(edges == -1)
    return (starts + base).astype(np.uint64), (ends - starts).astype(np.uint64)


def _head_blocks(flags: np.ndarray, counts: np.ndarray, base: int) -> tuple[np.ndarray, np.ndarray]:
    """Head-only kernels: the largest aligned block each free BUDDY head can start."""
    zero = counts == 0
    heads = np.flatnonzero((flags & _BUDDY).astype(bool) & zero)
    if not heads.size:
        return np.empty(0, np.uint64), np.empty(0, np.uint64)
    stop = np.flatnonzero((flags != 0) | ~zero)  # any flagged or counted page ends a block
    nxt = np.searchsorted(stop, heads, side="right")
    limit = np.where(nxt < stop.size, stop[np.minimum(nxt, stop.size - 1)], flags.size)
    length = (limit - heads).astype(np.int64)
    pfn = (heads + base).astype(np.int64)
    align = np.where(pfn == 0, 1 << MAX_ORDER, pfn & -pfn)
    length = np.minimum(length, np.minimum(align, 1 << MAX_ORDER))
    size = np.left_shift(1, np.floor(np.log2(length)).astype(np.int64))
    return pfn.astype(np.uint64), size.astype(np.uint64)


@dataclass
class FreeScan:
    pfns: np.ndarray
    counts: np.ndarray
    mode: str  # "all-pages" | "heads"
    free_pages: int
    ram_pages: int
    seconds: float


def scan(
    root="/", *, mode: str = "auto", chunk_pages: int = CHUNK_PAGES, limit_pages: int | None = None
) -> FreeScan:
    """Scan the free pages inside System RAM (see the module docstring).

    ``limit_pages`` stops after that many pages of System RAM (lowest PFNs first): a quick
    partial snapshot — a full scan of a large machine takes seconds of kernel time."""
    if mode not in ("auto", "all-pages", "heads"):
        raise ValueError(f"mode must be auto, all-pages or heads, got {mode!r}")
    if chunk_pages < 1 or chunk_pages % (1 << MAX_ORDER):
        raise ValueError(f"chunk_pages must be a positive multiple of {1 << MAX_ORDER}")
    t0 = time.perf_counter()
    ram_pfns, ram_counts = system_ram_ranges(root)
    if limit_pages is not None:
        budget = np.cumsum(ram_counts) - ram_counts  # RAM pages before each range
        keep = budget < limit_pages
        ram_pfns = ram_pfns[keep]
        ram_counts = np.minimum(ram_counts[keep], np.uint64(limit_pages) - budget[keep])
    flags_fd = os.open(_proc(root, "kpageflags"), os.O_RDONLY | os.O_CLOEXEC)
    try:
        count_fd = os.open(_proc(root, "kpagecount"), os.O_RDONLY | os.O_CLOEXEC)
    except BaseException:
        os.close(flags_fd)
        raise
    all_p, all_c, head_p, head_c = [], [], [], []
    try:
        for lo, n in zip(ram_pfns.tolist(), ram_counts.tolist(), strict=True):
            hi = lo + n
            window = lo - lo % chunk_pages
            while window < hi:
                first, last = max(window, lo), min(window + chunk_pages, hi)
                flags = _pread_u64(flags_fd, first, last - first)
                counts = _pread_u64(count_fd, first, last - first)
                m = min(flags.size, counts.size)
                flags, counts = flags[:m], counts[:m]
                if mode != "heads":
                    p, c = _runs((flags & _BUDDY).astype(bool) & (counts == 0), first)
                    all_p.append(p)
                    all_c.append(c)
                if mode != "all-pages":
                    p, c = _head_blocks(flags, counts, first)
                    head_p.append(p)
                    head_c.append(c)
                if m < last - first:
                    break  # the files end before System RAM does
                window += chunk_pages
    finally:
        os.close(flags_fd)
        os.close(count_fd)

    def merged(ps, cs):
        if not ps:
            return np.empty(0, np.uint64), np.empty(0, np.uint64)
        return coalesce_ranges(np.concatenate(ps), np.concatenate(cs))

    all_ranges = merged(all_p, all_c)
    head_ranges = merged(head_p, head_c)
    if mode == "auto":
        mode = "heads" if int(head_ranges[1].sum()) > 2 * int(all_ranges[1].sum()) else "all-pages"
    pfns, counts = head_ranges if mode == "heads" else all_ranges
    return FreeScan(
        pfns, counts, mode, int(counts.sum()), int(ram_counts.sum()), time.perf_counter() - t0
    )


def scan_free_runs(root="/", **kw) -> tuple[np.ndarray, np.ndarray]:
    """Free page runs as ``(pfns, counts)``: "possibly reclaimable" hints, never isolated."""
    result = scan(root, **kw)
    return result.pfns, result.counts
