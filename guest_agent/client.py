"""The asyncio shell around the sans-IO agent: connect, one reader, one writer, reconnect.

* One reader task feeds the socket's bytes to ``GuestConnection`` and hands the messages
  to the agent; one writer task is the only place that writes, and it awaits ``drain()``
  after every batch, so a host that stops reading stops the guest (backpressure reaches
  the allocator: blocks stay free, not queued in memory).
* The workload runs on its own timer, connected or not — a guest does not stop using
  memory because its balloon device is busy. The timer sleeps while nothing is due
  (``Agent.next_tick``): an idle agent wakes for its deadlines and the host's messages only.
* A lost connection is retried with exponential backoff and full jitter (capped by
  ``--reconnect-max``); the new session starts from an empty host tracker, so the agent
  re-reports everything and re-inflates its balloon (``Agent.start_session``).
* On a virtio-serial port (``serial:``) the stream outlives the agent: the descriptor is
  opened once, each session waits for the host end to be connected, and a session that
  did not end with EOF — the first one of every agent, above all — is preceded by a
  resync (``transport.resync``, docs/PROTOCOL.md §1.1).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re

from shared.errors import CODES, ProtocolError, RemoteProtocolError
from shared.messages import Bye
from shared.protocol import GuestConnection, State
from shared.runtime.addresses import Address
from shared.runtime.config import format_size

from .agent import Agent, SessionEnded
from .transport import READ_CHUNK, SerialPort, open_stream, resync

log = logging.getLogger("guest_agent.client")

BACKOFF_BASE = 0.1
#: Refusals a retry cannot change: the same HELLO gets the same answer, so the guest stops.
PERMANENT_REFUSALS = frozenset({"bad-size", "auth-failed", "bad-version", "bad-page-size", "bad-guest-id"})
#: A failure that repeats (host down, socket missing) is logged again every this many attempts.
REPEAT_EVERY = 10
PAGE_BYTES = 4096


class Refused(Exception):
    """The host refused the HELLO for a reason retrying cannot change (PERMANENT_REFUSALS)."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}" if detail else code)
        self.code = code
        self.detail = detail


def _pages_as_bytes(text: str) -> str:
    """``262144 pages`` -> ``1GiB (262144 pages)``: people size guests in bytes."""
    return re.sub(r"\b(\d+) pages\b", lambda m: f"{format_size(int(m.group(1)) * PAGE_BYTES)} ({m.group(0)})", text)


def refusal_line(guest: str, pages: int, refused: Refused) -> str:
    """The one line a refused guest exits with: what the host said, in bytes, and what to change."""
    size = format_size(pages * PAGE_BYTES)
    if refused.code == "bad-size":
        allowed = re.search(r"at most (\d+) pages|has (\d+) pages", refused.detail)
        if allowed:
            limit = int(allowed.group(1) or allowed.group(2)) * PAGE_BYTES
            where = ("an unprovisioned guest (its --max-guest-memory)" if allowed.group(1)
                     else f"guest {guest} (its inventory entry)")
            return (f"the host refuses guest {guest} (bad-size): it allows at most {format_size(limit)} "
                    f"for {where} and this guest has {size} (--memory); not retrying")
    words = CODES.get(refused.code, refused.code)
    detail = f" ({_pages_as_bytes(refused.detail)})" if refused.detail else ""
    return f"the host refuses guest {guest} ({refused.code}): {words}{detail}; not retrying"


def backoff_delay(attempt: int, cap: float, rng: random.Random | None = None) -> float:
    """Exponential backoff with jitter: between half and all of min(cap, base * 2**attempt).

    Half-jitter keeps a floor under the wait (no hot loop against a dead host) while still
    spreading guests out when a restarted host is reconnected by all of them at once."""
    ceiling = min(cap, BACKOFF_BASE * (2 ** min(attempt, 30)))
    return ceiling * (0.5 + 0.5 * (rng or random).random())


