"""The QEMU link against a QMP server on a real Unix socket (tests/host_daemon/vmm/fakeqemu.py)."""

from __future__ import annotations

import asyncio
import time

import pytest

from host_daemon.ramlayout import RamLayout, RamRegion
from host_daemon.vmm import (
    CONNECTED,
    ERROR,
    MIGRATION,
    PINNED,
    SNAPSHOT,
    UNREACHABLE,
    UNREACHABLE_STATE,
    make_link,
)
from shared.vocabulary import STAT_AVAILABLE, STAT_FREE, STAT_SWAP_IN

from .fakeqemu import GIB, FakeQemu


async def until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


@pytest.fixture
async def vm(tmp_path):
    ram = tmp_path / "vm.ram"
    ram.write_bytes(b"")
    qemu = await FakeQemu(tmp_path / "vm.qmp", mem_path=str(ram)).start()
    yield qemu
    await qemu.stop()


@pytest.fixture
async def link_to(vm):
    tasks, links = [], []

    def start(**options):
        changes = []
        options.setdefault("ram_file", vm.mem_path)
        options.setdefault("poll_interval", 0.05)
        link = make_link("vm1", f"unix:{vm.path}", lambda link, what: changes.append(what), **options)
        link.changes = changes
        tasks.append(asyncio.ensure_future(link.run()))
        links.append(link)
        return link

    yield start
    for task in tasks:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_connects_and_learns_the_layout_across_the_pci_hole(vm, link_to):
    link = link_to()
    await until(lambda: link.state == CONNECTED)
    assert link.layout == RamLayout([RamRegion(0, 3 * GIB, 0), RamRegion(4 * GIB, 5 * GIB, 3 * GIB)])
    assert link.layout.span_pages == (9 * GIB) >> 12
    assert link.discard_block() is None
    assert {"capability": "events", "state": True} in vm.capabilities  # else no MIGRATION events
    assert vm.stats_interval == 2


async def test_migration_snapshot_and_vfio_block_discards_until_they_clear(vm, link_to):
    link = link_to()
    await until(lambda: link.state == CONNECTED)
    vm.migration = "active"
    vm.event("MIGRATION", {"status": "active"})
    await until(lambda: link.discard_block() == MIGRATION)
    vm.migration = "completed"
    vm.jobs = [{"id": "snap0", "type": "snapshot-save", "status": "running"}]
    await until(lambda: link.discard_block() == SNAPSHOT)
    vm.jobs = []
    vm.devices["hostdev0"] = "child<vfio-pci>"
    await until(lambda: link.discard_block() == PINNED)
    del vm.devices["hostdev0"]
    await until(lambda: link.discard_block() is None)
    assert link.changes.count("inhibitors") == 4


async def test_a_vanished_qemu_blocks_discards_and_the_link_reconnects(vm, link_to):
    link = link_to()
    await until(lambda: link.state == CONNECTED)
    await vm.stop()
    await until(lambda: link.state == UNREACHABLE_STATE)
    assert link.discard_block() == UNREACHABLE
    await vm.start()
    await until(lambda: link.state == CONNECTED, timeout=10)
    assert link.connects == 2


async def test_a_slow_qemu_counts_as_unreachable(vm, link_to):
    link = link_to(timeout=0.2)
    await until(lambda: link.state == CONNECTED)
    vm.delay = 0.5
    await until(lambda: link.state == UNREACHABLE_STATE)
    assert "took longer than 0.2s" in link.detail
    vm.delay = 0
    await until(lambda: link.state == CONNECTED, timeout=10)


async def test_a_ram_file_that_is_not_the_vms_is_an_error_not_a_punch(vm, link_to, tmp_path):
    other = tmp_path / "other.ram"
    other.write_bytes(b"")
    link = link_to(ram_file=str(other))
    await until(lambda: link.state == ERROR)
    assert "not the inventory's ram_file" in link.detail
    assert link.discard_block() == "vmm-error"


async def test_share_off_is_refused(vm, link_to):
    vm.share = False
    link = link_to()
    await until(lambda: link.state == ERROR)
    assert "share=on" in link.detail


async def test_the_balloon_of_a_stock_guest(vm, link_to):
    link = link_to()
    await until(lambda: link.state == CONNECTED)
    assert link.has_balloon and link.balloon_actual == 8 * GIB
    assert link.stats[STAT_FREE] == 6 * GIB and link.stats[STAT_AVAILABLE] == 7 * GIB
    assert STAT_SWAP_IN not in link.stats  # (uint64)-1: the guest never sent it
    assert link.stats_updated == vm.stats_updated
    await link.set_balloon(2 * GIB)
    assert vm.balloon_actual == 2 * GIB
    await until(lambda: link.balloon_actual == 2 * GIB)


async def test_no_qemu_at_all_is_unreachable_and_keeps_trying(tmp_path):
    link = make_link("vm1", f"unix:{tmp_path}/none.qmp")
    task = asyncio.ensure_future(link.run())
    try:
        await until(lambda: link.failures >= 2, timeout=5)
        assert link.state == UNREACHABLE_STATE and "no QEMU listening" in link.detail
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def test_only_unix_qmp_addresses():
    with pytest.raises(ValueError, match="unix:/path"):
        make_link("vm1", "tcp:127.0.0.1:4444")
