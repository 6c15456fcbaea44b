"""The policy's asyncio shell: every interval, measure, tick the pure engine, send TARGETs.

It reads what the host already knows (registry records: tracker, last STATS and when it
came, RAM file ``st_blocks``, the discards' requested/released bytes; the inventory's
min/max memory when there is one) plus the host memory source (hostmem.py), hands it to
``policy.PolicyEngine`` and sends each changed target through ``host.set_target`` — the
same path as the admin API. One structured log line per decision: changes at info, a
hold whose reason changed at info, a repeated hold at debug (a steady fleet is quiet).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from shared import PAGE_SIZE

from .hostmem import HostMemoryError, HostMemorySource, make_source
from .policy import Decision, GuestState, HostMemory, PolicyConfig, PolicyEngine

log = logging.getLogger("balloon.host.policy")


class PolicyDriver:
    def __init__(self, host, config: PolicyConfig, source: HostMemorySource) -> None:
        self.host = host
        self.source = source
        self.engine = PolicyEngine(config)
        self.decisions_total: dict[tuple[str, str, str], int] = {}
        self.errors = 0
        self.last_error: str | None = None
        self.ticks = 0
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()

    @property
    def config(self) -> PolicyConfig:
        return self.engine.config

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="policy")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception as error:  # a bug or an unreadable source must not end the host
                self.errors += 1
                self.last_error = str(error)[:200]
                log.exception("policy tick failed")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.config.interval)

    def reconfigure(self, config: PolicyConfig | None = None, budget: int | None = None) -> None:
        """Runtime change (POST /api/v1/policy): new knobs and/or a new budget; ticks at once."""
        if budget is not None:
            self.source = make_source("budget", budget)
        if config is not None:
            self.engine.reconfigure(config)
        log.info("policy reconfigured", extra={"policy": self.config.policy, "source": self.source.describe()})
        self._wake.set()

    # -- one tick -----------------------------------------------------------------------

    def measure(self, now: float) -> tuple[HostMemory, list[GuestState], dict]:
        records = sorted(self.host.registry.guests.values(), key=lambda r: r.id)
        inventory = getattr(self.host.registry, "inventory", None)  # current, also after PUT/DELETE
        guests = []
        resident_total = 0
        for record in records:
            resident = requested = released = None
            ram = record.ram
            if ram is not None:
                with contextlib.suppress(OSError):
                    resident = ram.resident_bytes()
                    resident_total += resident
                requested, released = ram.requested_bytes, ram.released_bytes
            provisioned = inventory.get(record.id) if inventory is not None else None
            min_pages = getattr(provisioned, "min_pages", None)
            max_pages = getattr(provisioned, "max_pages", None)
            stats_at = record.stats_at
            guests.append(GuestState(
                id=record.id, memory_bytes=record.pages * PAGE_SIZE,
                balloon_bytes=record.balloon_pages * PAGE_SIZE,
                target_bytes=None if record.target_pages is None else record.target_pages * PAGE_SIZE,
                stats=dict(record.stats), stats_age=None if stats_at is None else max(0.0, now - stats_at),
                connected=record.reachable,  # an agent session, or a stock guest's VMM
                min_memory=None if min_pages is None else min_pages * PAGE_SIZE,
                max_memory=None if max_pages is None else max_pages * PAGE_SIZE,
                discard_requested_bytes=requested or 0, discard_released_bytes=released or 0,
                resident_bytes=resident))
        host_memory = self.source.read(resident_total)
        return host_memory, guests, {r.id: r for r in records}

    async def tick(self) -> list[Decision]:
        now = time.monotonic()
        try:
            host_memory, guests, records = self.measure(now)
        except HostMemoryError as error:
            self.errors += 1
            self.last_error = str(error)
            log.warning("policy skipped a tick: host memory unreadable", extra={"error": str(error)})
            return []
        previous = dict(self.engine.last_decisions)
        decisions = self.engine.tick(now, host_memory, guests)
        self.ticks += 1
        self.last_error = None
        known = set(records)
        for key in [k for k in self.decisions_total if k[0] not in known]:
            del self.decisions_total[key]  # a forgotten guest's series go with it
        for decision in decisions:
            key = (decision.guest, decision.direction, decision.reason)
            self.decisions_total[key] = self.decisions_total.get(key, 0) + 1
            before = previous.get(decision.guest)
            quiet = not decision.changed and before is not None and before.reason == decision.reason
            self._log(decision, host_memory, logging.DEBUG if quiet else logging.INFO)
            if decision.changed and self.config.policy != "manual":
                self.host.set_target(decision.guest, decision.target_bytes // PAGE_SIZE)
        return decisions

    def _log(self, decision: Decision, host_memory: HostMemory, level: int) -> None:
        if not log.isEnabledFor(level):
            return
        extra = {"guest": decision.guest, "policy": self.config.policy, "direction": decision.direction,
                 "reason": decision.reason, "rule": decision.rule, "priority": decision.priority,
                 "target_bytes": decision.target_bytes, "previous_bytes": decision.previous_bytes,
                 "host_free_ratio": round(host_memory.free_ratio, 4)}
        for key, value in decision.detail.items():
            extra.setdefault(f"in_{key}", value)
        log.log(level, "policy decision", extra=extra)

    # -- what the admin API and /metrics show -------------------------------------------

    def to_json(self, history: int = 100) -> dict:
        engine = self.engine
        host_memory = engine.last_host
        now = time.monotonic()
        decisions = sorted(engine.last_decisions.values(), key=lambda d: d.guest)
        return {
            "policy": self.config.policy,
            "source": self.source.kind,
            "guest_memory_budget": self.source.budget,
            "interval_s": self.config.interval,
            "ticks": self.ticks,
            "last_tick_age_s": None if engine.last_tick is None else round(now - engine.last_tick, 3),
            "last_error": self.last_error,
            "host": None if host_memory is None else {
                "total_bytes": host_memory.total_bytes, "available_bytes": host_memory.available_bytes,
                "free_ratio": round(host_memory.free_ratio, 4), "pressure_some": host_memory.pressure_some,
                "pressure_full": host_memory.pressure_full, "source": host_memory.source},
            "config": self.config.to_json(),
            "decisions": [d.to_json() for d in decisions],
            "history": [c.to_json() for c in list(engine.history)[-history:]] if history > 0 else [],
        }

    def collect(self):
        """Metric families of the policy, for metrics.HostCollector (scrape time)."""
        engine = self.engine
        info = GaugeMetricFamily("balloon_policy_info", "The policy in force (value 1).", labels=["policy", "source"])
        info.add_metric([self.config.policy, self.source.kind], 1)
        yield info
        known = self.host.registry.guests  # a guest forgotten since the last tick has no series
        target = GaugeMetricFamily("balloon_policy_target_bytes",
                                   "Balloon size the policy decided at its last tick.", labels=["guest"])
        for decision in engine.last_decisions.values():
            if decision.guest in known:
                target.add_metric([decision.guest], decision.target_bytes)
        yield target
        decisions = CounterMetricFamily("balloon_policy_decisions_total",
                                        "Policy decisions, one per guest per tick.",
                                        labels=["guest", "direction", "reason"])
        for (guest, direction, reason), count in self.decisions_total.items():
            if guest in known:
                decisions.add_metric([guest, direction, reason], count)
        yield decisions
        errors = CounterMetricFamily("balloon_policy_errors_total", "Policy ticks that failed or were skipped.")
        errors.add_metric([], self.errors)
        yield errors
        host_memory = engine.last_host
        if host_memory is not None:
            available = GaugeMetricFamily("balloon_host_memory_available_bytes",
                                          "Host memory available to guests as the policy's source measures it "
                                          "(may be negative over a budget).")
            available.add_metric([], host_memory.available_bytes)
            yield available
            total = GaugeMetricFamily("balloon_host_memory_total_bytes",
                                      "What host free memory is relative to: MemTotal, memory.max or the budget.")
            total.add_metric([], host_memory.total_bytes)
            yield total
            pressure = GaugeMetricFamily("balloon_host_memory_pressure_ratio",
                                         "PSI memory pressure, avg10 as a ratio.", labels=["kind"])
            pressure.add_metric(["some"], host_memory.pressure_some)
            pressure.add_metric(["full"], host_memory.pressure_full)
            yield pressure