class GuestClient:
    """Runs sessions with the host until told to stop."""

    def __init__(self, agent: Agent, address: Address, guest: str, features, token: str | None = None,
                 tick: float = 0.05, reconnect_max: float = 5.0, handshake_timeout: float = 5.0,
                 on_welcome=None, workload_ready=lambda: True) -> None:
        self.agent = agent
        self.address = address
        self.guest = guest
        self.features = tuple(features)
        self.token = token
        self.tick = tick
        self.reconnect_max = reconnect_max
        self.handshake_timeout = handshake_timeout
        self.on_welcome = on_welcome  # called with the WELCOME (shared RAM mapping)
        self.workload_ready = workload_ready
        self.stop_event = asyncio.Event()
        self._wake = asyncio.Event()  # the writer looks for work
        self._poke = asyncio.Event()  # the clock looks at the agent again
        self.ticks = 0  # agent ticks so far (an idle agent should add few)
        self._rng = random.Random()
        self.last_error: str | None = None
        self.refused: Refused | None = None  # set when the host refused us for good (run() returns)
        self.port = SerialPort(address.path) if address.kind == "serial" else None
        self.resync_needed = self.port is not None  # a new agent on a stream that outlives it
        self.resyncs: list[str] = []  # how each resync ended ("settled", "bye", "fill")
        self._phase = "connect"  # connect | handshake | session: what a failure interrupted

    def describe(self, error: BaseException) -> str:
        """One line saying what failed, naming the address (an errno alone helps nobody)."""
        where = str(self.address)
        if self._phase == "connect":
            if isinstance(error, TimeoutError):
                return f"connecting to {where} timed out after {self.handshake_timeout:g}s"
            if isinstance(error, FileNotFoundError):
                return f"cannot connect to {where}: no such socket (is balloon-host listening there?)"
            if isinstance(error, OSError):
                return f"cannot connect to {where}: {error.strerror or error}"
        if self._phase == "handshake" and isinstance(error, TimeoutError):
            return (f"no WELCOME from {where} within {self.handshake_timeout:g}s after HELLO "
                    f"(--handshake-timeout; a busy or stuck host)")
        text = str(error) or "no details"
        return f"{type(error).__name__}: {text} ({self._phase}, {where})"

    def stop(self) -> None:
        self.stop_event.set()
        self._wake.set()

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    async def run(self) -> None:
        ticker = asyncio.create_task(self._tick_loop(), name="workload")
        attempt = 0
        repeats = 0  # attempts that failed the same way in a row
        host_left = False  # the last session ended with the host's BYE
        try:
            while not self.stop_event.is_set():
                established = False
                try:
                    established = await self._session()
                except Refused as refused:
                    self.agent.metrics.protocol_errors.labels(refused.code).inc()
                    self.refused = refused
                    return
                except (OSError, EOFError, TimeoutError, ProtocolError, SessionEnded) as error:
                    message = self.describe(error)
                    if isinstance(error, OSError) and not established:
                        self.agent.metrics.connect_failures.inc()
                    if isinstance(error, ProtocolError):
                        self.agent.metrics.protocol_errors.labels(error.code).inc()
                    # the same failure again (host still down) is logged once, then every
                    # REPEAT_EVERY attempts, so a guest waiting for its host is visibly alive
                    repeats = repeats + 1 if message == self.last_error and not established else 1
                    if isinstance(error, SessionEnded) and error.orderly:
                        host_left = True  # a clean host stop: routine, and so is the first failed reconnect
                        log.info("the host ended the session; reconnecting",
                                 extra={"guest": self.guest, "reason": message})
                    elif repeats == 1:
                        log.log(logging.INFO if host_left else logging.WARNING,
                                "session lost" if self._phase == "session" else "no session",
                                extra={"guest": self.guest, "error": message})
                        host_left = False
                    elif repeats % REPEAT_EVERY == 0:
                        log.warning("still no session, retrying", extra={
                            "guest": self.guest, "attempts": repeats, "error": message,
                            "retry_max": f"{self.reconnect_max:g}s"})
                    else:
                        log.debug("no session", extra={"guest": self.guest, "error": message})
                    self.last_error = message
                if self.stop_event.is_set():
                    break
                if established:
                    attempt = 0
                delay = backoff_delay(attempt, self.reconnect_max, self._rng)
                attempt += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop_event.wait(), delay)
        finally:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
            if self.port is not None:
                self.port.close()

    def poke(self) -> None:
        """Something changed that the agent's clock should see (a message, a session)."""
        self._poke.set()

    async def _tick_loop(self) -> None:
        """The agent's clock: a tick when ``Agent.next_tick`` says, or after a poke — at
        most one per ``tick`` either way (as often as before when busy, never when idle)."""
        hinting = self.agent.hinting
        scans: set[asyncio.Task] = set()
        while True:
            now = self._now()
            self._poke.clear()
            ready = self.workload_ready()
            if ready:
                self.agent.tick(now)
            if hinting is not None and hinting.background and hinting.scan_due(now):
                # seconds of preads on a big machine: off the event loop
                hinting.scanning = True
                task = asyncio.create_task(asyncio.to_thread(hinting.run_scan, now))
                scans.add(task)
                task.add_done_callback(lambda t: (scans.discard(t), self._wake.set(), self._poke.set()))
            self._wake.set()
            self.ticks += 1
            wake_at = self.agent.next_tick(now, self.tick) if ready else now + self.tick
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poke.wait(), max(0.0, wake_at - self._now()))
            rest = now + self.tick - self._now()
            if rest > 0:
                await asyncio.sleep(rest)

    async def _open(self):
        """(reader, writer) of a fresh session's stream."""
        if self.port is None:
            return await asyncio.wait_for(open_stream(self.address), self.handshake_timeout)
        # QEMU's end may be down for as long as the host is: waiting is not a failure.
        stream = await self.port.connect(self.stop_event)
        if self.resync_needed:
            bye = GuestConnection(self.guest, self.agent.total_pages, self.features).send(Bye("resync"))
            # A fresh agent gains nothing by waiting; later, the host may be closing already.
            fresh = not self.resyncs and self.agent.sessions == 0
            how = await resync(stream, bye, settle=0.0 if fresh else 1.0)
            self.resyncs.append(how)
            log.info("serial stream resynchronised", extra={"guest": self.guest, "how": how})
            self.resync_needed = False
            stream = await self.port.connect(self.stop_event)
        return stream, stream

    async def _session(self) -> bool:
        """One connection; returns True if it got past the handshake (raises on failure)."""
        self._phase = "connect"
        reader, writer = await self._open()
        self._phase = "handshake"
        conn = GuestConnection(self.guest, self.agent.total_pages, self.features, self.token)
        started = False
        try:
            writer.write(conn.hello())
            await writer.drain()
            await asyncio.wait_for(self._handshake(reader, conn), self.handshake_timeout)
            if self.on_welcome is not None:
                self.on_welcome(conn.welcome)
            self.agent.start_session(conn, self._now())
            started = True
            self.poke()  # STATS and the first reporting pass are due from now
            self._phase = "session"
            log.info("session started", extra={
                "guest": self.guest, "address": str(self.address), "window": conn.window.size,
                "max_ranges": conn.max_ranges, "features": ",".join(conn.features)})
            tasks = [asyncio.create_task(self._reader(reader, conn), name="reader"),
                     asyncio.create_task(self._writer(writer, conn), name="writer")]
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in tasks:
                    task.cancel()
                for task in tasks:
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    raise task.exception()
            return True
        except RemoteProtocolError as error:
            with contextlib.suppress(Exception):
                writer.write(conn.send_error(error))
            raise
        finally:
            if started:
                self.agent.end_session(self._now())
                self.poke()
                log.info("session ended", extra={"guest": self.guest})
            if self.port is not None and not writer.at_eof:
                self.resync_needed = True  # the host may still be in this session
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def _handshake(self, reader: asyncio.StreamReader, conn: GuestConnection) -> None:
        # Stop at WELCOME: the host may send more in the same read (a remembered TARGET
        # right after WELCOME), and those events stay queued in ``conn`` for the reader.
        while conn.state is not State.READY:
            data = await reader.read(READ_CHUNK)
            conn.receive_data(data)
            for event in conn.events():
                if event.TYPE.name == "ERROR" and event.code in PERMANENT_REFUSALS:
                    raise Refused(event.code, event.detail)
                if event.TYPE.name in ("ERROR", "BYE"):
                    raise SessionEnded(f"host refused the session: {event}")
                if conn.state is State.READY:
                    break
            if conn.state is State.CLOSED:
                raise EOFError("the host closed the connection during the handshake")

    async def _reader(self, reader: asyncio.StreamReader, conn: GuestConnection) -> None:
        while True:
            now = self._now()  # first pass: what arrived with WELCOME, before any read
            for event in conn.events():
                self.agent.receive(event, now)
            if conn.state is State.CLOSED:
                raise EOFError("the host closed the connection")
            self._wake.set()
            self._poke.set()
            conn.receive_data(await reader.read(READ_CHUNK))

    async def _writer(self, writer: asyncio.StreamWriter, conn: GuestConnection) -> None:
        agent = self.agent
        while True:
            self._wake.clear()
            if self.stop_event.is_set():
                writer.write(conn.send(Bye("shutdown")))
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(writer.drain(), 1.0)
                return
            wrote = False
            while (data := agent.pop_control()) is not None:
                writer.write(data)
                wrote = True
            while (data := agent.poll_batch(self._now())) is not None:
                writer.write(data)
                await writer.drain()  # one writer, and it waits for the socket
                wrote = True
            if wrote:
                await writer.drain()
                continue
            await self._wake.wait()
