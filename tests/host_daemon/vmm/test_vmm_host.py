"""A host whose inventory names each VM's QEMU monitor (``qmp``): layout, interlocks, stock guests.

QEMU is tests/host_daemon/vmm/fakeqemu.py on a real Unix socket; the guest is the
documented wire format (hostkit.RawGuest); the RAM file is a sparse file in /dev/shm,
read back with ``pread`` and ``SEEK_DATA`` (never mmap: a read fault would fill holes).
"""

from __future__ import annotations

import os
from pathlib import Path

import aiohttp
import pytest
from hostkit import ACK, ERROR, INFLATE, REPORT, WELCOME, RawGuest, eventually

from .fakeqemu import GIB, FakeQemu

PAGE = 4096
MARK = b"\xab" * PAGE


@pytest.fixture
def shm(tmp_path_factory):
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm tmpfs")
    folder = Path(os.path.realpath("/dev/shm")) / f"bvmm-{os.getpid()}-{tmp_path_factory.getbasetemp().name}"
    folder.mkdir()
    yield folder
    for entry in folder.iterdir():
        entry.unlink()
    folder.rmdir()


def ram_file(folder: Path, size: int) -> Path:
    path = folder / "vm1.ram"
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def poke(path: Path, offset: int) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, MARK, offset)
    finally:
        os.close(fd)


def holds_data(path: Path, offset: int) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, PAGE, offset) == MARK
    finally:
        os.close(fd)


def inventory(folder: Path, tmp_path: Path, memory: str, **keys) -> Path:
    lines = [f'[guest.vm1]\nmemory = "{memory}"\nlisten = "unix:{tmp_path}/vm1.sock"\n']
    lines += [f'{key} = "{value}"\n' for key, value in keys.items()]
    path = tmp_path / "guests.toml"
    path.write_text("".join(lines))
    return path


async def connected(host) -> None:
    await eventually(lambda: host.registry.get("vm1").vmm.state == "connected", timeout=10)


