"""QEMU over QMP (``-qmp unix:PATH,server=on,wait=off``), through QEMU's own ``qemu.qmp``.

What the host asks, and why (docs/OPERATIONS.md "Real VMs"):

- ``human-monitor-command "info mtree"``: the ``ram-below-4g`` / ``ram-above-4g`` aliases
  give the guest-physical → backend-offset map (host_daemon/ramlayout.py); ``qom-get
  /objects/<backend> mem-path`` and ``share`` must name the inventory's ``ram_file``,
  mapped shared — otherwise punching the file would not free what the guest uses.
- ``query-migrate`` (any active status: the host cannot see the other side, so any
  migration blocks discards, where QEMU itself only stops for incoming postcopy),
  ``query-jobs`` (a ``snapshot-save`` job) and the device tree under
  ``/machine/peripheral*`` (a ``vfio-*`` device pins guest RAM, as
  ``ram_block_discard_disable()`` records in QEMU): polled every ``poll_interval``, and at
  once on ``MIGRATION`` / ``JOB_STATUS_CHANGE`` / ``DEVICE_ADDED`` / ``DEVICE_DELETED``
  events (``migrate-set-capabilities events=on`` is set so QEMU sends MIGRATION at all).
- the balloon of stock guests: ``balloon`` sets the target, ``query-balloon`` and the
  ``BALLOON_CHANGE`` event give the actual size, the device's ``guest-stats`` property
  (``guest-stats-polling-interval`` set on connect) the guest's statistics, stamped
  with their ``last-update``.

Every request has a timeout; a timeout, an error or a vanished socket marks the link
``unreachable`` (so discards stop: unknown = unsafe) and it reconnects with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os

from qemu.qmp import ExecuteError, QMPClient

from shared.vocabulary import (
    STAT_AVAILABLE,
    STAT_CACHES,
    STAT_FREE,
    STAT_HTLB_PGALLOC,
    STAT_HTLB_PGFAIL,
    STAT_MAJOR_FAULTS,
    STAT_MINOR_FAULTS,
    STAT_SWAP_IN,
    STAT_SWAP_OUT,
    STAT_TOTAL,
)

from ..ramlayout import LayoutError, from_mtree
from .link import (
    BACKOFF_CAP_S,
    BACKOFF_FIRST_S,
    CONNECTED,
    ERROR,
    MIGRATION,
    PINNED,
    REQUEST_TIMEOUT_S,
    SNAPSHOT,
    UNREACHABLE_STATE,
    VmmLink,
)

log = logging.getLogger("balloon.host.vmm")
logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)  # the link logs what matters, with the guest id

#: query-migrate statuses during which the VM's RAM is being copied (qapi/migration.json).
MIGRATING = frozenset({
    "setup", "active", "postcopy-active", "postcopy-paused", "postcopy-recover",
    "pre-switchover", "device", "wait-unplug", "cancelling",
})
#: QEMU's guest-stats names (hw/virtio/virtio-balloon.c balloon_stat_names) → virtio tags.
STAT_NAMES = {
    "stat-swap-in": STAT_SWAP_IN, "stat-swap-out": STAT_SWAP_OUT,
    "stat-major-faults": STAT_MAJOR_FAULTS, "stat-minor-faults": STAT_MINOR_FAULTS,
    "stat-free-memory": STAT_FREE, "stat-total-memory": STAT_TOTAL,
    "stat-available-memory": STAT_AVAILABLE, "stat-disk-caches": STAT_CACHES,
    "stat-htlb-pgalloc": STAT_HTLB_PGALLOC, "stat-htlb-pgfail": STAT_HTLB_PGFAIL,
}
#: A stat the guest never sent reads as (uint64)-1.
UNSET = (1 << 64) - 1
WAKE_EVENTS = ("MIGRATION", "JOB_STATUS_CHANGE", "DEVICE_ADDED", "DEVICE_DELETED", "BALLOON_CHANGE")
PERIPHERALS = ("/machine/peripheral", "/machine/peripheral-anon")


class QmpTimeout(Exception):
    pass


class QemuLink(VmmLink):
    """One QEMU's QMP monitor; see the module docstring."""

    kind = "qemu"

    def __init__(self, guest: str, address: str, on_change=None, ram_file=None,
                 poll_interval: float = 1.0, stats_interval: int = 2,
                 timeout: float = REQUEST_TIMEOUT_S) -> None:
        super().__init__(guest, address, on_change)
        self.path = address[len("unix:"):]
        self.ram_file = ram_file
        self.poll_interval = poll_interval
        self.stats_interval = stats_interval
        self.timeout = timeout
        self._qmp: QMPClient | None = None
        self._balloon_path: str | None = None
        self._wake = asyncio.Event()

    # -- the connection loop --------------------------------------------------------------

    async def run(self) -> None:
        delay = BACKOFF_FIRST_S
        while True:
            qmp = QMPClient(f"balloon-{self.guest}")
            self._qmp = qmp
            try:
                await self._call(qmp.connect(self.path), "connect")
                self.connects += 1
                delay = BACKOFF_FIRST_S
                await self._serve(qmp)
            except asyncio.CancelledError:
                await self._drop(qmp)
                raise
            except Exception as error:  # noqa: BLE001 - every failure means: reconnect later
                self.failures += 1
                was = self.state
                self._set("state", state=UNREACHABLE_STATE, detail=_describe(error))
                if was != UNREACHABLE_STATE:
                    log.warning(f"vmm unreachable: {self.detail}",
                                extra={"guest": self.guest, "qmp": self.address, "retry_s": delay})
            await self._drop(qmp)
            self._qmp = None
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_CAP_S)

    async def _serve(self, qmp: QMPClient) -> None:
        """Learn the VM, then keep its view fresh until the connection fails."""
        with contextlib.suppress(ExecuteError):  # QEMU before 2.x; polling still works
            await self._execute("migrate-set-capabilities",
                                {"capabilities": [{"capability": "events", "state": True}]})
        await self._learn_layout()
        await self._find_balloon()
        await self._refresh()  # inhibitors first: a CONNECTED link must know them
        if self.state != ERROR:
            self._set("state", state=CONNECTED, detail="")
            log.info("vmm connected", extra={"guest": self.guest, "qmp": self.address,
                                             "balloon_device": self.has_balloon})
        with qmp.listener(WAKE_EVENTS) as listener:
            events = asyncio.ensure_future(self._events(listener))
            try:
                while True:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), self.poll_interval)
                    self._wake.clear()
                    if events.done():
                        events.result()  # re-raise why the event reader stopped
                        raise ConnectionError("QMP event stream ended")
                    await self._refresh()
            finally:
                events.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await events

    async def _events(self, listener) -> None:
        async for event in listener:
            if event["event"] == "BALLOON_CHANGE":
                actual = event.get("data", {}).get("actual")
                if type(actual) is int:
                    self._set("balloon", balloon_actual=actual)
            self._wake.set()

    async def _drop(self, qmp: QMPClient) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(qmp.disconnect(), self.timeout)

    # -- requests -----------------------------------------------------------------------

    async def _call(self, awaitable, what: str):
        try:
            return await asyncio.wait_for(awaitable, self.timeout)
        except TimeoutError:
            raise QmpTimeout(f"QMP {what} took longer than {self.timeout:g}s") from None

    async def _execute(self, command: str, arguments: dict | None = None):
        if self._qmp is None:
            raise ConnectionError("not connected")
        return await self._call(self._qmp.execute(command, arguments), command)

    async def set_balloon(self, actual_bytes: int) -> None:
        """QMP ``balloon``: the guest should keep ``actual_bytes`` (QEMU rounds to pages)."""
        if self.state != CONNECTED or not self.has_balloon:
            raise ConnectionError(f"guest {self.guest}: the VMM's balloon is not reachable ({self.state})")
        await self._execute("balloon", {"value": int(actual_bytes)})

    # -- what the host learns -----------------------------------------------------------

    async def _learn_layout(self) -> None:
        text = await self._execute("human-monitor-command", {"command-line": "info mtree"})
        try:
            layout, backend = from_mtree(text if isinstance(text, str) else "")
        except LayoutError as error:
            self._set("state", state=ERROR, detail=str(error))
            log.error(f"vmm RAM layout unusable: {error}", extra={"guest": self.guest, "qmp": self.address})
            return
        problem = await self._check_backend(backend)
        if problem:
            self._set("state", state=ERROR, detail=problem)
            log.error(f"vmm RAM is not the inventory's: {problem}", extra={"guest": self.guest, "qmp": self.address})
            return
        self._set("layout", layout=layout)

    async def _check_backend(self, backend: str) -> str:
        """Why the backend cannot be the one whose file the host punches ('' if it is)."""
        if self.ram_file is None:
            return ""
        path = f"/objects/{backend}"
        try:
            mem_path = await self._execute("qom-get", {"path": path, "property": "mem-path"})
            shared = await self._execute("qom-get", {"path": path, "property": "share"})
        except ExecuteError as error:
            return f"guest RAM ({path}) is not a memory-backend-file: {error}"
        try:
            same = os.path.samefile(mem_path, self.ram_file)
        except OSError:
            same = False
        if not same:
            return f"guest RAM is {mem_path!r}, not the inventory's ram_file {str(self.ram_file)!r}"
        if shared is not True:
            return f"guest RAM {mem_path!r} is not mapped share=on: punching the file would free nothing"
        return ""

    async def _devices(self) -> list[tuple[str, str]]:
        """(QOM path, type) of every device given on the command line or hotplugged."""
        found = []
        for parent in PERIPHERALS:
            try:
                children = await self._execute("qom-list", {"path": parent})
            except ExecuteError:
                continue
            found += [(f"{parent}/{child['name']}", child.get("type", "")) for child in children]
        return found

    async def _find_balloon(self) -> None:
        """The virtio-balloon device's QOM path (for its stats), or none."""
        self._balloon_path = next((path for path, kind in await self._devices() if "virtio-balloon" in kind), None)
        if self._balloon_path is not None:
            with contextlib.suppress(ExecuteError):
                await self._execute("qom-set", {"path": self._balloon_path,
                                                "property": "guest-stats-polling-interval",
                                                "value": self.stats_interval})
        self._set("balloon", has_balloon=self._balloon_path is not None)

    async def _refresh(self) -> None:
        inhibitors = set()
        migration = await self._execute("query-migrate")
        if migration.get("status") in MIGRATING:
            inhibitors.add(MIGRATION)
        with contextlib.suppress(ExecuteError):
            for job in await self._execute("query-jobs"):
                if job.get("type") == "snapshot-save" and job.get("status") not in ("concluded", "null"):
                    inhibitors.add(SNAPSHOT)
        if await self._pinning_device():
            inhibitors.add(PINNED)
        inhibitors = frozenset(inhibitors)
        if inhibitors != self.inhibitors:
            log.warning(f"vmm discards {'blocked: ' + ','.join(sorted(inhibitors)) if inhibitors else 'allowed again'}",
                        extra={"guest": self.guest, "qmp": self.address})
        self._set("inhibitors", inhibitors=inhibitors)
        if self.has_balloon:
            try:
                info = await self._execute("query-balloon")
                self._set("balloon", balloon_actual=int(info["actual"]))
            except ExecuteError:  # the driver is not loaded in the guest (yet)
                pass
            await self._read_stats()

    async def _pinning_device(self) -> bool:
        return any("vfio" in kind for _, kind in await self._devices())

    async def _read_stats(self) -> None:
        try:
            reply = await self._execute("qom-get", {"path": self._balloon_path, "property": "guest-stats"})
        except ExecuteError:
            return
        updated = reply.get("last-update") or None
        stats = {STAT_NAMES[name]: int(value) for name, value in reply.get("stats", {}).items()
                 if name in STAT_NAMES and type(value) is int and 0 <= value < UNSET}
        if updated and updated != self.stats_updated:
            self._set("stats", stats=stats, stats_updated=float(updated))


def _describe(error: BaseException) -> str:
    cause = getattr(error, "exc", error)  # qemu.qmp.ConnectError wraps the OSError
    text = str(cause) or type(cause).__name__
    if isinstance(cause, FileNotFoundError | ConnectionRefusedError):
        return f"no QEMU listening ({text})"
    return text[:300]


__all__ = ["QemuLink", "MIGRATING", "STAT_NAMES"]
