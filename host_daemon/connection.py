"""The asyncio shell around one ``GuestSession``: bytes in, bytes out, nothing else.

``data_received`` feeds the sans-IO session (host_daemon/guest_session.py) and writes
what it returns with one ``transport.write`` — every complete message of one read is
handled together, so the ACKs of a chunk leave as one write. There is no queue and no
task per connection: backpressure is the transport's own (``pause_writing`` ->
``FlowControl`` pauses reading), a large discard runs in the host's worker pool with
reading paused, and the session's deadlines are one ``call_at`` timer.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct

from shared.runtime.addresses import Address

from .admission import Peer
from .flow_control import DISCARD, WARMING, WRITING, FlowControl
from .guest_session import GuestSession, Output

log = logging.getLogger("balloon.host.session")
_CREDS = struct.calcsize("3i")
#: Above this many unsent bytes the guest is not reading its ACKs: reading pauses (flow_control).
WRITE_HIGH_WATER = 64 * 1024


def peer_of(transport: asyncio.BaseTransport, listener: Address, guest_id: str | None) -> Peer:
    """The host's own view of who connected (never what the guest claims)."""
    kind = listener.kind
    if kind == "unix":
        sock = transport.get_extra_info("socket")
        try:
            pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDS))
        except (OSError, AttributeError):
            return Peer(listener, kind, f"unix:{listener.path}", guest_id)
        return Peer(listener, kind, f"unix:{listener.path}#pid={pid},uid={uid}", guest_id, pid, uid, gid)
    peer = transport.get_extra_info("peername")
    if kind == "vsock" and peer:
        return Peer(listener, kind, f"vsock:{peer[0]}:{peer[1]}", guest_id)
    if peer:
        host = f"[{peer[0]}]" if ":" in str(peer[0]) else peer[0]
        return Peer(listener, kind, f"tcp:{host}:{peer[1]}", guest_id)
    return Peer(listener, kind, str(listener), guest_id)


class GuestProtocol(asyncio.Protocol):
    """One accepted connection; ``host`` is the HostServer (settings, admitter, pool, caps)."""

    def __init__(self, host, listener: Address, guest_id: str | None = None) -> None:
        self.host = host
        self.listener = listener
        self.guest_id = guest_id
        self.transport: asyncio.Transport | None = None
        self.session: GuestSession | None = None
        self.flow: FlowControl | None = None
        self.pre_hello = False  # counted in the host's cap on connections without HELLO
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._held: list[bytes] = []  # bytes that arrived while the session was busy

    # -- asyncio callbacks --------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        self.flow = FlowControl(transport)
        warm = self.host.warm
        if warm is not None and not warm.done():  # the host has just started: wait, unread
            self.flow.hold(WARMING)
            warm.add_done_callback(self._warmed)
        self._start()

    def _warmed(self, _future) -> None:
        if not self.transport.is_closing():
            self.session.started = self.session.last_message = self._loop.time()
            self.flow.release(WARMING)
            self._arm()

    def _start(self) -> None:
        host = self.host
        peer = peer_of(self.transport, self.listener, self.guest_id)
        self.session = GuestSession(host.settings, host.admitter, host.stats, peer, self._loop.time(), owner=self)
        refusal = host.connection_opened(self)
        if refusal is not None:
            self._handle(self.session.refuse(refusal))
            return
        if not self.flow.read_paused:
            self._arm()

    def data_received(self, data: bytes) -> None:
        session = self.session
        if session.busy:
            self._held.append(data)
            return
        output = session.receive(data, self._loop.time())
        if output.discard is None and not output.close and not output.delay and not self.pre_hello:
            if output.data:  # the hot path: a chunk of batches in, its ACKs out
                self.transport.write(output.data)
            return
        self._handle(output)

    def eof_received(self) -> None:
        if not self.session.busy:
            self._handle(self.session.receive(b"", self._loop.time()))
        else:
            self._held.append(b"")

    def connection_lost(self, error: Exception | None) -> None:
        self.session.connection_lost(error, self._loop.time())
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._held.clear()
        self.host.connection_closed(self)

    def pause_writing(self) -> None:
        self.flow.hold(WRITING)

    def resume_writing(self) -> None:
        self.flow.release(WRITING)

    # -- what the host asks -------------------------------------------------------------

    def window_state(self) -> tuple[int, int] | None:
        return self.session.window_state()

    def send(self, message) -> bool:
        """Write a host-initiated message now; False when the guest does not read its ACKs
        (its write buffer is full) — the idle timeout will close it, the caller must not wait."""
        if self.flow.holding(WRITING):
            log.warning("guest not reading; message not sent",
                        extra={"guest": self.session.guest, "message": type(message).__name__})
            return False
        self.transport.write(self.session.send(message))
        return True

    def shutdown(self) -> None:
        """Host stop: the session finishes what it read, says BYE and the transport closes."""
        self._handle(self.session.shutdown(self._loop.time()))

    def abort(self) -> None:
        self.transport.abort()

    # -- effects ------------------------------------------------------------------------

    def _handle(self, output: Output) -> None:
        session = self.session
        data = output.data
        while output.discard is not None and not output.discard.offload:
            output = session.resume(self._loop.time(), failed=not self._discard(output.discard))
            data += output.data
        if data:
            self.transport.write(data)
        if self.pre_hello and (session.record is not None or session.ended):
            self.host.handshake_done(self)
            self._arm()
        if output.close:
            self.transport.close()
            return
        if output.discard is not None:
            self.flow.hold(DISCARD)
            future = self._loop.run_in_executor(self.host.discard_pool, self._discard, output.discard)
            future.add_done_callback(self._resume)
        elif output.delay:
            self.flow.hold(DISCARD)
            self._loop.call_later(output.delay, self._resume, None)
        elif self._held and not session.busy:
            held, self._held = self._held, []
            for data in held:
                if session.ended:
                    break
                self._handle(session.receive(data, self._loop.time()))

    def _discard(self, discard) -> bool:
        try:
            discard.run()
        except Exception as error:  # noqa: BLE001 - OSError, or a bug: the session ends with ERROR internal
            log.error("discard failed", extra={"guest": self.session.guest, "error": str(error)})
            return False
        return True

    def _resume(self, future) -> None:
        session = self.session
        ok = True if future is None else future.result()
        if session.ended:  # the connection went away meanwhile: only now is the guest id free
            session.resume(self._loop.time(), failed=not ok)
            return
        self.flow.release(DISCARD)
        self._handle(session.resume(self._loop.time(), failed=not ok))
        self._arm()

    def _arm(self) -> None:
        """(Re)arm the one timer at the session's next deadline, if that is sooner."""
        deadline = self.session.next_deadline()
        if deadline is None:
            return
        if self._timer is not None:
            if self._timer_at <= deadline:
                return
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = self._loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._handle(self.session.on_timer(self._loop.time()))
        self._arm()
