"""The agent's core against a sans-IO host: no sockets, a fake clock, exact page states.

What is checked is what mm/page_reporting.c and the balloon driver promise: reported
blocks are isolated until their ACK, reused pages are announced before anything else,
the window is never exceeded and the wait for it is measured, a lost session gives
isolated blocks back unreported and the next session re-reports and re-inflates.
"""

from __future__ import annotations

import numpy as np
import pytest
from guest_fakes import ALLOCATED, FREE, ISOLATED, FakeBuddy, FakeHost, connect

from guest_agent.agent import Agent
from guest_agent.balloon import Balloon
from guest_agent.canaries import WorkloadMemory
from guest_agent.hinting import Hinting
from guest_agent.metrics import GuestMetrics
from guest_agent.reporting import FreePageReporting
from shared.messages import HintStart, HintStop, Ping, Target
from shared.ranges import expand_pages

PAGES = 8192  # 32 MiB: 16 blocks of order 9


class Harness:
    def __init__(self, pages=PAGES, window=4, capacity=4, delay=1.0, order=9, features=None,
                 host_features=None, max_ranges=4096, deflate_on_oom=True, workload=None, ram=None):
        self.allocator = FakeBuddy(pages)
        self.metrics = GuestMetrics()
        self.memory = WorkloadMemory(self.allocator, ram=ram)
        self.reporting = FreePageReporting(self.allocator, order, delay, capacity)
        self.balloon = Balloon(self.allocator, deflate_on_oom=deflate_on_oom)
        self.agent = Agent(allocator=self.allocator, memory=self.memory, reporting=self.reporting,
                           balloon=self.balloon, metrics=self.metrics, total_pages=pages, workload=workload,
                           ping_interval=0, stats_interval=0)
        self.now = 0.0
        self.features = features or ("ranges52", "deflate-on-oom")
        self.new_host(window, max_ranges, host_features)

    def new_host(self, window=4, max_ranges=4096, host_features=None):
        kwargs = {"window": window, "max_ranges": max_ranges}
        if host_features:
            kwargs["features"] = host_features
        self.host = FakeHost(**kwargs)
        self.conn = connect(self.agent, self.host, self.now, features=self.features)

    def pump(self) -> int:
        """Send everything the agent will send now; returns how many batches went out."""
        sent = 0
        while True:
            control = self.agent.pop_control()
            if control is not None:
                self.host.receive(control)
                continue
            data = self.agent.poll_batch(self.now)
            if data is None:
                return sent
            self.host.receive(data)
            sent += 1

    def ack(self, count=None) -> None:
        data = self.host.ack(count)
        if data:
            self.conn.receive_data(data)
            for event in self.conn.events():
                self.agent.receive(event, self.now)

    def deliver(self, message) -> None:
        self.agent.receive(message, self.now)

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.agent.tick(self.now)

    def settle(self, rounds=200) -> None:
        """Tick, send and ack until nothing moves."""
        for _ in range(rounds):
            self.advance(0.5)
            sent = self.pump()
            quiet = self.reporting.state.value == "idle" and not self.agent.wants_to_send(self.now)
            if not self.host.unacked and not sent and quiet:
                return
            self.ack()
        raise AssertionError("the agent did not settle")

    def guest_reported(self) -> set[int]:
        a = self.allocator
        return set(np.flatnonzero((a.state == FREE) & a.reported).tolist())


def test_nothing_is_reported_before_the_delay():
    h = Harness(delay=2.0)
    h.advance(1.0)
    assert h.pump() == 0
    h.advance(1.1)
    assert h.pump() > 0


def test_reported_blocks_are_isolated_until_the_ack_then_flagged_reported():
    h = Harness(window=1, capacity=4)
    h.advance(1.5)
    assert h.pump() == 1
    (batch,) = h.host.unacked
    pages = expand_pages(batch.pfns, batch.counts).astype(np.intp)
    assert pages.size == 4 * 512  # capacity blocks of order 9, coalesced into one range
    assert batch.pfns.size == 1
    assert (h.allocator.state[pages] == ISOLATED).all()
    # the workload cannot get them: allocate everything else there is
    while h.memory.alloc(0) is not None:
        pass
    assert (h.allocator.state[pages] == ISOLATED).all()
    h.ack()
    assert (h.allocator.state[pages] == FREE).all()
    assert h.allocator.reported[pages].all()
    assert h.metrics.value("balloon_guest_batches_total", {"kind": "report"}) == 1


