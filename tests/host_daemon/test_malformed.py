"""Malformed input from one guest: ERROR with its code, connection closed, everyone else unaffected."""

from __future__ import annotations

import asyncio
import struct

import msgpack
import pytest
from hostkit import ACK, ERROR, REPORT, RawGuest, eventually, sample, scrape

from host_daemon.connection import WRITE_HIGH_WATER

PAGES = 65536


def report_frame(seq: int, payload: bytes) -> bytes:
    return msgpack.packb([REPORT, seq, payload], use_bin_type=True)


CASES = {
    "garbage": (b"\xc1\xc1\xc1\xc1", "bad-msgpack"),
    "not-an-array": (msgpack.packb({"hello": 1}), "bad-shape"),
    "seq-is-a-string": (msgpack.packb([REPORT, "zero", b""], use_bin_type=True), "bad-shape"),
    "payload-is-a-string": (msgpack.packb([REPORT, 0, "text"], use_bin_type=True), "bad-shape"),
    "unknown-type": (msgpack.packb([99, 0, b""], use_bin_type=True), "unknown-type"),
    "half-a-word": (report_frame(0, b"\x01\x02\x03\x04\x05"), "bad-payload"),
    "dangling-escape": (report_frame(0, struct.pack("<Q", 5 << 12)), "bad-payload"),
    "wrong-seq": (report_frame(7, struct.pack("<Q", (5 << 12) | 1)), "bad-seq"),
    "welcome-from-guest": (msgpack.packb([2, {"version": 1}]), "bad-state"),  # state before fields (PROTOCOL §5.1)
}


async def _bystander(host):
    """Another connected guest whose traffic must keep flowing."""
    other = await RawGuest.connect(host.tcp)
    await other.hello("bystander", PAGES)
    await other.report([(0, 512)])
    return other


@pytest.mark.parametrize("case", sorted(CASES))
async def test_malformed_message_gets_error_and_close(make_host, case):
    host = await make_host(window=4, max_ranges=8)
    other = await _bystander(host)
    bad = await RawGuest.connect(host.unix)
    await bad.hello("bad", PAGES)
    data, code = CASES[case]
    await bad.send_raw(data)
    seen = await bad.closed()
    assert seen and seen[-1][0] == ERROR and seen[-1][1] == code, seen
    assert (await other.report([(1024, 512)]))[2] == 0  # the bystander carries on
    await eventually(lambda: host.stats.protocol_errors[code] >= 1)
    text = await scrape(host.url)
    assert sample(text, "balloon_protocol_errors_total", code=code) >= 1
    await eventually(lambda: not host.registry.get("bad").connected)
    assert host.registry.get("bystander").connected
    await other.close()


async def test_too_many_ranges(make_host):
    host = await make_host(max_ranges=8)
    bad = await RawGuest.connect(host.unix)
    await bad.hello("big", PAGES)
    await bad.batch(REPORT, [(i * 2, 1) for i in range(9)])
    seen = await bad.closed()
    assert seen[-1][:2] == [ERROR, "too-many-ranges"]


async def test_window_overrun(make_host):
    host = await make_host(window=2)
    other = await _bystander(host)
    bad = await RawGuest.connect(host.unix)
    await bad.hello("eager", PAGES)
    # three batches in one write, none acked yet: one more than the window
    await bad.send_raw(b"".join(report_frame(seq, struct.pack("<Q", ((seq * 8) << 12) | 1))
                                for seq in range(3)))
    seen = await bad.closed()
    assert seen[-1][:2] == [ERROR, "window-overrun"], seen
    assert (await other.report([(2048, 1)]))[0] == ACK
    await other.close()


