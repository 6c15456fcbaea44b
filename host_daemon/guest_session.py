"""One guest session without I/O: bytes and the clock in, bytes and effects out.

The shell (host_daemon/connection.py) owns the socket, the event loop and the worker
pool; this class owns everything the protocol decides, so it is tested without sockets
(tests/host_daemon/test_guest_session.py), the way ``guest_agent/agent.py`` is:

- ``receive(data, now)`` feeds the sans-IO ``HostConnection`` and handles every complete
  message of the chunk together: HELLO -> admission (one injected call) -> WELCOME;
  batch -> tracker -> ACK; PING/PONG, STATS, HINT_DONE, BYE, ERROR. It returns an
  ``Output``: the bytes to write (all ACKs of the chunk in one string), an optional
  discard to run (the RAM file's pages a batch gave back: the ACK waits for it, as the
  guest keeps those pages isolated until the ACK, mm/page_reporting.c), and whether to
  close after writing.
- ``next_deadline()`` / ``on_timer(now)``: the handshake timeout, the keepalive PING after
  a third of the idle timeout, and the idle timeout. Silence is measured in whole
  messages: bytes of a message that never completes do not keep a session alive.
- The session ends exactly once (``_end``). Every batch it applied is acked first: the
  ACKs of batches read before a BYE or ERROR from the guest go out ahead of the close
  (docs/PROTOCOL.md §7.1). Its admission is released at that moment — unless a batch is
  still being applied (a discard in the worker pool, a debug delay) because the connection
  broke under it: then the id stays taken until that apply is done (``resume``), so a new
  session's WELCOME means the old session's punches have landed.

A malformed message anywhere in a chunk ends the session before anything of that chunk
is applied: the chunk is parsed whole first, so the window slots of every batch read are
taken and a guest that sends past its window within one read is caught (window-overrun),
as a device sees an overfull ring.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from time import perf_counter

from shared.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from shared.messages import (
    Bye,
    Error,
    Hello,
    HintDone,
    Ping,
    Pong,
    ReceivedBatch,
    Stats,
    Target,
    Welcome,
)
from shared.protocol import CONNECTION_CLOSED, NEED_DATA, HostConnection, State
from shared.vocabulary import PAGE_SIZE

from .admission import REFUSALS, Admission, Peer

log = logging.getLogger("balloon.host.session")

#: Batches that give back at least this many pages (4 MiB) are punched in a worker thread:
#: tmpfs frees ~1 GiB/s of filled pages, so 32 order-9 blocks (64 MiB) would stall the loop,
#: i.e. every other guest's ACKs, for ~10 ms. fallocate releases the GIL.
OFFLOAD_PAGES = 1024
#: The guest's messages that end the session (exact types: the session dispatches on them).
GUEST_ENDINGS = frozenset({Bye, Error})

#: Every value of balloon_sessions_total{result}, exported from the start so rates work.
RESULTS = ("bye", "closed", "reset", "error", "rejected", "timeout", "shutdown", "guest-error", "internal")


@dataclass(frozen=True, slots=True)
class Discard:
    """Punch these ranges out of the guest's RAM file, then call ``session.resume``."""

    ram: object  # reclaim.RamFile
    pfns: object
    counts: object
    pages: int
    delay: float = 0.0  # --debug-apply-delay: a slow punch, spent in the worker pool

    @property
    def offload(self) -> bool:
        """Large (or slow) enough to run in the worker pool (reading pauses meanwhile)."""
        return self.pages >= OFFLOAD_PAGES or self.delay > 0

    def run(self) -> None:
        if self.delay:
            time.sleep(self.delay)  # a worker thread, never the event loop
        self.ram.discard(self.pfns, self.counts)


@dataclass(slots=True)
class Output:
    """What the shell must do after a call: write ``data``; then run ``discard`` (and call
    ``resume``) or wait ``delay`` seconds (and call ``resume``); close once written."""

    data: bytes = b""
    discard: Discard | None = None
    delay: float = 0.0
    close: bool = False


