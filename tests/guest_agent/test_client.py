"""The asyncio client over a real Unix socket against a scripted host."""

from __future__ import annotations

import asyncio

from guest_fakes import FakeBuddy

from guest_agent.agent import Agent
from guest_agent.balloon import Balloon
from guest_agent.client import GuestClient
from guest_agent.reporting import FreePageReporting
from shared.messages import Target, Welcome
from shared.protocol import HostConnection, negotiate_features
from shared.runtime.addresses import Address

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


async def test_a_missing_socket_is_named_once_not_a_bare_errno_every_retry(tmp_path, caplog):
    import logging

    agent = Agent(allocator=FakeBuddy(1024), total_pages=1024)
    missing = tmp_path / "nowhere" / "host.sock"
    client = GuestClient(agent, Address("unix", path=str(missing)), "g1", ("ranges52",), reconnect_max=0.05)
    with caplog.at_level(logging.DEBUG, logger="guest_agent.client"):
        task = asyncio.create_task(client.run())
        assert await until(lambda: agent.metrics.value("balloon_guest_connect_failures_total") >= 3)
        client.stop()
        await task
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings  # the same failure again is not repeated at warning level
    assert f"cannot connect to unix:{missing}: no such socket" in client.last_error
    assert "FileNotFoundError" not in client.last_error


def test_each_phase_of_a_failure_is_said_in_words():
    client = GuestClient(Agent(allocator=FakeBuddy(1024), total_pages=1024), Address("unix", path="/run/x.sock"),
                         "g1", ("ranges52",), handshake_timeout=5.0)
    client._phase = "connect"
    assert client.describe(TimeoutError()) == "connecting to unix:/run/x.sock timed out after 5s"
    assert client.describe(ConnectionRefusedError(111, "Connection refused")).endswith("Connection refused")
    client._phase = "handshake"
    assert client.describe(TimeoutError()).startswith("no WELCOME from unix:/run/x.sock within 5s")
    client._phase = "session"
    assert client.describe(EOFError()) == "EOFError: no details (session, unix:/run/x.sock)"
