"""Who may be which guest: tokens, one live session per id, the guest cap, retention."""

from __future__ import annotations

import asyncio

from hostkit import ERROR, WELCOME, RawGuest, eventually, sample, scrape

PAGES = 4096


async def test_token_auth_accepts_the_right_token_and_refuses_a_wrong_one(make_host, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("# guest tokens\ng1 correct-horse-battery\nlocal1 local-secret-123\n")
    host = await make_host(token_file=tokens, allow_open_tcp=False)
    good = await RawGuest.connect(host.tcp)
    assert (await good.hello("g1", PAGES, token="correct-horse-battery"))[0] == WELCOME
    await good.report([(0, 8)])
    for guest, token in (("local1", "wrong-secret-123"), ("local1", None), ("g2", "anything-at-all")):
        bad = await RawGuest.connect(host.tcp)
        reply = await bad.hello(guest, PAGES, token=token)
        assert reply[:2] == [ERROR, "auth-failed"], (guest, token, reply)
        assert await bad.closed() == []
    # Unix: listed guests must prove their id; unlisted ones are admitted (socket mode is the gate).
    bad = await RawGuest.connect(host.unix)
    assert (await bad.hello("local1", PAGES, token="wrong-secret-123"))[:2] == [ERROR, "auth-failed"]
    ok = await RawGuest.connect(host.unix)
    assert (await ok.hello("local1", PAGES, token="local-secret-123"))[0] == WELCOME
    unlisted = await RawGuest.connect(host.unix)
    assert (await unlisted.hello("other", PAGES))[0] == WELCOME
    await eventually(lambda: host.stats.protocol_errors["auth-failed"] == 4)
    assert host.registry.get("g2") is None  # a refused id mints no record and no metric label
    assert sample(await scrape(host.url), "balloon_reported_bytes", guest="g2") is None
    for guest in (good, ok, unlisted):
        await guest.close()


async def test_a_live_guest_id_cannot_be_taken(make_host):
    host = await make_host()
    first = await RawGuest.connect(host.unix)
    await first.hello("taken", PAGES)
    await first.report([(0, 16)])
    thief = await RawGuest.connect(host.tcp)
    reply = await thief.hello("taken", PAGES)
    assert reply[:2] == [ERROR, "guest-busy"]
    assert await thief.closed() == []
    assert (await first.report([(100, 16)]))[2] == 0  # the owner is undisturbed
    assert host.registry.get("taken").tracker.reported_pages == 32
    await first.close()
    await eventually(lambda: not host.registry.get("taken").connected)
    again = await RawGuest.connect(host.tcp)  # once it is gone, the id is free again
    assert (await again.hello("taken", PAGES))[0] == WELCOME
    assert host.registry.get("taken").tracker.reported_pages == 0  # new session, empty tracker
    await again.close()


async def test_guest_cap(make_host):
    host = await make_host(max_guests=2)
    guests = []
    for name in ("a1", "a2"):
        guest = await RawGuest.connect(host.unix)
        assert (await guest.hello(name, PAGES))[0] == WELCOME
        guests.append(guest)
    extra = await RawGuest.connect(host.unix)
    assert (await extra.hello("a3", PAGES))[:2] == [ERROR, "too-many-guests"]
    await guests[0].close()  # a known id may always come back, even at the cap
    await eventually(lambda: not host.registry.get("a1").connected)
    back = await RawGuest.connect(host.unix)
    assert (await back.hello("a1", PAGES))[0] == WELCOME
    for guest in (back, guests[1]):
        await guest.close()


async def test_retention_forgets_a_guest_and_its_series(make_host):
    host = await make_host(retention=0.3)
    guest = await RawGuest.connect(host.unix)
    await guest.hello("leaver", PAGES)
    await guest.report([(0, 64)])
    await guest.close()
    await eventually(lambda: host.registry.get("leaver") is not None and not host.registry.get("leaver").connected)
    text = await scrape(host.url)
    assert sample(text, "balloon_reported_bytes", guest="leaver") == 64 * 4096  # retained
    assert sample(text, "balloon_guest_up", guest="leaver") == 0
    applied = sample(text, "balloon_batch_apply_seconds_count")
    assert applied == 1
    await eventually(lambda: host.registry.get("leaver") is None, timeout=3)
    text = await scrape(host.url)
    assert 'guest="leaver"' not in text
    assert sample(text, "balloon_batch_apply_seconds_count") == applied  # host-wide stays monotonic


async def test_reconnect_within_retention_keeps_counters(make_host):
    host = await make_host(retention=30)
    guest = await RawGuest.connect(host.unix)
    await guest.hello("back", PAGES)
    await guest.report([(0, 64)])
    await guest.close()
    await eventually(lambda: not host.registry.get("back").connected)
    guest = await RawGuest.connect(host.tcp)
    await guest.hello("back", PAGES)
    await guest.report([(0, 32)])
    text = await scrape(host.url)
    assert sample(text, "balloon_batches_total", guest="back", kind="report") == 2  # monotonic
    assert sample(text, "balloon_reported_bytes", guest="back") == 32 * 4096  # rebuilt view
    await guest.close()


async def test_two_hundred_concurrent_guests(make_host):
    host = await make_host(window=4)

    async def one(i: int) -> list:
        guest = await RawGuest.connect(host.unix if i % 2 else host.tcp)
        welcome = await guest.hello(f"vm{i:03d}", PAGES)
        assert welcome[0] == WELCOME
        acks = []
        for k in range(5):
            # i % 7 pages out of range in the last batch, so every guest has its own answer
            ranges = [(k * 64, 32)] + ([(PAGES, i % 7)] if k == 4 and i % 7 else [])
            acks.append(await guest.report(ranges))
        await guest.close()
        return acks

    results = await asyncio.gather(*(one(i) for i in range(200)))
    for i, acks in enumerate(results):
        assert [a[1] for a in acks] == list(range(5))
        assert [a[2] for a in acks] == [0, 0, 0, 0, i % 7]
    await eventually(lambda: host.registry.connected == 0)
    assert len(host.registry) == 200
    assert all(r.tracker.reported_pages == 160 for r in host.registry.guests.values())
