"""The listen backlog the host asks for is the one it gets: 512 guests connecting at once."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest
from hostkit import WELCOME, RawGuest

from shared.runtime.addresses import Address

GUESTS = 512


def _somaxconn() -> int:
    try:
        return int(Path("/proc/sys/net/core/somaxconn").read_text())
    except (OSError, ValueError):
        return 0


@pytest.mark.skipif(_somaxconn() < GUESTS, reason="net.core.somaxconn caps every backlog below 512")
async def test_512_guests_connecting_at_once_all_get_welcome(make_host, tmp_path):
    host = await make_host(listen=(Address("unix", path=str(tmp_path / "herd.sock")),), http=None)
    # Every connect() happens before the loop runs again, so the host accepts none of them
    # meanwhile: they all wait in the listen queue. With asyncio's re-listen(100) the 102nd
    # connect() fails with EAGAIN.
    socks = []
    try:
        for _ in range(GUESTS):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            socks.append(sock)
            sock.connect(host.unix)  # raises BlockingIOError when the backlog is full

        async def guest(index: int, sock: socket.socket):
            reader, writer = await asyncio.open_unix_connection(sock=sock)
            raw = RawGuest(reader, writer)
            reply = await raw.hello(f"herd-{index}", 256, timeout=30)
            await raw.close()
            return reply[0] if reply else None

        replies = await asyncio.gather(*(guest(i, s) for i, s in enumerate(socks)))
    finally:
        for sock in socks:
            sock.close()
    assert replies == [WELCOME] * GUESTS
