"""Policy simulator: replay scenarios through the same policy core the host runs.

    python -m bench.policy                 # every scenario, PNGs into docs/policy/
    python -m bench.policy --scenario burst --out /tmp/plots
    python -m bench.policy --no-plot       # the text summary only (matplotlib not needed)
    python -m bench.policy --quick         # the same (what tests/bench runs: docs/ stays as it is)

Each scenario is a small model of guests and a host, stepped once per policy interval:
a guest's workload sets how much memory it uses; its balloon follows the target (up to
``INFLATE_RATE`` per second, as a real driver takes time to find pages); memory it
touched stays resident until a balloon takes it (no free page reporting: the balloon is
the only way back); when the workload wants more than balloon and floor leave, the guest
deflates on OOM (VIRTIO_BALLOON_F_DEFLATE_ON_OOM) and its allocation stalls rise; with
almost nothing free it thrashes (major faults). The host sees exactly what the daemon
sees: STATS (when the guest reports), balloon size, target, resident bytes and what each
discard released. Nothing here is a second copy of a rule: decisions come from
``host_daemon.policy.PolicyEngine``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

from host_daemon.policy import GuestState, HostMemory, PolicyConfig, PolicyEngine
from host_daemon.policy.model import STAT_ALLOC_STALLS, STAT_AVAILABLE, STAT_MAJOR_FAULTS

MIB = 1 << 20
GIB = 1 << 30
INFLATE_RATE = 256 * MIB  # bytes per second a guest can move its balloon
THRASH_FREE = 0.03  # below this share of memory free, a guest thrashes (major faults)


@dataclass
class SimGuest:
    id: str
    memory: int
    demand: callable  # t -> bytes the workload wants to use
    reports: callable = staticmethod(lambda t: True)  # t -> does the guest send STATS now
    touched_share: float = 0.9  # a booted guest has touched most of its memory once (caches, boot)
    used: int = 0
    balloon: int = 0
    touched: int = -1
    stalls: int = 0
    faults: int = 0
    stats: dict = field(default_factory=dict)
    stats_at: float | None = None
    requested: int = 0
    released: int = 0

    def step(self, t: float, dt: float, target: int | None) -> None:
        if self.touched < 0:
            self.touched = int(self.touched_share * self.memory)
        want = self.demand(t)
        goal = self.balloon if target is None else target
        if goal > self.balloon:  # inflate: only free pages can go into the balloon
            free = self.memory - self.used - self.balloon
            move = min(goal - self.balloon, int(INFLATE_RATE * dt), max(0, free))
            self.balloon += move
            gone = min(move, max(0, self.touched - self.used))  # touched free pages go first
            self.touched -= gone
            self.requested += move
            self.released += gone
        elif goal < self.balloon:
            self.balloon -= min(self.balloon - goal, int(INFLATE_RATE * dt))
        room = self.memory - self.balloon
        if want > room:  # OOM: the guest deflates by itself, 1 MiB per notification, and stalls
            give = min(self.balloon, want - room)
            self.balloon -= give
            self.stalls += 1
            room = self.memory - self.balloon
        self.used = min(want, room)
        self.touched = max(self.touched, self.used)
        if self.memory - self.used - self.balloon < THRASH_FREE * self.memory:
            self.faults += 5000
        if self.reports(t):
            self.stats = {STAT_AVAILABLE: self.memory - self.used - self.balloon,
                          STAT_ALLOC_STALLS: self.stalls, STAT_MAJOR_FAULTS: self.faults}
            self.stats_at = t

    @property
    def resident(self) -> int:
        return self.touched  # used pages plus free ones touched before (no free page reporting)

    @property
    def free(self) -> int:
        return self.memory - self.used - self.balloon


@dataclass
class Scenario:
    name: str
    title: str
    policy: str
    guests: list[SimGuest]
    host_total: int
    host_other: callable  # t -> host bytes used outside the guests
    seconds: float = 300.0
    knobs: dict = field(default_factory=dict)
    budget: int | None = None  # host = a guest-memory budget instead of total - other
    interval: float | None = None  # this scenario's policy interval (None: run()'s)


def _constant(value):
    return lambda t: value


def _ramp(start, end, t0, t1):
    return lambda t: start if t < t0 else end if t > t1 else int(start + (end - start) * (t - t0) / (t1 - t0))


def scenarios() -> list[Scenario]:
    g = 4 * GIB
    return [
        Scenario("host-pressure", "Host pressure rising (mom): guests shrink fairly, then grow back slowly", "mom",
                 [SimGuest(f"vm{i}", g, _constant(int(share * g))) for i, share in enumerate((0.3, 0.45, 0.6))],
                 host_total=16 * GIB,
                 host_other=lambda t: _ramp(2 * GIB, 9 * GIB, 30, 150)(t) if t < 200 else 2 * GIB),
        Scenario("burst", "One guest bursting while two idle (balance, 10 GiB guest budget)", "balance",
                 [SimGuest("idle1", g, lambda t: int(0.25 * g)), SimGuest("idle2", g, lambda t: int(0.4 * g)),
                  SimGuest("burst", g, lambda t: int((0.85 if 80 <= t < 160 else 0.2) * g))],
                 host_total=10 * GIB, host_other=lambda t: 0, budget=10 * GIB,
                 knobs={"guest_floor": 256 * MIB}),
        Scenario("thrash", "A guest's demand grows after a shrink: pressure deflates it at once (balance)", "balance",
                 [SimGuest("grower", g, lambda t: int((0.2 if t < 100 else min(0.8, 0.2 + 0.03 * (t - 100))) * g)),
                  SimGuest("steady", g, lambda t: int(0.3 * g))],
                 host_total=6 * GIB, host_other=lambda t: 0, budget=6 * GIB,
                 knobs={"guest_floor": 128 * MIB, "block_low": 30.0}),
        Scenario("stale", "Stats stop at t=100 s: that guest's target freezes (mom)", "mom",
                 [SimGuest("talker", g, lambda t: int(0.3 * g)),
                  SimGuest("silent", g, lambda t: int(0.3 * g), reports=lambda t: t < 100)],
                 host_total=12 * GIB, host_other=lambda t: _ramp(2 * GIB, 8 * GIB, 20, 200)(t)),
        Scenario("never-reports", "A guest that never reports is never shrunk blind (balance)", "balance",
                 [SimGuest("reporter", g, lambda t: int(0.3 * g)),
                  SimGuest("mute", g, lambda t: int(0.3 * g), reports=lambda t: False)],
                 host_total=5 * GIB, host_other=lambda t: 0, budget=5 * GIB,
                 knobs={"guest_floor": 256 * MIB}),
        # make demo's shape: three 256 MiB guests under 700 MiB and a burst
        # guest that takes half its memory for half of every 23 s. Each burst below the floor
        # is an emergency deflate; the growing backoff keeps the policy from squeezing it again
        # right after (at most one direction change per guest in any 90 s once settled).
        Scenario("bursts", "A guest bursting every 23 s among two quiet ones (balance, 700 MiB budget)",
                 "balance",
                 [SimGuest("idle", 256 * MIB, _constant(24 * MIB)),
                  SimGuest("churn", 256 * MIB, lambda t: int((0.5 + 0.1 * ((t // 23) % 2)) * 256 * MIB)),
                  SimGuest("burst", 256 * MIB, lambda t: int((0.75 if t % 23 < 11.5 else 0.1) * 256 * MIB))],
                 host_total=700 * MIB, host_other=lambda t: 0, budget=700 * MIB, seconds=1200.0,
                 knobs={"guest_floor": 32 * MIB}),
    ]


def direction_changes(trace: Trace, guest: str) -> list[float]:
    """Times at which ``guest``'s target turned around (an inflate after a deflate or back)."""
    turns, last = [], 0
    targets = trace.balloon[guest]
    for at, before, after in zip(trace.t[1:], targets, targets[1:], strict=False):
        step = (after > before) - (after < before)
        if step and last and step != last:
            turns.append(at)
        last = step or last
    return turns