def test_reporting_keeps_the_low_watermark_free_for_the_workload():
    from guest_agent.reporting import low_watermark_pages

    h = Harness(window=16, capacity=1)
    low = low_watermark_pages(PAGES)
    h.advance(1.5)
    sent = h.pump()
    assert 0 < sent < 16  # the window had room; the watermark stopped the pass
    assert h.allocator.free_pages >= low
    assert h.memory.alloc(0) is not None  # the workload still gets memory while reports fly
    h.settle()
    assert h.host.reported == h.guest_reported()  # acks brought the pages back: all reported
    assert len(h.host.reported) == PAGES - 512  # every block but the one the workload split


def test_a_nearly_full_guest_does_not_report():
    h = Harness(capacity=4)
    while h.allocator.free_pages >= h.reporting.reserve_pages:
        h.memory.alloc(9)
    h.advance(1.5)
    h.advance(1.5)
    assert h.pump() == 0
    assert h.allocator.isolated_pages == 0


def test_idle_guest_converges_with_the_host():
    h = Harness()
    h.settle()
    assert h.host.reported == h.guest_reported()
    assert len(h.host.reported) == PAGES
    assert h.metrics.value("balloon_guest_reported_bytes") == PAGES * 4096
    assert h.metrics.value("balloon_guest_isolated_bytes") == 0


def test_reused_pages_go_to_the_host_before_anything_else():
    h = Harness(window=8)
    h.settle()
    pfn = h.memory.alloc(3)  # the workload takes reported pages back
    h.balloon.set_target(1024)  # and the host wants a balloon at the same time
    h.advance(0.1)
    h.pump()
    kinds = [b.TYPE.name for b in h.host.unacked]
    assert kinds[0] == "REUSE"
    assert set(expand_pages(h.host.unacked[0].pfns, h.host.unacked[0].counts).tolist()) >= set(range(pfn, pfn + 8))
    # every page the balloon took was announced as REUSE before its INFLATE
    reused, inflate_seen_before_reuse = set(), False
    for batch in h.host.unacked:
        pages = set(expand_pages(batch.pfns, batch.counts).tolist())
        if batch.TYPE.name == "REUSE":
            reused |= pages
        elif batch.TYPE.name == "INFLATE" and not pages <= reused:
            inflate_seen_before_reuse = True
    assert not inflate_seen_before_reuse
    h.settle()
    assert h.host.reported == h.guest_reported()
    assert not (set(range(pfn, pfn + 8)) & h.host.reported)


def test_the_window_is_never_exceeded_and_the_stall_is_measured():
    h = Harness(window=2, capacity=1)
    h.advance(1.5)
    assert h.pump() == 2
    assert h.agent.inflight == 2
    assert h.pump() == 0  # window full: the agent waits, it does not queue more
    # only what is in flight is isolated: memory stays bounded while the host is slow
    assert h.allocator.isolated_pages == 2 * 512
    h.now += 3.0
    h.ack(1)
    assert h.metrics.value("balloon_guest_window_stall_seconds_total") == pytest.approx(3.0)
    h.settle()
    assert h.host.max_unacked <= 2
    assert h.agent.inflight_max == 2
    assert h.host.reported == h.guest_reported()


