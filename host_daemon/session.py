"""One guest connection: an asyncio shell around ``shared.protocol.HostConnection``.

Tasks per connection (DESIGN §5):

- the **reader** reads at most 64 KiB at a time, feeds the sans-IO connection and handles
  every complete message in that chunk; the ACKs for one chunk leave as one write. It
  does not read again until the chunk's replies are queued, and the queue is bounded,
  so a guest that floods without reading its ACKs stalls itself (TCP/Unix backpressure)
  instead of growing host memory (DESIGN §4 invariant 4);
- the **writer** drains a bounded queue of byte strings, writing what is queued at once
  and awaiting ``drain()``;
- the **watchdog** closes a connection that sent no valid HELLO within the handshake
  timeout, PINGs a silent guest after a third of the idle timeout and closes it when
  nothing at all arrived for the whole idle timeout.

A batch is acked only after it is applied to the tracker and, with shared RAM, after
its newly reported or inflated ranges are punched out of the RAM file: the guest keeps
those pages isolated until the ACK (mm/page_reporting.c), so the discard can never race
a guest write.
"""

from __future__ import annotations

import asyncio
import logging
import time
from time import perf_counter

from shared.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from shared.messages import (
    Ack,
    Bye,
    Error,
    Hello,
    HintDone,
    Ping,
    Pong,
    Stats,
    Target,
    Welcome,
)
from shared.protocol import CONNECTION_CLOSED, NEED_DATA, HostConnection, State
from shared.vocabulary import PAGE_SIZE, U64_MAX

from .admission import REFUSALS

log = logging.getLogger("balloon.host.session")

READ_CHUNK = 65536
#: Batches that give back at least this many pages (4 MiB) are punched in a worker thread:
#: tmpfs frees ~1 GiB/s of filled pages, so 32 order-9 blocks (64 MiB) would stall the loop,
#: i.e. every other guest's ACKs, for ~10 ms. fallocate releases the GIL (ctypes call).
OFFLOAD_PAGES = 1024
QUEUE_ITEMS = 16  # byte strings; each is at most one chunk's replies (<= ~64 KiB)
_CLOSE = object()
ENDINGS = (Bye, Error)

#: Every value of balloon_sessions_total{result}, exported from the start so rates work.
RESULTS = ("bye", "closed", "reset", "error", "rejected", "timeout", "shutdown", "guest-error", "internal")


