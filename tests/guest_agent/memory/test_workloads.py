"""Workloads: each converges to what it promises, replays exactly under a seed or a trace."""

from __future__ import annotations

import numpy as np
import pytest

from guest_agent.memory.buddy import BuddyAllocator
from guest_agent.memory.workloads import (
    Burst,
    Churn,
    Idle,
    TraceRecorder,
    make_workload,
    parse_trace,
)

PAGES = 16384  # 64 MiB


def run(workload, until: float, dt: float = 0.05):
    t = 0.0
    while t <= until + 1e-9:
        workload.step(t)
        t += dt


def log_calls():
    calls = []
    return (
        calls,
        (lambda p, o: calls.append(("alloc", p, o))),
        (lambda p, o: calls.append(("free", p, o))),
    )


def test_idle_allocates_its_working_set_once():
    a = BuddyAllocator(PAGES)
    w = make_workload("idle", a, seed=1)
    assert isinstance(w, Idle)
    w.step(100.0)
    target = int(0.10 * PAGES)
    assert target - 8 < a.allocated_pages <= target  # within one block (orders 0..3)
    assert w.held_pages == a.allocated_pages
    allocs = w.allocations
    run(w, 5.0)
    assert w.allocations == allocs and w.frees == 0


def test_idle_retries_what_did_not_fit_later():
    a = BuddyAllocator(PAGES)
    hog = [a.alloc(10) for _ in range(16)]  # all memory gone
    w = make_workload("idle", a, seed=1, utilization=0.25)
    w.step(0.0)
    assert w.held_pages == 0 and w.failed_allocations == 1
    for pfn in hog:
        a.free(pfn, 10)
    w.step(1.0)
    assert w.held_pages > int(0.25 * PAGES) - 8


def test_same_seed_same_run_other_seed_other_run():
    def trace(seed):
        calls, on_alloc, on_free = log_calls()
        w = make_workload(
            "churn", BuddyAllocator(PAGES), seed=seed, rate=2000, on_alloc=on_alloc, on_free=on_free
        )
        run(w, 2.0)
        return calls

    assert trace(7) == trace(7)
    assert trace(7) != trace(8)


@pytest.mark.parametrize("utilization", [0.2, 0.5, 0.8])
def test_churn_holds_utilization_near_target_at_the_given_rate(utilization):
    a = BuddyAllocator(PAGES)
    w = make_workload("churn", a, seed=3, utilization=utilization, rate=5000)
    assert isinstance(w, Churn)
    w.step(0.0)
    filled = w.allocations
    samples = []
    t = 0.0
    for _ in range(100):
        t += 0.02
        w.step(t)
        samples.append(a.allocated_pages / PAGES)
    assert w.allocations - filled == pytest.approx(5000 * 2.0, abs=2)  # the rate, to the allocation
    assert w.frees > 0.8 * (w.allocations - filled)  # steady state: frees keep up with allocations
    assert max(abs(s - utilization) for s in samples) < 8 / PAGES + 1e-9  # within one block
    assert a.free_pages + a.allocated_pages == PAGES


def test_churn_does_not_catch_up_a_long_stall_at_once():
    w = make_workload("churn", BuddyAllocator(PAGES), seed=1, rate=1000)
    w.step(0.0)
    before = w.allocations
    w.step(3600.0)  # the agent was stopped for an hour
    assert w.allocations - before <= 1000


def test_churn_size_mix_is_respected():
    calls, on_alloc, _ = log_calls()
    w = make_workload(
        "churn", BuddyAllocator(PAGES), seed=2, rate=4000, size_mix={0: 3, 4: 1}, on_alloc=on_alloc
    )
    run(w, 1.0)
    orders = np.array([o for op, _, o in calls if op == "alloc"])
    assert set(orders.tolist()) == {0, 4}
    assert 0.65 < np.mean(orders == 0) < 0.85


