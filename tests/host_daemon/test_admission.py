"""Admission through a real host: the inventory's id, size and RAM file, and bounded open mode."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import pytest
from hostkit import BYE, ERROR, WELCOME, RawGuest, eventually

from shared.runtime.addresses import Address

PAGES = 4096  # 16 MiB provisioned


@pytest.fixture
def shm_dir(tmp_path):
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else str(tmp_path)
    path = os.path.join(base, f"balloon-admission-{os.getpid()}-{id(tmp_path)}")
    os.mkdir(path)
    yield path
    for name in os.listdir(path):
        os.unlink(os.path.join(path, name))
    os.rmdir(path)


def _vm_file(path: str, pages: int = PAGES) -> None:
    """What QEMU's memory-backend-file does: the VMM creates and sizes the file, and fills it."""
    with open(path, "wb") as handle:
        handle.truncate(pages * 4096)
        for page in range(0, pages, 64):
            handle.seek(page * 4096)
            handle.write(page.to_bytes(8, "little") * 512)


def _fingerprint(path: str) -> tuple[int, int, str]:
    info = os.stat(path)
    with open(path, "rb") as handle:
        digest = hashlib.sha256(handle.read()).hexdigest()
    return info.st_size, info.st_blocks, digest


def _inventory(tmp_path, shm_dir, **extra) -> tuple[str, str, str]:
    sock = str(tmp_path / "vm1.sock")
    ram = os.path.join(shm_dir, "vm1.ram")
    lines = ["[guest.vm1]", f'memory = "{PAGES * 4}KiB"', f'listen = "unix:{sock}"', f'ram_file = "{ram}"']
    lines += [f"{key} = {value!r}".replace("'", '"') for key, value in extra.items()]
    path = tmp_path / "guests.toml"
    path.write_text("\n".join(lines) + "\n")
    return str(path), sock, ram


async def test_a_provisioned_guest_is_its_listener_and_its_file(make_host, tmp_path, shm_dir):
    """Issue 9 'done when': listen + ram_file work end to end; a second process elsewhere changes nothing."""
    inventory, sock, ram = _inventory(tmp_path, shm_dir)
    _vm_file(ram)
    host = await make_host(guests=Path(inventory), ram_dir=Path(shm_dir))
    record = host.registry.get("vm1")
    assert record is not None and not record.connected  # provisioned: known before it connects
    guest = await RawGuest.connect(sock)
    # a real guest under-counts its RAM: fewer pages are admitted, the host's number counts
    welcome = await guest.hello("vm1", PAGES - 34, features=["ranges52", "shared-ram"])
    assert welcome[0] == WELCOME, welcome
    assert welcome[1]["pages"] == PAGES and welcome[1]["ram_file"] == ram
    assert "shared-ram" in welcome[1]["features"]
    before = os.stat(ram).st_blocks
    ack = await guest.report([(64, 64), (PAGES - 10, 10)])  # ranges checked against the host's size
    assert ack[2] == 0
    assert os.stat(ram).st_blocks < before and os.path.getsize(ram) == PAGES * 4096
    await guest.send([BYE, "done"])
    assert await guest.closed() == []
    await eventually(lambda: not host.registry.get("vm1").connected)
    fingerprint = _fingerprint(ram)
    # while vm1 is disconnected, another process tries every route under its id
    for address in (host.unix, host.tcp):
        for pages, token in ((1, None), (PAGES, None), (PAGES, "guess-guess")):
            thief = await RawGuest.connect(address)
            reply = await thief.hello("vm1", pages, features=["ranges52", "shared-ram"], token=token)
            assert reply[:2] == [ERROR, "auth-failed"], (address, pages, reply)
            assert await thief.closed() == []
    assert _fingerprint(ram) == fingerprint
    assert host.registry.get("vm1").provisioned is not None and host.registry.get("vm1").sessions == 1
    await guest.close()


async def test_a_provisioned_file_is_punched_even_if_the_guest_does_not_map_it(make_host, tmp_path, shm_dir):
    """A VM's agent does not map the file (the VM's RAM is the file): the host punches it all the same."""
    inventory, sock, ram = _inventory(tmp_path, shm_dir)
    _vm_file(ram)
    host = await make_host(guests=Path(inventory), vm_ram_dirs=(Path(shm_dir),))  # no --ram-dir at all
    guest = await RawGuest.connect(sock)
    welcome = await guest.hello("vm1", PAGES, features=["ranges52"])
    assert "ram_file" not in welcome[1] and "shared-ram" not in welcome[1]["features"]
    before = os.stat(ram).st_blocks
    await guest.report([(0, 128)])
    assert os.stat(ram).st_blocks < before
    await guest.close()
    await eventually(lambda: not host.registry.get("vm1").connected)


async def test_more_pages_than_provisioned_is_bad_size(make_host, tmp_path, shm_dir):
    inventory, sock, ram = _inventory(tmp_path, shm_dir)
    _vm_file(ram)
    fingerprint = _fingerprint(ram)
    host = await make_host(guests=Path(inventory), ram_dir=Path(shm_dir))
    guest = await RawGuest.connect(sock)
    reply = await guest.hello("vm1", PAGES + 1, features=["shared-ram"])
    assert reply[:2] == [ERROR, "bad-size"] and str(PAGES) in reply[2]
    assert await guest.closed() == []
    assert _fingerprint(ram) == fingerprint
    await eventually(lambda: host.stats.sessions.get("rejected") == 1)


