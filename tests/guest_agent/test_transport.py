"""The serial transport's stream rules and the resync, on a socketpair standing in for a port.

A socketpair has the two properties of a virtio-serial port the code relies on: a read of 0
bytes when the other end has gone, and EAGAIN on a full buffer. QEMU's redial (the same
descriptor serving a second session) is only on a real VM: tests/vm.
"""

from __future__ import annotations

import asyncio
import socket

import pytest

from guest_agent.transport import RESYNC_FILL, SerialPort, SerialStream, resync
from shared.messages import Bye
from shared.protocol import GuestConnection
from shared.runtime.addresses import Address, parse_address

BYE = GuestConnection("vm1", 1024, ["ranges52"]).send(Bye("resync"))


@pytest.fixture
def pair():
    guest, host = socket.socketpair()
    guest.setblocking(False)
    host.setblocking(False)
    yield guest, host
    guest.close()
    host.close()


def test_serial_address_is_guest_only():
    assert parse_address("serial:/dev/virtio-ports/org.balloon.0", ("unix", "serial")) == Address(
        "serial", path="/dev/virtio-ports/org.balloon.0")
    assert str(parse_address("serial:/dev/vport0p1", ("serial",))) == "serial:/dev/vport0p1"
    with pytest.raises(ValueError, match="unknown transport 'serial'"):
        parse_address("serial:/dev/vport0p1")  # what a host or load generator parses
    with pytest.raises(ValueError, match="absolute path"):
        parse_address("serial:vport0p1", ("serial",))


def test_a_regular_file_is_not_a_port(tmp_path):
    path = tmp_path / "not-a-port"
    path.write_bytes(b"")
    with pytest.raises(OSError, match="not a character device"):
        SerialPort(str(path)).open()


async def test_read_until_eof_then_stays_at_eof(pair):
    guest, host = pair
    stream = SerialStream(guest.fileno())
    host.send(b"hello")
    assert await asyncio.wait_for(stream.read(100), 5) == b"hello"
    host.shutdown(socket.SHUT_WR)
    assert await asyncio.wait_for(stream.read(100), 5) == b""
    assert stream.at_eof
    assert await stream.read(100) == b""


async def test_write_waits_for_a_slow_reader_and_keeps_order(pair):
    guest, host = pair
    guest.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    stream = SerialStream(guest.fileno())
    data = bytes(range(256)) * 4096  # 1 MiB: far more than the socket buffers
    stream.write(data)
    assert stream.buffered > 0  # EAGAIN: the rest waits in the stream
    loop = asyncio.get_running_loop()
    received = bytearray()

    async def consume():
        while len(received) < len(data):
            received.extend(await loop.sock_recv(host, 65536))

    await asyncio.wait_for(asyncio.gather(stream.drain(), consume()), 10)
    assert bytes(received) == data
    assert stream.buffered == 0


async def test_a_closed_stream_drops_its_output_and_reads_nothing(pair):
    guest, _host = pair
    stream = SerialStream(guest.fileno())
    stream.close()
    stream.write(b"late")
    assert stream.buffered == 0
    assert await stream.read() == b""


async def _host_end(sock, closes_after, seen: bytearray, stale: bytes = b""):
    """A host that sends ``stale`` bytes, then closes once ``closes_after(seen)`` holds."""
    loop = asyncio.get_running_loop()
    if stale:
        await loop.sock_sendall(sock, stale)
    while not closes_after(seen):
        chunk = await loop.sock_recv(sock, 65536)
        if not chunk:
            return
        seen.extend(chunk)
    sock.shutdown(socket.SHUT_RDWR)


async def test_resync_sends_bye_and_discards_the_old_sessions_bytes(pair):
    guest, host = pair
    seen = bytearray()
    stale = b"\x93\x04\x05\x00" * 100  # ACKs meant for the dead agent
    host_task = asyncio.create_task(_host_end(host, lambda s: BYE in s, seen, stale))
    stream = SerialStream(guest.fileno())
    assert await asyncio.wait_for(resync(stream, BYE, bye_wait=5.0), 10) == "bye"
    await host_task
    assert bytes(seen) == BYE  # BYE and nothing else
    assert stream.at_eof


async def test_resync_fills_when_the_host_is_stuck_inside_a_message(pair):
    guest, host = pair
    seen = bytearray()
    # A host parser inside a 64 KiB bin payload an earlier agent began: it swallows BYE
    # and errors (closes) only on the first byte after the payload.
    payload_left = 65536
    host_task = asyncio.create_task(_host_end(host, lambda s: len(s) > payload_left, seen))
    stream = SerialStream(guest.fileno())
    how = await asyncio.wait_for(resync(stream, BYE, bye_wait=0.2, fill_limit=1 << 20), 20)
    await host_task
    assert how == "fill"
    assert seen.startswith(BYE) and set(seen[len(BYE):]) == {RESYNC_FILL[0]}


async def test_resync_settles_when_the_host_closes_by_itself(pair):
    guest, host = pair
    host.shutdown(socket.SHUT_RDWR)
    stream = SerialStream(guest.fileno())
    assert await asyncio.wait_for(resync(stream, BYE, settle=5.0), 10) == "settled"


async def test_resync_gives_up_on_a_host_that_never_closes(pair):
    guest, host = pair
    loop = asyncio.get_running_loop()

    async def swallow():
        while await loop.sock_recv(host, 65536):
            pass

    sink = asyncio.create_task(swallow())
    stream = SerialStream(guest.fileno())
    with pytest.raises(TimeoutError, match="did not close"):
        await asyncio.wait_for(resync(stream, BYE, bye_wait=0.05, fill_limit=8192, fill_wait=0.05), 10)
    sink.cancel()
