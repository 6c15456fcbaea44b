"""Workloads: what the simulated guest does with its memory, driven by the agent's clock.

``make_workload(spec, allocator, ...)`` returns an object whose ``step(now)`` does the
allocations and frees due by time ``now`` (seconds, any monotonic origin: the first
call is time zero). The allocator is anything with ``alloc(order) -> pfn | None`` and
``free(pfn, order)`` — the :class:`~guest_agent.memory.buddy.BuddyAllocator` or the
agent's canary-writing proxy — plus ``total_pages``. All random choices come from one
seeded ``numpy.random.Generator``, so a seed replays a run exactly.

Specs:

``idle``
    Allocate a working set once — ``utilization`` of guest memory, 10% by default, like a
    freshly booted guest — then nothing. (If memory runs out, the rest is retried at
    later steps.)
``churn``
    Fill to ``utilization`` (default 50%) at the first step, then ``rate`` allocations per
    second (default 1000), each preceded by frees of random held blocks while the next
    allocation would overshoot the target: utilization stays within one block of the
    target and frees/s match allocs/s. Orders from ``size_mix`` (default 0..3 evenly).
    In the second half of every ``period`` (default 23 s) a surge of ``swing`` (default 20%
    of memory) more is allocated in order-9 blocks at the same rate, then freed whole at
    the next period.
    Small random churn alone only ever recycles unreported memory (the allocator hands out
    unreported blocks first, as Linux queues reported pages at the tail) and fragments
    it; a surge larger than what reporting leaves unreported (its low watermark reserve)
    takes reported pages back (REUSE) every period, and freeing it whole merges the
    blocks back, so they are reported again.
``burst``
    Every ``period`` seconds (default 13) allocate ``utilization`` (default 50%) of guest
    memory in large blocks (order 9 first, smaller when none is free; or ``size_mix``),
    hold them ``hold`` seconds (default half the period), then free all of them.

The default periods (23 s, 13 s) are primes, so they never alias with the guest's STATS
interval (5 s by default) or the host's scrape intervals: a sample lands on every phase
of the cycle over time instead of always on the same one (a 10 s burst sampled every
10 s shows the same "free" forever).
``trace:FILE``
    Replay a recorded trace (format below) exactly: same calls, same order, at the
    recorded times. With the same allocator state it yields the same PFNs.

Trace format (text, one event per line, ``#`` starts a comment, blank lines ignored)::

    # t_seconds  op     order  id
    0.000        alloc  0      a1
    0.250        alloc  3      buf-7
    1.500        free   0      a1

``t_seconds``: non-negative float, seconds since the workload started, non-decreasing;
``op``: ``alloc`` or ``free``; ``order``: the block order (0..max order); ``id``: any
token without whitespace naming the allocation; a ``free`` names a live id with the
order it was allocated with, and an id may be reused after it is freed. The file is
checked when loaded (ValueError with the line number). An allocation that fails at
replay is counted and its later ``free`` skipped. :class:`TraceRecorder` writes this
format from the ``on_alloc``/``on_free`` hooks of any workload.

Hooks, all optional: ``on_alloc(pfn, order)`` after every allocation and
``on_free(pfn, order)`` before every free (e.g. to write and check canaries), and
``on_oom(order) -> bool`` when an allocation fails: return True when memory was made
available (e.g. taken from the balloon, deflate-on-oom) to retry the allocation once.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: Catch-up limit: after a stall, at most this many seconds of work is done in one step.
MAX_CATCH_UP_S = 1.0
#: At most this many allocations in one step: filling a multi-TiB guest's working set
#: takes many steps instead of blocking the agent's event loop (and its handshake) for minutes.
MAX_ALLOCS_PER_STEP = 20_000

DEFAULT_MIX = {0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0}


class _Randoms:
    """Chunked draws from one generator: cheap per-call orders and uniform floats.

    Python's ``random.Random`` (Mersenne Twister), not ``numpy.random``: the simulated guest
    is the agent too, and numpy.random's extension modules (and the ``secrets``/``hmac`` it
    imports) were ~2 MiB of its RSS for a few thousand draws."""

    CHUNK = 4096

    def __init__(self, rng: random.Random, mix: dict[int, float]):
        self.rng = rng
        self.orders = sorted(mix)
        total = float(sum(mix[o] for o in self.orders))
        self.p = [mix[o] / total for o in self.orders]
        self._cum = list(itertools.accumulate(self.p))
        self._orders: list[int] = []
        self._floats: list[float] = []

    def order(self) -> int:
        if not self._orders:
            self._orders = self.rng.choices(self.orders, cum_weights=self._cum, k=self.CHUNK)
        return self._orders.pop()

    def uniform(self) -> float:
        if not self._floats:
            draw = self.rng.random
            self._floats = [draw() for _ in range(self.CHUNK)]
        return self._floats.pop()

    def mean_pages(self) -> float:
        return float(sum(p * (1 << o) for p, o in zip(self.p, self.orders, strict=True)))


def _check_mix(
    mix: dict[int, float] | None, max_order: int, default: dict[int, float]
) -> dict[int, float]:
    mix = dict(default if mix is None else mix)
    if not mix:
        raise ValueError("size mix is empty")
    for order, weight in mix.items():
        if not (isinstance(order, (int, np.integer)) and 0 <= order <= max_order):
            raise ValueError(f"size mix order {order!r} is not in 0..{max_order}")
        if not (math.isfinite(weight) and weight >= 0):
            raise ValueError(f"size mix weight {weight!r} for order {order} is not >= 0")
    if sum(mix.values()) <= 0:
        raise ValueError("size mix weights sum to 0")
    return {int(o): float(w) for o, w in mix.items()}


def _check_fraction(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be between 0 and 1, got {value}")
    return value


class Workload:
    """Common bookkeeping: the held blocks, hooks, counters, OOM retry."""

    name = "workload"

    def __init__(
        self,
        allocator,
        *,
        seed: int | None = None,
        on_alloc: Callable[[int, int], None] | None = None,
        on_free: Callable[[int, int], None] | None = None,
        on_oom: Callable[[int], bool] | None = None,
    ):
        self.allocator = allocator
        self.total_pages = int(allocator.total_pages)
        self.max_order = int(getattr(allocator, "max_order", 10))
        self.rng = random.Random(seed)
        self.on_alloc = on_alloc
        self.on_free = on_free
        self.on_oom = on_oom
        # held blocks as parallel lists (swap-remove for random frees)
        self._held_pfn: list[int] = []
        self._held_order: list[int] = []
        self.held_pages = 0
        self.allocations = 0
        self.frees = 0
        self.failed_allocations = 0
        self.oom_retries = 0
        self.started_at: float | None = None

    #: True while a step would do nothing: the agent then stops ticking for the workload
    #: (agent.next_tick) until a message or a deadline wakes it.
    settled = False

    # -- the agent's clock
    def step(self, now: float) -> None:
        if self.started_at is None:
            self.started_at = now
        self._step(now - self.started_at)

    def _step(self, elapsed: float) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def utilization(self) -> float:
        """Share of guest memory this workload holds now."""
        return self.held_pages / self.total_pages

    # -- alloc/free with hooks
    def _alloc(self, order: int) -> int | None:
        pfn = self._alloc_block(order)
        if pfn is not None:
            self._held_pfn.append(pfn)
            self._held_order.append(order)
        return pfn

    def _alloc_block(self, order: int) -> int | None:
        """Allocate with hooks and counters, but outside the randomly freed held lists."""
        pfn = self.allocator.alloc(order)
        if pfn is None and self.on_oom is not None and self.on_oom(order):
            self.oom_retries += 1
            pfn = self.allocator.alloc(order)
        if pfn is None:
            self.failed_allocations += 1
            return None
        pfn = int(pfn)
        self.held_pages += 1 << order
        self.allocations += 1
        if self.on_alloc is not None:
            self.on_alloc(pfn, order)
        return pfn

    def _free_at(self, index: int) -> None:
        held_pfn, held_order = self._held_pfn, self._held_order
        pfn, order = held_pfn[index], held_order[index]
        held_pfn[index] = held_pfn[-1]
        held_order[index] = held_order[-1]
        held_pfn.pop()
        held_order.pop()
        self._release(pfn, order)

    def _release(self, pfn: int, order: int) -> None:
        if self.on_free is not None:
            self.on_free(pfn, order)
        self.allocator.free(pfn, order)
        self.held_pages -= 1 << order
        self.frees += 1

    def held_blocks(self) -> tuple[np.ndarray, np.ndarray]:
        return np.array(self._held_pfn, dtype=np.uint64), np.array(
            self._held_order, dtype=np.uint64
        )

    def release_all(self) -> None:
        """Free everything this workload holds (shutdown, tests)."""
        while self._held_pfn:
            self._free_at(len(self._held_pfn) - 1)


class Idle(Workload):
    """A working set allocated once, then nothing (a freshly booted, idle guest)."""

    name = "idle"

    def __init__(self, allocator, *, utilization: float = 0.10, size_mix=None, **kw):
        super().__init__(allocator, **kw)
        self.target_pages = int(_check_fraction("utilization", utilization) * self.total_pages)
        self._rand = _Randoms(self.rng, _check_mix(size_mix, self.max_order, DEFAULT_MIX))
        self._pending_order: int | None = None

    def _fill(self) -> None:
        for _ in range(MAX_ALLOCS_PER_STEP):
            if self._pending_order is None:
                self._pending_order = self._rand.order()
            order = self._pending_order
            if self.held_pages + (1 << order) > self.target_pages:
                return
            if self._alloc(order) is None:
                return  # out of memory: retried at the next step
            self._pending_order = None

    def _step(self, elapsed: float) -> None:
        if self.held_pages < self.target_pages:
            self._fill()

    @property
    def settled(self) -> bool:
        """The working set is in place (a fill cut short by a full memory keeps ticking)."""
        if self.started_at is None:
            return False
        pending = 1 << self._pending_order if self._pending_order is not None else 1
        return self.held_pages + pending > self.target_pages


class Churn(Idle):
    """Steady allocation and free around a target utilization, mixed orders, plus a surge
    of ``swing`` every second half ``period`` that takes reported memory back."""

    name = "churn"
    settled = False  # it never is

    def __init__(self, allocator, *, utilization: float = 0.5, rate: float = 1000.0, swing: float = 0.2,
                 period: float = 23.0, **kw):
        super().__init__(allocator, utilization=utilization, **kw)
        rate = float(rate)
        if not (math.isfinite(rate) and rate >= 0):
            raise ValueError(f"rate must be >= 0 allocations/s, got {rate}")
        self.rate = rate
        self.period = float(period)
        if not (math.isfinite(self.period) and self.period > 0):
            raise ValueError(f"period must be > 0 seconds, got {period}")
        self.surge_target = min(self.total_pages - self.target_pages,
                                int(_check_fraction("swing", swing) * self.total_pages))
        # The surge is kept apart from the random churn and freed whole (LIFO): the blocks
        # it split out of reported memory merge back, so they are reported again.
        self._surge: list[tuple[int, int]] = []
        self.surge_order = min(9, self.max_order)  # pageblocks, the size reporting hands to the host
        self.surge_pages = 0
        self.surges = 0
        self._last: float | None = None
        self._budget = 0.0

    def _step(self, elapsed: float) -> None:
        high = self.surge_target > 0 and int(elapsed // (self.period / 2)) % 2 == 1
        if not high and self._surge:
            self._release_surge()
        if self._last is None:
            self._last = elapsed
            self._fill()
            return
        dt = min(max(elapsed - self._last, 0.0), MAX_CATCH_UP_S)
        self._last = elapsed
        self._budget += self.rate * dt
        due = int(self._budget)
        self._budget -= due
        rand = self._rand
        for _ in range(due):
            if self._pending_order is None:
                self._pending_order = rand.order()
            need = 1 << self._pending_order
            if high and self.surge_pages + (1 << self.surge_order) <= self.surge_target:
                if self._alloc_surge(self.surge_order) is None:
                    break  # out of memory: try again at the next step
                continue
            while self._held_pfn and self.held_pages - self.surge_pages + need > self.target_pages:
                self._free_at(int(rand.uniform() * len(self._held_pfn)))
            if self.held_pages - self.surge_pages + need > self.target_pages:
                self._pending_order = None  # larger than the whole target: skip
                continue
            if self._alloc(self._pending_order) is None:
                break  # out of memory: try again at the next step
            self._pending_order = None

    def _alloc_surge(self, order: int) -> int | None:
        if not self._surge:
            self.surges += 1
        pfn = self._alloc_block(order)
        if pfn is not None:
            self._surge.append((pfn, order))
            self.surge_pages += 1 << order
        return pfn

    def _release_surge(self) -> None:
        while self._surge:
            pfn, order = self._surge.pop()
            self.surge_pages -= 1 << order
            self._release(pfn, order)

    def held_blocks(self) -> tuple[np.ndarray, np.ndarray]:
        pfns, orders = super().held_blocks()
        return (np.concatenate([pfns, np.array([b[0] for b in self._surge], dtype=np.uint64)]),
                np.concatenate([orders, np.array([b[1] for b in self._surge], dtype=np.uint64)]))

    def release_all(self) -> None:
        self._release_surge()
        super().release_all()


class Burst(Workload):
    """Periodic large allocation held for a while, then freed."""

    name = "burst"

    def __init__(
        self,
        allocator,
        *,
        utilization: float = 0.5,
        period: float = 13.0,
        hold: float | None = None,
        size_mix=None,
        **kw,
    ):
        super().__init__(allocator, **kw)
        self.target_pages = int(_check_fraction("utilization", utilization) * self.total_pages)
        self.period = float(period)
        self.hold = self.period / 2 if hold is None else float(hold)
        if not (self.period > 0 and 0 < self.hold < self.period):
            raise ValueError(
                f"need period > 0 and 0 < hold < period, got {self.period}, {self.hold}"
            )
        default = {min(9, self.max_order): 1.0}
        mix = _check_mix(size_mix, self.max_order, default)
        # large blocks first; smaller orders are the fallback when memory is fragmented
        self.orders = sorted((o for o, w in mix.items() if w > 0), reverse=True)
        self.bursts = 0
        self._holding = False
        self._cycle = -1

    def _step(self, elapsed: float) -> None:
        cycle = int(elapsed // self.period)
        in_hold = (elapsed - cycle * self.period) < self.hold
        if self._holding and (cycle != self._cycle or not in_hold):
            self.release_all()
            self._holding = False
        if in_hold and cycle != self._cycle:
            self._cycle = cycle
            self._holding = True
            self.bursts += 1
            self._allocate_burst()

    def _allocate_burst(self) -> None:
        for order in self.orders:
            while self.held_pages + (1 << order) <= self.target_pages:
                if self._alloc(order) is None:
                    break


# ---------------------------------------------------------------------- traces
@dataclass(frozen=True, slots=True)
class TraceEvent:
    t: float
    op: str  # "alloc" | "free"
    order: int
    id: str


def parse_trace(text: str, max_order: int = 10) -> list[TraceEvent]:
    """Parse and check a trace (format in the module docstring); ValueError names the line."""
    events: list[TraceEvent] = []
    live: dict[str, int] = {}
    last_t = 0.0
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        if len(fields) != 4:
            raise ValueError(f"trace line {lineno}: expected 't op order id', got {raw!r}")
        t_text, op, order_text, ident = fields
        try:
            t = float(t_text)
            order = int(order_text)
        except ValueError:
            raise ValueError(f"trace line {lineno}: bad time or order in {raw!r}") from None
        if not (math.isfinite(t) and t >= 0):
            raise ValueError(f"trace line {lineno}: time must be a finite number >= 0")
        if t < last_t:
            raise ValueError(f"trace line {lineno}: time goes backwards ({t} < {last_t})")
        if not 0 <= order <= max_order:
            raise ValueError(f"trace line {lineno}: order {order} not in 0..{max_order}")
        if op == "alloc":
            if ident in live:
                raise ValueError(f"trace line {lineno}: id {ident!r} is already allocated")
            live[ident] = order
        elif op == "free":
            if ident not in live:
                raise ValueError(f"trace line {lineno}: free of unknown id {ident!r}")
            if live.pop(ident) != order:
                raise ValueError(f"trace line {lineno}: id {ident!r} freed with another order")
        else:
            raise ValueError(f"trace line {lineno}: op must be alloc or free, got {op!r}")
        last_t = t
        events.append(TraceEvent(t, op, order, ident))
    return events


def format_event(t: float, op: str, order: int, ident: str) -> str:
    return f"{t:.6f} {op} {order} {ident}\n"


class TraceRecorder:
    """Records a workload's allocations and frees as a trace (pass its hooks to a workload).

    Ids are ``b<n>``, one per allocation; ``clock()`` gives the event time."""

    def __init__(self, clock: Callable[[], float]):
        self.clock = clock
        self.lines: list[str] = []
        self._ids: dict[int, str] = {}
        self._n = 0

    def on_alloc(self, pfn: int, order: int) -> None:
        self._n += 1
        ident = f"b{self._n}"
        self._ids[pfn] = ident
        self.lines.append(format_event(self.clock(), "alloc", order, ident))

    def on_free(self, pfn: int, order: int) -> None:
        self.lines.append(format_event(self.clock(), "free", order, self._ids.pop(pfn)))

    def text(self) -> str:
        return "# t_seconds op order id\n" + "".join(self.lines)


class Trace(Workload):
    """Replays a trace file; after its last event the workload is idle."""

    name = "trace"

    def __init__(
        self,
        allocator,
        *,
        path: str | Path | None = None,
        events: list[TraceEvent] | None = None,
        **kw,
    ):
        super().__init__(allocator, **kw)
        if events is None:
            if path is None:
                raise ValueError("trace workload needs a file")
            events = parse_trace(Path(path).read_text(), self.max_order)
        self.events = events
        self._next = 0
        self._blocks: dict[str, tuple[int, int]] = {}  # live id -> (pfn, order)
        self.skipped_frees = 0

    @property
    def done(self) -> bool:
        return self._next >= len(self.events)

    @property
    def settled(self) -> bool:
        return self.done

    def _step(self, elapsed: float) -> None:
        events = self.events
        while self._next < len(events) and events[self._next].t <= elapsed:
            ev = events[self._next]
            self._next += 1
            if ev.op == "alloc":
                pfn = self._alloc_block(ev.order)  # freed by id, not at random
                if pfn is not None:
                    self._blocks[ev.id] = (pfn, ev.order)
            else:
                block = self._blocks.pop(ev.id, None)
                if block is None:
                    self.skipped_frees += 1  # its allocation failed at replay
                else:
                    self._release(*block)

    def held_blocks(self) -> tuple[np.ndarray, np.ndarray]:
        blocks = list(self._blocks.values())
        return (
            np.array([b[0] for b in blocks], dtype=np.uint64),
            np.array([b[1] for b in blocks], dtype=np.uint64),
        )

    def release_all(self) -> None:
        while self._blocks:
            _, block = self._blocks.popitem()
            self._release(*block)


WORKLOADS = {"idle": Idle, "churn": Churn, "burst": Burst}


def make_workload(
    spec: str,
    allocator,
    *,
    seed: int | None = None,
    utilization: float | None = None,
    rate: float | None = None,
    size_mix: dict[int, float] | None = None,
    period: float | None = None,
    hold: float | None = None,
    swing: float | None = None,
    on_alloc: Callable[[int, int], None] | None = None,
    on_free: Callable[[int, int], None] | None = None,
    on_oom: Callable[[int], bool] | None = None,
) -> Workload:
    """Build the workload named by ``spec`` (idle | churn | burst | trace:FILE).

    Knobs left as None take the workload's default; knobs a workload does not use are
    ignored (``rate`` and ``swing`` only drive churn, ``hold`` only burst; ``period`` is
    the cycle of both)."""
    hooks = {"seed": seed, "on_alloc": on_alloc, "on_free": on_free, "on_oom": on_oom}
    knobs: dict = {}
    if spec.startswith("trace:"):
        return Trace(allocator, path=spec[len("trace:") :], **hooks)
    if spec not in WORKLOADS:
        raise ValueError(f"unknown workload {spec!r}: expected idle, churn, burst or trace:FILE")
    if utilization is not None:
        knobs["utilization"] = utilization
    if size_mix is not None:
        knobs["size_mix"] = size_mix
    if spec == "churn" and rate is not None:
        knobs["rate"] = rate
    if spec == "churn" and swing is not None:
        knobs["swing"] = swing
    if spec in ("churn", "burst") and period is not None:
        knobs["period"] = period
    if spec == "burst" and hold is not None:
        knobs["hold"] = hold
    return WORKLOADS[spec](allocator, **knobs, **hooks)
