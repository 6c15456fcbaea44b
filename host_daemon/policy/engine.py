"""The policy engine: one tick in, one decision per guest out, with the same rails for
every policy.

Order of the rails (each decision names the one that had the last word):

1. **Freeze** — a guest without a live session, that never sent STATS, or whose STATS
   are older than ``stale_intervals`` intervals keeps its target: the policy never acts
   blind (the "blind shrink" of a guest into thrashing starts exactly there).
2. **Guest pressure** — major faults rising faster than ``major_fault_rate``, allocation
   stalls or OOM kills rising, or the balloon shrinking without being asked
   (deflate-on-oom fired): deflate at once by ``pressure_deflate_ratio`` of its memory.
   This is never blocked, and it blocks inflating for the high-priority block time.
3. The policy's proposal (``rules.py``), then the bounds: ``max_memory`` (a minimum
   balloon), ``min_memory`` (a maximum balloon), the **available-memory floor** (an
   inflate may not take the guest's available memory below its floor; a guest already
   below it is deflated by the shortfall, high priority), **catching-up** (no further
   inflate while the guest lags the last target by more than a step), **no-release**
   (once discards of this guest released less than ``min_release_ratio`` of what was
   asked over ``release_window`` ticks, no inflate until its resident memory grows again:
   squeezing would cost the guest and give the host nothing — the policy trusts released
   bytes, never requested ones).
4. **Step limit** (``max_step_ratio`` of memory), **small change** (below
   ``min_change_ratio``: skipped), and the **BalloonBlocker** (opposite direction held
   for 100 s after a low-priority resize, 10 s after a high one; after an emergency —
   high-priority — deflate no inflate for ``block_low``, doubling on each repeat within
   an hour: policy/blocker.py).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .blocker import BalloonBlocker
from .config import PolicyConfig
from .model import (
    PAGE_SIZE,
    STAT_ALLOC_STALLS,
    STAT_MAJOR_FAULTS,
    STAT_OOM_KILLS,
    Decision,
    GuestState,
    HostMemory,
)
from .rules import RULES, Fleet, Proposal

HISTORY = 1024  # target changes kept for the admin API and tests


@dataclass(slots=True)
class _Memo:
    """What the engine remembers about one guest between ticks."""

    blocker: BalloonBlocker
    sample_at: float | None = None  # when the last STATS sample we saw was taken
    counters: dict[int, int] = field(default_factory=dict)
    signals: tuple[str, ...] = ()  # pressure seen in the newest sample
    balloon: int | None = None
    asked: int | None = None  # the target in force after our last decision
    requested: int = 0
    released: int = 0
    window: deque = field(default_factory=deque)  # (requested, released) deltas per tick
    stuck: bool = False  # inflating released (almost) nothing ...
    stuck_resident: int | None = None  # ... at this resident size


@dataclass(frozen=True, slots=True)
class Change:
    """One target change, for history: when, which way, at what priority, why."""

    at: float
    guest: str
    target_bytes: int
    direction: str
    priority: str
    reason: str

    def to_json(self) -> dict:
        return {"at": self.at, "guest": self.guest, "target_bytes": self.target_bytes,
                "direction": self.direction, "priority": self.priority, "reason": self.reason}


class PolicyEngine:
    def __init__(self, config: PolicyConfig) -> None:
        self.config = config
        self._memo: dict[str, _Memo] = {}
        self.last_decisions: dict[str, Decision] = {}
        self.last_host: HostMemory | None = None
        self.last_tick: float | None = None
        self.history: deque[Change] = deque(maxlen=HISTORY)

    def reconfigure(self, config: PolicyConfig) -> None:
        """New knobs (admin API, config reload); what was learned about guests is kept."""
        self.config = config
        for memo in self._memo.values():
            memo.blocker.block_seconds = config.block_seconds

    # -- the tick -----------------------------------------------------------------------

    def tick(self, now: float, host: HostMemory, guests: list[GuestState]) -> list[Decision]:
        cfg = self.config
        present = {g.id for g in guests}
        for gone in [gid for gid in self._memo if gid not in present]:
            del self._memo[gone]
            self.last_decisions.pop(gone, None)
        signals = {g.id: self._observe(g, now) for g in guests}
        eligible = [g for g in guests if self._frozen(g, now) is None and not signals[g.id]]
        fleet = Fleet(len(eligible), sum(g.available - cfg.floor_for(g.memory_bytes) for g in eligible))
        decisions = []
        for guest in guests:
            decision = self._decide(guest, signals[guest.id], fleet, host, now)
            memo = self._memo[guest.id]
            memo.asked = decision.target_bytes
            if decision.changed and decision.direction != "hold":
                memo.blocker.record(decision.direction, decision.priority, now)
                self.history.append(Change(now, guest.id, decision.target_bytes, decision.direction,
                                           decision.priority, decision.reason))
            self.last_decisions[guest.id] = decision
            decisions.append(decision)
        self.last_host = host
        self.last_tick = now
        return decisions

    def _observe(self, guest: GuestState, now: float) -> tuple[str, ...]:
        """Update the memo from this tick's inputs; return the pressure signals seen."""
        cfg = self.config
        memo = self._memo.get(guest.id)
        if memo is None:
            memo = self._memo[guest.id] = _Memo(BalloonBlocker(cfg.block_seconds))
            memo.requested, memo.released = guest.discard_requested_bytes, guest.discard_released_bytes
        signals: list[str] = []
        if guest.stats_age is not None:
            sampled = now - guest.stats_age
            if memo.sample_at is None or sampled > memo.sample_at + 1e-6:  # a new STATS sample
                if memo.sample_at is not None:
                    elapsed = max(sampled - memo.sample_at, 1e-3)
                    faults = _rise(guest.stats, memo.counters, STAT_MAJOR_FAULTS)
                    if faults / elapsed > cfg.major_fault_rate:
                        signals.append("major-faults")
                    if _rise(guest.stats, memo.counters, STAT_ALLOC_STALLS) > 0:
                        signals.append("alloc-stalls")
                    if _rise(guest.stats, memo.counters, STAT_OOM_KILLS) > 0:
                        signals.append("oom-kills")
                memo.sample_at = sampled
                memo.counters = dict(guest.stats)
        asked = guest.current_target if memo.asked is None else min(memo.asked, guest.current_target)
        if memo.balloon is not None and guest.balloon_bytes < min(memo.balloon, asked):
            signals.append("oom-deflate")
        memo.balloon = guest.balloon_bytes
        requested = guest.discard_requested_bytes - memo.requested
        released = guest.discard_released_bytes - memo.released
        memo.requested, memo.released = guest.discard_requested_bytes, guest.discard_released_bytes
        memo.window.append((max(0, requested), max(0, released)))
        while len(memo.window) > cfg.release_window:
            memo.window.popleft()
        memo.signals = tuple(signals)
        return memo.signals

    def _frozen(self, guest: GuestState, now: float) -> str | None:
        if not guest.connected:
            return "disconnected"
        if guest.stats_age is None or guest.available is None:
            return "no-stats"
        if guest.stats_age > self.config.stale_intervals * self.config.interval:
            return "stale-stats"
        return None

    # -- one guest ----------------------------------------------------------------------

    def _decide(self, guest: GuestState, signals: tuple[str, ...], fleet: Fleet, host: HostMemory,
                now: float) -> Decision:
        cfg = self.config
        current = guest.current_target
        memory = guest.memory_bytes
        base = {"memory_bytes": memory, "balloon_bytes": guest.balloon_bytes, "target_bytes": guest.target_bytes,
                "available_bytes": guest.available, "stats_age_s": _round(guest.stats_age),
                "host_available_bytes": host.available_bytes, "host_total_bytes": host.total_bytes}
        if cfg.policy == "manual":
            return _hold(guest, "manual", "manual", {**base, "signals": list(signals)})
        frozen = self._frozen(guest, now)
        if frozen is not None:
            return _hold(guest, frozen, "rail:freeze", base)
        memo = self._memo[guest.id]
        floor = cfg.floor_for(memory)
        base["floor_bytes"] = floor
        if signals:
            start = min(current, guest.balloon_bytes)
            shortfall = max(0, floor - guest.available)
            want = _pages(max(0, start - max(int(cfg.pressure_deflate_ratio * memory), shortfall)))
            reason = "oom-deflate" if signals == ("oom-deflate",) else "guest-pressure"
            return _decision(guest, want, reason, "rail:pressure", "high", {**base, "signals": list(signals)})

        proposal: Proposal = RULES[cfg.policy](cfg, host, guest, fleet)
        want, reason, rule, priority = proposal.want, proposal.reason, cfg.policy, proposal.priority
        detail = {**base, **(proposal.detail or {})}
        want = max(0, min(want, memory))
        if guest.max_memory is not None and want < memory - guest.max_memory:
            want, reason, rule = memory - guest.max_memory, "max-memory", "rail:max-memory"
        if guest.min_memory is not None and want > max(0, memory - guest.min_memory):
            want, reason, rule = max(0, memory - guest.min_memory), "min-memory", "rail:min-memory"
        step = int(cfg.max_step_ratio * memory)
        if want > current:
            pending = max(0, current - guest.balloon_bytes)  # asked for, not yet taken from the guest
            room = guest.available - pending - floor
            if room <= 0 or want > current + room:
                want, reason, rule = current + max(0, room), "guest-floor", "rail:floor"
                detail["room_bytes"] = room
            if want > current and guest.balloon_bytes < current - step:
                return _hold(guest, "catching-up", "rail:catching-up", detail)
            asked = sum(r for r, _ in memo.window)
            got = sum(r for _, r in memo.window)
            if want > current and asked >= cfg.release_min_bytes and got < cfg.min_release_ratio * asked:
                memo.stuck, memo.stuck_resident = True, guest.resident_bytes
            resident = guest.resident_bytes
            if memo.stuck and memo.stuck_resident is not None and resident is not None \
                    and resident > memo.stuck_resident + cfg.release_min_bytes:
                memo.stuck = False  # the guest touched new memory: a balloon may free some again
            if want > current and memo.stuck:
                detail.update(window_requested_bytes=asked, window_released_bytes=got,
                              stuck_resident_bytes=memo.stuck_resident)
                return _hold(guest, "no-release", "rail:no-release", detail)
        if guest.available < floor and guest.balloon_bytes > 0:
            restore = max(0, min(current, guest.balloon_bytes) - (floor - guest.available))
            if restore < want:
                want, reason, rule, priority = restore, "guest-floor", "rail:floor", "high"
        if abs(want - current) > step:
            want = current + step if want > current else current - step
            detail["step_limited"] = True
        want = _pages(want)
        if want != current and abs(want - current) < cfg.min_change_ratio * memory:
            if rule == "rail:floor":  # the floor left no room worth a step
                return _hold(guest, "guest-floor", rule, {**detail, "wanted_bytes": want})
            return _hold(guest, "small-change", "rail:small-change", {**detail, "wanted_bytes": want})
        if want != current:
            direction = "inflate" if want > current else "deflate"
            blocker = memo.blocker
            wait = blocker.blocked_for(direction, priority, now)
            if wait > 0:
                detail = {**detail, "wanted_bytes": want, "blocked_for_s": round(wait, 3), "wanted": direction}
                if direction == "inflate" and blocker.backoff_left(now) >= wait:  # the emergency backoff holds it
                    detail.update(backoff_s=blocker.backoff, emergencies=blocker.emergencies)
                return _hold(guest, "blocked", "rail:blocker", detail)
        return _decision(guest, want, reason, rule, priority, detail)


def _rise(stats, previous: dict[int, int], tag: int) -> int:
    if tag not in stats or tag not in previous:
        return 0
    return max(0, int(stats[tag]) - int(previous[tag]))


def _pages(size: int) -> int:
    return int(size) // PAGE_SIZE * PAGE_SIZE


def _round(value):
    return None if value is None else round(value, 3)


def _hold(guest: GuestState, reason: str, rule: str, detail: dict) -> Decision:
    current = guest.current_target
    return Decision(guest.id, current, current, "hold", reason, rule, "low", detail)


def _decision(guest: GuestState, want: int, reason: str, rule: str, priority: str, detail: dict) -> Decision:
    current = guest.current_target
    direction = "inflate" if want > current else "deflate" if want < current else "hold"
    return Decision(guest.id, want, current, direction, reason, rule, priority, detail)
