"""The linux source: the real memory of the Linux guest the agent runs in (root only).

A user-space agent cannot take kernel pages off the free lists, so everything it hands to
the host — balloon pages and reported free pages — is memory it **holds**: anonymous
memory it maps, faults in and ``mlock``s, then looks up in ``/proc/self/pagemap``
(Documentation/admin-guide/mm/pagemap.rst: bit 63 "present", bits 0–54 the PFN; PFNs read
as 0 without CAP_SYS_ADMIN). That is isolation by allocation, the user-space twin of
mm/page_reporting.c taking blocks off the free lists until the device acks:

* the balloon (:class:`LinuxBalloon`) maps chunks towards the host's TARGET and INFLATEs
  their PFNs; it DEFLATEs a chunk and unmaps it only after the ACK (as
  drivers/virtio/virtio_balloon.c's ``leak_balloon`` tells the host before it frees);
* reporting (:class:`LinuxReporting`) maps free memory down to a watermark when the guest's
  free memory has grown, REPORTs it and unmaps it after the ACK;
* free page hints come from ``/proc/kpageflags`` (``procfs.scan``) and stay "possibly
  reclaimable" — the kernel may reuse such a page at any moment, so they are never reported;
* STATS are the guest's real ``/proc/meminfo`` and ``/proc/vmstat`` (:func:`read_stats`),
  with the tags virtio_balloon.c's ``update_balloon_stats`` fills.

The pages must not move while the host holds them: a migrated page's old PFN belongs to
someone else, and punching it destroys live data. So the agent sets
``/proc/sys/vm/compact_unevictable_allowed`` to 0 (compaction leaves mlocked pages
alone), maps chunks ``MADV_NOHUGEPAGE`` (khugepaged never collapses them), and reads
pagemap again right before each INFLATE or REPORT is built — also when a new session
re-inflates — never from an old snapshot. Pages come out of virtual order (the kernel's
free lists are not sorted), so the PFNs are sorted and coalesced before they travel.

What it costs: the kernel zeroes every page on the fault (~150–220 MiB/s under TCG,
docs/PERFORMANCE.md), and reporting re-touches free pages a previous pass already gave
back — user space cannot see the kernel's "reported" flag — which is why it reports only
growth in free memory (see :class:`LinuxReporting`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import mmap
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from shared.ranges import RangeBuffer, sort_and_coalesce

from ..batches import Op, payloads_for
from ..reporting import PassState, low_watermark_pages
from .procfs import free_bytes

log = logging.getLogger("guest_agent.linux")

PAGE_SIZE = 4096
PRESENT = np.uint64(1 << 63)
PFN_MASK = np.uint64((1 << 55) - 1)
#: Memory mapped and pinned per balloon operation: ~0.1 s of page faults under TCG, so the
#: event loop answers PINGs and ACKs between chunks.
BALLOON_CHUNK = 16 << 20
#: One report, as mm/page_reporting.c's PAGE_REPORTING_CAPACITY (32) blocks of
#: pageblock_order (2 MiB).
REPORT_CHUNK = 64 << 20
MADV_NOHUGEPAGE = 15

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_MAP_FAILED = ctypes.c_void_p(-1).value


class LinuxSourceError(OSError):
    """The machine cannot serve as the linux source (not root, no pagemap, mlock refused)."""


def _errno_error(what: str) -> OSError:
    code = ctypes.get_errno()
    return OSError(code, f"{what}: {os.strerror(code)}")


# -- pagemap -----------------------------------------------------------------------------


def pfn_ranges(entries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted, coalesced ``(pfns, counts)`` of pagemap entries that must all be present.

    Raises LinuxSourceError for a page not present or a PFN of 0 (what an unprivileged
    reader sees): reporting such a range would name pages the agent does not hold."""
    entries = np.asarray(entries, dtype=np.uint64)
    if not bool(np.all(entries & PRESENT)):
        missing = int(np.count_nonzero((entries & PRESENT) == 0))
        raise LinuxSourceError(f"{missing} of {entries.size} locked pages are not present in pagemap")
    pfns = entries & PFN_MASK
    if not bool(np.all(pfns)):
        raise LinuxSourceError("pagemap shows PFN 0: the agent needs CAP_SYS_ADMIN (root) to see PFNs")
    return sort_and_coalesce(pfns, np.ones(pfns.size, dtype=np.uint64))