async def test_two_hundred_megabyte_frame_is_not_buffered(make_host):
    """A frame announcing 200 MB is refused after about max_message_bytes, never buffered whole."""
    limit = 64 * 1024
    host = await make_host(max_message_bytes=limit, max_ranges=1024)
    other = await _bystander(host)
    bad = await RawGuest.connect(host.unix)
    await bad.hello("huge", PAGES)
    # [3, 0, bin32 of 200_000_000 bytes] — then stream the body in 64 KiB pieces.
    await bad.send_raw(b"\x93\x03\x00\xc6" + struct.pack(">I", 200_000_000))
    sent = 0
    chunk = b"\x00" * 65536
    with pytest.raises((ConnectionError, OSError)):
        while sent < 200_000_000:
            bad.writer.write(chunk)
            await bad.writer.drain()
            sent += len(chunk)
            await asyncio.sleep(0)
    # The host hung up long before: its buffer is bounded by 2 x max_message_bytes, so what
    # it accepted is that plus what the kernel socket buffers held.
    assert sent < 16 * 1024 * 1024, sent
    seen = []
    try:
        seen = await bad.closed()
    except (ConnectionError, OSError):
        pass
    await eventually(lambda: host.stats.protocol_errors["too-large"] == 1)
    if seen:
        assert seen[-1][:2] == [ERROR, "too-large"]
    assert (await other.report([(4096, 8)]))[2] == 0
    await other.close()


async def test_never_says_hello_is_closed_after_the_handshake_timeout(make_host):
    host = await make_host(handshake_timeout=0.2)
    silent = await RawGuest.connect(host.unix)
    seen = await silent.closed(timeout=3)
    assert seen == [[ERROR, "handshake-timeout", "no HELLO within 0.2s"]]
    await eventually(lambda: host.stats.sessions["timeout"] == 1)


async def test_batch_before_hello_is_bad_state(make_host):
    host = await make_host()
    bad = await RawGuest.connect(host.unix)
    await bad.send_raw(report_frame(0, b""))
    seen = await bad.closed()
    assert seen[-1][:2] == [ERROR, "bad-state"]
    assert len(host.registry) == 0


async def test_bad_hello_fields(make_host):
    host = await make_host()
    for body, code in (({"version": 2, "guest": "g", "page_size": 4096, "pages": 1, "features": []}, "bad-version"),
                       ({"version": 1, "guest": "../etc", "page_size": 4096, "pages": 1, "features": []}, "bad-guest-id"),
                       ({"version": 1, "guest": "g", "page_size": 65536, "pages": 1, "features": []}, "bad-page-size")):
        bad = await RawGuest.connect(host.unix)
        await bad.send([1, body])
        seen = await bad.closed()
        assert seen[-1][:2] == [ERROR, code]
    assert len(host.registry) == 0


async def test_a_guest_that_never_reads_stalls_itself_and_is_closed(make_host):
    """PINGs flooded without reading the PONGs: the host's writer blocks on drain(), its bounded
    queue fills, its reader stops reading — memory stays bounded — and the idle timeout ends
    the session, while another guest carries on."""
    import msgpack
    from hostkit import PING, PONG

    # in-process, host and guests share one loop: a chunk of 20k PINGs keeps it busy for a
    # while on a loaded machine, so the idle timeout leaves the bystander room
    host = await make_host(idle_timeout=2.0)
    other = await _bystander(host)

    async def keepalive():  # the bystander is not idle: it talks every 0.1 s
        while True:
            await other.send([PONG, 0])
            await asyncio.sleep(0.1)

    alive = asyncio.create_task(keepalive())
    flood = await RawGuest.connect(host.unix)
    await flood.hello("flood", PAGES)
    session = host.registry.get("flood").connection
    ping = msgpack.packb([PING, 1]) * 4096
    sent = 0
    with pytest.raises((ConnectionError, OSError, TimeoutError)):
        async with asyncio.timeout(20):
            while True:
                flood.writer.write(ping)
                await flood.writer.drain()
                sent += len(ping)
                # what the host holds for it stays bounded: reading pauses above the high-water
                # mark, so at most one read's replies (a read is <= 256 KiB) lie beyond it
                assert session.transport.get_write_buffer_size() <= WRITE_HIGH_WATER + 256 * 1024
    assert sent < 64 * 1024 * 1024  # the host stopped reading long before
    # closed (and, having applied no batch, forgotten at once)
    await eventually(lambda: host.registry.get("flood") is None or not host.registry.get("flood").connected,
                     timeout=10)
    assert (await other.report([(8192, 8)]))[2] == 0
    alive.cancel()
    await other.close()
