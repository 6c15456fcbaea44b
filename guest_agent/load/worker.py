"""A worker runs its share of the load guests on one event loop, in one process.

``run_load`` spreads the guests over ``processes`` workers (multiprocessing, spawn),
starts them together, collects their per-second records for the live view and merges
their results: counters add, histograms merge through their standard encoding.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import queue as queue_module
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from shared.runtime.addresses import parse_address
from shared.vocabulary import RANGES52

from .guest import LoadGuest, Plan
from .payloads import build_pool
from .stats import Recorder, Timeline, Totals, latency_distribution, latency_summary, new_histogram

TICK_S = 1.0
START_MARGIN_S = 0.05


@dataclass(frozen=True)
class LoadConfig:
    """Every knob of a run (picklable: it travels to the worker processes)."""

    connect: str
    guests: int = 1
    processes: int = 1
    duration: float | None = None
    batches: int | None = None
    rate: float | None = None
    batch_ranges: int = 32
    fragmentation: float = 0.1
    kind: str = "report"
    reuse: bool = False
    encoding: str = RANGES52
    ramp: float = 0.0
    id_prefix: str = "load"
    tokens: dict[str, str] = field(default_factory=dict)  # guest id -> token ("*" = every guest)
    guest_pages: int = 262144
    pool_size: int = 256
    seed: int = 1

    def guest_ids(self) -> list[str]:
        return [f"{self.id_prefix}-{index}" for index in range(self.guests)]

    def token_for(self, guest_id: str) -> str | None:
        return self.tokens.get(guest_id, self.tokens.get("*"))


@dataclass
class LoadResult:
    config: LoadConfig
    totals: Totals
    histogram: object  # HdrHistogram
    timeline: Timeline
    elapsed_s: float
    last_errors: list[str]

    @property
    def latency_s(self) -> dict:
        return latency_summary(self.histogram)

    @property
    def latency_distribution(self) -> list[dict]:
        return latency_distribution(self.histogram)


async def _run_guests(config: LoadConfig, indices: list[int], epoch_wall: float,
                      emit: Callable[[dict], None]) -> dict:
    """Run guests ``indices`` starting at wall time ``epoch_wall``; returns a result dict."""
    address = parse_address(config.connect)
    pool = build_pool(config.guest_pages, config.batch_ranges, config.fragmentation, config.encoding,
                      config.pool_size, config.seed)
    recorder = Recorder()
    offset = time.perf_counter() - time.time()  # wall -> perf_counter
    start = epoch_wall + offset
    deadline = None if config.duration is None else start + config.duration
    plan = Plan(address=address, kind=config.kind, reuse=config.reuse, encoding=config.encoding,
                guest_pages=config.guest_pages, rate=config.rate, batches=config.batches,
                deadline=deadline)
    ids = config.guest_ids()
    guests = [LoadGuest(ids[index], config.token_for(ids[index]), plan, pool, recorder,
                        offset=index * 7919) for index in indices]
    ramp_step = config.ramp / max(1, config.guests)
    tasks = [asyncio.ensure_future(guest.run(start + index * ramp_step))
             for guest, index in zip(guests, indices, strict=True)]

    loop = asyncio.get_running_loop()

    def interrupt() -> None:  # Ctrl-C / SIGTERM: stop gracefully and still report
        for guest in guests:
            guest.interrupt()

    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):  # not the main thread
            loop.add_signal_handler(signum, interrupt)
    second = 0

    def tick() -> None:
        nonlocal second, ticker
        emit({"type": "tick", **recorder.tick(second)})
        second += 1
        ticker = loop.call_later(max(0.0, start + (second + 1) * TICK_S - time.perf_counter()), tick)

    ticker = loop.call_later(max(0.0, start + TICK_S - time.perf_counter()), tick)
    try:
        await asyncio.gather(*tasks)
    finally:
        ticker.cancel()
    end = time.perf_counter()
    emit({"type": "tick", **recorder.tick(second)})
    return {"totals": recorder.totals.as_dict(), "histogram": recorder.histogram.encode()
            if recorder.histogram.get_total_count() else None,
            "elapsed_s": end - start,
            "last_errors": sorted({g.last_error for g in guests if g.last_error})}


def _loop_factory(config: LoadConfig):
    """uvloop for Unix and TCP when installed; the stock loop for vsock (uvloop cannot carry it)."""
    if parse_address(config.connect).kind == "vsock":
        return asyncio.new_event_loop
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a Linux dependency
        return asyncio.new_event_loop
    return uvloop.new_event_loop


def run_worker(config: LoadConfig, indices: list[int], epoch_wall: float,
               emit: Callable[[dict], None]) -> dict:
    """One worker's whole run on its own event loop."""
    with asyncio.Runner(loop_factory=_loop_factory(config)) as runner:
        return runner.run(_run_guests(config, indices, epoch_wall, emit))


