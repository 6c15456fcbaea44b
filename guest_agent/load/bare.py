"""A bare asyncio + msgpack channel: the yardstick the real daemons are measured against.

``BareHost`` answers HELLO with WELCOME and every batch with an ACK and does nothing
else — no validation, no decoding, no tracking, no metrics. ``bare_client`` keeps
``window`` batches in flight with a plain msgpack loop. The real channel should
reach 80% of this loop's batches/s (docs/PERFORMANCE.md, "Load") with the same window and batch size.

``BareHost`` can also misbehave on purpose (``error_after``/``close_after``) so tests
can check that balloon-load counts what a broken host does.

    python -m guest_agent.load.bare serve unix:/tmp/bare.sock
    python -m guest_agent.load.bare client unix:/tmp/bare.sock --batches 100000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time

import msgpack

from shared.runtime.addresses import parse_address
from shared.vocabulary import HINTING, PFN32, RANGES52, STATS

from .payloads import build_pool

BATCH_TYPES = frozenset({3, 5, 6, 7, 10})
KNOWN_FEATURES = (RANGES52, PFN32, HINTING, STATS)


class BareHost(asyncio.Protocol):
    """Host side with nothing but framing: WELCOME, ACK, PONG."""

    def __init__(self, window: int = 16, max_ranges: int = 4096, error_after: int | None = None,
                 error_code: str = "internal", close_after: int | None = None) -> None:
        self.window = window
        self.max_ranges = max_ranges
        self.error_after = error_after
        self.error_code = error_code
        self.close_after = close_after
        self.unpacker = msgpack.Unpacker(raw=False, max_buffer_size=4 << 20)
        self.transport = None
        self.batches = 0

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.unpacker.feed(data)
        out = []
        for obj in self.unpacker:
            kind = obj[0]
            if kind in BATCH_TYPES:
                self.batches += 1
                if self.error_after is not None and self.batches > self.error_after:
                    out.append(msgpack.packb([15, self.error_code, "bare host told to fail"]))
                    self.transport.write(b"".join(out))
                    self.transport.close()
                    return
                if self.close_after is not None and self.batches > self.close_after:
                    self.transport.write(b"".join(out))
                    self.transport.abort()
                    return
                out.append(msgpack.packb([4, obj[1], 0]))
            elif kind == 1:
                offered = obj[1].get("features", [])
                accepted = [name for name in offered if name in KNOWN_FEATURES]
                out.append(msgpack.packb([2, {"version": 1, "window": self.window,
                                              "max_ranges": self.max_ranges, "features": accepted}]))
            elif kind == 14:
                out.append(msgpack.packb([16, obj[1]]))
            elif kind in (15, 17):
                self.transport.write(b"".join(out))
                self.transport.close()
                return
        if out:
            self.transport.write(b"".join(out))


async def start_bare_host(address: str, **options) -> asyncio.AbstractServer:
    """Listen on ``unix:/path`` or ``tcp:HOST:PORT`` (port 0 picks a free one)."""
    parsed = parse_address(address)
    loop = asyncio.get_running_loop()
    if parsed.kind == "unix":
        return await loop.create_unix_server(lambda: BareHost(**options), parsed.path)
    if parsed.kind == "tcp":
        return await loop.create_server(lambda: BareHost(**options), parsed.host, parsed.port)
    raise ValueError("the bare host listens on unix: or tcp: only")


class _BareClient(asyncio.Protocol):
    def __init__(self, payloads: list[bytes], batches: int, done: asyncio.Future) -> None:
        self.payloads = payloads
        self.total = batches
        self.done = done
        self.unpacker = msgpack.Unpacker(raw=False)
        self.sent = 0
        self.acked = 0
        self.window = 0
        self.transport = None
        self.started = 0.0

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.write(msgpack.packb([1, {"version": 1, "guest": "bare", "page_size": 4096,
                                           "pages": 262144, "features": [RANGES52]}]))

    def _fill(self, room: int) -> None:
        payloads = self.payloads
        out = []
        while room > 0 and self.sent < self.total:
            out.append(msgpack.packb([3, self.sent, payloads[self.sent % len(payloads)]]))
            self.sent += 1
            room -= 1
        if out:
            self.transport.write(b"".join(out))

    def data_received(self, data: bytes) -> None:
        self.unpacker.feed(data)
        freed = 0
        for obj in self.unpacker:
            if obj[0] == 4:
                self.acked += 1
                freed += 1
            elif obj[0] == 2:
                self.window = obj[1]["window"]
                self.started = time.perf_counter()
                self._fill(self.window)
        if freed:
            if self.acked >= self.total:
                if not self.done.done():
                    self.done.set_result(time.perf_counter() - self.started)
                self.transport.close()
                return
            self._fill(freed)

    def connection_lost(self, exc) -> None:
        if not self.done.done():
            self.done.set_exception(ConnectionError(f"bare host closed after {self.acked} acks"))


async def bare_client(address: str, batches: int = 100_000, batch_ranges: int = 32,
                      fragmentation: float = 0.1) -> dict:
    """Closed loop, one connection, the host's window: batches/s of the bare channel."""
    pool = build_pool(262144, batch_ranges, fragmentation, RANGES52, 256, 1)
    parsed = parse_address(address)
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    factory = lambda: _BareClient(list(pool.payloads), batches, done)  # noqa: E731
    if parsed.kind == "unix":
        await loop.create_unix_connection(factory, parsed.path)
    else:
        await loop.create_connection(factory, parsed.host, parsed.port)
    elapsed = await done
    return {"batches": batches, "elapsed_s": elapsed, "batches_per_s": batches / elapsed,
            "batch_ranges": batch_ranges}


def _loop_factory():
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.new_event_loop
    return uvloop.new_event_loop


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m guest_agent.load.bare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the bare host until SIGTERM/SIGINT")
    serve.add_argument("address")
    serve.add_argument("--window", type=int, default=16)
    serve.add_argument("--max-ranges", type=int, default=4096)
    serve.add_argument("--error-after", type=int, metavar="N",
                       help="misbehave: answer batch N+1 of each session with ERROR and close")
    serve.add_argument("--error-code", default="internal")
    serve.add_argument("--close-after", type=int, metavar="N",
                       help="misbehave: drop the connection at batch N+1 of each session")
    client = sub.add_parser("client", help="measure the bare channel's batches/s; prints JSON")
    client.add_argument("address")
    client.add_argument("--batches", type=int, default=100_000)
    client.add_argument("--batch-ranges", type=int, default=32)
    args = parser.parse_args(argv)

    async def serve_forever() -> None:
        server = await start_bare_host(args.address, window=args.window, max_ranges=args.max_ranges,
                                       error_after=args.error_after, error_code=args.error_code,
                                       close_after=args.close_after)
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(signum, stop.set)
        print(f"bare host listening on {args.address} (pid {os.getpid()})", file=sys.stderr, flush=True)
        await stop.wait()
        server.close()

    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        if args.command == "serve":
            runner.run(serve_forever())
        else:
            print(json.dumps(runner.run(bare_client(args.address, args.batches, args.batch_ranges))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
