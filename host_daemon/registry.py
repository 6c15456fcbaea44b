"""The guests this host knows: the provisioned ones (the inventory) and, briefly, open-mode ones.

Policy (documented in docs/OPERATIONS.md "Security model" and ``--help``):

- **One live session per guest id.** A HELLO naming a guest that already has a live
  session is refused with ERROR ``guest-busy``; the existing session is not disturbed
  (a guest cannot be kicked off by someone who merely knows its name). A guest whose
  old connection is half-open reconnects once the host's idle timeout closes it.
- **Provisioned guests** (``--guests FILE``, ``PUT /api/v1/guests/{id}``) have a record
  from the moment they are provisioned until they are deleted; they never count
  against ``--max-guests`` and are never refused for it. Their size and RAM file are
  the inventory's.
- **Open-mode guests** (ids not in the inventory) are capped by ``--max-guests``
  (connected plus retained), so throwaway ids can fill only their own cap. A
  disconnected one is forgotten ``--retention`` later, or ``--forget-after`` later if its
  session ended with BYE or applied no batch (load tests, probes): its record, every
  metric series labelled with it, and its RAM file in ``--ram-dir`` disappear.
- **A new session starts from an empty tracker** (the guest re-reports its free blocks
  and re-inflates its balloon, docs/PROTOCOL.md §7.1); counters and the RAM file
  survive across sessions.
- RAM files found in ``--ram-dir`` at start-up (a previous host's) get the retention
  grace period, so a guest that never returns leaves nothing behind; a provisioned
  guest's ``ram_file`` is never removed (it is the VM's).
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from shared.errors import RemoteProtocolError
from shared.runtime.config import format_size
from shared.vocabulary import DEFLATE, INFLATE, PAGE_SIZE, STAT_AVAILABLE, STAT_FREE, STAT_TOTAL

from .histogram import LatencyHistogram
from .inventory import Inventory
from .ramlayout import RamLayout, needs_map
from .reclaim import RamFile, ram_files, remove_ram_file
from .tracker import KIND_CODES, KINDS, REASONS, GuestTracker

log = logging.getLogger("balloon.host.registry")

#: A balloon short of its target that has not moved for this long is "unreachable".
TARGET_STALL_S = 5.0


def by_kind(counts: list[int]) -> dict[str, int]:
    """Per-kind counters (indexed by kind code) keyed by the kinds' names, for JSON and tests."""
    return dict(zip(KINDS, counts, strict=True))


