"""The policy core as a pure function, table-driven in the style of ChromeOS concierge's
balloon_policy_test.cc: (host state, guest state[, what came before]) -> (direction, reason).
"""

from __future__ import annotations

import pytest

from host_daemon.policy import PolicyConfig, PolicyEngine
from host_daemon.policy.model import (
    STAT_ALLOC_STALLS,
    STAT_AVAILABLE,
    STAT_CACHES,
    STAT_FREE,
    STAT_MAJOR_FAULTS,
    STAT_OOM_KILLS,
    GuestState,
    HostMemory,
)

MIB = 1 << 20
GIB = 1 << 30


def host(free_ratio: float, total: int = 16 * GIB) -> HostMemory:
    return HostMemory(total_bytes=total, available_bytes=int(free_ratio * total))


def guest(available=int(1.5 * GIB), memory=2 * GIB, balloon=0, target=None, age=1.0, **kw) -> GuestState:
    stats = kw.pop("stats", None)
    if stats is None:
        stats = {} if available is None else {STAT_AVAILABLE: available}
    return GuestState("g", memory, balloon, target, stats, age, **kw)


def decide(policy: str, host_state: HostMemory, guest_state: GuestState, **knobs):
    engine = PolicyEngine(PolicyConfig(policy=policy, **knobs))
    (decision,) = engine.tick(100.0, host_state, [guest_state])
    return decision


# (name, policy, host, guest, knobs, direction, reason)
ONE_TICK = [
    ("manual never acts, even under critical host pressure",
     "manual", host(0.01), guest(), {}, "hold", "manual"),
    ("mom: host free below 20 % -> shrink by 5 % of memory",
     "mom", host(0.10), guest(), {}, "inflate", "host-pressure"),
    ("mom: host free below 5 % -> shrink at high priority",
     "mom", host(0.03), guest(), {}, "inflate", "host-critical"),
    ("mom: host free -> grow back by 5 %",
     "mom", host(0.50), guest(balloon=512 * MIB, target=512 * MIB), {}, "deflate", "host-free"),
    ("mom: host free and nothing ballooned -> nothing to grow",
     "mom", host(0.50), guest(), {}, "hold", "host-free"),
    ("mom keeps 20 % of the guest free: at the floor it refuses to shrink",
     "mom", host(0.10), guest(available=int(0.2 * 2 * GIB) + 4096), {}, "hold", "guest-floor"),
    ("mom: a guest below its floor is deflated even under host pressure",
     "mom", host(0.10), guest(available=200 * MIB, balloon=512 * MIB, target=512 * MIB), {},
     "deflate", "guest-floor"),
    ("balance: guest has far more headroom than the host -> inflate",
     "balance", host(0.06), guest(available=1800 * MIB), {}, "inflate", "balance"),
    ("balance: host has more headroom -> deflate",
     "balance", host(0.60), guest(available=600 * MIB, balloon=1 * GIB, target=1 * GIB), {},
     "deflate", "balance"),
    ("balance: headrooms within 1 % -> nothing",
     "balance", HostMemory(16 * GIB, int(0.05 * 16 * GIB) + 1000 * MIB),
     guest(available=400 * MIB + 1000 * MIB), {}, "hold", "balanced"),
    ("balance: guest floor defaults to 400 MiB",
     "balance", host(0.0), guest(available=400 * MIB), {}, "hold", "guest-floor"),
    ("stale stats freeze the target, whatever the host says",
     "mom", host(0.01), guest(age=16.0), {}, "hold", "stale-stats"),
    ("a guest that never reported is never shrunk blind",
     "balance", host(0.0), guest(available=None, age=None), {}, "hold", "no-stats"),
    ("a disconnected guest keeps its target",
     "mom", host(0.01), guest(connected=False), {}, "hold", "disconnected"),
    ("the change is under 0.25 % of memory -> skipped",
     "balance", HostMemory(16 * GIB, int(0.05 * 16 * GIB) + 1000 * MIB),
     guest(available=400 * MIB + 1000 * MIB + 6 * MIB), {"balance_act_ratio": 0.0}, "hold", "small-change"),
    ("inventory min_memory caps the balloon",
     "mom", host(0.10), guest(balloon=1 * GIB, target=1 * GIB, min_memory=1 * GIB), {}, "hold", "min-memory"),
    ("inventory max_memory forces a minimum balloon",
     "mom", host(0.50), guest(max_memory=1 * GIB), {}, "inflate", "max-memory"),
    ("available falls back to free + caches without tag 6",
     "balance", host(0.06), guest(stats={STAT_FREE: 1000 * MIB, STAT_CACHES: 800 * MIB}), {},
     "inflate", "balance"),
    ("catching-up: no further inflate while the guest lags the last target",
     "mom", host(0.10), guest(balloon=0, target=512 * MIB), {}, "hold", "catching-up"),
]