def test_a_lost_session_returns_isolated_blocks_unreported_and_the_next_reports_all_again():
    h = Harness(window=2, capacity=2)
    h.settle()
    h.memory.alloc(9)
    reported_before = h.allocator.reported_pages
    assert reported_before > 0
    # free a block so a new pass starts, and lose the connection mid-pass
    h.advance(0.1)
    pfn = next(iter(h.allocator.orders))
    h.memory.free(pfn, 9)
    h.advance(0.1)  # the free requests a pass ...
    h.advance(1.5)  # ... which starts after the delay
    h.pump()
    assert h.allocator.isolated_pages > 0
    in_flight = h.allocator.isolated_pages
    h.agent.end_session(h.now)
    assert not h.agent.connected
    # the old host may still be discarding what it received: isolated until a new WELCOME
    assert h.allocator.isolated_pages == in_flight
    # new host, empty tracker: the blocks come back unreported, every flag is cleared and
    # everything is reported again
    h.new_host()
    assert h.allocator.isolated_pages == 0
    assert h.allocator.reported_pages == 0
    h.settle()
    assert h.host.reported == h.guest_reported()
    assert len(h.host.reported) == h.allocator.free_pages


def test_inflate_to_target_then_deflate_frees_pages_only_after_the_ack():
    h = Harness(window=4)
    h.settle()
    h.deliver(Target(3000))
    h.settle()
    assert len(h.host.inflated) == 3000 == h.balloon.pages
    assert h.metrics.value("balloon_guest_inflated_bytes") == 3000 * 4096
    assert h.metrics.value("balloon_guest_target_bytes") == 3000 * 4096
    assert (h.allocator.state[sorted(h.host.inflated)] == ALLOCATED).all()
    assert not (h.host.inflated & h.host.reported)
    h.deliver(Target(1000))
    h.advance(0.1)
    h.pump()
    deflates = [b for b in h.host.unacked if b.TYPE.name == "DEFLATE"]
    assert deflates
    pages = np.concatenate([expand_pages(b.pfns, b.counts) for b in deflates]).astype(np.intp)
    assert (h.allocator.state[pages] == ALLOCATED).all()  # not freed before the ACK
    h.ack()
    assert (h.allocator.state[pages] == FREE).all()
    h.settle()
    assert len(h.host.inflated) == 1000 == h.balloon.pages
    assert h.host.reported == h.guest_reported()


def test_reconnect_reinflates_the_whole_balloon():
    h = Harness()
    h.deliver(Target(2048 + 300))
    h.settle()
    held = set(h.host.inflated)
    h.agent.end_session(h.now)
    h.new_host()
    h.settle()
    assert h.host.inflated == held
    assert h.balloon.pages == 2348
    assert h.host.reported == h.guest_reported()


def test_inflate_stops_at_the_low_watermark():
    from guest_agent.reporting import low_watermark_pages

    h = Harness(pages=4096)
    h.deliver(Target(4096))
    h.settle()
    assert h.balloon.pages == len(h.host.inflated) == 4096 - low_watermark_pages(4096)
    assert h.memory.alloc(0) is not None  # the workload is not starved by the balloon


def test_deflate_on_oom_gives_the_workload_balloon_memory():
    h = Harness(pages=4096)
    h.deliver(Target(4096 - 16))
    h.settle()
    while h.memory.alloc(0) is not None:
        pass
    assert h.memory.alloc(2) is None  # the workload needs memory that is in the balloon
    h.advance(0.1)
    h.pump()
    assert any(b.TYPE.name == "DEFLATE" for b in h.host.unacked)
    h.ack()
    assert h.memory.alloc(2) is not None
    assert h.metrics.value("balloon_guest_oom_deflates_total") == 1
    h.settle()
    assert len(h.host.inflated) == h.balloon.pages < 4096 - 16


def test_no_deflate_on_oom_unless_the_host_accepted_the_feature():
    h = Harness(pages=4096, host_features=("ranges52",))
    assert "deflate-on-oom" not in h.conn.features
    h.deliver(Target(4096 - 16))
    h.settle()
    held = h.balloon.pages
    while h.memory.alloc(0) is not None:
        pass
    h.advance(0.1)
    h.pump()
    assert not any(b.TYPE.name == "DEFLATE" for b in h.host.unacked)
    assert h.balloon.pages == held


