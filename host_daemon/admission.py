"""Admission: what a HELLO on a given connection gets — an id, a size, features, a RAM file.

The one call the session makes between a valid HELLO and its WELCOME (docs/OPERATIONS.md,
"Security model"). Everything in it is decided from the host's side:

- **who**: ``auth.GuestAuth.identify`` — the per-guest listener, a token or the Unix peer's
  uid prove a provisioned id; anything else is an open-mode guest (or refused);
- **how big**: a provisioned guest's size is the inventory's. A HELLO claiming more pages
  is ``bad-size``; fewer are admitted (a real guest cannot know its size exactly: the
  last System RAM range of a 1 GiB QEMU ``pc`` guest ends at 0x3ffdffff) and the host's
  number is used — sent in WELCOME ``pages``, and every range is checked against it. An
  open guest may claim up to ``--max-guest-memory``;
- **which RAM file**: a provisioned guest's own ``ram_file`` (opened, never created or
  resized), punched whether or not the guest maps it (a VM's agent does not); an open
  guest with ``shared-ram`` gets ``--ram-dir/<id>.ram``, created at its claim, never
  shrunk.

Refusals are RemoteProtocolError with a stable code; REFUSALS are the codes counted as
``sessions_total{result="rejected"}``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from shared.errors import RemoteProtocolError
from shared.protocol import negotiate_features
from shared.runtime.addresses import Address
from shared.vocabulary import DEFLATE_ON_OOM, HINTING, PAGE_SIZE, PFN32, RANGES52, SHARED_RAM, STATS

log = logging.getLogger("balloon.host.admission")

#: Codes that refuse a well-formed HELLO.
REFUSALS = frozenset({"auth-failed", "guest-busy", "too-many-guests", "bad-size", "not-ready"})
#: Features this host implements; "shared-ram" only where there is a RAM file to give.
BASE_FEATURES = (RANGES52, PFN32, HINTING, STATS, DEFLATE_ON_OOM)


@dataclass(frozen=True, slots=True)
class Peer:
    """Who connected, from the host's side only (never from HELLO)."""

    listener: Address
    transport: str  # "unix" | "tcp" | "vsock" (== listener.kind)
    address: str  # the host's view for logs and the API: "unix:/p#pid=1,uid=0", "tcp:1.2.3.4:5"
    guest_id: str | None = None  # set when the listener is bound to one guest
    pid: int | None = None  # SO_PEERCRED (unix only)
    uid: int | None = None
    gid: int | None = None

    @property
    def key(self) -> str:
        """What the per-peer handshake cap counts by: the uid on unix, the host part otherwise."""
        if self.transport == "unix":
            return f"unix-uid:{self.uid}" if self.uid is not None else f"unix:{self.listener.path}"
        host, _, _port = self.address.rpartition(":")
        return host or self.address


@dataclass(frozen=True, slots=True)
class Admission:
    record: object  # registry.GuestRecord, already bound to the session
    pages: int  # the size that counts (the host's); record.tracker is built for it
    features: tuple[str, ...]  # negotiated, a subset of hello.features
    ram_file: str | None  # the path for WELCOME (shared-ram), or None


class Admitter:
    """host.admitter: the session calls ``admit`` at HELLO and ``release`` at its end."""

    def __init__(self, settings, registry, auth) -> None:
        self.registry = registry
        self.auth = auth
        self.ram_dir_enabled = settings.ram_dir is not None
        self.max_open_pages = settings.max_guest_memory // PAGE_SIZE

    def admit(self, hello, peer: Peer, owner: object) -> Admission:
        entry = self.auth.identify(hello.guest, hello.token, peer.transport, peer.guest_id, peer.uid)
        layout = None
        if entry is not None:
            record = self.registry.get(entry.id)
            layout = record.layout() if record is not None else None
            if layout is None:  # a VM that may be split around the PCI hole, its VMM not heard yet
                raise RemoteProtocolError(
                    "not-ready", f"guest {entry.id!r}: the host does not know this VM's RAM layout yet "
                                 "(its VMM has not answered); retry")
            if hello.pages > layout.span_pages:
                raise RemoteProtocolError(
                    "bad-size", f"guest {entry.id!r} has {layout.span_pages} pages on this host; "
                                f"HELLO claims {hello.pages}")
            pages = entry.pages
            shared_ram = entry.ram_file is not None
        else:
            if hello.pages > self.max_open_pages:
                raise RemoteProtocolError(
                    "bad-size", f"an unprovisioned guest may claim at most {self.max_open_pages} pages "
                                f"(--max-guest-memory); HELLO claims {hello.pages}")
            pages = hello.pages
            shared_ram = self.ram_dir_enabled
        supported = BASE_FEATURES + ((SHARED_RAM,) if shared_ram else ())
        features = negotiate_features(hello.features, supported)
        record = self.registry.claim(hello.guest, pages, owner, peer.address, entry, layout)
        record.features = features
        ram_file = None
        if (entry is not None and entry.ram_file is not None) or SHARED_RAM in features:
            try:
                path = self.registry.open_ram(record)
            except Exception as error:  # OSError, RamDirError: refuse this guest, not the host
                self.registry.release(record, owner)
                log.error("cannot open RAM file", extra={"guest": record.id, "error": str(error)})
                raise RemoteProtocolError("internal", "the host cannot open this guest's RAM file") from None
            ram_file = path if SHARED_RAM in features else None
        elif record.ram is not None:  # this session does not use the shared file
            record.ram.close()
            record.ram = None
        # WELCOME pages: the span the host counts ranges against (RAM plus any hole below its end)
        return Admission(record, pages if layout is None else layout.span_pages, features, ram_file)

    def release(self, admission: Admission, owner: object, result: str = "closed") -> None:
        self.registry.release(admission.record, owner, result)
