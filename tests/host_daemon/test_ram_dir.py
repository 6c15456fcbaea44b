"""--ram-dir through the daemon: the RAM file is created at HELLO, reported ranges are punched out
before the ACK, the kernel's numbers reach /metrics, and a forgotten guest's file is removed."""

from __future__ import annotations

import os

import pytest
from hostkit import ACK, INFLATE, WELCOME, RawGuest, eventually, sample, scrape

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