def test_burst_takes_then_frees_all_it_took():
    a = BuddyAllocator(PAGES)
    w = make_workload("burst", a, seed=1, utilization=0.5, period=4.0, hold=1.0)
    assert isinstance(w, Burst)
    w.step(0.0)
    assert a.allocated_pages == PAGES // 2 and w.bursts == 1
    w.step(0.9)
    assert a.allocated_pages == PAGES // 2
    w.step(1.1)
    assert a.allocated_pages == 0 and a.free_pages == PAGES
    assert a.free_blocks_by_order()[10] == PAGES // 1024  # merged back whole
    w.step(4.2)
    assert a.allocated_pages == PAGES // 2 and w.bursts == 2
    w.step(8.1)  # next cycle begins: the previous burst is freed first
    assert (
        a.allocated_pages == PAGES // 2
        and w.bursts == 3
        and w.frees == w.allocations - w.allocations // 3
    )


def test_burst_falls_back_to_smaller_orders_when_fragmented():
    a = BuddyAllocator(PAGES)
    # pin one page in every 512-page block: no order-9 block is free
    pins = [a.alloc(0) for _ in range(PAGES)]
    for p in pins:
        if p % 512:
            a.free(p, 0)
    w = make_workload("burst", a, seed=1, utilization=0.3, size_mix={9: 1, 8: 1, 0: 1})
    w.step(0.0)
    _, orders = w.held_blocks()
    assert 9 not in orders.tolist() and 8 in orders.tolist()
    assert w.held_pages == int(0.3 * PAGES)
    w.step(w.hold + 0.5)
    assert w.held_pages == 0 and a.allocated_pages == PAGES // 512


def test_on_oom_gets_memory_and_the_allocation_is_retried():
    a = BuddyAllocator(1024)
    balloon = a.alloc(10)  # the balloon holds everything
    given = []

    def on_oom(order):
        if given:
            return False
        a.free(balloon, 10)  # deflate
        given.append(order)
        return True

    w = make_workload("idle", a, seed=1, utilization=0.5, on_oom=on_oom)
    w.step(0.0)
    assert given and w.oom_retries == 1 and w.held_pages > 500


def test_trace_replays_a_recorded_churn_exactly(tmp_path):
    clock = {"t": 0.0}
    rec = TraceRecorder(lambda: clock["t"])
    calls, on_alloc, on_free = log_calls()

    def both_alloc(p, o):
        rec.on_alloc(p, o)
        on_alloc(p, o)

    def both_free(p, o):
        rec.on_free(p, o)
        on_free(p, o)

    w = make_workload(
        "churn", BuddyAllocator(PAGES), seed=5, rate=3000, on_alloc=both_alloc, on_free=both_free
    )
    for i in range(41):
        clock["t"] = i * 0.05
        w.step(clock["t"])
    path = tmp_path / "churn.trace"
    path.write_text(rec.text())

    # replay on a fresh allocator, from another clock origin: the first step is time 0
    replay_calls, on_alloc2, on_free2 = log_calls()
    replay = make_workload(
        f"trace:{path}", BuddyAllocator(PAGES), on_alloc=on_alloc2, on_free=on_free2
    )
    for i in range(41):
        replay.step(1000.0 + i * 0.05)
    replay.step(1010.0)  # whatever float rounding held back
    assert replay_calls == calls  # same ops, same order, same PFNs
    assert replay.done and replay.held_pages == w.held_pages


def test_trace_is_replayed_at_the_recorded_times(tmp_path):
    path = tmp_path / "t.trace"
    path.write_text(
        "# demo\n0 alloc 0 a\n\n0.5 alloc 3 b  # comment\n1.0 free 0 a\n2.0 free 3 b\n2.0 alloc 0 a\n"
    )
    a = BuddyAllocator(64)
    w = make_workload(f"trace:{path}", a)
    w.step(10.0)
    assert a.allocated_pages == 1
    w.step(10.6)
    assert a.allocated_pages == 9
    w.step(11.0)
    assert a.allocated_pages == 8
    w.step(12.0)
    assert a.allocated_pages == 1 and w.done
    w.release_all()
    assert a.allocated_pages == 0