async def test_an_8gib_pc_vm_is_served_through_its_layout_and_ranges_in_the_hole_are_not_ram(
        make_host, shm, tmp_path):
    ram = ram_file(shm, 8 * GIB)
    qemu = await FakeQemu(tmp_path / "vm1.qmp", memory=8 * GIB, below_4g=3 * GIB, mem_path=str(ram)).start()
    try:
        host = await make_host(vm_ram_dirs=(shm,), guests=inventory(shm, tmp_path, "8GiB", ram_file=ram, qmp=f"unix:{qemu.path}"))
        await connected(host)
        poke(ram, 3 * GIB)  # GPA 4 GiB: the first page above the hole, stored at 3 GiB in the file
        poke(ram, 4 * GIB)  # GPA 5 GiB
        vm = await RawGuest.connect(f"{tmp_path}/vm1.sock")
        welcome = await vm.hello("vm1", (9 * GIB) // PAGE)  # what /proc/iomem shows: RAM ends at 9 GiB
        assert welcome[0] == WELCOME and welcome[1]["pages"] == (9 * GIB) // PAGE
        seq = await vm.batch(REPORT, [((4 * GIB) // PAGE, 1), ((3 * GIB + GIB // 2) // PAGE, 2)])
        assert await vm.recv() == [ACK, seq, 2]  # the two pages in the PCI hole are not RAM
        assert not holds_data(ram, 3 * GIB) and holds_data(ram, 4 * GIB)
        record = host.registry.get("vm1")
        assert record.rejected["not-ram"] == 2 and record.tracker.reported_pages == 1
        await vm.close()
    finally:
        await qemu.stop()


async def test_discards_wait_for_a_migration_and_only_the_balloon_is_punched_after_it(make_host, shm, tmp_path):
    ram = ram_file(shm, 8 * GIB)
    qemu = await FakeQemu(tmp_path / "vm1.qmp", mem_path=str(ram)).start()
    try:
        host = await make_host(vm_ram_dirs=(shm,), guests=inventory(shm, tmp_path, "8GiB", ram_file=ram, qmp=f"unix:{qemu.path}"))
        await connected(host)
        record = host.registry.get("vm1")
        vm = await RawGuest.connect(f"{tmp_path}/vm1.sock")
        assert (await vm.hello("vm1", (9 * GIB) // PAGE))[0] == WELCOME
        qemu.migration = "active"
        qemu.event("MIGRATION", {"status": "active"})
        await eventually(lambda: record.discard_block() == "migration", timeout=5)
        reported, inflated = 5 * GIB, 5 * GIB + PAGE  # GPAs 6 GiB and 6 GiB + 4 KiB
        poke(ram, reported)
        poke(ram, inflated)
        seq = await vm.batch(REPORT, [((6 * GIB) // PAGE, 1)])
        assert await vm.recv() == [ACK, seq, 0]  # acked: the guest must never hang
        seq = await vm.batch(INFLATE, [((6 * GIB) // PAGE + 1, 1)])
        assert await vm.recv() == [ACK, seq, 0]
        assert holds_data(ram, reported) and holds_data(ram, inflated)
        assert record.inhibited == {"migration": 2 * PAGE}
        qemu.migration = "completed"
        qemu.event("MIGRATION", {"status": "completed"})
        await eventually(lambda: not holds_data(ram, inflated), timeout=5)  # the balloon: punched now
        assert holds_data(ram, reported)  # a reported page may be in reuse: never punched late
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{host.url}/metrics") as response:
                text = await response.text()
        assert 'balloon_discard_inhibited_bytes_total{guest="vm1",reason="migration"} 8192.0' in text
        assert 'balloon_vmm_up{guest="vm1"} 1.0' in text
        await vm.close()
    finally:
        await qemu.stop()


async def test_a_big_vm_whose_vmm_has_not_answered_is_told_to_retry(make_host, shm, tmp_path):
    ram = ram_file(shm, 4 * GIB)
    host = await make_host(vm_ram_dirs=(shm,), guests=inventory(shm, tmp_path, "4GiB", ram_file=ram, qmp=f"unix:{tmp_path}/none.qmp"))
    vm = await RawGuest.connect(f"{tmp_path}/vm1.sock")
    reply = await vm.hello("vm1", (5 * GIB) // PAGE)
    assert reply[:2] == [ERROR, "not-ready"]
    assert host.registry.get("vm1").to_json()["vmm"]["state"] in ("connecting", "unreachable")


async def test_a_stock_guest_is_sized_through_qemus_balloon(make_host, shm, tmp_path):
    ram = ram_file(shm, GIB)
    qemu = FakeQemu(tmp_path / "vm1.qmp", memory=GIB, below_4g=3 * GIB, mem_path=str(ram))
    qemu.stats = {"stat-free-memory": 600 << 20, "stat-available-memory": 700 << 20,
                  "stat-total-memory": 980 << 20}
    await qemu.start()
    try:
        host = await make_host(vm_ram_dirs=(shm,), guests=inventory(shm, tmp_path, "1GiB", ram_file=ram, qmp=f"unix:{qemu.path}"))
        await connected(host)
        url = f"{host.url}/api/v1/guests/vm1"
        async with aiohttp.ClientSession() as http:
            async with http.get(url) as response:
                guest = await response.json()
            assert guest["driver"] == "virtio-balloon" and guest["inflated_bytes"] == 0
            assert guest["usable_bytes"] == 700 << 20 and guest["stats_age_seconds"] is not None
            assert guest["reclaimed_bytes"] == GIB  # the RAM file is read while QEMU runs
            async with http.post(f"{url}/target", json={"size": "256MiB"}, headers=host.admin_headers) as response:
                assert response.status == 202, await response.text()
            await eventually(lambda: qemu.balloon_actual == 768 << 20, timeout=5)
            await eventually(lambda: host.registry.get("vm1").balloon_pages == (256 << 20) // PAGE, timeout=5)
            async with http.get(url) as response:
                guest = await response.json()
        assert guest["inflated_bytes"] == 256 << 20 and guest["actual_bytes"] == 768 << 20
        assert guest["target_state"] == "reached"
    finally:
        await qemu.stop()


@pytest.mark.parametrize("keys, message", [
    ({"ram_file": "/dev/shm/x.ram"}, "give qmp"),
    ({"qmp": "tcp:1.2.3.4:5"}, "qmp must be"),
    ({"qmp": "unix:relative.sock"}, "qmp must be"),
])
def test_inventory_entries_that_would_make_the_host_guess_are_refused(keys, message):
    from host_daemon.inventory import InventoryError, parse_entry

    with pytest.raises(InventoryError, match=message):
        parse_entry("vm1", {"memory": "4GiB", **keys})


def test_a_ram_map_must_hold_exactly_the_memory():
    from host_daemon.inventory import InventoryError, parse_entry

    regions = [{"gpa": 0, "size": 3 * GIB, "offset": 0}, {"gpa": 4 * GIB, "size": GIB, "offset": 3 * GIB}]
    entry = parse_entry("vm1", {"memory": "4GiB", "ram_file": "/dev/shm/x.ram", "ram_map": regions})
    assert entry.ram_map.span_pages == (5 * GIB) // PAGE
    assert entry.to_json()["ram_map"] == regions
    with pytest.raises(InventoryError, match="ram_map holds"):
        parse_entry("vm1", {"memory": "5GiB", "ram_map": regions})
