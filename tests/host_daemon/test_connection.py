"""The asyncio.Protocol shell over a fake transport: backpressure without sockets or sleeps."""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor, Future

from sessionkit import (
    ACK,
    INFLATE,
    LISTENER,
    REPORT,
    WELCOME,
    FakeRam,
    batch,
    decode,
    hello,
    settings,
)

from host_daemon.connection import GuestProtocol
from host_daemon.server import HostServer


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.reading = True
        self.closing = False
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def is_reading(self) -> bool:
        return self.reading

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = self.aborted = True

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        pass

    def get_extra_info(self, name, default=None):
        return default


class HeldPool(Executor):
    """An executor whose jobs run only when the test says so."""

    def __init__(self) -> None:
        self.jobs: list[tuple[Future, object, tuple]] = []

    def submit(self, fn, *args):
        future = Future()
        self.jobs.append((future, fn, args))
        return future

    def run_all(self) -> None:
        jobs, self.jobs = self.jobs, []
        for future, fn, args in jobs:
            future.set_result(fn(*args))


def connect(**overrides):
    host = HostServer(settings(**overrides))
    transport = FakeTransport()
    protocol = GuestProtocol(host, LISTENER)
    protocol.connection_made(transport)
    return host, protocol, transport


async def test_acks_of_one_chunk_leave_in_one_write():
    host, protocol, transport = connect()
    protocol.data_received(hello())
    assert decode(transport.writes.pop())[0][0] == WELCOME
    protocol.data_received(b"".join(batch(REPORT, seq, [(seq * 64, 8)]) for seq in range(8)))
    assert len(transport.writes) == 1 and decode(transport.writes[0]) == [[ACK, s, 0] for s in range(8)]


async def test_reading_pauses_while_the_guest_does_not_read():
    host, protocol, transport = connect()
    protocol.data_received(hello())
    protocol.pause_writing()  # the transport's buffer went above its high-water mark
    assert transport.is_reading() is False
    protocol.resume_writing()
    assert transport.is_reading() is True


async def test_reading_pauses_while_a_large_discard_is_in_flight():
    host, protocol, transport = connect()
    pool = host.discard_pool = HeldPool()
    protocol.data_received(hello())
    transport.writes.clear()
    record = host.registry.get("g1")
    record.ram = FakeRam()
    protocol.data_received(batch(INFLATE, 0, [(0, 4096)]) + batch(REPORT, 1, [(8192, 8)]))
    assert transport.is_reading() is False and transport.writes == []
    protocol.data_received(batch(REPORT, 2, [(9000, 8)]))  # already in flight when paused: held
    pool.run_all()
    await asyncio.sleep(0)  # the executor future's callback runs on the loop
    await asyncio.sleep(0)
    assert transport.is_reading() is True
    acks = [message for data in transport.writes for message in decode(data)]
    assert acks == [[ACK, 0, 0], [ACK, 1, 0], [ACK, 2, 0]]
    assert record.ram.discarded == [([0], [4096]), ([8192], [8]), ([9000], [8])]


async def test_both_holds_must_be_released_before_reading_resumes():
    host, protocol, transport = connect()
    pool = host.discard_pool = HeldPool()
    protocol.data_received(hello())
    host.registry.get("g1").ram = FakeRam()
    protocol.data_received(batch(INFLATE, 0, [(0, 4096)]))
    protocol.pause_writing()
    pool.run_all()
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert transport.is_reading() is False  # still not reading its ACKs
    protocol.resume_writing()
    assert transport.is_reading() is True


async def test_handshake_cap_per_peer():
    host = HostServer(settings(max_handshakes_per_peer=2))
    transports = []
    for _ in range(3):
        transport = FakeTransport()
        GuestProtocol(host, LISTENER).connection_made(transport)
        transports.append(transport)
    assert [t.closing for t in transports] == [False, False, True]
    assert decode(transports[2].writes[0])[0][:2] == [15, "too-many-connections"]
    assert host.handshaking == 2