def test_stats_carry_free_and_total_memory_when_negotiated():
    h = Harness(features=("ranges52", "stats"))
    h.agent.stats_interval = 1.0
    h.advance(0.1)
    h.pump()
    (stats,) = [m for m in h.host.others if m.TYPE.name == "STATS"]
    assert stats.values[5] == PAGES * 4096  # VIRTIO_BALLOON_S_MEMTOT
    assert stats.values[4] == h.allocator.free_pages * 4096  # VIRTIO_BALLOON_S_MEMFREE


def test_legacy_pfn32_mode_sends_256_pfns_per_message_and_isolates_until_the_last_ack():
    h = Harness(window=2, capacity=1, features=("pfn32",))
    assert h.conn.encoding == "pfn32"
    h.advance(1.5)
    assert h.pump() == 2  # one order-9 block = 512 pages = two legacy messages
    first, second = h.host.unacked
    assert first.pfns.size == 256 and (first.counts == 1).all()  # the host decoded 256 legacy PFNs
    pages = np.concatenate([first.pfns, second.pfns]).astype(np.intp)
    h.ack(1)
    assert (h.allocator.state[pages] == ISOLATED).all()  # half acked is not acked
    h.ack(1)
    assert (h.allocator.state[pages] == FREE).all() and h.allocator.reported[pages].all()
    h.deliver(Target(600))
    h.settle()
    assert len(h.host.inflated) == 600
    assert h.host.reported == h.guest_reported()


def test_ping_is_answered_with_pong():
    h = Harness()
    h.deliver(Ping(7))
    h.pump()
    assert [type(m).__name__ for m in h.host.others] == ["Pong"]
    assert h.host.others[0].nonce == 7


class FakeRam:
    """A dict of canaries, with a way to lose a page (what a wrong discard would do)."""

    def __init__(self):
        self.canary: dict[int, int] = {}

    def write_canaries(self, pfns, counts, generation):
        for page in expand_pages(pfns, counts).tolist():
            self.canary[page] = generation

    def check_canaries(self, pfns, counts, generation):
        return sum(self.canary.get(p) != generation for p in expand_pages(pfns, counts).tolist())


def test_canaries_are_written_on_alloc_and_checked_on_free_and_by_the_sweep():
    ram = FakeRam()
    h = Harness(ram=ram)
    a = h.memory.alloc(2)
    b = h.memory.alloc(0)
    h.memory.free(a, 2)
    h.advance(0.1)
    assert h.metrics.value("balloon_guest_canary_pages_checked_total") >= 4 + 1  # free + sweep of b
    assert h.metrics.value("balloon_guest_canary_failures_total") == 0
    del ram.canary[b]  # the host discarded a page the guest owns
    h.now += 5
    h.advance(0.1)
    assert h.metrics.value("balloon_guest_canary_failures_total") == 1


def test_hints_carry_the_command_id_and_end_with_hint_done():
    runs = (np.array([100, 5000], np.uint64), np.array([50, 3000], np.uint64))
    metrics = GuestMetrics()
    hinting = Hinting(lambda: runs, interval=0)
    agent = Agent(hinting=hinting, metrics=metrics, total_pages=PAGES, ping_interval=0)
    host = FakeHost(features=("ranges52", "hinting"))
    conn = connect(agent, host, features=("ranges52", "hinting"))
    assert agent.poll_batch(0.0) is None  # no command, no unsolicited hints
    agent.receive(HintStart(42), 0.0)
    host.receive(agent.poll_batch(0.0))
    (batch,) = host.unacked
    assert batch.TYPE.name == "HINT" and batch.cmd_id == 42
    assert int(batch.counts.sum()) == 3050
    conn.receive_data(host.ack())
    for event in conn.events():
        agent.receive(event, 0.1)
    host.receive(agent.pop_control())
    assert host.others[-1].TYPE.name == "HINT_DONE" and host.others[-1].cmd_id == 42
    assert metrics.value("balloon_guest_hinted_bytes") == 3050 * 4096
    assert metrics.value("balloon_guest_possibly_reclaimable_bytes") == 3050 * 4096
    agent.receive(HintStart(43), 0.2)
    agent.receive(HintStop(43), 0.2)
    assert agent.poll_batch(0.2) is None


