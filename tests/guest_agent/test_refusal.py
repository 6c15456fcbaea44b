"""A refusal retrying cannot change ends the guest; everything else is retried, visibly."""

from __future__ import annotations

import asyncio
import logging

from guest_fakes import FakeBuddy

from guest_agent.agent import Agent
from guest_agent.client import REPEAT_EVERY, GuestClient, Refused, refusal_line
from shared.messages import Error
from shared.protocol import HostConnection
from shared.runtime.addresses import Address


async def _refusing_host(tmp_path, code: str, detail: str, hellos: list | None = None):
    async def host(reader, writer):
        if hellos is not None:
            hellos.append(1)
        conn = HostConnection()
        while conn.hello is None:
            conn.receive_data(await reader.read(65536))
            list(conn.events())
        writer.write(conn.send(Error(code, detail)))
        await writer.drain()
        writer.close()

    path = str(tmp_path / "host.sock")
    return path, await asyncio.start_unix_server(host, path)


async def test_a_permanent_refusal_stops_the_client_after_one_attempt(tmp_path):
    path, server = await _refusing_host(tmp_path, "bad-size", "an unprovisioned guest may claim at most "
                                        "16384 pages (--max-guest-memory); HELLO claims 65536")
    agent = Agent(allocator=FakeBuddy(1024), total_pages=1024)
    client = GuestClient(agent, Address("unix", path=path), "g1", ("ranges52",), reconnect_max=0.05)
    try:
        await asyncio.wait_for(client.run(), 5)  # returns by itself: no retry loop
    finally:
        server.close()
        await server.wait_closed()
    assert isinstance(client.refused, Refused) and client.refused.code == "bad-size"
    assert agent.metrics.value("balloon_guest_protocol_errors_total", {"code": "bad-size"}) == 1


async def test_a_busy_guest_id_is_retried_not_fatal(tmp_path):
    """guest-busy clears once the host notices the old session is gone."""
    hellos = []
    path, server = await _refusing_host(tmp_path, "guest-busy", "another session holds g1", hellos)
    agent = Agent(allocator=FakeBuddy(1024), total_pages=1024)
    client = GuestClient(agent, Address("unix", path=path), "g1", ("ranges52",), reconnect_max=0.02)
    task = asyncio.create_task(client.run())
    try:
        loop = asyncio.get_running_loop()
        end = loop.time() + 5
        while len(hellos) < 3:
            assert loop.time() < end
            await asyncio.sleep(0.01)
        assert not task.done()
    finally:
        client.stop()
        await asyncio.wait_for(task, 5)
        server.close()
        await server.wait_closed()
    assert client.refused is None


def test_the_refusal_line_is_in_bytes_and_says_what_to_change():
    line = refusal_line("g1", 16 << 18, Refused(
        "bad-size", "an unprovisioned guest may claim at most 16384 pages (--max-guest-memory); HELLO claims 4194304"))
    assert line == ("the host refuses guest g1 (bad-size): it allows at most 64MiB for an unprovisioned guest "
                    "(its --max-guest-memory) and this guest has 16GiB (--memory); not retrying")
    line = refusal_line("vm1", 1 << 18, Refused("bad-size", "guest 'vm1' has 131072 pages on this host; HELLO claims 262144"))
    assert "at most 512MiB for guest vm1 (its inventory entry) and this guest has 1GiB" in line
    line = refusal_line("g1", 1024, Refused("auth-failed", "no token"))
    assert line.startswith("the host refuses guest g1 (auth-failed): the connection does not prove the guest id")
    assert "\n" not in line


async def test_a_missing_socket_is_logged_again_every_few_attempts(tmp_path, caplog):
    agent = Agent(allocator=FakeBuddy(1024), total_pages=1024)
    client = GuestClient(agent, Address("unix", path=str(tmp_path / "none.sock")), "g1", ("ranges52",),
                         reconnect_max=0.001)
    with caplog.at_level(logging.INFO, logger="guest_agent.client"):
        task = asyncio.create_task(client.run())
        loop = asyncio.get_running_loop()
        end = loop.time() + 10
        while agent.metrics.value("balloon_guest_connect_failures_total") < 2 * REPEAT_EVERY:
            assert loop.time() < end
            await asyncio.sleep(0.005)
        client.stop()
        await asyncio.wait_for(task, 5)
    repeats = [r for r in caplog.records if r.getMessage() == "still no session, retrying"]
    assert len(repeats) >= 2 and repeats[0].attempts == REPEAT_EVERY
    assert repeats[1].attempts == 2 * REPEAT_EVERY