async def test_a_missing_ram_file_refuses_the_session_and_creates_nothing(make_host, tmp_path, shm_dir):
    inventory, sock, ram = _inventory(tmp_path, shm_dir)
    host = await make_host(guests=Path(inventory), ram_dir=Path(shm_dir))
    guest = await RawGuest.connect(sock)
    reply = await guest.hello("vm1", PAGES, features=["shared-ram"])
    assert reply[:2] == [ERROR, "internal"]
    assert not os.path.exists(ram)
    again = await RawGuest.connect(sock)  # the refused session did not keep the id busy
    _vm_file(ram)
    assert (await again.hello("vm1", PAGES))[0] == WELCOME
    await again.close()
    await eventually(lambda: not host.registry.get("vm1").connected)


async def test_token_and_uid_prove_a_provisioned_guest_on_shared_listeners(make_host, tmp_path):
    path = tmp_path / "guests.toml"
    path.write_text(f'[guest.tok]\nmemory = "16MiB"\ntoken = "correct-horse"\n'
                    f'[guest.me]\nmemory = "16MiB"\nuid = {os.getuid()}\n')
    host = await make_host(guests=path)
    by_token = await RawGuest.connect(host.tcp)
    assert (await by_token.hello("tok", PAGES, token="correct-horse"))[0] == WELCOME
    by_uid = await RawGuest.connect(host.unix)
    assert (await by_uid.hello("me", PAGES))[0] == WELCOME
    # my uid is guest "me": it cannot open other ids on a shared Unix listener
    other = await RawGuest.connect(host.unix)
    assert (await other.hello("someone-else", 16))[:2] == [ERROR, "auth-failed"]
    for guest in (by_token, by_uid):
        await guest.close()


async def test_open_mode_claims_are_capped_and_make_no_giant_file(make_host, shm_dir):
    host = await make_host(ram_dir=Path(shm_dir), max_guest_memory=64 << 20)
    for pages in (2**40, 2**52, (64 << 20) // 4096 + 1):
        guest = await RawGuest.connect(host.unix)
        reply = await guest.hello("huge", pages, features=["shared-ram"])
        assert reply[:2] == [ERROR, "bad-size"], reply
        assert await guest.closed() == []
    assert os.listdir(shm_dir) == []
    ok = await RawGuest.connect(host.unix)
    welcome = await ok.hello("huge", (64 << 20) // 4096, features=["shared-ram"])
    assert welcome[0] == WELCOME and welcome[1]["pages"] == 16384
    assert os.path.getsize(os.path.join(shm_dir, "huge.ram")) == 64 << 20
    await ok.close()


async def test_open_tcp_needs_a_token_or_the_explicit_flag(make_host):
    host = await make_host(allow_open_tcp=False)
    guest = await RawGuest.connect(host.tcp)
    reply = await guest.hello("anyone", 16)
    assert reply[:2] == [ERROR, "auth-failed"] and "--allow-open-tcp" in reply[2]
    unix = await RawGuest.connect(host.unix)
    assert (await unix.hello("anyone", 16))[0] == WELCOME
    await unix.close()


async def test_open_ids_cannot_lock_out_provisioned_guests(make_host, tmp_path):
    """Issue 9 item 7: throwaway ids fill only the open cap, and leave quickly."""
    path = tmp_path / "guests.toml"
    path.write_text('[guest.prod]\nmemory = "16MiB"\ntoken = "prod-secret"\n')
    host = await make_host(guests=path, max_guests=3, retention=30, forget_after=0.2)
    throwaway = []
    for i in range(3):
        guest = await RawGuest.connect(host.unix)
        assert (await guest.hello(f"junk{i}", 16))[0] == WELCOME
        throwaway.append(guest)
    extra = await RawGuest.connect(host.unix)
    assert (await extra.hello("junk9", 16))[:2] == [ERROR, "too-many-guests"]
    prod = await RawGuest.connect(host.tcp)
    assert (await prod.hello("prod", PAGES, token="prod-secret"))[0] == WELCOME  # never counted
    for guest in throwaway:  # no batch applied: forgotten after --forget-after, not --retention
        await guest.close()
    await eventually(lambda: host.registry.open_guests == 0, timeout=5)
    again = await RawGuest.connect(host.unix)
    assert (await again.hello("junk9", 16))[0] == WELCOME
    await again.report([(0, 1)])
    await again.send([BYE, "load test over"])  # BYE: forgotten soon even after batches
    await eventually(lambda: host.registry.get("junk9") is None, timeout=5)
    await prod.close()


async def test_an_open_guest_that_just_dropped_is_kept_for_the_retention(make_host):
    host = await make_host(retention=30, forget_after=0.05)
    guest = await RawGuest.connect(host.unix)
    await guest.hello("dropper", 64)
    await guest.report([(0, 8)])
    await guest.close()
    await eventually(lambda: not host.registry.get("dropper").connected)
    await asyncio.sleep(0.2)  # well past --forget-after: this guest may come back (host restart, crash)
    assert host.registry.get("dropper") is not None


async def test_guest_listeners_are_refused_on_shared_addresses(make_host, tmp_path):
    from host_daemon.listeners import ListenError

    host = await make_host()
    with pytest.raises(ListenError, match="shared --listen"):
        await host.open_guest_listener(Address("unix", path=host.unix), "x")
