"""Helpers for driving ``GuestSession`` and ``GuestProtocol`` without sockets.

The guest side is plain msgpack (as docs/PROTOCOL.md documents it), so these tests do not
depend on the guest library; the host side is the real session with the real registry.
"""

from __future__ import annotations

import struct

import msgpack

from host_daemon.admission import Admitter, Peer
from host_daemon.auth import GuestAuth
from host_daemon.guest_session import GuestSession
from host_daemon.metrics import HostStats
from host_daemon.registry import Registry
from host_daemon.settings import HostSettings
from shared.runtime.addresses import Address

HELLO, WELCOME, REPORT, ACK, REUSE, INFLATE = 1, 2, 3, 4, 5, 6
TARGET, STATS, PING, ERROR, PONG, BYE = 8, 13, 14, 15, 16, 17
LISTENER = Address("unix", path="/run/test.sock")


def hello(guest: str = "g1", pages: int = 65536, features=("ranges52",)) -> bytes:
    return msgpack.packb([HELLO, {"version": 1, "guest": guest, "page_size": 4096, "pages": pages,
                                  "features": list(features)}])


def batch(kind: int, seq: int, ranges) -> bytes:
    words = b"".join(struct.pack("<Q", (pfn << 12) | count) if count < 4096
                     else struct.pack("<QQ", pfn << 12, count) for pfn, count in ranges)
    return msgpack.packb([kind, seq, words], use_bin_type=True)


def decode(data: bytes) -> list:
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(data)
    return list(unpacker)


def settings(**overrides) -> HostSettings:
    options = dict(listen=(LISTENER,), http=None, retention=30.0)
    options.update(overrides)
    return HostSettings(**options)


def peer(uid: int = 1000) -> Peer:
    return Peer(LISTENER, "unix", f"unix:/run/test.sock#pid=1,uid={uid}", None, 1, uid, uid)


class Host:
    """What a session needs from the host: settings, a real admitter over a real registry, stats."""

    def __init__(self, **overrides) -> None:
        self.settings = settings(**overrides)
        self.registry = Registry(self.settings.max_guests, self.settings.retention, None)
        self.admitter = Admitter(self.settings, self.registry, GuestAuth(None))
        self.stats = HostStats()

    def session(self, now: float = 0.0, admitter=None) -> GuestSession:
        return GuestSession(self.settings, admitter or self.admitter, self.stats, peer(), now)


class FakeRam:
    """A RAM file that records the discards it was asked for."""

    def __init__(self) -> None:
        self.discarded: list[tuple[list[int], list[int]]] = []

    def discard(self, pfns, counts) -> None:
        self.discarded.append((list(map(int, pfns)), list(map(int, counts))))

    def close(self) -> None:
        pass

    def remove(self) -> None:
        pass
