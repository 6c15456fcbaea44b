"""``balloon-guest``: parse the options, assemble the agent, run it until SIGTERM/SIGINT.

On SIGTERM or SIGINT the agent sends BYE to the host and exits 0. A refusal that retrying
cannot change (``bad-size``, ``auth-failed``, ``bad-version`` ...) ends it with one line and
exit status 2, like a bad option; anything else (no host yet, a lost session) is retried.
"""

from __future__ import annotations

import asyncio
import errno
import inspect
import logging
import os
import signal
import sys
import time

from shared.runtime.logfmt import configure_logging
from shared.vocabulary import SHARED_RAM

from .agent import Agent
from .client import GuestClient, refusal_line
from .metrics import GuestMetrics, start_http
from .settings import (
    AUTO_HTTP_TRIES,
    PAGE_SIZE,
    GuestSettings,
    SettingsError,
    parse_settings,
    parse_size_mix,
)

log = logging.getLogger("guest_agent")


def _call_with_supported(function, *args, **kwargs):
    """Call ``function`` with the keyword arguments it declares (workload knobs are optional)."""
    try:
        params = inspect.signature(function).parameters
    except (TypeError, ValueError):
        params = {}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        accepted = kwargs
    else:
        accepted = {k: v for k, v in kwargs.items() if k in params}
    return function(*args, **{k: v for k, v in accepted.items() if v is not None})


def build_agent(settings: GuestSettings, metrics: GuestMetrics) -> tuple[Agent, object | None]:
    """The agent for the chosen source, with its allocator, workload, reporter and balloon.

    Each source imports only its own modules (the sources' memory models, workloads and
    numpy.random are not loaded for a source that does not use them: guest RSS)."""
    if settings.source == "procfs":
        from .hinting import Hinting
        from .memory import procfs

        root = settings.procfs_root

        def scan():
            return procfs.scan_free_runs(root)

        pages = _machine_pages(settings)
        hinting = Hinting(scan, interval=settings.scan_interval, background=True,
                          probe=lambda: procfs.free_bytes(root))
        log.info("procfs source: free pages are sent only as hints for host hint commands — "
                 "'possibly reclaimable', never isolated or reported", extra={"root": str(root)})
        return Agent(hinting=hinting, metrics=metrics, total_pages=pages, stats_interval=settings.stats_interval), None

    if settings.source == "linux":
        return _linux_agent(settings, metrics), None

    from .balloon import Balloon
    from .canaries import WorkloadMemory
    from .memory import BuddyAllocator
    from .memory.workloads import make_workload
    from .reporting import FreePageReporting

    allocator = BuddyAllocator(settings.pages)
    # A new generation per run: a canary left in the persistent RAM file by an earlier run
    # of this guest never passes for a page this run owns.
    memory = WorkloadMemory(allocator, seed=settings.seed, generation=time.time_ns() & 0xFFFF_FFFF)
    try:
        workload = _call_with_supported(
            make_workload, settings.workload, memory, seed=settings.seed, utilization=settings.utilization,
            rate=settings.rate, size_mix=parse_size_mix(settings.size_mix), period=settings.period,
            swing=settings.swing)
    except (OSError, ValueError) as error:
        raise SettingsError(f"--workload {settings.workload}: {error}") from None
    reporting = (FreePageReporting(allocator, settings.report_order, settings.report_delay, settings.capacity)
                 if settings.reporting else None)
    balloon = Balloon(allocator, deflate_on_oom="deflate-on-oom" in settings.offered_features())
    agent = Agent(allocator=allocator, workload=workload, memory=memory, reporting=reporting, balloon=balloon,
                  metrics=metrics, total_pages=settings.pages, sweep_samples=settings.canary_samples,
                  stats_interval=settings.stats_interval)
    return agent, memory


def _machine_pages(settings: GuestSettings) -> int:
    """The RAM size a real machine announces: --memory, else the end of System RAM in iomem."""
    if settings.pages:
        return settings.pages
    from .memory import procfs

    try:
        return procfs.system_ram_pages(settings.procfs_root)
    except (OSError, ValueError) as error:
        raise SettingsError(f"--source {settings.source}: cannot read System RAM from "
                            f"{settings.procfs_root}/proc/iomem ({error}); give --memory") from None


