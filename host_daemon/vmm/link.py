"""``VmmLink``: the small interface every VMM module implements (QEMU first: :mod:`.qemu`).

A provisioned VM (inventory key ``qmp``) has a VMM, and only the VMM knows three things
the host needs (oVirt MOM's ``HypervisorInterfaces`` keep the same small surface):

- **where guest RAM lives in the RAM file** (the PCI hole: host_daemon/ramlayout.py);
- **whether discarding guest RAM is safe now.** QEMU itself refuses to discard while RAM
  discard is disabled (VFIO and other devices that pin guest pages for DMA), during
  incoming postcopy and during a background snapshot (``virtio_balloon_inhibited()``,
  ``ram_block_discard_is_disabled()``). The host is more conservative: any migration, a
  snapshot job, a pinning device, or a VMM it cannot reach (unknown = unsafe) blocks
  every punch of that VM's file. Batches are still acked (the guest must never hang);
  the pages are counted as inhibited (``balloon_discard_inhibited_bytes_total``);
- **the VMM's own balloon**, for stock guests that run no agent: set the target, read the
  actual size, read the guest's memory statistics (virtio-balloon's stats queue).

``VmmLink`` holds what the host last learned; ``run()`` keeps the connection up with
backoff and never raises; callers read attributes and never wait on the VMM from the
event loop's hot path. ``on_change(link, what)`` tells the host when ``what`` (``"state"``,
``"inhibitors"``, ``"balloon"``, ``"stats"``, ``"layout"``) changed.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Callable

from ..ramlayout import RamLayout

log = logging.getLogger("balloon.host.vmm")

#: Why a VM's discards are blocked (the ``reason`` label of the inhibited-bytes counter).
UNREACHABLE = "vmm-unreachable"  # no answer from the VMM (down, restarting, slow): unknown = unsafe
VMM_ERROR = "vmm-error"  # the VMM answers, but its RAM is not what the inventory says
MIGRATION = "migration"  # any migration in progress, either side
SNAPSHOT = "snapshot"  # a background snapshot / snapshot-save job
PINNED = "ram-discard-disabled"  # a device pins guest RAM (VFIO and the like)
INHIBIT_REASONS = (UNREACHABLE, VMM_ERROR, MIGRATION, SNAPSHOT, PINNED)

#: ``state`` values (API ``vmm.state``, ``balloonctl status``).
CONNECTING, CONNECTED, UNREACHABLE_STATE, ERROR = "connecting", "connected", "unreachable", "error"

#: Reconnect backoff: first retry after this, doubling up to the cap (QEMU restarts in ~1 s).
BACKOFF_FIRST_S = 0.5
BACKOFF_CAP_S = 30.0
#: Most a single VMM request may take before the link counts as unreachable.
REQUEST_TIMEOUT_S = 5.0


class VmmLink(abc.ABC):
    """One VM's VMM as the host sees it; subclasses speak one VMM's protocol."""

    kind = "vmm"

    def __init__(self, guest: str, address: str, on_change: Callable[[VmmLink, str], None] | None = None) -> None:
        self.guest = guest
        self.address = address
        self.on_change = on_change
        self.state = CONNECTING
        self.detail = ""
        self.layout: RamLayout | None = None
        self.inhibitors: frozenset[str] = frozenset()
        self.has_balloon = False  # the VM has the VMM's own balloon device
        self.balloon_actual: int | None = None  # bytes the guest keeps (QEMU "actual")
        self.stats: dict[int, int] = {}  # virtio STATS tags -> value, from the VMM's balloon
        self.stats_updated: float | None = None  # wall-clock time the guest last sent them
        self.connects = 0
        self.failures = 0

    # -- what the host asks -------------------------------------------------------------

    def discard_block(self) -> str | None:
        """Why this VM's RAM must not be punched now (None: it may)."""
        if self.state == ERROR:
            return VMM_ERROR
        if self.state != CONNECTED:
            return UNREACHABLE
        if self.inhibitors:
            return min(self.inhibitors, key=INHIBIT_REASONS.index)
        return None

    def to_json(self) -> dict:
        return {
            "kind": self.kind,
            "address": self.address,
            "state": self.state,
            "detail": self.detail,
            "discard_blocked": self.discard_block(),
            "inhibitors": sorted(self.inhibitors),
            "balloon_device": self.has_balloon,
            "layout": None if self.layout is None else self.layout.to_json(),
            "connects": self.connects,
        }

    # -- what subclasses do ---------------------------------------------------------------

    @abc.abstractmethod
    async def run(self) -> None:
        """Connect, keep the view fresh, reconnect with backoff; returns only when cancelled."""

    @abc.abstractmethod
    async def set_balloon(self, actual_bytes: int) -> None:
        """Ask the VMM's balloon to leave the guest ``actual_bytes`` (QEMU ``balloon``)."""

    # -- for subclasses -----------------------------------------------------------------

    def _set(self, what: str, **values) -> None:
        changed = False
        for name, value in values.items():
            if getattr(self, name) != value:
                setattr(self, name, value)
                changed = True
        if changed and self.on_change is not None:
            try:
                self.on_change(self, what)
            except Exception:  # noqa: BLE001 - an observer's bug never stops the link
                log.exception("vmm observer failed", extra={"guest": self.guest})

