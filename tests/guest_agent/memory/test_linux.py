"""--source linux without a VM: pagemap decoding, stats from fake procfs files, the balloon's
and the reporter's decisions on fake pinned memory, and (as root) the real mmap/mlock/pagemap."""

from __future__ import annotations

import os

import numpy as np
import pytest

from guest_agent.memory import linux
from guest_agent.memory.linux import (
    Chunk,
    LinuxBalloon,
    LinuxPages,
    LinuxReporting,
    LinuxSourceError,
)
from shared.ranges import RangeBuffer, decode_ranges

PRESENT = 1 << 63
MIB = 1 << 20


def entries(pfns) -> np.ndarray:
    return np.array([PRESENT | p for p in pfns], dtype=np.uint64)


def test_pfn_ranges_sorts_huge_pages_out_of_virtual_order():
    # Two 2 MiB THP pages mapped in the opposite order to their PFNs, plus one stray page.
    first, second = list(range(0x40200, 0x40400)), list(range(0x40000, 0x40200))
    pfns, counts = linux.pfn_ranges(entries(first + second + [0x9000]))
    assert pfns.tolist() == [0x9000, 0x40000] and counts.tolist() == [1, 1024]


def test_pfn_ranges_refuses_what_the_agent_does_not_hold():
    with pytest.raises(LinuxSourceError, match="not present"):
        linux.pfn_ranges(np.array([PRESENT | 5, 7], dtype=np.uint64))
    with pytest.raises(LinuxSourceError, match="root"):
        linux.pfn_ranges(entries([5, 0]))  # what a reader without CAP_SYS_ADMIN sees


def write_proc(root, *, free_mib=600, available_mib=700, total_mib=1000, vmstat=None):
    proc = root / "proc"
    proc.mkdir(exist_ok=True)
    (proc / "meminfo").write_text(
        f"MemTotal:       {total_mib * 1024} kB\nMemFree:        {free_mib * 1024} kB\n"
        f"MemAvailable:   {available_mib * 1024} kB\nMlocked:        0 kB\nHugePages_Total:       0\n")
    (proc / "vmstat").write_text("\n".join(f"{k} {v}" for k, v in (vmstat or {}).items()) + "\n")


def test_stats_are_virtio_tags_from_meminfo_and_vmstat(tmp_path):
    write_proc(tmp_path, free_mib=600, available_mib=700, total_mib=1000, vmstat={
        "pswpin": 3, "pswpout": 4, "pgmajfault": 5, "pgfault": 50, "nr_file_pages": 10,
        "htlb_buddy_alloc_success": 1, "htlb_buddy_alloc_fail": 2, "oom_kill": 1,
        "allocstall_normal": 2, "allocstall_movable": 3, "pgscan_kswapd": 7, "pgscan_direct": 8,
        "pgsteal_kswapd": 6, "pgsteal_direct": 5})
    stats = linux.read_stats(tmp_path)
    assert stats == {0: 3 * 4096, 1: 4 * 4096, 2: 5, 3: 50, 4: 600 * MIB, 5: 1000 * MIB, 6: 700 * MIB,
                     7: 10 * 4096, 8: 1, 9: 2, 10: 1, 11: 5, 12: 7, 13: 8, 14: 6, 15: 5}


class FakePages:
    """Pinned memory without pinning: each chunk gets the next PFNs; reads can move them."""

    def __init__(self) -> None:
        self.next_pfn = 0x10000
        self.next_address = 0x7F0000000000
        self.mapped: dict[int, Chunk] = {}
        self.reads = 0
        self.unmapped: list[Chunk] = []
        self.moves: dict[int, int] = {}  # address -> new first PFN on the next read

    def map(self, length: int) -> Chunk:
        chunk = Chunk(self.next_address, length)
        chunk.first = self.next_pfn
        self.next_address += length
        self.next_pfn += length // 4096 + 7  # a gap: chunks never coalesce with each other
        self.mapped[chunk.address] = chunk
        return chunk

    def read(self, chunk: Chunk) -> Chunk:
        self.reads += 1
        first = self.moves.pop(chunk.address, chunk.first)
        chunk.first = first
        chunk.pfns = np.array([first], dtype=np.uint64)
        chunk.counts = np.array([chunk.pages], dtype=np.uint64)
        return chunk

    def unmap(self, chunk: Chunk) -> None:
        del self.mapped[chunk.address]
        self.unmapped.append(chunk)

    @property
    def mapped_pages(self) -> int:
        return sum(c.pages for c in self.mapped.values())

    def timings(self) -> dict:
        return {}