@dataclass
class Trace:
    t: list[float] = field(default_factory=list)
    host_available: list[int] = field(default_factory=list)
    host_total: int = 0
    balloon: dict[str, list[int]] = field(default_factory=dict)
    free: dict[str, list[int]] = field(default_factory=dict)
    floor: dict[str, int] = field(default_factory=dict)
    reasons: dict[str, list[str]] = field(default_factory=dict)


def run(scenario: Scenario, interval: float | None = None) -> Trace:
    interval = interval or scenario.interval or 5.0
    cfg = PolicyConfig(policy=scenario.policy, interval=interval, **scenario.knobs)
    engine = PolicyEngine(cfg)
    trace = Trace(host_total=scenario.host_total)
    targets: dict[str, int | None] = {g.id: None for g in scenario.guests}
    for guest in scenario.guests:
        trace.balloon[guest.id], trace.free[guest.id], trace.reasons[guest.id] = [], [], []
        trace.floor[guest.id] = cfg.floor_for(guest.memory)
    t = 0.0
    while t <= scenario.seconds:
        for guest in scenario.guests:
            guest.step(t, interval, targets[guest.id])
        resident = sum(g.resident for g in scenario.guests)
        if scenario.budget is not None:
            host = HostMemory(scenario.budget, scenario.budget - resident)
        else:
            host = HostMemory(scenario.host_total, scenario.host_total - scenario.host_other(t) - resident,
                              source="meminfo")
        states = [GuestState(g.id, g.memory, g.balloon, targets[g.id], dict(g.stats),
                             None if g.stats_at is None else t - g.stats_at,
                             discard_requested_bytes=g.requested, discard_released_bytes=g.released,
                             resident_bytes=g.resident) for g in scenario.guests]
        for decision in engine.tick(t, host, states):
            targets[decision.guest] = decision.target_bytes
            trace.reasons[decision.guest].append(decision.reason)
        trace.t.append(t)
        trace.host_available.append(host.available_bytes)
        for guest in scenario.guests:
            trace.balloon[guest.id].append(targets[guest.id] or 0)
            trace.free[guest.id].append(guest.free)
        t += interval
    return trace