@pytest.mark.parametrize("name,policy,host_state,guest_state,knobs,direction,reason", ONE_TICK,
                         ids=[case[0] for case in ONE_TICK])
def test_one_tick(name, policy, host_state, guest_state, knobs, direction, reason):
    decision = decide(policy, host_state, guest_state, **knobs)
    assert (decision.direction, decision.reason) == (direction, reason), decision


def test_step_is_at_most_5_percent_of_memory_and_whole_pages():
    decision = decide("balance", host(0.0), guest(available=1900 * MIB))
    assert decision.direction == "inflate"
    assert decision.target_bytes == int(0.05 * 2 * GIB) // 4096 * 4096
    assert decision.detail["step_limited"] is True


def test_floor_bounds_the_step_exactly():
    floor = 400 * MIB
    decision = decide("balance", host(0.0), guest(available=floor + 10 * MIB))
    assert (decision.direction, decision.reason, decision.target_bytes) == ("inflate", "guest-floor", 10 * MIB)


def test_inflate_in_flight_counts_against_the_floor():
    # the guest still has to give 80 MiB of the last target: only 20 MiB above the floor remain
    decision = decide("mom", host(0.10), guest(available=int(0.4 * GIB) + 100 * MIB,
                                              balloon=400 * MIB, target=480 * MIB))
    assert decision.reason == "guest-floor"
    assert decision.target_bytes - 480 * MIB <= 20 * MIB


def test_balance_with_one_guest_moves_half_the_difference():
    total = 16 * GIB
    critical = int(0.05 * total)
    h = 100 * MIB
    g = 300 * MIB
    decision = decide("balance", HostMemory(total, critical + h), guest(available=400 * MIB + g),
                      max_step_ratio=1.0)
    assert decision.target_bytes == (g - h) // 2


def test_balance_n_guests_reach_equal_headroom_without_overshoot():
    total = 16 * GIB
    critical = int(0.05 * total)
    engine = PolicyEngine(PolicyConfig(policy="balance", max_step_ratio=1.0))
    guests = [GuestState(f"g{i}", 4 * GIB, 0, None, {STAT_AVAILABLE: 400 * MIB + g}, 1.0)
              for i, g in enumerate((900 * MIB, 800 * MIB, 700 * MIB))]
    h = 0
    decisions = engine.tick(1.0, HostMemory(total, critical + h), guests)
    gained = sum(d.target_bytes for d in decisions)
    after_host = h + gained
    for state, d in zip(guests, decisions, strict=True):
        after_guest = state.available - 400 * MIB - d.target_bytes
        assert abs(after_guest - after_host) <= 3 * 4096
    assert after_host == 600 * MIB // 4096 * 4096 or abs(after_host - 600 * MIB) <= 3 * 4096


# -- rails that need what came before: (name, ticks, direction, reason) -------------------
# Each tick: (now, host, guest). The last tick's decision is checked.

def stats(available=int(1.5 * GIB), **counters):
    tags = {"faults": STAT_MAJOR_FAULTS, "stalls": STAT_ALLOC_STALLS, "ooms": STAT_OOM_KILLS}
    out = {STAT_AVAILABLE: available}
    out.update({tags[k]: v for k, v in counters.items()})
    return out


