"""A guest written only from docs/PROTOCOL.md: msgpack arrays on a stream and
range words packed with ``struct`` — deliberately no ``shared`` import, so the host is
tested against the documented wire format, not against its own library."""

from __future__ import annotations

import asyncio
import struct

import msgpack

HELLO, WELCOME, REPORT, ACK, REUSE, INFLATE, DEFLATE, TARGET = 1, 2, 3, 4, 5, 6, 7, 8
HINT_START, HINT, HINT_DONE, HINT_STOP, STATS, PING, ERROR, PONG, BYE = 9, 10, 11, 12, 13, 14, 15, 16, 17


def words(ranges) -> bytes:
    """(pfn, count) pairs → payload: (pfn << 12) | count, count 0 escapes to the next word."""
    out = []
    for pfn, count in ranges:
        if 1 <= count <= 4095:
            out.append(struct.pack("<Q", (pfn << 12) | count))
        else:
            out.append(struct.pack("<QQ", pfn << 12, count))
    return b"".join(out)


class RawGuest:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.unpacker = msgpack.Unpacker(raw=False)
        self.seq = 0
        self.welcome = None

    @classmethod
    async def connect(cls, address) -> RawGuest:
        if isinstance(address, str):
            reader, writer = await asyncio.open_unix_connection(address)
        else:
            reader, writer = await asyncio.open_connection(*address)
        return cls(reader, writer)

    async def send(self, obj) -> None:
        self.writer.write(msgpack.packb(obj, use_bin_type=True))
        await self.writer.drain()

    async def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def recv(self, timeout: float = 5.0):
        """Next message, or None at EOF."""
        async with asyncio.timeout(timeout):
            while True:
                for obj in self.unpacker:
                    return obj
                data = await self.reader.read(65536)
                if not data:
                    return None
                self.unpacker.feed(data)

    async def recv_skip_pings(self, timeout: float = 5.0):
        while True:
            message = await self.recv(timeout)
            if message is None or message[0] != PING:
                return message

    async def hello(self, guest: str, pages: int, features=(), token=None, timeout: float = 5.0):
        body = {"version": 1, "guest": guest, "page_size": 4096, "pages": pages, "features": list(features)}
        if token is not None:
            body["token"] = token
        await self.send([HELLO, body])
        reply = await self.recv(timeout)
        if reply is not None and reply[0] == WELCOME:
            self.welcome = reply[1]
        return reply

    async def batch(self, kind: int, ranges, cmd_id: int | None = None) -> int:
        seq = self.seq
        self.seq += 1
        payload = words(ranges)
        await self.send([kind, seq, cmd_id, payload] if kind == HINT else [kind, seq, payload])
        return seq

    async def report(self, ranges) -> list:
        """Send one REPORT and return its ACK."""
        seq = await self.batch(REPORT, ranges)
        ack = await self.recv_skip_pings()
        assert ack is not None and ack[0] == ACK and ack[1] == seq, ack
        return ack

    async def closed(self, timeout: float = 5.0) -> list:
        """Everything received until the host closes the connection."""
        seen = []
        while True:
            message = await self.recv(timeout)
            if message is None:
                return seen
            seen.append(message)

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass


async def eventually(predicate, timeout: float = 5.0, interval: float = 0.01):
    """Poll ``predicate`` until it is truthy or the deadline passes (then fail)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


async def scrape(url: str) -> str:
    import aiohttp

    async with aiohttp.ClientSession() as http, http.get(f"{url}/metrics") as response:
        assert response.status == 200
        return await response.text()


def sample(text: str, name: str, **labels) -> float | None:
    """Value of one series in Prometheus text, or None when absent."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    prefix = f"{name}{{{want}}} " if labels else f"{name} "
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix):])
    return None
