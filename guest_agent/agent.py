"""The agent's decisions, without sockets or clocks: what to send next, what an ACK means.

This is the part of the driver that a kernel would run in its work items: the caller
(``client.py``) owns the socket and the event loop and passes ``now`` in. Everything the
host must acknowledge is an :class:`~guest_agent.batches.Op`; the queue of ops is ordered
so that

* REUSE goes first — a reported page taken back is announced before anything else
  (before a later INFLATE of the same page, and as soon as the workload got it);
* then the balloon (DEFLATE, re-INFLATE after a reconnect, INFLATE), then free page
  reports, then hints;
* a new op is built only when the window has room, so at most ``window`` ops exist
  beyond the allocator: memory stays bounded however slow the host is.

When the window is full and there is work waiting, the time until the next ACK is the
*window stall* — reporting waits, as page_reporting waits on the virtqueue.
"""

from __future__ import annotations

import logging
from collections import deque

import numpy as np

from shared.messages import Ack, Bye, Error, HintStart, HintStop, Message, Ping, Pong, Stats, Target
from shared.protocol import GuestConnection, State
from shared.ranges import RangeBuffer, sort_and_coalesce
from shared.vocabulary import (
    HINT,
    PAGE_SIZE,
    REPORT,
    REUSE,
    STAT_ALLOC_STALLS,
    STAT_AVAILABLE,
    STAT_FREE,
    STAT_TOTAL,
    STATS,
)

from .batches import Op, payloads_for
from .metrics import GuestMetrics

log = logging.getLogger("guest_agent.agent")

#: A balloon that could not get memory tries again this often (a real guest's other
#: processes free memory without telling the agent).
STUCK_RETRY = 1.0


class SessionEnded(Exception):
    """The host said BYE or ERROR; the session is over. ``orderly``: a BYE (a clean host
    stop or restart), which is routine, not a warning."""

    def __init__(self, text: str, orderly: bool = False) -> None:
        super().__init__(text)
        self.orderly = orderly