def payload_ranges(op) -> list[tuple[int, int]]:
    out = []
    while op.has_unsent:
        pfns, counts = decode_ranges(op.next_message().payload)
        out += list(zip(pfns.tolist(), counts.tolist(), strict=True))
    return out


@pytest.fixture
def buffer():
    return RangeBuffer(8192, max_ranges=4096)


def test_balloon_inflates_in_chunks_and_frees_only_after_the_deflate_ack(tmp_path, buffer):
    write_proc(tmp_path, available_mib=900)
    pages = FakePages()
    balloon = LinuxBalloon(pages, total_pages=1000 * 256, root=tmp_path, chunk_bytes=16 * MIB)
    balloon.set_target(40 * 256)  # 40 MiB: 16 + 16 + 8
    ops = []
    while (op := balloon.build("ranges52", 4096, buffer)) is not None:
        ops.append(op)
    assert [op.kind for op in ops] == ["inflate"] * 3 and [op.pages for op in ops] == [4096, 4096, 2048]
    assert balloon.pages == 40 * 256
    for op in ops:
        assert payload_ranges(op)  # the PFNs travel
        op.on_ack(op)
    balloon.set_target(20 * 256)
    deflate = balloon.build("ranges52", 4096, buffer)
    assert deflate.kind == "deflate" and deflate.pages == 2048  # the most recent chunk first
    assert pages.unmapped == []  # not before the ACK: the host may still be discarding
    deflate.on_ack(deflate)
    assert [c.pages for c in pages.unmapped] == [2048]
    second = balloon.build("ranges52", 4096, buffer)
    second.on_ack(second)  # 32 -> 16 MiB: below the target by 4 MiB
    refill = balloon.build("ranges52", 4096, buffer)
    assert refill.kind == "inflate" and refill.pages == 4 * 256  # lands on the target
    refill.on_ack(refill)
    assert balloon.build("ranges52", 4096, buffer) is None and balloon.pages == 20 * 256


