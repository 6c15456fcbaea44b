"""Free page hinting from a source the agent cannot isolate (``--source procfs``).

The procfs source reads the machine's own free pages (/proc/kpageflags + /proc/kpagecount,
G1's scanner). The agent cannot take kernel pages off the free lists, so anything it sends
is *possibly reclaimable*, never reported: the kernel may hand a page out again the moment
after the scan. That is exactly virtio-balloon free page hinting (VIRTIO_BALLOON_F_FREE_PAGE_HINT,
used for live migration): the host starts a command with an id (HINT_START), the guest hints
free blocks tagged with that id, says HINT_DONE, and the host only trusts a hint together
with dirty-page tracking. A hint for a stale id is ignored by the host.

Policy (kept simple on purpose): hints are sent only for a command the host started. With
no HINT_START the agent still scans every ``interval`` seconds and exposes the result as
``balloon_guest_possibly_reclaimable_bytes`` and in its log — it never sends unsolicited
hints (there would be no command id the host could match them with).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable

import numpy as np

from shared.messages import HintDone
from shared.ranges import RangeBuffer

from .batches import Op, payloads_for

log = logging.getLogger("guest_agent.hinting")


class Hinting:
    """Scans a free-page source and turns a host's hint command into HINT operations."""

    def __init__(self, scan: Callable[[], tuple[np.ndarray, np.ndarray]], interval: float = 10.0) -> None:
        self.scan = scan
        self.interval = interval
        self.possibly_reclaimable_pages = 0
        self.hinted_pages = 0
        self._requested: int | None = None  # cmd id waiting to be hinted
        self._current: int | None = None  # cmd id being hinted
        self._next_scan = 0.0
        self.scans = 0

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
        self._current = cmd_id
        self.hinted_pages = 0

    def stop(self, cmd_id: int) -> None:
        if self._requested == cmd_id:
            self._requested = None
        if self._current == cmd_id:
            self._current = None

    def _scan(self) -> tuple[np.ndarray, np.ndarray]:
        pfns, counts = self.scan()
        pfns = np.asarray(pfns, dtype=np.uint64)
        counts = np.asarray(counts, dtype=np.uint64)
        self.scans += 1
        self.possibly_reclaimable_pages = int(counts.sum()) if counts.size else 0
        return pfns, counts

    def tick(self, now: float) -> None:
        if self.interval and now >= self._next_scan:
            self._next_scan = now + self.interval
            try:
                self._scan()
            except OSError as error:
                log.warning("free page scan failed", extra={"error": str(error)})
                return
            log.info("free pages possibly reclaimable (hints only: kernel pages cannot be isolated)",
                     extra={"mib": self.possibly_reclaimable_pages * 4096 >> 20})

    def build(self, encoding: str, buffer: RangeBuffer, control: deque) -> Op | None:
        if self._requested is None:
            return None
        cmd_id, self._requested = self._requested, None
        pfns, counts = self._scan()
        if not pfns.size:
            control.append(HintDone(cmd_id))
            return None
        pages = int(counts.sum())

        def acked(op: Op) -> None:
            if self._current == cmd_id:
                self.hinted_pages += pages
                control.append(HintDone(cmd_id))

        return Op("hint", pages, payloads_for(pfns, counts, encoding, buffer), on_ack=acked, cmd_id=cmd_id)
