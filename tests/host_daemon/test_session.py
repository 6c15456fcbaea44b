"""Sessions over real Unix and TCP sockets with the independent raw guest."""

from __future__ import annotations

import aiohttp
import pytest
from hostkit import (
    ACK,
    BYE,
    DEFLATE,
    ERROR,
    INFLATE,
    PING,
    PONG,
    REPORT,
    REUSE,
    TARGET,
    WELCOME,
    RawGuest,
    eventually,
    sample,
    scrape,
)

PAGES = 65536  # 256 MiB guest


@pytest.mark.parametrize("transport", ["unix", "tcp"])
async def test_handshake_and_acks_in_order(make_host, transport):
    host = await make_host(window=4, max_ranges=64)
    guest = await RawGuest.connect(host.unix if transport == "unix" else host.tcp)
    welcome = await guest.hello("g1", PAGES, features=["ranges52", "no-such-feature"])
    assert welcome[0] == WELCOME
    body = welcome[1]
    assert body["version"] == 1 and body["window"] == 4 and body["max_ranges"] == 64
    assert body["features"] == ["ranges52"]  # unknown names ignored, as in virtio
    for i in range(10):
        ack = await guest.report([(i * 1024, 512)])
        assert ack == [ACK, i, 0]
    # Pipelined up to the window: acks come back with the right seqs, in order.
    seqs = [await guest.batch(REPORT, [(20000 + i * 600, 512)]) for i in range(4)]
    acks = [await guest.recv() for _ in seqs]
    assert acks == [[ACK, s, 0] for s in seqs]
    await guest.close()


async def test_exact_reported_bytes_in_metrics(make_host):
    host = await make_host()
    guest = await RawGuest.connect(host.unix)
    await guest.hello("alpha", PAGES)
    await guest.report([(0, 512), (1024, 4096), (9000, 1)])  # 4096 is escaped on the wire
    await guest.report([(0, 512)])  # a repeat is idempotent, not rejected
    await guest.batch(REUSE, [(0, 100)])
    assert await guest.recv() == [ACK, 2, 0]
    text = await scrape(host.url)
    assert sample(text, "balloon_reported_bytes", guest="alpha") == (412 + 4096 + 1) * 4096
    assert sample(text, "balloon_batches_total", guest="alpha", kind="report") == 2
    assert sample(text, "balloon_batches_total", guest="alpha", kind="reuse") == 1
    assert sample(text, "balloon_pages_total", guest="alpha", kind="report") == 512 + 4096 + 1 + 512
    assert sample(text, "balloon_ranges_total", guest="alpha", kind="report") == 4
    assert sample(text, "balloon_guest_memory_bytes", guest="alpha") == PAGES * 4096
    assert sample(text, "balloon_guests_connected") == 1
    assert sample(text, "balloon_received_bytes_total", guest="alpha") > 100
    await guest.close()


async def test_rejected_pages_by_reason(make_host):
    host = await make_host()
    guest = await RawGuest.connect(host.tcp)
    await guest.hello("beta", 1000)
    # out of RAM (pfn past the end, and a range running off the end), an overlap, a good one
    ack = await guest.report([(5000, 10), (990, 20), (100, 50), (120, 10), (0, 4)])
    assert ack[2] == 10 + 20 + 10
    # a PFN >= 2**52 cannot even be encoded; count 2**63 escaped is out of range
    ack = await guest.report([(2, 1 << 40)])
    assert ack[2] == 1 << 40
    # reporting a page that is in the balloon conflicts
    await guest.batch(INFLATE, [(500, 100)])
    assert await guest.recv() == [ACK, 2, 0]
    ack = await guest.report([(550, 10)])
    assert ack[2] == 10
    text = await scrape(host.url)
    assert sample(text, "balloon_rejected_pages_total", guest="beta", reason="out-of-range") == 30 + (1 << 40)
    assert sample(text, "balloon_rejected_pages_total", guest="beta", reason="overlap") == 10
    assert sample(text, "balloon_rejected_pages_total", guest="beta", reason="conflict") == 10
    assert sample(text, "balloon_reported_bytes", guest="beta") == (50 + 4) * 4096
    assert sample(text, "balloon_inflated_bytes", guest="beta") == 100 * 4096
    await guest.batch(DEFLATE, [(500, 100)])
    assert await guest.recv() == [ACK, 4, 0]
    assert sample(await scrape(host.url), "balloon_inflated_bytes", guest="beta") == 0
    await guest.close()