BALLOONED = dict(balloon=512 * MIB, target=512 * MIB)
SEQUENCES = [
    ("thrashing after a shrink: major faults rising -> deflate now, even when the host is critical",
     "mom", [(0, host(0.03), guest(stats=stats(faults=1000), age=0.0, **BALLOONED)),
             (5, host(0.03), guest(stats=stats(faults=9000), age=0.0, **BALLOONED))],
     "deflate", "guest-pressure"),
    ("a few major faults are normal (page cache)",
     "mom", [(0, host(0.10), guest(stats=stats(faults=1000), age=0.0)),
             (5, host(0.10), guest(stats=stats(faults=1100), age=0.0))],
     "inflate", "host-pressure"),
    ("allocation stalls rising -> deflate now",
     "balance", [(0, host(0.0), guest(stats=stats(stalls=3), age=0.0, **BALLOONED)),
                 (5, host(0.0), guest(stats=stats(stalls=4), age=0.0, **BALLOONED))],
     "deflate", "guest-pressure"),
    ("an OOM kill -> deflate now",
     "balance", [(0, host(0.0), guest(stats=stats(ooms=0), age=0.0, **BALLOONED)),
                 (5, host(0.0), guest(stats=stats(ooms=1), age=0.0, **BALLOONED))],
     "deflate", "guest-pressure"),
    ("deflate-on-oom fired (the balloon shrank unasked) -> deflate now",
     "mom", [(0, host(0.10), guest(age=0.0, balloon=512 * MIB, target=512 * MIB)),
             (5, host(0.10), guest(age=0.0, balloon=500 * MIB, target=int(537.6 * MIB) // 4096 * 4096))],
     "deflate", "oom-deflate"),
    ("the same stats sample seen twice is not pressure twice",
     "mom", [(0, host(0.10), guest(stats=stats(stalls=1), age=0.0, **BALLOONED)),
             (5, host(0.10), guest(stats=stats(stalls=2), age=0.0, **BALLOONED)),
             (10, host(0.10), guest(stats=stats(stalls=2), age=5.0, **BALLOONED))],
     "hold", "blocked"),  # not a second deflate: the blocker (after the one deflate) has the word
    ("stats going stale after being fresh -> frozen",
     "balance", [(0, host(0.0), guest(age=0.0)), (20, host(0.0), guest(age=20.0))],
     "hold", "stale-stats"),
    ("opposite direction blocked for 100 s after a low-priority inflate",
     "mom", [(0, host(0.10), guest(age=0.0)),
             (50, host(0.50), guest(age=0.0, balloon=102 * MIB, target=int(0.05 * 2 * GIB) // 4096 * 4096))],
     "hold", "blocked"),
    ("... and allowed after it",
     "mom", [(0, host(0.10), guest(age=0.0)),
             (101, host(0.50), guest(age=0.0, balloon=102 * MIB, target=int(0.05 * 2 * GIB) // 4096 * 4096))],
     "deflate", "host-free"),
    ("a high-priority (critical) shrink is held only 10 s by a low-priority grow",
     "mom", [(0, host(0.50), guest(age=0.0, **BALLOONED)),
             (11, host(0.03), guest(age=0.0, balloon=int(409.6 * MIB) // 4096 * 4096,
                                    target=int(409.6 * MIB) // 4096 * 4096))],
     "inflate", "host-critical"),
    ("pressure deflate blocks inflating for the high block time",
     "mom", [(0, host(0.10), guest(stats=stats(stalls=1), age=0.0, **BALLOONED)),
             (5, host(0.10), guest(stats=stats(stalls=2), age=0.0, **BALLOONED)),
             (10, host(0.10), guest(stats=stats(stalls=2), age=0.0, balloon=int(307.2 * MIB) // 4096 * 4096,
                                    target=int(307.2 * MIB) // 4096 * 4096))],
     "hold", "blocked"),
    ("no-release: discards of this guest freed nothing -> squeezing it helps nobody",
     "mom", [(0, host(0.10), guest(age=0.0, discard_requested_bytes=0, discard_released_bytes=0)),
             (5, host(0.10), guest(age=0.0, balloon=100 * MIB, target=100 * MIB,
                                   discard_requested_bytes=100 * MIB, discard_released_bytes=0))],
     "hold", "no-release"),
    ("... released bytes count, not requested ones: a real release keeps it going",
     "mom", [(0, host(0.10), guest(age=0.0)),
             (5, host(0.10), guest(age=0.0, balloon=100 * MIB, target=100 * MIB,
                                   discard_requested_bytes=100 * MIB, discard_released_bytes=90 * MIB))],
     "inflate", "host-pressure"),
]


@pytest.mark.parametrize("name,policy,ticks,direction,reason", SEQUENCES, ids=[case[0] for case in SEQUENCES])
def test_sequence(name, policy, ticks, direction, reason):
    engine = PolicyEngine(PolicyConfig(policy=policy))
    for now, host_state, guest_state in ticks:
        (decision,) = engine.tick(float(now), host_state, [guest_state])
    assert (decision.direction, decision.reason) == (direction, reason), decision


def test_blind_shrink_is_refused():
    """The 128 MB case: host critical, a 4 GiB guest asked to give nearly everything.

    With fresh stats the floor stops the shrink; the moment the guest thrashes the
    balloon goes down, and without stats nothing happens at all.
    """
    cfg = PolicyConfig(policy="mom", max_step_ratio=1.0)
    engine = PolicyEngine(cfg)
    floor = cfg.floor_for(4 * GIB)
    shrunk = GuestState("vm", 4 * GIB, 3 * GIB, 3 * GIB, {STAT_AVAILABLE: floor, STAT_MAJOR_FAULTS: 10}, 0.0)
    (first,) = engine.tick(0.0, host(0.01), [shrunk])
    assert (first.direction, first.reason) == ("hold", "guest-floor")
    thrashing = GuestState("vm", 4 * GIB, 3 * GIB, 3 * GIB, {STAT_AVAILABLE: 20 * MIB, STAT_MAJOR_FAULTS: 90_000}, 0.0)
    (second,) = engine.tick(5.0, host(0.01), [thrashing])
    assert (second.direction, second.reason) == ("deflate", "guest-pressure")
    assert second.target_bytes <= 3 * GIB - floor + 20 * MIB
    blind = GuestState("new", 4 * GIB, 0, None, {}, None)
    (third,) = engine.tick(10.0, host(0.01), [blind])
    assert (third.direction, third.reason) == ("hold", "no-stats")


def test_history_records_changes_with_priority_and_forgotten_guests_leave():
    engine = PolicyEngine(PolicyConfig(policy="mom"))
    engine.tick(0.0, host(0.10), [guest(age=0.0)])
    assert [c.direction for c in engine.history] == ["inflate"]
    engine.tick(5.0, host(0.10), [])
    assert engine.last_decisions == {}


def test_every_reason_and_direction_is_declared():
    from host_daemon.policy import DIRECTIONS, REASONS

    cases = [(case[-2], case[-1]) for case in ONE_TICK + SEQUENCES]
    assert {direction for direction, _ in cases} <= set(DIRECTIONS)
    assert {reason for _, reason in cases} <= set(REASONS)


def test_no_release_holds_until_the_guest_touches_new_memory():
    engine = PolicyEngine(PolicyConfig(policy="mom", release_window=1))
    tick = lambda now, req, rel, resident: engine.tick(  # noqa: E731
        float(now), host(0.10), [guest(age=0.0, balloon=100 * MIB, target=100 * MIB, discard_requested_bytes=req,
                                       discard_released_bytes=rel, resident_bytes=resident)])[0]
    tick(0, 0, 0, 200 * MIB)
    assert tick(5, 100 * MIB, 0, 200 * MIB).reason == "no-release"
    assert tick(10, 100 * MIB, 0, 200 * MIB).reason == "no-release"  # the window is empty, the verdict stays
    assert tick(15, 100 * MIB, 0, 300 * MIB).reason == "host-pressure"  # new resident memory: try again