def plot(scenario: Scenario, trace: Trace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    gib = float(GIB)
    for gid, values in trace.balloon.items():
        axes[0].plot(trace.t, [v / gib for v in values], label=gid, linewidth=2)
    axes[0].set_ylabel("balloon target (GiB)")
    axes[0].legend(loc="best", fontsize=9)
    for index, (gid, values) in enumerate(trace.free.items()):
        line, = axes[1].plot(trace.t, [v / gib for v in values], label=f"{gid} free", linewidth=2)
        axes[1].axhline(trace.floor[gid] / gib, color=line.get_color(), linestyle=":", linewidth=1,
                        label=f"{gid} floor" if index == 0 or trace.floor[gid] != next(iter(trace.floor.values()))
                        else None)
    axes[1].set_ylabel("guest free (GiB)")
    axes[1].legend(loc="best", fontsize=9)
    axes[2].plot(trace.t, [v / gib for v in trace.host_available], color="black", linewidth=2,
                 label="host available")
    label = "budget" if scenario.budget else "host total"
    axes[2].axhline(0, color="red", linestyle="--", linewidth=1, label="budget exhausted" if scenario.budget else "0")
    if scenario.policy == "mom":
        cfg = PolicyConfig()
        for ratio, name in ((cfg.mom_pressure, "pressure (20 %)"), (cfg.mom_critical, "critical (5 %)")):
            axes[2].axhline(ratio * trace.host_total / gib, linestyle=":", color="gray", linewidth=1)
            axes[2].text(trace.t[-1], ratio * trace.host_total / gib, f" {name}", va="bottom", ha="right",
                         fontsize=8, color="gray")
    else:
        cfg = PolicyConfig()
        axes[2].axhline(cfg.host_critical_ratio * trace.host_total / gib, linestyle=":", color="gray", linewidth=1,
                        label="host critical (5 %)")
    axes[2].set_ylabel(f"host available (GiB of {trace.host_total / gib:.0f} {label})")
    axes[2].set_xlabel("time (s)")
    axes[2].legend(loc="best", fontsize=9)
    for axis in axes:
        axis.grid(True, alpha=0.3)
    fig.suptitle(f"{scenario.name}: {scenario.title}", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def summary(scenario: Scenario, trace: Trace) -> str:
    lines = [f"{scenario.name} ({scenario.policy}): {scenario.title}"]
    for gid in trace.balloon:
        reasons = trace.reasons[gid]
        counts = {r: reasons.count(r) for r in dict.fromkeys(reasons)}
        below = sum(1 for f in trace.free[gid] if f < trace.floor[gid])
        lines.append(f"  {gid:9} max balloon {max(trace.balloon[gid]) / GIB:5.2f} GiB  "
                     f"min free {min(trace.free[gid]) / GIB:5.2f} GiB (floor {trace.floor[gid] / GIB:.2f}, "
                     f"{below} ticks below)  direction changes {len(direction_changes(trace, gid))}  "
                     f"reasons {counts}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.policy", description=__doc__.split("\n")[0])
    parser.add_argument("--scenario", action="append", help="run only these (repeatable)")
    parser.add_argument("--out", type=Path, default=Path("docs/policy"), help="where the PNGs go")
    parser.add_argument("--no-plot", action="store_true", help="print the summary only")
    parser.add_argument("--quick", action="store_true", help="smoke test: the summary only, no pictures")
    parser.add_argument("--interval", type=float, default=None,
                        help="policy interval in seconds (default: the scenario's, else 5)")
    args = parser.parse_args(argv)
    chosen = scenarios()
    known = [s.name for s in chosen]
    if args.scenario:
        unknown = set(args.scenario) - set(known)
        if unknown:
            parser.error(f"unknown scenario {', '.join(sorted(unknown))} (known: {', '.join(known)})")
        chosen = [s for s in chosen if s.name in args.scenario]
    for scenario in chosen:
        trace = run(scenario, args.interval)
        print(summary(scenario, trace))
        if not (args.no_plot or args.quick):
            path = args.out / f"{scenario.name}.png"
            plot(scenario, trace, path)
            print(f"  -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