class Session:
    """Serves one connection from accept to close; ``run()`` returns when it is over."""

    def __init__(self, host, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 address: str, transport: str, peer=None) -> None:
        self.host = host
        self.peer = peer
        self.settings = host.settings
        self.reader = reader
        self.writer = writer
        self.address = address
        self.transport = transport
        self.conn = HostConnection(self.settings.max_message_bytes)
        self.queue: asyncio.Queue = asyncio.Queue(QUEUE_ITEMS)
        self.record = None
        self._admission = None
        self.started = time.monotonic()
        self.last_rx = self.started
        self.reason = "closed"
        self.result = "closed"
        self._stopping = False
        self._reading = False
        self._pinged = False
        self._nonce = 0
        self._pending = None
        self._welcomed = asyncio.Event()  # wakes the watchdog from the handshake to the idle timer
        self._reader_task: asyncio.Task | None = None
        self._writer_task: asyncio.Task | None = None

    # -- lifecycle ----------------------------------------------------------------------

    async def run(self) -> None:
        host = self.host
        self._writer_task = asyncio.create_task(self._write_loop())
        self._reader_task = asyncio.create_task(self._read_loop())
        watchdog = asyncio.create_task(self._watchdog())
        try:
            await self._reader_task
        except asyncio.CancelledError:
            if not self._stopping:
                raise
        except Exception:  # a bug here must end this session, never the host
            log.exception("session failed", extra={"guest": self.guest, "address": self.address})
            self._queue_error(RemoteProtocolError("internal", "the host failed handling this session"))
            self.reason = self.result = "internal"
        finally:
            watchdog.cancel()
            if self._stopping and self.result == "closed" and self.reason == "closed":
                self.reason = self.result = "shutdown"
            if self.result == "shutdown" and self.conn.state is State.READY:
                self._put_nowait(self.conn.send(Bye("host shutting down")))
            await self._finish_writer()
            if self._admission is not None:
                host.admitter.release(self._admission, self, self.result)
            host.stats.sessions[self.result] = host.stats.sessions.get(self.result, 0) + 1
            log.info("session end", extra={
                "guest": self.guest, "address": self.address,
                "duration_s": round(time.monotonic() - self.started, 3), "reason": self.reason})

    @property
    def guest(self) -> str | None:
        return self.record.id if self.record is not None else None

    def window_state(self) -> tuple[int, int] | None:
        window = self.conn.window
        return None if window is None else (window.size, window.in_flight)

    def stop(self) -> None:
        """Host shutdown: stop reading, finish what was read, then BYE (see run)."""
        self._stopping = True
        if self._reading and self._reader_task is not None:
            self._reader_task.cancel()

    def _abort(self, error: ProtocolError, result: str) -> None:
        """End the session from outside the reader (timeouts): ERROR, then close."""
        self.reason = error.code
        self.result = result
        self._queue_error(error)
        self._stopping = True
        if self._reader_task is not None:
            self._reader_task.cancel()

    async def _finish_writer(self) -> None:
        self._put_nowait(_CLOSE, force=True)
        try:
            await asyncio.wait_for(asyncio.shield(self._writer_task), 2.0)
        except (TimeoutError, asyncio.CancelledError):
            self._writer_task.cancel()
            self.writer.transport.abort()

    # -- output -------------------------------------------------------------------------

    def _put_nowait(self, item, force: bool = False) -> None:
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            if force:  # the peer does not read: nothing more can reach it anyway
                self.writer.transport.abort()
                self._writer_task.cancel()

    def _queue_error(self, error: ProtocolError) -> None:
        code = error.code
        stats = self.host.stats
        stats.protocol_errors[code] = stats.protocol_errors.get(code, 0) + 1
        if self.record is not None:
            self.record.errors += 1
        try:
            data = self.conn.send(Error(code, error.detail[:1000]))
        except LocalProtocolError:
            return
        self._put_nowait(data)

    async def send(self, message, timeout: float = 1.0) -> bool:
        """Send a host-initiated message (TARGET, HINT_START) in order with the ACKs.

        False when the guest has not read its queue for ``timeout`` seconds: a guest that
        stops reading is closed by the idle timeout, and the admin call must not hang on it.
        """
        data = self.conn.send(message)
        try:
            await asyncio.wait_for(self.queue.put(data), timeout)
        except TimeoutError:
            log.warning("guest not reading; message not queued",
                        extra={"guest": self.guest, "message": type(message).__name__})
            return False
        return True

    async def _write_loop(self) -> None:
        queue = self.queue
        writer = self.writer
        try:
            while True:
                item = await queue.get()
                if item is _CLOSE:
                    break
                if queue.qsize():
                    parts = [item]
                    closing = False
                    while queue.qsize():
                        more = queue.get_nowait()
                        if more is _CLOSE:
                            closing = True
                            break
                        parts.append(more)
                    writer.write(b"".join(parts))
                    await writer.drain()
                    if closing:
                        break
                else:
                    writer.write(item)
                    await writer.drain()
        except (ConnectionError, OSError):
            if self._reader_task is not None and not self._stopping:
                self.reason = self.result = "reset"
                self._stopping = True
                self._reader_task.cancel()
        finally:
            writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), 1.0)
            except (TimeoutError, ConnectionError, OSError):
                pass

    # -- input --------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        reader = self.reader
        conn = self.conn
        delay = self.settings.debug_apply_delay
        while not self._stopping:
            self._reading = True
            try:
                data = await reader.read(READ_CHUNK)
            except asyncio.CancelledError:
                if self._stopping:
                    return
                raise
            except (ConnectionError, OSError):
                self.reason = self.result = "reset"
                return
            finally:
                self._reading = False
            self.last_rx = time.monotonic()
            self._pinged = False
            conn.receive_data(data)
            record = self.record
            if record is not None:
                record.received_bytes += len(data)
                record.last_message_at = time.time()
            # Parse the whole chunk first, then handle it: the window slots of every batch
            # read stay taken until its ACK is packed, so the in-flight gauge shows what the
            # host holds and a guest that sends past its window within what we read is
            # caught (window-overrun), as a device sees an overfull ring. A malformed
            # message anywhere in the chunk kills the connection before anything of it is
            # applied (nothing could be acked on a dead connection anyway).
            events = []
            closed = False
            try:
                while True:
                    event = conn.next_event()
                    if event is NEED_DATA:
                        break
                    if event is CONNECTION_CLOSED:
                        closed = True
                        break
                    events.append(event)
                    if type(event) in ENDINGS:  # BYE or ERROR from the guest closes it
                        break
            except RemoteProtocolError as error:
                self.reason = error.code
                self.result = "rejected" if error.code in REFUSALS else "error"
                self._queue_error(error)
                return
            out: list[bytes] = []  # control replies, as bytes
            acks: list[Ack] = []  # packed at the end of the chunk (one write)
            try:
                for event in events:
                    kind = getattr(event, "KIND", None)
                    if kind is not None:
                        if delay:  # a slow host: each ACK leaves as soon as its batch is done
                            await self._flush(out, acks)
                            await asyncio.sleep(delay)
                        ack = self._apply(kind, event)
                        if ack is None:  # a large discard runs off the loop; the ACK waits for it
                            await self._flush(out, acks)
                            ack = await self._discard_then_ack(kind, event)
                        acks.append(ack)
                        if delay:
                            await self._flush(out, acks)
                    elif not self._control(event, out):
                        await self._flush(out, acks)
                        return
                await self._flush(out, acks)
            except RemoteProtocolError as error:  # refused HELLO, failed discard
                try:  # what was applied before the failure is still acked
                    out.extend([conn.send_ack(ack) for ack in acks])
                except LocalProtocolError:
                    pass
                if out:
                    await self.queue.put(b"".join(out))
                self.reason = error.code
                self.result = "rejected" if error.code in REFUSALS else "error"
                self._queue_error(error)
                return
            except LocalProtocolError:
                return  # the connection was closed under us (timeout, shutdown)
            if closed:
                return

    async def _flush(self, out: list[bytes], acks: list[Ack]) -> None:
        if acks:
            send_ack = self.conn.send_ack
            out.extend([send_ack(ack) for ack in acks])
            acks.clear()
        if out:
            data = b"".join(out) if len(out) > 1 else out[0]
            out.clear()
            await self.queue.put(data)

    def _apply(self, kind: str, batch) -> Ack | None:
        """Apply one batch and return its ACK — the hot path, kept flat on purpose.

        Returns None when the batch gave back so many pages that the hole punching should
        not block the loop (other guests' ACKs); ``_discard_then_ack`` finishes it.
        """
        start = perf_counter()
        record = self.record
        result = record.tracker.apply(kind, batch.pfns, batch.counts,
                                      batch.cmd_id if kind == "hint" else None)
        discard = result.discard
        if record.ram is not None and discard[0].size:
            if int(discard[1].sum()) >= OFFLOAD_PAGES:
                self._pending = (result, start)
                return None
            self._discard(record, discard)
        # _account, inlined: this runs once per batch
        record.apply.observe(perf_counter() - start)
        record.batches[kind] += 1
        record.ranges[kind] += result.ranges
        record.pages_total[kind] += result.pages
        rejected_pages = result.rejected_pages
        if rejected_pages:
            return self._rejected(record, result, batch)
        return Ack(batch.seq, 0)

    async def _discard_then_ack(self, kind: str, batch) -> Ack:
        result, start = self._pending
        self._pending = None
        record = self.record
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.host.discard_pool, self._discard, record, result.discard)
        return self._account(kind, batch, record, result, start)

    @staticmethod
    def _discard(record, discard) -> None:
        try:
            record.ram.discard(discard[0], discard[1])
        except OSError as error:
            log.error("discard failed", extra={"guest": record.id, "error": str(error)})
            raise RemoteProtocolError("internal", "the host could not discard pages") from None

    @classmethod
    def _account(cls, kind: str, batch, record, result, start: float) -> Ack:
        record.apply.observe(perf_counter() - start)
        record.batches[kind] += 1
        record.ranges[kind] += result.ranges
        record.pages_total[kind] += result.pages
        if result.rejected_pages:
            return cls._rejected(record, result, batch)
        return Ack(batch.seq, 0)

    @staticmethod
    def _rejected(record, result, batch) -> Ack:
        rejected = record.rejected
        for reason, pages in result.rejected.items():
            rejected[reason] = rejected.get(reason, 0) + pages
        return Ack(batch.seq, min(result.rejected_pages, U64_MAX))

    def _control(self, event, out: list[bytes]) -> bool:
        """Non-batch messages; False when the session ends."""
        if isinstance(event, Hello):
            out.extend(self._welcome(event))
        elif isinstance(event, Ping):
            if isinstance(event, Pong):
                return True
            out.append(self.conn.send(Pong(event.nonce)))
        elif isinstance(event, Stats):
            self.record.stats = event.values
        elif isinstance(event, HintDone):
            self.record.hint_done = event.cmd_id
        elif isinstance(event, Bye):
            self.reason = f"bye: {event.reason}"[:200] if event.reason else "bye"
            self.result = "bye"
            return False
        elif isinstance(event, Error):
            self.reason = f"guest error {event.code}"[:200]
            self.result = "guest-error"
            return False
        return True

    def _welcome(self, hello: Hello) -> list[bytes]:
        host = self.host
        settings = self.settings
        admission = host.admitter.admit(hello, self.peer, self)
        self._admission = admission
        record = self.record = admission.record
        features = admission.features
        ram_file = admission.ram_file
        record.received_bytes += self.conn.bytes_received
        record.last_message_at = time.time()
        out = [self.conn.send(Welcome(
            window=settings.window, max_ranges=settings.max_ranges, features=features,
            max_message_bytes=settings.max_message_bytes, ram_file=ram_file, pages=record.pages))]
        if record.target_pages is not None:
            out.append(self.conn.send(Target(record.target_pages)))
        self._welcomed.set()
        log.info("session start", extra={
            "guest": record.id, "address": self.address, "pages": admission.pages,
            "claimed_pages": hello.pages, "memory_bytes": admission.pages * PAGE_SIZE,
            "provisioned": record.provisioned is not None, "features": ",".join(features)})
        return out

    # -- timers -------------------------------------------------------------------------

    async def _watchdog(self) -> None:
        settings = self.settings
        conn = self.conn
        remaining = self.started + settings.handshake_timeout - time.monotonic()
        try:
            await asyncio.wait_for(self._welcomed.wait(), max(remaining, 0))
        except TimeoutError:
            if conn.state in (State.IDLE, State.HANDSHAKE):
                self._abort(RemoteProtocolError(
                    "handshake-timeout", f"no HELLO within {settings.handshake_timeout:g}s"), "timeout")
            return
        idle = settings.idle_timeout
        while conn.state is State.READY:
            now = time.monotonic()
            silent = now - self.last_rx
            if silent >= idle:
                self._abort(RemoteProtocolError("idle-timeout", f"nothing received for {idle:g}s"), "timeout")
                return
            if silent >= idle / 3 and not self._pinged:
                self._pinged = True
                self._nonce += 1
                try:
                    self.queue.put_nowait(conn.send(Ping(self._nonce)))
                except (asyncio.QueueFull, LocalProtocolError):
                    pass
                await asyncio.sleep(idle - silent)
            else:
                await asyncio.sleep((idle / 3 if silent < idle / 3 else idle) - silent)
