"""One load guest: a protocol guest on an asyncio transport that keeps the host busy.

The sans-IO :class:`shared.protocol.GuestConnection` does the protocol (handshake,
sequence numbers, the window); this class only moves bytes and keeps time. Batches go
out from inside ``data_received`` the moment an ACK frees a window slot, so a closed
loop costs no task switch per batch — the same shape as a driver refilling its
virtqueue from the used-buffer interrupt.

Open loop (``rate``): batch *i* is due at ``start + i / rate``. Its latency is measured
from that intended time, not from when it actually left, so a host that stalls the
window is charged for the queue it causes (wrk2's coordinated-omission correction).
"""

from __future__ import annotations

import asyncio
import random
import socket
import time
from collections import deque
from dataclasses import dataclass

from shared.errors import ProtocolError
from shared.messages import (
    BATCH_CLASSES,
    Ack,
    Bye,
    Error,
    Hint,
    HintStart,
    Ping,
    Pong,
    Reuse,
    Welcome,
)
from shared.protocol import GuestConnection
from shared.vocabulary import HINT, HINTING, RANGES52, REPORT

from .payloads import PayloadPool
from .stats import Recorder

DRAIN_TIMEOUT_S = 2.0
CONNECT_TIMEOUT_S = 10.0
BACKOFF_FIRST_S = 0.05
BACKOFF_CAP_S = 1.0
#: A guest that cannot connect this many times in a row gives up (host not there);
#: sooner if it never got a session at all (wrong address: fail fast).
MAX_CONNECT_FAILURES = 10
MAX_FIRST_CONNECT_FAILURES = 5


@dataclass(frozen=True)
class Plan:
    """What every guest of a run does (shared by the guests of a worker)."""

    address: object  # shared.runtime.addresses.Address
    kind: str = REPORT
    reuse: bool = False
    encoding: str = RANGES52
    guest_pages: int = 262144
    rate: float | None = None  # batches/s per guest; None = closed loop
    batches: int | None = None  # per guest; None = until the deadline
    deadline: float | None = None  # perf_counter time at which sending stops


