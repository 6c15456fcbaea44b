"""When to stop reading from a guest (uvicorn's ``flow_control.py`` is the model).

Reading pauses while any *hold* is on and resumes when the last one is released:

- ``WRITING``: the transport's write buffer is above its high-water mark
  (``pause_writing``): the guest does not read its ACKs, so reading more of its batches
  would only grow host memory (docs/OPERATIONS.md, "Host memory"). The guest's own socket buffer then
  fills and it stalls itself — TCP/Unix backpressure, as a full virtqueue stalls a driver.
- ``WARMING``: the host has just started and its tracker kernels are still loading.
- ``DISCARD``: a large discard (or a debug delay) runs outside the event loop; the rest of
  the chunk and anything after it waits, so ACKs stay in order.
"""

from __future__ import annotations

WRITING = "writing"
WARMING = "warming"
DISCARD = "discard"


class FlowControl:
    __slots__ = ("_transport", "_holds")

    def __init__(self, transport) -> None:
        self._transport = transport
        self._holds: set[str] = set()

    @property
    def read_paused(self) -> bool:
        return bool(self._holds)

    def holding(self, reason: str) -> bool:
        """Whether ``reason`` is one of the holds keeping reading paused."""
        return reason in self._holds

    def hold(self, reason: str) -> None:
        if reason in self._holds:
            return
        if not self._holds and not self._transport.is_closing():
            self._transport.pause_reading()
        self._holds.add(reason)

    def release(self, reason: str) -> None:
        if reason not in self._holds:
            return
        self._holds.discard(reason)
        if not self._holds and not self._transport.is_closing():
            self._transport.resume_reading()
