"""Channel addresses: ``unix:/path``, ``tcp:HOST:PORT``, ``vsock:CID:PORT`` (DESIGN §3).

Parsing only — opening the socket is the daemons' business.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Address:
    kind: str  # "unix" | "tcp" | "vsock"
    path: str | None = None
    host: str | None = None
    port: int | None = None
    cid: int | None = None

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
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


def parse_address(text: str) -> Address:
    """Parse a channel address; raise ValueError saying what form was expected."""
    kind, sep, rest = text.partition(":")
    if not sep:
        raise ValueError(f"{text!r}: expected unix:/path, tcp:HOST:PORT or vsock:CID:PORT")
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
    raise ValueError(f"{text!r}: unknown transport {kind!r} (unix, tcp or vsock)")
