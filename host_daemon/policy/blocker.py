"""Opposite-direction blocking, after ChromeOS concierge's ``BalloonBlocker``.

Every resize carries a priority. A resize in one direction blocks resizes in the other
direction of the same or lower priority for that priority's block time (ChromeOS: 100 s
for low, 10 s for high), so a balloon never oscillates; a higher priority is never held
back by a lower one. Times are the caller's clock (seconds), nothing here reads one.
"""

from __future__ import annotations

PRIORITIES = ("low", "high")
_RANK = {name: rank for rank, name in enumerate(PRIORITIES)}
_OPPOSITE = {"inflate": "deflate", "deflate": "inflate"}


class BalloonBlocker:
    def __init__(self, block_seconds: dict[str, float]) -> None:
        self.block_seconds = dict(block_seconds)
        self._last: dict[tuple[str, str], float] = {}  # (direction, priority) -> time of the last resize

    def blocked_for(self, direction: str, priority: str, now: float) -> float:
        """Seconds until a ``direction`` resize at ``priority`` is allowed (0: allowed now)."""
        opposite = _OPPOSITE[direction]
        wait = 0.0
        for other in PRIORITIES[_RANK[priority]:]:  # same or higher priority blocks us
            at = self._last.get((opposite, other))
            if at is not None:
                wait = max(wait, at + self.block_seconds[other] - now)
        return max(0.0, wait)

    def record(self, direction: str, priority: str, now: float) -> None:
        self._last[(direction, priority)] = now
