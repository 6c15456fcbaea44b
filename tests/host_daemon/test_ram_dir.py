"""--ram-dir through the daemon: the RAM file is created at HELLO, reported ranges are punched out
before the ACK, the kernel's numbers reach /metrics, and a forgotten guest's file is removed."""

from __future__ import annotations

import os

import pytest
from hostkit import ACK, ERROR, INFLATE, REPORT, WELCOME, RawGuest, eventually, sample, scrape

from host_daemon.registry import by_kind

PAGES = 8192  # 32 MiB


def _fill(path, pages: int) -> None:
    with open(path, "r+b") as handle:
        handle.write(b"\xa5" * (pages * 4096))
        handle.flush()
        os.fsync(handle.fileno())


@pytest.fixture
def ram_dir(tmp_path):
    shm = "/dev/shm"
    base = shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else str(tmp_path)
    path = os.path.join(base, f"balloon-test-{os.getpid()}-{id(tmp_path)}")
    os.mkdir(path)
    yield path
    for name in os.listdir(path):
        os.unlink(os.path.join(path, name))
    os.rmdir(path)


async def test_ram_file_created_and_reported_ranges_discarded(make_host, ram_dir):
    from pathlib import Path

    host = await make_host(ram_dir=Path(ram_dir), retention=0.5)
    guest = await RawGuest.connect(host.unix)
    welcome = await guest.hello("vm1", PAGES, features=["ranges52", "shared-ram"])
    assert welcome[0] == WELCOME and "shared-ram" in welcome[1]["features"]
    ram_file = welcome[1]["ram_file"]
    assert ram_file == os.path.join(ram_dir, "vm1.ram")
    assert os.path.getsize(ram_file) == PAGES * 4096
    _fill(ram_file, PAGES)  # the guest "touches" all its memory
    before = os.stat(ram_file).st_blocks
    assert before * 512 >= PAGES * 4096
    await guest.report([(0, 2048), (4096, 1024)])  # 12 MiB reported
    after_report = os.stat(ram_file).st_blocks  # the ACK came, so the discard happened
    assert (before - after_report) * 512 == 3072 * 4096
    await guest.batch(INFLATE, [(6144, 1024)])
    assert await guest.recv() == [ACK, 1, 0]
    assert (before - os.stat(ram_file).st_blocks) * 512 == 4096 * 4096
    await guest.report([(7200, 16)])  # small: punched inline, not in the worker thread
    assert (before - os.stat(ram_file).st_blocks) * 512 == 4112 * 4096
    text = await scrape(host.url)
    assert sample(text, "balloon_reclaimed_bytes", guest="vm1") == 4112 * 4096
    assert sample(text, "balloon_resident_bytes", guest="vm1") == (PAGES - 4112) * 4096
    await guest.close()
    await eventually(lambda: not os.path.exists(ram_file), timeout=5)  # forgotten after retention


async def test_without_the_feature_no_file(make_host, ram_dir):
    from pathlib import Path

    host = await make_host(ram_dir=Path(ram_dir))
    guest = await RawGuest.connect(host.unix)
    welcome = await guest.hello("plain", PAGES)
    assert "ram_file" not in welcome[1] and os.listdir(ram_dir) == []
    await guest.report([(0, 16)])
    await guest.close()


async def test_shared_ram_not_offered_without_ram_dir(make_host):
    host = await make_host()
    guest = await RawGuest.connect(host.unix)
    welcome = await guest.hello("noram", PAGES, features=["shared-ram"])
    assert welcome[1]["features"] == [] and "ram_file" not in welcome[1]
    await guest.close()


async def test_ram_file_survives_reconnect_and_orphans_expire(make_host, ram_dir):
    """The RAM file outlives a session (the guest's memory is its own); a file left by a
    previous host for a guest that never returns is removed after the retention."""
    from pathlib import Path

    orphan = Path(ram_dir) / "gone.ram"
    orphan.write_bytes(b"\0" * 4096)
    host = await make_host(ram_dir=Path(ram_dir), retention=0.5)
    guest = await RawGuest.connect(host.unix)
    first = await guest.hello("stay", PAGES, features=["shared-ram"])
    ram_file = first[1]["ram_file"]
    with open(ram_file, "r+b") as handle:
        handle.seek(4096 * 100)
        handle.write(b"canary!!")
    await guest.close()
    await eventually(lambda: not host.registry.get("stay").connected)
    guest = await RawGuest.connect(host.tcp)
    second = await guest.hello("stay", PAGES, features=["shared-ram"])
    assert second[1]["ram_file"] == ram_file
    with open(ram_file, "rb") as handle:
        handle.seek(4096 * 100)
        assert handle.read(8) == b"canary!!"  # same file, data kept
    await eventually(lambda: not orphan.exists(), timeout=5)
    assert os.path.exists(ram_file)  # connected guests keep theirs
    await guest.close()