def _process_main(config: LoadConfig, indices: list[int], ready, go, epoch, results) -> None:
    """Entry point of a worker process: build payloads, wait for the common start, run."""
    try:
        build_pool(config.guest_pages, config.batch_ranges, config.fragmentation, config.encoding,
                   config.pool_size, config.seed)  # fail early, before the start line
    except BaseException as error:
        ready.put(("failed", os.getpid(), f"{type(error).__name__}: {error}"))
        return
    ready.put(("ready", os.getpid(), None))
    try:
        go.wait()
        result = run_worker(config, indices, epoch.value, lambda record: results.put(("tick", 0, record)))
        results.put(("done", os.getpid(), result))
    except BaseException as error:  # report, never hang the parent
        results.put(("failed", os.getpid(), f"{type(error).__name__}: {error}"))


def split_guests(guests: int, processes: int) -> list[list[int]]:
    """Guest indices per process, as even as possible, interleaved so ramps stay spread."""
    processes = max(1, min(processes, guests))
    return [list(range(worker, guests, processes)) for worker in range(processes)]


def run_load(config: LoadConfig, on_tick: Callable[[dict], None] | None = None) -> LoadResult:
    """Run the whole load; ``on_tick`` sees each merged per-second record as it completes."""
    timeline = Timeline()

    def take(record: dict) -> None:
        slot = timeline.add(record)
        if on_tick is not None:
            on_tick(slot)

    shares = split_guests(config.guests, config.processes)
    if len(shares) == 1:
        epoch = time.time() + START_MARGIN_S
        results = [run_worker(config, shares[0], epoch, take)]
    else:
        results = _run_processes(config, shares, take)
    return merge(config, results, timeline)


def _run_processes(config: LoadConfig, shares: list[list[int]], take) -> list[dict]:
    context = multiprocessing.get_context("spawn")
    ready, results = context.Queue(), context.Queue()
    go = context.Event()
    epoch = context.Value("d", 0.0)
    workers = [context.Process(target=_process_main, args=(config, share, ready, go, epoch, results),
                               daemon=True) for share in shares]
    for worker in workers:
        worker.start()

    def forward(signum, _frame) -> None:  # the workers stop gracefully and send their results
        for worker in workers:
            if worker.pid is not None and worker.is_alive():
                os.kill(worker.pid, signum)

    previous = {signum: signal.signal(signum, forward) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        for _ in workers:
            kind, _pid, detail = _get(ready, workers)
            if kind != "ready":
                raise RuntimeError(f"a load worker failed: {detail}")
        epoch.value = time.time() + START_MARGIN_S
        go.set()
        done: list[dict] = []
        while len(done) < len(workers):
            kind, _pid, detail = _get(results, workers)
            if kind == "tick":
                take(detail)
            elif kind == "done":
                done.append(detail)
            else:
                raise RuntimeError(f"a load worker failed: {detail}")
        return done
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for worker in workers:
            worker.join(timeout=5)
            if worker.is_alive():
                worker.kill()
                worker.join()


def _get(source, workers):
    """Next message from the workers; fail if they all died without saying why."""
    while True:
        try:
            return source.get(timeout=0.5)
        except queue_module.Empty:
            if not any(worker.is_alive() for worker in workers):
                raise RuntimeError("every load worker exited without a result") from None


def merge(config: LoadConfig, results: list[dict], timeline: Timeline) -> LoadResult:
    totals = Totals()
    histogram = new_histogram()
    last_errors: set[str] = set()
    for result in results:
        totals.add(result["totals"])
        if result["histogram"]:
            histogram.decode_and_add(result["histogram"])
        last_errors.update(result["last_errors"])
    elapsed = max(result["elapsed_s"] for result in results)
    return LoadResult(replace(config, tokens={}), totals, histogram, timeline, elapsed, sorted(last_errors))