class GuestRecord:
    """Everything the host keeps about one guest id, across its sessions."""

    def __init__(self, guest: str, pages: int, provisioned=None) -> None:
        self.id = guest
        #: the inventory entry (inventory.ProvisionedGuest) when the host provisioned this id
        self.provisioned = provisioned
        self.pages = pages
        self.tracker = GuestTracker(pages)
        #: what holds this guest's live session — its connection (connection.GuestProtocol; the
        #: GuestSession itself when driven without one) — or None
        self.connection = None
        self.since = time.time()  # connected since / disconnected since
        self.address = ""
        # per batch kind, indexed by its code (the index in vocabulary.BATCH_KINDS): by_kind() names them
        self.batches = [0] * len(KINDS)
        self.ranges = [0] * len(KINDS)
        self.pages_total = [0] * len(KINDS)
        self.rejected = dict.fromkeys(REASONS, 0)
        self.received_bytes = 0
        self.errors = 0
        self.sessions = 0
        self.last_message_at: float | None = None
        self.target_pages: int | None = None
        self.next_cmd_id = 1
        self.hint_done: int | None = None
        self._stats: dict[int, int] = {}
        self.stats_at: float | None = None  # time.monotonic() of the last STATS (policy: staleness)
        self._balloon_seen: tuple[int, int, int | None] | None = None  # (inflated, inflate batches, target)
        self._balloon_moved_at = time.monotonic()
        self._unreachable_logged: int | None = None  # the target we said is unreachable
        self.features: tuple[str, ...] = ()
        self.ram = None  # reclaim.RamFile when the guest uses shared RAM
        self.vmm = None  # vmm.VmmLink when the inventory gives the VM's VMM (qmp)
        #: pages the host did not punch because its VMM said discards were unsafe, by reason (bytes)
        self.inhibited: dict[str, int] = {}
        self.apply_seconds = LatencyHistogram()  # time from a batch's read to its ACK (apply and punch)
        self._forget: asyncio.TimerHandle | None = None
        self._batches_at_claim = 0

    @property
    def connected(self) -> bool:
        return self.connection is not None

    @property
    def driver(self) -> str | None:
        """Who moves this guest's balloon: ``agent`` (our agent has connected since the host
        started) or ``virtio-balloon`` (a stock guest: QEMU's own balloon, through the VMM)."""
        if self.sessions or self.connection is not None:
            return "agent"
        if self.vmm is not None and self.vmm.has_balloon:
            return "virtio-balloon"
        return None

    @property
    def reachable(self) -> bool:
        """The balloon can be moved now: an agent session, or a stock guest's VMM answering."""
        if self.connection is not None:
            return True
        return self.driver == "virtio-balloon" and self.vmm.state == "connected"

    @property
    def balloon_pages(self) -> int:
        """The balloon's size: the agent's inflated pages, or RAM − QEMU's "actual"."""
        if self.driver == "virtio-balloon" and self.vmm.balloon_actual is not None:
            return max(0, self.pages - self.vmm.balloon_actual // PAGE_SIZE)
        return self.tracker.inflated_pages

    def layout(self) -> RamLayout | None:
        """Where this guest's pages are in its RAM file: the inventory's ``ram_map``, else what
        the VMM said, else flat when the VM is too small to be split; None: unknown yet."""
        entry = self.provisioned
        if entry is None:
            return RamLayout.identity(self.pages)
        if entry.ram_map is not None:
            return entry.ram_map
        if self.vmm is not None and self.vmm.layout is not None:
            return self.vmm.layout
        if needs_map(entry.pages * PAGE_SIZE) and (entry.qmp is not None or entry.ram_file is not None):
            return None
        return RamLayout.identity(entry.pages)

    def discard_block(self) -> str | None:
        """Why the host must not punch this guest's RAM now (its VMM's interlocks); None: it may."""
        return None if self.vmm is None else self.vmm.discard_block()

    @property
    def stats(self) -> dict[int, int]:
        """The guest's last STATS; setting it stamps ``stats_at`` (the policy never acts on stale stats)."""
        return self._stats

    @stats.setter
    def stats(self, values: dict[int, int]) -> None:
        self._stats = values
        self.stats_at = time.monotonic()

    @property
    def actual_pages(self) -> int:
        """The memory the guest keeps (QEMU's "actual", libvirt's actual_balloon): RAM − balloon."""
        return self.pages - self.balloon_pages

    @property
    def target_shortfall_pages(self) -> int | None:
        """How far the balloon is from its target (either way); None without a target."""
        return None if self.target_pages is None else abs(self.target_pages - self.balloon_pages)

    def target_state(self, now: float | None = None) -> str | None:
        """Where the balloon stands against its target: None (no target), "reached", "moving"
        or "unreachable" (short of it, and nothing moved for TARGET_STALL_S while connected).

        A Linux guest's fill_balloon() stops quietly at its watermark, so QEMU and libvirt
        only ever show "actual" short of the target; this says so. Logged once per target.
        """
        now = time.monotonic() if now is None else now
        target, inflated = self.target_pages, self.balloon_pages
        seen = (inflated, self.batches[KIND_CODES[INFLATE]] + self.batches[KIND_CODES[DEFLATE]], target)
        if seen != self._balloon_seen:
            self._balloon_seen = seen
            self._balloon_moved_at = now
        if target is None:
            return None
        if inflated == target:
            self._unreachable_logged = None
            return "reached"
        if not self.reachable or now - self._balloon_moved_at < TARGET_STALL_S:
            return "moving"
        if self._unreachable_logged != target:
            self._unreachable_logged = target
            log.warning(f"balloon target unreachable: guest {self.id} inflated {format_size(inflated * PAGE_SIZE)} "
                        f"of {format_size(target * PAGE_SIZE)} and has not moved for {TARGET_STALL_S:g}s "
                        f"(the guest keeps its working set and low watermark)",
                        extra={"guest": self.id, "inflated_pages": inflated, "target_pages": target})
        return "unreachable"

    def to_json(self) -> dict:
        """The GUEST object of the admin API (docs/API.md)."""
        tracker = self.tracker
        connection = self.connection
        window = connection.window_state() if connection is not None else None
        reclaimed = resident = None
        if self.ram is not None:
            try:
                reclaimed = self.ram.reclaimed_bytes()
                resident = self.ram.resident_bytes()
            except OSError:
                pass
        p99 = self.apply_seconds.quantile(0.99)
        memory = self.pages * PAGE_SIZE
        stats = self._stats
        now = time.monotonic()
        state = self.target_state(now)
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
            "inflated_pages": self.balloon_pages,
            "inflated_bytes": self.balloon_pages * PAGE_SIZE,
            "target_pages": self.target_pages,
            "target_bytes": None if self.target_pages is None else self.target_pages * PAGE_SIZE,
            # QEMU's `info balloon` "actual" / libvirt's actual_balloon: the memory the guest keeps
            "actual_bytes": self.actual_pages * PAGE_SIZE,
            "target_actual_bytes": None if self.target_pages is None else memory - self.target_pages * PAGE_SIZE,
            "target_state": state,
            "target_shortfall_bytes": (None if self.target_shortfall_pages is None
                                       else self.target_shortfall_pages * PAGE_SIZE),
            # libvirt/KubeVirt names for the STATS tags: available = MEMTOT, usable = AVAIL, unused = MEMFREE
            "available_bytes": stats.get(STAT_TOTAL),
            "usable_bytes": stats.get(STAT_AVAILABLE),
            "unused_bytes": stats.get(STAT_FREE),
            "stats_age_seconds": None if self.stats_at is None else max(0.0, now - self.stats_at),
            "hinted_pages": tracker.hinted_pages,
            "reclaimed_bytes": reclaimed,
            "resident_bytes": resident,
            "batches": by_kind(self.batches),
            "pages_total": by_kind(self.pages_total),
            "rejected_pages": dict(self.rejected),
            "window": {"size": window[0], "in_use": window[1]} if window else {"size": 0, "in_use": 0},
            "last_message_at": self.last_message_at,
            "errors": self.errors,
            "apply_seconds_p99": p99,
            "apply_seconds_p99_recent": self.apply_seconds.recent_quantile(0.99),  # the last 5 minutes
            # the guest's last STATS, virtio tags as strings (JSON keys): "4" is MEMFREE
            "stats": {str(tag): value for tag, value in stats.items()},
            # the inventory entry (token redacted), or null for an open-mode guest
            "provisioned": None if self.provisioned is None else self.provisioned.to_json(),
            # who moves the balloon (agent | virtio-balloon | null) and the VM's VMM (null: none given)
            "driver": self.driver,
            "vmm": None if self.vmm is None else self.vmm.to_json(),
            "discard_inhibited_bytes": dict(self.inhibited),
        }


