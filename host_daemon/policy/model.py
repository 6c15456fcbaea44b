"""What the policy sees and what it decides: plain immutable values, no I/O.

Guest stats are the virtio-balloon stats queue's ``{tag, value}`` pairs (virtio spec
5.5.6.3; tags 10..15 since Linux 6.12), kept as the guest sent them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from shared.vocabulary import (  # noqa: F401  (re-exported for the policy modules)
    PAGE_SIZE,
    STAT_ALLOC_STALLS,
    STAT_AVAILABLE,
    STAT_CACHES,
    STAT_FREE,
    STAT_MAJOR_FAULTS,
    STAT_OOM_KILLS,
    STAT_TOTAL,
)

#: Every value of balloon_policy_decisions_total{direction}.
DIRECTIONS = ("inflate", "deflate", "hold")
#: Every value of balloon_policy_decisions_total{reason} (a fixed set: bounded series).
REASONS = (
    "manual",            # --policy manual: the admin API sets targets, the policy only watches
    "host-pressure",     # mom: host free below the pressure band -> shrink guests
    "host-critical",     # mom: host free below the critical band -> shrink, high priority
    "host-free",         # mom: host not under pressure -> let guests grow
    "balance",           # balance: move towards equal headroom of guest and host
    "balanced",          # balance: the move would be <= 1% of both headrooms
    "small-change",      # the change is below min_change_ratio of the guest's memory
    "guest-pressure",    # major faults or allocation stalls rising, or an OOM kill: deflate now
    "oom-deflate",       # the guest deflated by itself (deflate-on-oom): deflate now
    "guest-floor",       # inflating would take the guest below its available-memory floor
    "min-memory",        # the inventory's min_memory caps the balloon
    "max-memory",        # the inventory's max_memory forces a minimum balloon
    "blocked",           # the opposite direction changed too recently (BalloonBlocker)
    "catching-up",       # the guest has not yet reached the last target: no further inflate
    "no-release",        # recent discards released (almost) nothing: squeezing would not help the host
    "stale-stats",       # stats older than stale_intervals intervals: target frozen
    "no-stats",          # the guest never sent STATS: target frozen (no blind shrink)
    "disconnected",      # no live session: target frozen
)


@dataclass(frozen=True, slots=True)
class HostMemory:
    """The host's memory as one of hostmem.py's sources measured it.

    ``total_bytes`` is what "free %" is relative to: MemTotal, a cgroup's memory.max,
    or the guest-memory budget. ``available_bytes`` may be negative (over budget).
    """

    total_bytes: int
    available_bytes: int
    pressure_some: float = 0.0  # PSI avg10 as a ratio 0..1
    pressure_full: float = 0.0
    source: str = "budget"

    @property
    def free_ratio(self) -> float:
        return self.available_bytes / self.total_bytes if self.total_bytes > 0 else 0.0


@dataclass(frozen=True, slots=True)
class GuestState:
    """One guest as the host knows it at this tick (sizes in bytes)."""

    id: str
    memory_bytes: int
    balloon_bytes: int  # pages in the balloon now: acked INFLATEs minus DEFLATEs
    target_bytes: int | None = None  # last TARGET asked for; None: never
    stats: Mapping[int, int] = field(default_factory=dict)
    stats_age: float | None = None  # seconds since the last STATS; None: never
    connected: bool = True
    min_memory: int | None = None  # inventory: the balloon never leaves less than this
    max_memory: int | None = None  # inventory: the guest never gets more than this
    discard_requested_bytes: int = 0  # cumulative, from reclaim.py's proof of reclaim
    discard_released_bytes: int = 0
    resident_bytes: int | None = None  # st_blocks of the RAM file (None: no RAM file)

    @property
    def current_target(self) -> int:
        return self.balloon_bytes if self.target_bytes is None else self.target_bytes

    @property
    def available(self) -> int | None:
        """MemAvailable as the guest says (tag 6), else free + caches (as ChromeOS does)."""
        stats = self.stats
        if STAT_AVAILABLE in stats:
            return int(stats[STAT_AVAILABLE])
        if STAT_FREE in stats:
            return int(stats[STAT_FREE]) + int(stats.get(STAT_CACHES, 0))
        return None


@dataclass(frozen=True, slots=True)
class Decision:
    """One guest's outcome of one tick: the balloon size to ask for, and why."""

    guest: str
    target_bytes: int
    previous_bytes: int
    direction: str  # inflate | deflate | hold
    reason: str  # one of REASONS
    rule: str  # the policy or rail that had the last word, e.g. "balance" or "rail:floor"
    priority: str = "low"  # low | high (BalloonBlocker)
    detail: Mapping[str, object] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        return self.target_bytes != self.previous_bytes

    def to_json(self) -> dict:
        return {"guest": self.guest, "target_bytes": self.target_bytes, "previous_bytes": self.previous_bytes,
                "direction": self.direction, "reason": self.reason, "rule": self.rule,
                "priority": self.priority, "detail": dict(self.detail)}
