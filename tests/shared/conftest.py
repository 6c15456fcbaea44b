"""A guest and a host connection joined with no socket (h11's ConnectionPair idea)."""

from __future__ import annotations

import msgpack
import pytest

from shared.messages import Welcome
from shared.protocol import (
    CONNECTION_CLOSED,
    DEFAULT_MAX_MESSAGE_BYTES,
    NEED_DATA,
    GuestConnection,
    HostConnection,
    negotiate_features,
)

HOST_FEATURES = ("ranges52", "pfn32", "hinting", "stats", "shared-ram", "deflate-on-oom")


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


@pytest.fixture(scope="session")
def pair_factory():
    return ConnectionPair
