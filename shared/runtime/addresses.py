"""Channel addresses: ``unix:/path``, ``tcp:HOST:PORT``, ``vsock:CID:PORT`` (docs/PROTOCOL.md §1),
and, for a guest agent inside a VM only, ``serial:/dev/virtio-ports/NAME``.

Parsing only — opening the socket (or the virtio-serial character device) is the daemons'
business. ``serial:`` is a guest-side address: a virtio-serial port is the guest's end of a
channel whose host end QEMU connects to the daemon's Unix listener, so nothing listens on
it; :func:`parse_address` accepts it only when the caller says so (``kinds=GUEST_KINDS``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

#: Where the host listens and guests connect when no address is given. Root uses the
#: directory the deploy/ units create (systemd RuntimeDirectory=balloon, the container's
#: /run/balloon volume); anyone else the per-user runtime directory, as other user daemons.
ROOT_SOCKET_PATH = "/run/balloon/host.sock"


def default_socket_path(uid: int | None = None, environ: Mapping[str, str] | None = None) -> str:
    """``/run/balloon/host.sock`` for root, else ``$XDG_RUNTIME_DIR/balloon/host.sock``,
    else ``/tmp/balloon-$UID/host.sock`` — the one default of host, guest and balloon-load."""
    uid = os.getuid() if uid is None else uid
    environ = os.environ if environ is None else environ
    if uid == 0:
        return ROOT_SOCKET_PATH
    runtime = environ.get("XDG_RUNTIME_DIR", "")
    if runtime.startswith("/"):
        return f"{runtime.rstrip('/')}/balloon/host.sock"
    return f"/tmp/balloon-{uid}/host.sock"


def default_address() -> str:
    return f"unix:{default_socket_path()}"


@dataclass(frozen=True, slots=True)
class Address:
    kind: str  # "unix" | "tcp" | "vsock" | "serial"
    path: str | None = None
    host: str | None = None
    port: int | None = None
    cid: int | None = None

    def __str__(self) -> str:
        if self.kind in ("unix", "serial"):
            return f"{self.kind}:{self.path}"
        if self.kind == "tcp":
            host = f"[{self.host}]" if ":" in (self.host or "") else self.host
            return f"tcp:{host}:{self.port}"
        return f"vsock:{self.cid}:{self.port}"


def _port(text: str, whole: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise ValueError(f"{whole!r}: port must be a number from 0 to 65535")
    return int(text)


def split_host_port(text: str, whole: str | None = None) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` → (host, port)."""
    whole = whole or text
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"{whole!r}: expected [IPV6]:PORT")
        return host, _port(rest[1:], whole)
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{whole!r}: expected HOST:PORT")
    return host, _port(port, whole)


#: What a host listens on and a load generator dials.
SOCKET_KINDS = ("unix", "tcp", "vsock")
#: What a guest agent may connect through: the sockets, or a virtio-serial port in a VM.
GUEST_KINDS = SOCKET_KINDS + ("serial",)
_FORMS = {"unix": "unix:/path", "tcp": "tcp:HOST:PORT", "vsock": "vsock:CID:PORT",
          "serial": "serial:/dev/virtio-ports/NAME"}


def parse_address(text: str, kinds: tuple[str, ...] = SOCKET_KINDS) -> Address:
    """Parse a channel address of one of ``kinds``; raise ValueError saying what form was expected."""
    kind, sep, rest = text.partition(":")
    forms = ", ".join(_FORMS[k] for k in kinds[:-1]) + f" or {_FORMS[kinds[-1]]}"
    if not sep:
        raise ValueError(f"{text!r}: expected {forms}")
    if kind not in kinds:
        raise ValueError(f"{text!r}: unknown transport {kind!r} (expected {forms})")
    if kind == "serial":
        if not rest.startswith("/"):
            raise ValueError(f"{text!r}: serial: needs the absolute path of a virtio-serial port, "
                             "e.g. serial:/dev/virtio-ports/org.balloon.0")
        return Address("serial", path=rest)
    if kind == "unix":
        if not rest:
            raise ValueError(f"{text!r}: unix: needs a socket path")
        return Address("unix", path=rest)
    if kind == "tcp":
        host, port = split_host_port(rest, text)
        return Address("tcp", host=host, port=port)
    if kind == "vsock":
        cid, sep, port = rest.partition(":")
        if not sep or not cid.isdigit():
            raise ValueError(f"{text!r}: expected vsock:CID:PORT with a numeric CID")
        return Address("vsock", cid=int(cid), port=_port(port, text))
    raise AssertionError(kind)  # every kind in _FORMS is handled above