class Agent:
    """Sans-IO guest agent core. One instance lives across sessions; see the module doc."""

    def __init__(self, *, allocator=None, workload=None, memory=None, reporting=None, balloon=None,
                 hinting=None, metrics: GuestMetrics | None = None, total_pages: int, stats=None,
                 stats_interval: float = 10.0, ping_interval: float = 15.0,
                 sweep_interval: float = 2.0, sweep_samples: int = 256) -> None:
        self.allocator = allocator
        self.workload = workload
        self.memory = memory  # WorkloadMemory proxy (canaries, OOM detection) or None
        self.reporting = reporting
        self.balloon = balloon
        self.hinting = hinting
        self.stats_source = stats  # () -> {tag: value}: a real machine's STATS (memory/linux.py)
        self.metrics = metrics or GuestMetrics()
        self.total_pages = total_pages
        self.conn: GuestConnection | None = None
        self._queue: deque[Op] = deque()
        self._deferred_aborts: list[Op] = []  # sent reports of a lost session (see end_session)
        self._inflight: dict[int, tuple[Op, float]] = {}
        self._control: deque[Message] = deque()
        self._buffer: RangeBuffer | None = None
        self._max_ranges = 1
        self._stall_since: float | None = None
        self.stall_seconds = 0.0
        self.inflight_max = 0
        self.sessions = 0
        self.stats_interval = stats_interval
        self.ping_interval = ping_interval
        self.sweep_interval = sweep_interval
        self.sweep_samples = sweep_samples
        self._next_stats = 0.0
        self._next_ping = 0.0
        self._next_sweep = 0.0
        self._ping_nonce = 0
        self.metrics.bind(self.gauges)

    # -- sessions -----------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self.conn is not None and self.conn.state is State.READY

    def start_session(self, conn: GuestConnection, now: float) -> None:
        """The handshake is done: the host starts from an empty tracker, so start over."""
        if conn.state is not State.READY:
            raise ValueError("start_session needs a connection past its WELCOME")
        self.conn = conn
        self.sessions += 1
        if self.sessions > 1:
            self.metrics.reconnects.inc()
        self._max_ranges = max(1, conn.max_ranges)
        capacity = self.reporting.capacity if self.reporting else 32
        # The seed's fixed buffer: sized once per session, refilled for every batch.
        words = max(2 * min(self._max_ranges, 4096), 2 * capacity)
        self._buffer = RangeBuffer(words, max_ranges=self._max_ranges)
        for op in self._deferred_aborts:  # back on the free lists, unreported
            op.on_abort(op)
        self._deferred_aborts.clear()
        if self.allocator is not None:
            self.allocator.clear_reported()
            self.allocator.drain_reused()  # the new host never saw those reports
        if self.reporting is not None:
            self.reporting.restart(now)
        if self.balloon is not None:
            self.balloon.negotiated(conn.features)
            self.balloon.resend_all()
        if self.hinting is not None:
            self.hinting.reset()
        self._next_stats = now
        self._next_ping = now + self.ping_interval

    def end_session(self, now: float) -> None:
        """The connection is gone: undo whatever the host may not have seen.

        A REPORT that went out may still be being discarded by the old host (a large
        discard runs off its event loop). Its blocks therefore stay isolated until the
        next WELCOME: the host admits one live session per guest id, so a new session
        means the old one — and its discards — are over. Ops never sent are undone now.
        """
        self._close_stall(now)
        for op in list(self._queue):
            if not op.done and not op.aborted and op.on_abort is not None:
                op.aborted = True
                if op.kind == REPORT and op.sent:
                    self._deferred_aborts.append(op)
                else:
                    op.on_abort(op)
        self._queue.clear()
        self._inflight.clear()
        self._control.clear()
        self.conn = None

    # -- the workload's clock -----------------------------------------------------------

    def tick(self, now: float) -> None:
        """Run the workload one step and everything that follows from it."""
        if self.workload is not None:
            self.workload.step(now)
        if self.memory is not None:
            failed = self.memory.take_failed()
            if failed and self.balloon is not None and self.balloon.oom(failed):
                self.metrics.oom_deflates.inc()
            if self.memory.ram is not None and now >= self._next_sweep:
                self._next_sweep = now + self.sweep_interval
                self.memory.sweep(self.sweep_samples)
            self.sync_canary_counters()
        if self.balloon is not None:
            self.balloon.stuck = False  # frees may have happened: inflate may try again
        if self.reporting is not None and self.connected:
            self.reporting.check(now)
        if self.hinting is not None:
            self.hinting.tick(now)
        if self.connected:
            if self.stats_interval and STATS in self.conn.features and now >= self._next_stats:
                self._next_stats = now + self.stats_interval
                self._control.append(self._stats())
            if self.ping_interval and now >= self._next_ping:
                self._next_ping = now + self.ping_interval
                self._ping_nonce += 1
                self._control.append(Ping(self._ping_nonce))

    def next_tick(self, now: float, tick: float) -> float:
        """When :meth:`tick` next has something to do, if no message comes first.

        A workload that still moves memory steps every ``tick``; otherwise the agent sleeps
        until its next deadline — the canary sweep, the end of a reporting delay, the linux
        source's MemFree check, a free page scan, STATS, PING — instead of waking 20 times a
        second to find nothing changed (an idle agent's CPU under TCG was mostly that). What
        changes without a deadline comes with a message from the host (TARGET, HINT_START,
        an ACK that frees blocks), and the client ticks again after each one.
        """
        due = [now + 3600.0]
        workload = self.workload
        if workload is not None and not getattr(workload, "settled", False):
            due.append(now + tick)
        if self.memory is not None and self.memory.ram is not None:
            due.append(self._next_sweep)
        if self.balloon is not None and (self.balloon.stuck or self.balloon.wants_work()):
            # tick() has just cleared ``stuck``; if the writer finds no memory again, a
            # real guest's other processes may free some without telling the agent
            due.append(now + max(tick, STUCK_RETRY))
        if self.reporting is not None and self.connected:
            wake = self.reporting.wake_at()
            if wake is not None:
                due.append(wake)
        if self.hinting is not None and self.hinting.interval:
            due.append(self.hinting.next_scan)
        if self.connected:
            if self.stats_interval and STATS in self.conn.features:
                due.append(self._next_stats)
            if self.ping_interval:
                due.append(self._next_ping)
        return min(due)

    def sync_canary_counters(self) -> None:
        """Fold canary checks made during workload frees into the metrics."""
        if self.memory is None:
            return
        checked = self.memory.checked_pages - self.metrics.value("balloon_guest_canary_pages_checked_total")
        failed = self.memory.canary_failures - self.metrics.value("balloon_guest_canary_failures_total")
        if checked > 0:
            self.metrics.canary_checked.inc(checked)
        if failed > 0:
            self.metrics.canary_failures.inc(failed)
            log.error("canary check failed: guest data lost", extra={"pages": int(failed)})
        alloc_failed = self.memory.alloc_failures - self.metrics.value("balloon_guest_workload_alloc_failures_total")
        if alloc_failed > 0:
            self.metrics.alloc_failures.inc(alloc_failed)

    def _stats(self) -> Stats:
        if self.stats_source is not None:
            return Stats(self.stats_source())
        free = int(self.allocator.free_pages) * PAGE_SIZE if self.allocator is not None else 0
        total = self.total_pages * PAGE_SIZE
        values = {STAT_FREE: free, STAT_TOTAL: total, STAT_AVAILABLE: free}
        if self.memory is not None:
            values[STAT_ALLOC_STALLS] = int(self.memory.alloc_failures)
        return Stats(values)

    # -- sending ------------------------------------------------------------------------

    def pop_control(self) -> bytes | None:
        """Bytes of the next unacknowledged control message (PONG, PING, STATS, HINT_DONE)."""
        if not self.connected or not self._control:
            return None
        return self.conn.send(self._control.popleft())

    def wants_to_send(self, now: float) -> bool:
        """Is there work that only waits for the window? (No side effects.)"""
        if any(op.has_unsent for op in self._queue):
            return True
        if self.balloon is not None and self.balloon.wants_work():
            return True
        if self.reporting is not None and self.reporting.state.value != "idle":
            deadline = self.reporting.deadline
            if deadline is None or now >= deadline:
                return True
        return self.hinting is not None and self.hinting.pending

    def poll_batch(self, now: float) -> bytes | None:
        """Bytes of the next batch to send, or None (nothing to do, or the window is full)."""
        if not self.connected:
            return None
        self._collect_reuse()
        if self.conn.window.full:
            if self._stall_since is None and self.wants_to_send(now):
                self._stall_since = now
            return None
        op = self._next_op(now)
        if op is None:
            return None
        data = self.conn.send(op.next_message())
        self._inflight[self.conn.last_seq] = (op, now)
        self.inflight_max = max(self.inflight_max, len(self._inflight))
        self.metrics.batches.labels(op.kind).inc()
        return data

    def _next_op(self, now: float) -> Op | None:
        for op in self._queue:
            if op.has_unsent:
                return op
        op = self._build(now)
        if op is None:
            return None
        self._queue.append(op)
        self._collect_reuse()  # an inflate may have taken reported pages: REUSE goes first
        for op in self._queue:
            if op.has_unsent:
                return op
        return None

    def _build(self, now: float) -> Op | None:
        encoding = self.conn.encoding
        if self.balloon is not None:
            op = self.balloon.build(encoding, self._max_ranges, self._buffer)
            if op is not None:
                return op
        if self.reporting is not None:
            op = self.reporting.build(now, encoding, self._max_ranges, self._buffer)
            if op is not None:
                return op
        if self.hinting is not None:
            return self.hinting.build(encoding, self._buffer, self._control)
        return None

    def _collect_reuse(self) -> None:
        """Reported pages the guest allocated again go to the host first (REUSE)."""
        if self.allocator is None:
            return
        pfns, counts = self.allocator.drain_reused()
        pfns = np.asarray(pfns, dtype=np.uint64)
        if not pfns.size:
            return
        pfns, counts = sort_and_coalesce(pfns, counts)
        op = Op(REUSE, int(np.asarray(counts).sum()), payloads_for(pfns, counts, self.conn.encoding, self._buffer))
        # Ahead of every op that has not started; an op half sent (pfn32) does not hold
        # these pages (they were allocated after it was built) and may finish later.
        index = 0
        for index, queued in enumerate(self._queue):  # noqa: B007
            if queued.sent == 0:
                break
        else:
            index = len(self._queue)
        self._queue.insert(index, op)

    # -- receiving ----------------------------------------------------------------------

    def receive(self, message: Message, now: float) -> None:
        """Handle one validated message from the host."""
        if isinstance(message, Ack):
            self._on_ack(message, now)
        elif isinstance(message, Target):
            if self.balloon is None:
                log.warning("TARGET ignored: this source has no balloon", extra={"pages": message.pages})
            else:
                self.balloon.set_target(message.pages)
                log.info("balloon target", extra={"pages": self.balloon.target,
                                                  "mib": self.balloon.target * PAGE_SIZE >> 20})
        elif isinstance(message, HintStart):
            if self.hinting is not None:
                self.hinting.start(message.cmd_id)
        elif isinstance(message, HintStop):
            if self.hinting is not None:
                self.hinting.stop(message.cmd_id)
                for op in self._queue:
                    if op.kind == HINT and op.cmd_id == message.cmd_id:
                        op.drop_unsent()
        elif isinstance(message, Ping):
            if type(message) is Ping:
                self._control.append(Pong(message.nonce))
        elif isinstance(message, Bye | Error):
            raise SessionEnded(f"{type(message).__name__.upper()}: "
                               + (message.reason if isinstance(message, Bye) else f"{message.code} {message.detail}"),
                               orderly=isinstance(message, Bye))

    def _on_ack(self, ack: Ack, now: float) -> None:
        entry = self._inflight.pop(ack.seq, None)
        self._close_stall(now)
        if entry is None:  # the connection already checked the seq; defensive only
            return
        op, sent_at = entry
        self.metrics.ack_latency.observe(max(0.0, now - sent_at))
        if ack.rejected_pages:
            self.metrics.rejected.labels(op.kind).inc(ack.rejected_pages)
        if op.acked(ack.rejected_pages):
            self._queue.remove(op)
            self.metrics.pages.labels(op.kind).inc(op.pages)
            if op.on_ack is not None:
                op.on_ack(op)

    def _close_stall(self, now: float) -> None:
        if self._stall_since is not None:
            stalled = max(0.0, now - self._stall_since)
            self._stall_since = None
            self.stall_seconds += stalled
            self.metrics.window_stall.inc(stalled)

    # -- view ---------------------------------------------------------------------------

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    def gauges(self) -> dict:
        a = self.allocator
        state = {
            "memory_bytes": self.total_pages * PAGE_SIZE,
            "inflight_batches": len(self._inflight),
            "inflight_batches_max": self.inflight_max,
            "window_size": self.conn.window.size if self.connected else 0,
            "connected": 1 if self.connected else 0,
        }
        if a is not None:
            state["free_bytes"] = int(a.free_pages) * PAGE_SIZE
            state["reported_bytes"] = int(a.reported_pages) * PAGE_SIZE
            state["isolated_bytes"] = int(a.isolated_pages) * PAGE_SIZE
        if self.balloon is not None:
            state["inflated_bytes"] = self.balloon.pages * PAGE_SIZE
            state["balloon_target_bytes"] = self.balloon.target * PAGE_SIZE
        if self.hinting is not None:
            state["possibly_reclaimable_bytes"] = self.hinting.possibly_reclaimable_pages * PAGE_SIZE
            state["hinted_bytes"] = self.hinting.hinted_pages * PAGE_SIZE
        return state
