"""The asyncio client over a real Unix socket against a scripted host."""

from __future__ import annotations

import asyncio

from guest_fakes import FakeBuddy

from guest_agent.agent import Agent
from guest_agent.balloon import Balloon
from guest_agent.client import GuestClient
from guest_agent.reporting import FreePageReporting
from shared.addresses import Address
from shared.messages import Target, Welcome
from shared.protocol import HostConnection, negotiate_features

PAGES = 4096


async def until(predicate, deadline: float = 5.0) -> bool:
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline
    while loop.time() < end:
        if predicate():
            return True
        await asyncio.sleep(0.01)
    return predicate()


async def test_a_target_sent_in_the_same_write_as_welcome_reaches_the_balloon(tmp_path):
    """A restarted host sends the remembered TARGET right after WELCOME; the guest must not drop it."""
    hello_seen = asyncio.Event()

    async def host(reader, writer):
        conn = HostConnection()
        while conn.hello is None:
            conn.receive_data(await reader.read(65536))
            list(conn.events())
        hello_seen.set()
        welcome = Welcome(window=4, max_ranges=64,
                          features=negotiate_features(conn.hello.features, ("ranges52",)))
        writer.write(conn.send(welcome) + conn.send(Target(pages=1024)))  # one write, one read
        await writer.drain()
        while await reader.read(65536):  # keep the session open; ignore what the guest sends
            pass

    path = str(tmp_path / "host.sock")
    server = await asyncio.start_unix_server(host, path)
    allocator = FakeBuddy(PAGES)
    balloon = Balloon(allocator)
    agent = Agent(allocator=allocator, reporting=FreePageReporting(allocator), balloon=balloon,
                  total_pages=PAGES, ping_interval=0)
    client = GuestClient(agent, Address("unix", path=path), "g1", ("ranges52",))
    task = asyncio.create_task(client.run())
    try:
        assert await until(hello_seen.is_set)
        assert await until(lambda: balloon.target == 1024), "the TARGET that came with WELCOME was lost"
    finally:
        client.stop_event.set()
        await asyncio.wait_for(task, 5)
        server.close()
        await server.wait_closed()