class LoadGuest(asyncio.Protocol):
    """A guest that sends pre-built batches as fast as the window (or the rate) allows."""

    def __init__(self, guest_id: str, token: str | None, plan: Plan, pool: PayloadPool,
                 recorder: Recorder, offset: int = 0) -> None:
        self.guest_id = guest_id
        self.token = token
        self.plan = plan
        self.pool = pool
        self.recorder = recorder
        self.totals = recorder.totals
        self.next_payload = offset % len(pool)
        self.created = 0  # batches this guest has put on the wire (all sessions)
        self.cmd_id = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self.conn: GuestConnection | None = None
        self.transport: asyncio.Transport | None = None
        self.session_over: asyncio.Future | None = None
        self.inflight: dict[int, tuple[float, int, int]] = {}  # seq -> (t0, ranges, pages)
        self.due: deque[float] = deque()  # open loop: intended send times not yet sent
        self.stall_since: float | None = None
        self.reported_error = False
        self.stopping = False
        self.timer: asyncio.TimerHandle | None = None
        self.next_due = 0.0
        self.reuse_next = False
        self.finished = False
        self.last_error: str | None = None
        self.sessions = 0
        self.acked = 0  # ACKs over every session of this guest
        self.interrupted = False
        self.expired = False  # the duration's timer fired (event loops may fire it a little early)
        self.wake: asyncio.Future | None = None
        self.out: list[bytes] = []  # corked writes: one syscall per wakeup, not per batch

    # -- lifecycle ------------------------------------------------------------------

    async def run(self, start_at: float) -> None:
        """Run sessions (reconnecting with backoff) until the plan is done."""
        self.loop = asyncio.get_running_loop()
        wake = self.loop.create_future()
        self.wake = wake
        await _sleep_until(start_at, wake)
        if self.plan.deadline is not None:
            self.loop.call_later(max(0.0, self.plan.deadline - time.perf_counter()), self._on_deadline)
        self.next_due = max(start_at, time.perf_counter())
        failures = 0  # in a row: failed connects, and sessions that ended before any ACK
        while not self._done_sending():
            try:
                await self._connect()
            except (TimeoutError, OSError) as error:
                self.totals.errors["connect-failed"] += 1
                self.last_error = f"{type(error).__name__}: {error}"
                failures += 1
            else:
                self.totals.sessions += 1
                self.totals.reconnects += self.sessions > 1  # a new session after a lost one
                acked_before = self.acked
                await self.session_over
                self._end_session()
                failures = failures + 1 if self.acked == acked_before else 0
                if self._done_sending():
                    break
            if failures >= (MAX_CONNECT_FAILURES if self.acked else MAX_FIRST_CONNECT_FAILURES):
                self.totals.errors["gave-up"] += 1  # e.g. no host, or it refuses us (auth-failed)
                break
            await self._backoff(max(1, failures))
        self.finished = True

    async def _connect(self) -> None:
        address = self.plan.address
        self.session_over = self.loop.create_future()
        self.reported_error = False
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            if address.kind == "unix":
                await self.loop.create_unix_connection(lambda: self, address.path)
            elif address.kind == "tcp":
                await self.loop.create_connection(lambda: self, address.host, address.port)
            else:
                sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
                try:
                    sock.setblocking(False)
                    await self.loop.sock_connect(sock, (address.cid, address.port))
                    await self.loop.create_connection(lambda: self, sock=sock)
                except BaseException:
                    sock.close()
                    raise

    async def _backoff(self, failures: int) -> None:
        delay = min(BACKOFF_CAP_S, BACKOFF_FIRST_S * 2 ** (failures - 1)) * random.uniform(0.5, 1.0)
        if self.plan.deadline is not None:
            delay = min(delay, max(0.0, self.plan.deadline - time.perf_counter()))
        await _sleep_until(time.perf_counter() + delay, self.wake)

    def _on_deadline(self) -> None:
        """Time is up: stop even if the host has gone quiet and no ACK will call _pump."""
        self.expired = True
        if self.conn is not None and not self.stopping:
            self.due.clear()
            self._stop()

    def interrupt(self) -> None:
        """Ctrl-C / SIGTERM: stop sending now, collect the ACKs in flight, report as usual."""
        self.interrupted = True
        if self.wake is not None and not self.wake.done():
            self.wake.set_result(None)  # a guest still waiting for its ramp slot
        self._on_deadline()

    def _done_sending(self) -> bool:
        if self.interrupted or self.expired:
            return True
        if self.plan.batches is not None and self.created >= self.plan.batches:
            return True
        return self.plan.deadline is not None and time.perf_counter() >= self.plan.deadline

    def _end_session(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self._stall_end(time.perf_counter())
        if self.inflight:
            self.totals.errors["unacked"] += len(self.inflight)
            self.inflight.clear()
        self.conn = None
        self.transport = None

    def _finish_session(self, code: str | None = None) -> None:
        if code is not None and not self.reported_error and not self.stopping:
            self.totals.errors[code] += 1
            self.reported_error = True
        if self.transport is not None:
            self.transport.close()
        if self.session_over is not None and not self.session_over.done():
            self.session_over.set_result(None)

    # -- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.sessions += 1
        self.out = []
        features = [self.plan.encoding] + ([HINTING] if self.plan.kind == HINT else [])
        self.conn = GuestConnection(self.guest_id, self.plan.guest_pages, features, self.token)
        self.stopping = False
        data = self.conn.hello()
        self.totals.wire_bytes += len(data)
        transport.write(data)

    def connection_lost(self, exc) -> None:
        self._finish_session(None if self.stopping else "connection-lost")

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        if conn is None:
            return
        conn.receive_data(data)
        try:
            for event in conn.events():
                if type(event) is Ack:
                    self._on_ack(event)
                else:
                    self._on_other(event)
                    if self.transport is None or self.transport.is_closing():
                        return
        except ProtocolError as error:
            self._finish_session(error.code)
            return
        self._flush()
        if self.stopping and not self.inflight:
            self._say_bye()

    def eof_received(self):
        self._finish_session(None if self.stopping else "connection-lost")
        return False

    # -- events ---------------------------------------------------------------------

    def _on_other(self, event) -> None:
        if isinstance(event, Welcome):
            if self.totals_first_session():
                # the schedule starts when the first session is up: the handshake is not an
                # ack latency (later sessions keep their schedule: batches due while the
                # guest was disconnected are charged, as wrk2 would)
                self.next_due = max(self.next_due, time.perf_counter())
            if self.plan.rate is None:
                self._pump()
                self._flush()
            else:
                self._schedule()
        elif isinstance(event, Error):
            self._finish_session(event.code)
        elif isinstance(event, Bye):
            self._finish_session(None if self.stopping else "bye")
        elif isinstance(event, Ping):
            self._write(self.conn.send(Pong(event.nonce)))
        elif isinstance(event, HintStart):
            self.cmd_id = event.cmd_id
        # TARGET, HINT_STOP, PONG: nothing to do for a load guest

    def totals_first_session(self) -> bool:
        return self.sessions == 1

    def _on_ack(self, ack: Ack) -> None:
        now = time.perf_counter()
        t0, ranges, pages = self.inflight.pop(ack.seq)
        self.recorder.latencies.append(now - t0)
        totals = self.totals
        totals.batches += 1
        self.acked += 1
        totals.ranges += ranges
        totals.pages += pages
        totals.rejected_pages += ack.rejected_pages
        self._stall_end(now)
        self._pump()

    # -- sending --------------------------------------------------------------------

    def _pump(self) -> None:
        """Fill the window: with the next batches (closed loop) or the ones due (open loop)."""
        conn = self.conn
        if conn is None or self.stopping:
            return
        window = conn.window
        open_loop = self.plan.rate is not None
        while True:
            if open_loop:
                if not self.due:
                    break
            elif self._done_sending():
                break
            if window.full:
                if self.stall_since is None:
                    self.stall_since = time.perf_counter()
                return
            t0 = self.due.popleft() if open_loop else time.perf_counter()
            self._send_one(t0)
        if self._done_sending() and not self.due:
            self._stop()

    def _send_one(self, t0: float) -> None:
        pool = self.pool
        index = self.next_payload
        payload = pool.payloads[index]
        kind = self.plan.kind
        if kind == HINT:
            message = Hint(payload=payload, cmd_id=self.cmd_id)
        elif kind == REPORT and self.plan.reuse and self.reuse_next:
            message = Reuse(payload=payload)  # take back what the previous batch reported
        else:
            message = BATCH_CLASSES[kind](payload=payload)
        if not (kind == REPORT and self.plan.reuse and not self.reuse_next):
            self.next_payload = index + 1 if index + 1 < len(pool) else 0
        self.reuse_next = self.plan.reuse and not self.reuse_next
        data = self.conn.send(message)
        self.inflight[self.conn.last_seq] = (t0, pool.ranges[index], pool.pages[index])
        self.created += 1
        self.totals.sent += 1
        self.totals.wire_bytes += len(data)
        self.out.append(data)

    def _flush(self) -> None:
        if self.out:
            if self.transport is not None and not self.transport.is_closing():
                self.transport.write(b"".join(self.out) if len(self.out) > 1 else self.out[0])
            self.out = []

    def _schedule(self) -> None:
        """Open loop: queue every batch due by now, then arm a timer for the next one."""
        self.timer = None
        if self.conn is None or self.stopping:
            return
        now = time.perf_counter()
        interval = 1.0 / self.plan.rate
        limit = self.plan.batches
        while self.next_due <= now:
            if self.plan.deadline is not None and self.next_due >= self.plan.deadline:
                break
            if limit is not None and self.created + len(self.due) >= limit:
                break
            self.due.append(self.next_due)
            self.next_due += interval
        self._pump()
        self._flush()
        if self.conn is not None and not self.stopping and not self._done_sending():
            wake = self.next_due if self.plan.deadline is None else min(self.next_due, self.plan.deadline)
            delay = max(0.0, wake - time.perf_counter())
            self.timer = self.loop.call_later(delay, self._schedule)

    def _stall_end(self, now: float) -> None:
        if self.stall_since is not None:
            self.totals.window_stall_s += now - self.stall_since
            self.stall_since = None

    def _stop(self) -> None:
        """Nothing more to send: wait for the last ACKs (bounded), then say BYE."""
        if self.stopping:
            return
        self.stopping = True
        if not self.inflight:
            self._say_bye()
        else:
            self.loop.call_later(DRAIN_TIMEOUT_S, self._say_bye)

    def _say_bye(self) -> None:
        if self.conn is None or self.transport is None or self.transport.is_closing():
            return
        try:
            self._write(self.conn.send(Bye("load done")))
        except ProtocolError:
            pass
        self._finish_session(None)

    def _write(self, data: bytes) -> None:
        self.totals.wire_bytes += len(data)
        self.out.append(data)
        self._flush()


async def _sleep_until(when: float, wake: asyncio.Future | None = None) -> None:
    """Sleep until perf_counter time ``when``, or until ``wake`` is resolved."""
    delay = when - time.perf_counter()
    if delay > 0:
        if wake is None:
            await asyncio.sleep(delay)
        else:
            await asyncio.wait([wake], timeout=delay)
