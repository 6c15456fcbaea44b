"""Rates from successive polls: the admin API exports counters, ``top`` shows their slopes."""

from __future__ import annotations

from shared.vocabulary import BATCH_KINDS, INFLATE, PAGE_SIZE


class RateTracker:
    """Per-guest rates (batches/s, reported/inflated bytes/s) from two polls of the counters."""

    def __init__(self) -> None:
        self.previous: dict[str, tuple[float, dict]] = {}

    def update(self, guests: list[dict], now: float) -> dict[str, dict]:
        rates = {}
        seen = {}
        for guest in guests:
            gid = guest.get("id")
            counters = {"batches": sum((guest.get("batches") or {}).values()),
                        **{kind: (guest.get("pages_total") or {}).get(kind, 0)
                           for kind in BATCH_KINDS}}
            seen[gid] = (now, counters)
            before = self.previous.get(gid)
            if before is None or now <= before[0]:
                rates[gid] = {"batches_per_s": None, "report_bytes_per_s": None,
                              "inflate_bytes_per_s": None}
                continue
            elapsed = now - before[0]
            delta = {key: max(0, counters[key] - before[1].get(key, 0)) for key in counters}
            rates[gid] = {"batches_per_s": delta["batches"] / elapsed,
                          "report_bytes_per_s": delta["report"] * PAGE_SIZE / elapsed,
                          "inflate_bytes_per_s": delta[INFLATE] * PAGE_SIZE / elapsed}
        self.previous = seen
        return rates
