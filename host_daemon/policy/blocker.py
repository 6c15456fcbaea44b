"""Opposite-direction blocking, after ChromeOS concierge's ``BalloonBlocker``, plus a
growing backoff after emergency deflates.

Every resize carries a priority. A resize in one direction blocks resizes in the other
direction of the same or lower priority for that priority's block time (ChromeOS: 100 s
for low, 10 s for high), so a balloon never oscillates; a higher priority is never held
back by a lower one. Times are the caller's clock (seconds), nothing here reads one.

An **emergency** is a high-priority deflate (the guest showed pressure, fired
deflate-on-oom or fell below its floor). After one, the guest is not squeezed again — no
inflate at any priority — for ``backoff``: the low block time after the first emergency,
doubled for each repeat (an emergency after the guest was squeezed again) within an hour,
at most an hour, back to the low block time after an hour without one. A bursting guest
would otherwise be inflated, gasp and deflate, and be inflated again ``block_high`` later;
host pressure then falls on the guests that do not gasp.
"""

from __future__ import annotations

PRIORITIES = ("low", "high")
_RANK = {name: rank for rank, name in enumerate(PRIORITIES)}
_OPPOSITE = {"inflate": "deflate", "deflate": "inflate"}
CALM_SECONDS = 3600.0  # an hour without an emergency resets the backoff
MAX_BACKOFF = 3600.0


class BalloonBlocker:
    def __init__(self, block_seconds: dict[str, float]) -> None:
        self.block_seconds = dict(block_seconds)
        self._last: dict[tuple[str, str], float] = {}  # (direction, priority) -> time of the last resize
        self.emergencies = 0  # emergency deflates in a row, each within an hour of the one before
        self.backoff = 0.0  # how long the last emergency holds inflates back
        self._emergency_at: float | None = None
        self._squeezed_since = False  # an inflate came after the last emergency (so the next one is a repeat)
        self._no_inflate_until = 0.0

    def blocked_for(self, direction: str, priority: str, now: float) -> float:
        """Seconds until a ``direction`` resize at ``priority`` is allowed (0: allowed now)."""
        opposite = _OPPOSITE[direction]
        wait = 0.0
        for other in PRIORITIES[_RANK[priority]:]:  # same or higher priority blocks us
            at = self._last.get((opposite, other))
            if at is not None:
                wait = max(wait, at + self.block_seconds[other] - now)
        if direction == "inflate":
            wait = max(wait, self.backoff_left(now))
        return max(0.0, wait)

    def backoff_left(self, now: float) -> float:
        """Seconds the emergency backoff still holds inflates back (0: none)."""
        return max(0.0, self._no_inflate_until - now)

    def record(self, direction: str, priority: str, now: float) -> None:
        self._last[(direction, priority)] = now
        if direction == "inflate":
            self._squeezed_since = True
        elif priority == "high":
            self._emergency(now)

    def _emergency(self, now: float) -> None:
        calm = self._emergency_at is None or now - self._emergency_at >= CALM_SECONDS
        if calm:
            self.emergencies = 1
        elif self._squeezed_since:  # squeezed again after the last one and gasped again: a repeat
            self.emergencies += 1
        # else: more deflating within the same emergency, which keeps its backoff
        self.backoff = min(MAX_BACKOFF, self.block_seconds["low"] * 2 ** (self.emergencies - 1))
        self._emergency_at = now
        self._squeezed_since = False
        self._no_inflate_until = max(self._no_inflate_until, now + self.backoff)