def _linux_agent(settings: GuestSettings, metrics: GuestMetrics) -> Agent:
    """The real machine's memory (guest_agent/memory/linux.py); root only."""
    from .hinting import Hinting
    from .memory import linux, procfs

    root = settings.procfs_root
    pages = _machine_pages(settings)
    memory = linux.LinuxPages(root)
    try:
        memory.prepare()
    except OSError as error:
        raise SettingsError(f"--source linux: {error}") from None
    hinting = Hinting(lambda: procfs.scan_free_runs(root), interval=settings.scan_interval, background=True,
                      probe=lambda: procfs.free_bytes(root))
    reporting = linux.LinuxReporting(memory, pages, root, delay=settings.report_delay) if settings.reporting else None
    balloon = linux.LinuxBalloon(memory, pages, root)
    log.info("linux source: balloon and reports are pages this agent holds (mlock + pagemap); "
             "hints from kpageflags are only 'possibly reclaimable'", extra={"pages": pages})
    return Agent(reporting=reporting, balloon=balloon, hinting=hinting, metrics=metrics, total_pages=pages,
                 stats=lambda: linux.read_stats(root), stats_interval=settings.stats_interval)


class SharedRamBinder:
    """Maps the RAM file the host names in WELCOME (once; it persists across host restarts)."""

    def __init__(self, settings: GuestSettings, memory) -> None:  # memory: canaries.WorkloadMemory
        self.settings = settings
        self.memory = memory
        self.path: str | None = None
        self.decided = not settings.shared_ram  # without --shared-ram the workload starts at once

    def __call__(self, welcome) -> None:
        if not self.settings.shared_ram or self.memory is None:
            return
        if SHARED_RAM not in welcome.features or not welcome.ram_file:
            if not self.decided:
                log.warning("the host did not grant shared-ram (run it with --ram-dir): no canaries")
            self.decided = True
            return
        if self.path is None:
            if self.memory.live:
                log.warning("shared RAM granted after the workload started: no canaries this run")
                self.decided = True
                return
            from .memory.ram import SharedRam

            self.memory.ram = SharedRam(welcome.ram_file, self.settings.pages)
            self.path = welcome.ram_file
            log.info("guest RAM mapped from the host's file; canaries on", extra={"ram_file": welcome.ram_file})
        elif welcome.ram_file != self.path:
            log.warning("the host names another RAM file; keeping the mapped one",
                        extra={"ram_file": welcome.ram_file, "mapped": self.path})
        self.decided = True


async def run(settings: GuestSettings) -> int:
    metrics = GuestMetrics()
    try:
        agent, memory = build_agent(settings, metrics)
    except SettingsError as error:
        print(f"balloon-guest: error: {error}", file=sys.stderr)
        return 2
    binder = SharedRamBinder(settings, memory)
    client = GuestClient(
        agent, settings.connect, settings.id, settings.offered_features(), token=settings.token(),
        tick=settings.tick, reconnect_max=settings.reconnect_max,
        handshake_timeout=settings.handshake_timeout, on_welcome=binder,
        workload_ready=lambda: binder.decided)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, client.stop)
    server = None
    if settings.http is not None:
        try:
            server, host, bound = await _serve_metrics(metrics, settings)
        except OSError as error:
            host, port = settings.http
            log.error("cannot serve metrics", extra={"http": f"{host}:{port}", "error": str(error)})
            return 1
        log.info("metrics", extra={"url": f"http://{host}:{bound}/metrics"})
    log.info("guest agent started", extra={
        "guest": settings.id, "connect": str(settings.connect), "memory_mib": settings.pages * PAGE_SIZE >> 20,
        "source": settings.source, "workload": settings.workload})
    try:
        await client.run()
    finally:
        if server is not None:
            await server.close()
    if client.refused is not None:  # retrying cannot help: say why in one line and stop (as a bad option does)
        print(f"balloon-guest: error: {refusal_line(settings.id, settings.pages, client.refused)}",
              file=sys.stderr, flush=True)
        return 2
    log.info("guest agent stopped", extra={"guest": settings.id})
    return 0


async def _serve_metrics(metrics: GuestMetrics, settings: GuestSettings):
    """(server, host, port) of the metrics server; with ``--http auto`` the first free port
    from 9471, so a second guest on the same machine does not fail on the first one's port."""
    host, port = settings.http
    tries = AUTO_HTTP_TRIES if settings.http_auto else 1
    for offset in range(tries):
        try:
            server = await start_http(metrics, host, port + offset)
        except OSError as error:
            if error.errno != errno.EADDRINUSE or offset == tries - 1:
                raise
            continue
        return server, host, server.port
    raise AssertionError("unreachable")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        settings = parse_settings(argv, os.environ)
    except SettingsError as error:
        print(f"balloon-guest: error: {error}", file=sys.stderr)
        return 2
    configure_logging(settings.log_format, settings.log_level)
    try:  # the stock loop: uvloop would bring ssl (guest_agent/entry.py) for one connection's traffic
        with asyncio.Runner() as runner:
            return runner.run(run(settings))
    except KeyboardInterrupt:
        return 0
