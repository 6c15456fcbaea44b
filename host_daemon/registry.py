"""The guests this host knows: connected ones and, for ``--retention``, disconnected ones.

Policy (documented in docs/OPERATIONS.md and ``--help``):

- **One live session per guest id.** A HELLO naming a guest that already has a live
  session is refused with ERROR ``guest-busy``; the existing session is not disturbed
  (a guest cannot be kicked off by someone who merely knows its name). A guest whose
  old connection is half-open reconnects once the host's idle timeout closes it.
- **A cap on guests.** At most ``--max-guests`` ids are known at once, counting
  disconnected guests still retained, so memory and metric series stay bounded; a *new*
  id beyond the cap gets ERROR ``too-many-guests``. A known id may always come back.
- **A new session starts from an empty tracker** (the guest re-reports its free blocks
  and re-inflates its balloon, contract §Protocol usage); counters and the RAM file
  survive across sessions.
- **Retention.** A disconnected guest is forgotten ``--retention`` seconds later: its
  record, hence every metric series labelled with it, disappears, and its RAM file is
  removed. RAM files found in ``--ram-dir`` at start-up (a previous host's) get the same
  grace period, so a guest that never returns leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from shared.errors import RemoteProtocolError
from shared.vocabulary import PAGE_SIZE

from .histogram import LatencyHistogram
from .tracker import KINDS, REASONS, GuestTracker

log = logging.getLogger("balloon.host.registry")


class GuestRecord:
    """Everything the host keeps about one guest id, across its sessions."""

    def __init__(self, guest: str, pages: int) -> None:
        self.id = guest
        self.pages = pages
        self.tracker = GuestTracker(pages)
        self.session = None  # the live Session, or None
        self.since = time.time()  # connected since / disconnected since
        self.address = ""
        self.batches = dict.fromkeys(KINDS, 0)
        self.ranges = dict.fromkeys(KINDS, 0)
        self.pages_total = dict.fromkeys(KINDS, 0)
        self.rejected = dict.fromkeys(REASONS, 0)
        self.received_bytes = 0
        self.errors = 0
        self.sessions = 0
        self.last_message_at: float | None = None
        self.target_pages: int | None = None
        self.next_cmd_id = 1
        self.hint_done: int | None = None
        self.stats: dict[int, int] = {}
        self.features: tuple[str, ...] = ()
        self.ram = None  # reclaim.RamFile when the guest uses shared RAM
        self.apply = LatencyHistogram()
        self._forget: asyncio.TimerHandle | None = None

    @property
    def connected(self) -> bool:
        return self.session is not None

    def to_json(self) -> dict:
        """The GUEST object of the admin API (CONTRACT.md)."""
        tracker = self.tracker
        session = self.session
        window = session.window_state() if session is not None else None
        reclaimed = resident = None
        if self.ram is not None:
            try:
                reclaimed = self.ram.reclaimed_bytes()
                resident = self.ram.resident_bytes()
            except OSError:
                pass
        p99 = self.apply.quantile(0.99)
        return {
            "id": self.id,
            "connected": self.connected,
            "since": self.since,
            "address": self.address,
            "pages": self.pages,
            "page_size": PAGE_SIZE,
            "memory_bytes": self.pages * PAGE_SIZE,
            "reported_pages": tracker.reported_pages,
            "reported_bytes": tracker.reported_pages * PAGE_SIZE,
            "inflated_pages": tracker.inflated_pages,
            "inflated_bytes": tracker.inflated_pages * PAGE_SIZE,
            "target_pages": self.target_pages,
            "target_bytes": None if self.target_pages is None else self.target_pages * PAGE_SIZE,
            "hinted_pages": tracker.hinted_pages,
            "reclaimed_bytes": reclaimed,
            "resident_bytes": resident,
            "batches": dict(self.batches),
            "pages_total": dict(self.pages_total),
            "rejected_pages": dict(self.rejected),
            "window": {"size": window[0], "in_use": window[1]} if window else {"size": 0, "in_use": 0},
            "last_message_at": self.last_message_at,
            "errors": self.errors,
            "apply_seconds_p99": p99,
            # the guest's last STATS, virtio tags as strings (JSON keys): "4" is MEMFREE
            "stats": {str(tag): value for tag, value in self.stats.items()},
        }


class Registry:
    def __init__(self, max_guests: int, retention: float, ram_dir: Path | None = None) -> None:
        self.max_guests = max_guests
        self.retention = retention
        self.ram_dir = ram_dir
        self.guests: dict[str, GuestRecord] = {}
        self._orphans: dict[str, asyncio.TimerHandle] = {}
        self.forgotten = 0
        #: apply-time samples of forgotten guests, so the host-wide histogram stays monotonic
        self.retired_apply = LatencyHistogram()

    def __len__(self) -> int:
        return len(self.guests)

    def get(self, guest: str) -> GuestRecord | None:
        return self.guests.get(guest)

    def apply_histogram(self) -> LatencyHistogram:
        """Host-wide apply times: every known guest's plus the forgotten ones' (scrape time)."""
        total = LatencyHistogram()
        total.merge(self.retired_apply)
        for record in self.guests.values():
            total.merge(record.apply)
        return total

    @property
    def connected(self) -> int:
        return sum(1 for record in self.guests.values() if record.session is not None)

    def claim(self, guest: str, pages: int, session, address: str) -> GuestRecord:
        """Bind ``guest`` to ``session`` for a new session, or raise the ERROR to send."""
        record = self.guests.get(guest)
        if record is not None and record.session is not None:
            raise RemoteProtocolError("guest-busy", f"guest {guest!r} already has a live session")
        if record is None:
            if len(self.guests) >= self.max_guests:
                raise RemoteProtocolError("too-many-guests", f"this host serves at most {self.max_guests} guests")
            record = GuestRecord(guest, pages)
            self.guests[guest] = record
        else:
            if record._forget is not None:
                record._forget.cancel()
                record._forget = None
            record.pages = pages
            record.tracker = GuestTracker(pages)  # a new session starts empty: the guest re-reports
        orphan = self._orphans.pop(guest, None)
        if orphan is not None:
            orphan.cancel()
        record.session = session
        record.address = address
        record.since = time.time()
        record.sessions += 1
        return record

    def open_ram(self, record: GuestRecord) -> str:
        """Create or reopen the guest's RAM file (shared-ram feature); returns its path."""
        from .reclaim import RamFile

        if record.ram is not None and record.ram.size != record.pages * PAGE_SIZE:
            record.ram.close()
            record.ram = None
        if record.ram is None:
            record.ram = RamFile.open(self.ram_dir, record.id, record.pages)
        return str(record.ram.path)

    def release(self, record: GuestRecord, session) -> None:
        """The session ended: keep the guest for ``retention``, then forget it."""
        if record.session is not session:
            return
        record.session = None
        record.since = time.time()
        record.tracker.set_hint_command(None)
        if self.retention <= 0:
            self.forget(record.id)
            return
        loop = asyncio.get_running_loop()
        record._forget = loop.call_later(self.retention, self.forget, record.id)

    def forget(self, guest: str) -> None:
        record = self.guests.get(guest)
        if record is None or record.session is not None:
            return
        del self.guests[guest]
        self.forgotten += 1
        self.retired_apply.merge(record.apply)
        try:
            if record.ram is not None:
                record.ram.remove()
            elif self.ram_dir is not None:  # a file from an earlier session or host
                from .reclaim import remove_ram_file

                remove_ram_file(self.ram_dir, guest)
        except OSError as error:
            log.warning("cannot remove RAM file", extra={"guest": guest, "error": str(error)})
        log.info("guest forgotten", extra={"guest": guest, "retention_s": self.retention})

    def adopt_orphan_files(self) -> None:
        """Give RAM files left by a previous host the retention grace period."""
        if self.ram_dir is None:
            return
        from .reclaim import ram_files

        loop = asyncio.get_running_loop()
        for guest in ram_files(self.ram_dir):
            if guest not in self.guests and guest not in self._orphans:
                self._orphans[guest] = loop.call_later(self.retention, self._remove_orphan, guest)

    def _remove_orphan(self, guest: str) -> None:
        from .reclaim import remove_ram_file

        self._orphans.pop(guest, None)
        if guest in self.guests:
            return
        try:
            if remove_ram_file(self.ram_dir, guest):
                log.info("orphan RAM file removed", extra={"guest": guest})
        except OSError as error:
            log.warning("cannot remove orphan RAM file", extra={"guest": guest, "error": str(error)})

    def close(self) -> None:
        """Host shutdown: stop timers and close (not remove) RAM files — they outlive the host."""
        for handle in self._orphans.values():
            handle.cancel()
        self._orphans.clear()
        for record in self.guests.values():
            if record._forget is not None:
                record._forget.cancel()
            if record.ram is not None:
                try:
                    record.ram.close()
                except OSError:
                    pass
