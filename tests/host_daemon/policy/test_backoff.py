"""A guest that needed an emergency deflate is not squeezed again for a growing time."""

from __future__ import annotations

from bench import policy as sim
from host_daemon.policy import BalloonBlocker, PolicyConfig, PolicyEngine
from host_daemon.policy.blocker import CALM_SECONDS
from host_daemon.policy.model import STAT_ALLOC_STALLS, STAT_AVAILABLE, GuestState, HostMemory

MIB = 1 << 20
BLOCK = {"low": 100.0, "high": 10.0}


def test_the_backoff_doubles_on_each_repeat_and_resets_after_a_calm_hour():
    b = BalloonBlocker(BLOCK)
    b.record("inflate", "low", 0.0)
    b.record("deflate", "high", 50.0)  # the guest gasped
    assert b.blocked_for("inflate", "low", 61.0) == 89.0  # block_low from the emergency, not block_high
    assert b.blocked_for("inflate", "high", 61.0) == 89.0  # no squeeze at any priority
    assert b.blocked_for("deflate", "high", 61.0) == 0.0  # another emergency deflate is never held
    b.record("deflate", "high", 55.0)  # the same emergency, deflating further: not a repeat
    assert (b.emergencies, b.backoff) == (1, 100.0)
    b.record("inflate", "low", 160.0)  # squeezed again ...
    b.record("deflate", "high", 200.0)  # ... and gasped again: twice as long
    assert (b.emergencies, b.backoff) == (2, 200.0) and b.blocked_for("inflate", "low", 200.0) == 200.0
    b.record("inflate", "low", 400.0)
    b.record("deflate", "high", 450.0)
    assert (b.emergencies, b.backoff) == (3, 400.0)
    b.record("inflate", "low", 900.0)
    b.record("deflate", "high", 450.0 + CALM_SECONDS)  # an hour later: a first emergency again
    assert (b.emergencies, b.backoff) == (1, 100.0)


def _guest(t: float, balloon: int, stalls: int) -> GuestState:
    return GuestState("g", 2048 * MIB, balloon, balloon, {STAT_AVAILABLE: 1500 * MIB, STAT_ALLOC_STALLS: stalls},
                      0.0)


def test_the_policy_api_says_why_an_inflate_is_held():
    engine = PolicyEngine(PolicyConfig(policy="mom"))
    pressure = HostMemory(16 << 30, int(0.10 * (16 << 30)))  # mom: below 20 % free, shrink every guest
    engine.tick(0.0, pressure, [_guest(0.0, 400 * MIB, 1)])
    (gasp,) = engine.tick(5.0, pressure, [_guest(5.0, 400 * MIB, 2)])  # stalls rose: emergency deflate
    assert (gasp.direction, gasp.priority) == ("deflate", "high")
    (held,) = engine.tick(20.0, pressure, [_guest(20.0, gasp.target_bytes, 2)])
    assert (held.direction, held.reason) == ("hold", "blocked")  # 15 s later: block_high alone would allow it
    assert held.detail["backoff_s"] == 100.0 and held.detail["emergencies"] == 1
    assert held.detail["blocked_for_s"] == 85.0


def test_bursts_scenario_turns_a_guest_around_at_most_once_in_any_90_s_once_settled():
    """bench.policy's bursts: a guest taking 75 % of its memory for half of every 23 s under a
    700 MiB budget. Without the backoff it was squeezed 10 s after each gasp (34 direction
    changes, 15 emergency deflates in 20 minutes); the first two emergencies teach the backoff."""
    scenario = next(s for s in sim.scenarios() if s.name == "bursts")
    trace = sim.run(scenario)
    for guest in trace.balloon:
        turns = [t for t in sim.direction_changes(trace, guest) if t >= 360.0]
        close = [(a, b) for a, b in zip(turns, turns[1:], strict=False) if b - a < 90.0]
        assert close == [], (guest, turns)
    assert 1 <= trace.reasons["burst"].count("guest-pressure") <= 3
    assert len(sim.direction_changes(trace, "burst")) <= 8