async def test_ping_pong_and_bye(make_host):
    host = await make_host()
    guest = await RawGuest.connect(host.unix)
    await guest.hello("gamma", PAGES)
    await guest.send([PING, 77])
    assert await guest.recv() == [PONG, 77]
    await guest.send([BYE, "done"])
    assert await guest.closed() == []
    await eventually(lambda: host.stats.sessions["bye"] == 1)
    record = host.registry.get("gamma")
    assert record is not None and not record.connected  # retained after disconnect


async def test_idle_guest_is_pinged_then_closed(make_host):
    host = await make_host(idle_timeout=0.3)
    guest = await RawGuest.connect(host.unix)
    await guest.hello("quiet", PAGES)
    assert await guest.recv(2) == [PING, 1]
    seen = await guest.closed(2)  # never answers: idle-timeout
    assert seen[-1][:2] == [ERROR, "idle-timeout"]
    await eventually(lambda: host.stats.protocol_errors["idle-timeout"] == 1)


async def test_pong_keeps_an_idle_guest(make_host):
    host = await make_host(idle_timeout=0.9)
    guest = await RawGuest.connect(host.unix)
    await guest.hello("chatty", PAGES)
    for _ in range(4):  # four pings answered over > 0.9 s: still connected
        ping = await guest.recv(2)
        assert ping[0] == PING
        await guest.send([PONG, ping[1]])
    assert host.registry.get("chatty").connected
    await guest.close()


async def test_target_via_post_reaches_the_guest(make_host, tmp_path):
    token = tmp_path / "admin.token"
    token.write_text("s3cret-admin-token\n")
    host = await make_host(admin_token_file=token)
    guest = await RawGuest.connect(host.unix)
    await guest.hello("delta", PAGES)
    url = f"{host.url}/api/v1/guests/delta/target"
    async with aiohttp.ClientSession() as http:
        async with http.post(url, json={"size": "64MiB"}) as response:
            assert response.status == 401
        async with http.post(url, json={"size": "64MiB"},
                             headers={"Authorization": "Bearer wrong-token-xx"}) as response:
            assert response.status == 403
        headers = {"Authorization": "Bearer s3cret-admin-token"}
        async with http.post(url, json={"size": "64MiB"}, headers=headers) as response:
            assert response.status == 202
            assert await response.json() == {"target_pages": 16384}
        assert await guest.recv() == [TARGET, 16384]
        async with http.post(url, json={"bytes": PAGES * 4096 + 4096}, headers=headers) as response:
            assert response.status == 400
        async with http.post(f"{host.url}/api/v1/guests/nobody/target", json={"bytes": 0},
                             headers=headers) as response:
            assert response.status == 404
        async with http.get(f"{host.url}/api/v1/guests/delta") as response:
            body = await response.json()
    assert body["target_pages"] == 16384 and body["target_bytes"] == 64 << 20
    text = await scrape(host.url)
    assert sample(text, "balloon_target_bytes", guest="delta") == 64 << 20
    await guest.close()


async def test_admin_api_guest_shape(make_host):
    host = await make_host(window=8)
    guest = await RawGuest.connect(host.tcp)
    await guest.hello("eps", PAGES)
    await guest.report([(0, 1000)])
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{host.url}/api/v1/guests") as response:
            listing = await response.json()
        async with http.get(f"{host.url}/api/v1/guests/missing") as response:
            assert response.status == 404
            assert "error" in await response.json()
        for path in ("/healthz", "/readyz"):
            async with http.get(host.url + path) as response:
                assert response.status == 200
    (item,) = listing["guests"]
    expected = {"id", "connected", "since", "address", "pages", "page_size", "memory_bytes",
                "reported_pages", "reported_bytes", "inflated_pages", "inflated_bytes", "target_pages",
                "target_bytes", "hinted_pages", "reclaimed_bytes", "resident_bytes", "batches",
                "pages_total", "rejected_pages", "window", "last_message_at", "errors", "apply_seconds_p99",
                "apply_seconds_p99_recent",
                "stats", "provisioned", "actual_bytes", "target_actual_bytes", "target_state",
                "target_shortfall_bytes", "available_bytes", "usable_bytes", "unused_bytes", "stats_age_seconds",
                "driver", "vmm", "discard_inhibited_bytes"}
    assert set(item) == expected  # docs/API.md's GUEST table, no more, no less
    assert item["actual_bytes"] == item["memory_bytes"] and item["target_state"] is None
    assert item["stats_age_seconds"] is None and item["unused_bytes"] is None  # no STATS yet
    assert item["id"] == "eps" and item["connected"] is True
    assert item["reported_pages"] == 1000 and item["reported_bytes"] == 1000 * 4096
    assert item["batches"]["report"] == 1 and item["window"] == {"size": 8, "in_use": 0}
    assert item["address"].startswith("tcp:127.0.0.1:")
    assert item["reclaimed_bytes"] is None and item["apply_seconds_p99"] > 0
    assert item["apply_seconds_p99_recent"] == item["apply_seconds_p99"]  # every batch was in the last minutes
    assert item["stats"] == {}
    await guest.close()