@dataclass
class Chunk:
    """Anonymous memory the agent maps, faults in and pins; its PFNs as last read."""

    address: int
    length: int
    pfns: np.ndarray = field(default_factory=lambda: np.empty(0, np.uint64))
    counts: np.ndarray = field(default_factory=lambda: np.empty(0, np.uint64))

    @property
    def pages(self) -> int:
        return self.length // PAGE_SIZE


class LinuxPages:
    """mmap + mlock + pagemap, and the machine settings that keep locked pages in place."""

    def __init__(self, root="/", pagemap: str = "/proc/self/pagemap") -> None:
        self.root = Path(root)
        self.pagemap = pagemap
        self.mapped_pages = 0
        # Where the agent's time goes (bench/vm.py): faulting+zeroing+pinning, pagemap, unmapping.
        self.pin_seconds = 0.0
        self.pagemap_seconds = 0.0
        self.unmap_seconds = 0.0

    def prepare(self) -> None:
        """Check root and pagemap; stop compaction from moving mlocked pages."""
        knob = self.root / "proc/sys/vm/compact_unevictable_allowed"
        try:
            if knob.read_text().strip() != "0":
                knob.write_text("0\n")
                log.info("set vm.compact_unevictable_allowed=0: compaction must not move balloon pages")
        except FileNotFoundError:
            pass  # a kernel without the knob never compacts unevictable pages
        except OSError as error:
            raise LinuxSourceError(f"cannot set {knob} to 0 ({error.strerror}); --source linux needs root") from None
        probe = self.map(PAGE_SIZE)
        try:
            self.read(probe)
        finally:
            self.unmap(probe)

    def map(self, length: int) -> Chunk:
        """``length`` bytes of anonymous memory, faulted in (the kernel zeroes it) and locked."""
        length -= length % PAGE_SIZE
        t0 = time.perf_counter()
        address = _libc.mmap(None, length, mmap.PROT_READ | mmap.PROT_WRITE,
                             mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
        if address in (None, _MAP_FAILED):
            raise _errno_error("mmap")
        _libc.madvise(address, length, MADV_NOHUGEPAGE)
        if _libc.mlock(address, length) != 0:  # faults every page in, then pins it
            error = _errno_error("mlock")
            _libc.munmap(address, length)
            raise LinuxSourceError(error.errno, f"{error.strerror} (--source linux needs root: CAP_IPC_LOCK)")
        self.mapped_pages += length // PAGE_SIZE
        self.pin_seconds += time.perf_counter() - t0
        return Chunk(address, length)

    def read(self, chunk: Chunk) -> Chunk:
        """Re-read the chunk's PFNs from pagemap (right before they are sent)."""
        t0 = time.perf_counter()
        fd = os.open(self.pagemap, os.O_RDONLY | os.O_CLOEXEC)
        try:
            want = chunk.pages * 8
            data = bytearray()
            while len(data) < want:
                part = os.pread(fd, want - len(data), chunk.address // PAGE_SIZE * 8 + len(data))
                if not part:
                    raise LinuxSourceError(f"{self.pagemap} ended early")
                data += part
        finally:
            os.close(fd)
        chunk.pfns, chunk.counts = pfn_ranges(np.frombuffer(bytes(data), dtype="<u8"))
        self.pagemap_seconds += time.perf_counter() - t0
        return chunk

    def unmap(self, chunk: Chunk) -> None:
        """Give the memory back to the guest kernel (munmap also unlocks it)."""
        t0 = time.perf_counter()
        if _libc.munmap(chunk.address, chunk.length) != 0:
            raise _errno_error("munmap")
        self.mapped_pages -= chunk.pages
        self.unmap_seconds += time.perf_counter() - t0

    def timings(self) -> dict[str, float]:
        return {"pin_s": round(self.pin_seconds, 3), "pagemap_s": round(self.pagemap_seconds, 3),
                "unmap_s": round(self.unmap_seconds, 3)}


# -- /proc/meminfo, /proc/vmstat ---------------------------------------------------------


def read_meminfo(root="/") -> dict[str, int]:
    """/proc/meminfo in bytes (the "kB" lines) or counts."""
    info = {}
    for line in (Path(root) / "proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            info[key.strip()] = int(parts[0]) * (1024 if parts[1:2] == ["kB"] else 1)
    return info


def read_vmstat(root="/") -> dict[str, int]:
    stats = {}
    for line in (Path(root) / "proc/vmstat").read_text().splitlines():
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            stats[key] = int(value)
    return stats


def read_stats(root="/") -> dict[int, int]:
    """virtio-balloon statistics (spec 5.5.6.3; tags 10–15 since Linux 6.12), as
    virtio_balloon.c's ``update_balloon_stats`` fills them: events in pages become bytes
    for swap, faults stay counts, memory sizes in bytes."""
    mem, vm = read_meminfo(root), read_vmstat(root)

    def total(*prefixes):
        return sum(v for k, v in vm.items() if any(k.startswith(p) for p in prefixes))

    stats = {
        0: vm.get("pswpin", 0) * PAGE_SIZE,  # SWAP_IN
        1: vm.get("pswpout", 0) * PAGE_SIZE,  # SWAP_OUT
        2: vm.get("pgmajfault", 0),  # MAJFLT
        3: vm.get("pgfault", 0),  # MINFLT (Linux sends all faults)
        4: mem.get("MemFree", 0),  # MEMFREE
        5: mem.get("MemTotal", 0),  # MEMTOT
        6: mem.get("MemAvailable", 0),  # AVAIL
        7: vm.get("nr_file_pages", 0) * PAGE_SIZE,  # CACHES (global NR_FILE_PAGES)
        8: vm.get("htlb_buddy_alloc_success", 0),  # HTLB_PGALLOC
        9: vm.get("htlb_buddy_alloc_fail", 0),  # HTLB_PGFAIL
        10: vm.get("oom_kill", 0),  # OOM_KILLS
        11: total("allocstall_"),  # ALLOC_STALLS
        12: vm.get("pgscan_kswapd", 0),  # ASYNC_SCANS
        13: vm.get("pgscan_direct", 0),  # DIRECT_SCANS
        14: vm.get("pgsteal_kswapd", 0),  # ASYNC_RECLAIMS
        15: vm.get("pgsteal_direct", 0),  # DIRECT_RECLAIMS
    }
    return stats


# -- the balloon -------------------------------------------------------------------------


class LinuxBalloon:
    """The balloon of a real guest: pinned chunks, as :class:`guest_agent.balloon.Balloon`
    does with simulated blocks (same interface towards the agent).

    Inflate never takes the guest below a reserve of available memory (Linux's low
    watermark plus one chunk): ``fill_balloon`` allocates with ``__GFP_NORETRY`` and gives up
    instead of pushing the guest into the OOM killer. Deflate gives back whole chunks, most
    recent first; an overshoot is inflated again on the next step, landing on the target.
    """

    def __init__(self, pages: LinuxPages, total_pages: int, root="/", chunk_bytes: int = BALLOON_CHUNK) -> None:
        self.mem = pages
        self.root = root
        self.total_pages = total_pages
        self.chunk_pages = chunk_bytes // PAGE_SIZE
        self.target = 0
        self.deflate_on_oom = False  # a real guest's OOM killer is the kernel's business
        self.stuck = False
        self._settled = True  # logged "balloon at target" since the last TARGET
        self._held: list[Chunk] = []  # acked INFLATE in this session
        self._unsent: list[Chunk] = []  # locked; the host does not know (yet, or any more)
        self.inflating_pages = 0
        self.deflating_pages = 0
        self.reserve_bytes = (low_watermark_pages(total_pages) + self.chunk_pages) * PAGE_SIZE

    @property
    def pages(self) -> int:
        held = sum(c.pages for c in self._held) + sum(c.pages for c in self._unsent)
        return held + self.inflating_pages + self.deflating_pages

    def set_target(self, pages: int) -> None:
        self.target = max(0, min(int(pages), self.total_pages))
        self.stuck = False
        self._settled = False

    def _check_settled(self) -> None:
        if not self._settled and not self._unsent and not self.inflating_pages and not self.deflating_pages \
                and self.pages == self.target:
            self._settled = True
            log.info("balloon at target", extra={"pages": self.pages, **self.mem.timings()})

    def negotiated(self, features) -> None:
        pass

    def oom(self, pages_needed: int) -> bool:
        return False

    def resend_all(self) -> None:
        self._unsent.extend(self._held)
        self._held.clear()

    def wants_work(self) -> bool:
        size = self.pages - self.deflating_pages
        if self._unsent:
            return True
        if size > self.target:
            return bool(self._held)
        return size < self.target and not self.stuck

    def build(self, encoding: str, max_ranges: int, buffer: RangeBuffer) -> Op | None:
        if self._unsent:
            return self._inflate_op(self.mem.read(self._unsent.pop()), encoding, buffer)
        size = self.pages - self.deflating_pages
        if size > self.target and self._held:
            return self._deflate_op(self._held.pop(), encoding, buffer)
        if size < self.target and not self.stuck:
            want = min(self.target - size, self.chunk_pages) * PAGE_SIZE
            room = read_meminfo(self.root).get("MemAvailable", 0) - self.reserve_bytes
            if room < want:
                want = max(0, room) - max(0, room) % (2 << 20)
            if want <= 0:
                self.stuck = True  # retried on the next tick, when memory may have been freed
                return None
            try:
                chunk = self.mem.map(want)
            except OSError as error:
                log.warning("balloon: cannot pin more memory", extra={"error": str(error)})
                self.stuck = True
                return None
            return self._inflate_op(self.mem.read(chunk), encoding, buffer)
        return None

    def _inflate_op(self, chunk: Chunk, encoding: str, buffer: RangeBuffer) -> Op:
        self.inflating_pages += chunk.pages

        def acked(op: Op) -> None:
            self.inflating_pages -= chunk.pages
            self._held.append(chunk)
            self._check_settled()

        def aborted(op: Op) -> None:  # the host may have discarded them: stay in the balloon
            self.inflating_pages -= chunk.pages
            self._unsent.append(chunk)

        return Op("inflate", chunk.pages, payloads_for(chunk.pfns, chunk.counts, encoding, buffer),
                  on_ack=acked, on_abort=aborted)

    def _deflate_op(self, chunk: Chunk, encoding: str, buffer: RangeBuffer) -> Op:
        self.deflating_pages += chunk.pages

        def acked(op: Op) -> None:  # only now is the host done with them
            self.deflating_pages -= chunk.pages
            self.mem.unmap(chunk)
            self._check_settled()

        def aborted(op: Op) -> None:
            self.deflating_pages -= chunk.pages
            self._unsent.append(chunk)

        return Op("deflate", chunk.pages, payloads_for(chunk.pfns, chunk.counts, encoding, buffer),
                  on_ack=acked, on_abort=aborted)


# -- free page reporting by allocation ---------------------------------------------------


class LinuxReporting:
    """Free page reporting that cannot race the guest kernel: report only what it holds.

    Like mm/page_reporting.c it works in passes requested ``delay`` (2 s) after free memory
    grew by at least one report, and a report is PAGE_REPORTING_CAPACITY × 2 MiB (64 MiB).
    A pass maps and pins free memory, one report at a time, while ``MemFree`` stays above
    the low watermark plus one report (``page_reporting_process_zone``'s limit), REPORTs it,
    and unmaps it after the ACK. It takes at most the growth since the lowest ``MemFree``
    seen since the last pass (the whole of it when a session starts): the kernel's free lists
    hand back recently freed pages first, and memory already reported would only be touched
    and punched again.
    """

    def __init__(self, pages: LinuxPages, total_pages: int, root="/", delay: float = 2.0,
                 chunk_bytes: int = REPORT_CHUNK, interval: float = 1.0) -> None:
        self.mem = pages
        self.root = root
        self.delay = delay
        self.interval = interval
        self.chunk_bytes = chunk_bytes
        self.capacity = 32
        self.state = PassState.IDLE
        self.deadline: float | None = None
        self.reserve_bytes = low_watermark_pages(total_pages) * PAGE_SIZE + chunk_bytes
        self.isolated_pages = 0
        self.reported_pages = 0  # acked in this session (the host's view, give or take reuse)
        self.passes = 0
        self._baseline: int | None = None  # lowest MemFree since the last pass
        self._budget = 0  # bytes this pass may still take
        self._next_check = 0.0

    def _free(self) -> int:
        return free_bytes(self.root)

    def wake_at(self) -> float | None:
        """The end of the reporting delay, else the next MemFree check: the kernel tells
        nobody when memory is freed, so it is polled (once a second, one system call)."""
        if self.state is PassState.REQUESTED:
            return self.deadline
        return self._next_check

    def restart(self, now: float) -> None:
        """A new session: the host knows nothing, so the first pass reports everything free."""
        self.state = PassState.IDLE
        self.reported_pages = 0
        self._baseline = 0
        self._next_check = now

    def check(self, now: float) -> None:
        # Not while reports are held: their return to the free lists is no new free memory.
        if now < self._next_check or self.state is not PassState.IDLE or self.isolated_pages:
            return
        self._next_check = now + self.interval
        free = self._free()
        if self._baseline is None or free < self._baseline:
            self._baseline = free
        grown = free - self._baseline
        if grown >= self.chunk_bytes and free - self.reserve_bytes >= self.chunk_bytes:
            self.state = PassState.REQUESTED
            self.deadline = now + self.delay

    def build(self, now: float, encoding: str, max_ranges: int, buffer: RangeBuffer) -> Op | None:
        if self.state is PassState.REQUESTED:
            if now < self.deadline:
                return None
            self.state = PassState.ACTIVE
            self.deadline = None
            self.passes += 1
            self._budget = max(0, self._free() - (self._baseline or 0))
        if self.state is not PassState.ACTIVE:
            return None
        want = min(self.chunk_bytes, self._budget)
        if want < (2 << 20) or self._free() - self.reserve_bytes < want:
            self._end_pass()
            return None
        try:
            chunk = self.mem.read(self.mem.map(want))
        except OSError as error:
            log.warning("reporting: cannot pin free memory", extra={"error": str(error)})
            self._end_pass()
            return None
        self._budget -= chunk.length
        self.isolated_pages += chunk.pages

        def acked(op: Op) -> None:  # as page_reporting_drain(): back to the free lists
            self.isolated_pages -= chunk.pages
            self.reported_pages += chunk.pages
            self.mem.unmap(chunk)

        def aborted(op: Op) -> None:
            self.isolated_pages -= chunk.pages
            self.mem.unmap(chunk)

        return Op("report", chunk.pages, payloads_for(chunk.pfns, chunk.counts, encoding, buffer),
                  on_ack=acked, on_abort=aborted)

    def _end_pass(self) -> None:
        self.state = PassState.IDLE
        self._budget = 0
        self._baseline = None  # measured again once the pass's memory is back