class Conflict(Exception):
    """An inventory change that the current state forbids (admin API: 409)."""


class Registry:
    def __init__(self, max_guests: int, retention: float, ram_dir: Path | None = None,
                 inventory: Inventory | None = None, forget_after: float | None = None) -> None:
        self.max_guests = max_guests  # open-mode guests only
        self.retention = retention
        self.forget_after = retention if forget_after is None else min(forget_after, retention)
        self.ram_dir = ram_dir
        self.inventory = Inventory(ram_dir=ram_dir) if inventory is None else inventory
        self.guests: dict[str, GuestRecord] = {}
        self._orphans: dict[str, asyncio.TimerHandle] = {}
        self.forgotten = 0
        #: called with a record whose session just ended (the host's VMM links reopen its view)
        self.after_release = None
        #: apply-time samples of forgotten guests, so the host-wide histogram stays monotonic
        self.retired_apply = LatencyHistogram()
        for entry in self.inventory:
            self.guests[entry.id] = GuestRecord(entry.id, entry.pages, entry)

    def __len__(self) -> int:
        return len(self.guests)

    def get(self, guest: str) -> GuestRecord | None:
        return self.guests.get(guest)

    def apply_histogram(self) -> LatencyHistogram:
        """Host-wide apply times: every known guest's plus the forgotten ones' (scrape time)."""
        total = LatencyHistogram()
        total.merge(self.retired_apply)
        for record in self.guests.values():
            total.merge(record.apply_seconds)
        return total

    @property
    def connected(self) -> int:
        return sum(1 for record in self.guests.values() if record.connection is not None)

    @property
    def open_guests(self) -> int:
        """Open-mode records (connected or retained): what ``--max-guests`` caps."""
        return sum(1 for record in self.guests.values() if record.provisioned is None)

    def claim(self, guest: str, pages: int, connection, address: str, provisioned=None,
              layout: RamLayout | None = None) -> GuestRecord:
        """Bind ``guest`` to ``connection`` for a new session, or raise the ERROR to send.

        ``provisioned`` is the inventory entry the connection proved (auth.GuestAuth), None
        for an open-mode guest; ``pages`` is the size that counts (the host's); ``layout``
        the VM's RAM map, whose GPA span (holes included) the tracker covers."""
        record = self.guests.get(guest)
        if record is not None and record.connection is not None:
            raise RemoteProtocolError("guest-busy", f"guest {guest!r} already has a live session")
        if (record.provisioned if record is not None else None) is not provisioned:
            # the entry changed (PUT/DELETE) between the identity check and now
            raise RemoteProtocolError("auth-failed", f"guest {guest!r} is not what this connection proved")
        if record is None:
            if self.open_guests >= self.max_guests:
                raise RemoteProtocolError(
                    "too-many-guests", f"this host serves at most {self.max_guests} open-mode guests")
            record = GuestRecord(guest, pages)
            self.guests[guest] = record
        else:
            if record._forget is not None:
                record._forget.cancel()
                record._forget = None
            record.pages = pages
            # a new session starts empty: the guest re-reports
            record.tracker = (GuestTracker(pages) if layout is None
                              else GuestTracker(layout.span_pages, layout.holes))
        orphan = self._orphans.pop(guest, None)
        if orphan is not None:
            orphan.cancel()
        record.connection = connection
        record.address = address
        record.since = time.time()
        record.sessions += 1
        record._batches_at_claim = sum(record.batches)
        return record

    def open_ram(self, record: GuestRecord) -> str:
        """Open the guest's RAM file; returns its path.

        Provisioned: its ``ram_file``, reopened each session (the VMM may have made a new
        one), never created or resized. Open mode: ``--ram-dir/<id>.ram``, created at the
        claimed size, grown for a larger claim, never shrunk (reclaim.RamFile.open)."""
        entry = record.provisioned
        if record.ram is not None:
            record.ram.close()
            record.ram = None
        if entry is not None:
            if entry.ram_file is None:
                raise ValueError(f"guest {record.id} has no ram_file")
            record.ram = RamFile.open_provisioned(entry.ram_file, record.pages, self.inventory.ram_dirs)
            record.ram.layout = record.layout()  # GPA -> file offset (the PCI hole)
        else:
            record.ram = RamFile.open(self.ram_dir, record.id, record.pages)
        return str(record.ram.path)

    def provision(self, entry) -> bool:
        """Add or replace an inventory entry (admin API PUT); True if the id is new to it.

        Raises Conflict when the id is connected as an open-mode guest, or when a connected
        provisioned guest's size, listener or RAM file would change under its session;
        InventoryError when the entry clashes with another (listener, file, uid)."""
        record = self.guests.get(entry.id)
        old = self.inventory.get(entry.id)
        if record is not None and record.connection is not None:
            if record.provisioned is None:
                raise Conflict(f"guest {entry.id!r} is connected as an open-mode guest; "
                               "provision it once that session has ended")
            if (old.pages, old.listen, old.ram_file) != (entry.pages, entry.listen, entry.ram_file):
                raise Conflict(f"guest {entry.id!r} is connected: memory, listen and ram_file "
                               "change only while it is disconnected")
        self.inventory.check(entry)
        if record is not None and record.provisioned is None:
            self.forget(entry.id)  # a retained open-mode guest of that name: gone with its file
            record = None
        created = self.inventory.put(entry)
        if record is None:
            self.guests[entry.id] = GuestRecord(entry.id, entry.pages, entry)
        else:
            record.provisioned = entry
            if record.connection is None:
                record.pages = entry.pages
        return created

    def unprovision(self, guest: str) -> None:
        """Forget a guest now (admin API DELETE): its inventory entry, record and series.

        Raises KeyError for an unknown id and Conflict while it is connected."""
        record = self.guests.get(guest)
        if record is None and guest not in self.inventory:
            raise KeyError(guest)
        if record is not None and record.connection is not None:
            raise Conflict(f"guest {guest!r} is connected; it can be deleted once its session ends")
        entry = self.inventory.remove(guest)
        if record is not None:
            # a provisioned guest's file is the VM's: closed, never removed
            self._drop(record, remove_file=entry is None)

    def release(self, record: GuestRecord, connection, result: str = "closed") -> None:
        """The session ended: a provisioned guest stays; an open one is forgotten later."""
        if record.connection is not connection:
            return
        record.connection = None
        record.since = time.time()
        record.tracker.set_hint_command(None)
        if record.ram is not None and record.provisioned is not None:
            record.ram.close()  # reopened at the next session: the VMM may make a new file
            record.ram = None
        if record.provisioned is not None:
            if self.after_release is not None:
                self.after_release(record)
            return
        idle = sum(record.batches) == record._batches_at_claim
        delay = self.forget_after if result == "bye" or idle else self.retention
        if delay <= 0:
            self.forget(record.id)
            return
        loop = asyncio.get_running_loop()
        record._forget = loop.call_later(delay, self.forget, record.id)

    def forget(self, guest: str) -> None:
        """Retention is over for an open-mode guest: drop it and its RAM file."""
        record = self.guests.get(guest)
        if record is None or record.connection is not None or record.provisioned is not None:
            return
        self._drop(record, remove_file=True)

    def _drop(self, record: GuestRecord, remove_file: bool) -> None:
        guest = record.id
        del self.guests[guest]
        if record._forget is not None:
            record._forget.cancel()
            record._forget = None
        self.forgotten += 1
        self.retired_apply.merge(record.apply_seconds)
        try:
            if not remove_file:
                if record.ram is not None:
                    record.ram.close()
            elif record.ram is not None:
                record.ram.remove()
            elif self.ram_dir is not None:  # a file from an earlier session or host
                remove_ram_file(self.ram_dir, guest)
        except OSError as error:
            log.warning("cannot remove RAM file", extra={"guest": guest, "error": str(error)})
        record.ram = None
        log.info("guest forgotten", extra={"guest": guest, "provisioned": not remove_file})

    def adopt_orphan_files(self) -> None:
        """Give RAM files left by a previous host the retention grace period."""
        if self.ram_dir is None:
            return
        loop = asyncio.get_running_loop()
        for guest in ram_files(self.ram_dir):
            # a provisioned id's file there is the VM's own ram_file: never removed
            if guest not in self.guests and guest not in self._orphans and guest not in self.inventory:
                self._orphans[guest] = loop.call_later(self.retention, self._remove_orphan, guest)

    def _remove_orphan(self, guest: str) -> None:
        self._orphans.pop(guest, None)
        if guest in self.guests or guest in self.inventory:
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
