"""Sans-IO connections for the protocol tests, with no socket: a guest and a host joined by
handing bytes to each other (h11's ConnectionPair idea), or one side brought to READY alone
so a test can feed it the bytes a misbehaving peer would send."""

from __future__ import annotations

import msgpack
import pytest

from shared.errors import RemoteProtocolError
from shared.messages import Hello, Welcome
from shared.protocol import (
    CONNECTION_CLOSED,
    DEFAULT_MAX_MESSAGE_BYTES,
    NEED_DATA,
    GuestConnection,
    HostConnection,
    negotiate_features,
)

HOST_FEATURES = ("ranges52", "pfn32", "hinting", "stats", "shared-ram", "deflate-on-oom")
#: the HELLO ``ready_host`` reads (a guest offering the usual features)
HELLO = {"version": 1, "guest": "g1", "page_size": 4096, "pages": 1024, "features": ["ranges52", "hinting", "stats"]}


def drain(connection) -> list:
    """Every event the connection can produce from what it has buffered."""
    events = []
    while True:
        event = connection.next_event()
        events.append(event)
        if event is NEED_DATA or event is CONNECTION_CLOSED:
            return events


def raw(*obj) -> bytes:
    """Hand-made wire bytes, to play a peer that does not follow the rules."""
    return msgpack.packb(list(obj), use_bin_type=True)


def remote_error(connection, data: bytes) -> RemoteProtocolError:
    """The error ``connection`` raises on ``data`` (the test fails if it raises none)."""
    connection.receive_data(data)
    with pytest.raises(RemoteProtocolError) as caught:
        while connection.next_event() is not NEED_DATA:
            pass
    return caught.value


def ready_host(window: int = 2, max_ranges: int = 8, features=("ranges52",), **kwargs) -> HostConnection:
    """A host that read HELLO and sent a WELCOME accepting ``features``: READY for batches."""
    host = HostConnection(**kwargs)
    offered = HELLO["features"] + [name for name in features if name not in HELLO["features"]]
    host.receive_data(raw(1, {**HELLO, "features": offered}))
    assert isinstance(host.next_event(), Hello)
    host.send(Welcome(window=window, max_ranges=max_ranges, features=tuple(features)))
    return host


def ready_guest(features=("ranges52",), window: int = 2) -> GuestConnection:
    """A guest that sent HELLO and read a WELCOME accepting ``features``: READY to send."""
    guest = GuestConnection("g1", 1 << 20, features=features)
    guest.hello()
    guest.receive_data(raw(2, {"version": 1, "window": window, "max_ranges": 8, "features": list(features)}))
    assert isinstance(guest.next_event(), Welcome)
    return guest


class ConnectionPair:
    """A guest and a host that talk by handing bytes to each other directly."""

    def __init__(self, guest: str = "g1", pages: int = 1 << 16, features=("ranges52",),
                 host_features=HOST_FEATURES, window: int = 4, max_ranges: int = 64,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, welcome_max_message_bytes=None):
        self.guest = GuestConnection(guest, pages, features=features)
        self.host = HostConnection(max_message_bytes=max_message_bytes)
        self.host_features = host_features
        self.window = window
        self.max_ranges = max_ranges
        self.welcome_max_message_bytes = welcome_max_message_bytes

    def to_host(self, data: bytes) -> list:
        self.host.receive_data(data)
        return drain(self.host)

    def to_guest(self, data: bytes) -> list:
        self.guest.receive_data(data)
        return drain(self.guest)

    def guest_sends(self, message) -> list:
        return self.to_host(self.guest.send(message))

    def host_sends(self, message) -> list:
        return self.to_guest(self.host.send(message))

    def handshake(self):
        hello = self.to_host(self.guest.hello())[0]
        accepted = negotiate_features(hello.features, self.host_features)
        welcome = Welcome(window=self.window, max_ranges=self.max_ranges, features=accepted,
                          max_message_bytes=self.welcome_max_message_bytes)
        seen = self.host_sends(welcome)[0]
        return hello, seen