def test_balloon_stops_at_the_reserve_instead_of_pushing_the_guest_to_oom(tmp_path, buffer):
    pages = FakePages()
    balloon = LinuxBalloon(pages, total_pages=1000 * 256, root=tmp_path, chunk_bytes=16 * MIB)
    write_proc(tmp_path, available_mib=balloon.reserve_bytes // MIB + 6)
    balloon.set_target(500 * 256)
    op = balloon.build("ranges52", 4096, buffer)
    assert op.pages == 4 * 256  # what is left above the reserve, in whole 2 MiB
    write_proc(tmp_path, available_mib=balloon.reserve_bytes // MIB + 1)  # the kernel's view now
    assert balloon.build("ranges52", 4096, buffer) is None and balloon.stuck


def balloon_with_one_chunk(tmp_path, buffer) -> tuple[FakePages, LinuxBalloon]:
    """A balloon holding one acked 16 MiB chunk."""
    write_proc(tmp_path)
    pages = FakePages()
    balloon = LinuxBalloon(pages, total_pages=1000 * 256, root=tmp_path, chunk_bytes=16 * MIB)
    balloon.set_target(16 * 256)
    op = balloon.build("ranges52", 4096, buffer)
    op.on_ack(op)
    return pages, balloon


def test_a_new_session_reinflates_from_a_fresh_pagemap_read(tmp_path, buffer):
    pages, balloon = balloon_with_one_chunk(tmp_path, buffer)
    chunk = next(iter(pages.mapped.values()))
    pages.moves[chunk.address] = 0x99000  # whatever moved it, the old PFNs must not be resent
    balloon.resend_all()
    again = balloon.build("ranges52", 4096, buffer)
    assert again.kind == "inflate" and payload_ranges(again) == [(0x99000, 4096)]


def test_an_aborted_deflate_keeps_the_pages_in_the_balloon(tmp_path, buffer):
    pages, balloon = balloon_with_one_chunk(tmp_path, buffer)
    balloon.set_target(0)
    deflate = balloon.build("ranges52", 4096, buffer)
    deflate.on_abort(deflate)  # the session died before the ACK
    assert pages.unmapped == [] and balloon.pages == 16 * 256
    assert balloon.build("ranges52", 4096, buffer).kind == "inflate"  # told again, then deflated


def test_reporting_reports_growth_holds_it_until_the_ack(tmp_path, buffer):
    write_proc(tmp_path, free_mib=300)
    pages = FakePages()
    reporting = LinuxReporting(pages, total_pages=1000 * 256, root=tmp_path, delay=2.0, chunk_bytes=64 * MIB)
    reporting.check(0.0)  # baseline: 300 MiB free
    write_proc(tmp_path, free_mib=300)
    reporting.check(1.0)
    assert reporting.state.value == "idle"
    write_proc(tmp_path, free_mib=450)  # 150 MiB freed
    reporting.check(2.0)
    assert reporting.state.value == "requested"
    assert reporting.build(3.0, "ranges52", 4096, buffer) is None  # PAGE_REPORTING_DELAY
    first = reporting.build(4.0, "ranges52", 4096, buffer)
    second = reporting.build(4.0, "ranges52", 4096, buffer)
    third = reporting.build(4.0, "ranges52", 4096, buffer)
    assert [op.pages for op in (first, second, third)] == [16384, 16384, 5632]  # 64 + 64 + 22 MiB
    assert reporting.build(4.0, "ranges52", 4096, buffer) is None  # the growth is used up
    assert reporting.isolated_pages == 150 * 256 and pages.unmapped == []
    reporting.check(6.0)
    assert reporting.state.value == "idle"  # held reports are no new free memory
    for op in (first, second, third):
        op.on_ack(op)
    assert pages.mapped == {} and reporting.reported_pages == 150 * 256
    reporting.check(7.0)  # the new baseline is taken once the memory is back
    reporting.check(8.0)
    assert reporting.state.value == "idle"


def test_a_new_session_reports_all_free_memory_down_to_the_reserve(tmp_path, buffer):
    pages = FakePages()
    reporting = LinuxReporting(pages, total_pages=1000 * 256, root=tmp_path, delay=0.0, chunk_bytes=64 * MIB)
    write_proc(tmp_path, free_mib=reporting.reserve_bytes // MIB + 100)
    reporting.restart(0.0)
    reporting.check(0.0)
    ops = []
    while (op := reporting.build(0.0, "ranges52", 4096, buffer)) is not None:
        ops.append(op)
    # Fake meminfo does not shrink as memory is pinned; the budget (free at the pass's start)
    # and the reserve bound the pass regardless.
    assert sum(op.pages for op in ops) * 4096 <= (reporting.reserve_bytes // MIB + 100) * MIB
    assert ops and all(op.kind == "report" for op in ops)


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="pagemap PFNs and mlock need root")


@needs_root
def test_real_pinned_memory_has_real_pfns_and_goes_back(tmp_path):
    (tmp_path / "proc/sys/vm").mkdir(parents=True)
    knob = tmp_path / "proc/sys/vm/compact_unevictable_allowed"
    knob.write_text("1\n")
    memory = LinuxPages(tmp_path)  # the knob from the fake root, pagemap from this process
    memory.prepare()
    assert knob.read_text().strip() == "0"
    chunk = memory.read(memory.map(4 * MIB))
    assert int(chunk.counts.sum()) == 1024 and memory.mapped_pages == 1024
    assert bool(np.all(chunk.pfns > 0)) and bool(np.all(np.diff(chunk.pfns.astype(np.int64)) > 0))
    memory.unmap(chunk)
    assert memory.mapped_pages == 0


def test_reporting_wakes_the_agent_for_its_memfree_check_and_the_delay_only(tmp_path, buffer):
    """Agent.next_tick sleeps until these: the 1 s MemFree check, the end of the delay once requested."""
    write_proc(tmp_path, free_mib=300)
    reporting = LinuxReporting(FakePages(), total_pages=1000 * 256, root=tmp_path, delay=2.0, chunk_bytes=64 * MIB)
    reporting.check(0.0)
    assert reporting.wake_at() == 1.0
    write_proc(tmp_path, free_mib=450)
    reporting.check(1.0)
    assert reporting.wake_at() == 3.0  # PAGE_REPORTING_DELAY after the growth was seen
    assert reporting.build(3.0, "ranges52", 4096, buffer) is not None
    assert reporting.wake_at() == 2.0  # a pass runs: the next check (it waits for the ACKs) is due


def test_free_bytes_is_memfree_from_sysinfo_or_a_fixture(tmp_path):
    from guest_agent.memory.procfs import free_bytes

    write_proc(tmp_path, free_mib=321)
    assert free_bytes(tmp_path) == 321 * MIB
    live = free_bytes("/")
    meminfo = linux.read_meminfo("/")["MemFree"]
    assert abs(live - meminfo) < 64 * MIB  # the same counter, read a moment apart
    with pytest.raises(OSError):
        free_bytes(tmp_path / "nowhere")


async def test_a_sleeping_agent_still_reports_a_free_within_its_check_and_delay(tmp_path):
    """The client's clock sleeps between deadlines (Agent.next_tick); the linux source's MemFree
    check and reporting delay are such deadlines, so a free is reported as before: the first
    pass at once, then a later growth of free memory after the next check plus the delay."""
    import asyncio

    from guest_agent.agent import Agent
    from guest_agent.client import GuestClient
    from shared.messages import Ack, ReceivedBatch, Welcome
    from shared.protocol import HostConnection, negotiate_features
    from shared.runtime.addresses import Address

    reported: list[int] = []

    async def host(reader, writer):
        conn = HostConnection()
        while conn.hello is None:
            conn.receive_data(await reader.read(65536))
            list(conn.events())
        writer.write(conn.send(Welcome(window=16, max_ranges=4096,
                                       features=negotiate_features(conn.hello.features, ("ranges52",)))))
        while data := await reader.read(65536):
            conn.receive_data(data)
            for event in conn.events():
                if isinstance(event, ReceivedBatch):
                    reported.append(int(event.counts.sum()))
                    writer.write(conn.send(Ack(event.seq, 0)))
            await writer.drain()

    write_proc(tmp_path, free_mib=300)
    reporting = LinuxReporting(FakePages(), total_pages=1000 * 256, root=tmp_path, delay=0.2,
                               chunk_bytes=64 * MIB, interval=0.1)
    agent = Agent(reporting=reporting, total_pages=1000 * 256, ping_interval=0, stats_interval=0)
    path = str(tmp_path / "host.sock")
    server = await asyncio.start_unix_server(host, path)
    client = GuestClient(agent, Address("unix", path=path), "g1", ("ranges52",))
    task = asyncio.create_task(client.run())
    loop = asyncio.get_running_loop()

    async def reported_at_least(pages: int) -> bool:
        deadline = loop.time() + 10
        while loop.time() < deadline:
            if sum(reported) >= pages and reporting.isolated_pages == 0:
                return True
            await asyncio.sleep(0.02)
        return False

    try:
        assert await reported_at_least(1), "the session's first pass"
        first = sum(reported)

        async def ticks(n: int) -> None:  # the clock looked at MemFree again (checks every 0.1 s)
            target = client.ticks + n
            deadline = loop.time() + 10
            while client.ticks < target and loop.time() < deadline:
                await asyncio.sleep(0.02)

        await ticks(3)
        write_proc(tmp_path, free_mib=200)  # a process takes 100 MiB ...
        await ticks(3)
        write_proc(tmp_path, free_mib=450)  # ... and exits with 250 MiB more than it took
        assert await reported_at_least(first + 250 * 256), (first, sum(reported), reporting.state)
        assert sum(reported) == first + 250 * 256  # the growth since the lowest MemFree, not more
    finally:
        client.stop()
        await asyncio.wait_for(task, 5)
        server.close()
        await server.wait_closed()
