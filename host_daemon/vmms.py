"""The host's VMM links, one per provisioned VM with ``qmp``, and what their news changes.

host_daemon/vmm/ speaks to a VMM; this module ties each link to its guest record:

- it starts a link for every inventory entry with ``qmp`` (and on PUT), stops it on
  DELETE, and never lets a link's failure reach the host or another guest;
- **discard interlock**: while ``link.discard_block()`` names a reason, the session does
  not punch (guest_session.py asks ``record.discard_block()``); when it clears, the pages
  still **inflated** are punched then (the guest cannot touch them before its DEFLATE is
  acked), the **reported** ones are not — one of them may be in reuse, its REUSE still
  on the wire — exactly as QEMU gives up a free page report it could not act on;
- **stock guests** (no agent: ``record.driver == "virtio-balloon"``): the VMM's balloon
  size and the guest statistics it relays become the record's view, and the RAM file is
  held open while the VMM runs, so ``st_blocks`` shows what the guest kernel's own free
  page reporting gave back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from shared.vocabulary import PAGE_SIZE

from .vmm import CONNECTED, make_link

log = logging.getLogger("balloon.host.vmm")


class VmmLinks:
    """host.vmms: the links by guest id (see the module docstring)."""

    def __init__(self, host, poll_interval: float = 1.0) -> None:
        self.host = host
        self.poll_interval = poll_interval
        self.links: dict[str, object] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self._blocked: dict[str, str | None] = {}

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        for entry in self.host.registry.inventory:
            self.sync(entry.id)

    def sync(self, guest: str) -> None:
        """(Re)start, keep or stop the link of ``guest`` to match its inventory entry."""
        entry = self.host.registry.inventory.get(guest)
        link = self.links.get(guest)
        wanted = None if entry is None else entry.qmp
        if link is not None and (wanted != link.address or entry.ram_file != link.ram_file):
            self._stop(guest)
            link = None
        if link is None and wanted is not None:
            link = make_link(guest, wanted, self._changed, ram_file=entry.ram_file,
                             poll_interval=self.poll_interval)
            self.links[guest] = link
            self._blocked[guest] = link.discard_block()
            self._tasks[guest] = asyncio.get_running_loop().create_task(link.run(), name=f"vmm-{guest}")
        record = self.host.registry.get(guest)
        if record is not None:
            record.vmm = self.links.get(guest)

    def _stop(self, guest: str) -> None:
        self.links.pop(guest, None)
        self._blocked.pop(guest, None)
        task = self._tasks.pop(guest, None)
        if task is not None:
            task.cancel()

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        for guest in list(self.links):
            self._stop(guest)
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # -- what a link's news changes -----------------------------------------------------

    def _changed(self, link, what: str) -> None:
        record = self.host.registry.get(link.guest)
        if record is None or self.links.get(link.guest) is not link:
            return
        if what in ("state", "inhibitors", "layout"):
            blocked = link.discard_block()
            before = self._blocked.get(link.guest)
            self._blocked[link.guest] = blocked
            if blocked != before:
                log.info(f"discards of guest {link.guest} " + (f"blocked: {blocked}" if blocked else "allowed"),
                         extra={"guest": link.guest, "reason": blocked or "", "was": before or ""})
            if before is not None and blocked is None:
                self._punch_balloon(record)
            self._hold_ram(record, link)
        if record.connection is None and record.driver == "virtio-balloon":
            if what == "stats" and link.stats_updated is not None:
                age = max(0.0, time.time() - link.stats_updated)
                record.stats = dict(link.stats)
                record.stats_at = time.monotonic() - age  # the guest's last-update, not ours

    def _punch_balloon(self, record) -> None:
        """Discards allowed again: punch what is still in the agent's balloon (never reported pages)."""
        ram = record.ram
        if ram is None or record.connection is None:
            return
        pfns, counts = record.tracker.inflated_ranges()
        if not pfns.size:
            return
        pages = int(counts.sum())
        log.info("punching the balloon's pages held back while discards were blocked",
                 extra={"guest": record.id, "pages": pages})
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self.host.discard_pool, ram.discard, pfns.copy(), counts.copy())
        future.add_done_callback(lambda f: f.exception() and log.error(
            "late discard failed", extra={"guest": record.id, "error": str(f.exception())}))

    def _hold_ram(self, record, link) -> None:
        """A stock guest's RAM file is open while its VMM runs (for st_blocks), closed otherwise."""
        if record.connection is not None or record.provisioned is None or record.provisioned.ram_file is None:
            return
        if link.state == CONNECTED and link.layout is not None:
            if record.ram is None:
                try:
                    self.host.registry.open_ram(record)
                except (OSError, ValueError) as error:
                    log.warning("cannot open a stock guest's RAM file", extra={"guest": record.id, "error": str(error)})
        elif record.ram is not None:
            record.ram.close()
            record.ram = None

    def after_release(self, record) -> None:
        """The agent's session ended: a VM whose QEMU still runs keeps its RAM file view."""
        link = self.links.get(record.id)
        if link is not None:
            self._hold_ram(record, link)

    # -- the VMM's balloon --------------------------------------------------------------

    def set_balloon(self, record, target_pages: int) -> None:
        """Ask the VMM's balloon for ``target_pages`` (a task; failures are logged, never raised)."""
        link = self.links.get(record.id)
        if link is None:
            return
        actual = max(0, record.pages - target_pages) * PAGE_SIZE

        async def run() -> None:
            try:
                await link.set_balloon(actual)
            except Exception as error:  # noqa: BLE001 - the policy retries at its next tick
                log.warning(f"cannot set the VMM balloon: {error}", extra={"guest": record.id})

        task = asyncio.get_running_loop().create_task(run())
        self._tasks[f"balloon:{record.id}"] = task
        task.add_done_callback(lambda _: self._tasks.pop(f"balloon:{record.id}", None))