class NullRam:
    """Canaries switched on (so the proxy tracks live allocations) without touching memory."""

    def write_canaries(self, pfns, counts, generation):
        return int(np.asarray(counts).sum())

    def check_canaries(self, pfns, counts, generation):
        return 0


@pytest.mark.parametrize("seed", range(3))
def test_random_sessions_with_the_real_allocator_never_discard_owned_pages_and_converge(seed):
    """The real BuddyAllocator and churn workload, random acks, targets and lost sessions."""
    from guest_agent.memory import BuddyAllocator
    from guest_agent.memory.workloads import make_workload

    rng = np.random.default_rng(seed)
    pages = 16384
    allocator = BuddyAllocator(pages)
    memory = WorkloadMemory(allocator, ram=NullRam())
    workload = make_workload("churn", memory, seed=seed, utilization=0.4, rate=4000)
    balloon = Balloon(allocator, deflate_on_oom=True)
    agent = Agent(allocator=allocator, memory=memory, workload=workload, balloon=balloon,
                  reporting=FreePageReporting(allocator, 9, 0.2, 8), total_pages=pages,
                  ping_interval=0, stats_interval=0)
    owned_at_apply = []

    def owned(batch) -> set[int]:
        live = memory.live
        touched = set()
        for page in expand_pages(batch.pfns, batch.counts).tolist():
            for order in range(11):  # is the page inside a live workload block?
                head = page & ~((1 << order) - 1)
                if live.get(head) is not None and live[head] >= order:
                    touched.add(page)
                    break
        return touched

    class CheckingHost(FakeHost):
        def apply(self, batch):
            if batch.TYPE.name in ("REPORT", "INFLATE"):
                owned_at_apply.extend(owned(batch))
            super().apply(batch)

    now = 0.0
    host = CheckingHost(window=int(rng.integers(1, 6)), max_ranges=int(rng.integers(1, 64)))
    conn = connect(agent, host, now)
    for _ in range(300):
        now += 0.05
        agent.tick(now)
        while (data := agent.poll_batch(now)) is not None:
            host.receive(data)
        assert len(host.unacked) <= host.window
        roll = rng.random()
        if roll < 0.02:  # the connection drops
            agent.end_session(now)
            host = CheckingHost(window=int(rng.integers(1, 6)), max_ranges=int(rng.integers(1, 64)))
            conn = connect(agent, host, now)
            continue
        if roll < 0.06:
            agent.receive(Target(int(rng.integers(0, pages // 2))), now)
        if host.unacked and rng.random() < 0.7:
            data = host.ack(int(rng.integers(1, len(host.unacked) + 1)))
            conn.receive_data(data)
            for event in conn.events():
                agent.receive(event, now)
    assert not owned_at_apply, f"the host discarded {len(owned_at_apply)} pages the workload owned"
    # quiet: stop the workload, let everything drain, then both views agree
    agent.workload = None
    for _ in range(200):
        now += 0.1
        agent.tick(now)
        while (data := agent.poll_batch(now)) is not None:
            host.receive(data)
        if host.unacked:
            conn.receive_data(host.ack())
            for event in conn.events():
                agent.receive(event, now)
        elif not agent.wants_to_send(now) and agent.reporting.state.value == "idle":
            break
    assert len(host.reported) == allocator.reported_pages
    assert len(host.inflated) == balloon.pages
    assert not (host.reported & host.inflated)
    allocator.check()


def test_background_hinting_waits_for_a_scan_that_started_after_the_command():
    calls = []
    hinting = Hinting(lambda: (calls.append(1), (np.array([10], np.uint64), np.array([5], np.uint64)))[1],
                      interval=0, background=True)
    agent = Agent(hinting=hinting, total_pages=PAGES, ping_interval=0)
    connect(agent, FakeHost(features=("ranges52", "hinting")), features=("ranges52", "hinting"))
    hinting.run_scan()  # an old snapshot
    agent.receive(HintStart(5), 0.0)
    assert hinting.scan_due(0.0)
    assert agent.poll_batch(0.0) is None  # not from the old snapshot, and not scanning inline
    assert len(calls) == 1
    hinting.run_scan()  # what the client's worker thread does
    assert not hinting.scan_due(0.0)
    assert agent.poll_batch(0.0) is not None


def test_an_idle_agent_sleeps_until_its_next_deadline_not_for_one_tick():
    """The client's clock sleeps until Agent.next_tick: an idle, settled guest has only its
    STATS and PING deadlines (and a reporting delay once something was freed)."""
    from guest_agent.memory.workloads import make_workload

    h = Harness(features=("ranges52", "stats"))
    workload = make_workload("idle", h.memory, seed=1, utilization=0.1)
    h.agent.workload = workload
    h.agent.stats_interval, h.agent.ping_interval = 5.0, 15.0
    assert not workload.settled and h.agent.next_tick(h.now, 0.05) <= h.now + 0.05  # the working set is not in yet
    h.settle()  # fill, report, ack: nothing left to do
    assert workload.settled
    now = h.now
    h.advance(0.0)
    h.pump()
    stats_due, ping_due = h.agent._next_stats, h.agent._next_ping
    assert h.agent.next_tick(now, 0.05) == min(stats_due, ping_due) > now + 1
    # a free of a reportable block (as an ACK of a DEFLATE brings): the reporting delay is a deadline
    pfn = h.allocator.alloc(9)
    h.allocator.free(pfn, 9)
    h.reporting.check(now)
    assert h.agent.next_tick(now, 0.05) == pytest.approx(now + h.reporting.delay)
    # a balloon that found no memory looks again by itself, a second later
    h.reporting.state = h.reporting.state.IDLE
    h.balloon.stuck = True
    assert h.agent.next_tick(now, 0.05) == pytest.approx(now + 1.0)


def test_churn_and_unfinished_traces_keep_the_clock_at_every_tick():
    from guest_agent.memory.workloads import Trace as TraceWorkload
    from guest_agent.memory.workloads import TraceEvent, make_workload

    allocator = FakeBuddy(PAGES)
    churn = make_workload("churn", allocator, seed=1)
    churn.step(0.0)
    assert not churn.settled
    trace = TraceWorkload(allocator, events=[TraceEvent(0.0, "alloc", 0, "a"), TraceEvent(9.0, "free", 0, "a")])
    trace.step(0.0)
    assert not trace.settled
    trace.step(9.0)
    assert trace.settled
    agent = Agent(allocator=allocator, workload=churn, total_pages=PAGES, ping_interval=0, stats_interval=0)
    assert agent.next_tick(3.0, 0.05) == pytest.approx(3.05)


def test_periodic_scans_wait_for_free_memory_to_move_but_a_hint_command_always_scans():
    from guest_agent.hinting import CHANGE_BYTES

    free = [1 << 30]
    scans = []
    hinting = Hinting(lambda: (scans.append(1), (np.array([10], np.uint64), np.array([5], np.uint64)))[1],
                      interval=10.0, probe=lambda: free[0])
    hinting.tick(0.0)
    assert len(scans) == 1
    free[0] += CHANGE_BYTES - 4096  # moved, but less than the figure's resolution
    hinting.tick(10.0)
    assert len(scans) == 1 and hinting.skipped_scans == 1 and hinting.next_scan == 20.0
    free[0] += 8192  # now it moved enough
    hinting.tick(20.0)
    assert len(scans) == 2
    hinting.start(7)  # nothing moved, but a command is never answered from an older scan
    assert hinting.scan_due(20.5)
    hinting.tick(20.5)
    assert len(scans) == 3
    failing = Hinting(lambda: (scans.append(1), (np.array([], np.uint64), np.array([], np.uint64)))[1],
                      interval=10.0, probe=lambda: (_ for _ in ()).throw(OSError("no meminfo")))
    failing.tick(0.0)
    failing.tick(10.0)  # an unreadable probe scans, as without one
    assert len(scans) == 5
