"""The policies proper: each proposes a balloon size for one guest; the engine's rails
then bound it. Pure functions of (config, host, guest, view of all guests).

A proposal is ``(want_bytes, reason, priority, detail)``; ``want`` is the whole balloon,
like a TARGET.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import PolicyConfig
from .model import GuestState, HostMemory


@dataclass(frozen=True, slots=True)
class Proposal:
    want: int
    reason: str
    priority: str = "low"
    detail: dict | None = None


@dataclass(frozen=True, slots=True)
class Fleet:
    """What a rule may know about the other guests this tick (balance needs the sums)."""

    count: int  # guests the policy may act on this tick (live, fresh stats, no pressure)
    headroom_sum: int  # the sum of their available memory above their floors


def mom(cfg: PolicyConfig, host: HostMemory, guest: GuestState, fleet: Fleet) -> Proposal:
    """oVirt MOM ``balloon.rules``: under host pressure shrink every guest by the same share
    of its memory (fair), otherwise let each grow by that share (slowly, one step a tick).

    MOM's critical case forces guests below their free target (into swap); here the
    guest floor is a rail every policy obeys, so critical only raises the priority.
    """
    step = int(cfg.max_step_ratio * guest.memory_bytes)
    free = host.free_ratio
    detail = {"host_free_ratio": round(free, 4), "pressure_below": cfg.mom_pressure,
              "critical_below": cfg.mom_critical, "step_bytes": step}
    current = guest.current_target
    if free < cfg.mom_critical:
        return Proposal(current + step, "host-critical", "high", detail)
    if free < cfg.mom_pressure:
        return Proposal(current + step, "host-pressure", "low", detail)
    return Proposal(current - step, "host-free", "low", detail)


def balance(cfg: PolicyConfig, host: HostMemory, guest: GuestState, fleet: Fleet) -> Proposal:
    """ChromeOS ``BalanceAvailableBalloonPolicy``, for N guests.

    Headroom is available memory above the critical level: the host's (``available -
    host_critical_ratio * total``) and each guest's (``available - floor``). With one guest
    ChromeOS moves half the difference, which is exactly the move after which both have
    the same headroom. With N guests the same point is reached by moving each guest by
    ``g_i - h - D`` where ``D = (sum g - N h) / (N + 1)`` is what the host gains. Acts only
    when the move exceeds ``balance_act_ratio`` (1 %) of either headroom.
    """
    host_headroom = host.available_bytes - int(cfg.host_critical_ratio * host.total_bytes)
    guest_headroom = guest.available - cfg.floor_for(guest.memory_bytes)
    count = max(1, fleet.count)
    gained = (fleet.headroom_sum - count * host_headroom) / (count + 1)
    move = int(guest_headroom - host_headroom - gained)
    detail = {"guest_headroom_bytes": guest_headroom, "host_headroom_bytes": host_headroom,
              "host_gain_bytes": int(gained), "move_bytes": move, "guests": count}
    current = guest.current_target
    ratio = cfg.balance_act_ratio
    if abs(move) <= ratio * abs(guest_headroom) and abs(move) <= ratio * abs(host_headroom):
        return Proposal(current, "balanced", "low", detail)
    priority = "high" if host_headroom < 0 and move > 0 else "low"
    return Proposal(current + move, "balance", priority, detail)


RULES = {"mom": mom, "balance": balance}