class GuestSession:
    """The protocol side of one connection; see the module docstring."""

    def __init__(self, settings, admitter, stats, peer: Peer, now: float, owner: object = None) -> None:
        self.settings = settings
        self.admitter = admitter
        self.stats = stats
        self.peer = peer
        self.owner = self if owner is None else owner
        self.conn = HostConnection(settings.max_message_bytes)
        self.admission: Admission | None = None
        self.record = None
        self.claimed: str | None = None  # HELLO's guest id, for the log of a refused session
        self.started = now
        self.last_message = now
        self._now = now  # the latest clock reading the shell passed in (for the log)
        self.result: str | None = None  # set once, when the session ends
        self.reason = ""
        self._pinged = False
        self._nonce = 0
        self._events: list = []
        self._at = 0
        self._pending = None  # (batch, result, start) while a discard or delay runs
        self._held_admission: Admission | None = None  # released once the pending apply is done
        self._eof = False
        self._stopping = False

    # -- views ------------------------------------------------------------------------

    @property
    def guest(self) -> str | None:
        return self.record.id if self.record is not None else self.claimed

    @property
    def ended(self) -> bool:
        return self.result is not None

    @property
    def busy(self) -> bool:
        """A discard or a debug delay is running: the shell must not feed more data."""
        return self._pending is not None

    def window_state(self) -> tuple[int, int] | None:
        window = self.conn.window
        return None if window is None else (window.size, window.in_flight)

    # -- input ------------------------------------------------------------------------

    def receive(self, data: bytes, now: float) -> Output:
        """Bytes from the guest (``b""``: it closed its side)."""
        self._now = now
        if self.result is not None:
            return Output()
        conn = self.conn
        conn.receive_data(data)
        record = self.record
        if record is not None:
            record.received_bytes += len(data)
        events = []
        try:
            while True:
                event = conn.next_event()
                if event is NEED_DATA:
                    break
                if event is CONNECTION_CLOSED:
                    self._eof = True
                    break
                events.append(event)
                if event.__class__ in GUEST_ENDINGS:  # BYE or ERROR from the guest ends it
                    break
        except RemoteProtocolError as error:
            return self._fail([], error)
        if events:
            self.last_message = now
            self._pinged = False
            if record is not None:
                record.last_message_at = time.time()
        self._events = events
        self._at = 0
        return self._run()

    def resume(self, now: float, failed: bool = False) -> Output:
        """The discard (or the debug delay) that the last Output asked for is done.

        Called also when the connection went away meanwhile: the batch was applied (a punch
        cannot be taken back), so it is counted, and only now is the guest id released."""
        self._now = now
        batch, result, start = self._pending
        self._pending = None
        if self.result is not None:
            if not failed and self.record is not None:
                self._count(batch, result, start)  # applied; its ACK has no connection to go to
            self._release()
            return Output()
        if failed:
            return self._fail([], RemoteProtocolError("internal", "the host could not discard pages"))
        acks = [self._ack(batch.seq, self._count(batch, result, start))]
        return self._run(acks)

    def _run(self, acks: list[bytes] | None = None) -> Output:
        """Handle the parsed events from ``_at`` on; stops early for a discard or a delay."""
        out: list[bytes] = []  # control replies; the chunk's ACKs follow them
        if acks is None:
            acks = []
        events = self._events
        try:
            while self._at < len(events):
                event = events[self._at]
                self._at += 1
                if event.__class__ is ReceivedBatch:
                    stop = self._batch(event, acks)
                    if stop is not None:
                        return self._flush(out, acks, stop)
                else:
                    ending = self._control(event, out)
                    if ending is not None:
                        data = self._pack(out, acks)
                        return self._end_output(*ending, data)
        except RemoteProtocolError as error:  # a refused HELLO
            return self._fail(self._pack(out, acks), error)
        except Exception:  # noqa: BLE001 - a bug (or a failed admission) ends this session, never the host
            log.exception("session failed", extra={"guest": self.guest, "address": self.peer.address})
            return self._fail(b"", RemoteProtocolError(
                "internal", "the host failed handling this session"), result="internal")
        if not out and len(acks) == 1:  # the common chunk: one batch, its ACK
            output = Output(acks[0])
        else:
            output = self._flush(out, acks, Output())
        if self._eof and self.result is None:
            output.close = True
            self._end("closed", "closed")
        elif self._stopping and self.result is None:
            return self._shutdown_output(output)
        return output

    def _flush(self, out: list[bytes], acks: list[bytes], output: Output) -> Output:
        data = self._pack(out, acks)
        if data:
            output.data = data + output.data if output.data else data
        return output

    def _pack(self, out: list[bytes], acks: list[bytes]) -> bytes:
        if self.conn.state is State.CLOSED and self.conn.goodbye != "received":
            return b""  # the connection is dead or over: nothing more may be sent
        # After the guest's BYE or ERROR only the ACKs it is owed go out (``out`` is empty:
        # ``_control`` answers nothing once the chunk's ending has been parsed).
        if acks:
            out.extend(acks)
        if not out:
            return b""
        return out[0] if len(out) == 1 else b"".join(out)

    def _ack(self, seq: int, rejected_pages: int) -> bytes:
        """The ACK's bytes — none once the connection is dead or over (the guest's BYE or
        ERROR still gets the ACKs it is owed: docs/PROTOCOL.md §7.1)."""
        try:
            return self.conn.ack(seq, rejected_pages)
        except LocalProtocolError as error:  # the table allows no ACK now: nothing more may be sent
            if error.code != "bad-state":
                raise
            return b""

    # -- batches ----------------------------------------------------------------------

    def _batch(self, batch: ReceivedBatch, acks: list[bytes]) -> Output | None:
        """Apply one batch; its ACK goes to ``acks``, or an Output says what must run first
        (the guest keeps the pages isolated until the ACK, mm/page_reporting.c, so the ACK
        waits for the punch)."""
        start = perf_counter()
        record = self.record
        result = record.tracker.apply(batch.kind, batch.pfns, batch.counts, batch.cmd_id)
        delay = self.settings.debug_apply_delay
        if record.ram is not None and result.discard[0].size:
            discard = result.discard
            pages = int(discard[1].sum())
            blocked = record.discard_block()
            if blocked is not None:  # the VMM says punching is unsafe now: ack, punch nothing
                record.inhibited[blocked] = record.inhibited.get(blocked, 0) + pages * PAGE_SIZE
                acks.append(self._ack(batch.seq, self._count(batch, result, start)))
                return None
            self._pending = (batch, result, start)
            return Output(discard=Discard(record.ram, discard[0], discard[1], pages, delay))
        if delay:  # a slow host (testing): this ACK leaves ``delay`` later
            self._pending = (batch, result, start)
            return Output(delay=delay)
        acks.append(self._ack(batch.seq, self._count(batch, result, start)))
        return None

    def _count(self, batch: ReceivedBatch, result, start: float) -> int:
        """Count an applied batch (per kind code); returns its rejected pages, for the ACK."""
        record = self.record
        record.apply_seconds.observe(perf_counter() - start)
        kind = batch.kind
        record.batches[kind] += 1
        record.ranges[kind] += result.ranges
        record.pages_total[kind] += result.pages
        rejected_pages = result.rejected_pages
        if rejected_pages:
            rejected = record.rejected
            for reason, pages in result.rejected.items():
                rejected[reason] = rejected.get(reason, 0) + pages
        return rejected_pages

    # -- control messages -------------------------------------------------------------

    def _control(self, event, out: list[bytes]) -> tuple[str, str] | None:
        """Non-batch messages, by exact type; ``(result, reason)`` when it ends the session."""
        kind = event.__class__
        if self.conn.state is State.CLOSED and kind not in GUEST_ENDINGS:
            return None  # a BYE or ERROR later in this chunk ended it: no reply can be sent
        if kind is Hello:
            out.extend(self._welcome(event))
        elif kind is Ping:
            out.append(self.conn.send(Pong(event.nonce)))
        elif kind is Stats:
            self.record.stats = event.values
        elif kind is HintDone:
            self.record.hint_done = event.cmd_id
        elif kind is Bye:
            return "bye", (f"bye: {event.reason}"[:200] if event.reason else "bye")
        elif kind is Error:
            return "guest-error", f"guest error {event.code}"[:200]
        return None  # PONG: the answer to our keepalive; receiving it was enough

    def _welcome(self, hello: Hello) -> list[bytes]:
        settings = self.settings
        self.claimed = hello.guest
        admission = self.admitter.admit(hello, self.peer, self.owner)
        self.admission = admission
        record = self.record = admission.record
        record.received_bytes += self.conn.bytes_received
        record.last_message_at = time.time()
        out = [self.conn.send(Welcome(
            window=settings.window, max_ranges=settings.max_ranges, features=admission.features,
            max_message_bytes=settings.max_message_bytes, ram_file=admission.ram_file,
            pages=admission.pages))]
        if record.target_pages is not None:
            out.append(self.conn.send(Target(record.target_pages)))
        log.info("session start", extra={
            "guest": record.id, "address": self.peer.address, "pages": admission.pages,
            "claimed_pages": hello.pages, "memory_bytes": admission.pages * PAGE_SIZE,
            "provisioned": record.provisioned is not None, "features": ",".join(admission.features)})
        return out

    # -- host-initiated ---------------------------------------------------------------

    def send(self, message) -> bytes:
        """Bytes of a host-initiated message (TARGET, HINT_START/STOP); LocalProtocolError
        when the session cannot carry it (not welcomed yet, ended, busy closing)."""
        if self.result is not None:
            raise LocalProtocolError("bad-state", "the session has ended")
        return self.conn.send(message)

    # -- timers -----------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """Monotonic time at which ``on_timer`` has something to do (None: nothing, or not
        until the running discard is done — the shell asks again after ``resume``)."""
        if self.result is not None or self._pending is not None:
            return None
        if self.conn.state is not State.READY:
            return self.started + self.settings.handshake_timeout
        idle = self.settings.idle_timeout
        return self.last_message + (idle if self._pinged else idle / 3)

    def on_timer(self, now: float) -> Output:
        self._now = now
        if self.result is not None or self._pending is not None:
            return Output()
        settings = self.settings
        if self.conn.state is not State.READY:
            if now >= self.started + settings.handshake_timeout:
                return self._fail([], RemoteProtocolError(
                    "handshake-timeout", f"no HELLO within {settings.handshake_timeout:g}s"), result="timeout")
            return Output()
        idle = settings.idle_timeout
        silent = now - self.last_message
        if silent >= idle:
            return self._fail([], RemoteProtocolError(
                "idle-timeout", f"no message received for {idle:g}s"), result="timeout")
        if silent >= idle / 3 and not self._pinged:
            self._pinged = True
            self._nonce += 1
            return Output(data=self.conn.send(Ping(self._nonce)))
        return Output()

    # -- ending -----------------------------------------------------------------------

    def shutdown(self, now: float) -> Output:
        """Host shutdown: what was read is finished (a running discard first), then BYE."""
        self._now = now
        if self.result is not None:
            return Output()
        self._stopping = True
        if self._pending is not None:
            return Output()  # resume() finishes the chunk, then says BYE
        return self._shutdown_output(Output())

    def _shutdown_output(self, output: Output) -> Output:
        if self.conn.state is State.READY:
            output.data += self.conn.send(Bye("host shutting down"))
        output.close = True
        self._end("shutdown", "shutdown")
        return output

    def refuse(self, error: RemoteProtocolError) -> Output:
        """End the session before reading anything (e.g. the host's connection caps)."""
        return self._fail([], error)

    def connection_lost(self, error: BaseException | None, now: float) -> None:
        """The transport is gone; if the session had not ended yet, it ends now. A batch
        being applied keeps the guest id until ``resume`` (its punch is still running)."""
        self._now = now
        if self.result is None:
            result = "reset" if error is not None else "closed"
            self._end(result, result)

    def _fail(self, head: list[bytes] | bytes, error: ProtocolError, result: str | None = None) -> Output:
        """ERROR ``error.code`` after ``head`` (what was acked before it), then close."""
        code = error.code
        self.stats.protocol_errors[code] = self.stats.protocol_errors.get(code, 0) + 1
        if self.record is not None:
            self.record.errors += 1
        data = head if isinstance(head, bytes) else b"".join(head)
        try:
            data += self.conn.send(Error(code, error.detail[:1000]))
        except LocalProtocolError:
            pass
        if result is None:
            result = "rejected" if code in REFUSALS else "error"
        return self._end_output(result, code, data)

    def _end_output(self, result: str, reason: str, data: bytes = b"") -> Output:
        self._end(result, reason)
        return Output(data=data, close=True)

    def _end(self, result: str, reason: str) -> None:
        """The one place a session ends: count it, log it, and release the guest id — now,
        or once the batch being applied is done (``resume``)."""
        if self.result is not None:
            return
        self.result = result
        self.reason = reason
        self._events = []
        stats = self.stats.sessions
        stats[result] = stats.get(result, 0) + 1
        self._held_admission, self.admission = self.admission, None
        if self._pending is None:
            self._release()
        log.info("session end", extra={
            "guest": self.guest, "address": self.peer.address,
            "duration_s": round(self._now - self.started, 3), "reason": reason})

    def _release(self) -> None:
        admission = self._held_admission
        if admission is not None:
            self._held_admission = None
            self.admitter.release(admission, self.owner, self.result)
        self.owner = None  # the shell and the session no longer refer to each other