async def test_admin_api_shows_the_guests_last_stats(make_host):
    """STATS tags, known (4 = MEMFREE) or not (99), reach the admin API as the guest sent them."""
    from hostkit import STATS

    host = await make_host()
    guest = await RawGuest.connect(host.tcp)
    await guest.hello("zeta", PAGES, features=("stats",))
    await guest.send([STATS, [[4, 123 * 4096], [99, 7]]])
    await guest.report([(0, 8)])  # acked after the STATS before it was handled

    async with aiohttp.ClientSession() as http:
        async with http.get(f"{host.url}/api/v1/guests/zeta") as response:
            item = await response.json()
    assert item["stats"] == {"4": 123 * 4096, "99": 7}
    await guest.close()


async def test_hint_command_via_post(make_host):
    from hostkit import HINT, HINT_START

    host = await make_host()
    guest = await RawGuest.connect(host.unix)
    await guest.hello("mig", PAGES, features=["hinting"])
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{host.url}/api/v1/guests/mig/hint", headers=host.admin_headers) as response:
            assert response.status == 202
            cmd_id = (await response.json())["cmd_id"]
    assert await guest.recv() == [HINT_START, cmd_id]
    await guest.batch(HINT, [(0, 512)], cmd_id=cmd_id)
    assert await guest.recv() == [ACK, 0, 0]
    await guest.batch(HINT, [(1024, 512)], cmd_id=cmd_id + 7)  # stale: ignored, counted
    assert await guest.recv() == [ACK, 1, 512]
    text = await scrape(host.url)
    assert sample(text, "balloon_hinted_bytes", guest="mig") == 512 * 4096
    await guest.close()
    plain = await RawGuest.connect(host.unix)
    await plain.hello("nohint", PAGES)
    async with aiohttp.ClientSession() as http, http.post(f"{host.url}/api/v1/guests/nohint/hint",
                                                          headers=host.admin_headers) as response:
        assert response.status == 409
    await plain.close()


async def test_session_start_and_end_are_logged(make_host, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="balloon.host.session")
    host = await make_host()
    guest = await RawGuest.connect(host.unix)
    await guest.hello("logged", PAGES)
    await guest.send([BYE, "bye now"])
    await guest.closed()
    await eventually(lambda: any(r.getMessage() == "session end" for r in caplog.records))
    start = next(r for r in caplog.records if r.getMessage() == "session start")
    end = next(r for r in caplog.records if r.getMessage() == "session end")
    assert start.guest == "logged" and start.address.startswith("unix:")
    assert end.guest == "logged" and end.reason == "bye: bye now" and end.duration_s >= 0
    assert end.address == start.address


async def test_slow_host_keeps_batches_in_flight(make_host):
    """--debug-apply-delay plays a slow host: the guest's window fills, the host's in-flight
    gauge shows it, and every batch is still acked in order."""
    host = await make_host(window=4, debug_apply_delay=0.05)
    guest = await RawGuest.connect(host.unix)
    await guest.hello("slowpoke", PAGES)
    seqs = [await guest.batch(REPORT, [(i * 512, 512)]) for i in range(4)]
    await eventually(lambda: host.registry.get("slowpoke").connection.window_state()[1] >= 2)
    text = await scrape(host.url)
    assert sample(text, "balloon_inflight_batches", guest="slowpoke") >= 2
    acks = [await guest.recv() for _ in seqs]
    assert acks == [[ACK, s, 0] for s in seqs]
    await guest.close()


async def test_idle_timer_starts_at_welcome_not_at_the_handshake_deadline(make_host):
    """A guest that says HELLO late in its handshake window is still pinged on the idle clock."""
    import asyncio

    host = await make_host(idle_timeout=0.3, handshake_timeout=30)
    guest = await RawGuest.connect(host.unix)
    await asyncio.sleep(0.05)  # the session's timers are already running before HELLO
    await guest.hello("late", PAGES)
    assert (await guest.recv(2))[0] == PING
    await guest.close()