async def test_file_of_a_guest_that_stopped_sharing_is_removed_when_forgotten(make_host, ram_dir):
    from pathlib import Path

    host = await make_host(ram_dir=Path(ram_dir), retention=0.3)
    guest = await RawGuest.connect(host.unix)
    ram_file = (await guest.hello("switch", PAGES, features=["shared-ram"]))[1]["ram_file"]
    await guest.close()
    await eventually(lambda: not host.registry.get("switch").connected)
    guest = await RawGuest.connect(host.unix)
    assert "ram_file" not in (await guest.hello("switch", PAGES))[1]
    await guest.close()
    assert os.path.exists(ram_file)
    await eventually(lambda: not os.path.exists(ram_file), timeout=5)


async def test_failed_discard_is_an_internal_error_after_acking_what_was_applied(make_host, ram_dir):
    """If the kernel refuses a hole punch, the guest must not believe the pages are gone:
    batches applied before it are acked, then ERROR internal and the session ends."""
    from pathlib import Path

    import msgpack
    from hostkit import ERROR, REPORT, words

    host = await make_host(ram_dir=Path(ram_dir))
    guest = await RawGuest.connect(host.unix)
    await guest.hello("brittle", PAGES, features=["shared-ram"])
    ram = host.registry.get("brittle").ram
    real_discard = ram.discard
    calls = []

    def flaky(pfns, counts):
        calls.append(len(pfns))
        if len(calls) > 1:
            raise OSError(5, "Input/output error")
        return real_discard(pfns, counts)

    ram.discard = flaky
    frames = b"".join(msgpack.packb([REPORT, seq, words([(seq * 64, 16)])], use_bin_type=True) for seq in range(2))
    await guest.send_raw(frames)
    seen = await guest.closed()
    assert seen[0] == [ACK, 0, 0]
    assert seen[-1][:2] == [ERROR, "internal"]
    await eventually(lambda: host.stats.protocol_errors["internal"] == 1)


async def test_report_and_bye_in_one_write_are_punched_and_acked(make_host, ram_dir):
    """Issue 17 item 3: the host applied the REPORT and sent no ACK. Applied means acked."""
    from pathlib import Path

    host = await make_host(ram_dir=Path(ram_dir))
    guest = await RawGuest.connect(host.unix)
    welcome = await guest.hello("vm1", 1024, features=["ranges52", "shared-ram"])
    _fill(welcome[1]["ram_file"], 1024)
    before = os.stat(welcome[1]["ram_file"]).st_blocks
    await guest.send_raw(bytes.fromhex("930300c408011000000000000092 11a36e6f77".replace(" ", "")))
    assert await guest.recv() == [ACK, 0, 0]  # REPORT seq 0 [(1, 1)], then BYE "now"
    assert await guest.recv() is None
    assert (before - os.stat(welcome[1]["ram_file"]).st_blocks) * 512 == 4096
    record = host.registry.get("vm1")
    assert by_kind(record.batches)["report"] == 1 and record.tracker.reported_pages == 1


async def test_a_reconnect_waits_for_the_punch_of_a_batch_cut_off(make_host, ram_dir):
    """A slow punch (--debug-apply-delay runs in the worker pool before it), the connection
    killed under it, a reconnect at once: HELLO is refused guest-busy until the punch has
    landed, so the WELCOME the guest finally gets means the old session's work is over and
    the REPORT's pages, unacked, can go back to its free lists (docs/PROTOCOL.md §7.1)."""
    import asyncio
    import time
    from pathlib import Path

    host = await make_host(ram_dir=Path(ram_dir), debug_apply_delay=1.0)
    guest = await RawGuest.connect(host.unix)
    welcome = await guest.hello("vm1", 1024, features=["ranges52", "shared-ram"])
    ram_file = welcome[1]["ram_file"]
    _fill(ram_file, 1024)
    before = os.stat(ram_file).st_blocks
    await guest.batch(REPORT, [(0, 256)])
    await eventually(lambda: host.registry.get("vm1").connection.session.busy)  # the punch is running
    session = host.registry.get("vm1").connection.session
    guest.writer.transport.abort()  # the guest's agent dies mid-batch
    await eventually(lambda: guest.writer.get_extra_info("socket").fileno() == -1)
    # Reading is paused while the punch runs, so the host learns of it when it next writes:
    # a TARGET (the admin API, a policy tick) hits the closed socket and the session ends.
    host.set_target("vm1", 8)
    await eventually(lambda: session.ended)
    refusals = 0
    deadline = time.monotonic() + 10
    while True:
        again = await RawGuest.connect(host.unix)
        reply = await again.hello("vm1", 1024, features=["ranges52", "shared-ram"])
        if reply[0] == WELCOME:
            break
        assert reply[:2] == [ERROR, "guest-busy"], reply
        if not refusals:  # refused while the punch is still to come
            assert os.stat(ram_file).st_blocks == before
        refusals += 1
        await again.close()
        assert time.monotonic() < deadline, "the guest id was never released"
        await asyncio.sleep(0.02)
    assert refusals > 0
    assert (before - os.stat(ram_file).st_blocks) * 512 == 256 * 4096  # the punch came first
    assert host.stats.sessions["reset"] + host.stats.sessions["closed"] == 1
    await again.close()
