"""Free page hinting from a source the agent cannot isolate (``--source procfs``).

The procfs source reads the machine's own free pages (/proc/kpageflags + /proc/kpagecount,
guest_agent/memory/procfs.py). The agent cannot take kernel pages off the free lists, so anything it sends
is *possibly reclaimable*, never reported: the kernel may hand a page out again the moment
after the scan. That is exactly virtio-balloon free page hinting (VIRTIO_BALLOON_F_FREE_PAGE_HINT,
used for live migration): the host starts a command with an id (HINT_START), the guest hints
free blocks tagged with that id, says HINT_DONE, and the host only trusts a hint together
with dirty-page tracking. A hint for a stale id is ignored by the host.

Policy (kept simple on purpose): hints are sent only for a command the host started. With
no HINT_START the agent still scans every ``interval`` seconds and exposes the result as
``balloon_guest_possibly_reclaimable_bytes`` and in its log — it never sends unsolicited
hints (there would be no command id the host could match them with). With a ``probe`` (the
machine's MemFree, one system call) that periodic scan is skipped while free memory moved
less than ``CHANGE_BYTES`` since the last one: the free pages a scan finds are MemFree's
buddy pages, so the figure could not have moved more than that either, and a scan reads
8 bytes twice per page of RAM (half the idle agent's CPU under TCG). A HINT_START always
gets a fresh scan.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable

import numpy as np

from shared.messages import HintDone
from shared.ranges import RangeBuffer
from shared.vocabulary import HINT

from .batches import Op, payloads_for

log = logging.getLogger("guest_agent.hinting")

#: The periodic scan runs again once MemFree moved this much (a 2 MiB pageblock's worth of
#: hints is below what anyone acts on; 16 MiB keeps the gauge within 16 MiB of a fresh scan).
CHANGE_BYTES = 16 << 20


class Hinting:
    """Scans a free-page source and turns a host's hint command into HINT operations.

    A scan of a real machine reads 8 bytes of kpageflags and kpagecount per page (seconds
    for tens of GiB), so the asyncio client runs it in a worker thread (``background``);
    the sans-IO tests run it inline. A command is hinted from a scan that *finished after
    the command started*, never from an older snapshot.
    """

    def __init__(self, scan: Callable[[], tuple[np.ndarray, np.ndarray]], interval: float = 10.0,
                 background: bool = False, probe: Callable[[], int] | None = None) -> None:
        self.scan = scan
        self.interval = interval
        self.background = background
        self.probe = probe  # () -> free bytes now; see the module doc
        self._free_at_scan: int | None = None
        self.skipped_scans = 0
        self.possibly_reclaimable_pages = 0
        self.hinted_pages = 0
        self._requested: int | None = None  # cmd id waiting to be hinted
        self._requested_at_scan = 0  # scans finished when the command arrived
        self._current: int | None = None  # cmd id being hinted
        self._next_scan = 0.0
        self._result: tuple[np.ndarray, np.ndarray] | None = None
        self.scans = 0
        self.scanning = False

    @property
    def pending(self) -> bool:
        return self._requested is not None

    def reset(self) -> None:
        """New session: the host's commands died with the old one."""
        self._requested = None
        self._current = None
        self.hinted_pages = 0

    def start(self, cmd_id: int) -> None:
        self._requested = cmd_id
        self._requested_at_scan = self.scans + (1 if self.scanning else 0)
        self._current = cmd_id
        self.hinted_pages = 0

    def stop(self, cmd_id: int) -> None:
        if self._requested == cmd_id:
            self._requested = None
        if self._current == cmd_id:
            self._current = None

    def _fresh(self) -> bool:
        return self._result is not None and self.scans > self._requested_at_scan

    @property
    def next_scan(self) -> float:
        return self._next_scan

    def scan_due(self, now: float) -> bool:
        if self.scanning:
            return False
        if self._requested is not None and not self._fresh():
            return True
        if not self.interval or now < self._next_scan:
            return False
        if self.probe is not None and self._free_at_scan is not None:
            try:
                moved = abs(self.probe() - self._free_at_scan)
            except OSError:
                return True
            if moved < CHANGE_BYTES:
                self._next_scan = now + self.interval  # look again then; nothing to rescan
                self.skipped_scans += 1
                return False
        return True

    def run_scan(self, now: float | None = None) -> None:
        """Scan once (inline, or in a worker thread); failures are logged, not raised."""
        if now is not None:
            self._next_scan = now + self.interval
        self.scanning = True
        if self.probe is not None:
            try:
                self._free_at_scan = self.probe()
            except OSError:
                self._free_at_scan = None
        try:
            pfns, counts = self.scan()
        except (OSError, ValueError) as error:
            log.warning("free page scan failed", extra={"error": str(error)})
            return
        finally:
            self.scanning = False
        pfns = np.asarray(pfns, dtype=np.uint64)
        counts = np.asarray(counts, dtype=np.uint64)
        self.possibly_reclaimable_pages = int(counts.sum()) if counts.size else 0
        self._result = (pfns, counts)
        self.scans += 1
        log.info("free pages possibly reclaimable (hints only: kernel pages cannot be isolated)",
                 extra={"mib": self.possibly_reclaimable_pages * 4096 >> 20})

    def tick(self, now: float) -> None:
        if not self.background and self.scan_due(now):
            self.run_scan(now)

    def build(self, encoding: str, buffer: RangeBuffer, control: deque) -> Op | None:
        if self._requested is None:
            return None
        if not self._fresh():
            if self.background:
                return None  # the client's worker thread is scanning
            self.run_scan()
            if not self._fresh():
                return None
        cmd_id, self._requested = self._requested, None
        pfns, counts = self._result
        if not pfns.size:
            control.append(HintDone(cmd_id))
            return None
        pages = int(counts.sum())

        def acked(op: Op) -> None:
            if self._current == cmd_id:
                self.hinted_pages += pages
                control.append(HintDone(cmd_id))

        return Op(HINT, pages, payloads_for(pfns, counts, encoding, buffer), on_ack=acked, cmd_id=cmd_id)
