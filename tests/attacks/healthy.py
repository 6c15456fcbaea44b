"""A healthy guest in its own process: REPORT/REUSE every few ms, one line per ACK latency.

Run as ``python tests/attacks/healthy.py SOCKET OUT`` (the attack suite does): it writes
``<monotonic send time> <latency seconds>`` lines to OUT (line-buffered) until killed, so a
test can take the p99 of the ACKs that fell inside its own attack's window. Written from
docs/PROTOCOL.md with msgpack and struct only (no ``shared`` import), like tests/host_daemon/hostkit.
Its own process, so the attacker's Python work never delays its clock.
"""

from __future__ import annotations

import socket
import struct
import sys
import time

import msgpack

HELLO, WELCOME, REPORT, ACK, REUSE, PING, PONG = 1, 2, 3, 4, 5, 14, 16
PAGES = 65536  # 256 MiB
RANGES = [(block * 512, 512) for block in range(0, 128, 4)]  # 32 order-9 blocks, like page_reporting
PERIOD = 0.005


def payload(ranges) -> bytes:
    return b"".join(struct.pack("<QQ", pfn << 12, count) if count > 4095 else struct.pack("<Q", (pfn << 12) | count)
                    for pfn, count in ranges)


def main(path: str, out_path: str) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    unpacker = msgpack.Unpacker(raw=False)

    def receive():
        while True:
            for message in unpacker:
                if message[0] == PING:
                    sock.sendall(msgpack.packb([PONG, message[1]]))
                    continue
                return message
            data = sock.recv(65536)
            if not data:
                raise SystemExit("host closed the healthy guest")
            unpacker.feed(data)

    sock.sendall(msgpack.packb([HELLO, {"version": 1, "guest": "healthy", "page_size": 4096, "pages": PAGES,
                                        "features": ["ranges52"]}], use_bin_type=True))
    welcome = receive()
    assert welcome[0] == WELCOME, welcome
    seq = 0
    with open(out_path, "w", buffering=1) as out:
        while True:
            kind = REPORT if seq % 2 == 0 else REUSE
            message = msgpack.packb([kind, seq, payload(RANGES)], use_bin_type=True)
            sent = time.monotonic()
            sock.sendall(message)
            ack = receive()
            latency = time.monotonic() - sent
            if ack[0] != ACK or ack[1] != seq:
                raise SystemExit(f"unexpected reply {ack!r:.200}")
            out.write(f"{sent:.6f} {latency:.6f}\n")
            seq += 1
            time.sleep(PERIOD)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