def test_trace_skips_the_free_of_a_failed_allocation(tmp_path):
    path = tmp_path / "t.trace"
    path.write_text("0 alloc 3 first\n0 alloc 3 second\n1 free 3 first\n1 free 3 second\n")
    a = BuddyAllocator(8, max_order=3)  # room for one order-3 block only
    w = make_workload(f"trace:{path}", a)
    w.step(0.0)
    w.step(1.0)
    assert w.failed_allocations == 1 and w.skipped_frees == 1 and a.allocated_pages == 0


@pytest.mark.parametrize(
    "text, message",
    [
        ("0 alloc 0\n", "expected"),
        ("x alloc 0 a\n", "bad time"),
        ("-1 alloc 0 a\n", ">= 0"),
        ("1 alloc 0 a\n0 alloc 0 b\n", "backwards"),
        ("0 alloc 11 a\n", "order"),
        ("0 alloc 0 a\n0 alloc 0 a\n", "already"),
        ("0 free 0 a\n", "unknown"),
        ("0 alloc 0 a\n1 free 1 a\n", "another order"),
        ("0 take 0 a\n", "op must be"),
    ],
)
def test_trace_errors_name_the_line(text, message):
    with pytest.raises(ValueError, match=message):
        parse_trace(text)


def test_make_workload_errors(tmp_path):
    a = BuddyAllocator(64)
    with pytest.raises(ValueError, match="unknown workload"):
        make_workload("busy", a)
    with pytest.raises(ValueError):
        make_workload("churn", a, utilization=1.5)
    with pytest.raises(ValueError):
        make_workload("churn", a, rate=-1)
    with pytest.raises(ValueError):
        make_workload("idle", a, size_mix={12: 1})
    with pytest.raises(ValueError):
        make_workload("idle", a, size_mix={0: 0})
    with pytest.raises(ValueError):
        make_workload("burst", a, period=1, hold=2)
    with pytest.raises(FileNotFoundError):
        make_workload(f"trace:{tmp_path / 'missing'}", a)


def _report_everything_reportable(allocator: BuddyAllocator, reserve_pages: int) -> int:
    """What free page reporting ends with: every free block of order >= 9 reported except a reserve."""
    reported = 0
    while allocator.free_pages - reserve_pages >= 512:
        pfns, orders = allocator.isolate_unreported(9, 1)
        if not len(pfns):
            break
        allocator.return_isolated(pfns, orders, reported=True)  # the host's ACK
        reported += 1
    return reported


def test_churn_swings_into_reported_memory_every_period_so_it_reuses_reported_pages():
    a = BuddyAllocator(PAGES)
    w = make_workload("churn", a, seed=4, utilization=0.3, rate=4000, period=4.0, swing=0.2)
    t, reuses = 0.0, []
    for cycle in range(3):
        while t < cycle * 4.0 + 2.0:  # low half: reporting catches up
            w.step(t)
            t += 0.05
        assert abs(a.allocated_pages / PAGES - 0.3) < 0.01
        assert _report_everything_reportable(a, reserve_pages=PAGES // 16) > 0
        a.drain_reused()
        while t < cycle * 4.0 + 4.0:  # high half: +20 % of memory, more than the unreported reserve
            w.step(t)
            t += 0.05
        assert w.surge_pages == 0.2 * PAGES // 512 * 512  # whole pageblocks
        pfns, counts = a.drain_reused()
        reuses.append(int(counts.sum()))
    # every surge takes reported pages back: all of it but what reporting left unreported
    assert all(pages >= w.surge_target // 512 * 512 - PAGES // 16 for pages in reuses), reuses


def test_churn_without_swing_holds_its_target_and_default_periods_do_not_alias_with_stats():
    from guest_agent.memory.workloads import Burst
    from guest_agent.settings import GuestSettings

    stats = GuestSettings.__dataclass_fields__["stats_interval"].default
    for period in (Churn(BuddyAllocator(PAGES)).period, Burst(BuddyAllocator(PAGES)).period):
        assert period % stats != 0 and stats % period != 0  # no sample lands on the same phase forever
    a = BuddyAllocator(PAGES)
    w = make_workload("churn", a, seed=3, utilization=0.4, rate=2000, swing=0.0, period=1.0)
    for step in range(200):
        w.step(step * 0.02)
    assert abs(a.allocated_pages / PAGES - 0.4) < 8 / PAGES + 1e-9
