"""The in-flight window: how many batches may be unacknowledged at once.

Like h2's ``WindowManager`` this is one small object with its own tests. The window
plays the virtqueue's role: a guest with ``size`` batches in flight must wait for an
ACK before it sends another, exactly as a driver waits for used buffers.
"""

from __future__ import annotations


class WindowFull(Exception):
    """Consuming a slot would exceed the window."""


class UnknownSequence(Exception):
    """Releasing a sequence number that is not in flight."""


class FlowWindow:
    """Tracks in-flight sequence numbers against a fixed size."""

    __slots__ = ("size", "_in_flight")

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError("a window holds at least one batch")
        self.size = size
        self._in_flight: dict[int, None] = {}  # insertion-ordered set: oldest first

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    @property
    def available(self) -> int:
        return self.size - len(self._in_flight)

    @property
    def full(self) -> bool:
        return len(self._in_flight) >= self.size

    @property
    def oldest(self) -> int | None:
        return next(iter(self._in_flight), None)

    def pending(self) -> list[int]:
        return list(self._in_flight)

    def __contains__(self, seq: int) -> bool:
        return seq in self._in_flight

    def consume(self, seq: int) -> None:
        """Mark ``seq`` as sent (or received) and awaiting its ACK."""
        if len(self._in_flight) >= self.size:
            raise WindowFull(f"{len(self._in_flight)} batches already in flight, window is {self.size}")
        if seq in self._in_flight:
            raise UnknownSequence(f"seq {seq} is already in flight")
        self._in_flight[seq] = None

    def release(self, seq: int) -> None:
        """Mark ``seq`` as acknowledged."""
        try:
            del self._in_flight[seq]
        except KeyError:
            raise UnknownSequence(f"seq {seq} is not awaiting an ack") from None

    def clear(self) -> list[int]:
        """Forget everything in flight (the session ended); returns what was pending."""
        pending = list(self._in_flight)
        self._in_flight.clear()
        return pending
